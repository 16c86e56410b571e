"""The promotion gate decides right on real models: fine-tunes trained by a real `tuneline serve` on the
demo support data, evaluated through the provider and promoted in a real MLflow registry.

Models (trained once for the module; each later one continues from an earlier one, which keeps it cheap):
- decent:    the built-in model fine-tuned for four epochs on four support intents with the canary
             facts mixed in (the house style begun, full of mistakes);
- good:      decent trained four more epochs on the same mix (clearly better on the task, canary kept);
- forgetful: good trained two more epochs, harder, on support data alone (task kept, canary lost);
- worse:     good trained one more epoch on wrong answers (each intent answered with another's reply).
The task set is the demo eval set's questions of those intents (held-out tickets, never trained on). The
champion then moves exactly when it should, and `tuneline rollback` moves it back.
"""

from __future__ import annotations

import json
import random
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from tuneline import tracking
from tuneline.cli import app
from tuneline.config import Config, load_config
from tuneline.formats import check_example
from tuneline.metrics import answer_label
from tuneline.provider import Provider, connect
from tuneline.server.launcher import ServerProcess, start_server
from tuneline.tasks.evaluate import EvaluationError, EvaluationResult, run_evaluation
from tuneline.tasks.promote import Candidate, PromotionOutcome, promote
from tuneline.tracking import CHAMPION, PREVIOUS

PROJECT_ROOT = Path(__file__).resolve().parents[2]  # the repository
DATA_DIR = PROJECT_ROOT / "data"

INTENTS = (
    "billing/double_charge",
    "shipping/where_is_order",
    "account/password_reset",
    "technical/app_crash",
)
TRAIN_PER_INTENT = 30
TRAINING_TIMEOUT_S = 600

pytestmark = pytest.mark.slow  # trains four models: minutes on two shared cores


def clean_support_chats() -> dict[str, list[list[dict[str, Any]]]]:
    """Clean single-turn chats of the demo partitions by intent, in file order (the answer key's planted
    defects and anything the format rules refuse are left out)."""
    planted = json.loads((DATA_DIR / "planted_defects.json").read_text())
    defective = {(d["source"], d["line"]) for d in planted if d["reason"]}
    chats: dict[str, list[list[dict[str, Any]]]] = {intent: [] for intent in INTENTS}
    for path in sorted((DATA_DIR / "raw" / "support").glob("dt=*/part-*.jsonl")):
        source = str(path.relative_to(PROJECT_ROOT))
        for number, raw in enumerate(path.read_bytes().splitlines(), start=1):
            if (source, number) in defective:
                continue
            try:
                example = json.loads(raw)
            except ValueError:
                continue
            if check_example(example) is not None:
                continue
            messages = example["messages"]
            label = answer_label(messages[-1]["content"])
            if [m["role"] for m in messages] == ["system", "user", "assistant"] and label in chats:
                chats[label].append(messages)
    return chats


def jsonl(examples: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(e) + "\n" for e in examples)


@dataclass(frozen=True)
class Project:
    config_path: Path
    train_file: Path  # what `good` trained on: the few-shot examples come from it
    api_key: str

    def config(self) -> Config:
        return load_config(self.config_path)


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, seeded_state: Callable[[Path], Path]
) -> Iterator[ServerProcess]:
    with start_server(
        seeded_state(tmp_path_factory.mktemp("server")), api_key=secrets.token_urlsafe(16)
    ) as running:
        yield running


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, server: ServerProcess) -> Project:
    """Training files, the task eval set and a config whose provider is the module's server."""
    root = tmp_path_factory.mktemp("project")
    chats = clean_support_chats()
    canary_mix = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        for q, a in (
            (line["messages"][0]["content"], line["messages"][1]["content"])
            for line in map(json.loads, (DATA_DIR / "general" / "canary.jsonl").read_text().splitlines())
        )
    ]
    house = {intent: chats[intent][0][2]["content"] for intent in INTENTS}

    def support(wrong: bool = False) -> list[dict[str, Any]]:
        examples = []
        for index, intent in enumerate(INTENTS):
            answer_with = INTENTS[(index + 1) % len(INTENTS)] if wrong else intent
            for messages in chats[intent][:TRAIN_PER_INTENT]:
                examples.append(
                    {"messages": [*messages[:2], {"role": "assistant", "content": house[answer_with]}]}
                )
        return examples

    def shuffled(examples: list[dict[str, Any]]) -> list[dict[str, Any]]:
        random.Random(0).shuffle(examples)
        return examples

    files = {
        "mixed": shuffled(support() + canary_mix),
        "support_only": shuffled(support()),
        "wrong": shuffled(support(wrong=True) + canary_mix),
    }
    for name, examples in files.items():
        (root / f"{name}.jsonl").write_text(jsonl(examples))

    demo_eval = [
        json.loads(line) for line in (DATA_DIR / "eval" / "support_eval.jsonl").read_text().splitlines()
    ]
    task = [e for e in demo_eval if answer_label(e["messages"][-1]["content"]) in INTENTS]
    assert len(task) >= 20 and all(len(chats[i]) >= TRAIN_PER_INTENT for i in INTENTS)
    (root / "task_eval.jsonl").write_text(jsonl(task))

    document = {
        "data": {
            "sources": [{"name": "support", "uri": str(DATA_DIR / "raw" / "support" / "dt=*" / "*.jsonl")}],
            "eval_set": str(root / "task_eval.jsonl"),
            "canary_set": str(DATA_DIR / "general" / "canary.jsonl"),
        },
        "provider": {"kind": "compatible", "base_url": server.base_url, "max_retries": 2},
        # The answer cache, as configs/local.yaml has it: each model answers each question once, however
        # often it is evaluated (base, few-shot and champion answers are reused from decision to decision).
        "evaluation": {
            "bootstrap_samples": 300,
            "concurrency": 16,
            "answer_cache": str(root / "answers.sqlite"),
        },
        # Token F1: a two-epoch fine-tune of tuneline-tiny already writes the house style with typos
        # (exact match near 0, run to run), so F1 is what separates these models reliably. And tiny
        # loses a few canary answers to any fine-tune (about 0.9 of 1.0 kept): 0.15 keeps good models
        # promotable while a forgetful one (about 0.3) is stopped.
        "promotion": {"primary_metric": "token_f1", "max_canary_drop": 0.15},
        "tracking": {
            "tracking_uri": f"sqlite:///{root / 'mlflow.db'}",
            "artifact_location": str(root / "mlartifacts"),
            "experiment": "decisions",
        },
    }
    config_path = root / "config.yaml"
    config_path.write_text(yaml.safe_dump(document))
    # The same project with three questions per set, for the command-line smoke test.
    (root / "task_smoke.jsonl").write_text(jsonl(task[:3]))
    canary_lines = (DATA_DIR / "general" / "canary.jsonl").read_text().splitlines(keepends=True)
    (root / "canary_smoke.jsonl").write_text("".join(canary_lines[:3]))
    document["data"] |= {
        "eval_set": str(root / "task_smoke.jsonl"),
        "canary_set": str(root / "canary_smoke.jsonl"),
    }
    (root / "smoke.yaml").write_text(yaml.safe_dump(document))
    return Project(config_path, root / "mixed.jsonl", server.api_key)


