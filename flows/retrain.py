"""The `retrain` flow: prepare -> upload -> train, one MLflow run per flow run, the candidate model id out.

Guarantees:
- nothing is uploaded or paid for unless prepare published the data (data quality passed, cost within
  the cap);
- a rerun with the same data and training config uploads nothing and starts no job (see tasks/upload.py
  and tasks/train.py), and a rerun after a crash reattaches to the job the crashed run started;
- one MLflow run per flow run holds: provider, base model, requested and resolved hyperparameters, dataset
  hash and dataset input, file ids, job id, fine-tuned model id, trained tokens, estimated and actual cost,
  step metrics, the result file; tags link the Prefect flow run (id and name);
- a failed job fails the flow run (and the MLflow run) with the job's error code and message, and no
  candidate is returned. The API key never reaches a log, a param, a tag or an artifact;
- a run whose process was killed (SIGKILL, a lost machine) cannot close its MLflow run: the rerun that
  takes over its job closes it as KILLED, tagged with why (tracking.RunLog.close_abandoned_runs).
After train, evaluate -> promote (flows/evaluate.py) run on the same provider and MLflow run; a rejected
candidate is a decision in `RetrainResult`, not a failure.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast
from uuid import UUID

from openai.types.fine_tuning import FineTuningJob
from prefect import flow, get_run_logger
from prefect import runtime as prefect_runtime
from prefect.artifacts import create_markdown_artifact

from tuneline import provider as providers
from tuneline import tracking
from tuneline.config import Config, load_config
from tuneline.flows.evaluate import evaluate_and_promote
from tuneline.flows.prepare import PrepareFailed, PrepareResult, manifest_of, prepare_dataset
from tuneline.paths import resolve
from tuneline.reporting import RunSummary, headline_metrics, render_run_summary
from tuneline.tasks.promote import Candidate
from tuneline.tasks.train import (
    TrainingFailed,
    TrainingOutcome,
    job_request,
    resolved_hyperparameters,
    train,
    training_config_hash,
)
from tuneline.tasks.upload import UploadedFiles, upload
from tuneline.tracking import RunLog, RunRecord


@dataclass(frozen=True)
class RetrainResult:
    """What a retrain run produced; `candidate_model` is None for a dry run."""

    mlflow_run_id: str
    export_dir: str
    dataset_hash: str
    estimated_cost_usd: float | None
    candidate_model: str | None = None
    fine_tuned_model: str | None = None
    job_id: str | None = None
    training_file_id: str | None = None
    validation_file_id: str | None = None
    trained_tokens: int | None = None
    actual_cost_usd: float | None = None
    # The promotion gate's decision on the candidate (None for a dry run): see flows/evaluate.py.
    promoted: bool | None = None
    champion_version: str | None = None
    decision: dict[str, Any] | None = None


def run_config(config_path: str | None, as_of: str | None) -> Config:
    return load_config(config_path, overrides={"data.as_of": as_of} if as_of else None)


def prepare_data(config: Config, export_dir: Path, run: RunLog) -> PrepareResult:
    """The data plane as tasks of this flow run, logged into this run's MLflow run; stops the run (with
    the expectation or cap that failed) when nothing may be uploaded."""
    prepared = prepare_dataset(config, out_dir=export_dir, run=run)
    if not prepared.published:
        raise PrepareFailed(prepared)
    return prepared


def log_uploaded(run: RunLog, files: UploadedFiles) -> None:
    run.log_uploaded(
        training_file_id=files.training.file_id,
        training_reused=files.training.reused,
        validation_file_id=files.validation.file_id if files.validation else None,
        validation_reused=files.validation.reused if files.validation else None,
        uploaded=files.uploaded_count,
    )


def job_logger(run: RunLog, dataset_hash: str, config_hash: str) -> Any:
    """Logs the job id as soon as it is known and the resolved hyperparameters once the job has them;
    the first time, closes the runs of the same data and training config that a killed process left
    open (a rerun after a SIGKILL reattaches to their job)."""
    seen: list[str] = []

    def on_job(job: FineTuningJob) -> None:
        run.log_job(job.id, resolved_hyperparameters(job))
        if not seen:
            seen.append(job.id)
            closed = run.close_abandoned_runs(
                {"dataset_hash": dataset_hash, "training_config_hash": config_hash},
                taken_over_by=f"took over job {job.id}",
                also=flow_run_over,
            )
            if closed:
                get_run_logger().warning(
                    "closed %d MLflow run(s) a killed process left open: %s", len(closed), ", ".join(closed)
                )

    return on_job


def flow_run_over(record: RunRecord) -> str | None:
    """Why an open MLflow run is over by its Prefect flow run (final: crashed, failed, cancelled...), or
    None when Prefect cannot tell (an unreachable API counts as "may still run")."""
    flow_run_id = record.tags.get(tracking.FLOW_RUN_ID_TAG)
    if not flow_run_id:
        return None
    from prefect.client.orchestration import get_client

    try:
        with get_client(sync_client=True) as prefect:
            state = prefect.read_flow_run(UUID(flow_run_id)).state
    except Exception:
        return None
    if state is None or not state.is_final():
        return None
    return (
        f"its Prefect flow run {record.tags.get(tracking.FLOW_RUN_NAME_TAG) or flow_run_id} is {state.name}"
    )


def log_trained(run: RunLog, outcome: TrainingOutcome) -> None:
    run.log_trained(
        job_id=outcome.job_id,
        reattached=outcome.reattached,
        fine_tuned_model=outcome.fine_tuned_model,
        candidate_model=outcome.candidate.model,
        candidate_source=outcome.candidate.source,
        candidate_step=outcome.candidate.step,
        result_file_id=outcome.result_file_id,
        trained_tokens=outcome.trained_tokens,
        actual_cost_usd=outcome.actual_cost_usd,
        overfitting_warning=outcome.overfitting_warning,
        checkpoints=outcome.checkpoints,
        result_csv=outcome.result_csv,
    )


def train_candidate(
    config: Config, config_path: str | None, *, dry_run: bool, run: RunLog, out_dir: str | None = None
) -> RetrainResult:
    """prepare -> upload -> train inside an open MLflow run; the part of `retrain` later stages build on."""
    logger = get_run_logger()
    flow_run_id = str(prefect_runtime.flow_run.id or "local")
    export_dir = Path(out_dir) if out_dir else resolve(config.training.runs_dir) / flow_run_id
    config_hash = training_config_hash(config)
    run.log_training_request(config, config_hash)
    manifest = prepare_data(config, export_dir, run).manifest
    estimated = (manifest.get("cost") or {}).get("estimated_cost_usd")
    dataset_hash = manifest["dataset_hash"]
    run.log_training_data(manifest)
    result = RetrainResult(run.run_id, str(export_dir), dataset_hash, estimated)
    if dry_run:
        logger.info("dry run: stopping after prepare; estimated training cost %s USD", estimated)
        return result
    api_key = secret_block_key(config)
    with providers.connect(config, config_path=_path(config_path), api_key=api_key, log=logger) as provider:
        run.log_provider(provider.name)
        files = upload(provider, export_dir, dataset_hash, config.provider)
        log_uploaded(run, files)
        request = job_request(
            config,
            dataset_hash=dataset_hash,
            training_file=files.training.file_id,
            validation_file=files.validation.file_id if files.validation else None,
        )
        outcome = train(provider, config, request, run, job_logger(run, dataset_hash, config_hash))
        log_trained(run, outcome)
        logger.info("candidate model: %s", outcome.candidate.model)
        # Evaluated on the same provider connection; a rejection is returned, only a failure raises.
        promotion = evaluate_and_promote(
            config,
            provider,
            run,
            Candidate(
                outcome.candidate.model,
                provider.name,
                config.model.base,
                dataset_hash,
                outcome.job_id,
                provider_kind=provider.kind,
                base_url=providers.endpoint(config.provider),
                azure_api_version=config.provider.azure_api_version or "",
            ),
            train_file=str(export_dir / "train.jsonl"),
        )
    return RetrainResult(
        mlflow_run_id=run.run_id,
        export_dir=str(export_dir),
        dataset_hash=dataset_hash,
        estimated_cost_usd=estimated,
        candidate_model=outcome.candidate.model,
        fine_tuned_model=outcome.fine_tuned_model,
        job_id=outcome.job_id,
        training_file_id=files.training.file_id,
        validation_file_id=files.validation.file_id if files.validation else None,
        trained_tokens=outcome.trained_tokens,
        actual_cost_usd=outcome.actual_cost_usd,
        promoted=promotion.decision.promoted,
        champion_version=promotion.champion,
        decision={**promotion.decision.as_dict(), "alias": promotion.alias},
    )


def _to_challenger(result: RetrainResult) -> str:
    """promotion.rollout ab: the candidate became `challenger`; the monitor flow decides."""
    alias = (result.decision or {}).get("alias")
    return " to challenger (A/B test: the monitor flow decides)" if alias == "challenger" else ""


def _path(config_path: str | None) -> Path | None:
    return Path(config_path) if config_path else None


def secret_block_key(config: Config) -> str | None:
    """The key from the configured Prefect Secret block, or None to use the environment variable."""
    name = config.provider.api_key_secret_block
    if not name:
        return None
    from prefect.blocks.system import Secret

    secret = cast(Secret, Secret.load(name))  # synchronous in a sync flow
    return str(secret.get())


def start_tracking(config: Config, *, dry_run: bool) -> RunLog:
    """The flow run's MLflow run, tagged with the Prefect flow run id and name."""
    flow_run_name = str(prefect_runtime.flow_run.name or "")
    run = RunLog.start(
        config.tracking,
        flow="retrain",
        name=f"retrain {config.data.as_of or 'today'} {flow_run_name}".strip(),
        tags={"tuneline.dry_run": str(dry_run).lower()},
    )
    run.link_flow_run(prefect_runtime.flow_run.id, flow_run_name)
    return run


