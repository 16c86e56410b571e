"""The DPO and reinforcement methods through the real `openai` SDK against a real server: a DPO job on
a generated preference set raises the held-out reward accuracy well above chance; unsupported
combinations get the hosted error shapes (400 with param; a file of the wrong kind fails the job with
invalid_training_file naming the line)."""

from __future__ import annotations

import io
import json
from typing import Any

import openai
import pytest

TOPICS = ["refund", "password", "shipping", "invoice", "login"]
TERMINAL = {"succeeded", "failed", "cancelled"}


def preference(index: int) -> dict[str, Any]:
    """The preferred answer names the question's topic; the other names a wrong one."""
    topic = TOPICS[index % 5]
    return {
        "input": {"messages": [{"role": "user", "content": f"Question {index}: help with my {topic}"}]},
        "preferred_output": [{"role": "assistant", "content": f"category: {topic}"}],
        "non_preferred_output": [{"role": "assistant", "content": f"category: {TOPICS[(index + 2) % 5]}"}],
    }


def prompt_line(index: int) -> dict[str, Any]:
    return {
        "messages": [{"role": "user", "content": f"Question {index}: help with my {TOPICS[index % 5]}"}],
        "topic": TOPICS[index % 5],
    }


def upload(client: Any, lines: list[Any], name: str = "train.jsonl") -> str:
    content = "".join(json.dumps(line) + "\n" for line in lines).encode()
    return client.files.create(file=(name, io.BytesIO(content)), purpose="fine-tune").id


def finished(client: Any, wait_for: Any, job_id: str, timeout_s: float = 240) -> Any:
    def done() -> Any:
        job = client.fine_tuning.jobs.retrieve(job_id)
        return job if job.status in TERMINAL else None

    return wait_for(done, timeout_s=timeout_s, what=f"{job_id} to finish")


GRADER = {
    "type": "string_check",
    "name": "topic",
    "input": "{{sample.output_text}}",
    "reference": "category: {{item.topic}}",
    "operation": "eq",
}


def test_dpo_job_raises_held_out_reward_accuracy(client: Any, wait_for: Any, validate: Any) -> None:
    training_file = upload(client, [preference(i) for i in range(60)])
    validation_file = upload(client, [preference(1000 + i) for i in range(20)], "valid.jsonl")
    job = client.fine_tuning.jobs.create(
        model="tuneline-tiny",
        training_file=training_file,
        validation_file=validation_file,
        seed=7,
        method={
            "type": "dpo",
            "dpo": {"hyperparameters": {"n_epochs": 3, "batch_size": 4, "learning_rate_multiplier": 0.25}},
        },
    )
    assert job.method.type == "dpo" and job.method.dpo.hyperparameters.beta == "auto"
    done = finished(client, wait_for, job.id)
    assert done.status == "succeeded", done.error
    body = client.fine_tuning.jobs.with_raw_response.retrieve(job.id).http_response.json()
    validate("FineTuningJob", body)
    assert body["method"] == {
        "type": "dpo",
        "dpo": {
            "hyperparameters": {"n_epochs": 3, "batch_size": 4, "learning_rate_multiplier": 0.25, "beta": 0.1}
        },
    }
    assert body["hyperparameters"] == {"n_epochs": 3, "batch_size": 4, "learning_rate_multiplier": 0.25}
    events = [e for e in client.fine_tuning.jobs.list_events(job.id, limit=200) if e.type == "metrics"][::-1]
    assert [e.data["step"] for e in events] == list(range(1, 46))
    for name in ("train_loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"):
        assert all(name in e.data for e in events)
    epochs = [e.data for e in events if "full_valid_rewards/accuracies" in e.data]
    curve = [
        (round(d["full_valid_rewards/accuracies"], 2), round(d["full_valid_rewards/margins"], 2))
        for d in epochs
    ]
    print(f"DPO held-out (reward accuracy, margin) per epoch: {curve}")
    # At the base model every reward is 0 (policy = reference): accuracy 0.5 is chance.
    assert epochs[-1]["full_valid_rewards/accuracies"] >= 0.9
    assert epochs[-1]["full_valid_rewards/margins"] > epochs[0]["full_valid_rewards/margins"] > 0
    answer = client.chat.completions.create(
        model=done.fine_tuned_model,
        messages=[{"role": "user", "content": "Question 7: help with my shipping"}],
    )
    assert answer.choices[0].message.content is not None


