"""The server's store: atomic blobs, transactional job state, stable cursors, crash safety."""

from __future__ import annotations

import hashlib
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tuneline.server.services.files import file_object
from tuneline.server.services.jobs import checkpoint_object, job_object
from tuneline.server.store import CursorNotFound, JobRecord, Store, new_id, now


def make_job(
    store: Store, *, metadata: dict[str, str] | None = None, status: str = "validating_files"
) -> JobRecord:
    job = JobRecord(
        id=new_id("ftjob-"),
        created_at=now(),
        status=status,
        model="tuneline-tiny",
        base_model="tuneline-tiny",
        training_file="file-x",
        validation_file=None,
        requested_hyperparameters={
            "n_epochs": "auto",
            "batch_size": "auto",
            "learning_rate_multiplier": "auto",
        },
        hyperparameters=None,
        suffix=None,
        seed=7,
        metadata=metadata,
        model_name="ft:tuneline-tiny:tuneline::abcdefgh",
    )
    return store.create_job(job)


def test_ids_have_the_hosted_shape() -> None:
    for prefix in ("file-", "ftjob-", "ftevent-", "ftckpt_"):
        value = new_id(prefix)
        assert value.startswith(prefix)
        assert len(value) == len(prefix) + 24 and value[len(prefix) :].isalnum()
    assert len({new_id("file-") for _ in range(1000)}) == 1000


def test_a_file_is_stored_whole_and_read_back(tmp_path: Path) -> None:
    store = Store(tmp_path)
    content = b'{"messages": []}\n' * 1000
    record = store.add_file("train.jsonl", "fine-tune", content)
    assert record.status == "processed" and record.bytes == len(content)
    assert store.file_path(record.id).read_bytes() == content
    assert record.sha256 == hashlib.sha256(content).hexdigest()
    assert store.get_file(record.id) == record
    assert file_object(record).object == "file"
    assert not [p for p in store.files_dir.iterdir() if p.name.startswith(".tmp-")]
    assert store.delete_file(record.id)
    assert store.get_file(record.id) is None and not store.file_path(record.id).exists()
    assert not store.delete_file(record.id)


def test_file_pages_follow_the_cursor_without_gaps_or_repeats(tmp_path: Path) -> None:
    store = Store(tmp_path)
    ids = [store.add_file(f"f{i}.jsonl", "fine-tune" if i % 2 else "batch", b"x").id for i in range(7)]
    for order, expected in (("asc", ids), ("desc", ids[::-1])):
        seen, after, has_more = [], None, True
        while has_more:
            records, has_more = store.list_files(purpose=None, after=after, limit=3, order=order)  # type: ignore[arg-type]
            seen += [r.id for r in records]
            after = records[-1].id
        assert seen == expected
    fine_tune, _ = store.list_files(purpose="fine-tune", after=None, limit=100, order="asc")
    assert [r.id for r in fine_tune] == ids[1::2]
    store.delete_file(ids[2])
    with pytest.raises(CursorNotFound):
        store.list_files(purpose=None, after=ids[2], limit=3, order="asc")


def test_job_transitions_are_conditional_and_carry_their_event(tmp_path: Path) -> None:
    store = Store(tmp_path)
    job = make_job(store)
    events, _ = store.list_events(job.id, after=None, limit=10)
    assert [e.message for e in events] == [f"Created fine-tuning job: {job.id}"]
    assert store.transition(job.id, ("running",), "succeeded") is None
    assert store.get_job(job.id).status == "validating_files"  # type: ignore[union-attr]
    queued = store.transition(job.id, ("validating_files",), "queued", events=[("info", "Files validated")])
    assert queued is not None and queued.status == "queued"
    running = store.transition(job.id, ("queued",), "running", worker_token="t1")
    assert running is not None and running.worker_token == "t1"
    # A worker whose token is no longer the job's cannot write to it.
    assert not store.update_job(job.id, token="old", estimated_finish=1)
    assert store.add_event(job.id, "late", token="old") is None
    assert store.update_job(job.id, token="t1", estimated_finish=123)
    assert store.get_job(job.id).estimated_finish == 123  # type: ignore[union-attr]
    events, _ = store.list_events(job.id, after=None, limit=10)
    assert [e.message for e in events] == ["Files validated", f"Created fine-tuning job: {job.id}"]


def test_events_are_newest_first_with_a_stable_cursor(tmp_path: Path) -> None:
    store = Store(tmp_path)
    job = make_job(store)
    for i in range(25):
        store.add_event(job.id, f"step {i}", type="metrics", data={"step": i})
    seen, after, has_more = [], None, True
    while has_more:
        events, has_more = store.list_events(job.id, after=after, limit=10)
        seen += [e.message for e in events]
        after = events[-1].id
    assert seen == [f"step {i}" for i in reversed(range(25))] + [f"Created fine-tuning job: {job.id}"]
    assert [e.data["step"] for e in store.metrics_events(job.id)] == list(range(25))  # type: ignore[index]


