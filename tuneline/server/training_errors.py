"""Why a training run stopped short, as the job's error: each exception carries the job's error `code`.
Importable without torch (the job scheduler and worker read `code`)."""

from __future__ import annotations


class TrainingError(RuntimeError):
    """A training run that cannot go on; `code` is the job's error code."""

    code = "training_failed"


class TrainingDiverged(TrainingError):
    code = "training_diverged"


class TrainingOutOfMemory(TrainingError):
    code = "out_of_memory"
