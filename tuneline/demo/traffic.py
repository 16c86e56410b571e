"""`tuneline demo --traffic`: after the two demo nights, users talk to the gateway and the monitor decides.

A simulated user population sends the eval set's support tickets through `tuneline gateway` (the real
app on loopback, in front of `tuneline serve`), each user with a stable id so the gateway's sticky A/B
split holds; a user rates the answer up when it names the category the demo's answer key gives and down
otherwise, and some users who got a wrong answer send the right one as a correction. Then the monitor
flow reads the traces, decides, and turns the corrections into the raw partition of the next day.

The challenger: the version the second night made `challenger` (`promotion.rollout: ab` and a candidate
that passed the offline gate). When there is none (night 2's candidate is typically rejected), the demo
registers the untuned base model as the challenger, said so on the version's tags and printed: a
challenger the users will rate worse, so the demo shows a test ended on live feedback.
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import openai

from tuneline import tracking
from tuneline.config import Config
from tuneline.metrics import answer_label, normalized_match
from tuneline.paths import resolve
from tuneline.tracking import CHALLENGER, CHAMPION

TRACE_HEADER = "x-tuneline-trace-id"
VARIANT_HEADER = "x-tuneline-variant"


@dataclass(frozen=True)
class Question:
    messages: list[dict[str, Any]]  # the request: system and user turns
    reference: str  # the answer key's answer


def answer_key(path: str | Path) -> list[Question]:
    """The demo's eval set as questions with their reference answers."""
    questions = []
    for line in resolve(path).read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        messages = json.loads(line)["messages"]
        if messages and messages[-1].get("role") == "assistant":
            questions.append(Question(messages[:-1], str(messages[-1]["content"])))
    return questions


def user_verdict(answer: str, reference: str) -> bool:
    """A user is satisfied when the answer names the answer key's category (or, for an answer key
    without categories, says the same thing up to case and punctuation)."""
    expected = answer_label(reference)
    if expected is not None:
        return answer_label(answer) == expected
    return bool(normalized_match(answer, reference))


@dataclass
class TrafficOutcome:
    requests: int = 0
    failed: int = 0
    by_variant: Counter[str] = field(default_factory=Counter)
    rated: Counter[str] = field(default_factory=Counter)
    positive: Counter[str] = field(default_factory=Counter)
    corrections: int = 0
    feedback_refused: int = 0


def simulate_users(
    base_url: str,
    model: str,
    questions: Sequence[Question],
    *,
    users: int,
    requests_per_user: int,
    rating_share: float = 0.8,
    correction_share: float = 0.3,
    seed: int = 0,
    concurrency: int = 8,
    max_tokens: int = 192,
    api_key: str = "demo",
) -> TrafficOutcome:
    """Each user asks `requests_per_user` questions through the gateway at `base_url` (ending in /v1)
    and rates `rating_share` of the answers (deterministic for a seed, whatever the thread order)."""
    if not questions:
        raise ValueError("the answer key holds no questions")
    client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=120)
    plan = [(f"user-{u:04d}", i) for u in range(users) for i in range(requests_per_user)]
    outcome = TrafficOutcome()

    def one(index: int, user: str) -> tuple[str | None, bool | None, bool, bool]:
        rng = random.Random(f"{seed}:{index}")
        question = questions[rng.randrange(len(questions))]
        try:
            raw = client.chat.completions.with_raw_response.create(
                model=model,
                messages=question.messages,  # type: ignore[arg-type]
                user=user,
                max_tokens=max_tokens,
                temperature=0,
            )
        except openai.OpenAIError:
            return None, None, False, False
        variant = raw.headers.get(VARIANT_HEADER)
        trace_id = raw.headers.get(TRACE_HEADER)
        answer = raw.parse().choices[0].message.content or ""
        if trace_id is None or rng.random() >= rating_share:
            return variant, None, False, False
        satisfied = user_verdict(answer, question.reference)
        body: dict[str, Any] = {"trace_id": trace_id, "value": satisfied, "user": user}
        corrected = not satisfied and rng.random() < correction_share
        if corrected:
            body["correction"] = question.reference
        refused = httpx.post(
            f"{base_url}/feedback", json=body, headers={"authorization": f"Bearer {api_key}"}, timeout=30
        ).is_error
        return variant, None if refused else satisfied, corrected and not refused, refused

    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda item: one(item[0], item[1][0]), enumerate(plan)))
    for variant, satisfied, corrected, refused in results:
        outcome.requests += 1
        if variant is None:
            outcome.failed += 1
            continue
        outcome.by_variant[variant] += 1
        if satisfied is not None:
            outcome.rated[variant] += 1
            outcome.positive[variant] += satisfied
        outcome.corrections += corrected
        outcome.feedback_refused += refused
    return outcome


