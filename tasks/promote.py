"""promote: the gate decides whether the candidate replaces the champion; rollback moves it back.

Guarantees:
- the decision is made by tuneline/gate.py on figures measured in the same evaluation, every rule
  is reported with its figures, and the decision is logged on the run (promotion/decision.json and
  tags) whatever it is;
- only a passed gate moves an alias: the candidate becomes an MLflow external model (provider, model
  id, dataset hash, job id, eval metrics), registered as a new version. With `promotion.rollout:
  direct` it becomes `champion` and the version that was champion gets `previous`; with `ab` it becomes
  `challenger` (replacing a challenger still under test) and the monitor (tasks/monitor.py) decides on
  user feedback: `promote_challenger` makes it champion (the old champion becomes `previous`),
  `end_challenger` removes the alias. The first model of a registry becomes champion either way (there is
  nothing to test it against). A rejected or failed run never moves an alias;
- if the champion moved while this run was evaluating, the run fails instead of replacing a model it
  was never compared with;
- `rollback` moves `champion` to `previous` (or to a given version), and `previous` to the version it
  leaves (so a second rollback undoes the first); who, when and why are written on both versions' tags.

Every alias move is recorded on the version it lands on: `tuneline.<alias>.by|at|reason` (the latest
move) and `tuneline.alias_history` (a JSON list of every move, newest last, trimmed to what a tag holds),
so the registry answers who put a version where, when and why.
"""

from __future__ import annotations

import getpass
import json
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import urlsplit

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tuneline import tracking
from tuneline.config import Config, PromotionConfig, TrackingConfig
from tuneline.gate import Decision, GateEvidence, ReferenceRole, decide
from tuneline.metrics import paired_test
from tuneline.tasks.evaluate import EvaluationResult, Role, SetName
from tuneline.tracking import (
    CHALLENGER,
    CHAMPION,
    PREVIOUS,
    ModelVersionRecord,
    RegistryError,
    RunLog,
)

DEFAULT_LOG = logging.getLogger("tuneline.promote")


@dataclass(frozen=True)
class Candidate:
    """What the registry records about a candidate besides its scores."""

    model_id: str
    provider: str
    base_model: str
    dataset_hash: str | None = None
    job_id: str | None = None
    # Where the gateway serves it (tuneline/gateway/routing.py): the provider kind, its base URL (empty
    # for a run's embedded server, whose port was ephemeral) and Azure's API version when one is set.
    provider_kind: str = ""
    base_url: str = ""
    azure_api_version: str = ""


@dataclass(frozen=True)
class PromotionOutcome:
    decision: Decision
    version: str | None  # the new model version when promoted
    champion: str | None  # the version holding `champion` after the decision
    alias: str | None = None  # the alias the new version got (champion, or challenger with rollout ab)


@dataclass(frozen=True)
class ChallengerOutcome:
    """What the monitor did to the registry: `promoted` (challenger -> champion) or `ended`."""

    action: str
    challenger: str  # the version that was challenger
    champion: str  # the version holding `champion` afterwards
    previous: str | None  # the version holding `previous` afterwards


@dataclass(frozen=True)
class RollbackOutcome:
    from_version: str
    to_version: str
    model_id: str


