"""The only module that talks to MLflow: runs, params, metrics, datasets, artifacts and the registry.

The store is whatever `tracking.tracking_uri` names (SQLite + an artifact folder under .tuneline/ by
default; a tracking server on PostgreSQL with an object store in production). Relative SQLite and
artifact paths are taken from the project root, so every command sees the same store.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow

from tuneline.config import TrackingConfig
from tuneline.paths import is_url, resolve


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


# --- evaluation logging and the model registry (evaluate, promote, rollback) ---------------------------

MODEL_ID_TAG = "tuneline.model_id"  # the provider's model id, on every registered model version
CHAMPION = "champion"
PREVIOUS = "previous"


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


def log_evaluation(
    tracking: TrackingConfig,
    run_id: str,
    metrics: Mapping[str, float],
    tables: Mapping[str, Any],
    figures: Mapping[str, Any],
    documents: Mapping[str, Mapping[str, Any]],
) -> None:
    """Log eval metrics, tables (mlflow.log_table, readable side by side in the UI), chart images and
    JSON documents to an existing run."""
    mlflow_client = client(tracking)
    now = int(time.time() * 1000)
    batch = [mlflow.entities.Metric(k, float(v), now, 0) for k, v in metrics.items()]
    for start in range(0, len(batch), 500):  # the store's batch limit is 1000 metrics
        mlflow_client.log_batch(run_id, metrics=batch[start : start + 500])
    for artifact_file, table in tables.items():
        mlflow_client.log_table(run_id, table, artifact_file)
    for artifact_file, figure in figures.items():
        mlflow_client.log_figure(run_id, figure, artifact_file)
    for artifact_file, document in documents.items():
        mlflow_client.log_dict(run_id, dict(document), artifact_file)


def log_decision(
    tracking: TrackingConfig, run_id: str, decision: Mapping[str, Any], tags: Mapping[str, str]
) -> None:
    """Record a promotion decision on its run: the full decision as JSON, the outcome as tags."""
    mlflow_client = client(tracking)
    mlflow_client.log_dict(run_id, dict(decision), "promotion/decision.json")
    for key, value in tags.items():
        mlflow_client.set_tag(run_id, key, value)


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


def set_version_tags(tracking: TrackingConfig, version: str, tags: Mapping[str, str]) -> None:
    mlflow_client = client(tracking)
    for key, value in tags.items():
        mlflow_client.set_model_version_tag(tracking.registered_model, str(version), key, value)


# --- retrain runs: one MLflow run per flow run (upload, train) -----------------------------------------


@dataclass(frozen=True)
class RunRecord:
    """What a run holds, as read back from the store."""

    run_id: str
    status: str
    params: Mapping[str, str]
    metrics: Mapping[str, float]
    tags: Mapping[str, str]


def start_run(tracking: TrackingConfig, *, run_name: str, tags: Mapping[str, str]) -> str:
    """A new run in the configured experiment, open until `finish_run`; returns its id."""
    experiment_id = configure(tracking)
    return client(tracking).create_run(experiment_id, run_name=run_name, tags=dict(tags)).info.run_id


def finish_run(tracking: TrackingConfig, run_id: str, *, status: str = "FINISHED") -> None:
    """Close a run as FINISHED, FAILED or KILLED."""
    client(tracking).set_terminated(run_id, status=status)


def log_run_params(tracking: TrackingConfig, run_id: str, params: Mapping[str, Any]) -> None:
    """Params as strings (None values left out). A param already logged with the same value is fine."""
    mlflow_client = client(tracking)
    existing = mlflow_client.get_run(run_id).data.params
    fresh = [
        mlflow.entities.Param(key, str(value))
        for key, value in params.items()
        if value is not None and existing.get(key) != str(value)
    ]
    for start in range(0, len(fresh), 100):  # the store's batch limit is 100 params
        mlflow_client.log_batch(run_id, params=fresh[start : start + 100])


def log_run_metrics(
    tracking: TrackingConfig, run_id: str, metrics: Mapping[str, float], *, step: int = 0
) -> None:
    """Metrics at one step (step metrics draw the loss curves in the MLflow UI)."""
    now = int(time.time() * 1000)
    batch = [mlflow.entities.Metric(key, float(value), now, step) for key, value in metrics.items()]
    if batch:
        client(tracking).log_batch(run_id, metrics=batch)


def set_run_tags(tracking: TrackingConfig, run_id: str, tags: Mapping[str, str]) -> None:
    mlflow_client = client(tracking)
    for key, value in tags.items():
        mlflow_client.set_tag(run_id, key, value)


def log_run_artifact(tracking: TrackingConfig, run_id: str, data: bytes | str, artifact_file: str) -> None:
    """Store bytes or text as an artifact at `artifact_file` (a path inside the run's artifacts)."""
    path = Path(artifact_file)
    with tempfile.TemporaryDirectory() as folder:
        local = Path(folder) / path.name
        local.write_bytes(data.encode() if isinstance(data, str) else data)
        client(tracking).log_artifact(
            run_id, str(local), str(path.parent) if str(path.parent) != "." else None
        )


def log_run_dataset(
    tracking: TrackingConfig,
    run_id: str,
    *,
    name: str,
    dataset_hash: str,
    source: str,
    context: str,
    profile: Mapping[str, Any],
) -> None:
    """Record a dataset as an input of the run. Its digest is the dataset hash cut to the store's 36
    characters (log the full hash as a param beside it); `profile` holds counts and the full hash."""
    dataset = mlflow.entities.Dataset(
        name=name,
        digest=dataset_hash[:36],
        source_type="local",
        source=json.dumps({"uri": source}),
        profile=json.dumps({**profile, "dataset_hash": dataset_hash}, sort_keys=True),
    )
    tag = mlflow.entities.InputTag(key="mlflow.data.context", value=context)
    inputs = [mlflow.entities.DatasetInput(dataset, tags=[tag])]
    try:
        client(tracking).log_inputs(run_id, datasets=inputs)
    except mlflow.exceptions.MlflowException as exc:
        # Two runs logging the same new dataset at once (a backfill's concurrent dates) race on the
        # store's unique (experiment, name, digest) row; the loser finds the row on a second try.
        if "IntegrityError" not in str(exc):
            raise
        client(tracking).log_inputs(run_id, datasets=inputs)


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


def tag_flow_run(tracking: TrackingConfig, run_id: str, flow_run_id: str, flow_run_name: str) -> None:
    """Link an MLflow run to the Prefect flow run that produced it (both ways findable)."""
    set_run_tags(tracking, run_id, {FLOW_RUN_ID_TAG: flow_run_id, FLOW_RUN_NAME_TAG: flow_run_name})


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


def nest_run(tracking: TrackingConfig, run_id: str, parent_run_id: str) -> None:
    """Show `run_id` under `parent_run_id` in the MLflow UI (the nesting MLflow's own nested runs use)."""
    client(tracking).set_tag(run_id, PARENT_RUN_TAG, parent_run_id)


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
