"""The `monitor` flow (deployment `monitor`, and `tuneline monitor`): decide the A/B test, harvest feedback.

One run: the monitor task (tasks/monitor.py) reads the gateway's traces since the challenger went live,
compares the variants, decides promote | keep_collecting | end_test, logs the decision as an MLflow run
in `serving/<registered model>` (with one `mlflow.genai.evaluate` run per variant under it) and applies
it to the registry; then the corrections users sent since `data.lookback_days` ago and not harvested
before become the raw partition `dt=<day>/feedback.jsonl` (tasks/feedback.py). A markdown summary of both
is published on the flow run, like the nightly runs'.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

from prefect import flow, get_run_logger
from prefect import runtime as prefect_runtime
from prefect.artifacts import create_markdown_artifact

from tuneline import tracking
from tuneline.config import load_config
from tuneline.reporting import render_monitor_summary
from tuneline.tasks.feedback import Harvest, harvest_task
from tuneline.tasks.monitor import MonitorReport, monitor_task, serving_experiment


@flow(name="monitor", log_prints=True, validate_parameters=True)
def monitor(
    config: str | None = None,
    apply: bool = True,
    harvest: bool = True,
    as_of: date | None = None,
    feedback_dir: str | None = None,
) -> MonitorReport:
    """Decide the A/B test of the configured registered model; `apply=False` decides and records without
    moving an alias. `as_of` is the day the harvested corrections are filed under (default: today, UTC);
    `feedback_dir` replaces `promotion.monitor.feedback_dir` for this run."""
    settings = load_config(config)
    if feedback_dir:
        monitor_settings = settings.promotion.monitor.model_copy(update={"feedback_dir": feedback_dir})
        promotion = settings.promotion.model_copy(update={"monitor": monitor_settings})
        settings = settings.model_copy(update={"promotion": promotion})
    now = datetime.now(UTC)
    flow_run = (
        str(prefect_runtime.flow_run.id) if prefect_runtime.flow_run.id else None,
        str(prefect_runtime.flow_run.name or "") or None,
    )
    report = monitor_task(
        settings.tracking, settings.promotion.monitor, settings.evaluation.confidence, apply, flow_run
    )
    harvested: Harvest | None = None
    if harvest:
        since = now - timedelta(days=settings.data.lookback_days)
        harvested = harvest_task(settings, as_of or now.date(), since)
    summary = render_monitor_summary(
        settings.tracking.registered_model,
        report.decision.as_dict() if report.decision else None,
        champion_version=report.champion_version,
        challenger_version=report.challenger_version,
        since=report.since,
        registry_move=_registry_move(report),
        harvested=_harvested(harvested),
        mlflow_run_url=tracking.run_url(settings.tracking, report.run_id) if report.run_id else None,
        mlflow_hint=None
        if tracking.has_tracking_server(settings.tracking)
        else f"open it with `tuneline ui` (experiment {serving_experiment(settings.tracking, settings.promotion.monitor)})",
    )
    get_run_logger().info("%s", summary)
    if prefect_runtime.flow_run.id:
        create_markdown_artifact(
            summary,
            key="monitor-summary",
            description="monitor: the A/B decision, its figures, feedback as data",
        )
    return report


def _registry_move(report: MonitorReport) -> str | None:
    if report.outcome is None:
        if report.decision and report.decision.action != "keep_collecting" and not report.applied:
            return "not applied (apply=false): nothing moved"
        return "nothing moved" if report.decision else None
    if report.outcome.action == "promoted":
        return (
            f"version {report.outcome.challenger} is champion; version {report.outcome.previous} is previous"
        )
    return f"version {report.outcome.challenger} is no longer challenger; champion stays {report.outcome.champion}"


def _harvested(harvest: Harvest | None) -> str | None:
    if harvest is None:
        return None
    if harvest.path is None:
        return f"no new corrections ({harvest.already_harvested} harvested before)"
    return f"{harvest.written} correction(s) appended to {harvest.path}"
