"""Generated hostile requests against every endpoint of a real server (issue #14): deep nesting, huge
strings, wrong types, NUL bytes, invalid UTF-8, junk query parameters and ids. None may get a 5xx; every
refusal is in OpenAI's error shape; afterwards the server still answers, every job the junk created has
ended, and a valid job trains to success. A few hundred requests, derandomized (the same every run)."""

from __future__ import annotations

import io
import json
from typing import Any
from urllib.parse import quote

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

TERMINAL = {"succeeded", "failed", "cancelled"}

leaves = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=30)  # any code point, NUL and controls included
)
values = st.recursive(
    leaves,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=16,
)


class Raw(bytes):
    """JSON text spliced in as it is (nesting deeper than the test's own json module could build)."""


def encode(value: Any) -> bytes:
    """`value` as JSON (NaN and Infinity literals included: they are hostile too), Raw parts spliced in."""
    spliced: list[Raw] = []

    def mark(item: Any) -> Any:
        if isinstance(item, Raw):
            spliced.append(item)
            return f"__raw_{len(spliced) - 1}__"
        raise TypeError(type(item))

    text = json.dumps(value, allow_nan=True, default=mark).encode()
    for index, raw in enumerate(spliced):
        text = text.replace(f'"__raw_{index}__"'.encode(), raw)
    return text


deep = st.integers(min_value=60, max_value=4000).map(lambda n: Raw(b"[" * n + b"]" * n))
huge_text = st.integers(min_value=10_000, max_value=200_000).map(lambda n: "\x00x\u2028" * (n // 3))
invalid_utf8 = st.binary(min_size=1, max_size=64).map(lambda b: b'{"model": "' + b"\xff\xfe" + b + b'"}')

JOB_FIELDS = ("model", "training_file", "validation_file", "hyperparameters", "method", "suffix", "seed")
JOB_FIELDS += ("metadata", "integrations", "bogus")
CHAT_FIELDS = ("model", "messages", "temperature", "top_p", "max_tokens", "max_completion_tokens", "stop")
CHAT_FIELDS += (
    "seed",
    "n",
    "stream",
    "stream_options",
    "logprobs",
    "response_format",
    "tools",
    "user",
    "bogus",
)


def mutated(base: dict[str, Any], fields: tuple[str, ...]) -> st.SearchStrategy[bytes]:
    """`base` with a few fields replaced by anything (a wrong type, a NUL, a huge string, deep nesting)."""
    replacement = values | huge_text | deep
    return st.dictionaries(st.sampled_from(fields), replacement, min_size=1, max_size=3).map(
        lambda patch: encode({**base, **patch})
    )


def bodies(base: dict[str, Any], fields: tuple[str, ...]) -> st.SearchStrategy[bytes]:
    return (
        mutated(base, fields)
        | values.map(encode)
        | deep.map(bytes)
        | invalid_utf8
        | st.binary(max_size=200)
        | huge_text.map(lambda text: encode({**base, "model": text}))
    )


ids = st.text(max_size=40) | st.sampled_from(["ftjob-nope", "file-nope", "tuneline-tiny", "..", "%00", "a/b"])


def test_generated_hostile_requests_never_break_the_server(
    server: Any,
    client: Any,
    validate: Any,
    wait_for: Any,
    examples: Any,
    to_jsonl: Any,
    training_bytes: bytes,
) -> None:
    headers = {"Authorization": f"Bearer {server.api_key}"}
    broken = examples(12)
    broken[4]["messages"][0]["role"] = "robot"
    broken_file = client.files.create(file=("b.jsonl", io.BytesIO(to_jsonl(broken))), purpose="fine-tune").id
    job_base = {"model": "tuneline-tiny", "training_file": broken_file}  # jobs it makes fail validation
    chat_base = {"model": "tuneline-tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    seen: list[tuple[str, int]] = []
    http = httpx.Client(base_url=server.base_url, headers=headers, timeout=120)

    families: dict[str, tuple[int, st.SearchStrategy[tuple[str, str, dict[str, Any]]]]] = {
        "create job": (
            60,
            bodies(job_base, JOB_FIELDS).map(lambda b: ("POST", "/fine_tuning/jobs", {"content": b})),
        ),
        "chat": (
            60,
            bodies(chat_base, CHAT_FIELDS).map(lambda b: ("POST", "/chat/completions", {"content": b})),
        ),
        "upload": (
            30,
            st.tuples(st.text(max_size=20), st.text(max_size=20), st.binary(max_size=2000)).map(
                lambda t: (
                    "POST",
                    "/files",
                    {"files": {"file": (t[0] or "x", t[2])}, "data": {"purpose": t[1]}},
                )
            )
            | st.binary(max_size=300).map(lambda b: ("POST", "/files", {"content": b})),
        ),
        "list": (
            30,
            st.dictionaries(
                st.sampled_from(["limit", "after", "order", "purpose", "metadata[k]", "x"]), ids
            ).flatmap(
                lambda q: st.sampled_from(["/files", "/fine_tuning/jobs"]).map(
                    lambda p: ("GET", p, {"params": q})
                )
            ),
        ),
        "job ids": (
            30,
            st.tuples(
                ids, st.sampled_from(["", "/events", "/checkpoints", "/cancel", "/pause", "/resume"])
            ).map(
                lambda t: (
                    "POST" if t[1] in ("/cancel", "/pause", "/resume") else "GET",
                    f"/fine_tuning/jobs/{quote(t[0], safe='')}{t[1]}",
                    {"params": {"limit": "5"}},
                )
            ),
        ),
        "model and file ids": (
            30,
            st.tuples(ids, st.sampled_from(["GET", "DELETE"]), st.sampled_from(["/models/", "/files/"])).map(
                lambda t: (t[1], f"{t[2]}{quote(t[0], safe=':')}", {})
            ),
        ),
    }

    def send(request: tuple[str, str, dict[str, Any]]) -> None:
        method, path, options = request
        if "content" in options:
            options = {**options, "headers": {"content-type": "application/json"}}
        response = http.request(method, path, **options)
        seen.append((path, response.status_code))
        assert response.status_code < 500, (method, path, response.text[:300])
        if response.status_code >= 400:
            validate("ErrorResponse", response.json())

    try:
        for count, family in families.values():
            fuzz = settings(
                max_examples=count,
                deadline=None,
                derandomize=True,
                database=None,
                suppress_health_check=list(HealthCheck),
            )(given(family)(send))
            fuzz()
    finally:
        http.close()
    import collections

    print(collections.Counter(seen).most_common(40))
    assert len(seen) >= 200 and {status for _, status in seen} & {200, 400, 404}
    assert httpx.get(f"{server.base_url}/models", headers=headers, timeout=60).status_code == 200

    def every_job_ended() -> bool:
        return all(job.status in TERMINAL for job in client.fine_tuning.jobs.list(limit=100))

    wait_for(every_job_ended, timeout_s=120, what="every job the fuzzing made to end")
    valid = client.fine_tuning.jobs.create(
        model="tuneline-tiny",
        training_file=client.files.create(
            file=("t.jsonl", io.BytesIO(training_bytes)), purpose="fine-tune"
        ).id,
        hyperparameters={"n_epochs": 1, "batch_size": 4},
    )
    done = wait_for(
        lambda: (job := client.fine_tuning.jobs.retrieve(valid.id)).status in TERMINAL and job,
        timeout_s=300,
        what="a valid job after the fuzzing",
    )
    assert done.status == "succeeded", done.error
