"""The `retrain` flow end to end: real Prefect (test server), real MLflow store in tmp_path, real
`tuneline serve` processes. Counted on the server: a rerun uploads nothing and starts no job; a run
killed with SIGKILL mid-training is reattached (and its MLflow run closed as KILLED); a faulty server is survived, with the retries in the
Prefect log; a file only the server refuses fails the run with the server's code; cancelling the flow run
cancels the job; `tuneline run --dry-run` stops after prepare."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

import openai
import pytest
import yaml
from typer.testing import CliRunner

from tuneline import tracking
from tuneline.cli import app
from tuneline.config import load_config
from tuneline.flows.retrain import retrain, secret_block_key
from tuneline.provider import ProviderError, connect
from tuneline.server.launcher import ServerProcess, start_server
from tuneline.tasks.train import FINAL_STATUSES, TrainingFailed, training_config_hash

PROJECT_ROOT = Path(__file__).resolve().parents[2]  # the repository

KEY = "sk-retrain-tests-0a1b2c3d4e5f"
TOPICS = [
    ("billing", "charged twice for invoice", "we refunded the duplicate charge on invoice"),
    ("shipping", "parcel has not arrived for order", "we are tracing the parcel for order"),
    ("account", "cannot log in to account", "we sent a password reset link for account"),
    ("technical", "app crashes on start after update", "please reinstall version"),
    ("billing", "want a copy of receipt", "we emailed the receipt for purchase"),
    ("shipping", "wrong item delivered in box", "we arranged a free return for box"),
]
WORDS = ["today", "again", "please help", "urgent", "since monday", "thanks", "asap", "for my mother"]


def support_examples(count: int, salt: str) -> list[dict[str, Any]]:
    """Varied, distinct chat examples (no duplicates or near-duplicates for dedupe to remove)."""
    examples = []
    for n in range(count):
        category, question, answer = TOPICS[n % len(TOPICS)]
        number = f"{salt}{n * 7919 % 10007}"
        extra = WORDS[(n // len(TOPICS)) % len(WORDS)]
        examples.append(
            {
                "messages": [
                    {
                        "role": "user",
                        "content": f"Hello, I {question} {number} {extra}. What now {salt} {n}?",
                    },
                    {"role": "assistant", "content": f"{category}: {answer} {number}."},
                ]
            }
        )
    return examples


def write_config(
    folder: Path, examples: list[dict[str, Any]], *, base_url: str | None, n_epochs: int = 2, **overrides: Any
) -> Path:
    """A small config in `folder`: one input file, its own eval set, MLflow store and server state."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "input.jsonl").write_text("".join(json.dumps(e) + "\n" for e in examples), encoding="utf-8")
    eval_example = {
        "messages": [
            {"role": "user", "content": "What colour is the sky on a clear day?"},
            {"role": "assistant", "content": "Blue."},
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
    config: dict[str, Any] = {
        "data": {
            "sources": [{"name": "support", "uri": str(folder / "input.jsonl")}],
            "as_of": "2026-11-20",
            "eval_set": str(folder / "eval.jsonl"),
            "canary_set": str(folder / "canary.jsonl"),
        },
        # Evaluation (after train) kept to one task and one canary question: these tests are about training.
        "evaluation": {"few_shot_k": 0, "bootstrap_samples": 100, "max_tokens": 16},
        "validation": {"min_examples": 5},
        "export": {"validation_fraction": 0.25, "general_mix_fraction": 0.0},
        "provider": {
            "kind": "local",
            "base_url": base_url,
            "max_retries": 4,
            "poll_interval_s": 0.2,
            "max_poll_interval_s": 1.0,
            "job_timeout_s": 300,
        },
        # A suffix per test folder: each test's jobs have their own training config hash on the shared server.
        "training": {
            "hyperparameters": {"n_epochs": n_epochs, "batch_size": 4},
            "runs_dir": str(folder / "runs"),
            "suffix": re.sub(r"[^a-z0-9]+", "-", folder.name.lower())[-40:].strip("-"),
        },
        "tracking": {
            "tracking_uri": f"sqlite:///{folder / 'mlflow.db'}",
            "artifact_location": str(folder / "mlartifacts"),
        },
        "server": {"state_dir": str(folder / "server-state")},
    }
    for dotted, value in overrides.items():
        node = config
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, seeded_state: Callable[[Path], Path]
) -> Iterator[ServerProcess]:
    with start_server(seeded_state(tmp_path_factory.mktemp("retrain-server")), api_key=KEY) as process:
        yield process


@pytest.fixture(autouse=True)
def api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNELINE_API_KEY", KEY)


def sdk(server: ServerProcess) -> openai.OpenAI:
    """The test's own view of the server, to count what the pipeline did there."""
    return openai.OpenAI(base_url=server.base_url, api_key=KEY, max_retries=5)


def jobs_for(client: openai.OpenAI, config_path: Path) -> list[Any]:
    config = load_config(config_path)
    return [
        j
        for j in client.fine_tuning.jobs.list(limit=100)
        if (j.metadata or {}).get("tuneline_config_hash") == training_config_hash(config)
    ]


def files_named_after(client: openai.OpenAI, dataset_hash: str) -> list[Any]:
    return [f for f in client.files.list(purpose="fine-tune") if f.filename.startswith(dataset_hash)]


def subprocess_env() -> dict[str, str]:
    from prefect.settings import PREFECT_API_URL

    return {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value()), "TUNELINE_API_KEY": KEY}