@pytest.mark.parametrize(
    ("method", "param", "needle"),
    [
        (
            {"type": "supervised", "dpo": {"hyperparameters": {"beta": 0.1}}},
            "method.dpo",
            "method.dpo does not go with method.type 'supervised'",
        ),
        (
            {"type": "dpo", "dpo": {"hyperparameters": {"beta": 3}}},
            "method.dpo.hyperparameters.beta",
            "beta must be",
        ),
        ({"type": "reinforcement"}, "method.reinforcement", "needs method.reinforcement.grader"),
        (
            {"type": "reinforcement", "reinforcement": {}},
            "method.reinforcement.grader",
            "Missing required parameter",
        ),
        (
            {"type": "reinforcement", "reinforcement": {"grader": {"type": "nope"}}},
            "method.reinforcement.grader.type",
            "'nope' is not one of",
        ),
        (
            {
                "type": "reinforcement",
                "reinforcement": {"grader": GRADER, "hyperparameters": {"compute_multiplier": 20}},
            },
            "method.reinforcement.hyperparameters.compute_multiplier",
            "compute_multiplier must be",
        ),
        ({"type": "ppo"}, "method.type", "method.type must be one of supervised, dpo, reinforcement"),
    ],
)
def test_unsupported_combinations_get_a_400_naming_the_param(
    client: Any, validate: Any, method: dict[str, Any], param: str, needle: str
) -> None:
    training_file = upload(client, [preference(i) for i in range(10)])
    with pytest.raises(openai.BadRequestError) as caught:
        client.fine_tuning.jobs.create(model="tuneline-tiny", training_file=training_file, method=method)
    body = caught.value.response.json()
    validate("ErrorResponse", body)
    assert body["error"]["param"] == param
    assert needle in body["error"]["message"]


def test_top_level_hyperparameters_are_for_supervised_jobs_only(client: Any) -> None:
    training_file = upload(client, [preference(i) for i in range(10)])
    with pytest.raises(openai.BadRequestError) as caught:
        client.fine_tuning.jobs.create(
            model="tuneline-tiny",
            training_file=training_file,
            hyperparameters={"n_epochs": 1},
            method={"type": "dpo"},
        )
    assert caught.value.response.json()["error"]["param"] == "hyperparameters"


@pytest.mark.parametrize(
    ("method", "lines", "needle"),
    [
        ({"type": "dpo"}, [prompt_line(i) for i in range(10)], "Line 1: method 'dpo' takes preference lines"),
        (
            {"type": "reinforcement", "reinforcement": {"grader": GRADER}},
            [prompt_line(i) for i in range(3)]
            + [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}]
            + [prompt_line(i) for i in range(3, 10)],
            "Line 4: the last message must be the user's",
        ),
        (
            {"type": "reinforcement", "reinforcement": {"grader": GRADER}},
            [preference(i) for i in range(10)],
            "Line 1: a reinforcement line needs a non-empty `messages` list",
        ),
        ({"type": "supervised"}, [preference(i) for i in range(10)], "preference_example_in_supervised_job"),
    ],
)
def test_a_file_of_the_wrong_kind_fails_the_job_naming_the_line(
    client: Any, wait_for: Any, method: dict[str, Any], lines: list[Any], needle: str
) -> None:
    job = client.fine_tuning.jobs.create(
        model="tuneline-tiny", training_file=upload(client, lines), method=method
    )
    done = finished(client, wait_for, job.id, timeout_s=60)
    assert done.status == "failed"
    assert done.error.code == "invalid_training_file" and done.error.param == "training_file"
    assert needle in done.error.message


