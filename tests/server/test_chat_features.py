"""What clients of chat completions use, through the unmodified openai SDK over real HTTP: logprobs and
top_logprobs (checked against the model run directly with transformers), n > 1, response_format
json_object (answered when the answer parses, else OpenAI's error shape), the x-request-id header on
every response, `GET /v1/fine_tuning/jobs?metadata=null`, and a base model's `created` that stays put
when its weights appear.

The json_object answers come from two hand-set checkpoints made from tuneline-tiny (JSON_MODELS): every
layer's output projections zeroed, so the last hidden state depends on the current token only, and the
output head set so that the generation prompt's last token is followed by `{`, `{` by `}` (or, in the
looping one, by `{` again) and `}` by the end-of-turn token: a real model whose answer is known
beforehand, `{}` or `{{{{...`, without training one.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch

from tests.server.conftest import API_KEY
from tuneline.server.chat_template import ChatFormat

QUESTION = [{"role": "user", "content": "Question 3: help with my refund"}]
JSON_QUESTION = [{"role": "user", "content": "Answer in JSON: which queue handles refunds?"}]


def hand_set_checkpoint(builtin: Path, folder: Path, follows: dict[str, str]) -> Path:
    """tuneline-tiny whose next token depends on the current token only, as `follows` says (token
    text -> next token text; "" is the generation prompt's last token, "<eot>" the end-of-turn token)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(builtin))
    model = AutoModelForCausalLM.from_pretrained(str(builtin), dtype=torch.float32)
    fmt = ChatFormat(tokenizer)
    prompt_end = fmt.encode_prompt(JSON_QUESTION)[-1]
    (end_of_turn,) = sorted(fmt.stop_token_ids)

    def token_id(text: str) -> int:
        if text == "":
            return prompt_end
        if text == "<eot>":
            return end_of_turn
        (single,) = tokenizer(text, add_special_tokens=False)["input_ids"]
        return int(single)

    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        head = torch.zeros_like(model.lm_head.weight)
        for current, following in follows.items():
            embedded = model.model.embed_tokens.weight[token_id(current)]
            hidden = model.model.norm(embedded[None, None, :])[0, 0]
            head[token_id(following)] += 50.0 * hidden / hidden.norm() ** 2
        model.lm_head.weight.copy_(head)
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def json_models(builtin_model: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("json-models")
    return [
        hand_set_checkpoint(builtin_model, root / "json-braces", {"": "{", "{": "}", "}": "<eot>"}),
        hand_set_checkpoint(builtin_model, root / "json-loop", {"": "{", "{": "{"}),
    ]


@pytest.fixture(scope="module")
def server(server_state: Path, json_models: list[Path]) -> Iterator[Any]:
    from tuneline.server.launcher import start_server

    with start_server(server_state, api_key=API_KEY, model_dirs=json_models) as process:
        yield process


def raw(client: Any, method: str, path: str, **kwargs: Any) -> httpx.Response:
    headers = {"Authorization": f"Bearer {client.api_key}"}
    return httpx.request(
        method, f"{client.base_url}{path.lstrip('/')}", headers=headers, timeout=60, **kwargs
    )


def test_logprobs_are_the_model_s_own(client: Any, validate: Any, builtin_model: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    answer = client.chat.completions.create(
        model="tuneline-tiny",
        messages=QUESTION,
        logprobs=True,
        top_logprobs=5,
        temperature=0,
        max_tokens=6,
    )
    choice = answer.choices[0]
    content = choice.logprobs.content
    assert len(content) == answer.usage.completion_tokens > 0
    assert b"".join(bytes(entry.bytes) for entry in content).decode() == choice.message.content
    # The reference: the same checkpoint run directly, teacher-forced on the prompt and the answer.
    tokenizer = AutoTokenizer.from_pretrained(str(builtin_model))
    model = AutoModelForCausalLM.from_pretrained(str(builtin_model), dtype=torch.float32).eval()
    prompt = ChatFormat(tokenizer).encode_prompt(QUESTION)
    answer_ids: list[int] = []
    ids = list(prompt)
    for entry in content:
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].float(), dim=-1)
        best = torch.topk(logprobs, 5)
        assert [tokenizer.decode([int(i)]) for i in best.indices] == [t.token for t in entry.top_logprobs]
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(best.values.tolist(), abs=1e-3)
        chosen = int(best.indices[0])  # greedy: the likeliest token
        assert entry.token == tokenizer.decode([chosen])
        assert entry.logprob == pytest.approx(float(logprobs[chosen]), abs=1e-3)
        ids.append(chosen)
        answer_ids.append(chosen)
    assert tokenizer.decode(answer_ids, skip_special_tokens=True) == choice.message.content
    body = raw(
        client,
        "POST",
        "chat/completions",
        json={"model": "tuneline-tiny", "messages": QUESTION, "logprobs": True, "max_tokens": 3},
    ).json()
    validate("CreateChatCompletionResponse", body)
    assert all(entry["top_logprobs"] == [] for entry in body["choices"][0]["logprobs"]["content"])
    plain = client.chat.completions.create(model="tuneline-tiny", messages=QUESTION, max_tokens=2)
    assert plain.choices[0].logprobs is None


def test_n_choices_are_seeded_rows_of_one_request(client: Any) -> None:
    settings: dict[str, Any] = {"model": "tuneline-tiny", "messages": QUESTION, "temperature": 1.5}
    several = client.chat.completions.create(n=3, seed=11, max_tokens=8, **settings)
    assert [c.index for c in several.choices] == [0, 1, 2]
    texts = [c.message.content for c in several.choices]
    assert len(set(texts)) > 1  # each choice samples with its own seed
    single = client.chat.completions.create(seed=11, max_tokens=8, **settings)
    assert single.choices[0].message.content == texts[0]  # choice 0 is the n = 1 answer
    assert several.usage.prompt_tokens == single.usage.prompt_tokens
    alone = [
        client.chat.completions.create(seed=11 + i, max_tokens=8, **settings).usage.completion_tokens
        for i in range(3)
    ]
    assert several.usage.completion_tokens == sum(alone)


def test_streamed_choices_carry_their_index_and_logprobs(client: Any) -> None:
    settings: dict[str, Any] = {
        "model": "tuneline-tiny",
        "messages": QUESTION,
        "temperature": 1.5,
        "seed": 5,
        "max_tokens": 8,
        "n": 2,
        "logprobs": True,
        "top_logprobs": 2,
    }
    whole = client.chat.completions.create(**settings)
    texts, entries, finishes = ["", ""], [[], []], [None, None]
    usage = None
    for chunk in client.chat.completions.create(
        stream=True, stream_options={"include_usage": True}, **settings
    ):
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            entries[choice.index] += choice.logprobs.content if choice.logprobs else []
            finishes[choice.index] = choice.finish_reason or finishes[choice.index]
    assert texts == [c.message.content for c in whole.choices]
    assert finishes == [c.finish_reason for c in whole.choices]
    for streamed, choice in zip(entries, whole.choices, strict=True):
        # The same tokens; logprobs equal up to float rounding (the rows shared a batch differently).
        assert [(e.token, [t.token for t in e.top_logprobs]) for e in streamed] == [
            (e.token, [t.token for t in e.top_logprobs]) for e in choice.logprobs.content
        ]
        assert [e.logprob for e in streamed] == pytest.approx(
            [e.logprob for e in choice.logprobs.content], abs=1e-4
        )
    assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model="tuneline-tiny",
            messages=JSON_QUESTION,
            response_format={"type": "json_object"},
            stream=True,
        )
    assert caught.value.body["param"] == "stream"  # type: ignore[index]


