"""Which model version a request goes to, and on which provider: read from the MLflow model registry.

`model` in a request is a registered model name, optionally with a selector:
- `support-assistant`: the version holding the alias `champion` (or `challenger` for the share of users
  that tuneline/gateway/ab.py assigns to it, while a version holds that alias);
- `support-assistant@challenger` (any alias) or `support-assistant@3` (a version number): pinned.

The registry is read through a cache with a short TTL (`serving.alias_ttl_s`): one
`get_registered_model` call per model gives every alias, re-read in the background once the entry is
past half its TTL (so under steady traffic no request waits for it), and a version's facts (its provider
and the provider's model id, which never change once registered) are read once. So an alias that moves
is served within the TTL, without a restart, and the request path does no MLflow work. When the
registry cannot be reached, the last aliases read keep being served (stale) and the failure is logged;
a model never read before is a 503.

A version's provider comes from the tags promote (tasks/promote.py) writes on it: `tuneline.provider_kind`
(local | openai | azure | compatible), `tuneline.base_url` (empty for a run's embedded server, whose port
was ephemeral: such versions are served by `serving.local_base_url`), `tuneline.azure_api_version`, and
`tuneline.model_id`. Versions registered before the kind was recorded carry only `tuneline.provider`
(`local`, or `<kind>-<host>`), which is read as a fallback.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException

from tuneline.tracking import CHAMPION, MODEL_ID_TAG, PREVIOUS

log = logging.getLogger("tuneline.gateway")

CHALLENGER = "challenger"
PINNED = "pinned"
# The variants a trace is tagged with (tuneline.variant).
VARIANTS = (CHAMPION, CHALLENGER, PREVIOUS, PINNED)

PROVIDER_KIND_TAG = "tuneline.provider_kind"
BASE_URL_TAG = "tuneline.base_url"
AZURE_API_VERSION_TAG = "tuneline.azure_api_version"
LEGACY_PROVIDER_TAG = "tuneline.provider"

_SELECTOR = re.compile(r"^(?P<name>[^@]+?)(?:@(?P<selector>[^@]+))?$")


class RoutingError(Exception):
    """A model that cannot be served as asked: `status` is the HTTP status the client gets."""

    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code


@dataclass(frozen=True)
class Upstream:
    """Where a version is served: the provider kind, its base URL and (Azure) API version."""

    kind: str
    base_url: str
    azure_api_version: str | None = None


@dataclass(frozen=True)
class Target:
    """One model version as the gateway serves it."""

    registered_model: str
    version: str
    model_id: str  # what the provider serves, e.g. ft:tuneline-tiny:tuneline:support:1a2b3c4d
    upstream: Upstream


@dataclass(frozen=True)
class Request:
    """A request's `model`, parsed: the registered model and what it pins (None: champion or A/B)."""

    registered_model: str
    selector: str | None

    @property
    def pinned_version(self) -> str | None:
        return self.selector if self.selector is not None and self.selector.isdigit() else None


def parse_model(model: str) -> Request:
    match = _SELECTOR.match(model.strip())
    if not match:
        raise RoutingError(
            400,
            f"model {model!r} is not a registered model name: use NAME, NAME@ALIAS or NAME@VERSION",
            "invalid_model",
        )
    return Request(match["name"], match["selector"])


def upstream_of(tags: dict[str, str], local_base_url: str) -> Upstream | None:
    """The provider a version records, None when it records none the gateway can reach."""
    kind = tags.get(PROVIDER_KIND_TAG, "")
    base_url = tags.get(BASE_URL_TAG, "")
    if not kind:
        legacy = tags.get(LEGACY_PROVIDER_TAG, "")
        if legacy == "local":
            kind = "local"
        elif legacy.startswith("openai-"):
            kind = "openai"
        else:
            return None
    if kind == "local" and not base_url:
        base_url = local_base_url
    if kind == "openai" and not base_url:
        base_url = "https://api.openai.com/v1"
    if not base_url:
        return None
    return Upstream(kind, base_url.rstrip("/"), tags.get(AZURE_API_VERSION_TAG) or None)


@dataclass
class _Aliases:
    aliases: dict[str, str]  # alias -> version
    read_at: float


