"""`tuneline demo --traffic`'s users against the real gateway (tuneline/gateway/) in front of two real
upstreams (the echo server): one always names the answer key's category, the other never does. The
users' ratings reach MLflow through the gateway's feedback endpoint, the monitor ends the losing
challenger's test on them, and the users' corrections become a raw partition."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

from tuneline import tracking
from tuneline.config import parse_config
from tuneline.demo.traffic import ServedApp, answer_key, simulate_users, user_verdict, wait_until_recorded
from tuneline.gateway.app import GatewaySettings, create_app
from tuneline.gateway.echo import EchoState, create_echo_app
from tuneline.server.launcher import free_port
from tuneline.tasks.feedback import harvest_corrections
from tuneline.tasks.monitor import monitor
from tuneline.tasks.promote import record_alias_move
from tuneline.tracking import CHALLENGER, CHAMPION

RIGHT = "Category: billing/double_charge\nReply: Sorry about the duplicate charge; we have refunded it."
WRONG = "Category: shipping/late_delivery\nReply: Your parcel is on its way."


def test_the_users_verdict_follows_the_answer_keys_category() -> None:
    assert user_verdict(RIGHT, RIGHT.replace("refunded it", "sent it back"))
    assert not user_verdict(WRONG, RIGHT)
    assert user_verdict("Paris.", "paris") and not user_verdict("Rome", "Paris")


def test_simulated_users_through_the_gateway_end_a_worse_challengers_test(tmp_path: Path) -> None:
    key = tmp_path / "eval.jsonl"
    key.write_text(
        "".join(
            json.dumps(
                {
                    "messages": [
                        {"role": "system", "content": "You are the support assistant."},
                        {"role": "user", "content": f"I was charged twice for order {n}."},
                        {"role": "assistant", "content": RIGHT},
                    ]
                }
            )
            + "\n"
            for n in range(5)
        )
    )
    config = parse_config(
        {
            "data": {"sources": [{"name": "support", "uri": str(tmp_path / "raw")}], "eval_set": str(key)},
            "tracking": {
                "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
                "artifact_location": str(tmp_path / "artifacts"),
                "experiment": "demo-traffic",
            },
            "serving": {"feedback_spool": str(tmp_path / "spool"), "challenger_share": 0.5},
            "promotion": {
                "rollout": "ab",
                "monitor": {"evaluate_max_traces": 0, "min_feedback_per_variant": 20},
            },
        }
    )
    upstreams = {
        answer: ServedApp(create_echo_app(EchoState(answer=answer)), free_port()).start()
        for answer in (RIGHT, WRONG)
    }
    gateway = None
    try:
        run_id = tracking.RunLog.start(config.tracking, flow="test", name="register").run_id
        for alias, answer in ((CHAMPION, RIGHT), (CHALLENGER, WRONG)):
            record = tracking.register_external_model(
                config.tracking,
                run_id,
                f"model-{alias}",
                params={},
                tags={
                    "tuneline.provider_kind": "compatible",
                    "tuneline.base_url": f"{upstreams[answer].url}/v1",
                },
                metrics={},
            )
            tracking.set_alias(config.tracking, alias, record.version)
        record_alias_move(
            config.tracking, CHALLENGER, "2", "test", datetime.now(UTC) - timedelta(seconds=2), "test"
        )

        port = free_port()
        gateway = ServedApp(create_app(GatewaySettings(config, None, "127.0.0.1", port)), port).start()
        outcome = simulate_users(
            f"{gateway.url}/v1",
            config.tracking.registered_model,
            answer_key(key),
            users=40,
            requests_per_user=2,
            rating_share=1.0,
            correction_share=0.5,
            concurrency=4,
        )
        stats = wait_until_recorded(gateway.url, outcome.requests)
    finally:
        if gateway is not None:
            gateway.stop()
        for served in upstreams.values():
            served.stop()

    assert outcome.requests == 80 and outcome.failed == 0 and outcome.feedback_refused == 0
    assert outcome.by_variant[CHAMPION] > 20 and outcome.by_variant[CHALLENGER] > 20
    assert outcome.positive[CHAMPION] == outcome.rated[CHAMPION] == outcome.by_variant[CHAMPION]
    assert outcome.positive[CHALLENGER] == 0 and outcome.rated[CHALLENGER] == outcome.by_variant[CHALLENGER]
    assert stats["feedback"]["delivered"] == 80 and stats["traces"]["exported"] == 80

    report = monitor(config.tracking, config.promotion.monitor)
    assert report.decision is not None and report.decision.action == "end_test", report.decision
    assert report.decision.challenger.rated == outcome.rated[CHALLENGER]
    assert tracking.alias_version(config.tracking, CHALLENGER) is None

    harvest = harvest_corrections(config, date(2026, 11, 23), datetime.now(UTC) - timedelta(hours=1))
    assert harvest.written == outcome.corrections > 0
    assert harvest.path == tmp_path / "raw" / "dt=2026-11-23" / "feedback.jsonl"
    assert all(
        json.loads(line)["messages"][-1]["content"] == RIGHT for line in harvest.path.read_text().splitlines()
    )
