"""The backfill flow and `tuneline backfill`, run for real: Prefect (a test server), the data plane, MLflow
(a SQLite store in tmp_path)."""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable
from datetime import date
from pathlib import Path

import openai
import pytest
from typer.testing import CliRunner

from tuneline import tracking
from tuneline.cli import app
from tuneline.config import load_config
from tuneline.flows.backfill import (
    FAILED,
    PREPARED,
    RETRAINED,
    STOPPED,
    UNCHANGED,
    BackfillError,
    BackfillIncomplete,
    DayResult,
    backfill,
    backfill_dates,
    check_mode,
    input_fingerprint,
    retrain_plan,
)
from tuneline.server.launcher import start_server


def test_dates_are_inclusive_and_in_order() -> None:
    assert backfill_dates("2026-02-27", "2026-03-01") == [
        date(2026, 2, 27),
        date(2026, 2, 28),
        date(2026, 3, 1),
    ]
    assert backfill_dates("2026-11-01", "2026-11-01") == [date(2026, 11, 1)]


@pytest.mark.parametrize(
    ("start", "end", "message"),
    [
        ("2026-11-05", "2026-11-01", "--end 2026-11-01 is before --start 2026-11-05"),
        ("2026-13-01", "2026-12-01", "--start '2026-13-01': not a date (use YYYY-MM-DD"),
        ("2026-11-01", "yesterday", "--end 'yesterday': not a date"),
        ("1026-11-01", "2026-11-01", "at most 3660 (check the years)"),
    ],
)
def test_bad_ranges_are_refused_with_one_line(start: str, end: str, message: str) -> None:
    with pytest.raises(BackfillError, match=re.escape(message)) as raised:
        backfill_dates(start, end)
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--start", "2026-11-05", "--end", "2026-11-01"], "--end 2026-11-01 is before --start 2026-11-05"),
        (["--start", "2026/11/01", "--end", "2026-11-02"], "--start '2026/11/01': not a date"),
        (
            ["--start", "2026-11-01", "--end", "2026-11-02", "--mode", "train"],
            "--mode 'train': expected prepare or retrain",
        ),
    ],
)
def test_cli_exits_2_with_one_line_on_bad_arguments(args: list[str], message: str) -> None:
    outcome = CliRunner().invoke(app, ["backfill", *args])
    assert outcome.exit_code == 2
    assert message in outcome.output and len(outcome.output.strip().splitlines()) == 1


def test_mode_is_checked() -> None:
    assert check_mode("retrain") == "retrain"


def test_fingerprint_changes_with_the_window_content_and_the_config(
    tmp_path: Path, support_project: Callable[..., Path]
) -> None:
    config = load_config(support_project(tmp_path, {"2026-11-01": 3, "2026-11-03": 3}))
    first, second, third = (input_fingerprint(config, date(2026, 11, d)) for d in (1, 2, 3))
    assert len({first, second, third}) == 3  # as_of is part of what a date reads
    assert input_fingerprint(config, date(2026, 11, 3)) == third
    with (tmp_path / "raw" / "dt=2026-11-03" / "part-0.jsonl").open("a") as partition:
        partition.write('{"messages": []}\n')
    assert input_fingerprint(config, date(2026, 11, 3)) != third
    assert input_fingerprint(config, date(2026, 11, 1)) == first  # 2026-11-03 is outside its window
    stricter = load_config(tmp_path / "config.yaml", overrides={"dedupe.near_duplicate_threshold": 0.9})
    assert input_fingerprint(stricter, date(2026, 11, 1)) != first


def experiment_runs(config_path: Path) -> dict[str, tracking.RunRecord]:
    settings = load_config(config_path).tracking
    experiment_id = tracking.configure(settings)
    found = tracking.client(settings).search_runs([experiment_id], max_results=1000)
    return {run.info.run_id: tracking.read_run(settings, run.info.run_id) for run in found}


