"""Validate: format rules and exact token counts become columns; a Great Expectations suite gates the batch.

Guarantees of `validate`:
- every still-kept row is checked against tuneline/formats.py; a row that breaks a rule is quarantined
  with the rule's error key, and `detail` says what broke and what the rule asks for;
- legacy prompt/completion rows become chat (with config.model.system_prompt) for chat models and stay
  as they are for babbage-002/davinci-002, so `example` holds the line exactly as it will be exported;
- columns `kind`, `n_tokens`, `n_assistant_tokens` (exact, tuneline/tokens.py; null on rows that were
  never countable), `truncated` and `truncation`;
- an example over the model's training context is quarantined `too_long`, or cut to fit when
  validation.too_long is `truncate` (trailing turns dropped first, then the assistant turn shortened).

`gate` runs an ExpectationSuite over the whole batch and says which expectation failed;
`render_report` turns its result into a self-contained HTML page.
"""

from __future__ import annotations

import html
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import tiktoken
from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.dedupe import REASONS as DEDUPE_REASONS
from tasks.ingest import REASONS as INGEST_REASONS
from tuneline import formats, records, tokens
from tuneline.config import ModelConfig, ValidationConfig

TOO_LONG = "too_long"
# Every reason of the data contract, so the gate can tell a known reason from a stray one.
KNOWN_REASONS = frozenset((*INGEST_REASONS, *formats.RULES, TOO_LONG, *DEDUPE_REASONS))
COMPLETION_MODELS = ("babbage-002", "davinci-002")

KIND = "kind"
N_TOKENS = "n_tokens"
N_ASSISTANT_TOKENS = "n_assistant_tokens"
TRUNCATED = "truncated"
TRUNCATION = "truncation"

# Examples per tiktoken batch: bounds the memory of the token lists tiktoken returns.
TOKEN_BATCH = 20_000


def is_completion_model(model: str) -> bool:
    """babbage-002 and davinci-002 train on prompt/completion lines; every other model on chat lines."""
    base = model.removeprefix("ft:").split(":")[0]
    return base.startswith(COMPLETION_MODELS)


def allowed_kinds(model: str) -> tuple[formats.ExampleKind, ...]:
    """Line formats accepted in a batch for this model (completion lines are converted for chat models)."""
    return ("completion",) if is_completion_model(model) else ("chat", "completion")


def exported_kind(model: str) -> formats.ExampleKind:
    return "completion" if is_completion_model(model) else "chat"


def encoding_for(model: ModelConfig) -> tiktoken.Encoding:
    return tokens.get_encoding(tokens.encoding_name_for_model(model.base, model.tokenizer))


def context_limit(model: ModelConfig, validation: ValidationConfig) -> int:
    return tokens.context_limit(model.base, validation.context_limits, validation.default_context_limit)


