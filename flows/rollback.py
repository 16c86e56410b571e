"""The `rollback` flow (deployment `rollback`, and `tuneline rollback`): move `champion` back.

`champion` moves to the `previous` version, or to `to_version` when given; the version it leaves
becomes `previous`. Who, when and why are written on both versions' tags (see tasks/promote.py).
"""

from __future__ import annotations

import getpass
from datetime import UTC, datetime

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from tuneline.config import load_config
from tuneline.reporting import render_rollback_summary
from tuneline.tasks.promote import RollbackOutcome
from tuneline.tasks.promote import rollback as move_champion_back


@flow(name="rollback", log_prints=True)
def rollback(
    config: str | None = None,
    to_version: str | None = None,
    reason: str = "manual rollback",
    by: str | None = None,
) -> RollbackOutcome:
    """Move `champion` of the configured registered model back; returns the versions it moved between."""
    settings = load_config(config)
    who = by or getpass.getuser()
    outcome = move_champion_back(settings.tracking, to_version, by=who, reason=reason, at=datetime.now(UTC))
    summary = render_rollback_summary(
        settings.tracking.registered_model,
        outcome.from_version,
        outcome.to_version,
        outcome.model_id,
        who,
        reason,
    )
    get_run_logger().info("%s", summary)
    create_markdown_artifact(
        summary, key="rollback-summary", description="rollback: where champion moved, by whom and why"
    )
    return outcome