def test_prepare_backfill_records_each_date_and_a_rerun_reuses_everything(
    prefect_server: None, tmp_path: Path, support_project: Callable[..., Path]
) -> None:
    config = support_project(tmp_path, {"2026-11-01": 12, "2026-11-02": 12})

    # 2026-10-31 has no partition in its window: the gate stops that date, the others are still done.
    with pytest.raises(BackfillIncomplete, match=r"1 of 4 dates not done:\n- 2026-10-31: stopped") as raised:
        backfill(start="2026-10-31", end="2026-11-03", config=str(config))
    result = raised.value.result
    assert [d.as_of for d in result.days] == ["2026-10-31", "2026-11-01", "2026-11-02", "2026-11-03"]
    assert [d.outcome for d in result.days] == [STOPPED, PREPARED, PREPARED, PREPARED]
    empty, first, second, third = result.days
    assert "min_examples" in (empty.detail or "") or "at least" in (empty.detail or "")

    # Per-date quality: what each night's window held, every record accounted for.
    for day, records in ((first, 14), (second, 28), (third, 28)):
        counts = day.manifest["counts"]
        assert counts["input_records"] == records == counts["kept"] + counts["quarantined"]
        assert counts["quarantined_by_reason"] == {
            "invalid_json": records // 14,
            "exact_duplicate": records // 14,
        }
        assert (
            json.loads((Path(day.out_dir) / "manifest.json").read_text())["dataset_hash"] == day.dataset_hash
        )
    assert first.dataset_hash != second.dataset_hash
    assert second.dataset_hash == third.dataset_hash  # no new partition on 2026-11-03

    # MLflow: one run per date, nested under the backfill's parent run, holding the date's quality.
    runs = experiment_runs(config)
    parent = runs[result.parent_run_id]
    assert parent.status == "FAILED" and parent.tags["tuneline.backfill"] == "2026-10-31..2026-11-03"
    assert parent.metrics == {"dates": 4.0, "dates.prepared": 3.0, "dates.stopped": 1.0}
    settings = load_config(config).tracking
    children = tracking.child_runs(settings, result.parent_run_id)
    assert sorted(r.tags["tuneline.backfill_date"] for r in children) == [d.as_of for d in result.days]
    by_date = {r.tags["tuneline.backfill_date"]: r for r in children}
    assert by_date["2026-11-02"].run_id == second.mlflow_run_id
    assert by_date["2026-11-02"].metrics["counts.quarantined_by_reason.exact_duplicate"] == 2
    assert by_date["2026-11-02"].metrics["tokens.train_total"] == second.manifest["tokens"]["train_total"] > 0
    assert by_date["2026-11-02"].tags["tuneline.dataset_hash"] == second.dataset_hash
    assert by_date["2026-10-31"].status == "FAILED" and by_date["2026-11-01"].status == "FINISHED"
    assert "backfill/dates.csv" in tracking.list_artifacts(settings, result.parent_run_id)

    # The same backfill again, through the CLI: every date is reused, nothing new in MLflow.
    again = CliRunner().invoke(
        app, ["backfill", "--start", "2026-10-31", "--end", "2026-11-03", "--config", str(config)]
    )
    assert again.exit_code == 1, again.output
    assert (
        "2026-10-31  stopped" in again.output
        and "2026-11-02  prepared   24 kept, 4 quarantined; dataset " in again.output
    )
    assert set(experiment_runs(config)) == set(runs)
    dates_csv = tracking.download_artifact(
        settings, result.parent_run_id, "backfill/dates.csv", tmp_path / "dl"
    )
    rows = list(csv.DictReader(dates_csv.open()))
    assert [(r["as_of"], r["outcome"], r["quarantined.exact_duplicate"]) for r in rows] == [
        ("2026-10-31", "stopped", ""),
        ("2026-11-01", "prepared", "1"),
        ("2026-11-02", "prepared", "2"),
        ("2026-11-03", "prepared", "2"),
    ]

    # New data on 2026-11-02: that date and the next are prepared again, 2026-11-01 is still reused.
    with (tmp_path / "raw" / "dt=2026-11-02" / "part-0.jsonl").open("a") as partition:
        partition.write(
            '{"messages": [{"role": "user", "content": "Where is my refund for order 77?"}, {"role": "assistant", "content": "Category: billing."}]}\n'
        )
    changed = backfill(start="2026-11-01", end="2026-11-03", config=str(config))
    assert [d.outcome for d in changed.days] == [PREPARED] * 3
    assert changed.days[0].mlflow_run_id == first.mlflow_run_id
    assert changed.days[1].mlflow_run_id not in runs and changed.days[2].mlflow_run_id not in runs
    assert changed.days[1].manifest["counts"]["input_records"] == 29
    assert changed.parent_run_id != result.parent_run_id  # another range: another parent


