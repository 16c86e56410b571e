"""The `backfill` flow: replay a range of dates, as the nightly run would have seen each of them.

For every date D from `start` to `end` (inclusive), the data plane runs as of D (the partitions of the
configured lookback window ending at D: exactly what D's nightly run reads):
- `prepare` mode: each date's data is validated and deduplicated and its quality (counts by reason,
  token statistics, cost estimate, dataset hash) is recorded in an MLflow run of its own, nested under
  one parent run for the backfill. Dates are prepared concurrently, at most `backfill.concurrency` at a
  time.
- with `execution.engine: ray`, the dates are still tasks of this one flow, prepared concurrently,
  and each date's per-partition work (ingest, validate, the credential/PII screen) runs as Ray tasks
  on the cluster (tuneline/engines/ray_engine.py): `backfill.concurrency` dates share the cluster.
  The engine is not part of the config hash: a date prepared by either engine is reused by both.
- `retrain` mode: the same, then the dates are retrained one after another in date order, each by the
  `retrain` flow as of that date; a date whose dataset hash equals the previous date's is skipped
  (`unchanged`): the same data would train the same model.

Guarantees:
- idempotent: a date's preparation is a cached task keyed on what it reads (config hash, as_of, the
  bytes of every input file in its window, the eval set and the general corpus), and a date's
  retraining is a cached task keyed on the dataset hash and the config hash; results persist under
  `backfill.work_dir`, so running the same backfill again reuses them: no new MLflow runs, uploads or
  jobs (and the train task's find-or-create would reattach to an existing job anyway);
- a date that fails or is stopped (by the data-quality check or the cost cap) never stops the other
  dates; the flow run fails at the
  end, naming each such date and why;
- the parent MLflow run carries a table of every date and is tagged with the Prefect flow run; the
  flow run publishes a markdown summary with one row per date.
"""

from __future__ import annotations

import csv
import hashlib
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import Any, Literal

import fsspec
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.context import TaskRunContext
from prefect.futures import PrefectFuture, as_completed
from prefect.runtime import flow_run
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from tuneline import tracking
from tuneline.config import Config, load_config
from tuneline.engines import ray_engine
from tuneline.flows.prepare import prepare_dataset
from tuneline.flows.retrain import RetrainResult, retrain
from tuneline.paths import is_url, resolve
from tuneline.reporting import BackfillDay, render_backfill_summary
from tuneline.tasks import ingest
from tuneline.tracking import RunLog

Mode = Literal["prepare", "retrain"]
MODES: tuple[Mode, ...] = ("prepare", "retrain")
MAX_DAYS = 3660  # ten years of nights; a longer range is almost certainly a typo in a date

# Outcomes of a date.
PREPARED = "prepared"
STOPPED = "stopped"  # by the data-quality check or the cost cap: nothing may be uploaded
RETRAINED = "retrained"
UNCHANGED = "unchanged"
FAILED = "failed"


class BackfillError(ValueError):
    """Bad backfill arguments; the message is one line naming the argument and the fix."""


class BackfillIncomplete(RuntimeError):
    """Some dates failed or were stopped before upload; the others were done. `result` holds them all."""

    def __init__(self, result: BackfillResult) -> None:
        self.result = result
        lines = [
            f"- {d.as_of}: {d.outcome}" + (f" ({d.detail})" if d.detail else "") for d in result.incomplete
        ]
        super().__init__(
            f"{len(result.incomplete)} of {len(result.days)} dates not done:\n" + "\n".join(lines)
        )


@dataclass(frozen=True)
class DayResult:
    """What happened to one date. `mlflow_run_id` is the date's run (quality, and its retrain nested)."""

    as_of: str
    outcome: str
    manifest: Mapping[str, Any] | None = None
    mlflow_run_id: str | None = None
    out_dir: str | None = None
    retrain: RetrainResult | None = None
    detail: str | None = None

    @property
    def dataset_hash(self) -> str | None:
        """The hash of the published dataset; None when nothing was published for this date."""
        return (
            str(self.manifest["dataset_hash"]) if self.manifest and self.manifest.get("published") else None
        )


