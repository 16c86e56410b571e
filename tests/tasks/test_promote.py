"""The promote stage and rollback against a real MLflow store (SQLite + artifact folder in a temp dir)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from tuneline import tracking
from tuneline.config import EvaluationConfig, PromotionConfig, TrackingConfig
from tuneline.tasks.evaluate import EvaluationResult, Role, score_frame, summarize
from tuneline.tasks.promote import (
    Candidate,
    alias_history,
    challenger_since,
    end_challenger,
    gate_evidence,
    promote,
    promote_challenger,
    rollback,
)
from tuneline.tracking import CHALLENGER, CHAMPION, PREVIOUS, RegistryError

SETTINGS = EvaluationConfig(bootstrap_samples=200)
GATE = PromotionConfig(min_delta=0.02, alpha=0.05, max_canary_drop=0.1)
RIGHT = "Category: billing\nReply: We have refunded the duplicate charge."
WRONG = "Category: shipping\nReply: Your parcel is on its way."
CANARY_RIGHT, CANARY_WRONG = "Paris", "I do not know"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One store per module: creating an MLflow SQLite schema takes seconds on a shared machine."""
    return tmp_path_factory.mktemp("mlflow")


@pytest.fixture
def registry(store: Path) -> TrackingConfig:
    """A fresh registered-model name per test in the shared store."""
    return TrackingConfig(
        tracking_uri=f"sqlite:///{store / 'mlflow.db'}",
        artifact_location=str(store / "artifacts"),
        experiment="promote-tests",
        registered_model=f"support-{uuid.uuid4().hex[:8]}",
    )


def new_run(registry: TrackingConfig) -> tracking.RunLog:
    return tracking.RunLog.start(registry, flow="test", name="test")


def result_of(
    task_right: Mapping[Role, int],
    canary_right: Mapping[Role, int],
    models: Mapping[Role, str],
    n_task: int = 40,
    n_canary: int = 20,
    champion_version: str | None = None,
    errors: Mapping[Role, int] | None = None,
) -> EvaluationResult:
    """An evaluation in which each role answered its first k questions right (so wins line up)."""
    records = []
    for set_name, n, right, right_answer, wrong_answer in (
        ("task", n_task, task_right, RIGHT, WRONG),
        ("canary", n_canary, canary_right, CANARY_RIGHT, CANARY_WRONG),
    ):
        for role, k in right.items():
            failed = (errors or {}).get(role, 0) if set_name == "task" else 0
            for position in range(n):
                records.append(
                    {
                        "set": set_name,
                        "example_id": f"{set_name}:{position + 1}",
                        "position": position,
                        "role": role,
                        "model": models[role],
                        "question": f"question {position}",
                        "reference": right_answer,
                        "answer": right_answer if position < k else wrong_answer,
                        "error": "503 after 4 retries" if position >= n - failed else None,
                        "latency_s": 0.01,
                    }
                )
    frame = score_frame(pd.DataFrame.from_records(records))
    estimates, labels = summarize(frame, SETTINGS)
    return EvaluationResult(
        models=dict(models),
        answers=frame,
        estimates=estimates,
        label_accuracy=labels,
        champion_version=champion_version,
        settings=SETTINGS.model_dump(mode="json"),
    )


def candidate(model_id: str) -> Candidate:
    return Candidate(
        model_id,
        provider="local",
        base_model="tuneline-tiny",
        dataset_hash="ab" * 32,
        job_id="ftjob-1",
        provider_kind="local",
        base_url="http://127.0.0.1:8000/v1",
    )


MODELS: dict[Role, str] = {"candidate": "ft:tiny:a", "base": "tuneline-tiny"}