def gate_evidence(result: EvaluationResult, promotion: PromotionConfig, seed: int = 0) -> GateEvidence:
    """The gate's figures from an evaluation: the reference is the champion when one was evaluated,
    the base model otherwise; the paired test runs on the primary metric over the task set."""
    metric = promotion.primary_metric
    reference: ReferenceRole = "champion" if "champion" in result.models else "base"
    gated_roles: list[tuple[SetName, Role]] = [
        ("task", "candidate"),
        ("task", reference),
        ("canary", "candidate"),
        ("canary", "base"),
    ]
    few_shot = None
    if "few_shot" in result.models:
        few_shot = result.estimate("task", "few_shot", metric).mean
        if promotion.beat_few_shot:
            gated_roles.append(("task", "few_shot"))
    samples = int(result.settings.get("bootstrap_samples", 1000))
    return GateEvidence(
        primary_metric=metric,
        reference=reference,
        reference_model=result.models[reference],
        candidate_task=result.estimate("task", "candidate", metric).mean,
        reference_task=result.estimate("task", reference, metric).mean,
        paired=paired_test(
            result.scores("task", "candidate", metric),
            result.scores("task", reference, metric),
            samples=samples,
            seed=seed,
        ),
        candidate_canary=result.estimate("canary", "candidate", metric).mean,
        base_canary=result.estimate("canary", "base", metric).mean,
        few_shot_task=few_shot,
        unanswered={
            f"{role}/{set_name}": result.unanswered(set_name, role) for set_name, role in gated_roles
        },
    )


def candidate_metrics(result: EvaluationResult) -> dict[str, float]:
    """The candidate's own scores, as the registered model carries them (eval/<set>/<metric>)."""
    return {
        f"eval/{set_name}/{metric}": estimate.mean
        for (set_name, role, metric), estimate in result.estimates.items()
        if role == "candidate"
    }


def promote(
    tracking_config: TrackingConfig,
    promotion: PromotionConfig,
    result: EvaluationResult,
    candidate: Candidate,
    run: RunLog,
    log: logging.Logger | logging.LoggerAdapter = DEFAULT_LOG,
) -> PromotionOutcome:
    """Decide, record the decision on the run, and move the aliases only when the gate passed."""
    seed = int(result.settings.get("seed", 0))
    decision = decide(gate_evidence(result, promotion, seed), promotion)
    current = tracking.alias_version(tracking_config, CHAMPION)
    current_version = current.version if current else None
    if current_version != result.champion_version:
        run.log_decision(
            {**decision.as_dict(), "promoted": False, "aborted": "the champion moved during evaluation"},
            {"tuneline.promotion": "aborted"},
        )
        raise RegistryError(
            f"the champion of {tracking_config.registered_model!r} moved from version "
            f"{result.champion_version or '(none)'} to {current_version or '(none)'} while this run was "
            "evaluating; nothing was promoted: run again to compare with the new champion"
        )
    version: str | None = None
    alias: str | None = None
    if decision.promoted:
        record = register(tracking_config, result, candidate, run.run_id, decision)
        version = record.version
        alias = CHALLENGER if promotion.rollout == "ab" and current is not None else CHAMPION
        flow_run = run.read().tags.get(tracking.FLOW_RUN_NAME_TAG) or run.run_id
        by, at = f"{_user()} (flow run {flow_run}, MLflow run {run.run_id})", datetime.now(UTC)
        against = f"passed the offline gate against the {decision.reference} ({decision.reference_model})"
        if alias == CHALLENGER:
            replaced = tracking.alias_version(tracking_config, CHALLENGER)
            if replaced is not None:
                record_alias_move(
                    tracking_config, "challenger_replaced", replaced.version, by, at, f"replaced by {version}"
                )
            tracking.set_alias(tracking_config, CHALLENGER, record.version)
            record_alias_move(tracking_config, CHALLENGER, version, by, at, f"{against}; rollout ab")
        else:
            if current is not None:
                tracking.set_alias(tracking_config, PREVIOUS, current.version)
                record_alias_move(
                    tracking_config, PREVIOUS, current.version, by, at, f"replaced by {version}"
                )
            tracking.set_alias(tracking_config, CHAMPION, record.version)
            record_alias_move(tracking_config, CHAMPION, version, by, at, against)
        describe_version(tracking_config, promotion, record.version, decision, result, run)
    tags = {
        "tuneline.promotion": "promoted" if decision.promoted else "rejected",
        "tuneline.promotion.reference": f"{decision.reference}:{decision.reference_model}",
    }
    if version is not None and alias is not None:
        tags["tuneline.promotion.version"] = version
        tags["tuneline.promotion.alias"] = alias
    else:
        tags["tuneline.promotion.reasons"] = "; ".join(r.rule for r in decision.failed_rules)[:5000]
    run.log_decision({**decision.as_dict(), "alias": alias}, tags)
    log.info("%s", decision.summary())
    if version is not None and alias == CHAMPION:
        log.info(
            "version %s of %r is now the champion (%s)%s",
            version,
            tracking_config.registered_model,
            candidate.model_id,
            f"; version {current.version} is `previous`" if current else "",
        )
    elif version is not None:
        log.info(
            "version %s of %r is now the challenger (%s), A/B tested against champion %s: the monitor "
            "flow decides on user feedback",
            version,
            tracking_config.registered_model,
            candidate.model_id,
            current_version,
        )
    champion_after = version if alias == CHAMPION else current_version
    return PromotionOutcome(decision, version, champion_after, alias)


