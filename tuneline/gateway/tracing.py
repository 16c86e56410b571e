"""Every answer traced to MLflow, off the request path: a bounded queue, exporter threads, counted drops.

The request path only draws a trace id (`tr-` + 32 hex digits, MLflow 3's form), puts a plain record on
a bounded queue (never waiting: a full queue drops the record and counts it) and returns the id in the
`x-tuneline-trace-id` header. An exporter (a child process by default, `serving.trace_export`) turns
records into MLflow traces (one LLM span with the request and the answer, token usage and latency) and
writes them in batches with MLflow's tracing client (`log_spans`, which creates each trace from its
root span) into the experiment `serving/<registered model>`. A tracking backend that
is down or slow therefore never fails or slows an answer: its failed exports are counted and dropped,
and once the queue is full further traces are dropped and counted (`stats()`, `GET /gateway/stats`).

Why not `mlflow.openai.autolog` or `@mlflow.trace` around the call: both create the span in the request
path (MLflow's experiment lookup and span bookkeeping per request) and choose the trace id themselves,
and MLflow's own async export queue discards silently when full; here the id must be in the response
before the trace is written, and the drops must be counted. The trace written is the same entity those
APIs write (tags, the standard `mlflow.trace.user`/`mlflow.trace.session` metadata, `mlflow.chat.tokenUsage`),
so `mlflow.search_traces`, the UI and `mlflow.log_feedback` treat it as any other.

Each trace carries the tags `tuneline.variant` (champion | challenger | previous | pinned),
`tuneline.model_version`, `tuneline.registered_model` and `tuneline.model_id`, plus
`tuneline.fallback_from` (`variant:version`) when the answer came from `previous` after a failure.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import multiprocessing
import os
import queue
import secrets
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

log = logging.getLogger("tuneline.gateway")

VARIANT_TAG = "tuneline.variant"
VERSION_TAG = "tuneline.model_version"
REGISTERED_MODEL_TAG = "tuneline.registered_model"
MODEL_ID_TAG = "tuneline.model_id"
FALLBACK_TAG = "tuneline.fallback_from"
STATUS_TAG = "tuneline.http_status"
USER_METADATA = "mlflow.trace.user"
SESSION_METADATA = "mlflow.trace.session"
TRACE_NAME = "chat.completions"
# Root span attributes the store turns into trace tags (MLflow's SpanAttributeKey.TRACE_TAG_PREFIX).
TRACE_TAG_ATTRIBUTE = "mlflow.traceTag."
# Traces written per store transaction, at most, and how long the exporter waits to fill a batch.
BATCH_SIZE = 100
BATCH_WAIT_S = 0.5
# Inputs and outputs longer than this are cut in the trace (a trace is for reading, not an archive).
MAX_TEXT = 64 * 1024


def experiment_name(registered_model: str) -> str:
    return f"serving/{registered_model}"


def new_trace_id() -> str:
    return "tr-" + secrets.token_hex(16)


@dataclass
class TraceRecord:
    """What one request leaves for its trace; built in the request path, so only plain values."""

    trace_id: str
    registered_model: str
    variant: str
    version: str
    model_id: str
    user: str | None
    session: str | None
    request: dict[str, Any]
    start_ns: int
    end_ns: int = 0
    status: int = 200
    response: bytes | None = None  # the upstream's body: JSON, or the SSE stream when streamed
    streamed: bool = False
    error: str | None = None
    fallback_from: str | None = None
    extra_tags: dict[str, str] = field(default_factory=dict)


def _usage(body: dict[str, Any] | None) -> dict[str, int] | None:
    usage = body.get("usage") if isinstance(body, dict) else None
    if not isinstance(usage, dict):
        return None
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if not isinstance(prompt, int) or not isinstance(completion, int):
        return None
    total = usage.get("total_tokens")
    return {
        "input_tokens": prompt,
        "output_tokens": completion,
        "total_tokens": total if isinstance(total, int) else prompt + completion,
    }


def _from_stream(raw: bytes) -> dict[str, Any]:
    """A streamed answer (server-sent events) folded into one completion-shaped body."""
    text: list[str] = []
    usage: dict[str, Any] | None = None
    finish: str | None = None
    model = ""
    for line in raw.splitlines():
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if not data or data == b"[DONE]":
            continue
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError:
            continue
        if not isinstance(chunk, dict):
            continue
        model = chunk.get("model") or model
        if isinstance(chunk.get("usage"), dict):
            usage = chunk["usage"]
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            if isinstance(delta.get("content"), str):
                text.append(delta["content"])
            finish = choice.get("finish_reason") or finish
    body: dict[str, Any] = {
        "object": "chat.completion",
        "model": model,
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "".join(text)}, "finish_reason": finish}
        ],
    }
    if usage is not None:
        body["usage"] = usage
    return body


def _answer_text(body: dict[str, Any] | None) -> str:
    try:
        content = body["choices"][0]["message"]["content"]  # type: ignore[index]
    except (KeyError, IndexError, TypeError):
        return ""
    return content if isinstance(content, str) else ""


def _last_user_text(request: dict[str, Any]) -> str:
    for message in reversed(request.get("messages") or []):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return content
    return ""


def _dumps(value: Any) -> str:
    text = orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS, default=str).decode()
    return text if len(text) <= MAX_TEXT else json.dumps(text[:MAX_TEXT] + "…(cut)")


def _b64(hex_id: str) -> str:
    return base64.b64encode(bytes.fromhex(hex_id)).decode()


def trace_dict(record: TraceRecord, experiment_id: str) -> dict[str, Any]:
    """The record as MLflow's trace JSON (`mlflow.entities.Trace.from_dict`): one LLM span."""
    body: dict[str, Any] | None = None
    if record.response is not None:
        if record.streamed:
            body = _from_stream(record.response)
        else:
            try:
                parsed = orjson.loads(record.response)
                body = parsed if isinstance(parsed, dict) else {"value": parsed}
            except orjson.JSONDecodeError:
                body = {"raw": record.response[:MAX_TEXT].decode("utf-8", "replace")}
    usage = _usage(body)
    ok = record.error is None and record.status < 400
    hex_id = record.trace_id.removeprefix("tr-")
    duration_ms = max(0, (record.end_ns - record.start_ns) // 1_000_000)
    start = datetime.fromtimestamp(record.start_ns / 1e9, tz=UTC)
    inputs = record.request
    outputs: Any = body if body is not None else {"error": record.error, "status": record.status}
    tags = {
        VARIANT_TAG: record.variant,
        VERSION_TAG: record.version,
        REGISTERED_MODEL_TAG: record.registered_model,
        MODEL_ID_TAG: record.model_id,
        STATUS_TAG: str(record.status),
        "mlflow.traceName": TRACE_NAME,
        **record.extra_tags,
    }
    if record.fallback_from:
        tags[FALLBACK_TAG] = record.fallback_from
    metadata = {
        "mlflow.trace_schema.version": "3",
        "mlflow.traceInputs": _dumps(inputs),
        "mlflow.traceOutputs": _dumps(outputs),
    }
    if record.user:
        metadata[USER_METADATA] = record.user
    if record.session:
        metadata[SESSION_METADATA] = record.session
    attributes = {
        "mlflow.traceRequestId": json.dumps(record.trace_id),
        "mlflow.spanType": json.dumps("LLM"),
        "mlflow.spanInputs": _dumps(inputs),
        "mlflow.spanOutputs": _dumps(outputs),
        "tuneline.variant": json.dumps(record.variant),
        "tuneline.model_version": json.dumps(record.version),
        "tuneline.model_id": json.dumps(record.model_id),
        "tuneline.streamed": json.dumps(record.streamed),
    }
    if usage is not None:
        metadata["mlflow.trace.tokenUsage"] = json.dumps(usage)
        attributes["mlflow.chat.tokenUsage"] = json.dumps(usage)
    return {
        "info": {
            "trace_id": record.trace_id,
            "trace_location": {
                "type": "MLFLOW_EXPERIMENT",
                "mlflow_experiment": {"experiment_id": experiment_id},
            },
            "request_time": start.strftime("%Y-%m-%dT%H:%M:%S.") + f"{start.microsecond // 1000:03d}Z",
            "execution_duration_ms": duration_ms,
            "state": "OK" if ok else "ERROR",
            "trace_metadata": metadata,
            "tags": tags,
            "request_preview": _last_user_text(inputs)[:1000],
            "response_preview": (_answer_text(body) if ok else record.error or "")[:1000],
        },
        "data": {
            "spans": [
                {
                    "trace_id": _b64(hex_id),
                    "span_id": _b64(secrets.token_hex(8)),
                    "parent_span_id": None,
                    "name": TRACE_NAME,
                    "start_time_unix_nano": record.start_ns,
                    "end_time_unix_nano": max(record.end_ns, record.start_ns),
                    "events": [],
                    "status": {
                        "code": "STATUS_CODE_OK" if ok else "STATUS_CODE_ERROR",
                        "message": "" if ok else (record.error or f"HTTP {record.status}"),
                    },
                    "attributes": attributes,
                    "links": [],
                }
            ]
        },
    }


@dataclass
class TraceStats:
    queued: int = 0
    exported: int = 0
    dropped_queue_full: int = 0
    failed_export: int = 0

    def as_dict(self) -> dict[str, int]:
        return {
            "queued": self.queued,
            "exported": self.exported,
            "dropped_queue_full": self.dropped_queue_full,
            "failed_export": self.failed_export,
            "dropped": self.dropped_queue_full + self.failed_export,
        }


class TraceWriter:
    """Writes trace records to MLflow: the experiment per registered model, then the trace and its span."""

    def __init__(self, tracking_uri: str, artifact_root: str | None) -> None:
        self.tracking_uri = tracking_uri
        self.artifact_root = artifact_root.rstrip("/") if artifact_root else None
        self._experiments: dict[str, str] = {}
        self._client: Any = None

    def _tracing_client(self) -> Any:
        if self._client is None:
            from mlflow.tracing.client import TracingClient

            self._client = TracingClient(self.tracking_uri)
        return self._client

    def experiment_id(self, registered_model: str) -> str:
        name = experiment_name(registered_model)
        found = self._experiments.get(name)
        if found is not None:
            return found
        import mlflow

        client = mlflow.MlflowClient(tracking_uri=self.tracking_uri)
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            location = f"{self.artifact_root}/{name}" if self.artifact_root else None
            try:
                experiment_id = client.create_experiment(name, artifact_location=location)
            except Exception:  # created meanwhile by another process (the monitor, another gateway)
                experiment = client.get_experiment_by_name(name)
                if experiment is None:
                    raise
                experiment_id = experiment.experiment_id
        else:
            experiment_id = experiment.experiment_id
        self._experiments[name] = experiment_id
        return experiment_id

    def export(self, records: list[TraceRecord]) -> None:
        """Write a batch of traces: one `log_spans` call (one store transaction) per registered model.
        The store creates each trace from its root span: the trace tags ride on the span as
        `mlflow.traceTag.*` attributes, the user and session as `user.id` and `session.id`, the token
        usage as `mlflow.chat.tokenUsage` (MLflow's OTLP conventions). A third of the CPU of a
        `start_trace` + `log_spans` pair per trace, measured on SQLite."""
        from mlflow.entities import Trace

        by_model: dict[str, list[Any]] = {}
        for record in records:
            experiment_id = self.experiment_id(record.registered_model)
            document = trace_dict(record, experiment_id)
            span = document["data"]["spans"][0]
            attributes = span["attributes"]
            for key, value in document["info"]["tags"].items():
                attributes[TRACE_TAG_ATTRIBUTE + key] = json.dumps(value)
            if record.user:
                attributes["user.id"] = json.dumps(record.user)
            if record.session:
                attributes["session.id"] = json.dumps(record.session)
            by_model.setdefault(experiment_id, []).extend(Trace.from_dict(document).data.spans)
        client = self._tracing_client()
        for experiment_id, spans in by_model.items():
            client.log_spans(experiment_id, spans)


class _FailureLog:
    """One warning per 10 s while exports fail, not one per trace."""

    def __init__(self) -> None:
        self.last = 0.0

    def __call__(self, exc: BaseException) -> None:
        now = time.monotonic()
        if now - self.last > 10.0:
            self.last = now
            log.warning(
                "trace export failed (%s: %s); traces are dropped and counted until the tracking "
                "backend answers (see GET /gateway/stats)",
                type(exc).__name__,
                str(exc)[:200],
            )


def _export_process(
    records: Any, tracking_uri: str, artifact_root: str | None, exported: Any, failed: Any
) -> None:
    """The exporter process's loop: its own interpreter, so MLflow's work never holds the gateway's GIL,
    at a lower CPU priority than the gateway."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _yield_the_cpu()
    writer = TraceWriter(tracking_uri, artifact_root)
    failure_log = _FailureLog()
    while True:
        batch = _next_batch(records)
        if batch is None:
            return
        try:
            writer.export(batch)
        except Exception as exc:
            with failed.get_lock():
                failed.value += len(batch)
            failure_log(exc)
        else:
            with exported.get_lock():
                exported.value += len(batch)


def _yield_the_cpu() -> None:
    """Put this process below every other in CPU priority: on a busy host answers come first, and a
    backlog of traces waits in the bounded queue (dropped and counted when it overflows). Linux's
    SCHED_IDLE, where there is one: a gateway thread that wakes up preempts an idle-class process at
    once, where a merely niced one keeps the core for the rest of its time slice, milliseconds added to
    each hop of a request on a saturated host (measured with benchmarks/gateway.py); else nice 19."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # type: ignore[attr-defined]
    except (AttributeError, OSError):
        with contextlib.suppress(OSError):
            os.nice(19)


def _next_batch(records: Any) -> list[TraceRecord] | None:
    """The next records to write: waits for one, then takes what arrives within BATCH_WAIT_S, up to
    BATCH_SIZE. None when the queue says stop (and nothing is left to write)."""
    first = records.get()
    if first is None:
        return None
    batch = [first]
    deadline = time.monotonic() + BATCH_WAIT_S
    while len(batch) < BATCH_SIZE:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            record = records.get(timeout=left)
        except queue.Empty:
            break
        if record is None:  # stop after this batch: put the signal back for the loop
            records.put(None)
            break
        batch.append(record)
    return batch


class TraceExporter:
    """A bounded queue of trace records and who writes them to MLflow: a child process (`process`, the
    default: MLflow's per-trace work, a few milliseconds of CPU, runs outside the gateway's interpreter
    and never holds its GIL) or threads of the gateway's own process (`thread`)."""

    def __init__(
        self,
        tracking_uri: str,
        artifact_root: str | None,
        *,
        queue_size: int,
        mode: str = "process",
        threads: int = 2,
    ) -> None:
        self.mode = mode
        self.writer = TraceWriter(tracking_uri, artifact_root)
        self.dropped_queue_full = 0
        self.queued = 0
        self._lock = threading.Lock()
        self._failure_log = _FailureLog()
        if mode == "process":
            context = multiprocessing.get_context("spawn")
            self.queue: Any = context.Queue(maxsize=queue_size)
            self._exported: Any = context.Value("q", 0)
            self._failed: Any = context.Value("q", 0)
            self._process: Any = context.Process(
                target=_export_process,
                args=(self.queue, tracking_uri, artifact_root, self._exported, self._failed),
                name="tuneline-trace-export",
                daemon=True,
            )
            self._threads: list[threading.Thread] = []
        else:
            self.queue = queue.Queue(maxsize=queue_size)
            self._exported = _Counter()
            self._failed = _Counter()
            self._process = None
            self._threads = [
                threading.Thread(target=self._run, name=f"tuneline-trace-export-{i}", daemon=True)
                for i in range(threads)
            ]

    @property
    def stats(self) -> TraceStats:
        return TraceStats(
            queued=self.queued,
            exported=int(self._exported.value),
            dropped_queue_full=self.dropped_queue_full,
            failed_export=int(self._failed.value),
        )

    @property
    def pid(self) -> int | None:
        """The exporter process's id (None with `thread` export, or before start)."""
        return self._process.pid if self._process is not None else None

    def depth(self) -> int:
        return max(0, self.queued - int(self._exported.value) - int(self._failed.value))

    def start(self) -> None:
        if self._process is not None:
            self._process.start()
        for thread in self._threads:
            thread.start()

    def submit(self, record: TraceRecord) -> bool:
        """Queue a record without waiting; False (and counted) when the queue is full."""
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            self.dropped_queue_full += 1
            return False
        self.queued += 1
        return True

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Wait until every queued record is exported or dropped; False on timeout."""
        deadline = time.monotonic() + timeout_s
        while self.depth():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    def stop(self, timeout_s: float = 5.0) -> None:
        """Export what is queued (within `timeout_s`), then stop."""
        self.flush(timeout_s)
        workers = 1 if self._process is not None else len(self._threads)
        for _ in range(workers):
            try:
                self.queue.put(None, timeout=1.0)
            except queue.Full:
                break
        for thread in self._threads:
            thread.join(timeout=1.0)
        if self._process is not None:
            self._process.join(timeout=2.0)
            if self._process.is_alive():
                self._process.terminate()
                self._process.join(timeout=2.0)

    def _run(self) -> None:
        while True:
            batch = _next_batch(self.queue)
            if batch is None:
                return
            try:
                self.writer.export(batch)
            except Exception as exc:  # the backend is down or refused: count, never raise
                self._failed.add(len(batch))
                self._failure_log(exc)
            else:
                self._exported.add(len(batch))


class _Counter:
    """A thread-safe counter with the `.value` of a multiprocessing Value."""

    def __init__(self) -> None:
        self.value = 0
        self._lock = threading.Lock()

    def add(self, n: int = 1) -> None:
        with self._lock:
            self.value += n
