"""Alias resolution and pinning through the gateway, over real HTTP, against a real MLflow registry."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import httpx
import mlflow
import openai
import pytest
from gateway_harness import Gateway, Registry, free_port, make_config

from tuneline import tracking
from tuneline.gateway.routing import Resolver, RoutingError, parse_model, upstream_of


def answer_of(raw: object) -> str:
    return raw.parse().choices[0].message.content  # type: ignore[attr-defined]


def test_the_champion_serves_and_pins_choose_a_version(gateways, upstreams) -> None:
    one, two = upstreams(answer="from version one"), upstreams(answer="from version two")
    gw: Gateway = gateways(trace_export="thread")
    v1 = gw.registry.register(one, "ft:tuneline-tiny:tuneline:support:v1", "champion")
    v2 = gw.registry.register(two, "ft:tuneline-tiny:tuneline:support:v2", "challenger")

    raw = gw.ask()
    assert answer_of(raw) == "from version one"
    assert raw.headers["x-tuneline-variant"] == "champion"
    assert raw.headers["x-tuneline-model-version"] == v1
    assert raw.headers["x-tuneline-trace-id"].startswith("tr-")
    # The upstream was asked for the provider's model id, not the registered name.
    assert one.state.models_seen == ["ft:tuneline-tiny:tuneline:support:v1"]

    raw = gw.ask(f"{gw.name}@challenger")
    assert answer_of(raw) == "from version two"
    assert (raw.headers["x-tuneline-variant"], raw.headers["x-tuneline-model-version"]) == ("challenger", v2)

    raw = gw.ask(f"{gw.name}@{v1}")
    assert answer_of(raw) == "from version one"
    assert (raw.headers["x-tuneline-variant"], raw.headers["x-tuneline-model-version"]) == ("pinned", v1)

    models = {m.id for m in gw.client().models.list()}
    assert models == {gw.name, f"{gw.name}@champion", f"{gw.name}@challenger"}


@pytest.mark.parametrize(
    ("suffix", "code"),
    [("@99", "model_not_found"), ("@nosuchalias", "model_not_found")],
)
def test_a_pin_to_nothing_is_a_404(gateways, upstreams, suffix: str, code: str) -> None:
    gw: Gateway = gateways(tracing=False)
    gw.registry.register(upstreams(), "ft:x:v1", "champion")
    with pytest.raises(openai.NotFoundError) as caught:
        gw.ask(f"{gw.name}{suffix}")
    assert caught.value.code == code
    assert caught.value.body["param"] == "model"  # type: ignore[index]


def test_unknown_models_and_a_missing_champion(gateways, upstreams) -> None:
    gw: Gateway = gateways(tracing=False)
    with pytest.raises(openai.NotFoundError) as caught:
        gw.ask("some-other-model")
    assert caught.value.code == "model_not_found"
    # Served, but not registered yet.
    with pytest.raises(openai.NotFoundError):
        gw.ask()
    gw.registry.register(upstreams(), "ft:x:v1")  # a version, no alias
    time.sleep(0.6)  # past the TTL of the 404 above (not cached anyway)
    with pytest.raises(openai.InternalServerError) as unavailable:
        gw.ask()
    assert unavailable.value.status_code == 503
    assert unavailable.value.code == "no_champion"


def test_a_moved_alias_is_served_within_the_ttl(gateways, upstreams) -> None:
    ttl = 1.0
    gw: Gateway = gateways(alias_ttl_s=ttl, tracing=False)
    v1 = gw.registry.register(upstreams(answer="one"), "ft:x:v1", "champion")
    v2 = gw.registry.register(upstreams(answer="two"), "ft:x:v2")
    assert gw.ask().headers["x-tuneline-model-version"] == v1
    gw.registry.move("champion", v2)
    moved_at = time.monotonic()
    time.sleep(ttl + 0.05)
    raw = gw.ask()
    # No restart, no polling: the first request after the TTL gets the new champion.
    assert raw.headers["x-tuneline-model-version"] == v2
    assert answer_of(raw) == "two"
    assert time.monotonic() - moved_at < ttl + 5


def test_aliases_are_refreshed_ahead_so_steady_traffic_never_waits_for_the_registry(
    store: Path, tmp_path: Path
) -> None:
    config = make_config(store, tmp_path, f"support-{uuid.uuid4().hex[:8]}")
    registry = Registry(config.tracking)
    v1 = registry.register("http://127.0.0.1:9/v1", "ft:x:v1", "champion")
    v2 = registry.register("http://127.0.0.1:9/v1", "ft:x:v2")
    now = [0.0]
    resolver = Resolver(
        tracking.tracking_uri(config.tracking), ttl_s=10.0, local_base_url="", clock=lambda: now[0]
    )
    name = config.tracking.registered_model

    async def scenario() -> None:
        assert (await resolver.aliases(name))["champion"] == v1
        registry.move("champion", v2)
        now[0] = 4.0  # within the first half of the TTL: the entry, no re-read
        assert (await resolver.aliases(name))["champion"] == v1
        await asyncio.sleep(0.5)
        assert (await resolver.aliases(name))["champion"] == v1
        now[0] = 6.0  # past half the TTL: answered from the entry at once, re-read in the background
        assert (await resolver.aliases(name))["champion"] == v1
        deadline = time.monotonic() + 10
        while (await resolver.aliases(name))["champion"] != v2:  # the clock stands still: no wait
            assert time.monotonic() < deadline, "the refresh ahead never landed"
            await asyncio.sleep(0.02)
        registry.move("champion", v1)
        now[0] = 20.0  # past the TTL of that read (no traffic meanwhile): this request waits for it
        assert (await resolver.aliases(name))["champion"] == v1

    asyncio.run(scenario())


def test_a_registry_that_cannot_be_read_serves_the_aliases_read_before(
    store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    config = make_config(store, tmp_path, f"support-{uuid.uuid4().hex[:8]}")
    v1 = Registry(config.tracking).register("http://127.0.0.1:9/v1", "ft:x:v1", "champion")
    now = [0.0]
    resolver = Resolver(
        tracking.tracking_uri(config.tracking), ttl_s=10.0, local_base_url="", clock=lambda: now[0]
    )
    name = config.tracking.registered_model
    dead = f"http://127.0.0.1:{free_port()}"
    never_read = Resolver(dead, ttl_s=10.0, local_base_url="")

    async def scenario() -> None:
        assert (await resolver.aliases(name))["champion"] == v1
        resolver.client = mlflow.MlflowClient(tracking_uri=dead, registry_uri=dead)  # the registry goes down
        now[0] = 30.0
        assert (await resolver.aliases(name))["champion"] == v1
        with pytest.raises(RoutingError) as unavailable:
            await never_read.aliases(name)
        assert (unavailable.value.status, unavailable.value.code) == (503, "registry_unavailable")

    with caplog.at_level("WARNING", logger="tuneline.gateway"):
        asyncio.run(scenario())
    assert any("serving the aliases read before" in r.getMessage() for r in caplog.records)


def test_bad_requests_get_openai_shaped_4xx(gateways, upstreams) -> None:
    gw: Gateway = gateways(tracing=False)
    gw.registry.register(upstreams(), "ft:x:v1", "champion")
    url = f"{gw.base_url}/chat/completions"
    for body, param in (
        (b"{not json", None),
        (b"[1, 2]", None),
        (b'{"messages": [{"role": "user", "content": "hi"}]}', "model"),
        (f'{{"model": "{gw.name}", "messages": []}}'.encode(), "messages"),
        (
            f'{{"model": "{gw.name}", "messages": [{{"role": "user", "content": "x"}}], "user": 5}}'.encode(),
            "user",
        ),
    ):
        response = httpx.post(url, content=body, headers={"content-type": "application/json"})
        assert response.status_code == 400, body
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["param"] == param
    too_big = httpx.post(url, content=b"x" * (9 * 1024 * 1024), headers={"content-type": "application/json"})
    assert too_big.status_code == 413
    # Without a declared length (chunked), it is cut off as it streams in.
    chunked = httpx.post(
        url, content=iter([b"x" * (1 << 20)] * 9), headers={"content-type": "application/json"}
    )
    assert chunked.status_code == 413
    assert chunked.json()["error"]["code"] == "request_too_large"
    browser = httpx.post(url, json={"model": gw.name}, headers={"origin": "https://evil.example"})
    assert browser.status_code == 403


def test_model_names_and_recorded_providers() -> None:
    assert parse_model("support-assistant").selector is None
    assert parse_model("support-assistant@3").pinned_version == "3"
    assert parse_model("support-assistant@challenger").selector == "challenger"
    with pytest.raises(RoutingError):
        parse_model("a@b@c")
    local = "http://127.0.0.1:8000/v1"
    assert upstream_of({"tuneline.provider_kind": "local"}, local).base_url == local  # type: ignore[union-attr]
    assert upstream_of({"tuneline.provider": "local"}, local).kind == "local"  # type: ignore[union-attr]
    assert upstream_of({"tuneline.provider": "openai-api.openai.com"}, local).base_url == (  # type: ignore[union-attr]
        "https://api.openai.com/v1"
    )
    assert upstream_of({"tuneline.provider": "compatible-host"}, local) is None
    azure = upstream_of(
        {
            "tuneline.provider_kind": "azure",
            "tuneline.base_url": "https://r.openai.azure.com/",
            "tuneline.azure_api_version": "2025-04-01",
        },
        local,
    )
    assert azure is not None and azure.base_url == "https://r.openai.azure.com" and azure.azure_api_version
