"""The one place that knows where things live: every relative path is taken from the project root."""

from __future__ import annotations

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = PROJECT_ROOT / "data"


def resolve(path: str | Path) -> Path:
    """A config path made absolute: relative paths are relative to the project root, not the cwd."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else PROJECT_ROOT / p


def is_url(uri: str) -> bool:
    """True for fsspec URLs (s3://, gcs://, memory://, file://...), which are passed through untouched."""
    return "://" in uri
