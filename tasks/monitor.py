"""monitor: read the gateway's traces, compare the challenger with the champion, and decide.

With `promotion.rollout: ab` a candidate that passes the offline gate becomes `challenger`, and the
gateway (tuneline/gateway/) sends a sticky share of users to it. Every answer is a trace in the MLflow
experiment `serving/<registered model>` (tags `tuneline.variant`, `tuneline.model_version`,
`tuneline.registered_model`; the user in the trace metadata `mlflow.trace.user`), and a user's verdict
is the assessment `user_feedback` (human source). The monitor:

- reads the traces of both variants since the challenger went live (its `tuneline.challenger.at` tag,
  tasks/promote.py) with `mlflow.search_traces`, filtered by tag (pinned requests, `@3` or
  `@challenger`, are not part of the randomised test and are left out); a request a variant failed
  and the gateway answered from `previous` (tag `tuneline.fallback_from`) counts as that variant's error;
- per variant: requests, error rate, latency p50/p95/p99, tokens, rated answers and the share rated
  positive with its Wilson interval (tuneline/metrics.py, the statistics module of the offline gate);
- decides, in this order:
  1. `end_test` when a guard rail fails: the challenger's error rate significantly above the
     champion's (Fisher's exact test, one-sided, `alpha`), or its p95 latency above
     `max_latency_ratio_p95` times the champion's;
  2. `keep_collecting` while either variant has fewer than `min_feedback_per_variant` rated answers;
  3. `promote` when the challenger's positive-feedback rate is higher, one-sided p <= `alpha`;
  4. `end_test` when it is lower, one-sided p <= `alpha`;
  5. `end_test` when both variants reached `max_feedback_per_variant` rated answers with no significant
     difference (the challenger had its chance and did not prove better);
  6. `keep_collecting` otherwise, with the rated answers per variant still needed to detect
     `min_effect` at `alpha` with `power` (and the requests that takes at the observed rating share).
- applies it (unless `apply` is off): promote moves challenger -> champion and champion -> previous,
  end_test removes the challenger alias (tasks/promote.py writes who/when/why on the versions).

A monitor that runs every hour looks at the same test many times; each look is a chance of a false
alarm, so with a frequent schedule set `alpha` lower (e.g. 0.01) or `min_feedback_per_variant` higher.

Feedback that carries a correction becomes training data: tasks/feedback.py.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import mlflow
import numpy as np
from mlflow.entities import Feedback, Trace
from mlflow.genai.scorers import scorer
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tuneline import tracking
from tuneline.config import MonitorConfig, TrackingConfig
from tuneline.metrics import (
    Estimate,
    ProportionTest,
    samples_per_group,
    two_proportion_test,
    wilson_interval,
)
from tuneline.tasks.promote import ChallengerOutcome, challenger_since, end_challenger, promote_challenger
from tuneline.tracking import CHALLENGER, CHAMPION

DEFAULT_LOG = logging.getLogger("tuneline.monitor")

# The trace contract with the gateway (tuneline/gateway/).
VARIANT_TAG = "tuneline.variant"
MODEL_VERSION_TAG = "tuneline.model_version"
REGISTERED_MODEL_TAG = "tuneline.registered_model"
FALLBACK_TAG = "tuneline.fallback_from"  # `variant:version` that failed when `previous` answered instead
USER_KEY = "mlflow.trace.user"
SESSION_KEY = "mlflow.trace.session"
FEEDBACK = "user_feedback"
CORRECTION = "correction"

Action = Literal["promote", "keep_collecting", "end_test"]
_POSITIVE = {"true", "1", "yes", "y", "up", "thumbs_up", "+1", "good", "positive", "like", "👍"}
_NEGATIVE = {"false", "0", "no", "n", "down", "thumbs_down", "-1", "bad", "negative", "dislike", "👎"}


def serving_experiment(tracking_config: TrackingConfig, monitor: MonitorConfig) -> str:
    """The experiment the gateway traces a registered model's requests in."""
    return f"{monitor.trace_experiment_prefix}{tracking_config.registered_model}"


