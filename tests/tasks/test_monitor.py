"""The A/B monitor against a real MLflow store: planted traffic decided right.

Traces and feedback are written with the same MLflow APIs and the same tags as the gateway
(tuneline/gateway/): a span per request in the experiment `serving/<registered model>`, tagged with the
variant, model version and registered model, the user in the trace metadata, and the user's verdict
logged with `mlflow.log_feedback` (human source). Each scenario plants a known truth (a challenger rated
clearly better, clearly worse, the same, or barely rated) and checks the monitor's decision and what it
did to the registry.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from planted_traffic import Planted, plant

from tuneline import tracking
from tuneline.config import EvaluationConfig, MonitorConfig, PromotionConfig, TrackingConfig
from tuneline.metrics import samples_per_group
from tuneline.tasks.evaluate import EvaluationResult, Role, score_frame, summarize
from tuneline.tasks.monitor import (
    VARIANT_TAG,
    decide_ab,
    feedback_verdict,
    monitor,
    serving_experiment,
)
from tuneline.tasks.promote import Candidate, promote
from tuneline.tracking import CHALLENGER, CHAMPION, PREVIOUS

MONITOR = MonitorConfig(min_feedback_per_variant=30, min_effect=0.05, alpha=0.05, evaluate_max_traces=0)
AB = PromotionConfig(rollout="ab", min_delta=0.02, alpha=0.05)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One store per module: creating an MLflow SQLite schema takes seconds on a shared machine."""
    return tmp_path_factory.mktemp("mlflow")


@pytest.fixture
def registry(store: Path) -> Iterator[TrackingConfig]:
    config = TrackingConfig(
        tracking_uri=f"sqlite:///{store / 'mlflow.db'}",
        artifact_location=str(store / "artifacts"),
        experiment="monitor-tests",
        registered_model=f"support-{uuid.uuid4().hex[:8]}",
    )
    mlflow.set_tracking_uri(tracking.tracking_uri(config))
    yield config


def offline_result(
    models: dict[Role, str], champion_version: str | None, right: dict[Role, int]
) -> EvaluationResult:
    settings = EvaluationConfig(bootstrap_samples=100)
    records = []
    for set_name, n in (("task", 40), ("canary", 10)):
        for role, model in models.items():
            k = right[role] if set_name == "task" else n
            for position in range(n):
                records.append(
                    {
                        "set": set_name,
                        "example_id": f"{set_name}:{position}",
                        "position": position,
                        "role": role,
                        "model": model,
                        "question": f"q{position}",
                        "reference": "Category: billing",
                        "answer": "Category: billing" if position < k else "Category: shipping",
                        "error": None,
                        "latency_s": 0.01,
                    }
                )
    frame = score_frame(pd.DataFrame.from_records(records))
    estimates, labels = summarize(frame, settings)
    return EvaluationResult(
        models=models,
        answers=frame,
        estimates=estimates,
        label_accuracy=labels,
        champion_version=champion_version,
        settings=settings.model_dump(mode="json"),
    )


def champion_and_challenger(registry: TrackingConfig) -> tuple[str, str]:
    """Version 1 champion, version 2 challenger, both through the real promote stage (rollout ab)."""

    def candidate(model: str) -> Candidate:
        return Candidate(model, provider="local", base_model="tuneline-tiny")

    first = offline_result({"candidate": "ft:a", "base": "tiny"}, None, {"candidate": 30, "base": 5})
    promote(registry, AB, first, candidate("ft:a"), tracking.RunLog.start(registry, flow="t", name="t"))
    second = offline_result(
        {"candidate": "ft:b", "base": "tiny", "champion": "ft:a"},
        "1",
        {"candidate": 38, "base": 5, "champion": 30},
    )
    outcome = promote(
        registry, AB, second, candidate("ft:b"), tracking.RunLog.start(registry, flow="t", name="t")
    )
    assert outcome.alias == CHALLENGER
    return "1", "2"


def test_feedback_verdicts_read_bools_numbers_and_words() -> None:
    assert [feedback_verdict(v) for v in (True, False, 1, 0, 0.9, 0.2, 5, -1, "up", "Thumbs_Down", "👍")] == [
        True,
        False,
        True,
        False,
        True,
        False,
        True,
        False,
        True,
        False,
        True,
    ]
    assert (
        feedback_verdict("maybe") is None
        and feedback_verdict(None) is None
        and feedback_verdict({"a": 1}) is None
    )


