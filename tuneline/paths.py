"""The one place that knows where things live: the project folder, and every relative path taken from it.

The project folder holds `configs/` (the default config is `configs/local.yaml`), `data/` and the
`.tuneline/` store; every relative path of a config is relative to it. It is `$TUNELINE_PROJECT` when
that is set (`tuneline --project DIR` sets it, so that the flows, the server the run starts and any
other subprocess agree), else the working directory. It is never the folder tuneline is installed in:
an installed tuneline works on the project it is started in, as git or make do. A Prefect deployment
runs its flows in the folder `prefect deploy` ran in (prefect.yaml's pull step), its project folder.
"""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ENV = "TUNELINE_PROJECT"


def project_root() -> Path:
    """The project folder: $TUNELINE_PROJECT, else the working directory (read at each call)."""
    configured = os.environ.get(PROJECT_ENV)
    return Path(configured).expanduser().resolve() if configured else Path.cwd()


def data_dir() -> Path:
    """The project's data folder: where `tuneline demo-data` writes and the default config reads."""
    return project_root() / "data"


def resolve(path: str | Path) -> Path:
    """A config path made absolute: relative paths are relative to the project folder."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else project_root() / p


def is_url(uri: str) -> bool:
    """True for fsspec URLs (s3://, gcs://, memory://, file://...), which are passed through untouched."""
    return "://" in uri