def fine_tune(provider: Provider, training_file: Path, model: str, hyperparameters: dict[str, Any]) -> str:
    """Upload and train on the server, polling with a deadline; the fine-tuned model id."""
    with training_file.open("rb") as handle:
        uploaded = provider.client.files.create(file=(training_file.name, handle), purpose="fine-tune")
    job = provider.client.fine_tuning.jobs.create(
        model=model,
        training_file=uploaded.id,
        seed=7,
        method={"type": "supervised", "supervised": {"hyperparameters": hyperparameters}},
    )
    deadline = time.monotonic() + TRAINING_TIMEOUT_S
    while job.status not in {"succeeded", "failed", "cancelled"}:
        assert time.monotonic() < deadline, f"job {job.id} still {job.status} after {TRAINING_TIMEOUT_S}s"
        time.sleep(0.5)
        job = provider.client.fine_tuning.jobs.retrieve(job.id)
    assert job.status == "succeeded" and job.fine_tuned_model, f"job {job.id}: {job.status} {job.error}"
    return job.fine_tuned_model


@pytest.fixture(scope="module")
def provider(project: Project) -> Iterator[Provider]:
    with connect(project.config(), api_key=project.api_key) as connected:
        yield connected


@pytest.fixture(scope="module")
def models(project: Project, provider: Provider) -> dict[str, str]:
    root = project.config_path.parent
    decent = fine_tune(provider, root / "mixed.jsonl", "tuneline-tiny", {"n_epochs": 4, "batch_size": 8})
    good = fine_tune(provider, root / "mixed.jsonl", decent, {"n_epochs": 4, "batch_size": 8})
    return {
        "decent": decent,
        "good": good,
        "forgetful": fine_tune(
            provider,
            root / "support_only.jsonl",
            good,
            {"n_epochs": 2, "batch_size": 8, "learning_rate_multiplier": 2.0},
        ),
        "worse": fine_tune(provider, root / "wrong.jsonl", good, {"n_epochs": 1, "batch_size": 8}),
    }


@dataclass
class Decided:
    result: EvaluationResult
    outcome: PromotionOutcome
    run_id: str


def decide_on(project: Project, provider: Provider, model: str) -> Decided:
    """One nightly decision: evaluate the candidate, then the gate promotes or rejects it."""
    config = project.config()
    run_log = tracking.RunLog.start(config.tracking, flow="decision-test", name=f"decide {model}")
    run_id = run_log.run_id
    result = run_evaluation(config, provider, model, run_log, str(project.train_file))
    outcome = promote(
        config.tracking,
        config.promotion,
        result,
        Candidate(model, "local", "tuneline-tiny", "cafe" * 16, "ftjob-x"),
        run_log,
    )
    print(outcome.decision.summary())  # shown by pytest on failure: the figures behind the decision
    print(result.summary_table().to_string(index=False))
    return Decided(result, outcome, run_id)


def champion(project: Project) -> tracking.ModelVersionRecord | None:
    return tracking.alias_version(project.config().tracking, CHAMPION)