def validate(frame: pd.DataFrame, model: ModelConfig, validation: ValidationConfig) -> pd.DataFrame:
    """The frame with format rules applied, legacy lines converted, and token columns added."""
    frame = frame.copy()
    n = len(frame)
    examples = frame[records.EXAMPLE].to_numpy(dtype=object, copy=True)
    kinds = np.full(n, None, dtype=object)
    completion_model = is_completion_model(model.base)
    allowed = allowed_kinds(model.base)
    issues: dict[str, tuple[list[int], list[str]]] = {}
    for position in np.flatnonzero(records.kept_mask(frame).to_numpy()):
        example = examples[position]
        kind = formats.detect_kind(example)
        kinds[position] = kind
        issue = formats.check_example(example, allowed)
        if issue is not None:
            rows, details = issues.setdefault(issue.key, ([], []))
            rows.append(int(position))
            details.append(f"{issue.message}: {formats.RULES[issue.key]}")
        elif kind == "completion" and not completion_model:
            examples[position] = formats.completion_to_chat(example, model.system_prompt)
            kinds[position] = "chat"
    frame[records.EXAMPLE] = pd.Series(examples, index=frame.index, dtype=object)
    frame[KIND] = pd.Series(kinds, index=frame.index, dtype=object)
    for key, (rows, details) in issues.items():
        mask = np.zeros(n, dtype=bool)
        mask[rows] = True
        aligned = np.full(n, None, dtype=object)  # quarantine() takes details aligned with the frame
        aligned[rows] = details
        records.quarantine(frame, mask, key, list(aligned))

    encoding = encoding_for(model)
    limit = context_limit(model, validation)
    counted = np.flatnonzero(records.kept_mask(frame).to_numpy())
    n_tokens = np.zeros(n, dtype=np.int64)
    n_assistant = np.zeros(n, dtype=np.int64)
    for start in range(0, len(counted), TOKEN_BATCH):
        chunk = counted[start : start + TOKEN_BATCH]
        batch = [examples[i] for i in chunk]
        known: dict[str, int] = {}  # texts of this batch already counted: the assistant turns among them
        n_tokens[chunk] = tokens.count_tokens(batch, encoding, known)
        n_assistant[chunk] = tokens.count_assistant_tokens(batch, encoding, known)

    truncated = np.zeros(n, dtype=bool)
    truncation = np.full(n, None, dtype=object)
    too_long: list[int] = []
    too_long_details: list[str] = []
    for position in counted[n_tokens[counted] > limit]:
        before = int(n_tokens[position])
        shortened, how = (
            (None, "")
            if validation.too_long == "quarantine"
            else _truncate(examples[position], limit, encoding)
        )
        if shortened is None:
            too_long.append(position)
            fix = (
                "shorten it"
                if validation.too_long == "truncate"
                else "shorten it, or set validation.too_long: truncate"
            )
            why = f"; it cannot be truncated: {how}" if how else ""
            too_long_details.append(
                f"{before} tokens, over the {limit}-token training context of {model.base}{why} ({fix})"
            )
            continue
        examples[position] = shortened
        n_tokens[position] = tokens.count_tokens([shortened], encoding)[0]
        n_assistant[position] = tokens.count_assistant_tokens([shortened], encoding)[0]
        truncated[position] = True
        truncation[position] = f"{how} ({before} -> {n_tokens[position]} tokens, limit {limit})"
    frame[records.EXAMPLE] = pd.Series(examples, index=frame.index, dtype=object)
    has_counts = np.zeros(n, dtype=bool)
    has_counts[counted] = True
    frame[N_TOKENS] = pd.arrays.IntegerArray(n_tokens, ~has_counts)
    frame[N_ASSISTANT_TOKENS] = pd.arrays.IntegerArray(n_assistant, ~has_counts)
    frame[TRUNCATED] = truncated
    frame[TRUNCATION] = pd.Series(truncation, index=frame.index, dtype=object)
    if too_long:
        mask = np.zeros(n, dtype=bool)
        mask[too_long] = True
        aligned = np.full(n, None, dtype=object)
        aligned[too_long] = too_long_details
        records.quarantine(frame, mask, TOO_LONG, list(aligned))
    return frame


def _truncate(
    example: dict[str, Any], limit: int, encoding: tiktoken.Encoding
) -> tuple[dict[str, Any] | None, str]:
    """The example cut to `limit` tokens and how, or None and why it cannot be cut."""

    def fits(candidate: dict[str, Any]) -> bool:
        return tokens.count_tokens([candidate], encoding)[0] <= limit

    if "messages" in example:
        messages = example["messages"]
        learnable = [
            i for i, m in enumerate(messages) if m.get("role") == "assistant" and m.get("weight", 1) == 1
        ]
        # Dropping trailing turns keeps every kept turn whole: try the longest prefix first.
        for index in reversed(learnable):
            candidate = {**example, "messages": messages[: index + 1]}
            if fits(candidate):
                return candidate, f"dropped {len(messages) - index - 1} trailing message(s)"
        first = learnable[0]
        turn = messages[first]
        if not isinstance(turn.get("content"), str) or turn.get("tool_calls"):
            return None, "the first assistant turn is a tool call, which cannot be shortened"
        dropped = len(messages) - first - 1

        def build(text: str) -> dict[str, Any]:
            return {**example, "messages": [*messages[:first], {**turn, "content": text}]}

        shortened = _shorten(turn["content"], build, fits, encoding)
        if shortened is None:
            return None, "the turns before the first assistant answer alone fill the context"
        return shortened, f"dropped {dropped} trailing message(s) and shortened the assistant turn {first}"
    if "prompt" in example:

        def build_completion(text: str) -> dict[str, Any]:
            return {**example, "completion": text}

        shortened = _shorten(example["completion"], build_completion, fits, encoding)
        if shortened is None:
            return None, "the prompt alone fills the context"
        return shortened, "shortened the completion"
    return None, "preference examples are not truncated"


