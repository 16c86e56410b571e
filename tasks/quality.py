"""Quality: the data-quality check of a whole batch, after dedupe and before anything is exported.

A Great Expectations suite runs over every record of the batch, kept and quarantined: enough examples
kept, not too much quarantined, unique record ids, every record naming its source and line, every
kept example counted and within the model's training context, one line format, and every quarantine
reason one of the data contract's (tuneline/records.py). Guarantees of `check_quality`:
- it never raises on bad data: it returns a verdict, each expectation's outcome as a person reads it
  (what it guards, what was observed, a few failing records by source and line) and GX's own result;
- it runs in an ephemeral GX context: nothing written to disk, no analytics, no progress bars.

`render_report` turns the verdict into the self-contained report.html of a prepare run.
"""

from __future__ import annotations

import html
import logging
import os
import tempfile
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from tuneline import engines, fork_server, records, text_store
from tuneline.config import ExecutionConfig, ModelConfig, ValidationConfig
from tuneline.tasks.validate import context_limit, exported_kind

SUITE_NAME = "tuneline-data-quality"
# Records from which a batch's check may run beside the flow (QualityCheck): below, the batch rules are
# over too soon for the import beside them to matter.
QUALITY_BESIDE_RECORDS = 100_000

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExpectationOutcome:
    """One expectation of the suite, as a person reads it."""

    expectation: str  # the GX expectation type
    description: str  # what it guards, in words
    success: bool
    observed: str
    unexpected: list[str] = field(default_factory=list)  # a few failing records, "source line N (record_id)"
    error: str | None = None

    def __str__(self) -> str:
        tail = f"; e.g. {', '.join(self.unexpected[:3])}" if self.unexpected else ""
        error = f"; error: {self.error}" if self.error else ""
        return f"{self.description} [{self.expectation}]: observed {self.observed}{tail}{error}"


@dataclass(frozen=True)
class QualityVerdict:
    """The suite's verdict on a batch: success, each expectation's outcome, the batch in figures, and
    GX's own result document (`gx_result`, JSON)."""

    success: bool
    suite: str
    outcomes: list[ExpectationOutcome]
    summary: dict[str, Any]
    gx_result: dict[str, Any]

    @property
    def failures(self) -> list[str]:
        return [str(o) for o in self.outcomes if not o.success]


# The suite's own columns, beside the record frame's (tuneline/records.py) it shares by name.
HAS_EXAMPLE = "has_example"
KEPT = "kept"
QUARANTINED = "quarantined"


def suite_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """The columns the suite looks at: identifiers, kept/quarantined flags, kind, tokens and reason."""
    kept = records.kept_mask(frame).to_numpy()
    if records.N_TOKENS in frame:
        n_tokens = frame[records.N_TOKENS]
    else:
        n_tokens = pd.Series(pd.NA, index=frame.index, dtype="Int64")
    kinds = (
        frame[records.KIND].to_numpy(dtype=object, na_value=None)
        if records.KIND in frame
        else np.full(len(frame), None, dtype=object)
    )
    return pd.DataFrame(
        {
            # The columns themselves (Arrow strings, a categorical), not Python objects: a str of
            # its own each, the ids alone took about 80 bytes a record more while the suite ran.
            records.RECORD_ID: frame[records.RECORD_ID].array,
            records.SOURCE: frame[records.SOURCE].array,
            records.LINE: frame[records.LINE].to_numpy(),
            # The example itself is not the suite's business; whether it is there is.
            HAS_EXAMPLE: pd.Series(text_store.has_example(frame))
            .map({True: True, False: None})
            .to_numpy(dtype=object),
            KEPT: kept.astype(np.int64),
            QUARANTINED: (~kept).astype(np.int64),
            records.KIND: kinds,
            records.N_TOKENS: n_tokens.to_numpy(dtype="float64", na_value=np.nan),
            records.REASON: frame[records.REASON].to_numpy(dtype=object),
        }
    )