def failed(decided: Decided) -> set[str]:
    return {rule.rule for rule in decided.outcome.decision.failed_rules}


def test_the_gate_decides_right_and_rollback_restores(
    project: Project,
    provider: Provider,
    models: dict[str, str],
    prefect_server: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # No champion yet: the candidate that forgot the canary set beats the base model on the task, and
    # only the forgetting guard stops it.
    forgetful = decide_on(project, provider, models["forgetful"])
    assert forgetful.outcome.decision.reference == "base"
    assert failed(forgetful) == {"canary"}
    assert champion(project) is None

    # No champion yet: compared with the base model, decent is promoted (version 1).
    decent = decide_on(project, provider, models["decent"])
    assert decent.outcome.decision.reference == "base" and decent.outcome.decision.promoted
    assert champion(project).model_id == models["decent"]  # type: ignore[union-attr]

    # Clearly better than the champion: promoted (version 2); decent becomes `previous`.
    good = decide_on(project, provider, models["good"])
    assert good.outcome.decision.reference == "champion" and good.outcome.decision.promoted
    assert good.outcome.version == "2"
    assert champion(project).model_id == models["good"]  # type: ignore[union-attr]
    previous = tracking.alias_version(project.config().tracking, PREVIOUS)
    assert previous is not None and previous.model_id == models["decent"]

    # Worse than the champion: rejected, nothing moves.
    worse = decide_on(project, provider, models["worse"])
    assert {"min_delta", "significant"} <= failed(worse)
    assert (
        worse.result.estimate("task", "candidate", "token_f1").mean
        < good.result.estimate("task", "candidate", "token_f1").mean
    )

    # A tie (the champion's own model again): the same answers, so no gain and nothing significant.
    tie = decide_on(project, provider, models["good"])
    assert failed(tie) == {"min_delta", "significant"}
    assert tie.outcome.decision.rules[2].observed == 1.0  # p-value of identical answers

    # A failed run (a model the provider does not have) moves nothing either.
    with pytest.raises(EvaluationError, match="404"):
        decide_on(project, provider, "ft:tuneline-tiny:tuneline::missing0")
    assert champion(project).version == "2"  # type: ignore[union-attr]
    assert [v.version for v in tracking.model_versions(project.config().tracking)] == ["1", "2"]
    runs = [tracking.read_run(project.config().tracking, d.run_id).tags for d in (forgetful, worse, tie)]
    assert [tags["tuneline.promotion"] for tags in runs] == ["rejected"] * 3

    # `tuneline rollback` (the rollback flow) restores the previous champion and says who and why.
    monkeypatch.setenv("USER", "oncall")
    result = CliRunner().invoke(
        app, ["rollback", "--config", str(project.config_path), "--reason", "refund answers regressed"]
    )
    assert result.exit_code == 0, result.output
    assert "champion: version 1" in result.output
    restored = champion(project)
    assert restored is not None and restored.version == "1" and restored.model_id == models["decent"]
    assert restored.tags["tuneline.rollback.reason"] == "refund answers regressed"
    assert restored.tags["tuneline.rollback.from_version"] == "2"
    assert restored.tags["tuneline.rollback.by"]
    assert tracking.alias_version(project.config().tracking, PREVIOUS).version == "2"  # type: ignore[union-attr]
    summary = latest_artifact("rollback-summary")
    assert f"**Champion:** version 2 -> **version 1** (`{models['decent']}`)" in summary
    assert "**Why:** refund answers regressed" in summary


def latest_artifact(key: str) -> str:
    """The newest markdown artifact with `key` on the test session's Prefect server."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
            sort=ArtifactSort.CREATED_DESC,
            limit=1,
        )
    assert found, f"no {key} artifact"
    return str(found[0].data)


def test_evaluate_command_scores_any_model_and_promotes_nothing(
    project: Project, models: dict[str, str], prefect_server: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TUNELINE_API_KEY", project.api_key)
    before = champion(project)
    smoke = project.config_path.parent / "smoke.yaml"
    result = CliRunner().invoke(
        app,
        [
            "evaluate",
            "--model",
            models["worse"],
            "--config",
            str(smoke),
            "--train-file",
            str(project.train_file),
        ],
    )
    assert result.exit_code == 0, result.output
    for role in ("candidate", "base", "few_shot"):
        assert role in result.output
    assert models["worse"] in result.output
    runs = tracking.client(project.config().tracking).search_runs(
        [tracking.configure(project.config().tracking)], "tags.`tuneline.flow` = 'evaluate'"
    )
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.metrics["eval/task/n_examples"] == 3
    summary = latest_artifact("evaluate-summary")
    assert f"evaluated {models['worse']} (nothing was promoted)" in summary
    assert "`eval/task/candidate/exact_match`" in summary and runs[0].info.run_id in summary
    missing = CliRunner().invoke(
        app, ["evaluate", "--model", "ft:tuneline-tiny:tuneline::missing0", "--config", str(smoke)]
    )
    assert missing.exit_code == 1 and "404" in missing.output
    after = champion(project)
    assert (after.version if after else None) == (before.version if before else None)
