from __future__ import annotations

import html
import json
import logging
import os
import subprocess
import sys
import uuid
from typing import Any

import fsspec
import pandas as pd
import pytest

from tuneline import records
from tuneline.config import ModelConfig, ValidationConfig
from tuneline.tasks import ingest, quality, validate

CHAT_MODEL = ModelConfig(base="tuneline-tiny", system_prompt="House style.")
RULES = ValidationConfig(min_examples=3, max_quarantine_fraction=0.5, context_limits={"tuneline-tiny": 64})


def chat(question: str, answer: str = "Billing: done.") -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def frame_of(*lines: Any) -> pd.DataFrame:
    """The record frame ingest makes of these lines (objects are written as JSON, strings as they are)."""
    path = f"/quality-{uuid.uuid4().hex}/part.jsonl"
    text = "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n"
    fs = fsspec.filesystem("memory")
    fs.pipe(path, text.encode())
    try:
        return ingest.read_files([ingest.InputFile("t", f"memory://{path}", path, "", "jsonl", None)], None)
    finally:
        fs.rm(path)


def good_batch(n: int) -> pd.DataFrame:
    return validate.validate(frame_of(*[chat(f"question {i}") for i in range(n)]), CHAT_MODEL, RULES)


def outcome(result: quality.QualityVerdict, expectation: str, column_hint: str) -> quality.ExpectationOutcome:
    return next(o for o in result.outcomes if o.expectation == expectation and column_hint in o.description)


def test_quality_check_passes_a_clean_batch_and_reports_each_expectation() -> None:
    result = quality.check_quality(good_batch(4), CHAT_MODEL, RULES)
    assert result.success and result.failures == []
    assert len(result.outcomes) >= 10 and all(o.success for o in result.outcomes)
    assert outcome(result, "expect_column_sum_to_be_between", "examples kept").observed == "4"
    assert result.summary["kept"] == 4 and result.summary["context_limit"] == 64
    assert result.gx_result["success"] is True and len(result.gx_result["results"]) == len(result.outcomes)


def test_quality_check_fails_on_too_few_examples_and_too_much_quarantine() -> None:
    batch = validate.validate(frame_of(chat("one"), chat("two"), "{x", "{y", "{z"), CHAT_MODEL, RULES)
    result = quality.check_quality(batch, CHAT_MODEL, RULES)
    assert not result.success
    failed = {o.expectation for o in result.outcomes if not o.success}
    assert failed == {"expect_column_sum_to_be_between", "expect_column_mean_to_be_between"}
    assert any("at least 3 examples kept" in f and "observed 2" in f for f in result.failures)
    assert any("at most 50% of the records quarantined" in f and "observed 0.6" in f for f in result.failures)


def test_quality_check_names_the_records_that_break_row_expectations() -> None:
    batch = good_batch(4)
    batch.loc[1, records.RECORD_ID] = batch.loc[0, records.RECORD_ID]
    batch.loc[2, records.N_TOKENS] = 10_000  # as if a stage had let an over-long example through
    # As if a stage had written a reason of its own by hand (records.quarantine refuses unknown ones).
    batch.loc[3, records.REASON] = "made_up_reason"
    result = quality.check_quality(batch, CHAT_MODEL, RULES)
    unique = outcome(result, "expect_column_values_to_be_unique", "record_id")
    within = outcome(result, "expect_column_values_to_be_between", "fits")
    known = outcome(result, "expect_column_values_to_be_in_set", "quarantine reason")
    assert not unique.success and unique.observed.startswith("2 of 4")
    assert not within.success and within.unexpected and "line 3" in within.unexpected[0]
    assert not known.success and "made_up_reason" in str(known)


def test_quality_check_on_an_empty_batch_fails_without_crashing() -> None:
    result = quality.check_quality(
        validate.validate(records.empty_frame(), CHAT_MODEL, RULES), CHAT_MODEL, RULES
    )
    assert not result.success
    assert any("examples kept" in f for f in result.failures)


def test_report_renders_every_expectation_escaped() -> None:
    batch = good_batch(2)  # one short of min_examples: exactly one expectation fails
    batch[records.SOURCE] = "<script>alert(1)</script>.jsonl"
    result = quality.check_quality(batch, CHAT_MODEL, RULES)
    page = quality.render_report(result)
    assert page.startswith("<!doctype html>") and "Data quality FAILED" in page
    for o in result.outcomes:
        assert html.escape(o.description) in page and html.escape(o.observed) in page
        assert o.expectation in page
    assert page.count("<td class=status>FAIL</td>") == len(result.failures) == 1
    assert "<script>" not in page
    assert "Data quality PASSED" in quality.render_report(
        quality.check_quality(good_batch(3), CHAT_MODEL, RULES)
    )


def test_great_expectations_is_imported_on_a_thread_before_the_check_needs_it() -> None:
    # In a fresh interpreter: this one has imported it already.
    code = (
        "import sys\n"
        "from tuneline.tasks import quality\n"
        "assert 'great_expectations' not in sys.modules, 'imported before it was asked for'\n"
        "thread = quality.import_in_background()\n"
        "assert thread.daemon and thread.is_alive()\n"
        "thread.join(120)\n"
        "assert 'great_expectations.expectations' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=180)


def test_a_check_beside_the_flow_gives_the_verdict_of_one_here(caplog: pytest.LogCaptureFixture) -> None:
    batch = good_batch(4)
    batch.loc[2, records.N_TOKENS] = 10_000  # a failing row: the verdict names it from there too
    here = quality.check_quality(batch, CHAT_MODEL, RULES)
    with caplog.at_level(logging.INFO, logger="tuneline.tasks.quality"):
        beside = quality.QualityCheck(beside=True).check(batch, CHAT_MODEL, RULES)
    said = [
        r.getMessage() for r in caplog.records if r.getMessage().startswith("quality: checked in process")
    ]
    assert len(said) == 1 and int(said[0].rsplit(" ", 1)[1]) != os.getpid()
    assert not beside.success and beside.failures == here.failures
    assert beside.outcomes == here.outcomes and beside.summary == here.summary
    assert "line 3" in outcome(beside, "expect_column_values_to_be_between", "fits").unexpected[0]
