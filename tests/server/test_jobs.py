"""Jobs: the create request's rules (tuneline/server/protocol.py and services/jobs.py), file validation
with the pipeline's rules, the result file and restart recovery. The scheduler and its worker processes, with the real trainer, are exercised end
to end through the API in test_api_jobs.py and test_api_durability.py."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from tuneline.server.errors import APIError, validation_error
from tuneline.server.protocol import CreateFineTuningJobRequest
from tuneline.server.scheduler import JobRunner, file_error
from tuneline.server.services.jobs import new_job
from tuneline.server.settings import ServerSettings
from tuneline.server.store import Store
from tuneline.server.worker import result_csv


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "state")


@pytest.fixture
def train_file(store: Store, training_bytes: bytes) -> str:
    return store.add_file("train.jsonl", "fine-tune", training_bytes).id


def parse(store: Store, body: Any) -> Any:
    """The job a create request makes: the protocol model's rules, then the service's."""
    bases = ["tuneline-tiny"]
    try:
        request = CreateFineTuningJobRequest.model_validate(body)
    except ValidationError as exc:
        raise validation_error(exc) from None  # what the server's one validation handler answers
    return new_job(
        request,
        store=store,
        base_of=lambda model: model if model in bases else None,
        available_models=lambda: bases,
    )


def error_of(store: Store, body: Any) -> APIError:
    with pytest.raises(APIError) as caught:
        parse(store, body)
    return caught.value


def test_a_minimal_request_makes_a_validating_job(store: Store, train_file: str) -> None:
    job = parse(store, {"model": "tuneline-tiny", "training_file": train_file})
    assert job.status == "validating_files" and job.id.startswith("ftjob-")
    assert job.requested_hyperparameters == {
        "n_epochs": "auto",
        "batch_size": "auto",
        "learning_rate_multiplier": "auto",
    }
    assert 0 <= job.seed <= 2**31 - 1
    prefix, base, org, suffix, tail = job.model_name.split(":")
    assert (prefix, base, org, suffix) == ("ft", "tuneline-tiny", "tuneline", "") and len(tail) == 8


def test_method_and_deprecated_hyperparameters_are_both_accepted(store: Store, train_file: str) -> None:
    by_method = parse(
        store,
        {
            "model": "tuneline-tiny",
            "training_file": train_file,
            "method": {
                "type": "supervised",
                "supervised": {"hyperparameters": {"n_epochs": 2, "batch_size": 4}},
            },
            "suffix": "support",
            "seed": 42,
        },
    )
    assert by_method.requested_hyperparameters["n_epochs"] == 2 and by_method.seed == 42
    assert by_method.model_name.split(":")[3] == "support"
    deprecated = parse(
        store,
        {
            "model": "tuneline-tiny",
            "training_file": train_file,
            "hyperparameters": {"learning_rate_multiplier": 0.5},
        },
    )
    assert deprecated.requested_hyperparameters["learning_rate_multiplier"] == 0.5


@pytest.mark.parametrize(
    ("patch", "status", "needle", "param"),
    [
        ({"temperature": 1}, 400, "temperature: extra inputs are not permitted", "temperature"),
        ({"hyperparameters": {"n_epochs": 0}}, 400, "between 1 and 50", "hyperparameters.n_epochs"),
        ({"hyperparameters": {"n_epochs": 51}}, 400, "between 1 and 50", "hyperparameters.n_epochs"),
        ({"hyperparameters": {"batch_size": 257}}, 400, "between 1 and 256", "hyperparameters.batch_size"),
        (
            {"hyperparameters": {"learning_rate_multiplier": 0}},
            400,
            "greater than 0",
            "hyperparameters.learning_rate_multiplier",
        ),
        ({"hyperparameters": {"n_epochs": True}}, 400, "between 1 and 50", "hyperparameters.n_epochs"),
        ({"hyperparameters": {"warmup": 3}}, 400, "extra inputs are not permitted", "hyperparameters.warmup"),
        (
            {"method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0}}}},
            400,
            "beta must be 'auto' or a number greater than 0 and at most 2",
            "method.dpo.hyperparameters.beta",
        ),
        (
            {"method": {"type": "reinforcement"}},
            400,
            "a reinforcement job needs method.reinforcement.grader",
            "method.reinforcement",
        ),
        ({"method": {"type": "magic"}}, 400, "method.type must be one of", "method.type"),
        ({"method": {"type": "supervised", "extra": 1}}, 400, "method.extra: extra inputs", "method.extra"),
        ({"suffix": "x" * 65}, 400, "1 to 64 characters", "suffix"),
        ({"suffix": "a:b"}, 400, "must not contain ':'", "suffix"),
        ({"seed": -1}, 400, "between 0 and 2147483647", "seed"),
        ({"seed": 2**31}, 400, "between 0 and 2147483647", "seed"),
        ({"metadata": {f"k{i}": "v" for i in range(17)}}, 400, "at most 16", "metadata"),
        ({"metadata": {"k" * 65: "v"}}, 400, "longer than 64", "metadata"),
        ({"metadata": {"k": "v" * 513}}, 400, "longer than 512", "metadata"),
        ({"metadata": {"k": 1}}, 400, "must be a string", "metadata"),
        ({"model": "gpt-4o-mini"}, 400, "Model gpt-4o-mini is not available", "model"),
        (
            {"training_file": "file-doesnotexist"},
            404,
            "No such File object: file-doesnotexist",
            "training_file",
        ),
        ({"validation_file": "file-nope"}, 404, "No such File object: file-nope", "validation_file"),
        (
            {"integrations": [{"type": "wandb", "wandb": {"project": "p"}}]},
            400,
            "not supported",
            "integrations",
        ),
    ],
)
def test_bad_requests_name_the_field_and_the_rule(
    store: Store, train_file: str, patch: dict[str, Any], status: int, needle: str, param: str
) -> None:
    body = {"model": "tuneline-tiny", "training_file": train_file, **patch}
    error = error_of(store, body)
    assert error.status == status and needle in error.message and error.param == param
    assert error.body()["error"]["type"] == "invalid_request_error"


def test_required_fields_and_file_purpose(store: Store, train_file: str) -> None:
    assert error_of(store, {"training_file": train_file}).message == "Missing required parameter: 'model'."
    assert error_of(store, {"model": "tuneline-tiny"}).param == "training_file"
    batch = store.add_file("b.jsonl", "batch", b"{}\n").id
    error = error_of(store, {"model": "tuneline-tiny", "training_file": batch})
    assert error.status == 400 and "purpose 'batch'" in error.message and "'fine-tune'" in error.message
    both = {
        "model": "tuneline-tiny",
        "training_file": train_file,
        "hyperparameters": {"n_epochs": 1},
        "method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2}}},
    }
    assert "not both" in error_of(store, both).message


def test_file_validation_uses_the_pipeline_rules_and_names_the_line(
    store: Store, training_bytes: bytes, examples: Any, to_jsonl: Any
) -> None:
    good = store.add_file("t.jsonl", "fine-tune", training_bytes).id
    assert file_error(store, good, "training_file", 10) == (12, None)

    lines = examples(12)
    lines[2]["messages"][1]["role"] = "bot"
    bad = store.add_file("t.jsonl", "fine-tune", to_jsonl(lines)).id
    _, error = file_error(store, bad, "training_file", 10)
    assert error == {
        "code": "invalid_training_file",
        "message": "Invalid file format. Line 3: message 1 has unrecognized role 'bot' (unrecognized_role)",
        "param": "training_file",
    }

    few = store.add_file("t.jsonl", "fine-tune", to_jsonl(examples(4))).id
    _, error = file_error(store, few, "training_file", 10)
    assert error is not None and "at least 10 examples (too_few_examples)" in error["message"]

    broken = store.add_file("t.jsonl", "fine-tune", training_bytes + b"{not json\n").id
    _, error = file_error(store, broken, "training_file", 10)
    assert error is not None and error["message"].startswith("Invalid file format. Line 13:")

    preference = {
        "input": {"messages": [{"role": "user", "content": "hi"}]},
        "preferred_output": [{"role": "assistant", "content": "hello"}],
        "non_preferred_output": [{"role": "assistant", "content": "go away"}],
    }
    dpo = store.add_file("t.jsonl", "fine-tune", to_jsonl([preference] * 10)).id
    _, error = file_error(store, dpo, "training_file", 10)
    assert error is not None and "preference_example_in_supervised_job" in error["message"]

    validation = store.add_file("v.jsonl", "fine-tune", to_jsonl([lines[2]])).id
    _, error = file_error(store, validation, "validation_file", 1)
    assert error is not None and error["code"] == "invalid_validation_file"


def test_result_file_has_the_hosted_columns(store: Store, train_file: str) -> None:
    job = parse(store, {"model": "tuneline-tiny", "training_file": train_file})
    store.create_job(job)
    store.add_event(
        job.id,
        "Step 1/2",
        type="metrics",
        data={"step": 1, "train_loss": 2.0, "train_mean_token_accuracy": 0.5},
    )
    store.add_event(
        job.id,
        "Step 2/2",
        type="metrics",
        data={
            "step": 2,
            "train_loss": 1.0,
            "train_mean_token_accuracy": 0.75,
            "valid_loss": 1.5,
            "valid_mean_token_accuracy": 0.6,
        },
    )
    text = result_csv(store, job.id).decode()
    assert text.splitlines() == [
        "step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy",
        "1,2.0,0.5,,",
        "2,1.0,0.75,1.5,0.6",
    ]
    assert base64.b64decode(base64.b64encode(text.encode())).decode() == text


def test_a_restart_requeues_running_jobs_and_gives_up_after_max_attempts(
    store: Store, train_file: str
) -> None:
    settings = ServerSettings(state_dir=store.state_dir, max_job_attempts=3)
    job = parse(store, {"model": "tuneline-tiny", "training_file": train_file})
    store.create_job(job)
    for attempt in (1, 2):
        store.transition(job.id, ("validating_files", "queued"), "running", worker_token=f"t{attempt}")
        JobRunner(store, settings).recover()
        again = store.get_job(job.id)
        assert again is not None and again.status == "queued" and again.attempts == attempt
        assert again.worker_token is None
    store.transition(job.id, ("queued",), "running", worker_token="t3")
    JobRunner(store, settings).recover()
    failed = store.get_job(job.id)
    assert failed is not None and failed.status == "failed" and failed.error["code"] == "server_restarted"  # type: ignore[index]
    messages = [e.message for e in store.list_events(job.id, after=None, limit=50)[0]]
    assert any("restarts from the beginning" in m for m in messages)


def test_a_job_the_scheduler_cannot_start_fails_alone_and_the_next_one_starts(
    store: Store, train_file: str, wait_for: Any
) -> None:
    settings = ServerSettings(state_dir=store.state_dir, warm_up=False)
    jobs = [parse(store, {"model": "tuneline-tiny", "training_file": train_file}) for _ in range(2)]
    for job in jobs:
        store.create_job(job)
    # A real fault on the first job only: its worker's log file cannot be opened (a folder is in the way).
    (store.logs_dir / f"{jobs[0].id}.log").mkdir()
    runner = JobRunner(store, settings)
    runner.start()
    try:
        failed = wait_for(
            lambda: (job := store.get_job(jobs[0].id)) and job.status == "failed" and job,
            timeout_s=30,
            what="the job that cannot start to fail",
        )
        assert failed.error["code"] == "server_error"
        assert "starting its training process: IsADirectoryError" in failed.error["message"]
        wait_for(lambda: jobs[1].id in runner.running_workers(), timeout_s=30, what="the next job to start")
    finally:
        runner.stop()