@flow(name="retrain", log_prints=True)
def retrain(
    config_path: str | None = None,
    as_of: str | None = None,
    dry_run: bool = False,
    out_dir: str | None = None,
) -> RetrainResult:
    """prepare -> upload -> train; returns the candidate model id and the MLflow run id (see module doc)."""
    config = run_config(config_path, as_of)
    run = start_tracking(config, dry_run=dry_run)
    try:
        result = train_candidate(config, config_path, dry_run=dry_run, run=run, out_dir=out_dir)
    except BaseException as exc:
        if isinstance(exc, PrepareFailed):
            publish_summary(config, run, exc.result.manifest, outcome="stopped by the data-quality check")
        # A cancelled or interrupted flow run is KILLED in MLflow; a failure says why in a tag.
        run.fail(
            exc,
            code=getattr(exc, "code", None),
            job_id=exc.job_id if isinstance(exc, TrainingFailed) else None,
        )
        raise
    publish_summary(config, run, manifest_of(result.export_dir), result=result)
    run.finish()
    return result


def publish_summary(
    config: Config,
    run: RunLog,
    manifest: dict[str, Any] | None,
    *,
    result: RetrainResult | None = None,
    outcome: str | None = None,
) -> None:
    """The flow run's markdown artifact: counts by reason, tokens and cost, the job, the evaluation
    figures, the decision and the link to the MLflow run (read back from the store, never restated)."""
    if not prefect_runtime.flow_run.id:
        return
    if outcome is None and result is not None:
        outcome = (
            "dry run: prepared only"
            if result.candidate_model is None
            else (
                ("candidate promoted" + _to_challenger(result))
                if result.promoted
                else "candidate rejected by the promotion gate"
            )
        )
    job = None
    if result is not None and result.job_id:
        job = {
            "job id": result.job_id,
            "fine-tuned model": result.fine_tuned_model,
            "candidate": result.candidate_model,
            "trained tokens": result.trained_tokens,
            "champion version": result.champion_version,
        }
    metrics = headline_metrics(run.read().metrics)
    summary = RunSummary(
        flow="retrain",
        as_of=config.data.as_of.isoformat() if config.data.as_of else None,
        flow_run_name=str(prefect_runtime.flow_run.name or ""),
        outcome=outcome,
        manifest=manifest,
        job=job,
        actual_cost_usd=result.actual_cost_usd if result else None,
        metrics=metrics,
        decision=result.decision if result else None,
        mlflow_run_url=run.url(),
        mlflow_hint=None if tracking.has_tracking_server(config.tracking) else "open it with `tuneline ui`",
        **promoted_version(config, result),
    )
    create_markdown_artifact(
        render_run_summary(summary),
        key="retrain-summary",
        description="retrain: data, job, evaluation, decision",
    )


def promoted_version(config: Config, result: RetrainResult | None) -> dict[str, str]:
    """The summary's link to the model version this run promoted (none when nothing was promoted)."""
    if result is None or not result.promoted or not result.champion_version:
        return {}
    return {
        "model_version": f"{config.tracking.registered_model} version {result.champion_version}",
        "model_version_url": tracking.model_version_url(config.tracking, result.champion_version),
    }
