"""The demo data of tuneline, made byte for byte from a seed: `tuneline demo-data` or
`python -m tuneline.demo [--seed N] [--out DIR]` writes under DIR (default: the project's data/):

- `raw/support/dt=YYYY-MM-DD/`: the customer-support task in daily partitions: chat JSONL
  (`part-0000.jsonl`), legacy prompt/completion JSONL (`legacy.jsonl`, some days) and one CRM export
  (`crm_export.csv`), with the dirt of content/dirt.yaml planted in them;
- `eval/support_eval.jsonl` (held-out tickets) and `eval/support_paraphrases.jsonl` (a stress set in
  sentences training never uses);
- `general/canary.jsonl` and `general/general_chat.jsonl` (general.py);
- `planted_defects.json`: the answer key, written from what was planted (planting.py);
- `README.md`: what all of it is, with the counts;
- with `--preferences` only: `raw/support_preferences/dt=YYYY-MM-DD/` (preferences.py), preference
  lines for `training.method: dpo` (configs/local-dpo.yaml).

The same seed gives the same bytes. Nothing is written unless guarantees.check passes.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from string import Template
from typing import Any

from tuneline.demo import guarantees
from tuneline.demo.content import DIRT, INTENTS, PARAPHRASE_BOOK, STREAM, SYSTEM_PROMPT
from tuneline.demo.general import canary_set, general_corpus
from tuneline.demo.messages import PromptRegistry, chat_example, make_eval_set
from tuneline.demo.planting import REPO_PREFIX, DemoRecord, Planter, to_line
from tuneline.demo.preferences import preference_files

DEFAULT_SEED = 20261125
EVAL_PATH = "eval/support_eval.jsonl"
PARAPHRASE_PATH = "eval/support_paraphrases.jsonl"
CANARY_PATH = "general/canary.jsonl"
GENERAL_PATH = "general/general_chat.jsonl"
ANSWER_KEY_PATH = "planted_defects.json"


def answer_key(records: list[DemoRecord]) -> list[dict[str, Any]]:
    """Every planted record with what it was planted as, in the contract's record order."""

    def ref(record: DemoRecord | None) -> dict[str, Any] | None:
        return None if record is None else {"source": record.path, "line": record.line}

    return [
        {
            "source": r.path,
            "line": r.line,
            "kind": r.kind,
            "reason": r.reason,
            "duplicate_of": ref(r.duplicate_of),
            "eval_example": None
            if r.eval_line is None
            else {"source": f"{REPO_PREFIX}/{EVAL_PATH}", "line": r.eval_line},
            "note": r.note,
        }
        for r in records
        if r.kind is not None
    ]


def _jsonl(examples: Sequence[dict[str, Any]]) -> bytes:
    return b"".join(to_line(e) + b"\n" for e in examples)


def _csv(records: Sequence[DemoRecord]) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(STREAM.csv_columns)
    writer.writerows(r.row for r in records if r.row is not None)
    return buffer.getvalue().encode("utf-8")


def _readme(seed: int, records: list[DemoRecord], key: list[dict[str, Any]], sizes: dict[str, int]) -> bytes:
    kept = sum(r.reason is None for r in records)
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for entry in key:
        by_kind.setdefault(entry["kind"], []).append(entry)
    rows = []
    for kind, description in DIRT.kinds.items():
        entries = by_kind.get(kind, [])
        reasons = sorted({str(e["reason"]) if e["reason"] else "kept" for e in entries})
        what = description.format(
            model=guarantees.MODEL, context_limit=guarantees.CONTEXT_LIMIT, encoding=guarantees.ENCODING
        ).replace("|", "\\|")  # a pipe would end the table cell
        rows.append(f"| `{kind}` | {len(entries)} | {', '.join(f'`{r}`' for r in reasons)} | {what} |")
    by_reason: dict[str, int] = {}
    for r in records:
        if r.reason:
            by_reason[r.reason] = by_reason.get(r.reason, 0) + 1
    template = resources.files(__package__).joinpath("content", "README.md.template").read_text("utf-8")
    text = Template(template).substitute(
        seed=seed,
        n_intents=len(INTENTS),
        intents=", ".join(f"`{i.name}`" for i in INTENTS),
        system_prompt=SYSTEM_PROMPT,
        files="\n".join(f"| `{path}` | {n} |" for path, n in sizes.items()),
        n_legacy=len(STREAM.legacy_days),
        csv_day=STREAM.csv_day,
        csv_columns=", ".join(STREAM.csv_columns),
        n_records=len(records),
        n_kept=kept,
        n_quarantined=len(records) - kept,
        context_limit=guarantees.CONTEXT_LIMIT,
        encoding=guarantees.ENCODING,
        kinds="\n".join(rows),
        by_reason=", ".join(f"`{k}` {v}" for k, v in sorted(by_reason.items())),
    )
    return text.encode("utf-8")


