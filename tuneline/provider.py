"""The only module that builds an `openai` client: which provider, which key, which limits.

`connect(config)` yields a `Provider`: an `openai.OpenAI` (or `AzureOpenAI`) client pointed at
tuneline's own server (`local`: started here on a free loopback port, or `base_url` when set), at
api.openai.com (`openai`), at Azure OpenAI (`azure`) or at any OpenAI-compatible `base_url`
(`compatible`). Guarantees:
- the API key comes from the environment or a caller-resolved secret, and is never logged;
- every request has the configured timeout, and the SDK retries transient failures (429, 5xx,
  connection errors) `provider.max_retries` times, honouring `retry-after`; each such answer is logged,
  so retries are visible in the run's log;
- a 429 with code `daily_rate_limit_exceeded` is never retried: waiting seconds cannot lift a daily cap;
- provider errors become `ProviderError`s whose message says what happened, at which configured
  endpoint, and what to do (`explain`), e.g. a 403 on job creation at OpenAI explains the self-serve
  fine-tuning wind-down;
- a missing key (`key_problem`) and an endpoint that refuses connections (`check_reachable`: a few
  attempts within seconds) are found before any work, by the CLI; a connection refused mid-run is
  retried once, briefly, and never checked for a landed POST (the request was never sent).
The HTTP layer is httpx2, the client library of the `openai` SDK 3.x (declared in pyproject.toml).
POSTs that create things (files, jobs) are not retried by the SDK: `retrying` retries them after
checking whether the failed attempt landed anyway, so a lost response never pays twice.
"""

from __future__ import annotations

import json
import logging
import os
import random
import secrets
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import httpx2
import openai

from tuneline.config import Config, ProviderConfig
from tuneline.paths import resolve

T = TypeVar("T")
Logger = logging.Logger | logging.LoggerAdapter

DEFAULT_LOGGER = logging.getLogger("tuneline.provider")

# Per kind, the environment variable that holds the key when `provider.api_key_env` is not set.
DEFAULT_KEY_ENV = {
    "local": "TUNELINE_API_KEY",
    "compatible": "TUNELINE_API_KEY",
    "openai": "OPENAI_API_KEY",
    "azure": "AZURE_OPENAI_API_KEY",
}
OPENAI_BASE_URL = "https://api.openai.com/v1"
DAILY_LIMIT_CODE = "daily_rate_limit_exceeded"
# Statuses the SDK retries (it also retries connection errors and timeouts).
RETRYABLE_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504})
WIND_DOWN = (
    "OpenAI is winding down self-serve fine-tuning: closed to new organisations since 2026-05-07, to "
    "inactive ones since 2026-07-02, and no new jobs for anyone after 2027-01-06. Switch provider: set "
    "`provider.kind: local` in your config (tuneline trains on its own server; see configs/local.yaml) "
    "or `provider.kind: azure` (configs/azure.yaml)"
)