def test_json_object_answers_parse_or_fail_in_openai_shape(client: Any, validate: Any) -> None:
    fmt: Any = {"type": "json_object"}
    answer = client.chat.completions.create(model="json-braces", messages=JSON_QUESTION, response_format=fmt)
    assert json.loads(answer.choices[0].message.content) == {}
    assert answer.choices[0].finish_reason == "stop"
    # Without the option the same model answers the same; text format is accepted as before.
    text = client.chat.completions.create(
        model="json-braces", messages=JSON_QUESTION, response_format={"type": "text"}
    )
    assert text.choices[0].message.content == "{}"
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        client.chat.completions.create(
            model="json-loop", messages=JSON_QUESTION, response_format=fmt, max_tokens=6
        )
    assert caught.value.status_code == 422
    assert caught.value.body["code"] == "json_output_invalid"  # type: ignore[index]
    assert "4 attempts" in caught.value.message and "max_tokens" in caught.value.message
    body = raw(
        client,
        "POST",
        "chat/completions",
        json={"model": "json-loop", "messages": JSON_QUESTION, "response_format": fmt, "max_tokens": 4},
    )
    assert body.status_code == 422
    validate("ErrorResponse", body.json())
    with pytest.raises(openai.BadRequestError, match="must contain the word 'json'"):
        client.chat.completions.create(model="json-braces", messages=QUESTION, response_format=fmt)
    with pytest.raises(openai.BadRequestError, match="json_schema"):
        client.chat.completions.create(
            model="json-braces",
            messages=JSON_QUESTION,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {}}},
        )