def ensure_challenger(config: Config) -> tuple[str, str, bool]:
    """(champion version, challenger version, whether the demo registered the base model as challenger)."""
    champion = tracking.alias_version(config.tracking, CHAMPION)
    if champion is None:
        raise RuntimeError("no champion after the two nights: nothing for the gateway to serve")
    challenger = tracking.alias_version(config.tracking, CHALLENGER)
    if challenger is not None:
        return champion.version, challenger.version, False
    from tuneline.tasks.promote import record_alias_move

    run = tracking.RunLog.start(config.tracking, flow="demo-traffic", name="demo challenger: the base model")
    base = config.model.base
    record = tracking.register_external_model(
        config.tracking,
        run.run_id,
        base,
        params={"model_id": base, "provider": config.provider.kind, "base_model": base},
        tags={
            "tuneline.provider": config.provider.kind,
            "tuneline.provider_kind": config.provider.kind,
            "tuneline.base_model": base,
            "tuneline.demo": "the untuned base model, made challenger by `tuneline demo --traffic`",
        },
        metrics={},
    )
    tracking.set_alias(config.tracking, CHALLENGER, record.version)
    record_alias_move(
        config.tracking,
        CHALLENGER,
        record.version,
        "tuneline demo --traffic",
        datetime.now(UTC),
        "no candidate passed the offline gate: the untuned base model stands in, to show the monitor",
    )
    run.finish()
    return champion.version, record.version, True


def wait_until_recorded(gateway_url: str, requests: int, timeout_s: float = 180.0) -> dict[str, Any]:
    """Poll the gateway's stats until every trace is exported (or dropped) and no feedback is spooled."""
    deadline = time.monotonic() + timeout_s
    stats: dict[str, Any] = {}
    while time.monotonic() < deadline:
        stats = httpx.get(f"{gateway_url}/gateway/stats", timeout=10).json()
        traces = stats.get("traces") or {}
        settled = sum(int(traces.get(k, 0)) for k in ("exported", "dropped_queue_full", "failed_export"))
        if settled >= requests and stats["feedback"]["spooled"] == 0:
            return stats
        time.sleep(0.5)
    return stats


class ServedApp:
    """An ASGI app on uvicorn, on a loopback port, in a thread of this process (stopped by `stop`)."""

    def __init__(self, app: Any, port: int) -> None:
        import threading

        import uvicorn

        self.port = port
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
        )
        self.thread = threading.Thread(target=self.server.run, name="demo-gateway", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 60.0) -> ServedApp:
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the gateway did not start on port {self.port}")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def run_traffic(
    config: Config,
    *,
    users: int = 60,
    requests_per_user: int = 3,
    challenger_share: float = 0.5,
    seed: int = 0,
    log: Any = print,
) -> TrafficOutcome:
    """Serve the registry through the gateway (with `tuneline serve` behind it for local versions) and
    let the simulated users talk to it; returns what they did. The caller runs the monitor after."""
    from tuneline.gateway.app import GatewaySettings, create_app
    from tuneline.server.launcher import free_port, start_server

    server = None
    try:
        local_url = config.serving.local_base_url
        if config.provider.kind == "local" and not local_url:
            server = start_server(
                resolve(config.server.state_dir), api_key=None, model_dirs=config.server.model_dirs
            )
            local_url = server.base_url
        serving = config.serving.model_copy(
            update={"challenger_share": challenger_share, "local_base_url": local_url}
        )
        gateway_config = config.model_copy(update={"serving": serving})
        port = free_port()
        gateway = ServedApp(
            create_app(GatewaySettings(gateway_config, None, "127.0.0.1", port)), port
        ).start()
        try:
            log(
                f"gateway on {gateway.url} (challenger share {challenger_share:g}); {users} users x {requests_per_user} requests"
            )
            started = time.monotonic()
            outcome = simulate_users(
                f"{gateway.url}/v1",
                config.tracking.registered_model,
                answer_key(config.data.eval_set),
                users=users,
                requests_per_user=requests_per_user,
                seed=seed,
                max_tokens=config.evaluation.max_tokens,
            )
            log(
                f"{outcome.requests} requests in {time.monotonic() - started:.0f} s; waiting for traces and feedback"
            )
            wait_until_recorded(gateway.url, outcome.requests - outcome.failed)
        finally:
            gateway.stop()
    finally:
        if server is not None:
            server.stop()
    return outcome