def test_reinforcement_job_reports_its_method_and_rewards(client: Any, wait_for: Any, validate: Any) -> None:
    def ticket(n: int) -> dict[str, Any]:
        return {
            "messages": [{"role": "user", "content": f"Ticket {n}: write the number ten in digits."}],
            "answer": "10.",
        }

    grader = {**GRADER, "reference": "{{item.answer}}"}
    job = client.fine_tuning.jobs.create(
        model="tuneline-tiny",
        training_file=upload(client, [ticket(n) for n in range(12)]),
        validation_file=upload(client, [ticket(100 + n) for n in range(3)], "valid.jsonl"),
        method={
            "type": "reinforcement",
            "reinforcement": {
                "grader": grader,
                "hyperparameters": {
                    "n_epochs": 1,
                    "batch_size": 4,
                    "compute_multiplier": 0.5,
                    "eval_samples": 2,
                },
            },
        },
    )
    done = finished(client, wait_for, job.id)
    assert done.status == "succeeded", done.error
    body = client.fine_tuning.jobs.with_raw_response.retrieve(job.id).http_response.json()
    validate("FineTuningJob", body)
    assert body["method"]["type"] == "reinforcement" and set(body["method"]) == {"type", "reinforcement"}
    assert body["method"]["reinforcement"]["grader"] == grader
    resolved = body["method"]["reinforcement"]["hyperparameters"]
    assert resolved["compute_multiplier"] == 0.5 and resolved["eval_samples"] == 2
    assert resolved["eval_interval"] == 1 and resolved["reasoning_effort"] == "default"  # auto: ~10 per job
    events = [e.data for e in client.fine_tuning.jobs.list_events(job.id, limit=100) if e.type == "metrics"][
        ::-1
    ]
    assert [d["step"] for d in events] == [0, 1, 2, 3]
    assert all("valid_mean_reward" in d for d in events)
    assert all(0.0 <= d["train_mean_reward"] <= 1.0 and "train_kl" in d for d in events[1:])


def test_a_dpo_job_pauses_with_its_state_and_resumes_to_the_end(client: Any, wait_for: Any) -> None:
    job = client.fine_tuning.jobs.create(
        model="tuneline-tiny",
        training_file=upload(client, [preference(i) for i in range(20)]),
        seed=5,
        method={"type": "dpo", "dpo": {"hyperparameters": {"n_epochs": 4, "batch_size": 1, "beta": 0.2}}},
    )

    def stepped() -> Any:
        return [e for e in client.fine_tuning.jobs.list_events(job.id, limit=5) if e.type == "metrics"]

    wait_for(stepped, timeout_s=240, what=f"{job.id} to report a training step")
    assert client.fine_tuning.jobs.pause(job.id).status == "paused"

    def saved() -> Any:
        return [
            e.message
            for e in client.fine_tuning.jobs.list_events(job.id, limit=20)
            if "stopped at" in e.message
        ]

    stopped = wait_for(saved, timeout_s=60, what="the paused job's state to be saved")
    step = int(stopped[0].split()[4].rstrip(";"))
    assert client.fine_tuning.jobs.resume(job.id).status == "queued"
    done = finished(client, wait_for, job.id)
    assert done.status == "succeeded", done.error
    messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=200)]
    assert f"Fine-tuning job resumed from step {step}" in messages
    steps = [
        e.data["step"] for e in client.fine_tuning.jobs.list_events(job.id, limit=200) if e.type == "metrics"
    ]
    assert max(steps) == 80 and min(steps) <= step < 80
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert [c.step_number for c in checkpoints] == [80, 60, 40]


def test_a_score_model_grader_job_calls_this_server_and_never_shows_its_key(
    client: Any, wait_for: Any
) -> None:
    """A score_model grader is accepted at create (the server is its endpoint), and the worker grades
    through it: the job runs, with the server's key handed in its environment, not its command line."""
    grader = {
        "type": "score_model",
        "name": "judge",
        "model": "tuneline-tiny",
        "input": [{"role": "user", "content": "Score 0 to 1: {{sample.output_text}}"}],
        "range": [0, 1],
    }
    job = client.fine_tuning.jobs.create(
        model="tuneline-tiny",
        training_file=upload(client, [prompt_line(i) for i in range(10)]),
        method={
            "type": "reinforcement",
            "reinforcement": {
                "grader": grader,
                "hyperparameters": {"n_epochs": 1, "batch_size": 10, "compute_multiplier": 0.5},
            },
        },
    )
    done = finished(client, wait_for, job.id)
    assert done.status == "succeeded", done.error
    events = [e.data for e in client.fine_tuning.jobs.list_events(job.id, limit=20) if e.type == "metrics"]
    assert len(events) == 1 and "train_mean_reward" in events[0]
    # Every grade reached the server: none failed for want of an endpoint or a key.
    assert "train_grader_errors/model_grader_server_error" not in events[0], events[0]
    assert client.api_key not in json.dumps(
        client.fine_tuning.jobs.with_raw_response.retrieve(job.id).http_response.json()
    )
