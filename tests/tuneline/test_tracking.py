"""tracking.RunLog on a real MLflow store (SQLite in tmp_path): the run schema, masking on the way
out, and the runs a killed process left open."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tuneline import tracking
from tuneline.config import TrackingConfig
from tuneline.tracking import RunLog


@pytest.fixture
def store(tmp_path: Path) -> TrackingConfig:
    return TrackingConfig(
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
        artifact_location=str(tmp_path / "artifacts"),
        experiment="tracking-tests",
    )


def test_a_run_names_its_flow_and_process_and_masks_credentials(store: TrackingConfig) -> None:
    run = RunLog.start(store, flow="retrain", name="a run", tags={"tuneline.as_of": "2026-11-20"})
    run.link_flow_run("flow-run-id", "brave-otter")
    run.log_uploaded(
        training_file_id="file-1",
        training_reused=True,
        validation_file_id=None,
        validation_reused=None,
        uploaded=0,
    )
    run.log_job("ftjob-1", {"n_epochs": 2})
    run.log_job("ftjob-1", {"n_epochs": 2, "batch_size": 4})  # the same again, plus what is new: fine
    run._log_params({"sources": "s3://bucket/x.jsonl, https://ana:hunter2@example.com/y.jsonl"})
    record = run.read()
    assert record.status == "RUNNING"
    assert (
        record.tags[tracking.FLOW_TAG] == "retrain"
        and record.tags[tracking.FLOW_RUN_NAME_TAG] == "brave-otter"
    )
    assert record.tags[tracking.PID_TAG].isdigit() and record.tags[tracking.HOST_TAG]
    assert (
        record.params["job_id"] == "ftjob-1" and record.params["hyperparameters.resolved.batch_size"] == "4"
    )
    assert "validation_file_id" not in record.params and record.metrics["files_uploaded"] == 0
    assert "hunter2" not in record.params["sources"] and "[masked credential: " in record.params["sources"]
    run.fail(ValueError("boom"), code="invalid_training_file", job_id="ftjob-1")
    failed = run.read()
    assert failed.status == "FAILED" and failed.tags[tracking.FAILURE_TAG] == "invalid_training_file"
    cancelled = RunLog.start(store, flow="retrain", name="cancelled")
    cancelled.fail(KeyboardInterrupt())
    assert cancelled.read().status == "KILLED"


def start_and_wait(store: TrackingConfig, params: dict[str, str]) -> subprocess.Popen[bytes]:
    """A process that starts a run, logs `params`, prints the run id and waits to be killed."""
    script = textwrap.dedent(
        f"""
        import sys, time
        from tuneline.config import TrackingConfig
        from tuneline.tracking import RunLog
        run = RunLog.start(TrackingConfig(**{store.model_dump()!r}), flow="retrain", name="doomed")
        run._log_params({params!r})
        print(run.run_id, flush=True)
        time.sleep(600)
        """
    )
    return subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)


def run_id_of(process: subprocess.Popen[bytes]) -> str:
    assert process.stdout is not None
    run_id = process.stdout.readline().decode().strip()
    assert run_id, "the process did not start its run"
    return run_id


def test_a_rerun_closes_the_run_a_killed_process_left_open(store: TrackingConfig) -> None:
    same = {"dataset_hash": "d" * 64, "training_config_hash": "c" * 64}
    RunLog.start(store, flow="retrain", name="creates the experiment").finish()
    # Started together: each spends seconds importing MLflow.
    killed, other = (start_and_wait(store, p) for p in (same, {**same, "dataset_hash": "e" * 64}))
    try:
        killed_id, other_id = run_id_of(killed), run_id_of(other)
        for process in (killed, other):
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=30)
        alive = RunLog.start(store, flow="retrain", name="still going")  # this process: alive
        alive._log_params(same)
        rerun = RunLog.start(store, flow="retrain", name="rerun")
        rerun._log_params(same)
        closed = rerun.close_abandoned_runs(same, taken_over_by="took over job ftjob-1")
        assert closed == [killed_id]
        stale = tracking.read_run(store, killed_id)
        assert stale.status == "KILLED" and stale.tags[tracking.FAILURE_TAG] == tracking.ABANDONED
        why = stale.tags[tracking.ABANDONED_TAG]
        assert (
            f"pid {stale.tags[tracking.PID_TAG]}" in why
            and f"run {rerun.run_id} took over job ftjob-1" in why
        )
        # A run whose process still runs, and a run of other data, are left as they are.
        assert alive.read().status == "RUNNING" and rerun.read().status == "RUNNING"
        assert tracking.read_run(store, other_id).status == "RUNNING"
        # Another source of the same knowledge (Prefect says the flow run crashed) closes it too.
        by_flow_run = rerun.close_abandoned_runs(
            same, taken_over_by="took over job ftjob-1", also=lambda record: "its Prefect flow run is Crashed"
        )
        assert by_flow_run == [alive.run_id] and "Crashed" in alive.read().tags[tracking.ABANDONED_TAG]
    finally:
        for process in (killed, other):
            if process.poll() is None:
                process.kill()
                process.wait(timeout=30)
