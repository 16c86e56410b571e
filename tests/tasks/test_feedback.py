"""Feedback becomes data: corrections on traces -> a raw partition -> the next prepare run, through the
same rules (a real MLflow store, the real prepare flow under a real Prefect server)."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import mlflow
from planted_traffic import Planted, plant

from tuneline import tracking
from tuneline.config import load_config
from tuneline.flows.prepare import manifest_of, prepare
from tuneline.tasks.feedback import FEEDBACK_FILE, PROVENANCE_FILE, feedback_root, harvest_corrections

AWS_KEY = "AKIAIOSFODNN7EXAMPLE"
GOOD = "Category: billing/double_charge. We have refunded the duplicate charge."


def test_corrections_become_a_partition_that_prepare_ingests_and_a_bad_one_is_quarantined(
    prefect_server: None, tmp_path: Path, support_project: Callable[..., Path]
) -> None:
    day = date(2026, 11, 21)
    config_path = support_project(tmp_path / "project", {"2026-11-20": 14})
    config = load_config(config_path)
    assert feedback_root(config) == tmp_path / "project" / "raw"
    mlflow.set_tracking_uri(tracking.tracking_uri(config.tracking))
    trace_ids = plant(
        config.tracking,
        Planted("champion", "1", 4, 4, 2),
        corrections={0: GOOD, 1: f"Category: billing. Use the key {AWS_KEY} to log in.", 2: ""},
    )

    since = datetime.now(UTC) - timedelta(days=1)
    harvest = harvest_corrections(config, day, since)
    partition = tmp_path / "project" / "raw" / "dt=2026-11-21"
    assert harvest.path == partition / FEEDBACK_FILE and harvest.trace_ids == trace_ids[:3]
    lines = [json.loads(line) for line in harvest.path.read_text().splitlines()]
    assert lines[0]["messages"][-1] == {"role": "assistant", "content": GOOD}
    assert [m["role"] for m in lines[0]["messages"]] == ["system", "user", "assistant"]
    assert lines[0]["messages"][1]["content"] == "My card was charged twice (champion 0)"
    provenance = [json.loads(line) for line in (partition / PROVENANCE_FILE).read_text().splitlines()]
    assert [(p["line"], p["trace_id"], p["variant"], p["model_version"]) for p in provenance] == [
        (1, trace_ids[0], "champion", "1"),
        (2, trace_ids[1], "champion", "1"),
        (3, trace_ids[2], "champion", "1"),
    ]
    # A second harvest writes nothing again; a new correction is appended after the others.
    again = harvest_corrections(config, day, since)
    assert again.written == 0 and again.already_harvested == 3
    mlflow.log_expectation(
        trace_id=trace_ids[3], name="correction", value=GOOD.replace("duplicate", "second")
    )
    later = harvest_corrections(config, day, since)
    assert later.trace_ids == [trace_ids[3]] and len(harvest.path.read_text().splitlines()) == 4

    # The next nightly run reads the partition through the same rules: good corrections are kept, a
    # correction holding a credential or an empty one is quarantined with its line, none is lost.
    result = prepare(config_path=str(config_path), as_of=day, out_dir=str(tmp_path / "out"))
    manifest = manifest_of(result.out_dir)
    assert manifest["counts"]["input_records"] == 16 + 4
    quarantined = [json.loads(line) for line in result.quarantine_file.read_text().splitlines()]
    from_feedback = {q["line"]: q["reason"] for q in quarantined if q["source"].endswith(FEEDBACK_FILE)}
    assert from_feedback == {2: "secret_detected", 3: "missing_content"}
    assert all(AWS_KEY not in json.dumps(q) for q in quarantined)
    trained = result.train_file.read_text() + result.out_dir.joinpath("validation.jsonl").read_text()
    assert GOOD in trained and GOOD.replace("duplicate", "second") in trained
    # Quarantined lines lead back to their traces through the provenance file.
    by_line = {p["line"]: p["trace_id"] for p in provenance}
    assert by_line[2] == trace_ids[1] and by_line[3] == trace_ids[2]
