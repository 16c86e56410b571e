"""Run summaries in Markdown: what a person reads first on a Prefect flow run (pure, no I/O).

Every flow run (prepare, retrain, backfill) publishes one of these as a Prefect markdown artifact:
the counts by quarantine reason, tokens and cost, the training job, the metrics, the promotion
decision and the link to the MLflow run that holds everything in full. The renderers only format
what they are given; a section whose data a run did not produce is left out, never invented.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class RunSummary:
    """What one flow run produced. `manifest` is the data plane's manifest.json (dataset_hash,
    counts, tokens, cost); `decision` is the promotion gate's `Decision.as_dict()`."""

    flow: str
    as_of: str | None = None
    flow_run_name: str | None = None
    outcome: str | None = None
    manifest: Mapping[str, Any] | None = None
    job: Mapping[str, Any] | None = None
    actual_cost_usd: float | None = None
    metrics: Mapping[str, float] = field(default_factory=dict)
    decision: Mapping[str, Any] | None = None
    mlflow_run_url: str | None = None
    # Said under the link when the store has no server of its own (`tuneline ui` serves it).
    mlflow_hint: str | None = None
    # The registered model version this run made champion (its page: decision, rules, alias history).
    model_version: str | None = None
    model_version_url: str | None = None


@dataclass(frozen=True)
class BackfillDay:
    """One date of a backfill: `outcome` is what happened to it (prepared, retrained, unchanged, ...)."""

    as_of: str
    outcome: str
    manifest: Mapping[str, Any] | None = None
    candidate_model: str | None = None
    decision: Mapping[str, Any] | None = None
    mlflow_run_url: str | None = None


def render_run_summary(summary: RunSummary) -> str:
    """Markdown for one flow run; sections appear only for what the run produced."""
    title = summary.flow + (f" as of {summary.as_of}" if summary.as_of else "")
    lines = [f"# {title}", ""]
    facts = []
    if summary.outcome:
        facts.append(f"**Outcome:** {_cell(summary.outcome)}")
    if summary.flow_run_name:
        facts.append(f"**Flow run:** `{summary.flow_run_name}`")
    if summary.manifest and summary.manifest.get("dataset_hash"):
        facts.append(f"**Dataset hash:** `{summary.manifest['dataset_hash']}`")
    facts.append(_mlflow_line(summary.mlflow_run_url, summary.mlflow_hint))
    if summary.model_version and summary.model_version_url:
        facts.append(
            f"**Model version:** [{_cell(summary.model_version)}]({summary.model_version_url}) (now `champion`)"
        )
    lines += ["  \n".join(facts), ""]  # two trailing spaces: a Markdown line break
    if summary.manifest:
        lines += _data_section(summary.manifest)
        lines += _tokens_and_cost_section(summary.manifest, summary.actual_cost_usd)
    elif summary.actual_cost_usd is not None:
        lines += ["## Tokens and cost", "", f"Actual cost: {_usd(summary.actual_cost_usd)}", ""]
    if summary.job:
        lines += _job_section(summary.job)
    if summary.metrics:
        lines += _metrics_section(summary.metrics)
    if summary.decision:
        lines += _decision_section(summary.decision)
    return "\n".join(lines).rstrip() + "\n"


def render_backfill_summary(
    start: str,
    end: str,
    mode: str,
    days: Sequence[BackfillDay],
    mlflow_run_url: str | None = None,
    mlflow_hint: str | None = None,
) -> str:
    """Markdown for a backfill: one row per date, in date order, with its quality and outcome."""
    lines = [f"# backfill {start} to {end} ({mode})", "", _mlflow_line(mlflow_run_url, mlflow_hint), ""]
    outcomes: dict[str, int] = {}
    for day in days:
        outcomes[day.outcome] = outcomes.get(day.outcome, 0) + 1
    tally = ", ".join(f"{count} {outcome}" for outcome, count in outcomes.items())
    lines += [f"{len(days)} date{'s' if len(days) != 1 else ''}: {tally or 'none'}", ""]
    header = "| date | outcome | dataset hash | input | kept | quarantined | quarantined by reason | training tokens | estimated cost |"
    align = "|---|---|---|---:|---:|---:|---|---:|---:|"
    if mode == "retrain":
        header += " candidate | decision |"
        align += "---|---|"
    header += " MLflow |"
    align += "---|"
    lines += [header, align]
    for day in sorted(days, key=lambda d: d.as_of):
        manifest = day.manifest or {}
        counts = manifest.get("counts") or {}
        by_reason = counts.get("quarantined_by_reason") or {}
        reasons = ", ".join(f"{reason} {n}" for reason, n in _by_count(by_reason)) or "-"
        # An unpublished dataset (stopped by the gate) has a hash, but nothing was or will be trained on it.
        digest = manifest.get("dataset_hash") if manifest.get("published", True) else None
        row = [
            day.as_of,
            day.outcome,
            f"`{digest[:12]}`" if digest else "-",
            _number(counts.get("input_records")),
            _number(counts.get("kept")),
            _number(counts.get("quarantined")),
            reasons,
            _number(training_tokens(manifest)),
            _usd(estimated_cost_usd(manifest)),
        ]
        if mode == "retrain":
            row += [f"`{day.candidate_model}`" if day.candidate_model else "-", _verdict(day.decision)]
        row.append(f"[run]({day.mlflow_run_url})" if day.mlflow_run_url else "-")
        lines.append("| " + " | ".join(_cell(v) for v in row) + " |")
    return "\n".join(lines).rstrip() + "\n"


