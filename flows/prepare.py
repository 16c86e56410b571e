"""The `prepare` flow: raw partitions -> ingest -> validate -> dedupe -> quality -> export, logged to MLflow.

`prepare` is the Prefect flow behind `tuneline prepare`; `prepare_dataset` is the same work as a plain
function, so a parent flow (retrain, backfill) runs the stages as tasks of its own flow run and can log
into its own MLflow run. Either way:
- DIR/quarantine.jsonl, DIR/manifest.json and DIR/report.html are always written;
- DIR/train.jsonl and DIR/validation.jsonl only when the data-quality check passes and the cost
  estimate is within cost.max_estimated_cost_usd, else `PrepareFailed` says which expectation or cap
  stopped the run, so nothing can be uploaded;
- the eval set (kept out of training by the leakage rule) and the general corpus are read from any
  path or fsspec URL, as evaluation reads them (tuneline/jsonl.py);
- ingest, validate and the per-record rules of dedupe (credentials, PII, eval leakage) run a block of
  input at a time (tuneline/engines/): in worker processes on this machine's cores
  (`execution.engine: local`, the default), or as Ray tasks, with the near-duplicate candidate search
  as map -> shuffle -> reduce Ray tasks (`ray`), with the same result; the batch-wide rules (exact and
  near duplicates, contradictions) then run on the whole batch, while each record's raw text and
  training line wait in a temporary file on the flow's disk until export reads them back
  (tuneline/text_store.py: half of what the flow held, and nothing the batch-wide rules compare);
- where the flow may use more than one core (execution.flow_threads, the local engine's default) and
  the batch is large (quality.QUALITY_BESIDE_RECORDS), the data-quality check runs in a process of its
  own (great_expectations imported there during the batch rules) while export builds the dataset,
  which is published or not once its verdict is in (tasks/quality.py's QualityCheck);
- one MLflow run holds the params (config hash, as_of, sources), the dataset input (digest = dataset
  hash, cut to MLflow's 36 characters), the counts as metrics and the three files as artifacts, tagged
  with the Prefect flow run (tuneline/tracking.py's RunLog.log_prepared).
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
from prefect.futures import PrefectFuture
from prefect.runtime import flow_run

from tuneline import engines, heap, jsonl, records, tracking
from tuneline.config import Config, ConfigError, Source, load_config
from tuneline.engines import ray_engine
from tuneline.reporting import RunSummary, render_run_summary
from tuneline.tasks import dedupe, export, ingest, quality, validate
from tuneline.tracking import RunLog


class InputNotFound(ValueError):
    """An --input names no file: bad usage, not bad data."""


@dataclass(frozen=True)
class PrepareResult:
    """What a prepare run produced. `published` is False when the data-quality check or the cost cap
    stopped it."""

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
    """The data-quality check failed or the cost estimate is over the cap; `result` holds what was
    written."""

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
    run: RunLog | None = None,
) -> PrepareResult:
    """Run the data plane inside the calling flow. Logs into `run` when given (the caller closes it),
    else into a run of its own. Raises InputNotFound, ConfigError (missing eval set or general
    corpus); returns the result whether or not it was published."""
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

    method = config.training.method
    if config.execution.engine == "ray":
        logger.info("execution engine: ray (%s)", config.execution.address or "a local Ray started on demand")
    # Ingest, validate and the per-record rules of dedupe, block by block, on the engine's cores
    # (tuneline/engines/); then the batch-wide rules on the whole frame.
    screened = engines.screen_task(selection.files, config, eval_examples)
    # With ray, the near-duplicate candidates by map (band keys of the blocks' signatures) -> shuffle ->
    # reduce on Ray.
    search = ray_engine.RayCandidates(config.execution) if config.execution.engine == "ray" else None
    # great_expectations imported while the batch rules run: in a process beside the flow where it
    # has the cores for it, else on a thread of the flow's (QualityCheck.for_batch).
    checking = quality.QualityCheck.for_batch(len(screened.frame), config.execution)
    # The raw texts and training lines wait on disk (tuneline/text_store.py) until export reads them,
    # beside the normalised texts that the batch rules read back for the records they compare.
    texts = screened.texts
    try:
        frame = dedupe.batch_rules_task(
            screened.frame, screened.documents, config.dedupe, search, engines.flow_threads(config.execution)
        )
        # The records' normalised parts and fingerprints (about 100 bytes a record, their signatures
        # on disk) end with the batch rules: quality looks at the frame only, export at the frame and
        # its texts.
        del screened
        heap.release_free_memory()
        # Beside the flow, the check runs in its process while export builds the dataset, and export
        # waits for it only then. Else it runs first, on this thread: one thing at a time holds less,
        # and a thread of its own would keep the suite's memory in a glibc arena of its own.
        checked: PrefectFuture[quality.QualityVerdict] | quality.QualityVerdict = (
            quality.quality_task.submit(frame, config.model, config.validation, method, checking)
            if checking.beside
            else quality.quality_task(frame, config.model, config.validation, method, checking)
        )

        def judged() -> tuple[list[str], str]:
            verdict = checked if isinstance(checked, quality.QualityVerdict) else checked.result()
            if verdict.success:
                logger.info("data quality passed: %d expectations", len(verdict.outcomes))
            else:
                logger.warning("data quality failed:\n%s", quality.failure_summary(verdict))
            return verdict.failures, quality.render_report(verdict)

        context = export.RunContext(
            as_of=day.isoformat(),
            config_hash=config.config_hash(),
            sources=selection.describe_sources(sources),
            partitions=selection.partitions,
            window={"after": start.isoformat(), "through": end.isoformat()},
        )
        outcome = export.export_task(frame, config, context, out, judged, general, texts)
    finally:
        checking.close()
        texts.close()
    run_id = _log_to_mlflow(config, outcome, run)
    result = PrepareResult(out, outcome.published, outcome.problems, outcome.manifest, run_id)
    _publish_summary(config, result, day)
    return result


def _logger() -> logging.Logger | logging.LoggerAdapter[logging.Logger]:
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("tuneline.prepare")


def _eval_examples(config: Config) -> list[dict[str, Any]]:
    """The eval set, which the leakage rule keeps out of training."""
    uri = config.data.eval_set
    if not jsonl.exists(uri):
        raise ConfigError(
            f"data.eval_set: {uri} not found (the leakage check needs the eval set; fix the path)"
        )
    found = jsonl.read_set(uri)
    if found.problems:
        _logger().warning(
            "%d unreadable line(s) in the eval set %s are not checked for leakage", len(found.problems), uri
        )
    return [e for e in found.values if isinstance(e, dict)]


def _general_examples(config: Config) -> export.GeneralExamples | None:
    """The general corpus through the same format, length and credential rules as task data, when some
    of it is mixed in (it is not deduplicated: it holds each fact in several phrasings on purpose)."""
    if config.export.general_mix_fraction <= 0:
        return None
    uri = config.data.general_corpus
    if not jsonl.exists(uri):
        raise ConfigError(
            f"data.general_corpus: {uri} not found (fix the path, or set export.general_mix_fraction: 0)"
        )
    frame = ingest.read_files([ingest.jsonl_file(uri, "general")], config.model.system_prompt)
    frame = validate.validate(frame, config.model, config.validation)
    # Mixed into the training file and uploaded: no credential may ride along (nor PII, by policy).
    frame = dedupe.credentials_and_pii(frame, config.dedupe)
    kept = records.kept_mask(frame)
    if (~kept).any():
        _logger().warning(
            "%d line(s) of the general corpus break a rule and are never mixed in", int((~kept).sum())
        )
    return export.GeneralExamples(
        source=uri,
        examples=frame.loc[kept, records.EXAMPLE].tolist(),
        n_tokens=[int(n) for n in frame.loc[kept, records.N_TOKENS]],
        n_assistant_tokens=[int(n) for n in frame.loc[kept, records.N_ASSISTANT_TOKENS]],
        rejected=int((~kept).sum()),
    )


def _log_to_mlflow(config: Config, outcome: export.ExportOutcome, run: RunLog | None) -> str:
    own_run = run is None
    manifest = outcome.manifest
    if run is None:
        run = RunLog.start(config.tracking, flow="prepare", name=f"prepare {manifest['as_of']}")
        run.link_flow_run(flow_run.get_id(), flow_run.get_name())
    try:
        files = {
            name: (outcome.out_dir / name).read_bytes()
            for name in (export.MANIFEST_FILE, export.QUARANTINE_FILE, export.REPORT_FILE)
        }
        run.log_prepared(config, manifest, files, train_file=str(outcome.out_dir / export.TRAIN_FILE))
    except BaseException as exc:
        if own_run:
            run.fail(exc)
        raise
    if own_run:
        run.finish("FINISHED" if outcome.published else "FAILED")
    return run.run_id


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
