"""The `retrain` flow with `training.method: dpo` and `reinforcement`, end to end: real Prefect (test
server), a real MLflow store in tmp_path, a real `tuneline serve` driven by the openai SDK.

DPO: preference lines go through the data plane (a chat line and a swapped pair are quarantined), the job
is created with method dpo and its beta, and the evaluation reports, beside the task metrics, the
candidate's and the base model's preference accuracy on the held-out pairs with Wilson intervals: DPO must
widen the margin of the preferred answer. Reinforcement: prompts with a grader field go through the data
plane (a line ending in an answer is quarantined), the job is created with the config's grader, and the
server's reward metrics come back."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml

from tuneline import tracking
from tuneline.config import load_config
from tuneline.flows.retrain import retrain
from tuneline.server.launcher import ServerProcess, start_server

KEY = "sk-retrain-dpo-tests-9f8e7d6c"
TOPICS = [
    ("billing", "charged twice for invoice", "we refunded the duplicate charge on invoice"),
    ("shipping", "parcel has not arrived for order", "we are tracing the parcel for order"),
    ("account", "cannot log in to account", "we sent a password reset link for account"),
    ("technical", "app crashes on start after update", "please reinstall version"),
]
WORDS = ["today", "again", "please help", "urgent", "since monday", "thanks", "asap", "for my mother"]


def preference_pairs(count: int) -> list[dict[str, Any]]:
    """Distinct pairs: the reply under its category label (the house style) preferred over the same reply
    without it, which is shorter: the base model, whose summed log-probability favours the shorter
    answer, gets them wrong; DPO must teach the label."""
    pairs = []
    for n in range(count):
        category, question, answer = TOPICS[n % len(TOPICS)]
        number = f"{n * 7919 % 10007}"
        extra = WORDS[(n // len(TOPICS)) % len(WORDS)]
        pairs.append(
            {
                "input": {
                    "messages": [
                        {"role": "user", "content": f"Hello, I {question} {number} {extra}. Help {n}?"}
                    ]
                },
                "preferred_output": [{"role": "assistant", "content": f"{category}: {answer} {number}."}],
                "non_preferred_output": [{"role": "assistant", "content": f"{answer} {number}."}],
            }
        )
    return pairs


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, seeded_state: Callable[[Path], Path]
) -> Iterator[ServerProcess]:
    with start_server(seeded_state(tmp_path_factory.mktemp("retrain-dpo-server")), api_key=KEY) as process:
        yield process


def write_config(
    folder: Path, lines: list[Any], server: ServerProcess, training: dict[str, Any] | None = None
) -> Path:
    (folder / "input.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines), encoding="utf-8")
    eval_example = {
        "messages": [
            {"role": "user", "content": "Hello, I charged twice for invoice 77 today. Help?"},
            {"role": "assistant", "content": "billing: we refunded the duplicate charge on invoice 77."},
        ]
    }
    (folder / "eval.jsonl").write_text(json.dumps(eval_example) + "\n", encoding="utf-8")
    canary = {
        "messages": [
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "Paris."},
        ]
    }
    (folder / "canary.jsonl").write_text(json.dumps(canary) + "\n", encoding="utf-8")
    config = {
        "data": {
            "sources": [{"name": "preferences", "uri": str(folder / "input.jsonl")}],
            "as_of": "2026-11-20",
            "eval_set": str(folder / "eval.jsonl"),
            "canary_set": str(folder / "canary.jsonl"),
        },
        "evaluation": {"few_shot_k": 0, "bootstrap_samples": 100, "max_tokens": 16},
        "validation": {"min_examples": 5},
        "export": {"validation_fraction": 0.3, "general_mix_fraction": 0.0},
        "provider": {
            "kind": "local",
            "base_url": server.base_url,
            "poll_interval_s": 0.2,
            "max_poll_interval_s": 1.0,
            "job_timeout_s": 400,
        },
        "training": {
            "method": "dpo",
            "dpo": {"beta": 0.2},
            "hyperparameters": {"n_epochs": 3, "batch_size": 4},
            "runs_dir": str(folder / "runs"),
            "suffix": re.sub(r"[^a-z0-9]+", "-", folder.name.lower())[-40:].strip("-"),
            **(training or {}),
        },
        "tracking": {
            "tracking_uri": f"sqlite:///{folder / 'mlflow.db'}",
            "artifact_location": str(folder / "mlartifacts"),
        },
        # The weights the preference accuracy is scored with: the state of the server that trains.
        "server": {"state_dir": str(server.state_dir)},
    }
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def test_a_dpo_retrain_reports_preference_accuracy(
    prefect_server: None, server: ServerProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TUNELINE_API_KEY", KEY)
    pairs = preference_pairs(28)
    chat_line = {
        "messages": [{"role": "user", "content": "a chat line"}, {"role": "assistant", "content": "x"}]
    }
    swapped = {
        **pairs[0],
        "preferred_output": pairs[0]["non_preferred_output"],
        "non_preferred_output": pairs[0]["preferred_output"],
    }
    config_path = write_config(tmp_path, [*pairs, chat_line, swapped], server)
    config = load_config(config_path)

    result = retrain(config_path=str(config_path))

    manifest = json.loads((Path(result.export_dir) / "manifest.json").read_text())
    assert manifest["method"] == "dpo"
    assert manifest["counts"]["quarantined_by_reason"] == {"contradiction": 1, "wrong_method_format": 1}
    assert manifest["counts"]["input_records"] == 30 == manifest["counts"]["kept"] + 2
    validation = [
        json.loads(line) for line in (Path(result.export_dir) / "validation.jsonl").read_text().splitlines()
    ]
    assert len(validation) >= 4 and all("preferred_output" in line for line in validation)

    client = openai.OpenAI(base_url=server.base_url, api_key=KEY)
    job = client.fine_tuning.jobs.retrieve(result.job_id or "")
    assert job.status == "succeeded" and job.method is not None and job.method.type == "dpo"
    assert job.method.dpo is not None and job.method.dpo.hyperparameters is not None
    assert job.method.dpo.hyperparameters.beta == 0.2

    run = tracking.read_run(config.tracking, result.mlflow_run_id)
    assert run.params["method"] == "dpo" and run.params["hyperparameters.requested.beta"] == "0.2"
    metrics = run.metrics
    assert metrics["eval/preference/n_pairs"] == len(validation)
    for role in ("candidate", "base"):
        low, mean, high = (
            metrics[f"eval/preference/{role}/accuracy{s}"] for s in ("_ci_low", "", "_ci_high")
        )
        assert 0.0 <= low <= mean <= high <= 1.0
    assert "eval/task/candidate/exact_match" in metrics  # the task metrics are still there
    # DPO pushes the preferred answer up against the reference (the base model) on held-out pairs too.
    figures = {k: round(v, 3) for k, v in metrics.items() if k.startswith("eval/preference")}
    print("dpo preference figures:", figures)  # shown with -s: the figures the README quotes
    assert metrics["eval/preference/candidate/mean_margin"] > metrics["eval/preference/base/mean_margin"], (
        figures
    )
    assert metrics["eval/preference/candidate/accuracy"] >= metrics["eval/preference/base/accuracy"], figures
    assert metrics["eval/preference/candidate/reward_accuracy"] >= 0.75, figures
    assert "eval/preference/base/reward_accuracy" not in metrics  # the base is the reference
    report = json.loads(
        (Path(config.tracking.artifact_location).glob("**/eval/report.json").__next__()).read_text()
    )
    assert report["preference_accuracy"]["candidate"]["interval"] == "wilson"
    assert KEY not in json.dumps(run.params) + json.dumps(run.tags)


NAMES = ["Ana", "Bo", "Chen", "Dara", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jun", "Kai", "Lea", "Mo", "Nia"]
THINGS = ["invoice", "parcel", "password", "update", "receipt", "refund", "login", "order", "card", "plan"]
GRADER = {
    "type": "string_check",
    "name": "digits",
    "input": "{{sample.output_text}}",
    "reference": "{{item.answer}}",
    "operation": "eq",
}


def prompt_lines(count: int) -> list[dict[str, Any]]:
    """Distinct prompts (no near-duplicates for dedupe to remove), each with its grader field."""
    return [
        {
            "messages": [
                {
                    "role": "user",
                    "content": f"{NAMES[n % len(NAMES)]} asks, about the {THINGS[(n * 3) % len(THINGS)]} "
                    f"{n * 7919 % 10007}: write the number ten in digits {WORDS[n % len(WORDS)]}.",
                }
            ],
            "answer": "10.",
        }
        for n in range(count)
    ]


def test_a_reinforcement_retrain_sends_the_grader_and_gets_rewards(
    prefect_server: None, server: ServerProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TUNELINE_API_KEY", KEY)
    answered = {"messages": [{"role": "user", "content": "ten?"}, {"role": "assistant", "content": "10."}]}
    training = {
        "method": "reinforcement",
        "dpo": None,
        "grader": GRADER,
        "reinforcement": {"compute_multiplier": 0.5, "eval_samples": 2},
        "hyperparameters": {"n_epochs": 1, "batch_size": 4},
    }
    config_path = write_config(tmp_path, [*prompt_lines(24), answered], server, training)
    config = load_config(config_path)

    result = retrain(config_path=str(config_path))

    manifest = json.loads((Path(result.export_dir) / "manifest.json").read_text())
    assert manifest["method"] == "reinforcement"
    assert manifest["counts"]["quarantined_by_reason"] == {"invalid_reinforcement_example": 1}
    client = openai.OpenAI(base_url=server.base_url, api_key=KEY)
    body = client.fine_tuning.jobs.with_raw_response.retrieve(result.job_id or "").http_response.json()
    assert body["status"] == "succeeded" and body["method"]["type"] == "reinforcement"
    assert body["method"]["reinforcement"]["grader"] == GRADER
    assert body["method"]["reinforcement"]["hyperparameters"]["compute_multiplier"] == 0.5
    events = [
        e.data
        for e in client.fine_tuning.jobs.list_events(result.job_id or "", limit=100)
        if e.type == "metrics"
    ]
    assert events and all("valid_mean_reward" in (d or {}) for d in events)

    run = tracking.read_run(config.tracking, result.mlflow_run_id)
    assert run.params["method"] == "reinforcement"
    assert (run.params["grader.type"], run.params["grader.name"]) == ("string_check", "digits")
    assert run.params["hyperparameters.requested.eval_samples"] == "2"
    assert "eval/task/candidate/exact_match" in run.metrics
    assert not any(k.startswith("eval/preference") for k in run.metrics)  # a dpo figure only
