"""Traces in MLflow per variant, feedback round trips into a real store, and a down backend."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import httpx
import mlflow
import pytest
from gateway_harness import Gateway, free_port, wait_for

from tuneline.gateway.feedback import FeedbackSpool
from tuneline.gateway.tracing import experiment_name


def traces_of(gw: Gateway, **filters: str) -> list:
    client = mlflow.MlflowClient(tracking_uri=gw.config.tracking.tracking_uri)
    experiment = client.get_experiment_by_name(experiment_name(gw.name))
    assert experiment is not None
    conditions = " AND ".join(f"tags.`{k}` = '{v}'" for k, v in filters.items())
    mlflow.set_tracking_uri(gw.config.tracking.tracking_uri)
    return mlflow.search_traces(
        locations=[experiment.experiment_id], filter_string=conditions or None, return_type="list"
    )


def test_every_answer_is_traced_with_variant_version_user_session_and_tokens(gateways, upstreams) -> None:
    gw: Gateway = gateways(trace_export="thread")
    v1 = gw.registry.register(upstreams(), "ft:x:v1", "champion")
    v2 = gw.registry.register(upstreams(), "ft:x:v2", "challenger")
    client = gw.client()
    first = client.chat.completions.with_raw_response.create(
        model=gw.name,
        messages=[{"role": "user", "content": "where is my parcel"}],
        user="alice",
        extra_headers={"x-tuneline-session": "session-1"},
    )
    pinned = gw.ask(f"{gw.name}@challenger", user="bob")
    stream = client.chat.completions.with_raw_response.create(
        model=gw.name,
        messages=[{"role": "user", "content": "stream this please"}],
        user="carol",
        stream=True,
        stream_options={"include_usage": True},
    )
    streamed_text = "".join(c.choices[0].delta.content or "" for c in stream.parse() if c.choices)
    assert streamed_text == "echo: stream this please"
    assert gw.app_state.tracer.flush(30)

    champion = traces_of(gw, **{"tuneline.variant": "champion"})
    assert {t.info.trace_id for t in champion} == {
        first.headers["x-tuneline-trace-id"],
        stream.headers["x-tuneline-trace-id"],
    }
    trace = mlflow.get_trace(first.headers["x-tuneline-trace-id"])
    info = trace.info
    assert info.tags["tuneline.model_version"] == v1
    assert info.tags["tuneline.registered_model"] == gw.name
    assert info.tags["tuneline.model_id"] == "ft:x:v1"
    assert info.trace_metadata["mlflow.trace.user"] == "alice"
    assert info.trace_metadata["mlflow.trace.session"] == "session-1"
    assert info.token_usage == {"input_tokens": 4, "output_tokens": 5, "total_tokens": 9}
    assert info.execution_duration is not None and info.execution_duration >= 0
    assert info.state.value == "OK"
    assert trace.data.spans[0].outputs["choices"][0]["message"]["content"] == "echo: where is my parcel"
    assert info.request_preview == "where is my parcel"

    (challenger,) = traces_of(gw, **{"tuneline.variant": "challenger"})
    assert challenger.info.trace_id == pinned.headers["x-tuneline-trace-id"]
    assert challenger.info.tags["tuneline.model_version"] == v2
    streamed = mlflow.get_trace(stream.headers["x-tuneline-trace-id"])
    assert streamed.data.spans[0].outputs["choices"][0]["message"]["content"] == streamed_text
    assert streamed.info.token_usage["output_tokens"] == 4
    assert gw.app_state.stats()["traces"]["exported"] == 3


def test_failures_are_traced_as_errors(gateways, upstreams) -> None:
    gw: Gateway = gateways(upstream_retries=0, trace_export="thread")
    down = upstreams()
    down.state.fail_status = 503
    gw.registry.register(down, "ft:x:v1", "champion")
    response = httpx.post(
        f"{gw.base_url}/chat/completions",
        json={"model": gw.name, "messages": [{"role": "user", "content": "hi"}]},
    )
    assert response.status_code == 502
    assert gw.app_state.tracer.flush(30)
    trace = mlflow.get_trace(response.headers["x-tuneline-trace-id"])
    assert trace.info.state.value == "ERROR"
    assert trace.info.tags["tuneline.http_status"] == "502"


def test_feedback_round_trip_into_mlflow(gateways, upstreams) -> None:
    gw: Gateway = gateways(trace_export="thread")
    gw.registry.register(upstreams(), "ft:x:v1", "champion")
    raw = gw.ask(user="dora", text="I was charged twice")
    trace_id = raw.headers["x-tuneline-trace-id"]
    feedback = httpx.post(
        f"{gw.base_url}/feedback",
        json={
            "trace_id": trace_id,
            "value": False,
            "comment": "wrong category",
            "correction": "Category: billing\nReply: We have refunded the duplicate charge.",
            "user": "dora",
        },
    )
    assert feedback.status_code == 202, feedback.text
    assert feedback.json()["status"] == "accepted"
    # Acknowledged = on disk; it reaches MLflow once the trace is there (the spool retries meanwhile).
    assert gw.app_state.tracer.flush(30)
    assert gw.app_state.feedback.wait_delivered(60)
    trace = mlflow.get_trace(trace_id)
    by_name = {a.name: a for a in trace.info.assessments}
    verdict = by_name["user_feedback"]
    assert verdict.value is False
    assert verdict.rationale == "wrong category"
    assert verdict.source.source_type == "HUMAN" and verdict.source.source_id == "dora"
    correction = by_name["correction"]
    assert correction.value == "Category: billing\nReply: We have refunded the duplicate charge."
    assert correction.source.source_id == "dora"
    assert verdict.metadata["tuneline.feedback_id"] == feedback.json()["id"]
    assert gw.app_state.stats()["feedback"]["delivered"] == 1

    for body, param in (
        ({"trace_id": "nope", "value": True}, "trace_id"),
        ({"trace_id": trace_id}, "value"),
        ({"trace_id": trace_id, "value": {"a": 1}}, "value"),
        ({"trace_id": trace_id, "value": 1, "comment": 3}, "comment"),
        ({"trace_id": trace_id, "value": 1, "rating": 3}, "rating"),
    ):
        refused = httpx.post(f"{gw.base_url}/feedback", json=body)
        assert refused.status_code == 400
        assert refused.json()["error"]["param"] == param


def test_acknowledged_feedback_survives_a_down_backend_and_a_restart(
    gateways, upstreams, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    gw: Gateway = gateways(trace_export="thread")
    gw.registry.register(upstreams(), "ft:x:v1", "champion")
    trace_id = gw.ask(user="erin").headers["x-tuneline-trace-id"]
    assert gw.app_state.tracer.flush(30)

    spool = tmp_path / "spool"
    down = FeedbackSpool(spool, f"http://127.0.0.1:{free_port()}", retry_initial_s=0.05)
    down.start()
    feedback_id = down.accept(trace_id, 5, "erin", comment="great", correction=None)
    wait_for(lambda: down.stats.retries >= 2)
    down.stop()  # the process ends with the feedback undelivered
    (kept,) = spool.glob("fb-*.json")
    entry = json.loads(kept.read_text())
    assert entry["id"] == feedback_id and entry["attempts"] >= 2 and entry["last_error"]

    # A restart on the same spool delivers it; two processes on one spool (workers) deliver it once.
    up, also_up = (FeedbackSpool(spool, gw.config.tracking.tracking_uri) for _ in range(2))
    up.start()
    also_up.start()
    try:
        assert up.wait_delivered(60)
    finally:
        up.stop()
        also_up.stop()
    assert up.stats.delivered + also_up.stats.delivered == 1
    (verdict,) = [a for a in mlflow.get_trace(trace_id).info.assessments if a.name == "user_feedback"]
    assert verdict.value == 5 and verdict.rationale == "great" and verdict.source.source_id == "erin"
    assert not list(spool.glob("fb-*.json"))


def test_a_down_tracking_backend_never_fails_or_slows_an_answer(
    gateways, upstreams, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    gw: Gateway = gateways(trace_uri=f"http://127.0.0.1:{free_port()}", trace_queue_size=2)
    gw.registry.register(upstreams(), "ft:x:v1", "champion")
    client = gw.client()
    latencies = []
    for i in range(30):
        started = time.perf_counter()
        raw = client.chat.completions.with_raw_response.create(
            model=gw.name, messages=[{"role": "user", "content": f"question {i}"}], user=f"u{i}"
        )
        latencies.append(time.perf_counter() - started)
        assert raw.http_response.status_code == 200
        assert raw.parse().choices[0].message.content == f"echo: question {i}"
        assert raw.headers["x-tuneline-trace-id"].startswith("tr-")
    assert max(latencies) < 2.0  # an export attempt at the dead backend would take longer
    if hasattr(os, "SCHED_IDLE"):  # Linux: the exporter yields the CPU to the gateway at once
        assert os.sched_getscheduler(gw.app_state.tracer.pid) == os.SCHED_IDLE
    assert gw.app_state.tracer.flush(30)
    stats = httpx.get(f"{gw.server.url}/gateway/stats").json()["traces"]
    assert stats["exported"] == 0
    assert stats["dropped"] == 30 == stats["failed_export"] + stats["dropped_queue_full"]