def start_run_process(config_path: Path, log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "tuneline.cli", "run", "--config", str(config_path)],
            cwd=PROJECT_ROOT,
            env=subprocess_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def wait_for_active_job(
    client: openai.OpenAI, config_path: Path, process: subprocess.Popen[bytes], log_path: Path
) -> Any:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        found = jobs_for(client, config_path)
        if found:
            return found[0]
        assert process.poll() is None, (
            f"the run exited before creating a job:\n{log_path.read_text()[-3000:]}"
        )
        time.sleep(0.1)
    raise AssertionError(f"no job created within 180 s:\n{log_path.read_text()[-3000:]}")


def wait_for_job(client: openai.OpenAI, job_id: str, statuses: set[str], timeout_s: float = 240) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in statuses:
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} not in {statuses} within {timeout_s} s")


def test_a_killed_run_is_reattached_and_the_rerun_pays_nothing_twice(
    prefect_server: None, server: ServerProcess, tmp_path: Path
) -> None:
    """`tuneline run` killed with SIGKILL while its job trains; the rerun with the same data uploads
    nothing, starts no job (both counted on the server), follows the same job to the end and logs the
    whole run to MLflow, without the key anywhere."""
    config_path = write_config(tmp_path, support_examples(16, "k"), base_url=server.base_url)
    config = load_config(config_path)
    client = sdk(server)
    log_path = tmp_path / "killed-run.log"
    process = start_run_process(config_path, log_path)
    try:
        job = wait_for_active_job(client, config_path, process, log_path)
        status_when_killed = client.fine_tuning.jobs.retrieve(job.id).status
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    assert status_when_killed not in FINAL_STATUSES
    files_before = {f.id for f in client.files.list(purpose="fine-tune")}

    result = retrain(config_path=str(config_path))
    assert result.job_id == job.id
    assert result.candidate_model is not None and result.candidate_model.startswith("ft:tuneline-tiny:")
    assert {f.id for f in client.files.list(purpose="fine-tune")} == files_before  # nothing uploaded
    assert len(files_named_after(client, result.dataset_hash)) == 2  # train + validation, once each
    assert [j.id for j in jobs_for(client, config_path)] == [job.id]  # no second job
    assert client.fine_tuning.jobs.retrieve(job.id).status == "succeeded"

    run = tracking.read_run(config.tracking, result.mlflow_run_id)
    assert run.status == "FINISHED"
    # The killed process could not close its own MLflow run: the rerun that took over its job did.
    found = tracking.client(config.tracking).search_runs([tracking.configure(config.tracking)])
    (killed_run,) = [
        tracking.read_run(config.tracking, r.info.run_id) for r in found if r.info.run_id != run.run_id
    ]
    assert killed_run.status == "KILLED" and killed_run.tags["tuneline.failure"] == "abandoned"
    assert f"run {run.run_id} took over job {job.id}" in killed_run.tags["tuneline.abandoned"]
    assert run.params["provider"] == "local" and run.params["base_model"] == "tuneline-tiny"
    assert run.params["hyperparameters.requested.n_epochs"] == "2"
    assert run.params["hyperparameters.requested.learning_rate_multiplier"] == "auto"
    assert run.params["hyperparameters.resolved.n_epochs"] == "2"
    assert float(run.params["hyperparameters.resolved.learning_rate_multiplier"]) > 0
    assert run.params["dataset_hash"] == result.dataset_hash
    assert run.params["training_file_id"] == result.training_file_id
    assert run.params["validation_file_id"] == result.validation_file_id
    assert run.params["training_file_reused"] == "True" and run.metrics["files_uploaded"] == 0
    assert run.params["job_id"] == job.id and run.params["job_reattached"] == "True"
    assert run.params["fine_tuned_model"] == result.fine_tuned_model
    assert run.params["candidate_model"] == result.candidate_model
    assert run.metrics["trained_tokens"] == result.trained_tokens and result.trained_tokens
    assert (
        "estimated_cost_usd" in run.metrics and run.metrics["actual_cost_usd"] == 0.0
    )  # tuneline-tiny is free
    assert run.tags["prefect.flow_run_id"] and run.tags["prefect.flow_run_name"]
    assert run.tags["tuneline.flow"] == "retrain"
    train_loss = tracking.metric_history(config.tracking, result.mlflow_run_id, "train_loss")
    assert len({step for step, _ in train_loss}) >= 2  # a loss curve, not a single point
    assert tracking.metric_history(config.tracking, result.mlflow_run_id, "full_valid_loss")
    artifacts = tracking.list_artifacts(config.tracking, result.mlflow_run_id)
    assert {"training/results.csv", "training/checkpoints.json", "prepare/manifest.json"} <= set(artifacts)
    results = tracking.download_artifact(
        config.tracking, result.mlflow_run_id, "training/results.csv", tmp_path / "dl"
    )
    assert results.read_text().startswith("step,train_loss")

    # The key is nowhere in the run: params, tags, artifacts.
    assert all(KEY not in value for value in [*run.params.values(), *run.tags.values()])
    for path in artifacts:
        local = tracking.download_artifact(config.tracking, result.mlflow_run_id, path, tmp_path / "all")
        assert KEY.encode() not in local.read_bytes(), path

    # What a person reads first on the Prefect flow run: data, job, evaluation, decision, MLflow link.
    summary = retrain_summary(run.tags["prefect.flow_run_id"])
    assert f"**Dataset hash:** `{result.dataset_hash}`" in summary
    manifest = json.loads(
        tracking.download_artifact(
            config.tracking, result.mlflow_run_id, "prepare/manifest.json", tmp_path / "m"
        ).read_text()
    )
    assert f"| kept | {manifest['counts']['kept']} |" in summary and "### Quarantined by reason" in summary
    assert f"| job id | {job.id} |" in summary and str(result.candidate_model) in summary
    assert "`eval/task/candidate/exact_match`" in summary
    verdict = "PROMOTED" if result.promoted else "REJECTED"
    assert f"## Decision\n\n**{verdict}** against the base" in summary
    assert tracking.run_url(config.tracking, result.mlflow_run_id) in summary
    assert KEY not in summary


