"""tasks/train.py: the pure rules (overfitting guard, candidate choice, result file, config hash), then
find-or-create, event cursor, metrics, failure and cancellation against a real `tuneline serve`."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from openai.types.fine_tuning import FineTuningJob, FineTuningJobEvent
from openai.types.fine_tuning.jobs import FineTuningJobCheckpoint

from tuneline.config import Config, parse_config
from tuneline.provider import Provider, ProviderError, connect
from tuneline.server.launcher import ServerProcess, start_server
from tuneline.tasks.train import (
    FINAL_STATUSES,
    EventCursor,
    JobHooks,
    JobRequest,
    LossHistory,
    TrainingFailed,
    choose_candidate,
    decode_result_file,
    job_request,
    method_argument,
    read_new_events,
    resolved_hyperparameters,
    step_metrics,
    train_model,
    training_config_hash,
)
from tuneline.tasks.upload import upload_dataset

BASE = {"data": {"sources": [{"name": "s", "uri": "data/none.jsonl"}]}}


def checkpoint(step: int, full_valid_loss: float | None) -> FineTuningJobCheckpoint:
    return FineTuningJobCheckpoint.model_validate(
        {
            "id": f"ftckpt_{step}",
            "created_at": step,
            "fine_tuned_model_checkpoint": f"ft:tuneline-tiny:tuneline:support:abcd1234:ckpt-step-{step}",
            "fine_tuning_job_id": "ftjob-1",
            "metrics": {"step": step, "train_loss": 1.0, "full_valid_loss": full_valid_loss},
            "object": "fine_tuning.job.checkpoint",
            "step_number": step,
        }
    )


FINAL = "ft:tuneline-tiny:tuneline:support:abcd1234"


def test_candidate_is_the_best_earlier_checkpoint_when_validation_loss_rose() -> None:
    checkpoints = [checkpoint(10, 0.9), checkpoint(20, 0.6), checkpoint(30, 0.8)]
    chosen = choose_candidate(FINAL, checkpoints, choose_best=True)
    assert (chosen.model, chosen.source, chosen.step, chosen.full_valid_loss) == (
        f"{FINAL}:ckpt-step-20",
        "checkpoint",
        20,
        0.6,
    )
    # Not configured: the final model, whatever the losses.
    assert choose_candidate(FINAL, checkpoints, choose_best=False).model == FINAL


def test_candidate_is_the_final_model_when_it_is_the_best_or_unscored() -> None:
    assert (
        choose_candidate(FINAL, [checkpoint(10, 0.9), checkpoint(20, 0.5)], choose_best=True).source
        == "final"
    )
    assert (
        choose_candidate(FINAL, [checkpoint(10, None), checkpoint(20, None)], choose_best=True).source
        == "final"
    )
    assert choose_candidate(FINAL, [], choose_best=True).model == FINAL
    # A tie with the final model keeps the final model.
    assert (
        choose_candidate(FINAL, [checkpoint(10, 0.5), checkpoint(20, 0.5)], choose_best=True).source
        == "final"
    )


def test_overfitting_is_validation_loss_rising_while_training_loss_falls() -> None:
    history = LossHistory()
    for step, train, valid in [(1, 2.0, 1.5), (2, 1.5, 1.0), (3, 1.0, 1.2), (4, 0.6, 1.4)]:
        history.add(step, {"train_loss": train, "full_valid_loss": valid})
    warning = history.overfitting()
    assert warning is not None
    assert "full_valid_loss rose from 1.0000 (step 2) to 1.4000 (step 4)" in warning

    healthy = LossHistory()
    for step, train, valid in [(1, 2.0, 1.5), (2, 1.5, 1.0), (3, 1.0, 0.9)]:
        healthy.add(step, {"train_loss": train, "full_valid_loss": valid})
    assert healthy.overfitting() is None

    # Both rising is not overfitting (training diverged), and no validation data says nothing.
    diverging = LossHistory()
    for step, loss in [(1, 1.0), (2, 0.8), (3, 1.5), (4, 2.0)]:
        diverging.add(step, {"train_loss": loss, "valid_loss": loss})
    assert diverging.overfitting() is None
    assert LossHistory(points={1: {"train_loss": 1.0}}).overfitting() is None


def test_result_file_base64_or_plain_csv() -> None:
    csv = b"step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy\n1,2.5,0.1,,\n2,2.1,0.2,2.3,0.15\n"
    assert decode_result_file(base64.b64encode(csv)) == csv
    assert decode_result_file(base64.b64encode(csv) + b"\n") == csv
    assert decode_result_file(csv) == csv


def test_training_config_hash_covers_what_shapes_the_job_only() -> None:
    base = parse_config(BASE)
    other_eval = parse_config({**BASE, "evaluation": {"concurrency": 2}, "tracking": {"experiment": "x"}})
    more_epochs = parse_config({**BASE, "training": {"hyperparameters": {"n_epochs": 2}}})
    other_seed = parse_config({**BASE, "training": {"seed": 7}})
    assert training_config_hash(base) == training_config_hash(other_eval)
    assert len({training_config_hash(c) for c in (base, more_epochs, other_seed)}) == 3


def test_job_request_sends_auto_and_tags_the_job() -> None:
    config = parse_config(
        {**BASE, "training": {"hyperparameters": {"n_epochs": 2}, "suffix": "sup", "seed": 3}}
    )
    request = job_request(config, dataset_hash="d" * 64, training_file="file-t", validation_file=None)
    assert request.hyperparameters == {
        "n_epochs": 2,
        "batch_size": "auto",
        "learning_rate_multiplier": "auto",
    }
    assert request.metadata == {
        "tuneline_dataset_hash": "d" * 64,
        "tuneline_config_hash": training_config_hash(config),
    }
    assert (request.model, request.suffix, request.seed) == ("tuneline-tiny", "sup", 3)


def test_a_supervised_config_hash_is_what_it_was_before_the_methods() -> None:
    config = parse_config({**BASE, "training": {"hyperparameters": {"n_epochs": 2}, "seed": 3}})
    shaping = {
        "model": "tuneline-tiny",
        "method": "supervised",
        "hyperparameters": {"n_epochs": 2, "batch_size": "auto", "learning_rate_multiplier": "auto"},
        "suffix": "support",
        "seed": 3,
    }
    before = hashlib.sha256(json.dumps(shaping, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    assert training_config_hash(config) == before  # a rerun after the upgrade reattaches to its job
    request = job_request(config, dataset_hash="d" * 64, training_file="f", validation_file=None)
    assert method_argument(request) == {
        "type": "supervised",
        "supervised": {"hyperparameters": shaping["hyperparameters"]},
    }


def test_dpo_and_reinforcement_jobs_send_their_method() -> None:
    dpo = parse_config({**BASE, "training": {"method": "dpo", "dpo": {"beta": 0.25}}})
    request = job_request(dpo, dataset_hash="d" * 64, training_file="f", validation_file="v")
    assert method_argument(request) == {
        "type": "dpo",
        "dpo": {
            "hyperparameters": {
                "n_epochs": "auto",
                "batch_size": "auto",
                "learning_rate_multiplier": "auto",
                "beta": 0.25,
            }
        },
    }
    grader = {
        "type": "string_check",
        "name": "g",
        "input": "{{sample.output_text}}",
        "reference": "x",
        "operation": "eq",
    }
    rft = parse_config({**BASE, "training": {"method": "reinforcement", "grader": grader}})
    argument = method_argument(
        job_request(rft, dataset_hash="d" * 64, training_file="f", validation_file="v")
    )
    assert argument["type"] == "reinforcement" and argument["reinforcement"]["grader"] == grader
    assert argument["reinforcement"]["hyperparameters"]["eval_samples"] == "auto"
    hashes = {training_config_hash(c) for c in (parse_config(BASE), dpo, rft)}
    other_beta = parse_config({**BASE, "training": {"method": "dpo", "dpo": {"beta": 0.5}}})
    assert len(hashes | {training_config_hash(other_beta)}) == 4


def job(**fields: Any) -> FineTuningJob:
    return FineTuningJob.model_validate(
        {
            "id": "ftjob-1",
            "created_at": 1,
            "model": "tuneline-tiny",
            "object": "fine_tuning.job",
            "organization_id": "tuneline",
            "result_files": [],
            "seed": 1,
            "status": "running",
            "training_file": "file-t",
            "hyperparameters": {"n_epochs": "auto", "batch_size": "auto", "learning_rate_multiplier": "auto"},
            **fields,
        }
    )


def test_resolved_hyperparameters_leave_out_auto() -> None:
    assert resolved_hyperparameters(job()) == {}
    resolved = job(
        method={
            "type": "supervised",
            "supervised": {
                "hyperparameters": {"n_epochs": 3, "batch_size": 2, "learning_rate_multiplier": 1.5}
            },
        }
    )
    assert resolved_hyperparameters(resolved) == {
        "n_epochs": 3,
        "batch_size": 2,
        "learning_rate_multiplier": 1.5,
    }
    dpo = job(
        method={"type": "dpo", "dpo": {"hyperparameters": {"n_epochs": 2, "beta": 0.1, "batch_size": "auto"}}}
    )
    assert resolved_hyperparameters(dpo) == {"n_epochs": 2, "beta": 0.1}
    # Older providers only fill the deprecated top-level field.
    top_level = job(hyperparameters={"n_epochs": 4, "batch_size": "auto", "learning_rate_multiplier": 2.0})
    assert resolved_hyperparameters(top_level) == {"n_epochs": 4, "learning_rate_multiplier": 2.0}


def event(number: int, created_at: int, *, data: dict[str, Any] | None = None) -> FineTuningJobEvent:
    return FineTuningJobEvent.model_validate(
        {
            "id": f"ftevent-{number}",
            "created_at": created_at,
            "level": "info",
            "message": f"event {number}",
            "object": "fine_tuning.job.event",
            "type": "metrics" if data else "message",
            "data": data,
        }
    )


def test_step_metrics_keep_only_known_numeric_metrics() -> None:
    metrics = event(
        1, 1, data={"step": 3, "total_steps": 9, "train_loss": 1.25, "valid_loss": None, "other": 5}
    )
    assert step_metrics(metrics) == (3, {"train_loss": 1.25})
    assert step_metrics(event(2, 1)) is None


def test_event_cursor_stops_at_the_newest_seen_event_or_anything_older() -> None:
    cursor = EventCursor("ftevent-5", 100)
    assert cursor.reached(event(5, 100))
    assert cursor.reached(event(3, 99))  # older than the cursor even if its id was never seen
    assert not cursor.reached(event(6, 100))  # same second, newer id
    assert not cursor.reached(event(7, 101))


# --- against a real `tuneline serve` ------------------------------------------------------------------

KEY = "sk-train-tests"


def chat(question: str, answer: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def write_split(folder: Path, name: str, examples: list[dict[str, Any]]) -> bytes:
    data = b"".join(json.dumps(e, sort_keys=True, separators=(",", ":")).encode() + b"\n" for e in examples)
    (folder / name).write_bytes(data)
    return data


def small_config(**provider: Any) -> Config:
    return parse_config(
        {
            **BASE,
            "provider": {"kind": "local", "poll_interval_s": 0.2, "max_poll_interval_s": 1.0, **provider},
            "training": {"hyperparameters": {"n_epochs": 2, "batch_size": 4}},
        }
    )


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, seeded_state: Callable[[Path], Path]
) -> Iterator[ServerProcess]:
    with start_server(seeded_state(tmp_path_factory.mktemp("train-server")), api_key=KEY) as process:
        yield process


@pytest.fixture
def provider(server: ServerProcess, monkeypatch: pytest.MonkeyPatch) -> Iterator[Provider]:
    monkeypatch.setenv("TUNELINE_API_KEY", KEY)
    with connect(small_config(base_url=server.base_url)) as connected:
        yield connected


def uploaded_request(
    provider: Provider,
    folder: Path,
    config: Config,
    train: list[dict[str, Any]],
    validation: list[dict[str, Any]],
) -> JobRequest:
    folder.mkdir(parents=True, exist_ok=True)
    blob = (
        write_split(folder, "train.jsonl", train)
        + b"\0"
        + write_split(folder, "validation.jsonl", validation)
    )
    dataset_hash = hashlib.sha256(blob).hexdigest()
    files = upload_dataset(provider, folder, dataset_hash=dataset_hash, settings=config.provider)
    return job_request(
        config,
        dataset_hash=dataset_hash,
        training_file=files.training.file_id,
        validation_file=files.validation.file_id if files.validation else None,
    )


def jobs_with(provider: Provider, request: JobRequest) -> list[FineTuningJob]:
    return list(provider.client.fine_tuning.jobs.list(metadata=request.metadata, limit=100))


def test_timeout_then_reattach_then_success(provider: Provider, tmp_path: Path) -> None:
    config = small_config(base_url=provider.base_url, job_timeout_s=0.5)
    train = [
        chat(f"Order {n} never came, item {n * 13}?", f"shipping: reshipping order {n} today.")
        for n in range(14)
    ]
    validation = [chat(f"Invoice {n} charged twice?", f"billing: refunded invoice {n}.") for n in range(4)]
    request = uploaded_request(provider, tmp_path / "export", config, train, validation)

    with pytest.raises(ProviderError, match=r"still .* after 0.5s .*rerun to reattach"):
        train_model(provider, config, request)
    [job] = jobs_with(provider, request)
    assert job.status not in FINAL_STATUSES
    assert job.metadata == request.metadata
    assert job.method is not None and job.method.type == "supervised"

    seen_statuses: list[str] = []
    metrics: list[tuple[int, dict[str, float]]] = []
    hooks = JobHooks(
        on_job=lambda j: seen_statuses.append(j.status), on_metrics=lambda step, m: metrics.append((step, m))
    )
    outcome = train_model(provider, small_config(base_url=provider.base_url), request, hooks)
    assert (outcome.job_id, outcome.reattached) == (job.id, True)
    assert [j.id for j in jobs_with(provider, request)] == [job.id]  # still one job
    assert seen_statuses[-1] == "succeeded"
    assert outcome.fine_tuned_model.startswith("ft:tuneline-tiny:")
    assert outcome.candidate.model.startswith(outcome.fine_tuned_model)
    assert outcome.trained_tokens and outcome.trained_tokens > 0
    assert outcome.resolved_hyperparameters["n_epochs"] == 2
    assert outcome.checkpoints and all(c["fine_tuning_job_id"] == job.id for c in outcome.checkpoints)
    assert outcome.result_csv is not None and outcome.result_csv.startswith(b"step,train_loss")
    steps = [step for step, _ in metrics]
    assert steps == sorted(steps) and len(steps) >= 2  # oldest first, as the job went
    assert all("train_loss" in m for _, m in metrics)
    assert any("full_valid_loss" in m for _, m in metrics)

    # Events by cursor: everything once, oldest first, across small pages; then nothing new.
    everything = list(provider.client.fine_tuning.jobs.list_events(job.id, limit=100))
    cursor = EventCursor()
    assert [e.id for e in read_new_events(provider, job.id, cursor, page_size=3)] == [
        e.id for e in reversed(everything)
    ]
    requests: list[str] = []
    counting = dataclasses.replace(
        provider,
        client=provider.client.with_options(
            http_client=openai.DefaultHttpxClient(
                event_hooks={"request": [lambda r: requests.append(r.url.path)]}
            )
        ),
    )
    assert read_new_events(counting, job.id, cursor, page_size=3) == []
    assert requests == [f"/v1/fine_tuning/jobs/{job.id}/events"]  # one page, not the whole list

    # A rerun with the same data reuses the succeeded job and pays nothing.
    again = train_model(provider, config, request)
    assert (again.job_id, again.reattached, again.candidate) == (job.id, True, outcome.candidate)
    assert len(jobs_with(provider, request)) == 1


def test_a_failed_job_raises_its_code_and_message(provider: Provider, tmp_path: Path) -> None:
    config = small_config(base_url=provider.base_url)
    # Three examples: a shape the pipeline could be configured to let through, under the server's minimum.
    train = [chat(f"Reset account {n}?", f"account: reset link {n} sent.") for n in range(3)]
    request = uploaded_request(provider, tmp_path / "export", config, train, [])
    with pytest.raises(TrainingFailed) as caught:
        train_model(provider, config, request)
    assert caught.value.code == "invalid_training_file"
    assert "failed: invalid_training_file:" in str(caught.value)
    [job] = jobs_with(provider, request)
    assert job.status == "failed" and job.error is not None and job.error.message in str(caught.value)
    # A failed job is not reattached to: the next run creates a new one (and fails the same way).
    with pytest.raises(TrainingFailed):
        train_model(provider, config, request)
    assert len(jobs_with(provider, request)) == 2


def test_a_cancellation_request_cancels_the_provider_job(provider: Provider, tmp_path: Path) -> None:
    config = small_config(base_url=provider.base_url)
    train = [
        chat(f"App {n} crashes on start, build {n * 3}?", f"technical: reinstall build {n}.")
        for n in range(12)
    ]
    request = uploaded_request(provider, tmp_path / "export", config, train, [])
    polls: list[int] = []

    def cancel_on_second_poll() -> bool:
        polls.append(1)
        return len(polls) >= 2

    with pytest.raises(TrainingFailed, match="cancelled with the flow run") as caught:
        train_model(provider, config, request, JobHooks(should_cancel=cancel_on_second_poll))
    assert caught.value.code == "cancelled"
    [job] = jobs_with(provider, request)
    deadline = time.monotonic() + 60
    while job.status not in FINAL_STATUSES and time.monotonic() < deadline:
        time.sleep(0.2)
        job = provider.client.fine_tuning.jobs.retrieve(job.id)
    assert job.status == "cancelled"