@dataclass(frozen=True)
class BackfillResult:
    start: str
    end: str
    mode: Mode
    parent_run_id: str
    days: list[DayResult] = field(default_factory=list)

    @property
    def incomplete(self) -> list[DayResult]:
        return [d for d in self.days if d.outcome in (FAILED, STOPPED)]


def backfill_dates(start: str | date, end: str | date) -> list[date]:
    """Every date from start to end, inclusive, in order; BackfillError (one line) on a bad range."""
    first, last = _as_date("--start", start), _as_date("--end", end)
    if last < first:
        raise BackfillError(f"--end {last} is before --start {first} (the range is inclusive: end >= start)")
    days = (last - first).days + 1
    if days > MAX_DAYS:
        raise BackfillError(
            f"--start {first} to --end {last} is {days} days; at most {MAX_DAYS} (check the years)"
        )
    return [first + timedelta(days=n) for n in range(days)]


def check_mode(mode: str) -> Mode:
    for known in MODES:
        if mode == known:
            return known
    raise BackfillError(f"--mode {mode!r}: expected {' or '.join(MODES)}")


def _as_date(name: str, value: str | date) -> date:
    if isinstance(value, date):
        return value
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise BackfillError(f"{name} {value!r}: not a date (use YYYY-MM-DD, e.g. 2026-11-01)") from None


def input_fingerprint(config: Config, as_of: date) -> str:
    """sha256 over everything a date's preparation reads: the config hash, as_of, and the name and bytes
    of every input file in the window, the eval set and the general corpus (same bytes, same result)."""
    digest = hashlib.sha256(f"{config.config_hash()}\0{as_of.isoformat()}\0".encode())
    selection = ingest.select_files(config.data.sources, as_of, config.data.lookback_days)
    named = [(f.display, f.uri) for f in selection.files]
    for uri in (config.data.eval_set, config.data.general_corpus):
        named.append((uri, uri if is_url(uri) else str(resolve(uri))))
    for display, uri in named:
        digest.update(display.encode() + b"\0")
        try:
            with fsspec.open(uri, "rb") as handle:
                while chunk := handle.read(1 << 20):
                    digest.update(chunk)
        except FileNotFoundError:
            digest.update(b"(missing)")
        digest.update(b"\0")
    return digest.hexdigest()


def _prepare_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    return f"backfill-prepare-{parameters['fingerprint']}"


def _retrain_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    return f"backfill-retrain-{parameters['dataset_hash']}-{parameters['config'].config_hash()}"


@task(name="prepare-date", task_run_name="prepare {as_of}", cache_key_fn=_prepare_key, persist_result=True)
def prepare_date(
    config: Config, as_of: date, fingerprint: str, out_dir: str, parent_run_id: str
) -> DayResult:
    """The data plane as of one date, logged to an MLflow run nested under the backfill's run. A failed
    data-quality check is this date's outcome (cached: the same bytes fail the same way); a crash is
    not cached."""
    run = RunLog.start(
        config.tracking,
        flow="prepare",
        name=f"prepare {as_of}",
        tags={"tuneline.backfill_date": as_of.isoformat()},
        parent=parent_run_id,
    )
    try:
        prepared = prepare_dataset(config, out_dir=out_dir, as_of=as_of, run=run)
    except BaseException as exc:
        run.fail(exc)
        raise
    run.finish("FINISHED" if prepared.published else "FAILED")
    return DayResult(
        as_of=as_of.isoformat(),
        outcome=PREPARED if prepared.published else STOPPED,
        manifest=prepared.manifest,
        mlflow_run_id=run.run_id,
        out_dir=str(prepared.out_dir),
        detail="; ".join(prepared.problems) or None,
    )


@task(name="retrain-date", task_run_name="retrain {as_of}", cache_key_fn=_retrain_key, persist_result=True)
def retrain_date(
    config: Config, config_path: str | None, as_of: date, dataset_hash: str, out_dir: str
) -> RetrainResult:
    """The `retrain` flow as of one date (its own flow run and MLflow run); cached per dataset and config."""
    return retrain(config_path=config_path, as_of=as_of.isoformat(), out_dir=out_dir)