def build_suite(model: ModelConfig, validation: ValidationConfig, method: str = "supervised") -> Any:
    """The ExpectationSuite a batch must meet before anything is exported or uploaded."""
    import great_expectations as gx
    import great_expectations.expectations as gxe
    from great_expectations.expectations.row_conditions import Column

    kept = Column(KEPT) == 1
    limit = context_limit(model, validation)
    kind = exported_kind(model.base, method)
    expectations = [
        gxe.ExpectColumnSumToBeBetween(
            column=KEPT,
            min_value=validation.min_examples,
            description=f"at least {validation.min_examples} examples kept (validation.min_examples)",
        ),
        gxe.ExpectColumnMeanToBeBetween(
            column=QUARANTINED,
            min_value=0,
            max_value=validation.max_quarantine_fraction,
            description=(
                f"at most {validation.max_quarantine_fraction:.0%} of the records quarantined "
                "(validation.max_quarantine_fraction)"
            ),
        ),
        gxe.ExpectColumnValuesToBeUnique(column=records.RECORD_ID, description="every record_id is unique"),
        gxe.ExpectColumnValuesToNotBeNull(
            column=records.RECORD_ID, description="every record has a record_id"
        ),
        gxe.ExpectColumnValuesToNotBeNull(column=records.SOURCE, description="every record names its source"),
        gxe.ExpectColumnValuesToNotBeNull(column=records.LINE, description="every record names its line"),
        gxe.ExpectColumnValuesToNotBeNull(
            column=HAS_EXAMPLE, row_condition=kept, description="every kept record has an example"
        ),
        gxe.ExpectColumnValuesToNotBeNull(
            column=records.N_TOKENS, row_condition=kept, description="every kept example has a token count"
        ),
        gxe.ExpectColumnValuesToBeBetween(
            column=records.N_TOKENS,
            min_value=1,
            max_value=limit,
            row_condition=kept,
            description=f"every kept example fits the {limit}-token training context of {model.base}",
        ),
        gxe.ExpectColumnValuesToBeInSet(
            column=records.KIND,
            value_set=[kind],
            row_condition=kept,
            description=f"every kept example is a {kind} line (one format per training file)",
        ),
        gxe.ExpectColumnValuesToBeInSet(
            column=records.REASON,
            value_set=sorted(records.KNOWN_REASONS),
            description="every quarantine reason is one of the data contract's reasons",
        ),
    ]
    return gx.ExpectationSuite(name=SUITE_NAME, expectations=expectations)


def import_in_background() -> threading.Thread:
    """Start importing great_expectations on a daemon thread and return it. The import takes seconds
    (about 3 s of one core on the dev machine) and only check_quality needs it: the prepare flow starts
    it while the batch-wide rules of dedupe run (QualityCheck, where the check runs in the flow's
    process), so that check_quality finds the module loaded.
    Started with the screen instead, it took as long in all (screen, dedupe and quality of 1M
    chats: 50.1 and 51.7 s against 50.6 and 52.2 s). Importing in a thread is safe: Python's import
    lock makes check_quality's own import wait for this one to finish."""
    thread = threading.Thread(
        target=_import_great_expectations, name="import great_expectations", daemon=True
    )
    thread.start()
    return thread


def _import_great_expectations() -> None:
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    try:
        import great_expectations.expectations  # noqa: F401
    except Exception:  # check_quality's own import raises it again, where it is reported
        return


class QualityCheck:
    """Where a batch's check runs. In the flow's process by default: great_expectations imported on a
    thread meanwhile (import_in_background). With `beside`, in a process of the fork server
    (tuneline/fork_server.py), which imports great_expectations as soon as it starts, on the core the
    batch rules leave idle: an import on a thread of the flow's process holds its interpreter lock for
    seconds, which the batch rules' Python work waits for (dedupe of 1M synthetic chats: 12.0-12.3 s
    alone, 13.5-14.1 s beside the import). The suite then runs there on its columns (suite_frame). A
    process that dies, or cannot start, leaves the check to this process (`check`)."""

    @classmethod
    def for_batch(cls, records_in_batch: int, execution: ExecutionConfig) -> QualityCheck:
        """Beside the flow where the engine works there (engines.work_beside_the_flow) and the batch
        has QUALITY_BESIDE_RECORDS; else in the flow's process."""
        beside = engines.work_beside_the_flow(execution) and records_in_batch >= QUALITY_BESIDE_RECORDS
        return cls(beside)

    def __init__(self, beside: bool = False) -> None:
        self.beside = beside
        self._pool: ProcessPoolExecutor | None = None
        if beside:
            # A cold fork server answers once it has imported the block code: started on a thread.
            self._starting = threading.Thread(target=self._start, name="tuneline-quality", daemon=True)
            self._starting.start()
        else:
            self._starting = import_in_background()

    def _start(self) -> None:
        try:
            self._pool = ProcessPoolExecutor(1, mp_context=fork_server.context())
            self._pool.submit(_import_great_expectations)
        except (OSError, BrokenProcessPool) as exc:
            log.warning("quality: its process did not start (%s); checking here", exc)

    def check(
        self,
        frame: pd.DataFrame,
        model: ModelConfig,
        validation: ValidationConfig,
        method: str = "supervised",
    ) -> QualityVerdict:
        """check_quality of `frame`, where this check runs (its process ends with it)."""
        pool = self._taken_process()
        if pool is None:
            return check_quality(frame, model, validation, method)
        try:
            arguments = (
                suite_frame(frame),
                batch_summary(frame, model, validation),
                model,
                validation,
                method,
            )
            with tempfile.TemporaryDirectory(prefix="tuneline-quality-") as directory:
                returned = pool.submit(fork_server.called, directory, suite_verdict, *arguments).result()
                verdict = returned.value()
            log.info("quality: checked in process %d", returned.process)
            return verdict
        except BrokenProcessPool as exc:
            log.warning("quality: its process failed (%s); checking here", exc)
            return check_quality(frame, model, validation, method)
        finally:
            pool.shutdown()

    def close(self) -> None:
        """End the check's process if `check` never ran (a run that failed before it): it holds
        great_expectations, a few hundred MB."""
        if not self.beside:
            return  # nothing but an import on a thread of this process
        pool = self._taken_process()
        if pool is not None:
            pool.shutdown()

    def _taken_process(self) -> ProcessPoolExecutor | None:
        """The check's process once started, for the one caller that ends it (`check` or `close`);
        None where the check runs here, its process did not start, or it was taken already."""
        self._starting.join()
        pool, self._pool = self._pool, None
        return pool