ALIAS_HISTORY_TAG = "tuneline.alias_history"
_TAG_LIMIT = 5000  # characters a model version tag value holds


def record_alias_move(
    tracking_config: TrackingConfig, alias: str, version: str, by: str, at: datetime, reason: str
) -> None:
    """Write who/when/why of an alias move on the version it concerns (see the module docstring)."""
    when = at.isoformat(timespec="seconds")
    history: list[dict[str, str]] = []
    raw = tracking.model_version(tracking_config, version).tags.get(ALIAS_HISTORY_TAG)
    if raw:
        try:
            loaded = json.loads(raw)
            history = loaded if isinstance(loaded, list) else []
        except json.JSONDecodeError:
            history = []
    history.append({"alias": alias, "at": when, "by": by, "reason": reason[:500]})
    text = json.dumps(history, separators=(",", ":"))
    while len(text) > _TAG_LIMIT and len(history) > 1:
        history.pop(0)
        text = json.dumps(history, separators=(",", ":"))
    tracking.set_version_tags(
        tracking_config,
        version,
        {
            f"tuneline.{alias}.by": by,
            f"tuneline.{alias}.at": when,
            f"tuneline.{alias}.reason": reason[:_TAG_LIMIT],
            ALIAS_HISTORY_TAG: text,
        },
    )


def alias_history(record: ModelVersionRecord) -> list[dict[str, str]]:
    """The alias moves recorded on a version (record_alias_move), oldest first."""
    try:
        loaded = json.loads(record.tags.get(ALIAS_HISTORY_TAG) or "[]")
    except json.JSONDecodeError:
        return []
    return loaded if isinstance(loaded, list) else []


def challenger_since(record: ModelVersionRecord) -> datetime | None:
    """When the version became challenger (its `tuneline.challenger.at` tag), None when not recorded."""
    raw = record.tags.get(f"tuneline.{CHALLENGER}.at")
    if not raw:
        return None
    try:
        when = datetime.fromisoformat(raw)
    except ValueError:
        return None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def promote_challenger(
    tracking_config: TrackingConfig, expected: str, by: str, reason: str, at: datetime
) -> ChallengerOutcome:
    """The challenger (version `expected`) becomes champion, the champion `previous`; the challenger alias
    is removed. Fails without moving anything when the challenger is no longer `expected`."""
    challenger = _expected_challenger(tracking_config, expected)
    champion = tracking.alias_version(tracking_config, CHAMPION)
    if champion is not None:
        tracking.set_alias(tracking_config, PREVIOUS, champion.version)
        record_alias_move(
            tracking_config, PREVIOUS, champion.version, by, at, f"challenger {expected} won: {reason}"
        )
    tracking.set_alias(tracking_config, CHAMPION, challenger.version)
    tracking.delete_alias(tracking_config, CHALLENGER)
    record_alias_move(tracking_config, CHAMPION, challenger.version, by, at, reason)
    return ChallengerOutcome(
        "promoted", challenger.version, challenger.version, champion.version if champion else None
    )