def feedback_verdict(value: Any) -> bool | None:
    """A user's verdict as positive/negative: a bool, a number (> 0.5 is positive, a rating in (0, 1] or
    a +1/-1), or a word (up/down, yes/no, good/bad); None when it says neither."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float) and not math.isnan(value):
        return value > 0.5 if 0 <= value <= 1 else value > 0
    if isinstance(value, str):
        word = value.strip().casefold()
        return True if word in _POSITIVE else False if word in _NEGATIVE else None
    return None


@dataclass(frozen=True, slots=True)
class Observation:
    """One traced request as the monitor reads it."""

    trace_id: str
    variant: str
    model_version: str
    at_ms: int
    latency_ms: float
    error: bool
    total_tokens: int | None
    feedback: bool | None  # the user's latest verdict, None when not rated
    user: str | None


def observe(trace: Trace) -> Observation:
    info = trace.info
    usage = info.token_usage or {}
    verdicts = sorted(
        (a for a in info.assessments or [] if a.name == FEEDBACK and a.valid is not False and a.feedback),
        key=lambda a: a.create_time_ms or 0,
    )
    verdict = feedback_verdict(verdicts[-1].feedback.value) if verdicts else None  # type: ignore[union-attr]
    total = usage.get("total_tokens")
    return Observation(
        trace_id=info.trace_id,
        variant=info.tags.get(VARIANT_TAG, ""),
        model_version=info.tags.get(MODEL_VERSION_TAG, ""),
        at_ms=int(info.request_time or 0),
        latency_ms=float(info.execution_duration or 0),
        error=str(info.state) in {"ERROR", "TraceState.ERROR"},
        total_tokens=int(total) if total is not None else None,
        feedback=verdict,
        user=info.trace_metadata.get(USER_KEY),
    )


def read_traces(
    tracking_config: TrackingConfig,
    monitor: MonitorConfig,
    tags: Mapping[str, str],
    since: datetime | None,
) -> list[Trace]:
    """The traces carrying every tag of `tags` since `since`, oldest first."""
    experiment = tracking.client(tracking_config).get_experiment_by_name(
        serving_experiment(tracking_config, monitor)
    )
    if experiment is None:
        return []
    clauses = [f"tags.`{key}` = '{value}'" for key, value in tags.items()]
    if since is not None:
        clauses.append(f"trace.timestamp_ms >= {int(since.timestamp() * 1000)}")
    mlflow.set_tracking_uri(tracking.tracking_uri(tracking_config))
    traces = mlflow.search_traces(
        locations=[experiment.experiment_id],
        filter_string=" AND ".join(clauses),
        return_type="list",
        include_spans=False,
    )
    return sorted(traces, key=lambda t: (t.info.request_time or 0, t.info.trace_id))


def variant_observations(
    tracking_config: TrackingConfig,
    monitor: MonitorConfig,
    variant: str,
    model_version: str,
    since: datetime | None,
) -> tuple[list[Trace], list[Observation]]:
    """A variant's traces, and its observations: its own answers, plus the requests it failed that the
    gateway answered from `previous` instead (tagged `tuneline.fallback_from`), which count as its
    errors and whose ratings are not its own."""
    own = read_traces(
        tracking_config, monitor, {VARIANT_TAG: variant, MODEL_VERSION_TAG: model_version}, since
    )
    fallbacks = read_traces(tracking_config, monitor, {FALLBACK_TAG: f"{variant}:{model_version}"}, since)
    failed = [
        dataclasses.replace(
            observe(t), variant=variant, model_version=model_version, error=True, feedback=None
        )
        for t in fallbacks
    ]
    return own, [observe(t) for t in own] + failed


@dataclass(frozen=True)
class VariantStats:
    variant: str
    model_version: str
    requests: int
    errors: int
    rated: int
    positives: int  # rated answers rated positive
    positive: Estimate  # their share of the rated answers, with its Wilson interval
    rated_share: float  # rated / requests
    latency_ms: Mapping[str, float]  # p50, p95, p99
    tokens_mean: float
    tokens_total: int

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else math.nan

    def metrics(self) -> dict[str, float]:
        """The figures as MLflow metrics (nan left out)."""
        figures = {
            "requests": self.requests,
            "errors": self.errors,
            "error_rate": self.error_rate,
            "rated": self.rated,
            "positive": self.positives,
            "feedback_rate": self.positive.mean,
            "feedback_rate_low": self.positive.low,
            "feedback_rate_high": self.positive.high,
            "rated_share": self.rated_share,
            **{f"latency_{k}_ms": v for k, v in self.latency_ms.items()},
            "tokens_mean": self.tokens_mean,
            "tokens_total": self.tokens_total,
        }
        return {k: float(v) for k, v in figures.items() if not math.isnan(float(v))}


def variant_stats(
    variant: str, model_version: str, observations: Sequence[Observation], confidence: float
) -> VariantStats:
    rated = [o.feedback for o in observations if o.feedback is not None]
    latencies = np.array([o.latency_ms for o in observations if not o.error], dtype=float)
    tokens = [o.total_tokens for o in observations if o.total_tokens is not None]
    if len(latencies):
        p50, p95, p99 = np.percentile(latencies, [50, 95, 99])
        latency = {"p50": float(p50), "p95": float(p95), "p99": float(p99)}
    else:
        latency = {"p50": math.nan, "p95": math.nan, "p99": math.nan}
    return VariantStats(
        variant=variant,
        model_version=model_version,
        requests=len(observations),
        errors=sum(o.error for o in observations),
        rated=len(rated),
        positives=sum(rated),
        positive=wilson_interval(sum(rated), len(rated), confidence),
        rated_share=len(rated) / len(observations) if observations else math.nan,
        latency_ms=latency,
        tokens_mean=float(np.mean(tokens)) if tokens else math.nan,
        tokens_total=int(sum(tokens)),
    )


@dataclass(frozen=True)
class MonitorDecision:
    action: Action
    reason: str
    champion: VariantStats
    challenger: VariantStats
    feedback_test: ProportionTest
    error_test: ProportionTest
    # keep_collecting: rated answers per variant still needed, and the requests that takes in all.
    needed_rated_per_variant: int | None = None
    needed_requests: int | None = None

    def as_dict(self) -> dict[str, Any]:
        def stats(s: VariantStats) -> dict[str, Any]:
            return {
                **asdict(s),
                "positive": asdict(s.positive),
                "error_rate": s.error_rate,
            }

        return {
            "action": self.action,
            "reason": self.reason,
            "champion": stats(self.champion),
            "challenger": stats(self.challenger),
            "feedback_test": asdict(self.feedback_test),
            "error_test": asdict(self.error_test),
            "needed_rated_per_variant": self.needed_rated_per_variant,
            "needed_requests": self.needed_requests,
        }


def decide_ab(champion: VariantStats, challenger: VariantStats, monitor: MonitorConfig) -> MonitorDecision:
    """The monitor's decision on the figures (pure; the order of the rules is the module docstring's)."""
    feedback = two_proportion_test(champion.positives, champion.rated, challenger.positives, challenger.rated)
    errors = two_proportion_test(champion.errors, champion.requests, challenger.errors, challenger.requests)

    def decision(action: Action, reason: str, needed: int | None = None) -> MonitorDecision:
        requests = None
        if needed is not None:
            shares = [s.rated_share for s in (champion, challenger) if s.rated_share and s.rated_share > 0]
            # Both variants need `needed` more rated answers; the requests that takes at the observed
            # rating share (the share of users the challenger gets is the gateway's, not known here).
            requests = math.ceil(2 * needed / min(shares)) if shares else None
        return MonitorDecision(action, reason, champion, challenger, feedback, errors, needed, requests)

    least = min(champion.requests, challenger.requests)
    if least >= monitor.min_feedback_per_variant and errors.p_greater <= monitor.alpha:
        return decision(
            "end_test",
            f"the challenger fails more often: error rate {challenger.error_rate:.3f} vs champion "
            f"{champion.error_rate:.3f} (one-sided p = {errors.p_greater:.3g} <= alpha {monitor.alpha:g})",
        )
    c95, ch95 = champion.latency_ms["p95"], challenger.latency_ms["p95"]
    if (
        least >= monitor.min_feedback_per_variant
        and not math.isnan(c95)
        and not math.isnan(ch95)
        and c95 > 0
        and ch95 > monitor.max_latency_ratio_p95 * c95
    ):
        return decision(
            "end_test",
            f"the challenger is slower: p95 latency {ch95:.0f} ms vs champion {c95:.0f} ms "
            f"(more than {monitor.max_latency_ratio_p95:g}x)",
        )

    pooled_n = champion.rated + challenger.rated
    pooled = (champion.positives + challenger.positives) / pooled_n if pooled_n else 0.5
    required = samples_per_group(pooled, monitor.min_effect, monitor.alpha, monitor.power)
    fewest = min(champion.rated, challenger.rated)
    rates = (
        f"positive feedback {challenger.positive} ({challenger.positives}/{challenger.rated}) for the "
        f"challenger vs {champion.positive} ({champion.positives}/{champion.rated}) for the champion"
    )
    if fewest < monitor.min_feedback_per_variant:
        needed = max(monitor.min_feedback_per_variant, required) - fewest
        return decision(
            "keep_collecting",
            f"too few rated answers to decide ({champion.rated} champion, {challenger.rated} challenger; "
            f"at least {monitor.min_feedback_per_variant} each): {rates}",
            needed,
        )
    if feedback.p_greater <= monitor.alpha:
        return decision(
            "promote",
            f"the challenger is rated better: {rates}; one-sided p = {feedback.p_greater:.3g} <= "
            f"alpha {monitor.alpha:g}",
        )
    if feedback.p_less <= monitor.alpha:
        return decision(
            "end_test",
            f"the challenger is rated worse: {rates}; one-sided p = {feedback.p_less:.3g} <= "
            f"alpha {monitor.alpha:g}",
        )
    if fewest >= monitor.max_feedback_per_variant:
        return decision(
            "end_test",
            f"no significant difference after {fewest} rated answers per variant "
            f"(max_feedback_per_variant {monitor.max_feedback_per_variant}): {rates}; p = "
            f"{feedback.p_greater:.3g} (better), {feedback.p_less:.3g} (worse)",
        )
    needed = max(required, fewest + 1) - fewest
    return decision(
        "keep_collecting",
        f"no significant difference yet: {rates}; p = {feedback.p_greater:.3g} (better), "
        f"{feedback.p_less:.3g} (worse); detecting a difference of {monitor.min_effect:g} takes about "
        f"{required} rated answers per variant",
        needed,
    )


@dataclass(frozen=True)
class MonitorReport:
    """What one monitor run found and did."""

    registered_model: str
    champion_version: str | None
    challenger_version: str | None
    since: str | None
    decision: MonitorDecision | None  # None: no challenger under test
    outcome: ChallengerOutcome | None  # the registry move, when the decision was applied and moved one
    applied: bool = False
    run_id: str | None = None
    evaluation_run_ids: dict[str, str] = field(default_factory=dict)

    @property
    def action(self) -> str:
        return self.decision.action if self.decision else "no_test"


def monitor(
    tracking_config: TrackingConfig,
    monitor_config: MonitorConfig,
    *,
    confidence: float = 0.95,
    apply: bool = True,
    evaluate: bool = True,
    by: str = "monitor",
    at: datetime | None = None,
    flow_run: tuple[str | None, str | None] | None = None,
    log: logging.Logger | logging.LoggerAdapter = DEFAULT_LOG,
) -> MonitorReport:
    """Read, compare, decide, log the decision as an MLflow run, and apply it (see the module docstring)."""
    at = at or datetime.now(UTC)
    name = tracking_config.registered_model
    champion = tracking.alias_version(tracking_config, CHAMPION)
    challenger = tracking.alias_version(tracking_config, CHALLENGER)
    if champion is None or challenger is None:
        log.info(
            "%r has no %s: no A/B test to decide", name, "champion" if champion is None else "challenger"
        )
        return MonitorReport(name, champion.version if champion else None, None, None, None, None)
    since = challenger_since(challenger)
    read = {
        variant: variant_observations(tracking_config, monitor_config, variant, version, since)
        for variant, version in ((CHAMPION, champion.version), (CHALLENGER, challenger.version))
    }
    by_variant = {variant: traces for variant, (traces, _) in read.items()}
    stats = {
        variant: variant_stats(variant, version, read[variant][1], confidence)
        for variant, version in ((CHAMPION, champion.version), (CHALLENGER, challenger.version))
    }
    decision = decide_ab(stats[CHAMPION], stats[CHALLENGER], monitor_config)
    log.info(
        "%r: challenger %s vs champion %s since %s: %s (%s)",
        name,
        challenger.version,
        champion.version,
        since.isoformat(timespec="seconds") if since else "(unknown)",
        decision.action,
        decision.reason,
    )

    run = tracking.RunLog.start(
        tracking_config.model_copy(
            update={"experiment": serving_experiment(tracking_config, monitor_config)}
        ),
        flow="monitor",
        name=f"monitor v{challenger.version} vs v{champion.version}: {decision.action}",
        tags={
            "tuneline.monitor.champion": champion.version,
            "tuneline.monitor.challenger": challenger.version,
        },
    )
    try:
        if flow_run is not None:
            run.link_flow_run(*flow_run)
        evaluation_runs: dict[str, str] = {}
        if evaluate and monitor_config.evaluate_max_traces > 0:
            evaluation_runs = evaluate_variants(
                tracking_config, by_variant, stats, run.run_id, monitor_config.evaluate_max_traces
            )
        outcome = None
        if apply and decision.action != "keep_collecting":
            who = f"{by} (MLflow run {run.run_id})"
            move = promote_challenger if decision.action == "promote" else end_challenger
            outcome = move(tracking_config, challenger.version, by=who, reason=decision.reason, at=at)
            log.info(
                "version %s of %r %s; champion is version %s",
                challenger.version,
                name,
                "is now the champion" if outcome.action == "promoted" else "is no longer challenger",
                outcome.champion,
            )
        run.log_monitor(
            {
                **decision.as_dict(),
                "since": since.isoformat() if since else None,
                "applied": outcome is not None,
                "settings": monitor_config.model_dump(mode="json"),
            },
            {f"ab/{variant}/{k}": v for variant, s in stats.items() for k, v in s.metrics().items()}
            | _test_metrics(decision),
            {
                "tuneline.monitor.action": decision.action,
                "tuneline.monitor.applied": str(outcome is not None).lower(),
                "tuneline.monitor.reason": decision.reason[:5000],
            },
        )
        run.finish()
    except BaseException as exc:
        run.fail(exc)
        raise
    return MonitorReport(
        name,
        champion.version,
        challenger.version,
        since.isoformat(timespec="seconds") if since else None,
        decision,
        outcome,
        applied=outcome is not None,
        run_id=run.run_id,
        evaluation_run_ids=evaluation_runs,
    )


def _test_metrics(decision: MonitorDecision) -> dict[str, float]:
    figures = {
        "ab/feedback_delta": decision.feedback_test.delta,
        "ab/p_better": decision.feedback_test.p_greater,
        "ab/p_worse": decision.feedback_test.p_less,
        "ab/p_more_errors": decision.error_test.p_greater,
    }
    if decision.needed_rated_per_variant is not None:
        figures["ab/needed_rated_per_variant"] = decision.needed_rated_per_variant
    if decision.needed_requests is not None:
        figures["ab/needed_requests"] = decision.needed_requests
    return {k: float(v) for k, v in figures.items() if not math.isnan(float(v))}


def evaluate_variants(
    tracking_config: TrackingConfig,
    by_variant: Mapping[str, Sequence[Trace]],
    stats: Mapping[str, VariantStats],
    parent_run_id: str,
    max_traces: int,
) -> dict[str, str]:
    """Each variant's latest `max_traces` traces through `mlflow.genai.evaluate` with code scorers, one
    evaluation run per variant nested under the decision run: the MLflow UI's evaluation view compares
    the variants side by side, trace by trace. Returns variant -> evaluation run id."""
    runs: dict[str, str] = {}
    for variant, traces in by_variant.items():
        # With their spans (read without them), so the evaluation view shows each request and answer.
        fetched = (mlflow.get_trace(t.info.trace_id) for t in list(traces)[-max_traces:])
        chosen = [t for t in fetched if t is not None]
        if not chosen:
            continue
        runs[variant] = tracking.evaluate_traces(
            tracking_config,
            chosen,
            SCORERS,
            run_name=f"{variant} v{stats[variant].model_version}",
            parent_run_id=parent_run_id,
            tags={VARIANT_TAG: variant, MODEL_VERSION_TAG: stats[variant].model_version},
        )
    return runs


# Code scorers: what the MLflow UI's evaluation view shows per trace, next to the other variant's.
@scorer(name="positive_feedback")
def positive_feedback(trace: Trace) -> Feedback:
    verdict = observe(trace).feedback
    return Feedback(
        value="unrated" if verdict is None else ("yes" if verdict else "no"),
        rationale="the user's latest user_feedback on this answer",
    )


@scorer(name="latency_ms")
def latency_ms(trace: Trace) -> float:
    return observe(trace).latency_ms


@scorer(name="error")
def error(trace: Trace) -> bool:
    return observe(trace).error


@scorer(name="total_tokens")
def total_tokens(trace: Trace) -> int:
    return observe(trace).total_tokens or 0


SCORERS = [positive_feedback, latency_ms, error, total_tokens]


@task(name="monitor", cache_policy=NO_CACHE)
def monitor_task(
    tracking_config: TrackingConfig,
    monitor_config: MonitorConfig,
    confidence: float,
    apply: bool,
    flow_run: tuple[str | None, str | None],
) -> MonitorReport:
    return monitor(
        tracking_config,
        monitor_config,
        confidence=confidence,
        apply=apply,
        flow_run=flow_run,
        log=get_run_logger(),
    )