def headline_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    """The figures a run summary shows of an evaluation: exact match of every model on every set."""
    return {k: v for k, v in metrics.items() if k.startswith("eval/") and k.endswith("/exact_match")}


def render_rollback_summary(
    registered_model: str, from_version: str, to_version: str, model_id: str, by: str, reason: str
) -> str:
    """Markdown for a rollback: where `champion` moved, who moved it and why."""
    return (
        f"# rollback of {registered_model}\n\n"
        f"**Champion:** version {_cell(from_version)} -> **version {_cell(to_version)}** (`{_cell(model_id)}`)  \n"
        f"**Previous:** version {_cell(from_version)}  \n"
        f"**By:** {_cell(by)}  \n"
        f"**Why:** {_cell(reason)}\n"
    )


def training_tokens(manifest: Mapping[str, Any]) -> int | None:
    """Tokens in the training file (the figure the price applies to), as the manifest states it."""
    return (manifest.get("tokens") or {}).get("train_total")


def estimated_cost_usd(manifest: Mapping[str, Any]) -> float | None:
    """The data plane's cost estimate in USD (None when the model has no listed price)."""
    return (manifest.get("cost") or {}).get("estimated_cost_usd")


def _mlflow_line(url: str | None, hint: str | None) -> str:
    if not url:
        return "**MLflow run:** not recorded"
    return f"**MLflow run:** [{url}]({url})" + (f" ({hint})" if hint else "")


def _data_section(manifest: Mapping[str, Any]) -> list[str]:
    counts = manifest.get("counts") or {}
    problems = manifest.get("problems") or []
    lines = ["## Data", ""]
    if problems:
        lines += ["**Not published** (nothing was uploaded):", ""]
        lines += [f"- {_cell(problem)}" for problem in problems]
        lines.append("")
    if not counts:
        return lines
    lines += ["| records | count |", "|---|---:|"]
    for key in ("input_records", "kept", "train", "validation", "general_mixed", "quarantined"):
        if key in counts:
            lines.append(f"| {key.replace('_', ' ')} | {_number(counts[key])} |")
    lines.append("")
    by_reason = counts.get("quarantined_by_reason") or {}
    lines += ["### Quarantined by reason", ""]
    if by_reason:
        lines += ["| reason | records |", "|---|---:|"]
        lines += [f"| `{reason}` | {_number(n)} |" for reason, n in _by_count(by_reason)]
    else:
        lines.append("Nothing was quarantined.")
    lines.append("")
    return lines


def _tokens_and_cost_section(manifest: Mapping[str, Any], actual_cost_usd: float | None) -> list[str]:
    rows = [(f"tokens {k}", v) for k, v in _flatten(manifest.get("tokens") or {})]
    rows += [(f"cost {k}", v) for k, v in _flatten(manifest.get("cost") or {})]
    if actual_cost_usd is not None:
        rows.append(("cost actual_usd", actual_cost_usd))
    if not rows:
        return []
    lines = ["## Tokens and cost", "", "| figure | value |", "|---|---:|"]
    for name, value in rows:
        shown = _usd(value) if name.endswith("usd") and isinstance(value, int | float) else _number(value)
        lines.append(f"| {_cell(name)} | {_cell(shown)} |")
    return [*lines, ""]


def _job_section(job: Mapping[str, Any]) -> list[str]:
    lines = ["## Training job", "", "| field | value |", "|---|---|"]
    for key, value in job.items():
        if value is None or isinstance(value, Mapping | list):
            continue
        shown = _number(value) if isinstance(value, int | float) and not isinstance(value, bool) else value
        lines.append(f"| {_cell(key)} | {_cell(shown)} |")
    return [*lines, ""]


def _metrics_section(metrics: Mapping[str, float]) -> list[str]:
    lines = ["## Metrics", "", "| metric | value |", "|---|---:|"]
    lines += [f"| `{name}` | {_number(metrics[name])} |" for name in sorted(metrics)]
    return [*lines, ""]