class Resolver:
    """Registered model name + selector -> `Target`, through a TTL cache over the MLflow registry."""

    def __init__(
        self,
        registry_uri: str,
        *,
        ttl_s: float,
        local_base_url: str,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = mlflow.MlflowClient(tracking_uri=registry_uri, registry_uri=registry_uri)
        self.ttl_s = ttl_s
        self.local_base_url = local_base_url
        self.clock = clock
        self._aliases: dict[str, _Aliases] = {}
        self._versions: dict[tuple[str, str], Target] = {}
        self._refreshing: dict[str, asyncio.Future[_Aliases]] = {}

    # --- reads of the registry (in a worker thread) ---------------------------------------------------

    def _read_aliases(self, name: str) -> _Aliases:
        try:
            model = self.client.get_registered_model(name)
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                raise RoutingError(
                    404,
                    f"The model `{name}` does not exist: it is not a registered model in the MLflow "
                    "registry (register one with `tuneline run`)",
                    "model_not_found",
                ) from None
            raise
        raw: Any = model.aliases or {}
        aliases = {str(k): str(v) for k, v in raw.items()} if isinstance(raw, dict) else {}
        return _Aliases(aliases, self.clock())

    def _read_version(self, name: str, version: str) -> Target:
        try:
            record = self.client.get_model_version(name, version)
        except MlflowException as exc:
            if exc.error_code in {"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"}:
                raise RoutingError(
                    404,
                    f"The model `{name}@{version}` does not exist: {name!r} has no version {version}",
                    "model_not_found",
                ) from None
            raise
        tags = dict(record.tags or {})
        model_id = tags.get(MODEL_ID_TAG, "")
        upstream = upstream_of(tags, self.local_base_url)
        if not model_id or upstream is None:
            raise RoutingError(
                503,
                f"version {version} of {name!r} records no provider the gateway can reach (tags "
                f"{MODEL_ID_TAG}, {PROVIDER_KIND_TAG}, {BASE_URL_TAG}); register it again with `tuneline run`",
                "model_not_servable",
            )
        return Target(name, str(version), model_id, upstream)

    # --- the cache -----------------------------------------------------------------------------------

    async def aliases(self, name: str) -> dict[str, str]:
        """alias -> version of a registered model, at most `ttl_s` old (older only while the registry
        cannot be read). Refreshed ahead: a request that finds the entry past half its TTL starts a
        re-read in the background and is answered from the entry, so under steady traffic no request
        waits for the registry; one that finds it past the TTL (no traffic meanwhile) waits."""
        entry = self._aliases.get(name)
        if entry is not None:
            age = self.clock() - entry.read_at
            if age < self.ttl_s:
                if age >= self.ttl_s / 2 and name not in self._refreshing:
                    self._refresh(name)
                return entry.aliases
        pending = self._refreshing.get(name) or self._refresh(name)
        try:
            return (await asyncio.shield(pending)).aliases
        except RoutingError:
            raise
        except Exception as exc:  # the registry is down: serve what was last read
            if entry is None:
                raise RoutingError(
                    503,
                    f"the model registry could not be read for {name!r} ({type(exc).__name__}); retry later",
                    "registry_unavailable",
                ) from exc
            return entry.aliases

    def _refresh(self, name: str) -> asyncio.Future[_Aliases]:
        """A re-read of `name`'s aliases in a worker thread, shared by whoever asks meanwhile. When it
        ends, the cache takes its outcome, whether a request waits for it or not: the aliases read; a
        model gone from the registry leaves the cache (its next request is a 404); a registry that
        cannot be read leaves the entry as it was (served stale, and logged)."""
        pending = asyncio.ensure_future(asyncio.to_thread(self._read_aliases, name))
        self._refreshing[name] = pending

        def done(future: asyncio.Future[_Aliases]) -> None:
            self._refreshing.pop(name, None)
            if future.cancelled():
                return
            error = future.exception()
            if error is None:
                self._aliases[name] = future.result()
            elif isinstance(error, RoutingError):
                self._aliases.pop(name, None)
            elif name in self._aliases:
                log.warning("registry read for %r failed (%s); serving the aliases read before", name, error)

        pending.add_done_callback(done)
        return pending

    async def version(self, name: str, version: str) -> Target:
        key = (name, version)
        target = self._versions.get(key)
        if target is None:
            try:
                target = await asyncio.to_thread(self._read_version, name, version)
            except RoutingError:
                raise
            except Exception as exc:
                raise RoutingError(
                    503,
                    f"the model registry could not be read for {name!r} version {version} "
                    f"({type(exc).__name__}); retry later",
                    "registry_unavailable",
                ) from exc
            self._versions[key] = target
        return target

    async def alias(self, name: str, alias: str) -> Target | None:
        """The version holding `alias`, None when none does."""
        version = (await self.aliases(name)).get(alias)
        return None if version is None else await self.version(name, version)

    async def pinned(self, request: Request) -> Target:
        """The version a pinned request names (`@3` or `@alias`)."""
        assert request.selector is not None
        if request.pinned_version is not None:
            await self.aliases(request.registered_model)  # a 404 for an unknown model comes first
            return await self.version(request.registered_model, request.pinned_version)
        target = await self.alias(request.registered_model, request.selector)
        if target is None:
            raise RoutingError(
                404,
                f"The model `{request.registered_model}@{request.selector}` does not exist: no version "
                f"of {request.registered_model!r} holds the alias {request.selector!r}",
                "model_not_found",
            )
        return target