@dataclass
class DemoData:
    """What `build` made: file contents by path relative to the output folder, and the records."""

    files: dict[str, bytes]
    records: list[DemoRecord] = field(repr=False)
    answer_key: list[dict[str, Any]] = field(repr=False)

    @property
    def kept(self) -> int:
        return sum(r.reason is None for r in self.records)


def build(seed: int = DEFAULT_SEED, preferences: bool = False) -> DemoData:
    """All demo files as bytes, checked against their guarantees; nothing is written. `preferences`
    adds the preference partition (preferences.py)."""
    registry = PromptRegistry()
    eval_set = make_eval_set(random.Random(f"{seed}/eval"), registry)
    layout = Planter(random.Random(f"{seed}/raw"), registry, eval_set).run()
    eval_examples = [chat_example(user, intent.answer) for intent, user in eval_set]
    paraphrases = make_eval_set(random.Random(f"{seed}/paraphrases"), registry, PARAPHRASE_BOOK)
    records = layout.records()
    guarantees.check(records, eval_examples)
    key = answer_key(records)

    files: dict[str, bytes] = {}
    for path, file_records in layout.files.items():
        if path.endswith(".csv"):
            files[path] = _csv(file_records)
        else:
            files[path] = b"".join(r.raw + b"\n" for r in file_records if r.raw is not None)
            if files[path].count(b"\n") != len(file_records):
                raise RuntimeError(f"{path}: a record has no JSONL line")
    files[EVAL_PATH] = _jsonl(eval_examples)
    files[PARAPHRASE_PATH] = _jsonl([chat_example(user, intent.answer) for intent, user in paraphrases])
    files[CANARY_PATH] = _jsonl(canary_set())
    files[GENERAL_PATH] = _jsonl(general_corpus(random.Random(f"{seed}/general")))
    files[ANSWER_KEY_PATH] = (json.dumps(key, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
    files = dict(sorted(files.items()))
    sizes = {
        p: len(layout.files[p]) if p in layout.files else files[p].count(b"\n")
        for p in files
        if p != ANSWER_KEY_PATH
    }
    files["README.md"] = _readme(seed, records, key, sizes)
    if preferences:
        files.update(preference_files(records, seed))
    return DemoData(files=dict(sorted(files.items())), records=records, answer_key=key)


def generate(out: Path, seed: int = DEFAULT_SEED, preferences: bool = False) -> DemoData:
    """Write the demo data under `out` (byte-identical for the same seed) and return what was written."""
    data = build(seed, preferences)
    for relative, content in data.files.items():
        target = out / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)
    return data


def summary(data: DemoData, out: Path) -> str:
    quarantined = len(data.records) - data.kept
    return (
        f"wrote {len(data.files)} files under {out}: {len(data.records)} raw records "
        f"({data.kept} clean, {quarantined} planted for quarantine), answer key {ANSWER_KEY_PATH}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    from tuneline.paths import data_dir

    parser = argparse.ArgumentParser(
        prog="python -m tuneline.demo", description="Write tuneline's demo data, reproducibly from a seed."
    )
    parser.add_argument(
        "--seed", type=int, default=DEFAULT_SEED, help=f"random seed (default {DEFAULT_SEED})"
    )
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: the project's data/)")
    parser.add_argument(
        "--preferences", action="store_true", help="also write the preference (DPO) partition"
    )
    args = parser.parse_args(argv)
    out = args.out or data_dir()
    print(summary(generate(out, args.seed, args.preferences), out))
    return 0
