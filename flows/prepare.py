"""The `prepare` flow: raw partitions -> ingest -> validate -> dedupe -> gate -> export, logged to MLflow.

`prepare` is the Prefect flow behind `tuneline prepare`; `prepare_dataset` is the same work as a plain
function, so a parent flow (retrain, backfill) runs the stages as tasks of its own flow run and can log
into its own MLflow run. Either way:
- DIR/quarantine.jsonl, DIR/manifest.json and DIR/report.html are always written;
- DIR/train.jsonl and DIR/validation.jsonl only when the gate passes and the cost estimate is within
  cost.max_estimated_cost_usd, else `PrepareFailed` says which expectation or cap stopped the run, so
  nothing can be uploaded;
- one MLflow run holds the params (config hash, as_of, sources), the dataset input (digest = dataset
  hash, cut to MLflow's 36 characters), the counts as metrics and the three files as artifacts, tagged
  with the Prefect flow run.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import orjson
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.exceptions import MissingContextError
from prefect.runtime import flow_run

from tasks import export, ingest, validate
from tasks.dedupe import dedupe_task
from tuneline import tracking
from tuneline.config import Config, ConfigError, Source, load_config
from tuneline.paths import is_url, resolve
from tuneline.reporting import RunSummary, render_run_summary

# MLflow keeps param values up to this many characters.
_PARAM_LIMIT = 6000


class InputNotFound(ValueError):
    """An --input names no file: bad usage, not bad data."""


@dataclass(frozen=True)
class PrepareResult:
    """What a prepare run produced. `published` is False when the gate or the cost cap stopped it."""

    out_dir: Path
    published: bool
    problems: list[str]
    manifest: dict[str, Any]
    mlflow_run_id: str | None

    @property
    def dataset_hash(self) -> str:
        return str(self.manifest["dataset_hash"])

    @property
    def train_file(self) -> Path:
        return self.out_dir / export.TRAIN_FILE

    @property
    def validation_file(self) -> Path:
        return self.out_dir / export.VALIDATION_FILE

    @property
    def quarantine_file(self) -> Path:
        return self.out_dir / export.QUARANTINE_FILE

    @property
    def manifest_file(self) -> Path:
        return self.out_dir / export.MANIFEST_FILE

    @property
    def report_file(self) -> Path:
        return self.out_dir / export.REPORT_FILE


class PrepareFailed(RuntimeError):
    """The gate failed or the cost estimate is over the cap; `result` holds what was written."""

    def __init__(self, result: PrepareResult) -> None:
        self.result = result
        super().__init__(
            "prepare stopped before anything could be uploaded:\n"
            + "\n".join(f"- {p}" for p in result.problems)
        )


def input_sources(inputs: Sequence[str]) -> list[Source]:
    """`--input` paths, globs or URLs as sources (they replace the configured ones)."""
    return [Source(name=f"input-{index}", uri=uri) for index, uri in enumerate(inputs, start=1)]


def prepare_dataset(
    config: Config,
    *,
    out_dir: str | Path,
    as_of: date | None = None,
    inputs: Sequence[str] | None = None,
    mlflow_run_id: str | None = None,
) -> PrepareResult:
    """Run the data plane inside the calling flow. Logs into `mlflow_run_id` when given (the caller
    closes it), else into a run of its own. Raises InputNotFound, ConfigError (missing eval set or
    general corpus); returns the result whether or not it was published."""
    logger = _logger()
    day = as_of or config.data.as_of or date.today()
    out = Path(out_dir).expanduser().resolve()
    sources = input_sources(inputs) if inputs else list(config.data.sources)
    selection = ingest.select_files(sources, day, config.data.lookback_days)
    start, end = ingest.window(day, config.data.lookback_days)
    if inputs:
        read = {f.source_name for f in selection.files}
        for source in sources:
            if source.name in selection.empty_sources:
                raise InputNotFound(f"--input {source.uri}: no such file, or nothing matches it")
            if source.name not in read:
                raise InputNotFound(
                    f"--input {source.uri}: every file it names is outside the date window ({start}, {end}] "
                    "or of an unknown format (pass --as-of YYYY-MM-DD, or name a file exactly)"
                )
    for name in selection.empty_sources:
        logger.warning("source %s names no file (check data.sources[].uri)", name)
    if selection.unknown_format:
        logger.warning(
            "skipped %d file(s) of unknown format, e.g. %s",
            len(selection.unknown_format),
            selection.unknown_format[0],
        )
    logger.info(
        "reading %d file(s) from %d partition(s) in (%s, %s]; %d file(s) outside the window",
        len(selection.files),
        len(selection.partitions),
        start,
        end,
        selection.outside_window,
    )
    eval_examples = _eval_examples(config)
    general = _general_examples(config)

    fallbacks = [s.csv_mapping for s in config.data.sources if s.csv_mapping is not None]
    frame = ingest.ingest_task(selection.files, config.model.system_prompt, fallbacks)
    frame = validate.validate_task(frame, config.model, config.validation)
    frame = dedupe_task(frame, eval_examples, config.dedupe)
    gate = validate.gate(frame, config.model, config.validation)
    if gate.success:
        logger.info("gate passed: %d expectations", len(gate.outcomes))
    else:
        logger.warning("gate failed:\n%s", validate.failure_summary(gate))
    context = export.RunContext(
        as_of=day.isoformat(),
        config_hash=config.config_hash(),
        sources=selection.describe_sources(sources),
        partitions=selection.partitions,
        window={"after": start.isoformat(), "through": end.isoformat()},
    )
    outcome = export.export_task(
        frame, config, context, out, gate.failures, validate.render_report(gate), general
    )
    run_id = _log_to_mlflow(config, outcome, context, mlflow_run_id)
    result = PrepareResult(out, outcome.published, outcome.problems, outcome.manifest, run_id)
    _publish_summary(config, result, day)
    return result


def _logger() -> logging.Logger | logging.LoggerAdapter[logging.Logger]:
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("tuneline.prepare")


def _jsonl_examples(uri: str) -> tuple[list[Any], int]:
    """The parsed lines of a JSONL file (fsspec URL or project path), and how many were unreadable."""
    path = uri if is_url(uri) else str(resolve(uri))
    file = ingest.InputFile("config", path, uri, "", "jsonl", None)
    frame = ingest.read_files([file], None)
    kept = frame["reason"].isna()
    return frame.loc[kept, "example"].tolist(), int((~kept).sum())


def _exists(uri: str) -> bool:
    return bool(ingest.select_files([Source(name="check", uri=uri)], date.today(), 1).files)


def _eval_examples(config: Config) -> list[dict[str, Any]]:
    """The eval set, which the leakage rule keeps out of training."""
    uri = config.data.eval_set
    if not _exists(uri):
        raise ConfigError(
            f"data.eval_set: {uri} not found (the leakage check needs the eval set; fix the path)"
        )
    examples, unreadable = _jsonl_examples(uri)
    if unreadable:
        _logger().warning(
            "%d unreadable line(s) in the eval set %s are not checked for leakage", unreadable, uri
        )
    return [e for e in examples if isinstance(e, dict)]


def _general_examples(config: Config) -> export.GeneralExamples | None:
    """The general corpus through the same rules as task data, when some of it is mixed in."""
    if config.export.general_mix_fraction <= 0:
        return None
    uri = config.data.general_corpus
    if not _exists(uri):
        raise ConfigError(
            f"data.general_corpus: {uri} not found (fix the path, or set export.general_mix_fraction: 0)"
        )
    path = uri if is_url(uri) else str(resolve(uri))
    frame = ingest.read_files(
        [ingest.InputFile("general", path, uri, "", "jsonl", None)], config.model.system_prompt
    )
    frame = validate.validate(frame, config.model, config.validation)
    kept = frame["reason"].isna()
    if (~kept).any():
        _logger().warning(
            "%d line(s) of the general corpus break a rule and are never mixed in", int((~kept).sum())
        )
    return export.GeneralExamples(
        source=uri,
        examples=frame.loc[kept, "example"].tolist(),
        n_tokens=[int(n) for n in frame.loc[kept, validate.N_TOKENS]],
        n_assistant_tokens=[int(n) for n in frame.loc[kept, validate.N_ASSISTANT_TOKENS]],
        rejected=int((~kept).sum()),
    )


def _param(value: str) -> str:
    return value if len(value) <= _PARAM_LIMIT else value[: _PARAM_LIMIT - 20] + f"... ({len(value)} chars)"


def _numbers(prefix: str, values: dict[str, Any]) -> dict[str, float]:
    flat: dict[str, float] = {}
    for key, value in values.items():
        name = f"{prefix}.{key}"
        if isinstance(value, dict):
            flat.update(_numbers(name, value))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            flat[name] = float(value)
    return flat


def _log_to_mlflow(
    config: Config, outcome: export.ExportOutcome, context: export.RunContext, run_id: str | None
) -> str:
    manifest = outcome.manifest
    flow_run_id, flow_run_name = flow_run.get_id(), flow_run.get_name()
    own_run = run_id is None
    tags = {"tuneline.flow": "prepare", "tuneline.as_of": context.as_of}
    if own_run:
        run_id = tracking.start_run(config.tracking, run_name=f"prepare {context.as_of}", tags=tags)
    assert run_id is not None
    try:
        sources = ", ".join(f"{s['name']}={s['uri']}" for s in context.sources)
        tracking.log_run_params(
            config.tracking,
            run_id,
            {
                "config_hash": context.config_hash,
                "as_of": context.as_of,
                "sources": _param(sources),
                "partitions": _param(", ".join(context.partitions)),
                "model": config.model.base,
                "data.lookback_days": config.data.lookback_days,
                "validation.too_long": config.validation.too_long,
                "export.validation_fraction": config.export.validation_fraction,
                "export.general_mix_fraction": config.export.general_mix_fraction,
                **{f"dedupe.{k}": v for k, v in config.dedupe.model_dump(mode="json").items()},
            },
        )
        metrics = {
            **_numbers("counts", manifest["counts"]),
            **_numbers("tokens", manifest["tokens"]),
            **_numbers("cost", {k: v for k, v in manifest["cost"].items() if k != "within_cap"}),
        }
        tracking.log_run_metrics(config.tracking, run_id, metrics)
        if outcome.published:
            tracking.log_run_dataset(
                config.tracking,
                run_id,
                name=f"{config.project}-prepared",
                dataset_hash=manifest["dataset_hash"],
                source=str(outcome.out_dir / export.TRAIN_FILE),
                context="training",
                profile=manifest["counts"],
            )
        for name in (export.MANIFEST_FILE, export.QUARANTINE_FILE, export.REPORT_FILE):
            tracking.log_run_artifact(
                config.tracking, run_id, (outcome.out_dir / name).read_bytes(), f"prepare/{name}"
            )
        tracking.set_run_tags(
            config.tracking,
            run_id,
            {
                **tags,
                "tuneline.dataset_hash": manifest["dataset_hash"],
                "tuneline.prepare": "published" if outcome.published else "stopped",
            },
        )
        if flow_run_id:
            tracking.tag_flow_run(config.tracking, run_id, flow_run_id, flow_run_name or "")
    finally:
        if own_run:
            tracking.finish_run(config.tracking, run_id, status="FINISHED" if outcome.published else "FAILED")
    return run_id


def _publish_summary(config: Config, result: PrepareResult, day: date) -> None:
    """A markdown artifact on the Prefect flow run: what a person reads first."""
    if not flow_run.get_id():
        return
    url = tracking.run_url(config.tracking, result.mlflow_run_id) if result.mlflow_run_id else None
    summary = RunSummary(
        flow="prepare",
        as_of=day.isoformat(),
        flow_run_name=flow_run.get_name(),
        outcome="published" if result.published else "stopped: " + "; ".join(result.problems),
        manifest=result.manifest,
        mlflow_run_url=url,
        mlflow_hint=None if tracking.has_tracking_server(config.tracking) else "open it with `tuneline ui`",
    )
    create_markdown_artifact(
        render_run_summary(summary), key="prepare-summary", description="prepare: counts, tokens, cost"
    )


@flow(name="prepare", log_prints=True, validate_parameters=True)
def prepare(
    config_path: str | None = None,
    as_of: date | None = None,
    inputs: list[str] | None = None,
    out_dir: str = "out/prepare",
) -> PrepareResult:
    """`tuneline prepare` as a flow: read the config, run the data plane, fail when nothing may be uploaded."""
    config = load_config(config_path)
    result = prepare_dataset(config, out_dir=out_dir, as_of=as_of, inputs=inputs)
    if not result.published:
        raise PrepareFailed(result)
    return result


def manifest_of(out_dir: str | Path) -> dict[str, Any]:
    """The manifest a prepare run wrote."""
    return dict(orjson.loads((Path(out_dir) / export.MANIFEST_FILE).read_bytes()))