@pytest.mark.parametrize(
    ("champion_positive", "challenger_positive", "rated", "expected"),
    [
        (27, 43, 50, "promote"),  # 0.54 vs 0.86
        (43, 27, 50, "end_test"),  # 0.86 vs 0.54
        (35, 37, 50, "keep_collecting"),  # 0.70 vs 0.74: equal within noise
        (2, 10, 10, "keep_collecting"),  # 0.2 vs 1.0, but ten ratings each
    ],
    ids=["clearly-better", "worse", "equal-within-noise", "too-few-samples"],
)
def test_planted_ab_scenarios_are_decided_right(
    registry: TrackingConfig, champion_positive: int, challenger_positive: int, rated: int, expected: str
) -> None:
    # Before the challenger went live the champion was rated the other way round: not part of the test.
    plant(registry, Planted(CHAMPION, "1", 20, 20, 20 if expected == "end_test" else 0))
    time.sleep(1.1)  # the challenger's start is recorded to the second
    champion, challenger = champion_and_challenger(registry)
    requests = rated + 10  # not every user rates an answer
    plant(
        registry,
        Planted(CHAMPION, champion, requests, rated, champion_positive),
        Planted(CHALLENGER, challenger, requests, rated, challenger_positive),
        # Pinned requests (`model@challenger`) are not part of the randomised comparison.
        Planted("pinned", challenger, 10, 10, 0 if expected == "promote" else 10),
    )
    report = monitor(registry, MONITOR, by="test", at=datetime(2026, 11, 24, 8, tzinfo=UTC))
    decision = report.decision
    assert decision is not None and decision.action == expected, decision.reason if decision else report
    assert (decision.champion.requests, decision.challenger.requests) == (requests, requests)
    assert (decision.champion.rated, decision.challenger.rated) == (rated, rated)
    assert decision.champion.positives == champion_positive
    assert decision.challenger.positives == challenger_positive
    # The Wilson interval holds the observed rate, and the figures every variant reports are there.
    for stats in (decision.champion, decision.challenger):
        assert stats.positive.low <= stats.positive.mean <= stats.positive.high
        assert stats.errors == 0 and stats.tokens_total == 30 * requests and stats.tokens_mean == 30
        assert 20 <= stats.latency_ms["p50"] <= stats.latency_ms["p95"] <= stats.latency_ms["p99"] <= 60

    aliases = {alias: tracking.alias_version(registry, alias) for alias in (CHAMPION, CHALLENGER, PREVIOUS)}
    versions = {alias: record.version if record else None for alias, record in aliases.items()}
    if expected == "promote":
        assert versions == {CHAMPION: "2", CHALLENGER: None, PREVIOUS: "1"}
        assert report.outcome is not None and report.outcome.action == "promoted"
        assert "rated better" in aliases[CHAMPION].tags["tuneline.champion.reason"]  # type: ignore[union-attr]
        assert aliases[CHAMPION].tags["tuneline.champion.by"] == f"test (MLflow run {report.run_id})"  # type: ignore[union-attr]
    elif expected == "end_test":
        assert versions == {CHAMPION: "1", CHALLENGER: None, PREVIOUS: None}
        assert "rated worse" in tracking.model_version(registry, "2").tags["tuneline.challenger_ended.reason"]
    else:
        assert versions == {CHAMPION: "1", CHALLENGER: "2", PREVIOUS: None}
        assert report.outcome is None
        required = samples_per_group(
            (champion_positive + challenger_positive) / (2 * rated),
            MONITOR.min_effect,
            MONITOR.alpha,
            MONITOR.power,
        )
        assert decision.needed_rated_per_variant == max(required, MONITOR.min_feedback_per_variant) - rated
        # Rated answers come at 50 of 60 requests (10 of 20 with too few): the requests still needed.
        assert decision.needed_requests == pytest.approx(
            2 * decision.needed_rated_per_variant * requests / rated, abs=1
        )
        assert ("too few rated answers" in decision.reason) == (rated == 10)

    # The decision is an MLflow run in the serving experiment, with its figures.
    assert report.run_id is not None
    run = tracking.read_run(registry, report.run_id)
    assert run.tags["tuneline.monitor.action"] == expected
    assert (
        run.metrics["ab/champion/rated"] == rated
        and run.metrics["ab/challenger/positive"] == challenger_positive
    )
    assert run.metrics["ab/challenger/feedback_rate"] == pytest.approx(challenger_positive / rated)
    assert "ab/champion/latency_p99_ms" in run.metrics and "ab/p_better" in run.metrics
    experiment = tracking.client(registry).get_experiment_by_name(serving_experiment(registry, MONITOR))
    assert (
        experiment is not None
        and tracking.client(registry).get_run(report.run_id).info.experiment_id == experiment.experiment_id
    )