def check_quality(
    frame: pd.DataFrame, model: ModelConfig, validation: ValidationConfig, method: str = "supervised"
) -> QualityVerdict:
    """Run the suite over the batch (kept and quarantined rows) in an ephemeral GX context; kept rows
    must all be lines of the `method`'s format (chat, preference or reinforcement)."""
    return suite_verdict(
        suite_frame(frame), batch_summary(frame, model, validation), model, validation, method
    )


def suite_verdict(
    batch: pd.DataFrame,
    summary: dict[str, Any],
    model: ModelConfig,
    validation: ValidationConfig,
    method: str = "supervised",
) -> QualityVerdict:
    """check_quality of the batch whose suite_frame and batch_summary these are: a function of them
    alone, which QualityCheck's process runs as it is."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    # Imported here: great_expectations takes seconds to import, and only this stage needs it.
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )
    from great_expectations.execution_engine import pandas_execution_engine

    # GX fingerprints every pandas batch under HASH_THRESHOLD bytes (an md5 of pandas'
    # hash_pandas_object over each column and the index), which only its batch markers record and
    # nothing here reads; it was the suite's peak (measured at two million records: 0.44 GB of
    # temporaries on top of the suite's frame). Its only switch is that module constant.
    pandas_execution_engine.HASH_THRESHOLD = 0
    # In memory only: no docs site on disk, no analytics, no progress bars on the terminal.
    project = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
        analytics_enabled=False,
        progress_bars=ProgressBarsConfig(globally=False),
    )
    context = gx.get_context(mode="ephemeral", project_config=project)
    definition = (
        context.data_sources.add_pandas("records")
        .add_dataframe_asset("batch")
        .add_batch_definition_whole_dataframe("whole batch")
    )
    suite = context.suites.add(build_suite(model, validation, method))
    validation_definition = gx.ValidationDefinition(data=definition, suite=suite, name="data quality")
    result = validation_definition.run(batch_parameters={"dataframe": batch})
    outcomes = [_outcome(r, batch) for r in result.results]
    return QualityVerdict(
        success=bool(result.success) and all(o.success for o in outcomes),
        suite=suite.name,
        outcomes=outcomes,
        summary=summary,
        gx_result=result.to_json_dict(),
    )


def _outcome(result: Any, batch: pd.DataFrame) -> ExpectationOutcome:
    config = result.expectation_config
    details = result.result or {}
    description = config.description or config.type
    error = None
    if result.exception_info and result.exception_info.get("raised_exception"):
        error = str(result.exception_info.get("exception_message"))
    if "observed_value" in details:
        observed = _plain(details["observed_value"])
    elif "unexpected_count" in details:
        observed = (
            f"{details['unexpected_count']} of {details.get('element_count', len(batch))} records break it"
        )
    else:
        observed = "no value (the batch is empty)" if batch.empty else "no value"
    unexpected = []
    column = config.kwargs.get("column")
    for index in (details.get("partial_unexpected_index_list") or [])[:10]:
        if isinstance(index, int | np.integer) and index in batch.index:
            row = batch.loc[index]
            value = f": {column} = {_plain(row[column])}" if column in batch.columns else ""
            unexpected.append(
                f"{row[records.SOURCE]} line {row[records.LINE]} ({row[records.RECORD_ID]}){value}"
            )
    if not unexpected and details.get("partial_unexpected_list"):
        unexpected = [_plain(v) for v in details["partial_unexpected_list"][:10]]
    return ExpectationOutcome(config.type, description, bool(result.success), observed, unexpected, error)


def _plain(value: Any) -> str:
    if isinstance(value, float | np.floating):
        return f"{float(value):.4g}"
    if isinstance(value, np.integer):
        return str(int(value))
    return str(value)


def batch_summary(frame: pd.DataFrame, model: ModelConfig, validation: ValidationConfig) -> dict[str, Any]:
    """The batch in figures (counts by reason, tokens of kept examples), for the report."""
    kept = records.kept_mask(frame)
    counts = records.counts_by_reason(frame)
    kept_tokens = (
        frame.loc[kept, records.N_TOKENS].dropna().astype("int64")
        if records.N_TOKENS in frame
        else pd.Series([], dtype="int64")
    )
    return {
        "model": model.base,
        "context_limit": context_limit(model, validation),
        "input_records": len(frame),
        "kept": int(kept.sum()),
        "quarantined": int((~kept).sum()),
        "quarantined_by_reason": counts,
        "kept_tokens_total": int(kept_tokens.sum()),
        "kept_tokens_max": int(kept_tokens.max()) if len(kept_tokens) else 0,
        "truncated": int(frame[records.TRUNCATED].sum()) if records.TRUNCATED in frame else 0,
    }


def render_report(result: QualityVerdict, title: str = "tuneline prepare: data-quality report") -> str:
    """A self-contained HTML page: the verdict, the batch in figures, and each expectation with its
    pass/fail and observed value (rendered from the GX result)."""
    e = html.escape
    verdict = "PASSED" if result.success else "FAILED"
    colour = "#1a7f37" if result.success else "#cf222e"
    summary = result.summary
    rows = [
        f"<tr><th>{e(str(k).replace('_', ' '))}</th><td>{e(_plain(v))}</td></tr>"
        for k, v in summary.items()
        if not isinstance(v, dict)
    ]
    reasons = summary.get("quarantined_by_reason") or {}
    reason_rows = (
        "".join(
            f"<tr><td><code>{e(reason)}</code></td><td class=num>{count}</td></tr>"
            for reason, count in sorted(reasons.items(), key=lambda item: (-item[1], item[0]))
        )
        or "<tr><td colspan=2>nothing quarantined</td></tr>"
    )
    expectation_rows = []
    for outcome in result.outcomes:
        status = "pass" if outcome.success else "FAIL"
        examples = "".join(f"<li>{e(u)}</li>" for u in outcome.unexpected)
        error = f"<div class=error>{e(outcome.error)}</div>" if outcome.error else ""
        expectation_rows.append(
            f"<tr class={status.lower()}><td class=status>{status}</td><td>{e(outcome.description)}"
            f"<div class=type>{e(outcome.expectation)}</div></td><td>{e(outcome.observed)}"
            f"{f'<ul>{examples}</ul>' if examples else ''}{error}</td></tr>"
        )
    statistics = result.gx_result.get("statistics") or {}
    stats = ", ".join(f"{e(str(k).replace('_', ' '))}: {e(_plain(v))}" for k, v in statistics.items())
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2rem; color: #1f2328; }}
table {{ border-collapse: collapse; margin: 1rem 0; }}
th, td {{ border: 1px solid #d0d7de; padding: .35rem .6rem; text-align: left; vertical-align: top; }}
th {{ background: #f6f8fa; }}
.num {{ text-align: right; }}
.verdict {{ color: {colour}; }}
tr.fail td {{ background: #ffebe9; }}
td.status {{ font-weight: bold; }}
tr.fail td.status {{ color: #cf222e; }}
tr.pass td.status {{ color: #1a7f37; }}
.type {{ color: #57606a; font-size: .85em; font-family: monospace; }}
.error {{ color: #cf222e; }}
</style></head><body>
<h1>{e(title)}</h1>
<h2 class="verdict">Data quality {verdict}</h2>
<p>Suite <code>{e(result.suite)}</code> (Great Expectations). {stats}</p>
<h2>Batch</h2>
<table>{"".join(rows)}</table>
<h2>Quarantined by reason</h2>
<table><tr><th>reason</th><th>records</th></tr>{reason_rows}</table>
<h2>Expectations</h2>
<table><tr><th>result</th><th>expectation</th><th>observed</th></tr>{"".join(expectation_rows)}</table>
</body></html>
"""


def failure_summary(result: QualityVerdict) -> str:
    """One line per failed expectation, for the command line."""
    return "\n".join(f"- {failure}" for failure in result.failures)


@task(name="quality", cache_policy=NO_CACHE, persist_result=False)
def quality_task(
    frame: pd.DataFrame,
    model: ModelConfig,
    validation: ValidationConfig,
    method: str = "supervised",
    where: QualityCheck | None = None,
) -> QualityVerdict:
    """Prefect wrapper of check_quality (run `where` says: QualityCheck)."""
    if where is None:
        return check_quality(frame, model, validation, method)
    return where.check(frame, model, validation, method)
