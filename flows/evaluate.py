"""The `evaluate` flow (`tuneline evaluate --model ID`) and the evaluate -> promote tail of `retrain`.

- `evaluate` scores any model id against the base model (zero-shot and few-shot) and the current
  champion, in an MLflow run of its own; it never promotes anything.
- `evaluate_and_promote` runs inside a retrain flow run, on the provider the run already holds and in
  its MLflow run: evaluate, then the promotion gate decides. A rejection is a decision (returned), not
  a failure;
  only a failure (unknown model, refused key, a champion that moved meanwhile) raises, and then no
  alias has moved.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger
from prefect import runtime as prefect_runtime
from prefect.artifacts import create_markdown_artifact

from tuneline import provider as providers
from tuneline import tracking
from tuneline.config import Config, load_config
from tuneline.reporting import RunSummary, headline_metrics, render_run_summary
from tuneline.tasks.evaluate import EvaluationResult, evaluate_task
from tuneline.tasks.promote import Candidate, PromotionOutcome, promote_task
from tuneline.tracking import RunLog


def evaluate_and_promote(
    config: Config, provider: providers.Provider, run: RunLog, candidate: Candidate, train_file: str | None
) -> PromotionOutcome:
    """evaluate -> promote for a candidate trained in this flow run (see the module docstring)."""
    result = evaluate_task(config, provider, candidate.model_id, run, train_file)
    return promote_task(config, result, candidate, run)  # the task logs the decision and its rules


@flow(name="evaluate", log_prints=True)
def evaluate(model: str, config: str | None = None, train_file: str | None = None) -> EvaluationResult:
    """Evaluate `model` alone (no promotion) in a new MLflow run tagged with this flow run."""
    settings = load_config(config)
    logger = get_run_logger()
    run = RunLog.start(
        settings.tracking,
        flow="evaluate",
        name=f"evaluate {model}",
        tags={"tuneline.candidate_model": model},
    )
    run.link_flow_run(prefect_runtime.flow_run.id, prefect_runtime.flow_run.name)
    try:
        with providers.connect(
            settings, config_path=Path(config) if config else None, log=logger
        ) as provider:
            run.log_evaluated_model(
                candidate_model=model, base_model=settings.model.base, provider_name=provider.name
            )
            result = evaluate_task(settings, provider, model, run, train_file)
    except BaseException as exc:
        run.fail(exc)
        raise
    run.finish()
    summary = RunSummary(
        flow="evaluate",
        flow_run_name=str(prefect_runtime.flow_run.name or ""),
        outcome=f"evaluated {model} (nothing was promoted)",
        metrics=headline_metrics(result.metrics()),
        mlflow_run_url=run.url(),
        mlflow_hint=None if tracking.has_tracking_server(settings.tracking) else "open it with `tuneline ui`",
    )
    create_markdown_artifact(
        render_run_summary(summary), key="evaluate-summary", description=f"evaluate {model}"
    )
    return result
