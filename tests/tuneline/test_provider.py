"""tuneline/provider.py against a real HTTP server on loopback that answers as a provider would when it
refuses: 401, 403, daily caps, transient 5xx. The happy path against `tuneline serve` is covered by the
upload, train and retrain tests."""

from __future__ import annotations

import logging
import socket
import time
from typing import Any

import openai
import pytest

from tuneline.config import parse_config
from tuneline.provider import ProviderError, check_reachable, connect, key_env_name, key_problem, retrying

SECRET = "sk-test-never-log-this-0123456789"


def error(code: str | None, message: str, kind: str = "invalid_request_error") -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


@pytest.fixture
def scripted(scripted_provider: Any) -> Any:
    return scripted_provider


def config_for(kind: str, base_url: str | None = None, **provider: Any) -> Any:
    return parse_config(
        {
            "data": {"sources": [{"name": "s", "uri": "data/none.jsonl"}]},
            "provider": {"kind": kind, "base_url": base_url, "max_retries": 2, "timeout_s": 5, **provider},
        }
    )


CREATE_JOB = {"model": "gpt-4.1-mini", "training_file": "file-abc"}


def test_key_env_defaults_per_kind_and_explicit_name_wins() -> None:
    assert key_env_name(config_for("openai").provider) == "OPENAI_API_KEY"
    assert key_env_name(config_for("azure", azure_endpoint="https://x").provider) == "AZURE_OPENAI_API_KEY"
    assert key_env_name(config_for("compatible", "http://h/v1").provider) == "TUNELINE_API_KEY"
    assert key_env_name(config_for("openai", api_key_env="MY_KEY").provider) == "MY_KEY"


