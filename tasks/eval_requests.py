"""The requests of an evaluation: each prompt to each model, sent once, retried, cached across runs.

Split from tasks/evaluate.py (which scores and summarises the answers) so that each stays readable: this
module is only about asking. Guarantees (see tasks/evaluate.py's docstring for the whole evaluation):
- at most `evaluation.concurrency` requests in flight, each retried up to `evaluation.max_retries` times
  on transient failures; a request that still fails becomes an answer with its error, never dropped;
- identical requests (same model, same messages) are sent once; with an answer cache, a request some
  earlier run had answered by the same model (same id and `created` time) is not sent at all;
- a model the provider does not know, or a key it refuses, raises EvaluationError at once.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

from tuneline.answer_cache import AnswerCache, answer_key
from tuneline.config import EvaluationConfig
from tuneline.provider import Provider, ProviderError, retrying

# A provider answer with these statuses means the model or the key is wrong: no example can succeed.
FATAL_STATUSES = frozenset({401, 403, 404})
CONTEXT_EXCEEDED = "context_length_exceeded"  # the API's code for a prompt longer than the model's context


class EvaluationError(RuntimeError):
    """The evaluation cannot produce a result (unknown model, refused key, unusable eval set)."""


@dataclass(frozen=True)
class Answer:
    text: str
    error: str | None
    latency_s: float
    fallback: int = 0  # how many shorter variants were needed (few-shot: shots dropped)
    cached: bool = False  # taken from the answer cache, not asked in this run


@dataclass(frozen=True)
class ChatRequest:
    """One prompt for one model. `shorter` are variants to send, in turn, when the provider says the
    prompt exceeds the model's context (a few-shot prompt with fewer shots)."""

    model: str
    messages: tuple[Mapping[str, Any], ...]
    shorter: tuple[tuple[Mapping[str, Any], ...], ...] = ()

    def key(self) -> str:
        return json.dumps([self.model, self.messages], sort_keys=True)


def eval_provider(provider: Provider, settings: EvaluationConfig) -> Provider:
    """The provider with the evaluation's own retry budget and timeout (retries done by `retrying`)."""
    client = provider.client.with_options(max_retries=0, timeout=settings.request_timeout_s)
    return dataclasses.replace(provider, client=client, max_retries=settings.max_retries)


def ask(provider: Provider, request: ChatRequest, settings: EvaluationConfig) -> Answer:
    """One chat completion; transient failures are retried, the last one becomes the answer's error.
    Raises EvaluationError when the model or the key is refused (no answer could ever come)."""
    started = time.perf_counter()
    variants = (request.messages, *request.shorter)
    for fallback, messages in enumerate(variants):

        def attempt(messages: tuple[Mapping[str, Any], ...] = messages) -> Any:
            return provider.client.chat.completions.create(
                model=request.model,
                messages=[dict(m) for m in messages],  # type: ignore[misc]
                temperature=settings.temperature,
                seed=settings.seed,
                max_completion_tokens=settings.max_tokens,
            )

        try:
            response = retrying(provider, f"chat completion with {request.model}", attempt)
        except ProviderError as exc:
            if exc.status in FATAL_STATUSES:
                raise EvaluationError(f"evaluating {request.model}: {exc}") from exc
            if exc.code == CONTEXT_EXCEEDED and fallback + 1 < len(variants):
                continue
            return Answer("", str(exc), time.perf_counter() - started, fallback)
        text = (response.choices[0].message.content or "") if response.choices else ""
        return Answer(text, None, time.perf_counter() - started, fallback)
    raise AssertionError("unreachable: the last variant returns")


def model_created(provider: Provider, model: str) -> int:
    """The provider's `created` time of a model (with its id, what names its weights)."""
    try:
        found = retrying(provider, f"retrieve model {model}", lambda: provider.client.models.retrieve(model))
    except ProviderError as exc:
        if exc.status in FATAL_STATUSES:
            raise EvaluationError(f"evaluating {model}: {exc}") from exc
        raise
    return int(found.created)


@dataclass(frozen=True)
class CachedAnswers:
    """The answer cache as one evaluation uses it: the store, and each model's `created` time."""

    store: AnswerCache
    created: Mapping[str, int]

    def key(self, provider: Provider, request: ChatRequest, settings: EvaluationConfig) -> str:
        # The local server's port changes from run to run; its models' created times do not.
        where = provider.name if provider.kind == "local" else provider.base_url
        asked = {
            "messages": request.messages,
            "shorter": request.shorter,
            "temperature": settings.temperature,
            "seed": settings.seed,
            "max_tokens": settings.max_tokens,
        }
        return answer_key(where, request.model, self.created[request.model], asked)


def ask_all(
    provider: Provider,
    requests: Sequence[ChatRequest],
    settings: EvaluationConfig,
    on_answer: Callable[[int, int], None] | None = None,
    cache: CachedAnswers | None = None,
) -> list[Answer]:
    """Answers aligned with `requests`, at most `settings.concurrency` in flight; identical requests
    are sent once, and with a cache, requests it has answers for are not sent at all. A fatal provider
    answer cancels the rest and raises."""
    unique: dict[str, ChatRequest] = {}
    for request in requests:
        unique.setdefault(request.key(), request)
    answers: dict[str, Answer] = {}
    cache_keys: dict[str, str] = {}
    if cache is not None:
        cache_keys = {key: cache.key(provider, request, settings) for key, request in unique.items()}
        stored = cache.store.get_many(list(cache_keys.values()))
        for key, cache_key in cache_keys.items():
            if cache_key in stored:
                text, fallback = stored[cache_key]
                answers[key] = Answer(text, None, 0.0, fallback, cached=True)
    client = eval_provider(provider, settings)
    pool = ThreadPoolExecutor(max_workers=settings.concurrency, thread_name_prefix="tuneline-eval")
    try:
        futures = {
            pool.submit(ask, client, request, settings): key
            for key, request in unique.items()
            if key not in answers
        }
        pending = set(futures)
        while pending:
            done, pending = wait(pending, return_when=FIRST_EXCEPTION)
            for future in done:
                key = futures[future]
                answer = answers[key] = future.result()  # re-raises a fatal error
                if cache is not None and answer.error is None:
                    cache.store.put(cache_keys[key], answer.text, answer.fallback)
                if on_answer:
                    on_answer(len(answers), len(unique))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return [answers[request.key()] for request in requests]