def retrain_summary(flow_run_id: str) -> str:
    """The markdown artifact of a retrain flow run."""
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[UUID(flow_run_id)]),
                key=ArtifactFilterKey(any_=["retrain-summary"]),
            )
        )
    assert len(found) == 1, found
    return str(found[0].data)


def test_the_embedded_server_with_faults_is_survived_and_the_retries_are_logged(
    prefect_server: None, tmp_path: Path, seeded_state: Callable[[Path], Path]
) -> None:
    """provider.kind local without base_url: the flow starts `tuneline serve` itself, here with 20 % of
    requests answered 429/500/503."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    seeded_state(tmp_path / "server-state")
    config_path = write_config(
        tmp_path, support_examples(16, "f"), base_url=None, n_epochs=1, **{"server.fault_rate": 0.2}
    )
    config = load_config(config_path)
    result = retrain(config_path=str(config_path))
    assert result.candidate_model is not None

    # Counted on the server the run left behind (restarted on its state, without faults).
    with start_server(tmp_path / "server-state", api_key=KEY) as restarted:
        client = sdk(restarted)
        assert len(files_named_after(client, result.dataset_hash)) == 2
        assert [j.id for j in jobs_for(client, config_path)] == [result.job_id]
        assert client.fine_tuning.jobs.retrieve(result.job_id).fine_tuned_model == result.fine_tuned_model

    flow_run_id = tracking.read_run(config.tracking, result.mlflow_run_id).tags["prefect.flow_run_id"]
    deadline = time.monotonic() + 30
    retries: list[str] = []
    while not retries and time.monotonic() < deadline:
        with get_client(sync_client=True) as prefect:
            logs = prefect.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[UUID(flow_run_id)])), limit=200
            )
        retries = [log.message for log in logs if "retry" in log.message]
        time.sleep(0.5)
    assert retries, "no retry in the flow run's Prefect log"
    assert any(code in m for m in retries for code in ("429", "500", "503"))
    # Jobs on this provider are bounded by a Prefect global concurrency limit from the config.
    with get_client(sync_client=True) as prefect:
        limit = prefect.read_global_concurrency_limit_by_name("tuneline-jobs-local")
    assert limit.limit == config.provider.max_concurrent_jobs


def test_a_file_only_the_server_refuses_fails_the_run_with_its_code(
    prefect_server: None, server: ServerProcess, tmp_path: Path
) -> None:
    # 7 examples pass the pipeline's own gate (min_examples 5) but not the server's minimum of 10.
    examples = support_examples(7, "r")
    config_path = write_config(
        tmp_path, examples, base_url=server.base_url, **{"export.validation_fraction": 0.0}
    )
    config = load_config(config_path)
    outcome = CliRunner().invoke(app, ["run", "--config", str(config_path)])
    assert outcome.exit_code == 1, outcome.output
    assert "failed: invalid_training_file:" in outcome.output and "at least 10 examples" in outcome.output
    run_id = tracking.find_run(config.tracking, {"tuneline.flow": "retrain"})
    assert run_id is not None
    run = tracking.read_run(config.tracking, run_id)
    assert run.status == "FAILED" and run.tags["tuneline.failure"] == "invalid_training_file"
    assert run.tags["tuneline.job_id"] == run.params["job_id"]
    assert "candidate_model" not in run.params and "tuneline.candidate_model" not in run.tags


def test_cancelling_the_flow_run_cancels_the_job(
    prefect_server: None, server: ServerProcess, tmp_path: Path
) -> None:
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelling

    config_path = write_config(tmp_path, support_examples(16, "c"), base_url=server.base_url, n_epochs=8)
    config = load_config(config_path)
    client = sdk(server)
    outcome: list[BaseException | Any] = []

    def run_flow() -> None:
        try:
            outcome.append(retrain(config_path=str(config_path)))
        except BaseException as exc:
            outcome.append(exc)

    runner = threading.Thread(target=run_flow, daemon=True)
    runner.start()
    deadline = time.monotonic() + 180
    found: list[Any] = []
    while not found and time.monotonic() < deadline and runner.is_alive():
        found = jobs_for(client, config_path)
        time.sleep(0.1)
    assert found, f"no job was created: {outcome}"
    run_id = tracking.find_run(config.tracking, {"tuneline.flow": "retrain"})
    assert run_id is not None
    flow_run_id = tracking.read_run(config.tracking, run_id).tags["prefect.flow_run_id"]
    with get_client(sync_client=True) as prefect:
        prefect.set_flow_run_state(UUID(flow_run_id), Cancelling(), force=True)
    runner.join(timeout=120)
    assert not runner.is_alive()
    assert isinstance(outcome[0], TrainingFailed) and outcome[0].code == "cancelled"
    assert wait_for_job(client, found[0].id, set(FINAL_STATUSES), timeout_s=60).status == "cancelled"
    assert tracking.read_run(config.tracking, run_id).status == "FAILED"


def test_dry_run_stops_after_prepare_and_prints_the_estimate(prefect_server: None, tmp_path: Path) -> None:
    config_path = write_config(tmp_path, support_examples(12, "d"), base_url="http://127.0.0.1:9/v1")
    outcome = CliRunner().invoke(app, ["run", "--config", str(config_path), "--dry-run"])
    assert outcome.exit_code == 0, outcome.output
    assert "estimated training cost $0.0000" in outcome.output
    config = load_config(config_path)
    run = tracking.read_run(
        config.tracking, tracking.find_run(config.tracking, {"tuneline.flow": "retrain"}) or ""
    )
    assert run.tags["tuneline.dry_run"] == "true" and "training_file_id" not in run.params


def test_bad_usage_exits_2(tmp_path: Path) -> None:
    config_path = write_config(tmp_path, support_examples(12, "u"), base_url=None)
    outcome = CliRunner().invoke(app, ["run", "--config", str(config_path), "--as-of", "2026-13-40"])
    assert outcome.exit_code == 2
    assert "data.as_of" in outcome.output
    missing = CliRunner().invoke(app, ["run", "--config", str(tmp_path / "nope.yaml")])
    assert missing.exit_code == 2 and "config file not found" in missing.output


def test_the_key_can_come_from_a_prefect_secret_block(
    prefect_server: None, server: ServerProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prefect.blocks.system import Secret

    Secret(value=KEY).save("tuneline-test-provider-key", overwrite=True)
    config_path = write_config(
        tmp_path,
        support_examples(12, "s"),
        base_url=server.base_url,
        **{"provider.api_key_secret_block": "tuneline-test-provider-key"},
    )
    config = load_config(config_path)
    monkeypatch.delenv("TUNELINE_API_KEY")
    with (
        pytest.raises(ProviderError, match="set TUNELINE_API_KEY or create the Prefect Secret block"),
        connect(config),
    ):
        pass
    key = secret_block_key(config)
    assert key == KEY
    with connect(config, api_key=key) as provider:
        assert list(provider.client.models.list())