def test_missing_key_names_the_variable_and_secret_block(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    missing = r"set OPENAI_API_KEY or create the Prefect Secret block 'openai-key'"
    with (
        pytest.raises(ProviderError, match=missing),
        connect(config_for("openai", api_key_secret_block="openai-key")),
    ):
        pass


def test_compatible_needs_a_base_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNELINE_API_KEY", SECRET)
    with pytest.raises(ProviderError, match=r"needs provider.base_url"), connect(config_for("compatible")):
        pass


def test_azure_with_api_version_and_with_the_v1_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AZURE_OPENAI_API_KEY", SECRET)
    endpoint = "https://acme.openai.azure.com"
    with connect(
        config_for("azure", azure_endpoint=endpoint, azure_api_version="2025-04-01-preview")
    ) as versioned:
        assert isinstance(versioned.client, openai.AzureOpenAI)
        assert versioned.base_url.startswith(f"{endpoint}/openai")
        assert versioned.name == "azure-acme.openai.azure.com"
    with connect(config_for("azure", azure_endpoint=endpoint)) as v1:
        assert not isinstance(v1.client, openai.AzureOpenAI)
        assert v1.base_url == f"{endpoint}/openai/v1"


def test_openai_kind_passes_organization_and_project(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    with connect(config_for("openai", organization="org-1", project="proj-1")) as provider:
        assert provider.base_url == "https://api.openai.com/v1"
        assert provider.client.organization == "org-1"
        assert provider.client.project == "proj-1"
        assert provider.client.max_retries == 2
        assert provider.client.timeout == 5


def test_transient_answers_are_retried_and_logged_without_the_key(
    scripted: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("TUNELINE_API_KEY", SECRET)
    scripted.answer(
        "GET",
        "/v1/models",
        (503, error(None, "overloaded", "server_error"), {"retry-after-ms": "10"}),
        (500, error(None, "boom", "server_error"), {"retry-after-ms": "10"}),
    )
    caplog.set_level(logging.DEBUG)
    with connect(config_for("compatible", scripted.base_url)) as provider:
        assert list(provider.client.models.list()) == []
    assert scripted.count("GET", "/v1/models") == 3
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("503" in w and "GET /v1/models" in w for w in warnings)
    assert any("500" in w for w in warnings)
    assert scripted.seen[0][2]["authorization"] == f"Bearer {SECRET}"
    assert SECRET not in caplog.text


def test_daily_job_cap_fails_at_once_without_retrying(scripted: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    cap = error("daily_rate_limit_exceeded", "Daily limit of 3 jobs for gpt-4.1-mini reached", "requests")
    scripted.answer("POST", "/v1/fine_tuning/jobs", (429, cap, {"retry-after": "1"}))
    scripted.answer("GET", "/v1/models", (429, cap, {"retry-after": "1"}))
    with connect(config_for("openai", scripted.base_url)) as provider:
        with pytest.raises(
            ProviderError, match=r"daily fine-tuning job limit.*stops instead of retrying"
        ) as caught:
            retrying(
                provider,
                "create fine-tuning job on gpt-4.1-mini",
                lambda: provider.client.fine_tuning.jobs.create(**CREATE_JOB),
            )
        assert caught.value.code == "daily_rate_limit_exceeded"
        # The SDK's own retries are switched off for it too, on any request.
        with pytest.raises(openai.RateLimitError):
            provider.client.models.list()
    assert scripted.count("POST", "/v1/fine_tuning/jobs") == 1
    assert scripted.count("GET", "/v1/models") == 1


def test_403_on_job_creation_at_openai_explains_the_wind_down(
    scripted: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    refused = error(None, "You do not have access to fine-tuning.", "invalid_request_error")
    scripted.answer("POST", "/v1/fine_tuning/jobs", (403, refused, {}))
    with connect(config_for("openai", scripted.base_url)) as provider, pytest.raises(ProviderError) as caught:
        retrying(
            provider,
            "create fine-tuning job on gpt-4.1-mini",
            lambda: provider.client.fine_tuning.jobs.create(**CREATE_JOB),
        )
    message = str(caught.value)
    assert "403" in message and "You do not have access to fine-tuning." in message
    assert "2027-01-06" in message and "provider.kind: local" in message
    assert caught.value.status == 403


def test_401_says_which_variable_to_set(scripted: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    scripted.answer("GET", "/v1/files", (401, error("invalid_api_key", "Incorrect API key provided"), {}))
    refused = r"401 invalid_api_key.*set OPENAI_API_KEY to a valid key"
    with (
        connect(config_for("openai", scripted.base_url)) as provider,
        pytest.raises(ProviderError, match=refused),
    ):
        retrying(provider, "list files", lambda: list(provider.client.files.list()))
    assert SECRET not in str(scripted.seen[-1][1])


def test_a_post_that_landed_is_not_sent_again(scripted: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNELINE_API_KEY", SECRET)
    scripted.answer(
        "POST",
        "/v1/fine_tuning/jobs",
        (502, error(None, "bad gateway", "server_error"), {"retry-after-ms": "5"}),
    )
    found: list[str] = []
    with connect(config_for("compatible", scripted.base_url)) as provider:
        result = retrying(
            provider,
            "create fine-tuning job",
            lambda: provider.without_retries().fine_tuning.jobs.create(**CREATE_JOB),
            landed=lambda: found.append("looked") or "ftjob-landed",
        )
    assert result == "ftjob-landed"
    assert found == ["looked"]
    assert scripted.count("POST", "/v1/fine_tuning/jobs") == 1


def test_retries_are_bounded(scripted: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNELINE_API_KEY", SECRET)
    down = (503, error(None, "down", "server_error"), {"retry-after-ms": "5"})
    scripted.answer("POST", "/v1/fine_tuning/jobs", *[down] * 10)
    bounded = r"still failing after 2 retries \(503: down\)"
    with (
        connect(config_for("compatible", scripted.base_url)) as provider,
        pytest.raises(ProviderError, match=bounded),
    ):
        retrying(
            provider,
            "create fine-tuning job",
            lambda: provider.without_retries().fine_tuning.jobs.create(**CREATE_JOB),
        )
    assert scripted.count("POST", "/v1/fine_tuning/jobs") == 3


def test_shipped_hosted_configs_connect(monkeypatch: pytest.MonkeyPatch) -> None:
    from tuneline.config import load_config
    from tuneline.paths import project_root

    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    monkeypatch.setenv("AZURE_OPENAI_API_KEY", SECRET)
    with connect(load_config(project_root() / "configs" / "openai.yaml")) as hosted:
        assert (hosted.kind, hosted.base_url, hosted.key_env) == (
            "openai",
            "https://api.openai.com/v1",
            "OPENAI_API_KEY",
        )
    with connect(load_config(project_root() / "configs" / "azure.yaml")) as azure:
        assert isinstance(azure.client, openai.AzureOpenAI)
        assert azure.key_env == "AZURE_OPENAI_API_KEY"


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_a_refused_connection_names_the_configured_endpoint_and_fails_fast(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    endpoint = f"http://127.0.0.1:{closed_port()}/v1"
    with connect(config_for("openai", endpoint)) as provider:  # max_retries 2
        started = time.monotonic()
        with pytest.raises(ProviderError) as failed:
            retrying(provider, "list files", lambda: provider.client.files.list())
        elapsed = time.monotonic() - started
    message = str(failed.value)
    assert endpoint in message and "connection refused" in message and "provider.base_url" in message
    assert "api.openai.com" not in message
    # The SDK's own retries and one more try, not the whole retry budget again and again.
    assert elapsed < 10, f"{elapsed:.1f}s"


def test_the_key_and_the_endpoint_are_checked_before_any_work(
    scripted: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    problem = key_problem(config_for("openai").provider)
    assert problem is not None and "set the environment variable OPENAI_API_KEY" in problem
    assert key_problem(config_for("openai", api_key_secret_block="openai-key").provider) is None
    assert key_problem(config_for("local").provider) is None  # the run starts its own server with its own key
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    assert key_problem(config_for("openai").provider) is None

    check_reachable(config_for("compatible", scripted.base_url).provider)  # any HTTP answer will do
    assert scripted.seen and all("authorization" not in headers for _, _, headers in scripted.seen)
    endpoint = f"http://127.0.0.1:{closed_port()}/v1"
    started = time.monotonic()
    with pytest.raises(ProviderError, match=rf"could not connect to {endpoint} \(connection refused"):
        check_reachable(config_for("compatible", endpoint).provider)
    assert time.monotonic() - started < 5
    with pytest.raises(ProviderError, match=r"check provider\.azure_endpoint"):
        check_reachable(config_for("azure", azure_endpoint=f"http://127.0.0.1:{closed_port()}").provider)