def test_jobs_filter_by_metadata_pairs(tmp_path: Path) -> None:
    store = Store(tmp_path)
    a = make_job(store, metadata={"dataset_hash": "abc", "odd key [x]": 'quote "q"'})
    make_job(store, metadata={"dataset_hash": "def"})
    make_job(store)
    found, _ = store.list_jobs(after=None, limit=10, metadata={"dataset_hash": "abc"})
    assert [j.id for j in found] == [a.id]
    found, _ = store.list_jobs(
        after=None, limit=10, metadata={"odd key [x]": 'quote "q"', "dataset_hash": "abc"}
    )
    assert [j.id for j in found] == [a.id]
    found, _ = store.list_jobs(after=None, limit=10, metadata={"dataset_hash": "nope"})
    assert found == []
    everything, has_more = store.list_jobs(after=None, limit=2)
    assert len(everything) == 2 and has_more


def test_only_the_last_three_checkpoints_are_kept(tmp_path: Path) -> None:
    store = Store(tmp_path)
    job = make_job(store)
    store.transition(job.id, ("validating_files",), "running", worker_token="tok")
    dropped_all: list[Path] = []
    for step in (10, 20, 30, 40, 50):
        path = store.models_dir / job.id / f"ckpt-step-{step}"
        path.mkdir(parents=True)
        record, dropped = store.add_checkpoint(
            job.id,
            step=step,
            metrics={"train_loss": 1.0 / step},
            model_id=f"m:ckpt-step-{step}",
            path=path,
            token="tok",
        )
        assert record is not None and checkpoint_object(record).metrics["step"] == step
        dropped_all += dropped
    assert dropped_all == [
        store.models_dir / job.id / "ckpt-step-10",
        store.models_dir / job.id / "ckpt-step-20",
    ]
    kept, _ = store.list_checkpoints(job.id, after=None, limit=10)
    assert [c.step for c in kept] == [50, 40, 30]
    assert {m.id for m in store.list_models()} == {f"m:ckpt-step-{s}" for s in (30, 40, 50)}
    reloaded = store.get_job(job.id)
    assert reloaded is not None and reloaded.resume_step == 50
    assert str(reloaded.resume_from).endswith("ckpt-step-50")
    messages = [e.message for e in store.list_events(job.id, after=None, limit=100)[0]]
    assert "Checkpoint created at step 50 with Snapshot ID: m:ckpt-step-50" in messages
    # A worker that lost the job cannot add checkpoints.
    assert store.add_checkpoint(
        job.id, step=60, metrics={}, model_id="m:60", path=tmp_path, token="other"
    ) == (None, [])


def test_finishing_a_job_records_model_result_and_events_together(tmp_path: Path) -> None:
    store = Store(tmp_path)
    job = make_job(store)
    store.transition(job.id, ("validating_files",), "running", worker_token="tok")
    result = store.write_blob("step_metrics.csv", "fine-tune-results", b"c3RlcA==")
    assert store.get_file(result.id) is None  # not listed until the job finishes
    model_dir = store.models_dir / job.id / "final"
    model_dir.mkdir(parents=True)
    done = store.finish_job(
        job.id,
        token="tok",
        model_path=model_dir,
        result_file=result,
        trained_tokens=1234,
        hyperparameters={"n_epochs": 2, "batch_size": 1, "learning_rate_multiplier": 1.0},
    )
    assert done is not None and done.status == "succeeded" and done.fine_tuned_model == job.model_name
    assert done.result_files == [result.id] and store.get_file(result.id) is not None
    api = job_object(done).model_dump()
    assert api["hyperparameters"] == api["method"]["supervised"]["hyperparameters"]
    assert api["hyperparameters"]["n_epochs"] == 2 and api["trained_tokens"] == 1234
    messages = [e.message for e in store.list_events(job.id, after=None, limit=10)[0]]
    assert messages[:2] == [
        "The job has successfully completed",
        f"New fine-tuned model created: {job.model_name}",
    ]
    assert store.get_model(job.model_name) is not None
    deleted = store.delete_model(job.model_name)
    assert deleted is not None and not model_dir.exists() and store.get_model(job.model_name) is None


def test_a_cancelled_job_cannot_be_finished_by_its_worker(tmp_path: Path) -> None:
    store = Store(tmp_path)
    job = make_job(store)
    store.transition(job.id, ("validating_files",), "running", worker_token="tok")
    store.transition(job.id, ("running",), "cancelled", worker_token=None)
    result = store.write_blob("step_metrics.csv", "fine-tune-results", b"x")
    outcome = store.finish_job(
        job.id, token="tok", model_path=tmp_path, result_file=result, trained_tokens=1, hyperparameters={}
    )
    assert outcome is None
    assert store.get_job(job.id).status == "cancelled"  # type: ignore[union-attr]
    assert store.get_file(result.id) is None and store.get_model(job.model_name) is None