def test_gate_evidence_compares_with_base_without_champion_and_with_champion_otherwise() -> None:
    no_champion = result_of({"candidate": 30, "base": 10}, {"candidate": 15, "base": 16}, MODELS)
    evidence = gate_evidence(no_champion, GATE)
    assert (evidence.reference, evidence.reference_model) == ("base", "tuneline-tiny")
    assert evidence.candidate_task == 0.75 and evidence.reference_task == 0.25
    assert (evidence.paired.wins, evidence.paired.losses) == (20, 0)
    assert evidence.base_canary == 0.8 and evidence.candidate_canary == 0.75
    with_champion = result_of(
        {"candidate": 30, "base": 10, "champion": 28},
        {"candidate": 15, "base": 16, "champion": 15},
        {**MODELS, "champion": "ft:tiny:old"},
        champion_version="1",
    )
    evidence = gate_evidence(with_champion, GATE)
    assert (evidence.reference, evidence.reference_task) == ("champion", 0.7)


def test_promotion_registers_an_external_model_and_moves_champion(registry: TrackingConfig) -> None:
    run_log = new_run(registry)
    run_id = run_log.run_id
    first = result_of({"candidate": 30, "base": 10}, {"candidate": 16, "base": 16}, MODELS)
    outcome = promote(registry, GATE, first, candidate("ft:tiny:a"), run_log)
    assert outcome.decision.promoted and outcome.version == "1" and outcome.champion == "1"
    champion = tracking.alias_version(registry, CHAMPION)
    assert champion is not None and champion.model_id == "ft:tiny:a"
    assert champion.tags["tuneline.dataset_hash"] == "ab" * 32
    assert champion.tags["tuneline.job_id"] == "ftjob-1"
    assert champion.tags["tuneline.provider"] == "local"
    # Where `tuneline gateway` serves it (tuneline/gateway/routing.py).
    assert champion.tags["tuneline.provider_kind"] == "local"
    assert champion.tags["tuneline.base_url"] == "http://127.0.0.1:8000/v1"
    assert tracking.alias_version(registry, PREVIOUS) is None
    # Its page in the MLflow UI: the decision with every rule as the description, the run and the
    # figures as tags, and who made it champion, when and why.
    description = client_version(registry, "1").description
    assert description.startswith("**Promoted** by the promotion gate against the base")
    assert all(f"| {rule} | PASS |" in description for rule in ("answered", "min_delta", "significant"))
    assert run_log.run_id in description and "`promotion.alpha`" in description
    assert champion.tags["tuneline.run_url"].endswith(f"/runs/{run_log.run_id}")
    assert champion.tags["tuneline.eval.task.candidate.exact_match"].startswith("0.750 [")
    (move,) = alias_history(champion)
    assert move["alias"] == CHAMPION and "flow run" in move["by"]
    assert "passed the offline gate against the base" in move["reason"]

    # The registered version points at an external LoggedModel that carries the facts and the scores.
    client = tracking.client(registry)
    source = client.get_model_version(registry.registered_model, "1").source
    logged = client.get_logged_model(source.removeprefix("models:/"))
    assert logged.params["model_id"] == "ft:tiny:a" and logged.params["job_id"] == "ftjob-1"
    assert {m.key: m.value for m in logged.metrics}["eval/task/exact_match"] == 0.75
    assert logged.source_run_id == run_id

    run = tracking.read_run(registry, run_id)
    assert run.tags["tuneline.promotion"] == "promoted"
    assert run.tags["tuneline.promotion.version"] == "1"
    assert "promotion/decision.json" in tracking.list_artifacts(registry, run_id)

    # A better second candidate replaces it; the first becomes `previous`.
    second = result_of(
        {"candidate": 38, "base": 10, "champion": 30},
        {"candidate": 16, "base": 16, "champion": 16},
        {**MODELS, "candidate": "ft:tiny:b", "champion": "ft:tiny:a"},
        champion_version="1",
    )
    outcome = promote(registry, GATE, second, candidate("ft:tiny:b"), new_run(registry))
    assert outcome.version == "2"
    assert tracking.alias_version(registry, CHAMPION).model_id == "ft:tiny:b"  # type: ignore[union-attr]
    assert tracking.alias_version(registry, PREVIOUS).model_id == "ft:tiny:a"  # type: ignore[union-attr]
    history = alias_history(tracking.model_version(registry, "1"))
    assert [m["alias"] for m in history] == [CHAMPION, PREVIOUS] and "replaced by 2" in history[1]["reason"]


