"""`tuneline`: one command per stage of the life cycle. The only module that reaches up to flows/.

Exit codes: 0 success (a rejected candidate is a decision, not a failure), 1 a failed run or gate,
2 bad usage or config (one line naming the key and the fix).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NoReturn

import typer
from rich.console import Console

from tuneline.config import Config, ConfigError, load_config

# Offline by default: no telemetry from Prefect or anything else.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
console = Console(stderr=True)

ConfigOption = typer.Option(None, "--config", "-c", help="YAML config (default configs/local.yaml).")


def usage_error(message: str) -> NoReturn:
    console.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def read_config(path: Path | None, overrides: dict[str, Any] | None = None) -> Config:
    """The validated config, or exit 2 with one line naming the key and the fix."""
    try:
        return load_config(path, overrides={k: v for k, v in (overrides or {}).items() if v is not None})
    except ConfigError as exc:
        usage_error(str(exc))


if __name__ == "__main__":
    app()