def _shorten(text: str, build: Any, fits: Any, encoding: tiktoken.Encoding) -> dict[str, Any] | None:
    """`build(prefix)` for the longest prefix of `text` (whole tokens) that still fits, or None."""
    ids = encoding.encode_ordinary(text)

    def prefix(length: int) -> str:
        # Bytes of a token cut mid-character are dropped rather than shown as U+FFFD.
        return encoding.decode_bytes(ids[:length]).decode("utf-8", "ignore").rstrip()

    low, high = 0, len(ids)
    while low < high:  # binary search: the count grows with the prefix
        middle = (low + high + 1) // 2
        if fits(build(prefix(middle))):
            low = middle
        else:
            high = middle - 1
    # A decoded prefix can re-encode differently at its edge, so confirm and step down if needed.
    for length in range(low, 0, -1):
        text_prefix = prefix(length)
        if text_prefix.strip() and fits(candidate := build(text_prefix)):
            return candidate
    return None


@task(name="validate", cache_policy=NO_CACHE, persist_result=False)
def validate_task(frame: pd.DataFrame, model: ModelConfig, validation: ValidationConfig) -> pd.DataFrame:
    """Prefect wrapper of validate."""
    return validate(frame, model, validation)


# --- the gate ---------------------------------------------------------------------------------------


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
class GateResult:
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


def gate_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """The columns the suite looks at: identifiers, kept/quarantined flags, kind, tokens and reason."""
    kept = records.kept_mask(frame).to_numpy()
    n_tokens = frame[N_TOKENS] if N_TOKENS in frame else pd.Series(pd.NA, index=frame.index, dtype="Int64")
    return pd.DataFrame(
        {
            "record_id": frame[records.RECORD_ID].to_numpy(dtype=object),
            "source": frame[records.SOURCE].to_numpy(dtype=object),
            "line": frame[records.LINE].to_numpy(),
            # The example itself is not the suite's business; whether it is there is.
            "has_example": frame[records.EXAMPLE]
            .map(lambda e: True if e is not None else None)
            .to_numpy(dtype=object),
            "kept": kept.astype(np.int64),
            "quarantined": (~kept).astype(np.int64),
            "kind": frame[KIND].to_numpy(dtype=object)
            if KIND in frame
            else np.full(len(frame), None, dtype=object),
            "n_tokens": n_tokens.to_numpy(dtype="float64", na_value=np.nan),
            "reason": frame[records.REASON].to_numpy(dtype=object),
        }
    )