def test_every_response_carries_a_request_id(client: Any, server: Any, wait_for: Any) -> None:
    seen = set()
    answer = client.chat.completions.with_raw_response.create(
        model="tuneline-tiny", messages=QUESTION, max_tokens=2
    )
    seen.add(answer.headers["x-request-id"])
    assert answer.parse()._request_id == answer.headers["x-request-id"]
    seen.add(client.models.with_raw_response.list().headers["x-request-id"])
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("no-such-model")
    seen.add(missing.value.response.headers["x-request-id"])
    unauthorized = httpx.get(f"{server.base_url}/models", timeout=30)  # refused before any router
    assert unauthorized.status_code == 401
    seen.add(unauthorized.headers["x-request-id"])
    assert len(seen) == 4 and all(s.startswith("req_") and len(s) == 36 for s in seen)
    # The line is written once the response has gone (it carries the request's duration), so the
    # client can read the response a moment before the server's log has it: wait for it, bounded.
    wait_for(
        lambda: unauthorized.headers["x-request-id"] in Path(server.log_path).read_text(encoding="utf-8"),
        timeout_s=10,
        what="the refused request's log line",
    )


def test_jobs_listed_with_metadata_null_are_those_without_metadata(
    client: Any, examples: Any, to_jsonl: Any
) -> None:
    broken = examples(12)
    broken[3]["messages"][0]["role"] = "robot"  # the jobs fail validation at once: nothing trains
    file_id = client.files.create(file=("b.jsonl", io.BytesIO(to_jsonl(broken))), purpose="fine-tune").id
    tagged = client.fine_tuning.jobs.create(model="tuneline-tiny", training_file=file_id, metadata={"k": "v"})
    bare = client.fine_tuning.jobs.create(model="tuneline-tiny", training_file=file_id)
    empty = client.fine_tuning.jobs.create(model="tuneline-tiny", training_file=file_id, metadata={})
    without = {j.id for j in client.fine_tuning.jobs.list(extra_query={"metadata": "null"}, limit=100)}
    assert {bare.id, empty.id} <= without and tagged.id not in without
    assert [j.id for j in client.fine_tuning.jobs.list(metadata={"k": "v"})] == [tagged.id]
    everything = {j.id for j in client.fine_tuning.jobs.list(limit=100)}
    assert {tagged.id, bare.id, empty.id} <= everything
    both = raw(client, "GET", "fine_tuning/jobs", params=[("metadata", "null"), ("metadata[k]", "v")])
    assert both.status_code == 400 and "not both" in both.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError):
        client.fine_tuning.jobs.list(extra_query={"metadata": "nothing"})


def test_a_base_model_keeps_its_created_time_when_its_weights_appear(
    tmp_path: Path, builtin_model: Path
) -> None:
    from tuneline.server.launcher import start_server

    state = tmp_path / "state"
    with start_server(state, api_key=API_KEY) as process:
        sdk = openai.OpenAI(base_url=process.base_url, api_key=API_KEY, max_retries=0)
        before = sdk.models.retrieve("tuneline-tiny").created
        target = state / "models" / "tuneline-tiny"
        shutil.copytree(builtin_model, target)  # the weights appear, as a first build leaves them
        later = time.time() + 30
        os.utime(target / "config.json", (later, later))
        assert sdk.models.retrieve("tuneline-tiny").created == before
        assert {m.id: m.created for m in sdk.models.list()}["tuneline-tiny"] == before
    with start_server(state, api_key=API_KEY) as process:
        sdk = openai.OpenAI(base_url=process.base_url, api_key=API_KEY, max_retries=0)
        assert sdk.models.retrieve("tuneline-tiny").created == before


def test_logprob_bytes_rebuild_characters_that_tokens_split(builtin_model: Path) -> None:
    from transformers import AutoTokenizer

    from tuneline.server.logprobs import token_bytes

    tokenizer = AutoTokenizer.from_pretrained(str(builtin_model))
    text = "café ☕ naïve"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)  # some token holds part of a character
    memo: dict[int, bytes] = {}
    assert b"".join(token_bytes(tokenizer, i, memo) for i in ids).decode() == text