def day(as_of: str, outcome: str, dataset_hash: str | None) -> DayResult:
    manifest = {"dataset_hash": dataset_hash or "0" * 64, "published": dataset_hash is not None}
    return DayResult(as_of=as_of, outcome=outcome, manifest=manifest)


def test_retrain_plan_retrains_each_change_in_date_order_only() -> None:
    days = [
        day("2026-11-01", PREPARED, "a"),
        day("2026-11-02", PREPARED, "a"),  # same data as the day before
        day("2026-11-03", PREPARED, "b"),
        day("2026-11-04", STOPPED, None),  # the gate stopped it: nothing to train
        day("2026-11-05", PREPARED, "b"),  # same as the last prepared date
        day("2026-11-06", FAILED, None),
        day("2026-11-07", PREPARED, "a"),  # back to an earlier dataset: a change from the day before
    ]
    assert retrain_plan(days) == [True, False, True, False, False, False, True]
    assert retrain_plan([]) == []


KEY = "sk-backfill-tests-5e6f7a8b9c"


def test_retrain_backfill_retrains_a_changed_date_skips_an_unchanged_one_and_a_rerun_pays_nothing_twice(
    prefect_server: None,
    tmp_path: Path,
    support_project: Callable[..., Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TUNELINE_API_KEY", KEY)
    with start_server(tmp_path / "server", api_key=KEY) as server:
        config = support_project(
            tmp_path / "project",
            {"2026-11-01": 13},  # the server trains on at least 10 examples
            provider={
                "kind": "local",
                "base_url": server.base_url,
                "poll_interval_s": 0.2,
                "max_poll_interval_s": 1.0,
            },
            training={"hyperparameters": {"n_epochs": 1, "batch_size": 4}},
            evaluation={"few_shot_k": 0, "bootstrap_samples": 100},
        )
        provider = openai.OpenAI(base_url=server.base_url, api_key=KEY, max_retries=5)

        # 2026-11-02 has no new partition: same dataset as 2026-11-01, nothing to retrain.
        result = backfill(start="2026-11-01", end="2026-11-02", mode="retrain", config=str(config))
        assert [d.outcome for d in result.days] == [RETRAINED, UNCHANGED]
        first, second = result.days
        assert first.retrain is not None and second.retrain is None
        assert first.retrain.dataset_hash == first.dataset_hash == second.dataset_hash
        assert first.retrain.candidate_model and first.retrain.decision is not None
        # On the provider: one job for the dataset, its two files uploaded once.
        [job] = provider.fine_tuning.jobs.list(limit=100).data
        assert job.id == first.retrain.job_id and job.metadata["tuneline_dataset_hash"] == first.dataset_hash
        files = provider.files.list(purpose="fine-tune").data
        assert len(files) == 2 and all(f.filename.startswith(first.dataset_hash) for f in files)
        # The date's retrain run sits under the date's run, under the backfill's run.
        settings = load_config(config).tracking
        retrain_run = tracking.read_run(settings, first.retrain.mlflow_run_id)
        assert retrain_run.tags[tracking.PARENT_RUN_TAG] == first.mlflow_run_id
        assert (
            tracking.read_run(settings, first.mlflow_run_id).tags[tracking.PARENT_RUN_TAG]
            == result.parent_run_id
        )
        assert retrain_run.params["candidate_model"] == first.retrain.candidate_model
        runs = experiment_runs(config)

        again = backfill(start="2026-11-01", end="2026-11-02", mode="retrain", config=str(config))
        assert [d.outcome for d in again.days] == [RETRAINED, UNCHANGED]
        assert again.days[0].retrain == first.retrain
        assert [j.id for j in provider.fine_tuning.jobs.list(limit=100).data] == [job.id]
        assert len(provider.files.list(purpose="fine-tune").data) == 2
        assert set(experiment_runs(config)) == set(runs)