def _decision_section(decision: Mapping[str, Any]) -> list[str]:
    against = decision.get("reference")
    model = decision.get("reference_model")
    heading = f"**{_verdict(decision)}**" + (f" against the {against}" if against else "")
    heading += f" (`{model}`)" if model else ""
    lines = ["## Decision", "", heading, ""]
    rules = decision.get("rules") or []
    if rules:
        lines += ["| rule | result | detail |", "|---|---|---|"]
        for rule in rules:
            result = "pass" if rule.get("passed") else "FAIL"
            lines.append(f"| {_cell(rule.get('rule', ''))} | {result} | {_cell(rule.get('detail', ''))} |")
        lines.append("")
    return lines


def _verdict(decision: Mapping[str, Any] | None) -> str:
    if not decision:
        return "-"
    if decision.get("promoted") and decision.get("alias") == "challenger":
        return "PROMOTED to challenger (A/B)"
    return "PROMOTED" if decision.get("promoted") else "REJECTED"


def _by_count(by_reason: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """Most frequent reason first; ties by name so the order never depends on dict order."""
    return sorted(by_reason.items(), key=lambda item: (-item[1], item[0]))


def _flatten(mapping: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            rows += _flatten(value, f"{name}.")
        elif not isinstance(value, list):
            rows.append((name, value))
    return rows


def _number(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.0f}" if value.is_integer() and abs(value) >= 1000 else f"{value:.4g}"
    return str(value)


def _usd(value: float | None) -> str:
    if value is None:
        return "-"
    return f"${value:,.2f}" if value >= 1 or value == 0 else f"${value:.4f}"


def _cell(value: Any) -> str:
    # A pipe or a newline inside a cell would break the table's columns.
    return str(value).replace("|", "\\|").replace("\n", " ")


def render_monitor_summary(
    registered_model: str,
    decision: Mapping[str, Any] | None,
    *,
    champion_version: str | None,
    challenger_version: str | None,
    since: str | None,
    registry_move: str | None,
    harvested: str | None,
    mlflow_run_url: str | None = None,
    mlflow_hint: str | None = None,
) -> str:
    """Markdown for one monitor run: per-variant figures, the decision and why, what it moved, and the
    corrections it turned into data. `decision` is `MonitorDecision.as_dict()` (None: no A/B test)."""
    lines = [f"# monitor of {_cell(registered_model)}", ""]
    if decision is None:
        facts = [
            "**Outcome:** no A/B test (no challenger)",
            f"**Champion:** version {_cell(champion_version)}",
        ]
    else:
        facts = [
            f"**Outcome:** {_cell(decision['action'])}",
            f"**Challenger:** version {_cell(challenger_version)} vs champion version {_cell(champion_version)}",
            f"**Since:** {_cell(since)}",
        ]
        if registry_move:
            facts.append(f"**Registry:** {_cell(registry_move)}")
        facts.append(_mlflow_line(mlflow_run_url, mlflow_hint))
    if harvested:
        facts.append(f"**Feedback as data:** {_cell(harvested)}")
    lines += ["  \n".join(facts), ""]
    if decision is None:
        return "\n".join(lines).rstrip() + "\n"
    lines += ["## Variants", ""]
    lines += [
        "| variant | version | requests | error rate | rated | positive feedback [CI] | p50 ms | p95 ms "
        "| p99 ms | tokens/request |",
        "|---|---|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for variant in ("champion", "challenger"):
        stats = decision[variant]
        positive = stats["positive"]
        latency = stats["latency_ms"]
        rate = (
            f"{_number(positive['mean'])} [{_number(positive['low'])}, {_number(positive['high'])}]"
            if positive["n"]
            else "n/a"
        )
        lines.append(
            f"| {variant} | {_cell(stats['model_version'])} | {_number(stats['requests'])} "
            f"| {_number(stats['error_rate'])} | {_number(stats['rated'])} | {rate} | {_number(latency['p50'])} "
            f"| {_number(latency['p95'])} | {_number(latency['p99'])} | {_number(stats['tokens_mean'])} |"
        )
    test = decision["feedback_test"]
    lines += [
        "",
        "## Decision",
        "",
        f"{_cell(decision['reason'])}",
        "",
        f"Fisher's exact test on positive feedback: delta {_number(test['delta'])}, p (challenger better) "
        f"{_number(test['p_greater'])}, p (challenger worse) {_number(test['p_less'])}.",
    ]
    if decision.get("needed_rated_per_variant") is not None:
        needed = (
            f"Still needed: about {_number(decision['needed_rated_per_variant'])} rated answers per variant"
        )
        if decision.get("needed_requests") is not None:
            needed += f" (about {_number(decision['needed_requests'])} requests at the current rating share)"
        lines += ["", needed + "."]
    return "\n".join(lines).rstrip() + "\n"