def end_challenger(
    tracking_config: TrackingConfig, expected: str, by: str, reason: str, at: datetime
) -> ChallengerOutcome:
    """End the A/B test: the challenger alias is removed (the version stays registered); champion stays."""
    challenger = _expected_challenger(tracking_config, expected)
    tracking.delete_alias(tracking_config, CHALLENGER)
    record_alias_move(tracking_config, "challenger_ended", challenger.version, by, at, reason)
    champion = tracking.alias_version(tracking_config, CHAMPION)
    previous = tracking.alias_version(tracking_config, PREVIOUS)
    return ChallengerOutcome(
        "ended",
        challenger.version,
        champion.version if champion else "",
        previous.version if previous else None,
    )


def _expected_challenger(tracking_config: TrackingConfig, expected: str) -> ModelVersionRecord:
    challenger = tracking.alias_version(tracking_config, CHALLENGER)
    name = tracking_config.registered_model
    if challenger is None or challenger.version != str(expected):
        found = challenger.version if challenger else "(none)"
        raise RegistryError(
            f"the challenger of {name!r} is now version {found}, not {expected}: nothing was moved "
            "(run the monitor again to decide on the current challenger)"
        )
    return challenger


def register(
    tracking_config: TrackingConfig,
    result: EvaluationResult,
    candidate: Candidate,
    run_id: str,
    decision: Decision,
) -> ModelVersionRecord:
    """The candidate as a registered external model version, carrying what it is and how it scored."""
    facts = {
        "provider": candidate.provider,
        "model_id": candidate.model_id,
        "base_model": candidate.base_model,
        "dataset_hash": candidate.dataset_hash or "",
        "job_id": candidate.job_id or "",
    }
    tags = {f"tuneline.{k}": v for k, v in facts.items() if k != "model_id"}
    # A base URL carrying credentials (https://user:key@host) is not recorded: tags are not for secrets.
    parts = urlsplit(candidate.base_url)
    base_url = "" if parts.username or parts.password else candidate.base_url
    serving = {
        "tuneline.provider_kind": candidate.provider_kind,
        "tuneline.base_url": base_url,
        "tuneline.azure_api_version": candidate.azure_api_version,
    }
    tags.update({k: v for k, v in serving.items() if v})
    tags["tuneline.promoted_against"] = f"{decision.reference}:{decision.reference_model}"
    return tracking.register_external_model(
        tracking_config,
        run_id,
        candidate.model_id,
        params=facts,
        tags=tags,
        metrics=candidate_metrics(result),
    )


def rollback(
    tracking_config: TrackingConfig, to_version: str | None, by: str, reason: str, at: datetime
) -> RollbackOutcome:
    """Move `champion` to `to_version` (default: the `previous` version) and record who, when and why."""
    champion = tracking.alias_version(tracking_config, CHAMPION)
    name = tracking_config.registered_model
    if champion is None:
        raise RegistryError(f"registered model {name!r} has no champion: there is nothing to roll back")
    if to_version is None:
        target = tracking.alias_version(tracking_config, PREVIOUS)
        if target is None:
            versions = ", ".join(r.version for r in tracking.model_versions(tracking_config))
            raise RegistryError(
                f"registered model {name!r} has no `previous` version: pass --to VERSION (versions: {versions})"
            )
    else:
        target = tracking.model_version(tracking_config, to_version)
    if target.version == champion.version:
        raise RegistryError(f"version {target.version} of {name!r} is already the champion: nothing to do")
    when = at.isoformat(timespec="seconds")
    tracking.set_version_tags(
        tracking_config,
        target.version,
        {
            "tuneline.rollback.by": by,
            "tuneline.rollback.at": when,
            "tuneline.rollback.reason": reason,
            "tuneline.rollback.from_version": champion.version,
        },
    )
    tracking.set_version_tags(
        tracking_config,
        champion.version,
        {
            "tuneline.demoted.by": by,
            "tuneline.demoted.at": when,
            "tuneline.demoted.reason": reason,
            "tuneline.demoted.to_version": target.version,
        },
    )
    tracking.set_alias(tracking_config, PREVIOUS, champion.version)
    tracking.set_alias(tracking_config, CHAMPION, target.version)
    record_alias_move(
        tracking_config, CHAMPION, target.version, by, at, f"rollback from {champion.version}: {reason}"
    )
    record_alias_move(
        tracking_config, PREVIOUS, champion.version, by, at, f"rollback to {target.version}: {reason}"
    )
    return RollbackOutcome(champion.version, target.version, target.model_id)