def build_suite(model: ModelConfig, validation: ValidationConfig) -> Any:
    """The ExpectationSuite that gates a batch before anything is uploaded."""
    import great_expectations as gx
    import great_expectations.expectations as gxe
    from great_expectations.expectations.row_conditions import Column

    kept = Column("kept") == 1
    limit = context_limit(model, validation)
    kind = exported_kind(model.base)
    expectations = [
        gxe.ExpectColumnSumToBeBetween(
            column="kept",
            min_value=validation.min_examples,
            description=f"at least {validation.min_examples} examples kept (validation.min_examples)",
        ),
        gxe.ExpectColumnMeanToBeBetween(
            column="quarantined",
            min_value=0,
            max_value=validation.max_quarantine_fraction,
            description=(
                f"at most {validation.max_quarantine_fraction:.0%} of the records quarantined "
                "(validation.max_quarantine_fraction)"
            ),
        ),
        gxe.ExpectColumnValuesToBeUnique(column="record_id", description="every record_id is unique"),
        gxe.ExpectColumnValuesToNotBeNull(column="record_id", description="every record has a record_id"),
        gxe.ExpectColumnValuesToNotBeNull(column="source", description="every record names its source"),
        gxe.ExpectColumnValuesToNotBeNull(column="line", description="every record names its line"),
        gxe.ExpectColumnValuesToNotBeNull(
            column="has_example", row_condition=kept, description="every kept record has an example"
        ),
        gxe.ExpectColumnValuesToNotBeNull(
            column="n_tokens", row_condition=kept, description="every kept example has a token count"
        ),
        gxe.ExpectColumnValuesToBeBetween(
            column="n_tokens",
            min_value=1,
            max_value=limit,
            row_condition=kept,
            description=f"every kept example fits the {limit}-token training context of {model.base}",
        ),
        gxe.ExpectColumnValuesToBeInSet(
            column="kind",
            value_set=[kind],
            row_condition=kept,
            description=f"every kept example is a {kind} line (one format per training file)",
        ),
        gxe.ExpectColumnValuesToBeInSet(
            column="reason",
            value_set=sorted(KNOWN_REASONS),
            description="every quarantine reason is one of the data contract's reasons",
        ),
    ]
    return gx.ExpectationSuite(name="tuneline-prepare-gate", expectations=expectations)


def gate(frame: pd.DataFrame, model: ModelConfig, validation: ValidationConfig) -> GateResult:
    """Run the suite over the batch (kept and quarantined rows) in an ephemeral GX context."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    # Imported here: great_expectations takes seconds to import, and only the gate needs it.
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    # In memory only: no docs site on disk, no analytics, no progress bars on the terminal.
    project = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
        analytics_enabled=False,
        progress_bars=ProgressBarsConfig(globally=False),
    )
    context = gx.get_context(mode="ephemeral", project_config=project)
    batch = gate_frame(frame)
    definition = (
        context.data_sources.add_pandas("records")
        .add_dataframe_asset("batch")
        .add_batch_definition_whole_dataframe("whole batch")
    )
    suite = context.suites.add(build_suite(model, validation))
    validation_definition = gx.ValidationDefinition(data=definition, suite=suite, name="prepare gate")
    result = validation_definition.run(batch_parameters={"dataframe": batch})
    outcomes = [_outcome(r, batch) for r in result.results]
    return GateResult(
        success=bool(result.success) and all(o.success for o in outcomes),
        suite=suite.name,
        outcomes=outcomes,
        summary=batch_summary(frame, model, validation),
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
            unexpected.append(f"{row['source']} line {row['line']} ({row['record_id']}){value}")
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
        frame.loc[kept, N_TOKENS].dropna().astype("int64")
        if N_TOKENS in frame
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
        "truncated": int(frame[TRUNCATED].sum()) if TRUNCATED in frame else 0,
    }


def render_report(result: GateResult, title: str = "tuneline prepare: validation report") -> str:
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
<h2 class="verdict">Gate {verdict}</h2>
<p>Suite <code>{e(result.suite)}</code> (Great Expectations). {stats}</p>
<h2>Batch</h2>
<table>{"".join(rows)}</table>
<h2>Quarantined by reason</h2>
<table><tr><th>reason</th><th>records</th></tr>{reason_rows}</table>
<h2>Expectations</h2>
<table><tr><th>result</th><th>expectation</th><th>observed</th></tr>{"".join(expectation_rows)}</table>
</body></html>
"""


def failure_summary(result: GateResult) -> str:
    """One line per failed expectation, for the command line."""
    return "\n".join(f"- {failure}" for failure in result.failures)