def client_version(registry: TrackingConfig, version: str) -> Any:
    return tracking.client(registry).get_model_version(registry.registered_model, version)


def seed_champion(registry: TrackingConfig) -> str:
    promote(
        registry,
        GATE,
        result_of({"candidate": 30, "base": 10}, {"candidate": 16, "base": 16}, MODELS),
        candidate("ft:tiny:a"),
        new_run(registry),
    )
    return "1"


@pytest.mark.parametrize(
    ("task_right", "canary_right", "errors", "failed"),
    [
        ({"candidate": 30, "champion": 30}, {"candidate": 16}, {}, {"min_delta", "significant"}),
        ({"candidate": 20, "champion": 30}, {"candidate": 16}, {}, {"min_delta", "significant", "few_shot"}),
        ({"candidate": 39, "champion": 30}, {"candidate": 4}, {}, {"canary"}),
        ({"candidate": 39, "champion": 30}, {"candidate": 16}, {"candidate": 1}, {"answered"}),
    ],
    ids=["tie", "worse", "forgot-canary", "unanswered"],
)
def test_rejection_never_moves_the_champion_and_says_why(
    registry: TrackingConfig,
    task_right: dict[Role, int],
    canary_right: dict[Role, int],
    errors: dict[Role, int],
    failed: set[str],
) -> None:
    seed_champion(registry)
    run_log = new_run(registry)
    run_id = run_log.run_id
    result = result_of(
        {**task_right, "base": 10, "few_shot": 25},
        {**canary_right, "base": 16, "champion": 16},
        {**MODELS, "candidate": "ft:tiny:new", "champion": "ft:tiny:a", "few_shot": "tuneline-tiny"},
        champion_version="1",
        errors=errors,
    )
    outcome = promote(registry, GATE, result, candidate("ft:tiny:new"), run_log)
    assert not outcome.decision.promoted
    assert {r.rule for r in outcome.decision.failed_rules} == failed
    assert outcome.version is None and outcome.champion == "1"
    assert [v.version for v in tracking.model_versions(registry)] == ["1"]
    assert tracking.alias_version(registry, CHAMPION).version == "1"  # type: ignore[union-attr]
    run = tracking.read_run(registry, run_id)
    assert run.tags["tuneline.promotion"] == "rejected"
    for rule in failed:
        assert rule in run.tags["tuneline.promotion.reasons"]


def test_a_champion_that_moved_during_evaluation_fails_the_run(registry: TrackingConfig) -> None:
    seed_champion(registry)
    stale = result_of(
        {"candidate": 38, "base": 10}, {"candidate": 16, "base": 16}, MODELS, champion_version=None
    )
    run_log = new_run(registry)
    run_id = run_log.run_id
    with pytest.raises(RegistryError, match=r"moved from version \(none\) to 1"):
        promote(registry, GATE, stale, candidate("ft:tiny:z"), run_log)
    assert [v.version for v in tracking.model_versions(registry)] == ["1"]
    assert tracking.read_run(registry, run_id).tags["tuneline.promotion"] == "aborted"


def three_versions(registry: TrackingConfig) -> None:
    """Champions a, b, c promoted in turn (c champion, b previous)."""
    seed_champion(registry)
    for version, (model, right) in enumerate((("ft:tiny:b", 35), ("ft:tiny:c", 40)), start=1):
        result = result_of(
            {"candidate": right, "base": 10, "champion": right - 5},
            {"candidate": 16, "base": 16, "champion": 16},
            {**MODELS, "candidate": model, "champion": "previous-champion"},
            champion_version=str(version),
        )
        assert promote(registry, GATE, result, candidate(model), new_run(registry)).decision.promoted