def test_sweep_removes_only_what_no_row_points_to(tmp_path: Path) -> None:
    store = Store(tmp_path)
    kept = store.add_file("a.jsonl", "fine-tune", b"a")
    orphan = store.write_blob("b.jsonl", "fine-tune", b"b")  # a crash before its row was written
    (store.files_dir / ".tmp-file-half").write_bytes(b"half")
    job = make_job(store)
    store.transition(job.id, ("validating_files",), "running", worker_token="tok")
    ckpt = store.models_dir / job.id / "ckpt-step-1"
    ckpt.mkdir(parents=True)
    store.add_checkpoint(job.id, step=1, metrics={}, model_id="m:ckpt-step-1", path=ckpt, token="tok")
    half_copied = store.models_dir / job.id / ".tmp-ckpt-step-2-abcd"
    half_copied.mkdir()
    base_model_part = store.models_dir / "tuneline-tiny" / "part"  # builtin.py's cache is not ours to sweep
    base_model_part.mkdir(parents=True)
    removed = set(store.sweep())
    assert removed == {store.file_path(orphan.id), store.files_dir / ".tmp-file-half", half_copied}
    assert store.file_path(kept.id).exists() and ckpt.exists() and base_model_part.exists()


def test_state_survives_reopening(tmp_path: Path) -> None:
    store = Store(tmp_path)
    record = store.add_file("a.jsonl", "fine-tune", b"a")
    job = make_job(store, metadata={"k": "v"})
    store.close()
    again = Store(tmp_path)
    assert again.get_file(record.id) == record
    assert again.get_job(job.id) == job
    mode = sqlite3.connect(again.db_path).execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from tuneline.server.store import JobRecord, Store, new_id, now
    store = Store(Path(sys.argv[1]))
    job = store.create_job(JobRecord(
        id=new_id("ftjob-"), created_at=now(), status="queued", model="m", base_model="m",
        training_file="file-x", validation_file=None, requested_hyperparameters={}, hyperparameters=None,
        suffix=None, seed=1, metadata=None, model_name="ft:m:o::x"))
    print("ready", flush=True)
    i = 0
    while True:
        store.add_file(f"f{i}.jsonl", "fine-tune", bytes([i % 251]) * (50_000 + i))
        store.add_event(job.id, f"event {i}")
        i += 1
    """
)


def test_kill_9_in_the_middle_of_writes_corrupts_nothing(tmp_path: Path) -> None:
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(tmp_path)], stdout=subprocess.PIPE, cwd=Path(__file__).parents[2]
    )
    assert writer.stdout is not None and writer.stdout.readline().strip() == b"ready"
    store = Store(tmp_path)
    deadline = time.monotonic() + 60
    while len(store.list_files(purpose=None, after=None, limit=100, order="asc")[0]) < 20:
        assert time.monotonic() < deadline, "the writer made no progress"
        time.sleep(0.05)
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait()
    store.close()

    reopened = Store(tmp_path)
    assert sqlite3.connect(reopened.db_path).execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    reopened.sweep()
    files, _ = reopened.list_files(purpose=None, after=None, limit=100_000, order="asc")
    assert len(files) >= 20
    for record in files:
        blob = reopened.file_path(record.id).read_bytes()
        assert len(blob) == record.bytes and hashlib.sha256(blob).hexdigest() == record.sha256
    listed = {r.id for r in files}
    assert {p.name for p in reopened.files_dir.iterdir()} == listed


def test_a_schema_1_store_gains_the_method_column_and_keeps_its_jobs_supervised(tmp_path: Path) -> None:
    from dataclasses import replace

    from tuneline.server import store as store_module

    old_schema = store_module.SCHEMA.replace(
        "    started_at INTEGER,\n    method TEXT\n);", "    started_at INTEGER\n);"
    )
    assert old_schema != store_module.SCHEMA
    conn = sqlite3.connect(tmp_path / "tuneline.db")
    conn.executescript(old_schema)
    conn.execute(
        "INSERT INTO jobs (id, created_at, status, model, base_model, training_file, requested_hyperparameters,"
        " seed, model_name) VALUES ('ftjob-old', 1, 'succeeded', 'm', 'm', 'file-x', '{}', 1, 'ft:m')"
    )
    conn.execute("PRAGMA user_version=1")
    conn.commit()
    conn.close()
    store = Store(tmp_path)
    old = store.get_job("ftjob-old")
    assert old is not None and old.method is None and old.method_type == "supervised"
    dpo = make_job(store)
    store_dpo = replace(dpo, id=new_id("ftjob-"), method={"type": "dpo"})
    store.create_job(store_dpo)
    assert store.get_job(store_dpo.id).method_type == "dpo"  # type: ignore[union-attr]
    version = sqlite3.connect(tmp_path / "tuneline.db").execute("PRAGMA user_version").fetchone()[0]
    assert version == store_module.SCHEMA_VERSION == 2
    store.close()
