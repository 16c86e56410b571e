"""A restart keeps every file, job, event and model; kill -9 during training corrupts nothing and the
job resumes from its last checkpoint instead of staying `running` forever."""

from __future__ import annotations

import io
import sqlite3
from pathlib import Path
from typing import Any

import httpx
import openai

from tuneline.server.launcher import start_server

KEY = "sk-durability"
TERMINAL = {"succeeded", "failed", "cancelled"}


def sdk(server: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key=server.api_key, max_retries=0, timeout=60)


def snapshot(server: Any, job_id: str) -> dict[str, Any]:
    """Everything the API says about a job and its files and models, as raw JSON."""
    headers = {"Authorization": f"Bearer {server.api_key}"}
    with httpx.Client(base_url=server.base_url, headers=headers, timeout=60) as http:
        job = http.get(f"/fine_tuning/jobs/{job_id}").json()
        return {
            "job": job,
            "events": http.get(f"/fine_tuning/jobs/{job_id}/events", params={"limit": 1000}).json(),
            "checkpoints": http.get(f"/fine_tuning/jobs/{job_id}/checkpoints").json(),
            "files": http.get("/files").json(),
            "models": sorted(m["id"] for m in http.get("/models").json()["data"]),
            "result": http.get(f"/files/{job['result_files'][0]}/content").content
            if job["result_files"]
            else b"",
        }


def worker_pids(job_id: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"tuneline.server.worker" in cmdline and job_id.encode() in cmdline:
                pids.append(int(entry.name))
    return pids


def test_a_stop_mid_training_resumes_and_a_restart_keeps_everything(
    tmp_path: Path, examples: Any, to_jsonl: Any, wait_for: Any, seeded_state: Any
) -> None:
    seeded_state(tmp_path)
    with start_server(tmp_path, api_key=KEY) as first:
        client = sdk(first)
        content = to_jsonl(examples(60))  # 60 steps an epoch: still training when the stop comes
        training_file = client.files.create(file=("t.jsonl", io.BytesIO(content)), purpose="fine-tune").id
        job = client.fine_tuning.jobs.create(
            model="tuneline-tiny",
            training_file=training_file,
            hyperparameters={"n_epochs": 3, "batch_size": 1},
            metadata={"run": "r1"},
        )
        first_checkpoint = wait_for(
            lambda: list(client.fine_tuning.jobs.checkpoints.list(job.id)),
            timeout_s=300,
            what="a first checkpoint",
        )
    # A deliberate stop (SIGTERM) ends the worker and puts the job back in the queue.
    assert not worker_pids(job.id)
    with start_server(tmp_path, api_key=KEY) as second:
        client = sdk(second)
        done = wait_for(
            lambda: (j := client.fine_tuning.jobs.retrieve(job.id)).status in TERMINAL and j,
            timeout_s=300,
            what="the job to finish after the restart",
        )
        assert done.status == "succeeded", done.error
        messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=200)]
        stopped = [m for m in messages if m.startswith("The server was stopped while this job was running")]
        assert stopped, messages
        step = int(stopped[0].split("at step ")[1].split()[0])
        assert step >= first_checkpoint[-1].step_number
        assert f"Fine-tuning job resumed from step {step}" in messages
        before = snapshot(second, job.id)
        answer_before = client.chat.completions.create(
            model=done.fine_tuned_model,
            messages=[{"role": "user", "content": "Question 4"}],
            max_tokens=6,
            temperature=0,
        )
    with start_server(tmp_path, api_key=KEY) as third:
        assert snapshot(third, job.id) == before
        client = sdk(third)
        assert [j.id for j in client.fine_tuning.jobs.list(metadata={"run": "r1"})] == [job.id]
        answer_after = client.chat.completions.create(
            model=done.fine_tuned_model,
            messages=[{"role": "user", "content": "Question 4"}],
            max_tokens=6,
            temperature=0,
        )
        assert answer_after.choices[0].message.content == answer_before.choices[0].message.content


def test_kill_9_during_training_resumes_from_the_last_checkpoint(
    tmp_path: Path, examples: Any, to_jsonl: Any, wait_for: Any, seeded_state: Any
) -> None:
    seeded_state(tmp_path)
    server = start_server(tmp_path, api_key=KEY)
    try:
        client = sdk(server)
        training_file = client.files.create(
            file=("t.jsonl", io.BytesIO(to_jsonl(examples(60)))), purpose="fine-tune"
        ).id
        job = client.fine_tuning.jobs.create(
            model="tuneline-tiny",
            training_file=training_file,
            hyperparameters={"n_epochs": 4, "batch_size": 2},
            seed=9,
        )

        def checkpointed() -> Any:
            return list(client.fine_tuning.jobs.checkpoints.list(job.id))

        checkpoints = wait_for(checkpointed, timeout_s=300, what="a first checkpoint")
        assert client.fine_tuning.jobs.retrieve(job.id).status == "running"
        server.kill()
        # The worker dies with the server: nothing trains the job twice.
        wait_for(lambda: not worker_pids(job.id), timeout_s=15, what="the orphaned worker to exit")
        database = tmp_path / "tuneline.db"
        assert sqlite3.connect(database).execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        server.stop()

    with start_server(tmp_path, api_key=KEY) as restarted:
        client = sdk(restarted)
        recovered = client.fine_tuning.jobs.retrieve(job.id)
        assert recovered.status in ("queued", "running", "succeeded")
        done = wait_for(
            lambda: (j := client.fine_tuning.jobs.retrieve(job.id)).status in TERMINAL and j,
            timeout_s=300,
            what="the resumed job to finish",
        )
        assert done.status == "succeeded", done.error
        messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=100)]
        step = max(c.step_number for c in checkpoints)
        latest_before_kill = [
            m for m in messages if m.startswith("The server stopped while this job was running")
        ]
        assert latest_before_kill and "resumes from the checkpoint at step" in latest_before_kill[0]
        resumed_at = int(latest_before_kill[0].rsplit(" ", 1)[1])
        assert resumed_at >= step
        assert f"Fine-tuning job resumed from step {resumed_at}" in messages
        assert len(list(client.fine_tuning.jobs.checkpoints.list(job.id))) == 3  # 4 epochs, the last 3 kept
