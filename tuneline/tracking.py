"""The only module that talks to MLflow: runs, params, metrics, datasets, artifacts and the registry.

The store is whatever `tracking.tracking_uri` names (SQLite + an artifact folder under .tuneline/ by
default; a tracking server on PostgreSQL with an object store in production). Relative SQLite and
artifact paths are taken from the project root, so every command sees the same store.

Flows and stages write to a run through one object, `RunLog`: its methods are the run schema (every
param, metric, tag and artifact name a run carries), and it closes the runs a killed process left
open. The module's functions read runs back, keep the model registry and point at the UI. It is longer
than most modules because it is the whole MLflow boundary: splitting it would spread the schema again.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import sys
import tempfile
import time
import urllib.parse
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import mlflow.data.pandas_dataset
import pandas as pd
import psutil

from tuneline.config import Config, TrackingConfig
from tuneline.paths import is_url, resolve
from tuneline.secrets import mask_credentials


def tracking_uri(tracking: TrackingConfig) -> str:
    uri = tracking.tracking_uri
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        db = resolve(uri.removeprefix("sqlite:///"))
        db.parent.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{db}"
    return uri


def artifact_uri(tracking: TrackingConfig) -> str:
    location = tracking.artifact_location
    return location if is_url(location) else resolve(location).as_uri()


def configure(tracking: TrackingConfig) -> str:
    """Point MLflow at the configured store and experiment; returns the experiment id."""
    mlflow.set_tracking_uri(tracking_uri(tracking))
    mlflow.set_registry_uri(tracking_uri(tracking))
    experiment = mlflow.get_experiment_by_name(tracking.experiment)
    if experiment is None:
        experiment_id = mlflow.create_experiment(
            tracking.experiment, artifact_location=artifact_uri(tracking)
        )
    else:
        experiment_id = experiment.experiment_id
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


def store_location(tracking: TrackingConfig) -> Path | str:
    """Where a person finds the store (for messages and `tuneline ui`)."""
    uri = tracking_uri(tracking)
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else uri


# --- the model registry (promote, rollback) -----------------------------------------------------------

MODEL_ID_TAG = "tuneline.model_id"  # the provider's model id, on every registered model version
CHAMPION = "champion"
PREVIOUS = "previous"
CHALLENGER = "challenger"  # promotion.rollout = ab: the version under A/B test against the champion


class RegistryError(RuntimeError):
    """A registry request that cannot be done as asked; the message names the model, version and fix."""


@dataclass(frozen=True)
class ModelVersionRecord:
    """A version of the registered model as the pipeline sees it."""

    name: str
    version: str
    model_id: str  # what the provider serves, e.g. ft:tuneline-tiny:local:support:1a2b3c4d
    aliases: tuple[str, ...]
    tags: Mapping[str, str]
    run_id: str | None


def client(tracking: TrackingConfig) -> mlflow.MlflowClient:
    """An MLflow client on the configured store (tracking and registry)."""
    uri = tracking_uri(tracking)
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def _record(version: Any, aliases: Mapping[str, str] | None = None) -> ModelVersionRecord:
    """`aliases` (alias -> version) for versions read by search, which leaves their aliases out."""
    tags = dict(version.tags or {})
    held = version.aliases or [a for a, v in (aliases or {}).items() if str(v) == str(version.version)]
    return ModelVersionRecord(
        name=version.name,
        version=str(version.version),
        model_id=tags.get(MODEL_ID_TAG, ""),
        aliases=tuple(sorted(held)),
        tags=tags,
        run_id=version.run_id,
    )


def alias_version(tracking: TrackingConfig, alias: str) -> ModelVersionRecord | None:
    """The version of `tracking.registered_model` that holds `alias`, None when no version holds it."""
    mlflow_client = client(tracking)
    try:
        mlflow_client.get_registered_model(tracking.registered_model)
    except mlflow.exceptions.MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    try:
        return _record(mlflow_client.get_model_version_by_alias(tracking.registered_model, alias))
    except mlflow.exceptions.MlflowException as exc:
        if exc.error_code in {"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"}:
            return None
        raise


def model_versions(tracking: TrackingConfig) -> list[ModelVersionRecord]:
    """Every version of the registered model, oldest first (empty when it is not registered yet)."""
    mlflow_client = client(tracking)
    try:
        aliases = mlflow_client.get_registered_model(tracking.registered_model).aliases
    except mlflow.exceptions.MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return []
        raise
    name = tracking.registered_model.replace("'", "\\'")
    found = mlflow_client.search_model_versions(f"name = '{name}'")
    return sorted((_record(v, aliases) for v in found), key=lambda r: int(r.version))


def model_version(tracking: TrackingConfig, version: str) -> ModelVersionRecord:
    """One version by number; a RegistryError names the versions that exist when it does not."""
    for record in model_versions(tracking):
        if record.version == str(version):
            return record
    existing = ", ".join(r.version for r in model_versions(tracking)) or "none yet"
    raise RegistryError(
        f"registered model {tracking.registered_model!r} has no version {version} (versions: {existing})"
    )


def register_external_model(
    tracking: TrackingConfig,
    run_id: str,
    model_id: str,
    params: Mapping[str, str],
    tags: Mapping[str, str],
    metrics: Mapping[str, float],
) -> ModelVersionRecord:
    """The provider's model as an MLflow external model (its weights stay with the provider), linked to
    the run, carrying `params` and `metrics`, registered as a new version of `tracking.registered_model`
    with `tags` plus the model id tag."""
    uri = tracking_uri(tracking)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    mlflow_client = client(tracking)
    experiment_id = mlflow_client.get_run(run_id).info.experiment_id
    version_tags = {**tags, MODEL_ID_TAG: model_id}
    logged = mlflow.create_external_model(
        name=tracking.registered_model,
        source_run_id=run_id,
        tags=version_tags,
        params=dict(params),
        model_type="openai-fine-tuned-model",
        experiment_id=experiment_id,
    )
    if metrics:
        mlflow.log_metrics(dict(metrics), run_id=run_id, model_id=logged.model_id, synchronous=True)
    version = mlflow.register_model(logged.model_uri, tracking.registered_model, tags=version_tags)
    return _record(mlflow_client.get_model_version(tracking.registered_model, version.version))


def set_alias(tracking: TrackingConfig, alias: str, version: str) -> None:
    client(tracking).set_registered_model_alias(tracking.registered_model, alias, str(version))


def delete_alias(tracking: TrackingConfig, alias: str) -> None:
    client(tracking).delete_registered_model_alias(tracking.registered_model, alias)


def set_version_tags(tracking: TrackingConfig, version: str, tags: Mapping[str, str]) -> None:
    mlflow_client = client(tracking)
    for key, value in tags.items():
        mlflow_client.set_model_version_tag(tracking.registered_model, str(version), key, value)


def evaluate_traces(
    tracking: TrackingConfig,
    traces: Sequence[Any],
    scorers: Sequence[Any],
    *,
    run_name: str,
    parent_run_id: str,
    tags: Mapping[str, str],
) -> str:
    """`mlflow.genai.evaluate` of existing traces with code scorers, in a run nested under
    `parent_run_id` (in the parent's experiment); returns the evaluation run's id."""
    import pandas as pd

    uri = tracking_uri(tracking)
    mlflow.set_tracking_uri(uri)
    mlflow_client = client(tracking)
    experiment_id = mlflow_client.get_run(parent_run_id).info.experiment_id
    created = mlflow_client.create_run(
        experiment_id, run_name=run_name, tags=_masked({**tags, PARENT_RUN_TAG: parent_run_id})
    )
    run_id = created.info.run_id
    try:
        genai_evaluate(tracking, run_id, pd.DataFrame({"trace": list(traces)}), list(scorers))
    except BaseException:
        mlflow_client.set_terminated(run_id, status="FAILED")
        raise
    return run_id


def genai_evaluate(
    tracking: TrackingConfig, run_id: str, data: Any, scorers: Sequence[Any], end_status: str = "FINISHED"
) -> None:
    """`mlflow.genai.evaluate` of `data` with `scorers` into the run `run_id` (genai.evaluate writes into
    the active run: this one is made active for the call, and ended with `end_status` after)."""
    if tracking_uri(tracking).startswith("sqlite:"):
        # SQLite takes one writer at a time: more workers only wait on its lock (and time out).
        os.environ.setdefault("MLFLOW_GENAI_EVAL_MAX_WORKERS", "1")
    mlflow.start_run(run_id=run_id)
    # Its banner and progress bar would land in the flow's log and terminal: kept for a failure only.
    said = io.StringIO()
    try:
        with contextlib.redirect_stdout(said), contextlib.redirect_stderr(said):
            mlflow.genai.evaluate(data=data, scorers=list(scorers))
    except BaseException:
        sys.stderr.write(said.getvalue())
        raise
    finally:
        mlflow.end_run(end_status)


def set_version_description(tracking: TrackingConfig, version: str, description: str) -> None:
    """The text the version's page in the MLflow UI shows first (Markdown)."""
    client(tracking).update_model_version(tracking.registered_model, str(version), description=description)


# --- reading runs back (summaries, tests, `tuneline ui`) -----------------------------------------------


@dataclass(frozen=True)
class RunRecord:
    """What a run holds, as read back from the store."""

    run_id: str
    status: str
    params: Mapping[str, str]
    metrics: Mapping[str, float]
    tags: Mapping[str, str]


def read_run(tracking: TrackingConfig, run_id: str) -> RunRecord:
    run = client(tracking).get_run(run_id)
    return RunRecord(
        run_id, run.info.status, dict(run.data.params), dict(run.data.metrics), dict(run.data.tags)
    )


def metric_history(tracking: TrackingConfig, run_id: str, key: str) -> list[tuple[int, float]]:
    """(step, value) of every value a metric took, in step order."""
    return sorted((m.step, m.value) for m in client(tracking).get_metric_history(run_id, key))


def list_artifacts(tracking: TrackingConfig, run_id: str) -> list[str]:
    """Every artifact path of a run, recursively."""
    mlflow_client = client(tracking)
    found: list[str] = []
    pending: list[str | None] = [None]
    while pending:
        for entry in mlflow_client.list_artifacts(run_id, pending.pop()):
            (pending.append(entry.path) if entry.is_dir else found.append(entry.path))
    return sorted(found)


def download_artifact(tracking: TrackingConfig, run_id: str, artifact_path: str, dst: Path) -> Path:
    return Path(client(tracking).download_artifacts(run_id, artifact_path, str(dst)))


# --- run links, backfill parents and the UI (backfill, run summaries, `tuneline ui`) -------------------

PARENT_RUN_TAG = "mlflow.parentRunId"  # the tag the MLflow UI nests runs by
FLOW_RUN_ID_TAG = "prefect.flow_run_id"
FLOW_RUN_NAME_TAG = "prefect.flow_run_name"
UI_HOST = "127.0.0.1"
UI_PORT = 5000


def has_tracking_server(tracking: TrackingConfig) -> bool:
    """True when the store is an MLflow tracking server (it serves its own UI)."""
    return tracking_uri(tracking).startswith(("http://", "https://"))


def ui_url(tracking: TrackingConfig, port: int = UI_PORT) -> str:
    """Where the MLflow UI for this store is: the tracking server, or `tuneline ui` on loopback."""
    if has_tracking_server(tracking):
        return tracking_uri(tracking).rstrip("/")
    return f"http://{UI_HOST}:{port}"


def run_url(tracking: TrackingConfig, run_id: str, port: int = UI_PORT) -> str:
    """The link to a run's page in the MLflow UI."""
    experiment_id = client(tracking).get_run(run_id).info.experiment_id
    return f"{ui_url(tracking, port)}/#/experiments/{experiment_id}/runs/{run_id}"


def model_version_url(tracking: TrackingConfig, version: str, port: int = UI_PORT) -> str:
    """The link to a version's page of the registered model in the MLflow UI."""
    name = urllib.parse.quote(tracking.registered_model, safe="")
    return f"{ui_url(tracking, port)}/#/models/{name}/versions/{version}"


def find_run(tracking: TrackingConfig, tags: Mapping[str, str]) -> str | None:
    """The latest run of the configured experiment carrying all of `tags`, None when there is none."""
    experiment_id = configure(tracking)
    clauses = [f"tags.`{key}` = {_quoted(value)}" for key, value in tags.items()]
    found = client(tracking).search_runs(
        [experiment_id],
        filter_string=" and ".join(clauses),
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return found[0].info.run_id if found else None


def _quoted(value: str) -> str:
    """A string literal for an MLflow search filter."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def child_runs(tracking: TrackingConfig, parent_run_id: str) -> list[RunRecord]:
    """The runs nested under a parent, oldest first."""
    experiment_id = client(tracking).get_run(parent_run_id).info.experiment_id
    found = client(tracking).search_runs(
        [experiment_id],
        filter_string=f"tags.`{PARENT_RUN_TAG}` = '{parent_run_id}'",
        order_by=["attributes.start_time ASC"],
    )
    return [read_run(tracking, run.info.run_id) for run in found]


def ui_command(tracking: TrackingConfig, port: int = UI_PORT) -> list[str]:
    """The `mlflow server` command line that serves the UI on the configured store, on loopback only."""
    return [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        tracking_uri(tracking),
        "--default-artifact-root",
        artifact_uri(tracking),
        "--host",
        UI_HOST,
        "--port",
        str(port),
        "--workers",
        "1",
    ]


# --- the run schema: one run, as the flows and stages report to it --------------------------------------

FLOW_TAG = "tuneline.flow"  # prepare | retrain | evaluate | backfill
FAILURE_TAG = "tuneline.failure"  # why a run failed: the error code, or the exception's name
ABANDONED_TAG = "tuneline.abandoned"  # why a run was closed by a later one (its process was gone)
ABANDONED = "abandoned"  # FAILURE_TAG of a run closed that way
# Which process runs a run, so a later run can tell a run still going from one whose process died.
HOST_TAG = "tuneline.host"
PID_TAG = "tuneline.pid"
PROCESS_STARTED_TAG = "tuneline.process_started"
PARAM_LIMIT = 6000  # MLflow keeps param values up to this many characters
_BATCH_PARAMS = 100  # the store's batch limits
_BATCH_METRICS = 500


class RunLog:
    """One MLflow run, as the flows and stages report to it.

    Every param, metric, tag and artifact name a tuneline run carries is written by one method of this
    class (the run schema, in one place); flows and stages report outcomes to it and never name an
    MLflow key themselves. Params and tags pass through tuneline/secrets.py's masking on their way out,
    so a credential that slipped into a value (a URL with a password) never reaches the store.
    """

    def __init__(self, tracking: TrackingConfig, run_id: str) -> None:
        self.tracking = tracking
        self.run_id = run_id
        self._client = client(tracking)
        self._params: dict[str, str] | None = None  # what the run holds, read once

    # -- lifecycle ---------------------------------------------------------------------------------------

    @classmethod
    def start(
        cls,
        tracking: TrackingConfig,
        *,
        flow: str,
        name: str,
        tags: Mapping[str, str] | None = None,
        parent: str | None = None,
    ) -> RunLog:
        """A new run of `flow` in the configured experiment, open until `finish` or `fail`, tagged with
        the process that runs it (see `close_abandoned_runs`) and nested under `parent` when given."""
        experiment_id = configure(tracking)
        all_tags = {FLOW_TAG: flow, **process_tags(), **(tags or {})}
        if parent:
            all_tags[PARENT_RUN_TAG] = parent
        created = client(tracking).create_run(experiment_id, run_name=name, tags=_masked(all_tags))
        run = cls(tracking, created.info.run_id)
        run._params = {}
        return run

    @classmethod
    def find_or_start(
        cls, tracking: TrackingConfig, *, flow: str, name: str, tags: Mapping[str, str]
    ) -> RunLog:
        """The latest run of `flow` carrying `tags` (a backfill run again reuses its parent), else a new one."""
        found = find_run(tracking, {FLOW_TAG: flow, **tags})
        if found is not None:
            return cls(tracking, found)
        return cls.start(tracking, flow=flow, name=name, tags=tags)

    def link_flow_run(self, flow_run_id: str | None, flow_run_name: str | None) -> None:
        """Link the run to the Prefect flow run that produced it (both ways findable)."""
        self._tags({FLOW_RUN_ID_TAG: str(flow_run_id or ""), FLOW_RUN_NAME_TAG: str(flow_run_name or "")})

    def nest_under(self, parent_run_id: str) -> None:
        """Show the run under another in the MLflow UI (the nesting MLflow's own nested runs use)."""
        self._tags({PARENT_RUN_TAG: parent_run_id})

    def finish(self, status: str = "FINISHED") -> None:
        """Close the run as FINISHED, FAILED or KILLED."""
        self._client.set_terminated(self.run_id, status=status)

    def fail(self, error: BaseException, *, code: str | None = None, job_id: str | None = None) -> None:
        """Close the run because of `error`: FAILED for an exception, KILLED for a cancellation or an
        interrupt; the FAILURE_TAG says why (`code`, else the exception's name)."""
        tags = {FAILURE_TAG: code or type(error).__name__}
        if job_id:
            tags["tuneline.job_id"] = job_id
        self._tags(tags)
        self.finish("FAILED" if isinstance(error, Exception) else "KILLED")

    # -- what the stages report --------------------------------------------------------------------------

    def log_prepared(
        self, config: Config, manifest: Mapping[str, Any], files: Mapping[str, bytes], train_file: str
    ) -> None:
        """The data plane's outcome: the settings that shaped the data, the manifest's figures as
        metrics, the training set as the run's dataset input (when published: its digest is the dataset
        hash cut to the store's 36 characters, the full hash in the profile) and the files under
        prepare/."""
        sources = ", ".join(f"{s['name']}={s['uri']}" for s in manifest.get("sources") or [])
        self._log_params(
            {
                "config_hash": manifest["config_hash"],
                "as_of": manifest["as_of"],
                "sources": _param(sources),
                "partitions": _param(", ".join(manifest.get("partitions") or [])),
                "model": config.model.base,
                "data.lookback_days": config.data.lookback_days,
                "validation.too_long": config.validation.too_long,
                "export.validation_fraction": config.export.validation_fraction,
                "export.general_mix_fraction": config.export.general_mix_fraction,
                **{f"dedupe.{k}": v for k, v in config.dedupe.model_dump(mode="json").items()},
            }
        )
        # Headline figures only: the counts (by reason), the training tokens and the cost estimate; the
        # token statistics and the cost's terms are the dataset's profile.
        cost = manifest.get("cost") or {}
        token_stats = manifest.get("tokens") or {}
        self._metrics(
            {
                **_numbers("counts", manifest.get("counts") or {}),
                **_numbers("tokens", {"train_total": token_stats.get("train_total")}),
                **_numbers("cost", {"estimated_cost_usd": cost.get("estimated_cost_usd")}),
            }
        )
        published = bool(manifest.get("published"))
        if published:
            self._dataset(
                name=f"{config.project}-prepared",
                dataset_hash=manifest["dataset_hash"],
                examples=_training_frame(train_file),
                source=_raw_source(manifest),
                context="training",
                profile={
                    "counts": manifest.get("counts") or {},
                    "tokens": token_stats,
                    "cost": cost,
                    "partitions": list(manifest.get("partitions") or []),
                    "train_file": train_file,
                },
            )
        quarantine = files.get("quarantine.jsonl")
        if quarantine is not None:
            self._client.log_table(
                self.run_id, _quarantine_table(quarantine), "prepare/quarantine_table.json"
            )
        for name, data in files.items():
            self._artifact(data, f"prepare/{name}")
        self._tags(
            {
                "tuneline.as_of": str(manifest["as_of"]),
                "tuneline.dataset_hash": manifest["dataset_hash"],
                "tuneline.prepare": "published" if published else "stopped",
            }
        )

    def log_training_request(self, config: Config, training_config_hash: str) -> None:
        """What a retrain run asks the provider for, before anything is sent."""
        training = config.training
        extra: dict[str, Any] = {}
        if training.method == "dpo" and training.dpo is not None:
            extra = training.dpo.model_dump(mode="json")
        elif training.method == "reinforcement" and training.reinforcement is not None:
            extra = training.reinforcement.model_dump(mode="json")
        # The grader by its type and name only: a python grader's source is not a param.
        grader = {f"grader.{key}": training.grader.get(key) for key in ("type", "name") if training.grader}
        self._log_params(
            {
                "provider": config.provider.kind,
                "base_model": config.model.base,
                "method": training.method,
                **{
                    f"hyperparameters.requested.{k}": v
                    for k, v in {**training.hyperparameters.model_dump(mode="json"), **extra}.items()
                },
                **grader,
                "suffix": training.suffix,
                "seed": training.seed,
                "choose_best_checkpoint": training.choose_best_checkpoint,
                "training_config_hash": training_config_hash,
            }
        )

    def log_training_data(self, manifest: Mapping[str, Any]) -> None:
        """Beside what `log_prepared` holds: the full dataset hash as a param and the cost estimate."""
        self._log_params({"dataset_hash": manifest["dataset_hash"]})
        estimated = (manifest.get("cost") or {}).get("estimated_cost_usd")
        if isinstance(estimated, int | float):
            self._metrics({"estimated_cost_usd": estimated})

    def log_provider(self, name: str) -> None:
        self._log_params({"provider_name": name})

    def log_uploaded(
        self,
        *,
        training_file_id: str,
        training_reused: bool,
        validation_file_id: str | None,
        validation_reused: bool | None,
        uploaded: int,
    ) -> None:
        """The provider's file ids, whether each was already there, and how many files were sent."""
        self._log_params(
            {
                "training_file_id": training_file_id,
                "training_file_reused": training_reused,
                "validation_file_id": validation_file_id,
                "validation_file_reused": validation_reused if validation_file_id else None,
            }
        )
        self._metrics({"files_uploaded": uploaded})

    def log_job(self, job_id: str, resolved_hyperparameters: Mapping[str, Any]) -> None:
        """The job id as soon as it is known, and the hyperparameters once the provider resolved them."""
        self._log_params(
            {
                "job_id": job_id,
                **{f"hyperparameters.resolved.{k}": v for k, v in resolved_hyperparameters.items()},
            }
        )

    def log_step(self, step: int, metrics: Mapping[str, float]) -> None:
        """A training step's metrics (they draw the loss curves in the MLflow UI)."""
        self._metrics(metrics, step=step)

    def log_trained(
        self,
        *,
        job_id: str,
        reattached: bool,
        fine_tuned_model: str,
        candidate_model: str,
        candidate_source: str,
        candidate_step: int | None,
        result_file_id: str | None,
        trained_tokens: int | None,
        actual_cost_usd: float | None,
        overfitting_warning: str | None,
        checkpoints: list[dict[str, Any]],
        result_csv: bytes | None,
    ) -> None:
        """The job's outcome: the candidate model, tokens and cost, checkpoints and the result file."""
        self._log_params(
            {
                "job_id": job_id,
                "job_reattached": reattached,
                "fine_tuned_model": fine_tuned_model,
                "candidate_model": candidate_model,
                "candidate_source": candidate_source,
                "candidate_step": candidate_step,
                "result_file_id": result_file_id,
            }
        )
        metrics = {"trained_tokens": trained_tokens, "actual_cost_usd": actual_cost_usd}
        self._metrics({k: v for k, v in metrics.items() if v is not None})
        tags = {"tuneline.candidate_model": candidate_model}
        if overfitting_warning:
            tags["tuneline.overfitting"] = overfitting_warning
        self._tags(tags)
        self._artifact(json.dumps(checkpoints, indent=2), "training/checkpoints.json")
        if result_csv is not None:
            self._artifact(result_csv, "training/results.csv")

    def log_evaluated_model(self, *, candidate_model: str, base_model: str, provider_name: str) -> None:
        """What an evaluate run compares (a retrain run names them in log_training_request/log_trained)."""
        self._log_params(
            {"candidate_model": candidate_model, "base_model": base_model, "provider_name": provider_name}
        )

    def log_evaluation(
        self,
        metrics: Mapping[str, float],
        tables: Mapping[str, Any],
        figures: Mapping[str, Any],
        documents: Mapping[str, Mapping[str, Any]],
    ) -> None:
        """Eval metrics, tables (mlflow.log_table: side by side in the UI), chart images and JSON
        documents, each at the artifact path it is keyed by."""
        self._metrics(metrics)
        for artifact_file, table in tables.items():
            self._client.log_table(self.run_id, table, artifact_file)
        for artifact_file, figure in figures.items():
            self._client.log_figure(self.run_id, figure, artifact_file)
        for artifact_file, document in documents.items():
            self._client.log_dict(self.run_id, dict(document), artifact_file)

    def log_genai_evaluation(self, rows: list[dict[str, Any]], scorers: list[Any]) -> None:
        """The evaluation as MLflow's GenAI evaluation of this run (the UI's evaluation view and Traces
        tab): `rows` of inputs, pre-computed outputs and expectations, scored by code `scorers`."""
        if not rows:
            return
        configure(self.tracking)
        # Left open (RUNNING) after: the flow closes this run.
        genai_evaluate(self.tracking, self.run_id, pd.DataFrame(rows), scorers, end_status="RUNNING")

    def log_decision(self, decision: Mapping[str, Any], tags: Mapping[str, str]) -> None:
        """A promotion decision: the whole decision as promotion/decision.json, its outcome as tags, and
        the gate's figures as headline metrics (gate/<rule>: the delta vs the reference, the p-value,
        the canary drop, the margin over few-shot) with gate/promoted (1 or 0)."""
        self._client.log_dict(self.run_id, dict(decision), "promotion/decision.json")
        names = {
            "min_delta": f"gate/delta_vs_{decision.get('reference') or 'reference'}",
            "significant": "gate/p_value",
            "canary": "gate/canary_drop",
            "few_shot": "gate/margin_vs_few_shot",
        }
        figures = {
            names[rule["rule"]]: float(rule["observed"])
            for rule in decision.get("rules") or []
            if rule.get("rule") in names
        }
        if "promoted" in decision:
            figures["gate/promoted"] = float(bool(decision["promoted"]))
        self._metrics(figures)
        self._tags(tags)

    def log_monitor(
        self, decision: Mapping[str, Any], metrics: Mapping[str, float], tags: Mapping[str, str]
    ) -> None:
        """An A/B monitor decision: the whole decision as monitor/decision.json, its figures as metrics
        (ab/<variant>/<figure>, ab/p_better, ...), its outcome as tags."""
        self._client.log_dict(
            self.run_id, json.loads(json.dumps(decision, default=str)), "monitor/decision.json"
        )
        self._metrics(metrics)
        self._tags(tags)

    def log_backfill(self, dates_csv: str, outcomes: Mapping[str, int]) -> None:
        """A backfill's table of dates (backfill/dates.csv, replaced whole on a rerun) and its tally."""
        self._artifact(dates_csv, "backfill/dates.csv")
        self._metrics({"dates": sum(outcomes.values()), **{f"dates.{k}": v for k, v in outcomes.items()}})

    # -- reading back ------------------------------------------------------------------------------------

    def read(self) -> RunRecord:
        return read_run(self.tracking, self.run_id)

    def url(self) -> str:
        return run_url(self.tracking, self.run_id)

    # -- runs a killed process left open -----------------------------------------------------------------

    def close_abandoned_runs(
        self,
        params: Mapping[str, str],
        taken_over_by: str,
        also: Callable[[RunRecord], str | None] | None = None,
    ) -> list[str]:
        """Close, as KILLED, the open runs of the experiment with these `params` whose process is known
        to be gone (`abandonment`, or `also` when it gives a reason): a run killed with SIGKILL or lost
        with its machine cannot close itself. ABANDONED_TAG says why and what this run took over
        (`taken_over_by`, e.g. "reattached to job ftjob-1"). Returns the ids of the runs closed; a run
        that may still be going is left as it is."""
        experiment_id = self._client.get_run(self.run_id).info.experiment_id
        clauses = [
            "attributes.status = 'RUNNING'",
            *(f"params.`{k}` = {_quoted(v)}" for k, v in params.items()),
        ]
        closed = []
        for found in self._client.search_runs([experiment_id], filter_string=" and ".join(clauses)):
            if found.info.run_id == self.run_id:
                continue
            record = read_run(self.tracking, found.info.run_id)
            why = abandonment(record) or (also(record) if also else None)
            if why is None:
                continue
            other = RunLog(self.tracking, record.run_id)
            other._tags({FAILURE_TAG: ABANDONED, ABANDONED_TAG: f"{why}; run {self.run_id} {taken_over_by}"})
            other.finish("KILLED")
            closed.append(record.run_id)
        return closed

    # -- the writes behind the schema -------------------------------------------------------------------

    def _log_params(self, params: Mapping[str, Any]) -> None:
        """Params as strings (None values left out). A param already logged with the same value is
        fine; MLflow refuses a changed one."""
        if self._params is None:
            self._params = dict(self._client.get_run(self.run_id).data.params)
        shown = {key: _mask(str(value)) for key, value in params.items() if value is not None}
        fresh = {key: value for key, value in shown.items() if self._params.get(key) != value}
        batch = [mlflow.entities.Param(key, value) for key, value in fresh.items()]
        for start in range(0, len(batch), _BATCH_PARAMS):
            self._client.log_batch(self.run_id, params=batch[start : start + _BATCH_PARAMS])
        self._params.update(fresh)

    def _metrics(self, metrics: Mapping[str, float], *, step: int = 0) -> None:
        now = int(time.time() * 1000)
        batch = [mlflow.entities.Metric(key, float(value), now, step) for key, value in metrics.items()]
        for start in range(0, len(batch), _BATCH_METRICS):
            self._client.log_batch(self.run_id, metrics=batch[start : start + _BATCH_METRICS])

    def _tags(self, tags: Mapping[str, str]) -> None:
        for key, value in _masked(tags).items():
            self._client.set_tag(self.run_id, key, value)

    def _artifact(self, data: bytes | str, artifact_file: str) -> None:
        """Bytes or text as an artifact at `artifact_file` (a path inside the run's artifacts)."""
        path = Path(artifact_file)
        with tempfile.TemporaryDirectory() as folder:
            local = Path(folder) / path.name
            local.write_bytes(data.encode() if isinstance(data, str) else data)
            self._client.log_artifact(
                self.run_id, str(local), str(path.parent) if str(path.parent) != "." else None
            )

    def _dataset(
        self,
        *,
        name: str,
        dataset_hash: str,
        examples: pd.DataFrame,
        source: str,
        context: str,
        profile: Mapping[str, Any],
    ) -> None:
        """The examples as an MLflow dataset input: schema from the frame, source the raw partitions,
        digest the dataset hash cut to the store's 36 characters, profile the rows, `profile` and the
        full hash."""
        with warnings.catch_warnings():
            # Its hints (integer columns cannot hold missing values; a local path is a local source)
            # say nothing about this frame, which is read once, whole, from the training file.
            warnings.simplefilter("ignore", UserWarning)
            dataset = mlflow.data.pandas_dataset.from_pandas(
                examples, source=source, name=name, digest=dataset_hash[:36]
            )
        entity = dataset._to_mlflow_entity()  # what mlflow.log_input sends; this run is not the active one
        entity = mlflow.entities.Dataset(
            name=entity.name,
            digest=entity.digest,
            source_type=entity.source_type,
            source=entity.source,
            schema=entity.schema,
            profile=json.dumps(
                {**json.loads(entity.profile or "{}"), **profile, "dataset_hash": dataset_hash},
                sort_keys=True,
                default=str,
            ),
        )
        tag = mlflow.entities.InputTag(key="mlflow.data.context", value=context)
        inputs = [mlflow.entities.DatasetInput(entity, tags=[tag])]
        try:
            self._client.log_inputs(self.run_id, datasets=inputs)
        except mlflow.exceptions.MlflowException as exc:
            # Two runs logging the same new dataset at once (a backfill's concurrent dates) race on the
            # store's unique (experiment, name, digest) row; the loser finds the row on a second try.
            if "IntegrityError" not in str(exc):
                raise
            self._client.log_inputs(self.run_id, datasets=inputs)


def _training_frame(train_file: str) -> pd.DataFrame:
    """The training examples as a frame (a column per field a reviewer reads), for the dataset's schema."""
    rows = []
    for line in Path(train_file).read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        messages = json.loads(line).get("messages") or []
        users = [str(m.get("content")) for m in messages if m.get("role") == "user"]
        answers = [str(m.get("content")) for m in messages if m.get("role") == "assistant"]
        rows.append(
            {
                "prompt": users[-1] if users else "",
                "answer": answers[-1] if answers else "",
                "turns": len(messages),
                "messages": line,
            }
        )
    return pd.DataFrame(rows, columns=["prompt", "answer", "turns", "messages"])


def _raw_source(manifest: Mapping[str, Any]) -> str:
    """Where the training set comes from: the raw source's location (a path, glob or URL; the sources
    joined when there are several), the partitions it read being in the dataset's profile."""
    uris = [
        str(s["uri"]) if is_url(str(s["uri"])) else str(resolve(str(s["uri"])))
        for s in manifest.get("sources") or []
        if s.get("uri")
    ]
    return mask_credentials(uris[0] if len(uris) == 1 else ", ".join(uris) or "unknown")


def _quarantine_table(quarantine_jsonl: bytes) -> pd.DataFrame:
    """The quarantine file as a table the UI shows: one row per record, where it came from and why."""
    rows = [json.loads(line) for line in quarantine_jsonl.decode("utf-8").splitlines() if line.strip()]
    frame = pd.DataFrame.from_records(rows)
    if frame.empty:
        return pd.DataFrame({"reason": [], "detail": []})
    first = [c for c in ("reason", "detail", "source", "partition", "line") if c in frame.columns]
    return frame[first + [c for c in frame.columns if c not in first]]


def process_tags() -> dict[str, str]:
    """The tags naming the process that runs a run: host, pid and the process's start time."""
    me = psutil.Process()
    return {
        HOST_TAG: socket.gethostname(),
        PID_TAG: str(me.pid),
        PROCESS_STARTED_TAG: f"{me.create_time():.3f}",
    }


def abandonment(record: RunRecord) -> str | None:
    """Why an open run is known to be abandoned: it was started on this host by a process that is gone
    (or a new process now has its pid). None when it may still be going, or when it ran elsewhere."""
    host, pid, started = (record.tags.get(t) for t in (HOST_TAG, PID_TAG, PROCESS_STARTED_TAG))
    if host != socket.gethostname() or not pid or not started:
        return None
    try:
        process = psutil.Process(int(pid))
        alive = abs(process.create_time() - float(started)) < 1 and process.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, ValueError):
        alive = False
    if alive:
        return None
    return f"the process that ran it (pid {pid} on {host}) is gone: it was killed or crashed"


def _mask(value: str) -> str:
    return mask_credentials(value)


def _masked(tags: Mapping[str, str]) -> dict[str, str]:
    return {key: _mask(str(value)) for key, value in tags.items()}


def _param(value: str) -> str:
    return value if len(value) <= PARAM_LIMIT else value[: PARAM_LIMIT - 20] + f"... ({len(value)} chars)"


def _numbers(prefix: str, values: Mapping[str, Any]) -> dict[str, float]:
    """Every number of a nested mapping, flattened to dotted metric names."""
    flat: dict[str, float] = {}
    for key, value in values.items():
        name = f"{prefix}.{key}"
        if isinstance(value, Mapping):
            flat.update(_numbers(name, value))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            flat[name] = float(value)
    return flat
