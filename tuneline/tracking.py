"""The only module that talks to MLflow: runs, params, metrics, datasets, artifacts and the registry.

The store is whatever `tracking.tracking_uri` names (SQLite + an artifact folder under .tuneline/ by
default; a tracking server on PostgreSQL with an object store in production). Relative SQLite and
artifact paths are taken from the project root, so every command sees the same store.
"""

from __future__ import annotations

from pathlib import Path

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
