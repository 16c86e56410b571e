"""Traffic as the gateway traces it, planted in a real MLflow store (tests of the monitor and of
feedback-as-data): a span per request in `serving/<registered model>` with the gateway's tags and trace
metadata, feedback logged with `mlflow.log_feedback` and corrections with `mlflow.log_expectation`, both
from a human source."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import mlflow
from mlflow.entities import AssessmentSource, AssessmentSourceType, SpanStatusCode
from mlflow.tracing.constant import SpanAttributeKey

from tuneline import tracking
from tuneline.config import MonitorConfig, TrackingConfig
from tuneline.tasks.monitor import (
    CORRECTION,
    FALLBACK_TAG,
    FEEDBACK,
    MODEL_VERSION_TAG,
    REGISTERED_MODEL_TAG,
    SESSION_KEY,
    USER_KEY,
    VARIANT_TAG,
    serving_experiment,
)


@dataclass
class Planted:
    variant: str
    version: str
    requests: int
    rated: int
    positive: int
    latency_ms: float = 40.0
    errors: int = 0
    fallback_from: str | None = None  # `variant:version` that failed, when `previous` answered instead


def plant(
    registry: TrackingConfig, *groups: Planted, corrections: dict[int, object] | None = None
) -> list[str]:
    """Traces and feedback as the gateway writes them; returns the trace ids in order."""
    experiment = serving_experiment(registry, MonitorConfig())
    found = mlflow.get_experiment_by_name(experiment)
    # Its artifacts (the traces' data) beside the store's, as the gateway places them: without a
    # location, MLflow would put them in ./mlruns of the working directory.
    location = f"{tracking.artifact_uri(registry)}/{experiment}"
    experiment_id = (
        found.experiment_id if found else mlflow.create_experiment(experiment, artifact_location=location)
    )
    rng = random.Random(7)
    ids: list[tuple[str, Planted, int]] = []
    for group in groups:
        for i in range(group.requests):
            start = time.time_ns()
            span = mlflow.start_span_no_context(
                "chat.completions",
                span_type="CHAT_MODEL",
                inputs={
                    "model": registry.registered_model,
                    "messages": [
                        {"role": "system", "content": "You are the support assistant."},
                        {"role": "user", "content": f"My card was charged twice ({group.variant} {i})"},
                    ],
                },
                tags={
                    VARIANT_TAG: group.variant,
                    MODEL_VERSION_TAG: group.version,
                    REGISTERED_MODEL_TAG: registry.registered_model,
                    **({FALLBACK_TAG: group.fallback_from} if group.fallback_from else {}),
                },
                metadata={USER_KEY: f"user-{group.variant}-{i}", SESSION_KEY: f"s-{i}"},
                experiment_id=experiment_id,
                start_time_ns=start,
            )
            failed = i < group.errors
            span.set_attribute(
                SpanAttributeKey.CHAT_USAGE, {"input_tokens": 20, "output_tokens": 10, "total_tokens": 30}
            )
            latency = group.latency_ms * (0.5 + rng.random())
            span.end(
                outputs=None
                if failed
                else {"choices": [{"message": {"role": "assistant", "content": "Category: billing"}}]},
                status=SpanStatusCode.ERROR if failed else SpanStatusCode.OK,
                end_time_ns=start + int(latency * 1e6),
            )
            ids.append((span.trace_id, group, i))
    mlflow.flush_trace_async_logging()
    for trace_id, group, i in ids:
        rated_index = i - group.errors
        if 0 <= rated_index < group.rated:
            value = rated_index < group.positive
            mlflow.log_feedback(
                trace_id=trace_id,
                name=FEEDBACK,
                value=value,
                source=AssessmentSource(
                    source_type=AssessmentSourceType.HUMAN, source_id=f"user-{group.variant}-{i}"
                ),
            )
    for index, correction in (corrections or {}).items():
        mlflow.log_expectation(
            trace_id=ids[index][0],
            name=CORRECTION,
            value=correction,
            source=AssessmentSource(source_type=AssessmentSourceType.HUMAN, source_id="user"),
        )
    return [trace_id for trace_id, _, _ in ids]