class ProviderError(RuntimeError):
    """A provider refused or failed a request. The message names the request, the provider's answer
    (status, code, message) and the fix; `code` is the provider's error code when it sent one."""

    def __init__(self, message: str, *, code: str | None = None, status: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.status = status


class LogRoute:
    """Where provider messages go: the module logger until a flow points it at its run logger."""

    def __init__(self, logger: Logger | None = None) -> None:
        self.logger: Logger = logger or DEFAULT_LOGGER


@dataclass
class Provider:
    """A connected provider: the client, what it is, and the retry budget for our own retries."""

    kind: str
    base_url: str
    client: openai.OpenAI
    key_env: str | None
    max_retries: int
    route: LogRoute = field(default_factory=LogRoute)

    @property
    def log(self) -> Logger:
        return self.route.logger

    def log_to(self, logger: Logger) -> None:
        """Send this provider's messages (retries included) to `logger`, e.g. a Prefect run logger."""
        self.route.logger = logger

    @property
    def name(self) -> str:
        """A stable, key-free name for this provider (concurrency limits, MLflow params)."""
        host = urlsplit(self.base_url).hostname or "unknown"
        return "local" if self.kind == "local" else f"{self.kind}-{host}"

    def without_retries(self) -> openai.OpenAI:
        """The client with SDK retries off: for POSTs that create something (see `retrying`)."""
        return self.client.with_options(max_retries=0)


def key_env_name(provider: ProviderConfig) -> str:
    """The environment variable that holds the key: `api_key_env` when set in the config file, else the
    kind's usual one (OPENAI_API_KEY for openai, AZURE_OPENAI_API_KEY for azure, TUNELINE_API_KEY)."""
    if "api_key_env" in provider.model_fields_set:
        return provider.api_key_env
    return DEFAULT_KEY_ENV[provider.kind]


def _read_key(provider: ProviderConfig, api_key: str | None) -> str:
    key = api_key if api_key is not None else os.environ.get(key_env_name(provider))
    if key is None or not key.strip():
        where = f"set {key_env_name(provider)}"
        if provider.api_key_secret_block:
            where += f" or create the Prefect Secret block {provider.api_key_secret_block!r}"
        raise ProviderError(f"no API key for provider {provider.kind!r}: {where}")
    return key.strip()


def key_problem(provider: ProviderConfig) -> str | None:
    """Why a run could not authenticate, found before any work; None when a key is there (or the run
    makes its own: the embedded server; or reads one from a Prefect Secret block, inside the flow)."""
    if provider.kind == "local" and not provider.base_url:
        return None
    if provider.api_key_secret_block:
        return None
    name = key_env_name(provider)
    if (os.environ.get(name) or "").strip():
        return None
    return (
        f"no API key for provider.kind {provider.kind}: set the environment variable {name} "
        "(or name another one with provider.api_key_env, or a Prefect Secret block with "
        "provider.api_key_secret_block)"
    )


def endpoint(provider: ProviderConfig) -> str:
    """The URL the configured provider is reached at (before the SDK adds its paths)."""
    if provider.kind == "azure":
        return (provider.azure_endpoint or provider.base_url or "").rstrip("/")
    if provider.kind == "openai":
        return (provider.base_url or OPENAI_BASE_URL).rstrip("/")
    return (provider.base_url or "").rstrip("/")


def refused(exc: BaseException) -> bool:
    """True when `exc` (or what caused it) is a refused connection: nothing listens at the address."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, ConnectionRefusedError):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


def check_reachable(provider: ProviderConfig, *, attempts: int = 3, timeout_s: float = 5.0) -> None:
    """Raise ProviderError unless the configured endpoint answers HTTP (any status will do: the request
    carries no key). A few attempts half a second apart, so a server that is restarting is waited for,
    a wrong address is reported within seconds. Goes through the SDK's own HTTP client (proxy settings
    included)."""
    url = endpoint(provider)
    if not url:
        return
    problem = ""
    with openai.DefaultHttpxClient(timeout=min(timeout_s, provider.timeout_s)) as http:
        for attempt in range(attempts):
            try:
                http.get(url)
                return
            except httpx2.TransportError as exc:
                problem = "connection refused" if refused(exc) else str(exc) or type(exc).__name__
                if isinstance(exc, httpx2.TimeoutException):
                    break
            if attempt + 1 < attempts:
                time.sleep(0.5)
    key = "provider.azure_endpoint" if provider.kind == "azure" else "provider.base_url"
    raise ProviderError(
        f"could not connect to {url} ({problem}; {attempts} attempts): check {key} and that the "
        "server is running and reachable"
    )


def _status_hook(route: LogRoute) -> Callable[[httpx2.Response], None]:
    """Logs every transient answer (so SDK retries show in the run's log) and stops the SDK from retrying
    a daily job cap, which seconds of backoff cannot lift."""

    def on_response(response: httpx2.Response) -> None:
        status = response.status_code
        if status < 400:
            return
        response.read()
        code = _error_code(response)
        if status == 429 and code == DAILY_LIMIT_CODE:
            response.headers["x-should-retry"] = "false"
            return
        if status in RETRYABLE_STATUSES:
            wait = response.headers.get("retry-after-ms")
            wait_text = f"{float(wait) / 1000:g}s" if wait else response.headers.get("retry-after", "")
            route.logger.warning(
                "provider answered %s to %s %s%s%s; retrying with backoff",
                status,
                response.request.method,
                response.request.url.path,
                f" (code {code})" if code else "",
                f" (retry-after {wait_text})" if wait_text else "",
            )

    return on_response


def _error_code(response: httpx2.Response) -> str | None:
    try:
        body = json.loads(response.content or b"null")
    except (ValueError, UnicodeDecodeError):
        return None
    error = body.get("error") if isinstance(body, dict) else None
    code = error.get("code") if isinstance(error, dict) else None
    return str(code) if code is not None else None


def build_client(
    provider: ProviderConfig, *, base_url: str | None, api_key: str, route: LogRoute
) -> openai.OpenAI:
    """An SDK client for one provider kind with the configured timeout, retries and status logging."""
    http_client = openai.DefaultHttpxClient(event_hooks={"response": [_status_hook(route)]})
    common: dict[str, Any] = {
        "api_key": api_key,
        "timeout": provider.timeout_s,
        "max_retries": provider.max_retries,
        "http_client": http_client,
    }
    if provider.kind == "azure":
        endpoint = provider.azure_endpoint or base_url
        if not endpoint:
            raise ProviderError(
                "provider.kind azure needs provider.azure_endpoint (https://<resource>.openai.azure.com)"
            )
        if provider.azure_api_version:
            return openai.AzureOpenAI(
                azure_endpoint=endpoint, api_version=provider.azure_api_version, **common
            )
        # Without an API version: Azure's version-less v1 path, which the plain client speaks.
        return openai.OpenAI(base_url=f"{endpoint.rstrip('/')}/openai/v1", **common)
    if provider.kind == "openai":
        return openai.OpenAI(
            base_url=base_url or OPENAI_BASE_URL,
            organization=provider.organization,
            project=provider.project,
            **common,
        )
    if not base_url:
        raise ProviderError(f"provider.kind {provider.kind} needs provider.base_url (ending in /v1)")
    return openai.OpenAI(base_url=base_url, **common)


@contextmanager
def connect(
    config: Config, *, config_path: Path | None = None, api_key: str | None = None, log: Logger | None = None
) -> Iterator[Provider]:
    """A connected provider for the run. `provider.kind: local` without `base_url` starts `tuneline serve`
    (with the `server:` section of the config file at `config_path`) on a free loopback port with a fresh
    per-process key, and stops it on exit. `api_key` (e.g. from a Prefect Secret block) takes precedence
    over the environment variable."""
    settings = config.provider
    route = LogRoute(log)

    def made(base_url: str, key: str, key_env: str | None) -> Provider:
        client = build_client(settings, base_url=base_url, api_key=key, route=route)
        return Provider(
            settings.kind, str(client.base_url).rstrip("/"), client, key_env, settings.max_retries, route
        )

    if settings.kind == "local" and not settings.base_url:
        # Imported here: the server's heavy dependencies are an optional extra.
        from tuneline.server.launcher import start_server

        key = secrets.token_urlsafe(32)
        server_args = (
            ["--config", str(config_path)]
            if config_path
            else ["--concurrent-jobs", str(config.server.concurrent_jobs)]
        )
        with start_server(
            resolve(config.server.state_dir),
            api_key=key,
            model_dirs=tuple(resolve(d) for d in config.server.model_dirs),
            fault_rate=config.server.fault_rate,
            latency_ms=config.server.latency_ms,
            extra_args=tuple(server_args),
        ) as server:
            provider = made(server.base_url, key, None)
            try:
                yield provider
            finally:
                provider.client.close()
        return
    key = _read_key(settings, api_key)
    provider = made(settings.base_url or "", key, key_env_name(settings))
    try:
        yield provider
    finally:
        provider.client.close()


def explain(exc: openai.APIError, *, action: str, provider: Provider) -> ProviderError:
    """A provider error as one message naming the request, the provider's answer and the fix."""
    where = provider.base_url  # the configured endpoint, as the client was built with it
    if isinstance(exc, openai.APIConnectionError):
        if isinstance(exc, openai.APITimeoutError):
            kind, fix = "timed out", "check the network, or raise provider.timeout_s"
        else:
            kind = "could not connect (connection refused)" if refused(exc) else "could not connect"
            fix = "check provider.base_url, that the server is running, and the network"
        return ProviderError(f"{action}: {kind} to {where}, retries spent ({fix})")
    if not isinstance(exc, openai.APIStatusError):
        return ProviderError(f"{action}: {exc}")
    status, code = exc.status_code, exc.code
    answer = f"{status}{' ' + code if code else ''}: {_message(exc)}"
    if status == 401:
        if provider.key_env is None:
            fix = "the embedded server rejected its own per-process key (restart the run)"
        else:
            fix = f"set {provider.key_env} to a valid key for {where}"
        text = f"{action}: {where} rejected the API key ({answer}); {fix}"
    elif status == 403 and provider.kind == "openai" and action.startswith("create fine-tuning job"):
        text = f"{action}: {where} refused ({answer}). {WIND_DOWN}"
    elif status == 403:
        text = f"{action}: {where} refused ({answer}); check the key's permissions for fine-tuning"
    elif status == 429 and code == DAILY_LIMIT_CODE:
        text = (
            f"{action}: {where} reached its daily fine-tuning job limit for this model ({answer}); "
            "the run stops instead of retrying: run again tomorrow or switch provider (provider.kind: local)"
        )
    elif status == 429 or status >= 500:
        text = f"{action}: {where} still failing after {provider.max_retries} retries ({answer}); run again later"
    else:
        text = f"{action}: {where} refused ({answer})"
    return ProviderError(text, code=code, status=status)


def _message(exc: openai.APIStatusError) -> str:
    body = exc.body
    if isinstance(body, dict) and body.get("message"):
        return str(body["message"])
    return exc.message


def is_transient(exc: BaseException) -> bool:
    """True for answers worth retrying: connection errors, timeouts, 408/409/429 (not a daily cap), 5xx."""
    if isinstance(exc, openai.APIConnectionError):
        return True
    if isinstance(exc, openai.APIStatusError):
        if exc.status_code == 429 and exc.code == DAILY_LIMIT_CODE:
            return False
        return exc.status_code in RETRYABLE_STATUSES or exc.status_code >= 500
    return False


def backoff_delay(
    attempt: int, *, initial: float = 0.5, maximum: float = 8.0, retry_after: float | None = None
) -> float:
    """Seconds before retry `attempt` (1-based): the server's retry-after when given (capped), else
    exponential backoff with jitter, as the SDK does."""
    if retry_after is not None and 0 < retry_after <= 120:
        return retry_after
    return min(maximum, initial * 2 ** (attempt - 1)) * (1 - 0.25 * random.random())


def _retry_after(exc: BaseException) -> float | None:
    if not isinstance(exc, openai.APIStatusError):
        return None
    headers = exc.response.headers
    for name, divisor in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        try:
            return float(headers[name]) / divisor
        except (KeyError, ValueError):
            continue
    return None


def retrying(
    provider: Provider,
    action: str,
    attempt: Callable[[], T],
    *,
    landed: Callable[[], T | None] | None = None,
) -> T:
    """Run `attempt` with up to `provider.max_retries` retries on transient failures. Before each retry,
    `landed()` checks whether the failed attempt took effect anyway (a lost response to a POST) and, if
    so, its result is returned instead of repeating the POST. Other errors raise a `ProviderError`."""
    for number in range(1, provider.max_retries + 2):
        try:
            return attempt()
        except openai.APIError as exc:
            # Nothing listens there: one more try after a short pause (a restarting server), not the
            # whole budget, and nothing can have landed.
            not_sent = refused(exc)
            if not is_transient(exc) or number > (
                min(1, provider.max_retries) if not_sent else provider.max_retries
            ):
                raise explain(exc, action=action, provider=provider) from exc
            if not_sent:
                provider.log.warning(
                    "%s: connection refused by %s; one more try in 1s", action, provider.base_url
                )
                time.sleep(1.0)
                continue
            delay = backoff_delay(number, retry_after=_retry_after(exc))
            provider.log.warning(
                "%s failed (%s); retry %d of %d in %.1fs",
                action,
                _short(exc),
                number,
                provider.max_retries,
                delay,
            )
            time.sleep(delay)
            if landed is not None:
                found = landed()
                if found is not None:
                    provider.log.info(
                        "%s: the failed attempt had landed; using it instead of repeating it", action
                    )
                    return found
    raise AssertionError("unreachable: the loop returns or raises")


def _short(exc: openai.APIError) -> str:
    if isinstance(exc, openai.APIStatusError):
        return f"{exc.status_code}{' ' + exc.code if exc.code else ''}"
    return type(exc).__name__
