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


SHORT = [
    {"messages": [{"role": "user", "content": "Where?"}, {"role": "assistant", "content": "It ships."}]}
] * 10


@pytest.fixture(scope="module")
def trained(client: Any, wait_for: Any, to_jsonl: Any) -> dict[str, Any]:
    """A LoRA fine-tune of tiny-chat (training: lora) and a full one of local-chat (training: auto, a
    model this small trains all its weights), one epoch each on ten short examples."""
    short_file = client.files.create(file=("s.jsonl", io.BytesIO(to_jsonl(SHORT))), purpose="fine-tune").id
    jobs = {
        name: client.fine_tuning.jobs.create(
            model=name, training_file=short_file, hyperparameters={"n_epochs": 1}
        ).id
        for name in ("tiny-chat", "local-chat")
    }

    def ended(job_id: str) -> Any:
        found = client.fine_tuning.jobs.retrieve(job_id)
        return found if found.status in ("succeeded", "failed", "cancelled") else None

    done = {
        name: wait_for(lambda j=job_id: ended(j), timeout_s=240, what=f"{name} job")
        for name, job_id in jobs.items()
    }
    for job in done.values():
        assert job.status == "succeeded", job.error
    return {"file": short_file, **{name: job.fine_tuned_model for name, job in done.items()}}


def test_jobs_may_name_only_catalog_models_and_follow_their_settings(
    client: Any, server: Any, wait_for: Any, to_jsonl: Any, examples: Any, trained: dict[str, Any]
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.fine_tuning.jobs.create(model="tuneline-tiny", training_file=trained["file"])
    assert caught.value.body["code"] == "model_not_available"  # type: ignore[index]
    assert "tiny-chat, local-chat" in caught.value.message
    long_file = client.files.create(
        file=("l.jsonl", io.BytesIO(to_jsonl(examples(10)))), purpose="fine-tune"
    ).id
    too_long = client.fine_tuning.jobs.create(model="tiny-chat", training_file=long_file)
    failed = wait_for(
        lambda: (j := client.fine_tuning.jobs.retrieve(too_long.id)).status == "failed" and j,
        timeout_s=240,
        what="the too-long job to fail",
    )
    assert f"at most {CONTEXT} tokens" in failed.error.message
    from tuneline.server.store import Store

    store = Store(Path(server.state_dir))
    lora_dir, full_dir = (Path(store.get_model(trained[name]).path) for name in ("tiny-chat", "local-chat"))
    store.close()
    assert json.loads((lora_dir / "adapter_config.json").read_text())["peft_type"] == "LORA"  # training: lora
    assert not (lora_dir / "config.json").exists()
    assert (full_dir / "config.json").exists() and not (full_dir / "adapter_config.json").exists()
    for model in (trained["tiny-chat"], trained["local-chat"]):
        answer = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Where?"}], max_tokens=3
        )
        assert answer.model == model


def served_logprobs(client: Any, model: str, messages: list[dict[str, str]]) -> dict[str, float]:
    """The server's 20 likeliest first tokens and their logprobs (token text -> logprob)."""
    answer = client.chat.completions.create(
        model=model, messages=messages, logprobs=True, top_logprobs=20, max_tokens=1, temperature=0
    )
    return {t.token: t.logprob for t in answer.choices[0].logprobs.content[0].top_logprobs}


def loaded_logprobs(model: Any, tokenizer: Any, messages: list[dict[str, str]]) -> dict[str, float]:
    import torch

    from tuneline.server.chat_template import ChatFormat

    prompt = ChatFormat(tokenizer).encode_prompt(messages)
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([prompt])).logits[0, -1].float(), dim=-1)
    best = torch.topk(logprobs, 20)
    return {tokenizer.decode([int(i)]): float(v) for i, v in zip(best.indices, best.values, strict=True)}


def export(state: Path, model: str, fmt: str, out: Path) -> Any:
    from typer.testing import CliRunner

    from tuneline.cli import app

    return CliRunner().invoke(
        app, ["export-model", model, "--format", fmt, "--out", str(out), "--state-dir", str(state)]
    )


def test_exports_load_in_transformers_and_peft_with_the_server_s_logits(
    client: Any, server: Any, trained: dict[str, Any], cache: Path, tmp_path: Path
) -> None:
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    messages = [{"role": "user", "content": "Where is my parcel?"}]
    state = Path(server.state_dir)
    lora, full = trained["tiny-chat"], trained["local-chat"]

    done = export(state, lora, "adapter", tmp_path / "adapter")
    assert done.exit_code == 0, done.output
    adapter_config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == REPO  # found in the hub cache by any loader
    model = AutoPeftModelForCausalLM.from_pretrained(
        str(tmp_path / "adapter"), cache_dir=str(cache), local_files_only=True
    ).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "adapter"))
    expected = served_logprobs(client, lora, messages)
    got = loaded_logprobs(model, tokenizer, messages)
    assert list(got) == list(expected) and list(got.values()) == pytest.approx(
        list(expected.values()), abs=1e-4
    )

    for model_id, folder in ((lora, "merged-lora"), (full, "merged-full")):
        done = export(state, model_id, "merged", tmp_path / folder)
        assert done.exit_code == 0, done.output
        assert not (tmp_path / folder / "adapter_config.json").exists()
        model = AutoModelForCausalLM.from_pretrained(str(tmp_path / folder)).eval()
        tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / folder))
        expected = served_logprobs(client, model_id, messages)
        got = loaded_logprobs(model, tokenizer, messages)
        assert list(got) == list(expected)
        assert list(got.values()) == pytest.approx(list(expected.values()), abs=1e-4)

    refused = export(state, full, "adapter", tmp_path / "no-adapter")
    assert (
        refused.exit_code == 2 and "full fine-tune" in refused.output and "--format merged" in refused.output
    )
    assert not (tmp_path / "no-adapter").exists()
    unknown = export(state, "ft:nothing:tuneline::xxxxxxxx", "merged", tmp_path / "none")
    assert unknown.exit_code == 2 and "is not a fine-tuned model" in unknown.output


def test_a_hub_model_that_is_not_cached_stops_serve_in_one_line(tmp_path: Path, cache: Path) -> None:
    command = [sys.executable, "-m", "tuneline.cli", "serve", "--state-dir", str(tmp_path / "state")]
    command += ["--model", "acme/absent", "--model-cache", str(cache)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "400"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert "acme/absent" in lines[0] and str(cache) in lines[0] and "--model-dir" in lines[0]
