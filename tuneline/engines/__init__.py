"""Execution engines of the data plane: where the per-partition work (ingest, validate, the credential
and PII screen, exact tokens) runs.

- `local` (the default): in the flow's own process, as the `ingest`, `validate` and `dedupe` tasks of
  tasks/; needs nothing beyond tuneline's own dependencies.
- `ray` (tuneline/engines/ray_engine.py, `pip install 'tuneline[ray]'`): each block of input files is
  read, validated and screened by a Ray task (retried by Ray when its worker dies), and the blocks'
  frames are put back together in file order; the batch-wide rules (leakage, exact and near
  duplicates, contradictions) then run on the whole frame, as with `local`.

Either engine gives the same record frame, so the same training, validation and quarantine files and
the same dataset hash: every per-partition rule is a function of one record alone (record ids are
made from the record's file, partition, line and text), and the blocks are concatenated in the order
`ingest.select_files` sorted the files, the order the local engine reads them in.

This module imports no Ray: the local engine works without it installed.
"""

from __future__ import annotations

from typing import Literal

Engine = Literal["local", "ray"]
ENGINES: tuple[Engine, ...] = ("local", "ray")


def ray_available() -> bool:
    """Whether the `ray` extra is installed."""
    try:
        import ray  # noqa: F401
    except ImportError:
        return False
    return True
