"""The catalog (server.models and `tuneline serve --model`) decides what /v1/models lists and what jobs
may name, and its per-model settings apply: `training: lora` makes a fine-tune an adapter, and
`context_length` bounds both the prompts the model answers and the examples its jobs train on. Hub ids
resolve from a local hub-shaped cache the test builds (HF_HUB_OFFLINE=1: nothing reaches a hub); a hub
id that is not cached stops `tuneline serve` with one line naming the id, the cache and --model-dir."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.server.conftest import API_KEY
from tests.server.test_hub import REPO, checkpoint_files, hub_cache  # noqa: F401 (a fixture)

CONTEXT = 40  # the catalog's context_length for tiny-chat; the checkpoint's own is 64


@pytest.fixture(scope="module")
def cache(
    tmp_path_factory: pytest.TempPathFactory,
    checkpoint_files: dict[str, bytes],  # noqa: F811 (test_hub's fixture, imported above)
) -> Path:
    folder = tmp_path_factory.mktemp("hub-cache")
    hub_cache(folder, checkpoint_files)
    return folder


@pytest.fixture(scope="module")
def local_checkpoint(
    tmp_path_factory: pytest.TempPathFactory,
    checkpoint_files: dict[str, bytes],  # noqa: F811
) -> Path:
    folder = tmp_path_factory.mktemp("local") / "local-chat"
    folder.mkdir()
    for name, data in checkpoint_files.items():
        (folder / name).write_bytes(data)
    return folder


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, cache: Path, local_checkpoint: Path) -> Iterator[Any]:
    import yaml

    from tuneline.config import DEFAULT_CONFIG
    from tuneline.server.launcher import start_server

    state = tmp_path_factory.mktemp("catalog-state")
    config = yaml.safe_load(DEFAULT_CONFIG.read_text(encoding="utf-8"))
    config.setdefault("server", {}).update(
        models={
            "tiny-chat": {"source": REPO, "training": "lora", "context_length": CONTEXT, "dtype": "float32"},
            "local-chat": str(local_checkpoint),
        },
        model_cache=str(cache),
    )
    config_path = state / "catalog.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    with start_server(
        state,
        api_key=API_KEY,
        extra_args=["--config", str(config_path), "--model", REPO],
        env={"HF_HUB_OFFLINE": "1"},
    ) as process:
        yield process


def raw(client: Any, method: str, path: str, **kwargs: Any) -> httpx.Response:
    headers = {"Authorization": f"Bearer {client.api_key}"}
    return httpx.request(
        method, f"{client.base_url}{path.lstrip('/')}", headers=headers, timeout=60, **kwargs
    )


def test_the_catalog_is_what_models_lists_and_chat_answers(client: Any, validate: Any) -> None:
    assert [m.id for m in client.models.list()] == ["tiny-chat", "local-chat", REPO]
    assert client.models.retrieve(REPO).id == REPO  # a hub id with its slash, as vLLM names models
    for missing in ("tuneline-tiny", "acme/other"):
        with pytest.raises(openai.NotFoundError) as caught:
            client.models.retrieve(missing)
        assert caught.value.body["code"] == "model_not_found"  # type: ignore[index]
        response = raw(
            client,
            "POST",
            "chat/completions",
            json={"model": missing, "messages": [{"role": "user", "content": "hi"}]},
        )
        assert response.status_code == 404
        validate("ErrorResponse", response.json())
    for name in ("tiny-chat", "local-chat", REPO):
        answer = client.chat.completions.create(
            model=name, messages=[{"role": "user", "content": "Where is my parcel?"}], max_tokens=3
        )
        assert answer.model == name and answer.usage.completion_tokens >= 1


def test_context_length_bounds_what_the_model_answers(client: Any, local_checkpoint: Path) -> None:
    from transformers import AutoTokenizer

    from tuneline.server.chat_template import ChatFormat

    fmt = ChatFormat(AutoTokenizer.from_pretrained(str(local_checkpoint)))
    text = "Where"
    while len(fmt.encode_prompt([{"role": "user", "content": text}])) <= CONTEXT + 2:
        text += " is"
    messages = [{"role": "user", "content": text}]
    assert len(fmt.encode_prompt(messages)) < 60  # fits the checkpoint's own 64
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=2)
    assert caught.value.body["code"] == "context_length_exceeded"  # type: ignore[index]
    assert f"maximum context length is {CONTEXT} tokens" in caught.value.message
    answer = client.chat.completions.create(model="local-chat", messages=messages, max_tokens=2)
    assert answer.usage.prompt_tokens > CONTEXT


def test_jobs_may_name_only_catalog_models_and_follow_their_settings(
    client: Any, server: Any, wait_for: Any, to_jsonl: Any, examples: Any
) -> None:
    short = [
        {"messages": [{"role": "user", "content": "Where?"}, {"role": "assistant", "content": "It ships."}]}
    ] * 10
    short_file = client.files.create(file=("s.jsonl", io.BytesIO(to_jsonl(short))), purpose="fine-tune").id
    with pytest.raises(openai.BadRequestError) as caught:
        client.fine_tuning.jobs.create(model="tuneline-tiny", training_file=short_file)
    assert caught.value.body["code"] == "model_not_available"  # type: ignore[index]
    assert "tiny-chat, local-chat" in caught.value.message
    long_file = client.files.create(
        file=("l.jsonl", io.BytesIO(to_jsonl(examples(10)))), purpose="fine-tune"
    ).id
    too_long = client.fine_tuning.jobs.create(model="tiny-chat", training_file=long_file)
    job = client.fine_tuning.jobs.create(
        model="tiny-chat", training_file=short_file, hyperparameters={"n_epochs": 1}
    )

    def ended(job_id: str) -> Any:
        found = client.fine_tuning.jobs.retrieve(job_id)
        return found if found.status in ("succeeded", "failed", "cancelled") else None

    failed = wait_for(lambda: ended(too_long.id), timeout_s=240, what="the too-long job to fail")
    assert failed.status == "failed" and f"at most {CONTEXT} tokens" in failed.error.message
    done = wait_for(lambda: ended(job.id), timeout_s=240, what="the LoRA job to succeed")
    assert done.status == "succeeded", done.error
    adapters = [json.loads(p.read_text()) for p in Path(server.state_dir).rglob("adapter_config.json")]
    assert adapters and all(a["peft_type"] == "LORA" for a in adapters)  # training: lora
    answer = client.chat.completions.create(
        model=done.fine_tuned_model, messages=[{"role": "user", "content": "Where?"}], max_tokens=3
    )
    assert answer.model == done.fine_tuned_model


def test_a_hub_model_that_is_not_cached_stops_serve_in_one_line(tmp_path: Path, cache: Path) -> None:
    command = [sys.executable, "-m", "tuneline.cli", "serve", "--state-dir", str(tmp_path / "state")]
    command += ["--model", "acme/absent", "--model-cache", str(cache)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "400"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert "acme/absent" in lines[0] and str(cache) in lines[0] and "--model-dir" in lines[0]
