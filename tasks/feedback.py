"""Feedback becomes data: users' corrections as a new raw partition the next nightly run trains on.

A user who corrects an answer (`POST /v1/feedback {..., correction}` on the gateway) leaves an
expectation named `correction` on the answer's trace. `harvest_corrections` turns every correction not
harvested before into one chat example, the request's messages as the gateway traced them followed by
the corrected answer as the assistant turn, and appends it to

    <feedback root>/dt=YYYY-MM-DD/feedback.jsonl

(the feedback root is `promotion.monitor.feedback_dir`, else the folder of the first data source). The
nightly run reads that partition like any other, through the same validation, secrets, dedupe and
quarantine rules: a correction that holds a credential, is empty, or is not a usable answer is
quarantined with its rule and its line, never dropped on the way in. The writer does not judge.

Provenance: next to it, `_feedback_provenance.jsonl` (a leading `_` marks it as not data for ingest)
holds one line per example line: the line number, the trace id, the correction's assessment id, the
variant and model version that answered, and when the correction was made. A quarantined line's
`partition` and `line` find its trace. Each assessment is harvested once: the ids in every provenance
file under the root are skipped on later runs (the data line is written before its provenance line, so
a crash between them repeats an example, which the exact-duplicate rule catches, and never loses one).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Trace
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tuneline import tracking
from tuneline.config import Config, ConfigError
from tuneline.paths import is_url, resolve
from tuneline.tasks.monitor import CORRECTION, MODEL_VERSION_TAG, VARIANT_TAG, serving_experiment

DEFAULT_LOG = logging.getLogger("tuneline.feedback")
FEEDBACK_FILE = "feedback.jsonl"
PROVENANCE_FILE = "_feedback_provenance.jsonl"
_GLOB_MAGIC = re.compile(r"[*?\[]")


@dataclass(frozen=True)
class Harvest:
    """What one harvest wrote: the partition file, the traces its new lines came from, and how many
    corrections had been harvested before."""

    path: Path | None
    trace_ids: list[str] = field(default_factory=list)
    already_harvested: int = 0

    @property
    def written(self) -> int:
        return len(self.trace_ids)


def feedback_root(config: Config) -> Path:
    """The folder feedback partitions go in (see the module docstring)."""
    configured = config.promotion.monitor.feedback_dir
    if configured:
        if is_url(configured):
            raise ConfigError(
                f"promotion.monitor.feedback_dir: {configured!r} is a URL; corrections are written to a "
                "local folder (set a path that one of data.sources reads)"
            )
        return resolve(configured)
    uri = config.data.sources[0].uri
    if is_url(uri):
        raise ConfigError(
            f"data.sources[0].uri is a URL ({uri.split('://')[0]}://...): set promotion.monitor.feedback_dir "
            "to a local folder that one of data.sources reads"
        )
    path = Path(uri)
    parts: list[str] = []
    for part in path.parts:  # up to the first glob or partition folder, or the file a source names
        if _GLOB_MAGIC.search(part) or part.startswith("dt=") or (part == path.name and path.suffix):
            break
        parts.append(part)
    return resolve(Path(*parts)) if parts else resolve(".")


def harvested_ids(root: Path) -> set[str]:
    """Assessment ids already written under `root` (every provenance file of every partition)."""
    seen: set[str] = set()
    for provenance in root.glob(f"dt=*/{PROVENANCE_FILE}"):
        for line in provenance.read_text(encoding="utf-8").splitlines():
            try:
                seen.add(str(json.loads(line)["assessment_id"]))
            except (ValueError, KeyError, TypeError):
                continue
    return seen


def request_messages(trace: Trace) -> list[Any]:
    """The chat messages the traced request sent (the first span whose inputs hold a `messages` list,
    at the top or one level down, e.g. {"request": {"messages": [...]}}); [] when none does."""
    for span in trace.data.spans if trace.data else []:
        inputs = span.inputs
        candidates = [inputs] + (list(inputs.values()) if isinstance(inputs, dict) else [])
        for candidate in candidates:
            if isinstance(candidate, dict) and isinstance(candidate.get("messages"), list):
                return list(candidate["messages"])
    return []


def correction_example(trace: Trace, correction: Any) -> dict[str, Any]:
    """The training example a correction makes: the request's messages up to the answer, then the
    correction as the assistant turn (written as given: the nightly rules judge it)."""
    messages = request_messages(trace)
    while messages and isinstance(messages[-1], dict) and messages[-1].get("role") == "assistant":
        messages.pop()  # a request never ends with the answer, but a traced conversation might
    return {"messages": [*messages, {"role": "assistant", "content": correction}]}


def corrected_traces(config: Config, since: datetime) -> list[Trace]:
    """Traces of the serving experiment since `since` that carry a correction, with their spans."""
    tracking_config = config.tracking
    experiment = tracking.client(tracking_config).get_experiment_by_name(
        serving_experiment(tracking_config, config.promotion.monitor)
    )
    if experiment is None:
        return []
    mlflow.set_tracking_uri(tracking.tracking_uri(tracking_config))
    found = mlflow.search_traces(
        locations=[experiment.experiment_id],
        filter_string=f"trace.timestamp_ms >= {int(since.timestamp() * 1000)}",
        return_type="list",
        include_spans=False,
    )
    ids = [t.info.trace_id for t in found if any(a.name == CORRECTION for a in t.info.assessments or [])]
    traces = [mlflow.get_trace(trace_id) for trace_id in ids]
    return sorted(
        (t for t in traces if t is not None), key=lambda t: (t.info.request_time or 0, t.info.trace_id)
    )


def harvest_corrections(
    config: Config,
    day: date,
    since: datetime,
    log: logging.Logger | logging.LoggerAdapter = DEFAULT_LOG,
) -> Harvest:
    """Append every correction made on a trace since `since`, not harvested before, to the `day`
    partition (see the module docstring)."""
    root = feedback_root(config)
    seen = harvested_ids(root)
    lines: list[str] = []
    provenance: list[dict[str, Any]] = []
    already = 0
    found = [(t, a) for t in corrected_traces(config, since) for a in _corrections(t.info.assessments or [])]
    # In the order the corrections were made.
    for trace, assessment in sorted(found, key=lambda f: (f[1].create_time_ms or 0, f[1].assessment_id)):
        if assessment.assessment_id in seen:
            already += 1
            continue
        seen.add(str(assessment.assessment_id))
        value = assessment.expectation.value if assessment.expectation else None
        lines.append(json.dumps(correction_example(trace, value), ensure_ascii=False))
        provenance.append(
            {
                "trace_id": trace.info.trace_id,
                "assessment_id": assessment.assessment_id,
                "variant": trace.info.tags.get(VARIANT_TAG),
                "model_version": trace.info.tags.get(MODEL_VERSION_TAG),
                "corrected_at": datetime.fromtimestamp(
                    (assessment.create_time_ms or 0) / 1000, UTC
                ).isoformat(timespec="seconds"),
            }
        )
    if not lines:
        log.info(
            "no new corrections since %s (%d harvested before)", since.isoformat(timespec="seconds"), already
        )
        return Harvest(None, [], already)
    partition = root / f"dt={day.isoformat()}"
    partition.mkdir(parents=True, exist_ok=True)
    data = partition / FEEDBACK_FILE
    first_line = _line_count(data) + 1
    _append(data, lines)
    _append(
        partition / PROVENANCE_FILE,
        [json.dumps({"line": first_line + i, **p}) for i, p in enumerate(provenance)],
    )
    log.info(
        "%d correction(s) written to %s (lines %d-%d)",
        len(lines),
        data,
        first_line,
        first_line + len(lines) - 1,
    )
    return Harvest(data, [p["trace_id"] for p in provenance], already)


def _corrections(assessments: Iterable[Any]) -> list[Any]:
    return [a for a in assessments if a.name == CORRECTION and a.valid is not False and a.expectation]


def _line_count(path: Path) -> int:
    if not path.exists():
        return 0
    with path.open("rb") as handle:
        return sum(1 for _ in handle)


def _append(path: Path, lines: Sequence[str]) -> None:
    with path.open("a", encoding="utf-8") as handle:
        handle.write("".join(line + "\n" for line in lines))
        handle.flush()


@task(name="harvest-feedback", cache_policy=NO_CACHE)
def harvest_task(config: Config, day: date, since: datetime) -> Harvest:
    return harvest_corrections(config, day, since, log=get_run_logger())
