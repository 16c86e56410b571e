"""The fine-tuning job lifecycle through the real `openai` SDK against a real server that really
trains: create, events, checkpoints, result file, chat with the fine-tuned model and a checkpoint,
streaming, cancel, pause/resume, every error path; bodies checked against the OpenAPI contract."""

from __future__ import annotations

import base64
import csv
import io
import re
import uuid
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

TERMINAL = {"succeeded", "failed", "cancelled"}


def raw(client: Any, method: str, path: str, **kwargs: Any) -> httpx.Response:
    headers = {"Authorization": f"Bearer {client.api_key}"}
    return httpx.request(
        method, f"{client.base_url}{path.lstrip('/')}", headers=headers, timeout=60, **kwargs
    )


def upload(client: Any, content: bytes, name: str = "train.jsonl") -> str:
    return client.files.create(file=(name, io.BytesIO(content)), purpose="fine-tune").id


def wait_status(client: Any, wait_for: Any, job_id: str, statuses: set[str], timeout_s: float = 300) -> Any:
    def reached() -> Any:
        job = client.fine_tuning.jobs.retrieve(job_id)
        return job if job.status in statuses else None

    return wait_for(reached, timeout_s=timeout_s, what=f"{job_id} to reach {sorted(statuses)}")


def worker_pids(job_id: str) -> list[int]:
    """Processes whose command line names the job: its training worker, if one runs."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"tuneline.server.worker" in cmdline and job_id.encode() in cmdline:
            pids.append(int(entry.name))
    return pids


def messages_of(client: Any, job_id: str) -> list[str]:
    """Every event message, oldest first (the API lists newest first)."""
    return [e.message for e in client.fine_tuning.jobs.list_events(job_id, limit=100)][::-1]


@pytest.fixture(scope="module")
def dataset_hash() -> str:
    return uuid.uuid4().hex


@pytest.fixture(scope="module")
def trained(
    client: Any, wait_for: Any, training_bytes: bytes, validation_bytes: bytes, dataset_hash: str
) -> Any:
    """A job trained to success: 2 epochs on 12 examples with a validation file."""
    training_file = upload(client, training_bytes)
    validation_file = upload(client, validation_bytes, "valid.jsonl")
    job = client.fine_tuning.jobs.create(
        model="tuneline-tiny",
        training_file=training_file,
        validation_file=validation_file,
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2, "batch_size": 4}}},
        suffix="support",
        seed=42,
        metadata={"dataset_hash": dataset_hash},
    )
    assert job.status == "validating_files"
    done = wait_status(client, wait_for, job.id, TERMINAL)
    assert done.status == "succeeded", done.error
    return done


def test_a_job_trains_to_a_fine_tuned_model(client: Any, validate: Any, trained: Any) -> None:
    body = raw(client, "GET", f"fine_tuning/jobs/{trained.id}").json()
    validate("FineTuningJob", body)
    assert re.fullmatch(r"ft:tuneline-tiny:tuneline:support:[A-Za-z0-9]{8}", body["fine_tuned_model"])
    assert re.fullmatch(r"ftjob-[A-Za-z0-9]{24}", body["id"])
    resolved = body["hyperparameters"]
    assert set(resolved) == {"n_epochs", "batch_size", "learning_rate_multiplier"}
    assert resolved["n_epochs"] == 2 and resolved["batch_size"] == 4
    assert (
        isinstance(resolved["learning_rate_multiplier"], float) and resolved["learning_rate_multiplier"] > 0
    )
    assert body["method"] == {
        "type": "supervised",
        "supervised": {"hyperparameters": body["hyperparameters"]},
    }
    assert body["seed"] == 42 and body["trained_tokens"] > 0
    assert body["finished_at"] >= body["created_at"] and body["estimated_finish"] is None
    assert body["error"] is None and len(body["result_files"]) == 1


def test_events_follow_the_hosted_sequence_newest_first(client: Any, validate: Any, trained: Any) -> None:
    page = raw(client, "GET", f"fine_tuning/jobs/{trained.id}/events", params={"limit": 3}).json()
    validate("ListFineTuningJobEventsResponse", page)
    assert page["has_more"] is True and len(page["data"]) == 3
    events = list(client.fine_tuning.jobs.list_events(trained.id, limit=3))  # auto-paginates by `after`
    assert len({e.id for e in events}) == len(events)
    assert all(re.fullmatch(r"ftevent-[A-Za-z0-9]{24}", e.id) for e in events)
    stamps = [e.created_at for e in events]
    assert stamps == sorted(stamps, reverse=True)
    messages = [e.message for e in events][::-1]
    expected = [
        f"Created fine-tuning job: {trained.id}",
        f"Validating training file: {trained.training_file}",
        "Files validated, moving job to queued state",
        "Fine-tuning job started",
        f"New fine-tuned model created: {trained.fine_tuned_model}",
        "The job has successfully completed",
    ]
    positions = [messages.index(m) for m in expected]
    assert positions == sorted(positions)
    metrics = [e for e in events if e.type == "metrics"]
    assert metrics, "no metrics events"
    for event in metrics:
        assert re.fullmatch(r"Step \d+/\d+: training loss=\d+\.\d\d.*", event.message)
        assert {"step", "total_steps", "train_loss", "train_mean_token_accuracy"} <= set(event.data)
    assert any("valid_loss" in e.data for e in metrics)  # a validation file was given
    for snapshot in [m for m in messages if m.startswith("Checkpoint created at step ")]:
        assert re.fullmatch(
            rf"Checkpoint created at step \d+ with Snapshot ID: {re.escape(trained.fine_tuned_model)}:ckpt-step-\d+",
            snapshot,
        )


def test_one_checkpoint_per_epoch_each_usable_as_a_model(client: Any, validate: Any, trained: Any) -> None:
    body = raw(client, "GET", f"fine_tuning/jobs/{trained.id}/checkpoints").json()
    validate("ListFineTuningJobCheckpointsResponse", body)
    checkpoints = list(client.fine_tuning.jobs.checkpoints.list(trained.id))
    assert len(checkpoints) == 2
    steps = [c.step_number for c in checkpoints]
    assert steps == sorted(steps, reverse=True) and steps[0] > steps[1]
    for checkpoint in checkpoints:
        assert re.fullmatch(r"ftckpt_[A-Za-z0-9]{24}", checkpoint.id)
        assert (
            checkpoint.fine_tuned_model_checkpoint
            == f"{trained.fine_tuned_model}:ckpt-step-{checkpoint.step_number}"
        )
        assert checkpoint.fine_tuning_job_id == trained.id
        assert checkpoint.metrics.step == checkpoint.step_number
    model_ids = {m.id for m in client.models.list()}
    assert {"tuneline-tiny", trained.fine_tuned_model} | {
        c.fine_tuned_model_checkpoint for c in checkpoints
    } <= model_ids
    validate("ListModelsResponse", raw(client, "GET", "models").json())
    answer = client.chat.completions.create(
        model=checkpoints[-1].fine_tuned_model_checkpoint,
        messages=[{"role": "user", "content": "Question 3: help with my invoice"}],
        max_tokens=8,
        temperature=0,
    )
    assert answer.model == checkpoints[-1].fine_tuned_model_checkpoint and answer.usage.completion_tokens <= 8


def test_the_result_file_is_base64_csv_with_the_hosted_columns(
    client: Any, validate: Any, trained: Any
) -> None:
    result = client.files.retrieve(trained.result_files[0])
    assert result.purpose == "fine-tune-results"
    validate("OpenAIFile", raw(client, "GET", f"files/{result.id}").json())
    text = base64.b64decode(client.files.content(result.id).content).decode()
    rows = list(csv.DictReader(io.StringIO(text)))
    assert list(rows[0]) == [
        "step",
        "train_loss",
        "train_accuracy",
        "valid_loss",
        "valid_mean_token_accuracy",
    ]
    steps = [int(r["step"]) for r in rows]
    assert steps == sorted(steps) and len(set(steps)) == len(steps)
    assert all(float(r["train_loss"]) >= 0 for r in rows)


def test_chat_with_the_fine_tuned_model(client: Any, validate: Any, trained: Any) -> None:
    request = {
        "model": trained.fine_tuned_model,
        "messages": [
            {"role": "system", "content": "You are the support assistant."},
            {"role": "user", "content": "Question 1: help with my password"},
        ],
        "max_tokens": 12,
        "temperature": 0,
        "seed": 5,
    }
    body = raw(client, "POST", "chat/completions", json=request).json()
    validate("CreateChatCompletionResponse", body)
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert 0 <= usage["completion_tokens"] <= 12 and usage["prompt_tokens"] > 0
    assert body["choices"][0]["finish_reason"] in ("stop", "length")
    again = client.chat.completions.create(**request)
    assert (
        again.choices[0].message.content == body["choices"][0]["message"]["content"]
    )  # greedy is deterministic
    limited = client.chat.completions.create(**{**request, "max_completion_tokens": 1, "max_tokens": None})
    assert limited.usage.completion_tokens <= 1


def test_streaming_sends_chunks_then_done(client: Any, validate: Any, trained: Any) -> None:
    request = {
        "model": trained.fine_tuned_model,
        "messages": [{"role": "user", "content": "Question 2: help with my shipping"}],
        "max_tokens": 12,
        "temperature": 0,
    }
    whole = client.chat.completions.create(**request).choices[0].message.content
    with httpx.stream(
        "POST",
        f"{client.base_url}chat/completions",
        json={**request, "stream": True, "stream_options": {"include_usage": True}},
        headers={"Authorization": f"Bearer {client.api_key}"},
        timeout=60,
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    import json

    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    for chunk in chunks:
        validate("CreateChatCompletionStreamResponse", chunk)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert streamed == whole
    # The usage chunk counts what the non-streamed answer counts.
    whole_usage = client.chat.completions.create(**request).usage
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] == whole_usage.completion_tokens
    assert chunks[-1]["usage"]["prompt_tokens"] == whole_usage.prompt_tokens
    assert chunks[-2]["choices"][0]["finish_reason"] in ("stop", "length")
    sdk_text = "".join(
        part.choices[0].delta.content or ""
        for part in client.chat.completions.create(**request, stream=True)
        if part.choices
    )
    assert sdk_text == whole


def test_jobs_list_pages_and_filters_by_metadata(
    client: Any, validate: Any, trained: Any, dataset_hash: str, examples: Any, to_jsonl: Any, wait_for: Any
) -> None:
    bad = examples(12)
    bad[2]["messages"][1]["role"] = "bot"
    bad_file = upload(client, to_jsonl(bad))
    failed_ids = [
        client.fine_tuning.jobs.create(model="tuneline-tiny", training_file=bad_file).id for _ in range(3)
    ]
    for job_id in failed_ids:
        job = wait_status(client, wait_for, job_id, TERMINAL, timeout_s=60)
        assert job.status == "failed"
        assert job.error.code == "invalid_training_file"
        assert (
            job.error.message
            == "Invalid file format. Line 3: message 1 has unrecognized role 'bot' (unrecognized_role)"
        )
        assert job.error.param == "training_file"
        validate("FineTuningJob", raw(client, "GET", f"fine_tuning/jobs/{job_id}").json())
    listed = [j.id for j in client.fine_tuning.jobs.list(limit=2)]
    assert listed[:3] == failed_ids[::-1] and trained.id in listed
    page = raw(client, "GET", "fine_tuning/jobs", params={"limit": 2}).json()
    validate("ListPaginatedFineTuningJobsResponse", page)
    assert page["has_more"] is True
    found = list(client.fine_tuning.jobs.list(metadata={"dataset_hash": dataset_hash}))
    assert [j.id for j in found] == [trained.id]
    assert list(client.fine_tuning.jobs.list(metadata={"dataset_hash": "nothing-like-it"})) == []
    events = messages_of(client, failed_ids[0])
    assert (
        events[-1] == "Invalid file format. Line 3: message 1 has unrecognized role 'bot' (unrecognized_role)"
    )


@pytest.mark.parametrize(
    ("extra", "status", "needle"),
    [
        ({"extra_body": {"temperature": 0.5}}, 400, "temperature: extra inputs are not permitted"),
        ({"hyperparameters": {"n_epochs": 0}}, 400, "n_epochs must be 'auto' or an integer between 1 and 50"),
        (
            {"hyperparameters": {"batch_size": 300}},
            400,
            "batch_size must be 'auto' or an integer between 1 and 256",
        ),
        ({"hyperparameters": {"learning_rate_multiplier": -1}}, 400, "greater than 0"),
        (
            {"method": {"type": "dpo", "supervised": {"hyperparameters": {"n_epochs": 1}}}},
            400,
            "method.supervised does not go with method.type 'dpo'",
        ),
        ({"suffix": "s" * 65}, 400, "suffix must be a string of 1 to 64 characters"),
        ({"seed": 2**31}, 400, "seed must be an integer between 0 and 2147483647"),
        ({"metadata": {f"k{i}": "v" for i in range(17)}}, 400, "at most 16 are allowed"),
        ({"model": "gpt-4o-mini-2024-07-18"}, 400, "is not available for fine-tuning"),
        ({"training_file": "file-doesnotexist"}, 404, "No such File object: file-doesnotexist"),
        ({"validation_file": "file-doesnotexist"}, 404, "No such File object: file-doesnotexist"),
    ],
)
def test_create_refuses_bad_requests(
    client: Any, validate: Any, training_bytes: bytes, extra: dict[str, Any], status: int, needle: str
) -> None:
    arguments: dict[str, Any] = {"model": "tuneline-tiny", "training_file": upload(client, training_bytes)}
    arguments.update(extra)
    with pytest.raises(openai.APIStatusError) as caught:
        client.fine_tuning.jobs.create(**arguments)
    assert caught.value.status_code == status
    assert needle in caught.value.message
    validate("ErrorResponse", caught.value.response.json())


def test_unknown_job_ids_are_404(client: Any, validate: Any) -> None:
    calls = [
        lambda: client.fine_tuning.jobs.retrieve("ftjob-nope"),
        lambda: client.fine_tuning.jobs.cancel("ftjob-nope"),
        lambda: client.fine_tuning.jobs.pause("ftjob-nope"),
        lambda: client.fine_tuning.jobs.resume("ftjob-nope"),
        lambda: list(client.fine_tuning.jobs.list_events("ftjob-nope")),
        lambda: list(client.fine_tuning.jobs.checkpoints.list("ftjob-nope")),
    ]
    for call in calls:
        with pytest.raises(openai.NotFoundError) as caught:
            call()
        assert caught.value.body["message"] == "Could not find fine tune: ftjob-nope"  # type: ignore[index]
        validate("ErrorResponse", caught.value.response.json())


def test_a_finished_job_cannot_be_cancelled_paused_or_resumed(
    client: Any, validate: Any, trained: Any
) -> None:
    for call, word in (
        (client.fine_tuning.jobs.cancel, "cannot be cancelled: it has already succeeded"),
        (client.fine_tuning.jobs.pause, "cannot be paused: it has already succeeded"),
        (client.fine_tuning.jobs.resume, "cannot be resumed: it is succeeded, not paused"),
    ):
        with pytest.raises(openai.BadRequestError) as caught:
            call(trained.id)
        assert word in caught.value.message
        validate("ErrorResponse", caught.value.response.json())


def long_job(client: Any, examples: Any, to_jsonl: Any) -> Any:
    """A job with enough steps to be caught running (batch 1, many epochs)."""
    training_file = upload(client, to_jsonl(examples(20)))
    return client.fine_tuning.jobs.create(
        model="tuneline-tiny",
        training_file=training_file,
        hyperparameters={"n_epochs": 30, "batch_size": 1},
        seed=1,
    )


def first_metrics(client: Any, wait_for: Any, job_id: str) -> Any:
    def seen() -> Any:
        return [e for e in client.fine_tuning.jobs.list_events(job_id, limit=5) if e.type == "metrics"]

    return wait_for(seen, timeout_s=240, what=f"{job_id} to report a training step")


def test_cancel_stops_the_worker_within_seconds(
    client: Any, validate: Any, examples: Any, to_jsonl: Any, wait_for: Any
) -> None:
    job = long_job(client, examples, to_jsonl)
    first_metrics(client, wait_for, job.id)
    assert worker_pids(job.id)
    cancelled = client.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled"
    validate("FineTuningJob", raw(client, "GET", f"fine_tuning/jobs/{job.id}").json())
    wait_for(lambda: not worker_pids(job.id), timeout_s=10, what="the cancelled job's worker to exit")
    after = client.fine_tuning.jobs.retrieve(job.id)
    assert after.status == "cancelled" and after.fine_tuned_model is None and after.finished_at is not None
    assert messages_of(client, job.id)[-1] == "Fine-tuning job cancelled"


def test_pause_saves_state_and_resume_finishes_the_job(
    client: Any, validate: Any, examples: Any, to_jsonl: Any, wait_for: Any
) -> None:
    training_file = upload(client, to_jsonl(examples(20)))
    job = client.fine_tuning.jobs.create(
        model="tuneline-tiny",
        training_file=training_file,
        hyperparameters={"n_epochs": 4, "batch_size": 1},
        seed=2,
    )
    first_metrics(client, wait_for, job.id)
    paused = client.fine_tuning.jobs.pause(job.id)
    assert paused.status == "paused"
    validate("FineTuningJob", raw(client, "GET", f"fine_tuning/jobs/{job.id}").json())
    wait_for(lambda: not worker_pids(job.id), timeout_s=60, what="the paused job's worker to exit")
    stopped = [m for m in messages_of(client, job.id) if m.startswith("Training stopped at step ")]
    assert stopped, messages_of(client, job.id)
    step = int(stopped[-1].split()[4].rstrip(";"))
    assert client.fine_tuning.jobs.retrieve(job.id).status == "paused"
    resumed = client.fine_tuning.jobs.resume(job.id)
    assert resumed.status == "queued"
    done = wait_status(client, wait_for, job.id, TERMINAL)
    assert done.status == "succeeded", done.error
    messages = messages_of(client, job.id)
    assert f"Fine-tuning job resumed from step {step}" in messages
    steps = [
        int(e.data["step"])
        for e in client.fine_tuning.jobs.list_events(job.id, limit=100)
        if e.type == "metrics"
    ]
    assert max(steps) > step


def test_chat_request_errors(client: Any, validate: Any) -> None:
    cases = [
        (
            {"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]},
            404,
            "`no-such-model` does not exist",
        ),
        ({"model": "tuneline-tiny", "messages": []}, 400, "Missing required parameter: 'messages'"),
        (
            {"model": "tuneline-tiny", "messages": [{"role": "user", "content": "hi"}], "n": 17},
            400,
            "n must be an integer between 1 and 16",
        ),
        (
            {"model": "tuneline-tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": 3},
            400,
            "temperature must be",
        ),
        (
            {"model": "tuneline-tiny", "messages": [{"role": "robot", "content": "hi"}]},
            400,
            "messages[0].role",
        ),
        (
            {"model": "tuneline-tiny", "messages": [{"role": "user", "content": "hi"}], "bogus": 1},
            400,
            "Unrecognized request argument supplied: bogus",
        ),
    ]
    for body, status, needle in cases:
        response = raw(client, "POST", "chat/completions", json=body)
        assert response.status_code == status, response.text
        validate("ErrorResponse", response.json())
        assert needle in response.json()["error"]["message"]
    broken = raw(client, "POST", "chat/completions", content=b"{not json")
    assert broken.status_code == 400


def test_models_retrieve_and_delete_only_fine_tuned(client: Any, validate: Any, trained: Any) -> None:
    validate("Model", raw(client, "GET", f"models/{trained.fine_tuned_model}").json())
    validate("Model", raw(client, "GET", "models/tuneline-tiny").json())
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("no-such-model")
    assert caught.value.body["code"] == "model_not_found"  # type: ignore[index]
    with pytest.raises(openai.PermissionDeniedError):
        client.models.delete("tuneline-tiny")
    deleted = raw(client, "DELETE", f"models/{trained.fine_tuned_model}").json()
    validate("DeleteModelResponse", deleted)
    assert deleted == {"id": trained.fine_tuned_model, "object": "model", "deleted": True}
    assert trained.fine_tuned_model not in {m.id for m in client.models.list()}
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(
            model=trained.fine_tuned_model, messages=[{"role": "user", "content": "hi"}]
        )
    with pytest.raises(openai.NotFoundError):
        client.models.delete(trained.fine_tuned_model)
    # The job keeps telling which model it made.
    assert client.fine_tuning.jobs.retrieve(trained.id).fine_tuned_model == trained.fine_tuned_model