def test_a_challenger_that_fails_more_often_ends_the_test_whatever_its_ratings(
    registry: TrackingConfig,
) -> None:
    champion, challenger = champion_and_challenger(registry)
    plant(
        registry,
        Planted(CHAMPION, champion, 40, 35, 20),
        Planted(CHALLENGER, challenger, 40, 30, 30, errors=5),
        # Five more failed and were answered from `previous`: the challenger's errors, not its ratings.
        Planted(PREVIOUS, "0", 5, 5, 0, fallback_from=f"challenger:{challenger}"),
    )
    report = monitor(registry, MONITOR, apply=False)
    assert report.decision is not None and report.decision.action == "end_test"
    assert "fails more often" in report.decision.reason
    assert (report.decision.challenger.errors, report.decision.challenger.requests) == (10, 45)
    assert (report.decision.challenger.rated, report.decision.challenger.positives) == (30, 30)
    # apply=False decides and records, but moves nothing.
    assert not report.applied and tracking.alias_version(registry, CHALLENGER).version == "2"  # type: ignore[union-attr]


def test_no_challenger_means_no_test(registry: TrackingConfig) -> None:
    report = monitor(registry, MONITOR)
    assert report.action == "no_test" and report.run_id is None


def test_the_latency_guard_and_the_sample_cap_end_a_test(registry: TrackingConfig) -> None:
    """decide_ab on figures read from planted traces: slow challenger, and no difference at the cap."""
    champion, challenger = champion_and_challenger(registry)
    plant(
        registry,
        Planted(CHAMPION, champion, 30, 30, 15, latency_ms=20),
        Planted(CHALLENGER, challenger, 30, 30, 15, latency_ms=200),
    )
    slow = monitor(registry, MONITOR, apply=False).decision
    assert slow is not None and slow.action == "end_test" and "slower" in slow.reason
    capped = decide_ab(
        slow.champion,
        slow.challenger,
        MONITOR.model_copy(update={"max_feedback_per_variant": 30, "max_latency_ratio_p95": 100.0}),
    )
    assert capped.action == "end_test" and "no significant difference after 30" in capped.reason


def test_the_monitor_flow_decides_evaluates_each_variant_publishes_a_summary_and_harvests(
    prefect_server: None, tmp_path: Path, support_project: Callable[..., Path]
) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    from tuneline.config import load_config
    from tuneline.flows.monitor import monitor as monitor_flow

    config_path = support_project(
        tmp_path / "project",
        {"2026-11-20": 14},
        promotion={"rollout": "ab", "monitor": {"evaluate_max_traces": 15}},
    )
    config = load_config(config_path)
    mlflow.set_tracking_uri(tracking.tracking_uri(config.tracking))
    champion, challenger = champion_and_challenger(config.tracking)
    traces = plant(
        config.tracking,
        Planted(CHAMPION, champion, 50, 50, 27),
        Planted(CHALLENGER, challenger, 50, 50, 43),
        corrections={0: "Category: billing/double_charge. We have refunded the duplicate charge."},
    )
    report = monitor_flow(config=str(config_path), as_of=date(2026, 11, 21))
    assert report.action == "promote" and report.applied
    assert tracking.alias_version(config.tracking, CHAMPION).version == challenger  # type: ignore[union-attr]

    # One mlflow.genai.evaluate run per variant, nested under the decision run, scored by code scorers.
    assert set(report.evaluation_run_ids) == {CHAMPION, CHALLENGER}
    for variant, run_id in report.evaluation_run_ids.items():
        run = tracking.read_run(config.tracking, run_id)
        assert run.tags[tracking.PARENT_RUN_TAG] == report.run_id and run.tags[VARIANT_TAG] == variant
        assert run.metrics["error/mean"] == 0 and 20 <= run.metrics["latency_ms/mean"] <= 60
        assert run.metrics["total_tokens/mean"] == 30

    # The correction became a raw partition, with its trace as provenance.
    feedback = tmp_path / "project" / "raw" / "dt=2026-11-21" / "feedback.jsonl"
    assert "refunded the duplicate charge" in feedback.read_text()
    provenance = feedback.with_name("_feedback_provenance.jsonl").read_text()
    assert json.loads(provenance)["trace_id"] == traces[0]

    # This flow run's summary (other tests on the session's Prefect server publish the same key).
    assert report.run_id is not None
    flow_run_id = tracking.read_run(config.tracking, report.run_id).tags[tracking.FLOW_RUN_ID_TAG]
    with get_client(sync_client=True) as client:
        [artifact] = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[uuid.UUID(flow_run_id)]),
                key=ArtifactFilterKey(any_=["monitor-summary"]),
            )
        )
    summary = str(artifact.data)
    assert "**Outcome:** promote" in summary and "| challenger | 2 | 50 |" in summary
    assert f"version {challenger} is champion; version {champion} is previous" in summary
    assert "1 correction(s) appended" in summary