# --- the model version page in the MLflow UI --------------------------------------------------------

RULE_MEANINGS = {
    "answered": "every request of the compared models came back (a comparison with gaps decides nothing)",
    "min_delta": "it beats the reference on the primary metric by at least `promotion.min_delta`",
    "significant": "the one-sided paired test on the same examples has p <= `promotion.alpha`",
    "canary": "its canary score is not below the base model's by more than `promotion.max_canary_drop`",
    "few_shot": "it scores at least as well as the base model prompted with k training examples",
}


def version_description(decision: Decision, promotion: PromotionConfig, run_url: str, run_id: str) -> str:
    """The version page's description (Markdown): the decision, every rule with its figures, what each
    rule asks, and the run that decided."""
    verdict = "Promoted" if decision.promoted else "Rejected"
    lines = [
        f"**{verdict}** by the promotion gate against the {decision.reference} "
        f"(`{decision.reference_model}`) on `{promotion.primary_metric}`, "
        f"in run [{run_id}]({run_url}).",
        "",
        "| rule | result | observed | threshold | figures |",
        "|---|---|---|---|---|",
        *(
            f"| {r.rule} | {'PASS' if r.passed else 'FAIL'} | {r.observed:.4g} | {r.threshold:.4g} | "
            f"{r.detail.replace('|', '/')} |"
            for r in decision.rules
        ),
        "",
        "A candidate is promoted only when every rule passes:",
        *(f"- `{r.rule}`: {RULE_MEANINGS.get(r.rule, '')}" for r in decision.rules),
    ]
    return "\n".join(lines)


def eval_tags(result: EvaluationResult, metric: str, reference: str) -> dict[str, str]:
    """The candidate's and the reference's scores on the gate's metric as version tags (mean [CI])."""
    tags = {}
    for (set_name, role, name), e in result.estimates.items():
        if name == metric and role in {"candidate", reference} | (
            {"base"} if set_name == "canary" else set()
        ):
            tags[f"tuneline.eval.{set_name}.{role}.{metric}"] = f"{e.mean:.3f} [{e.low:.3f}, {e.high:.3f}]"
    return tags


def describe_version(
    tracking_config: TrackingConfig,
    promotion: PromotionConfig,
    version: str,
    decision: Decision,
    result: EvaluationResult,
    run: RunLog,
) -> None:
    """What the promoted version's page shows: the decision as its description; the run link and the
    eval figures as tags (dataset hash, job id and model id are set at registration; who moved which
    alias when and why by record_alias_move)."""
    url = run.url()
    tracking.set_version_description(
        tracking_config, version, version_description(decision, promotion, url, run.run_id)
    )
    tags = {"tuneline.run_url": url, "tuneline.run_id": run.run_id}
    tracking.set_version_tags(
        tracking_config, version, {**tags, **eval_tags(result, promotion.primary_metric, decision.reference)}
    )


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # a container user without a passwd entry
        return "unknown user"


@task(name="promote", cache_policy=NO_CACHE)
def promote_task(
    config: Config, result: EvaluationResult, candidate: Candidate, run: RunLog
) -> PromotionOutcome:
    return promote(config.tracking, config.promotion, result, candidate, run, log=get_run_logger())
