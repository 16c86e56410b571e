"""The evaluation's answer cache: what a model answered to a request, kept across runs.

A model id with its creation time names fixed weights (a snapshot, a fine-tuned model, a checkpoint),
and evaluation asks at a fixed temperature and seed, so the nightly run need not ask the base model,
the few-shot baseline and the champion again what it asked them the night before: their answers come
from here, and only the new candidate is asked. The key holds everything the answer depends on (the
provider, the model id and its `created` time, the messages and their shorter variants, temperature,
seed, max_tokens) and nothing secret. Only answers are kept, never errors. Writes are atomic (SQLite),
so a killed run leaves every answer it stored readable.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def answer_key(provider: str, model: str, created: int, request: Mapping[str, Any]) -> str:
    """The cache key of one request to one model: a hash of all the answer depends on."""
    document = json.dumps([provider, model, created, request], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(document.encode("utf-8")).hexdigest()


class AnswerCache:
    """A SQLite table of answers by key (see the module docstring); safe to share between threads."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, text TEXT NOT NULL, fallback INTEGER NOT NULL)"
        )

    def get_many(self, keys: Sequence[str]) -> dict[str, tuple[str, int]]:
        """(text, fallback) of each key that has an answer."""
        found: dict[str, tuple[str, int]] = {}
        with self._lock:
            for begin in range(0, len(keys), 500):
                chunk = list(keys[begin : begin + 500])
                marks = ",".join("?" * len(chunk))
                rows = self._db.execute(
                    f"SELECT key, text, fallback FROM answers WHERE key IN ({marks})", chunk
                ).fetchall()
                found.update((key, (text, fallback)) for key, text, fallback in rows)
        return found

    def put(self, key: str, text: str, fallback: int) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO answers (key, text, fallback) VALUES (?, ?, ?)", (key, text, fallback)
            )

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM answers").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()
