"""Upstream failures: fallback to `previous`, else a 502 in OpenAI's error shape."""

from __future__ import annotations

import openai
import pytest
from gateway_harness import Gateway, free_port


def test_a_failing_champion_is_answered_by_previous(gateways, upstreams) -> None:
    gw: Gateway = gateways(upstream_retries=1, tracing=False)
    old, new = upstreams(answer="previous answers"), upstreams(answer="champion answers")
    v1 = gw.registry.register(old, "ft:x:v1", "previous")
    v2 = gw.registry.register(new, "ft:x:v2", "champion")
    new.state.fail_status = 503
    raw = gw.ask()
    assert raw.parse().choices[0].message.content == "previous answers"
    assert raw.headers["x-tuneline-variant"] == "previous"
    assert raw.headers["x-tuneline-model-version"] == v1
    assert raw.headers["x-tuneline-fallback-from"] == f"champion:{v2}"
    assert new.state.requests == 2  # the first try and one retry, then the fallback
    assert gw.app_state.fallbacks == 1
    # Streamed answers fall back too (before their first byte).
    stream = gw.client().chat.completions.with_raw_response.create(
        model=gw.name, messages=[{"role": "user", "content": "hi"}], stream=True
    )
    assert stream.headers["x-tuneline-variant"] == "previous"
    assert (
        "".join(c.choices[0].delta.content or "" for c in stream.parse() if c.choices) == "previous answers"
    )


def test_a_champion_nobody_listens_for_falls_back(gateways, upstreams) -> None:
    gw: Gateway = gateways(upstream_retries=0, tracing=False)
    v1 = gw.registry.register(upstreams(answer="previous answers"), "ft:x:v1", "previous")
    gw.registry.register(f"http://127.0.0.1:{free_port()}/v1", "ft:x:v2", "champion")
    raw = gw.ask()
    assert raw.headers["x-tuneline-model-version"] == v1
    assert raw.parse().choices[0].message.content == "previous answers"


def test_without_previous_the_client_gets_a_502(gateways, upstreams) -> None:
    gw: Gateway = gateways(upstream_retries=0, tracing=False)
    down = upstreams()
    down.state.fail_status = 500
    v1 = gw.registry.register(down, "ft:x:v1", "champion")
    with pytest.raises(openai.InternalServerError) as caught:
        gw.ask()
    error = caught.value
    assert error.status_code == 502
    assert error.code == "upstream_failed"
    assert set(error.body) == {"message", "type", "param", "code"}  # type: ignore[arg-type]
    assert "no `previous` version" in error.message
    assert error.response.headers["x-tuneline-model-version"] == v1


def test_a_pinned_version_never_falls_back_and_client_errors_pass_through(gateways, upstreams) -> None:
    gw: Gateway = gateways(upstream_retries=0, tracing=False)
    gw.registry.register(upstreams(answer="previous"), "ft:x:v1", "previous")
    down = upstreams()
    v2 = gw.registry.register(down, "ft:x:v2", "champion")
    down.state.fail_status = 503
    with pytest.raises(openai.InternalServerError) as caught:
        gw.ask(f"{gw.name}@{v2}")
    assert caught.value.status_code == 502 and "pinned" in caught.value.message
    # A refusal of the request itself (4xx) is the client's to fix: passed through, no fallback.
    down.state.fail_status = 400
    with pytest.raises(openai.BadRequestError):
        gw.ask()
    assert gw.app_state.fallbacks == 0