# Threads for the dates prepared at once; `backfill.concurrency` (at most 32) bounds how many are used.
DATE_THREADS: TaskRunner[Any] = ThreadPoolTaskRunner(max_workers=32)


@flow(name="backfill", log_prints=True, task_runner=DATE_THREADS)
def backfill(start: str, end: str, mode: str = "prepare", config: str | None = None) -> BackfillResult:
    """Replay `start`..`end` (YYYY-MM-DD, inclusive) in `prepare` or `retrain` mode (see module doc);
    `config` is the YAML config's path (default configs/local.yaml)."""
    logger = get_run_logger()
    dates = backfill_dates(start, end)
    checked_mode = check_mode(mode)
    settings = load_config(config)
    if settings.execution.engine == "ray":
        # Joined once, before the dates' tasks start (a missing extra or a bad address stops here).
        ray_engine.connect(settings.execution)
    span = f"{dates[0]}..{dates[-1]}"
    parent_tags = {
        "tuneline.backfill": span,
        "tuneline.backfill_mode": checked_mode,
        "tuneline.config_hash": settings.config_hash(),
    }
    # The same backfill run again reuses its parent run, so the dates stay under one parent.
    parent = RunLog.find_or_start(
        settings.tracking, flow="backfill", name=f"backfill {span} ({checked_mode})", tags=parent_tags
    )
    parent.link_flow_run(flow_run.get_id(), flow_run.get_name())
    parent_run_id = parent.run_id
    work_dir = resolve(settings.backfill.work_dir)
    storage = work_dir / "results"  # a local folder: Prefect keeps the cached task results there
    logger.info(
        "backfill %s in %s mode: %d date(s); results under %s", span, checked_mode, len(dates), work_dir
    )

    days = _prepare_dates(settings, dates, work_dir, parent_run_id, storage)
    if checked_mode == "retrain":
        days = _retrain_dates(settings, config, days, work_dir, storage)
    result = BackfillResult(dates[0].isoformat(), dates[-1].isoformat(), checked_mode, parent_run_id, days)
    _record(settings, result)
    if result.incomplete:
        raise BackfillIncomplete(result)
    return result


def _prepare_dates(
    config: Config, dates: list[date], work_dir: Path, parent_run_id: str, storage: Path
) -> list[DayResult]:
    """Every date prepared, at most `backfill.concurrency` at a time; results in date order."""
    logger = get_run_logger()
    cached_task = prepare_date.with_options(result_storage=storage)
    pending = list(dates)
    running: dict[PrefectFuture[DayResult], date] = {}
    done: dict[date, DayResult] = {}
    while pending or running:
        while pending and len(running) < config.backfill.concurrency:
            day = pending.pop(0)
            fingerprint = input_fingerprint(config, day)
            out_dir = str(work_dir / "prepared" / day.isoformat() / fingerprint[:16])
            running[cached_task.submit(config, day, fingerprint, out_dir, parent_run_id)] = day
        finished = next(as_completed(list(running)))
        day = running.pop(finished)
        # A failed task run gives its exception back here instead of raising it.
        outcome = finished.result(raise_on_failure=False)
        if isinstance(outcome, DayResult):
            done[day] = outcome
            logger.info("%s: %s", day, outcome.outcome)
        else:
            done[day] = DayResult(as_of=day.isoformat(), outcome=FAILED, detail=_one_line(outcome))
            logger.error("%s: preparation failed: %s", day, done[day].detail)
    return [done[day] for day in dates]


def retrain_plan(days: Sequence[DayResult]) -> list[bool]:
    """Per date, in order: retrain it? Only prepared dates, and only when the dataset differs from the
    last prepared date's (a date stopped or failed in between does not count as a change)."""
    plan = []
    previous_hash: str | None = None
    for day in days:
        digest = day.dataset_hash if day.outcome == PREPARED else None
        plan.append(digest is not None and digest != previous_hash)
        previous_hash = digest or previous_hash
    return plan