def test_rollback_restores_previous_and_records_who_when_why(registry: TrackingConfig) -> None:
    three_versions(registry)
    at = datetime(2026, 11, 25, 9, 30, tzinfo=UTC)
    outcome = rollback(registry, None, by="alice", reason="complaints about refunds", at=at)
    assert (outcome.from_version, outcome.to_version, outcome.model_id) == ("3", "2", "ft:tiny:b")
    champion = tracking.alias_version(registry, CHAMPION)
    assert champion is not None and champion.version == "2"
    assert champion.tags["tuneline.rollback.by"] == "alice"
    assert champion.tags["tuneline.rollback.at"] == "2026-11-25T09:30:00+00:00"
    assert champion.tags["tuneline.rollback.reason"] == "complaints about refunds"
    assert champion.tags["tuneline.rollback.from_version"] == "3"
    demoted = tracking.model_version(registry, "3")
    assert demoted.aliases == (PREVIOUS,)
    assert demoted.tags["tuneline.demoted.reason"] == "complaints about refunds"
    assert alias_history(demoted)[-1] == {
        "alias": PREVIOUS,
        "at": "2026-11-25T09:30:00+00:00",
        "by": "alice",
        "reason": "rollback to 2: complaints about refunds",
    }
    assert alias_history(champion)[-1] == {
        "alias": CHAMPION,
        "at": "2026-11-25T09:30:00+00:00",
        "by": "alice",
        "reason": "rollback from 3: complaints about refunds",
    }

    # Rolling back again undoes the rollback; --to picks any version.
    assert rollback(registry, None, by="bob", reason="false alarm", at=at).to_version == "3"
    assert rollback(registry, "1", by="bob", reason="audit", at=at).to_version == "1"
    assert tracking.alias_version(registry, CHAMPION).model_id == "ft:tiny:a"  # type: ignore[union-attr]


def test_rollback_errors_name_the_fix(registry: TrackingConfig) -> None:
    at = datetime(2026, 11, 25, tzinfo=UTC)
    with pytest.raises(RegistryError, match="has no champion"):
        rollback(registry, None, by="a", reason="r", at=at)
    seed_champion(registry)
    with pytest.raises(RegistryError, match=r"no `previous` version: pass --to VERSION \(versions: 1\)"):
        rollback(registry, None, by="a", reason="r", at=at)
    with pytest.raises(RegistryError, match=r"has no version 7 \(versions: 1\)"):
        rollback(registry, "7", by="a", reason="r", at=at)
    with pytest.raises(RegistryError, match="already the champion"):
        rollback(registry, "1", by="a", reason="r", at=at)


AB = GATE.model_copy(update={"rollout": "ab"})


def better_than_champion(model: str, champion_version: str) -> EvaluationResult:
    return result_of(
        {"candidate": 38, "base": 10, "champion": 30},
        {"candidate": 16, "base": 16, "champion": 16},
        {**MODELS, "candidate": model, "champion": "ft:tiny:a"},
        champion_version=champion_version,
    )