def _retrain_dates(
    config: Config, config_path: str | None, days: list[DayResult], work_dir: Path, storage: Path
) -> list[DayResult]:
    """In date order: retrain the dates `retrain_plan` picks; the other prepared dates are `unchanged`."""
    logger = get_run_logger()
    cached_task = retrain_date.with_options(result_storage=storage)
    retrained: list[DayResult] = []
    for day, to_retrain in zip(days, retrain_plan(days), strict=True):
        digest = day.dataset_hash
        if day.outcome != PREPARED or digest is None:
            retrained.append(day)  # stopped or failed: nothing may be uploaded for this date
            continue
        if not to_retrain:
            logger.info("%s: dataset %s same as the previous date's: not retrained", day.as_of, digest[:12])
            retrained.append(_replace(day, outcome=UNCHANGED))
            continue
        out_dir = str(work_dir / "retrained" / f"{digest[:16]}-{config.config_hash()[:8]}")
        state = cached_task(
            config, config_path, date.fromisoformat(day.as_of), digest, out_dir, return_state=True
        )
        if state.is_completed():
            result: RetrainResult = state.result()
            if day.mlflow_run_id:
                RunLog(config.tracking, result.mlflow_run_id).nest_under(day.mlflow_run_id)
            logger.info("%s: candidate %s", day.as_of, result.candidate_model)
            retrained.append(_replace(day, outcome=RETRAINED, retrain=result))
        else:
            error = state.result(raise_on_failure=False)
            logger.error("%s: retraining failed: %s", day.as_of, _one_line(error))
            retrained.append(_replace(day, outcome=FAILED, detail=_one_line(error)))
    return retrained


def _replace(day: DayResult, **changes: Any) -> DayResult:
    return DayResult(**{**day.__dict__, **changes})


def _one_line(error: Any) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")


def summary_days(config: Config, result: BackfillResult) -> list[BackfillDay]:
    """The rows of the markdown summary, linked to each date's MLflow run."""
    rows = []
    for day in result.days:
        run_id = day.retrain.mlflow_run_id if day.retrain else day.mlflow_run_id
        rows.append(
            BackfillDay(
                as_of=day.as_of,
                outcome=day.outcome + (f": {day.detail}" if day.detail else ""),
                manifest=day.manifest,
                candidate_model=day.retrain.candidate_model if day.retrain else None,
                decision=day.retrain.decision if day.retrain else None,
                mlflow_run_url=tracking.run_url(config.tracking, run_id) if run_id else None,
            )
        )
    return rows


def _csv(rows: list[dict[str, Any]]) -> str:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue()


def _record(config: Config, result: BackfillResult) -> None:
    """The parent MLflow run's table of dates, and the flow run's markdown summary."""
    table = []
    for day in result.days:
        counts = (day.manifest or {}).get("counts") or {}
        table.append(
            {
                "as_of": day.as_of,
                "outcome": day.outcome,
                "detail": day.detail or "",
                "dataset_hash": day.dataset_hash or "",
                "input_records": counts.get("input_records"),
                "kept": counts.get("kept"),
                "quarantined": counts.get("quarantined"),
                **{f"quarantined.{k}": v for k, v in (counts.get("quarantined_by_reason") or {}).items()},
                "train_tokens": ((day.manifest or {}).get("tokens") or {}).get("train_total"),
                "candidate_model": day.retrain.candidate_model if day.retrain else "",
                "promoted": day.retrain.promoted if day.retrain else "",
                "mlflow_run_id": day.mlflow_run_id or "",
            }
        )
    tally: dict[str, int] = {}
    for day in result.days:
        tally[day.outcome] = tally.get(day.outcome, 0) + 1
    parent = RunLog(config.tracking, result.parent_run_id)
    # A CSV (shown as a table in the UI) written whole: a rerun replaces it instead of appending rows.
    parent.log_backfill(_csv(table), tally)
    parent.finish("FAILED" if result.incomplete else "FINISHED")
    markdown = render_backfill_summary(
        result.start,
        result.end,
        result.mode,
        summary_days(config, result),
        mlflow_run_url=tracking.run_url(config.tracking, result.parent_run_id),
        mlflow_hint=None if tracking.has_tracking_server(config.tracking) else "open it with `tuneline ui`",
    )
    create_markdown_artifact(
        markdown, key="backfill-summary", description=f"backfill {result.start}..{result.end}"
    )