def test_rollout_ab_makes_a_passing_candidate_the_challenger_not_the_champion(
    registry: TrackingConfig,
) -> None:
    # The first model has nothing to be tested against: it becomes champion even with rollout ab.
    first = promote(
        registry,
        AB,
        result_of({"candidate": 30, "base": 10}, {"candidate": 16, "base": 16}, MODELS),
        candidate("ft:tiny:a"),
        new_run(registry),
    )
    assert (first.version, first.alias, first.champion) == ("1", CHAMPION, "1")

    run_log = new_run(registry)
    outcome = promote(registry, AB, better_than_champion("ft:tiny:b", "1"), candidate("ft:tiny:b"), run_log)
    assert outcome.decision.promoted and (outcome.version, outcome.alias, outcome.champion) == (
        "2",
        CHALLENGER,
        "1",
    )
    assert tracking.alias_version(registry, CHAMPION).version == "1"  # type: ignore[union-attr]
    assert tracking.alias_version(registry, PREVIOUS) is None
    challenger = tracking.alias_version(registry, CHALLENGER)
    assert challenger is not None and challenger.model_id == "ft:tiny:b"
    assert challenger.tags["tuneline.challenger.by"].endswith(f"MLflow run {run_log.run_id})")
    assert "passed the offline gate against the champion" in challenger.tags["tuneline.challenger.reason"]
    since = challenger_since(challenger)
    assert since is not None and abs((datetime.now(UTC) - since).total_seconds()) < 120
    assert [m["alias"] for m in alias_history(challenger)] == [CHALLENGER]
    run = tracking.read_run(registry, run_log.run_id)
    assert (run.tags["tuneline.promotion"], run.tags["tuneline.promotion.alias"]) == ("promoted", CHALLENGER)

    # A newer passing candidate replaces a challenger still under test; the champion never moves.
    third = promote(
        registry, AB, better_than_champion("ft:tiny:c", "1"), candidate("ft:tiny:c"), new_run(registry)
    )
    assert (third.version, third.alias) == ("3", CHALLENGER)
    assert tracking.alias_version(registry, CHALLENGER).version == "3"  # type: ignore[union-attr]
    assert (
        tracking.model_version(registry, "2").tags["tuneline.challenger_replaced.reason"] == "replaced by 3"
    )
    assert tracking.alias_version(registry, CHAMPION).version == "1"  # type: ignore[union-attr]


def test_the_monitor_promotes_or_ends_the_challenger_and_the_registry_keeps_the_history(
    registry: TrackingConfig,
) -> None:
    seed_champion(registry)
    promote(registry, AB, better_than_champion("ft:tiny:b", "1"), candidate("ft:tiny:b"), new_run(registry))
    at = datetime(2026, 11, 24, 8, 0, tzinfo=UTC)
    with pytest.raises(RegistryError, match=r"now version 2, not 7: nothing was moved"):
        promote_challenger(registry, "7", by="monitor", reason="r", at=at)

    won = promote_challenger(registry, "2", by="monitor (run x)", reason="feedback 0.80 vs 0.60", at=at)
    assert (won.action, won.challenger, won.champion, won.previous) == ("promoted", "2", "2", "1")
    assert tracking.alias_version(registry, CHAMPION).version == "2"  # type: ignore[union-attr]
    assert tracking.alias_version(registry, PREVIOUS).version == "1"  # type: ignore[union-attr]
    assert tracking.alias_version(registry, CHALLENGER) is None
    champion = tracking.model_version(registry, "2")
    history = json.loads(champion.tags["tuneline.alias_history"])
    assert [(m["alias"], m["by"]) for m in history] == [
        (CHALLENGER, history[0]["by"]),
        (CHAMPION, "monitor (run x)"),
    ]
    assert history[1] == {
        "alias": CHAMPION,
        "at": "2026-11-24T08:00:00+00:00",
        "by": "monitor (run x)",
        "reason": "feedback 0.80 vs 0.60",
    }
    assert "challenger 2 won" in tracking.model_version(registry, "1").tags["tuneline.previous.reason"]

    # A losing challenger: its alias goes, champion and previous stay where they were.
    promote(registry, AB, better_than_champion("ft:tiny:c", "2"), candidate("ft:tiny:c"), new_run(registry))
    lost = end_challenger(registry, "3", by="monitor", reason="worse feedback", at=at)
    assert (lost.action, lost.challenger, lost.champion, lost.previous) == ("ended", "3", "2", "1")
    assert tracking.alias_version(registry, CHALLENGER) is None
    ended = tracking.model_version(registry, "3")
    assert ended.aliases == () and ended.tags["tuneline.challenger_ended.reason"] == "worse feedback"
    with pytest.raises(RegistryError, match=r"now version \(none\), not 3"):
        end_challenger(registry, "3", by="monitor", reason="again", at=at)
