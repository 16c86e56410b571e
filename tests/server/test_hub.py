"""Base models named by hub id, resolved from a model cache in huggingface_hub's layout that the test
builds itself (models--org--name/blobs, snapshots/<commit>/, refs/<name>): offline, by branch, tag or
commit; one-line errors for a model that is not cached, an incomplete download, a file that fails its
checksum and a name that is no model; a local checkpoint directory as it is. No test reaches a hub:
the only "online" case points huggingface_hub at a closed loopback port."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from tuneline.server.hub import (
    VERIFIED_DIR,
    HubModel,
    ModelNotCached,
    ModelUnavailable,
    parse_hub_id,
    resolve_model,
)

REPO = "acme/tiny-chat"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def checkpoint_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """The files of a tiny real checkpoint (Llama architecture, BPE tokenizer, chat template)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("checkpoint")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    specials = ["<|end|>", "<|user|>", "<|assistant|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=specials
    )
    tokenizer.train_from_iterator(["Where is my parcel?", "It ships today."], trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|end|>", additional_special_tokens=specials[1:]
    )
    wrapped.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    config = LlamaConfig(
        vocab_size=len(wrapped), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
        eos_token_id=wrapped.eos_token_id, bos_token_id=None, pad_token_id=None,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(str(folder))
    wrapped.save_pretrained(str(folder))
    return {path.name: path.read_bytes() for path in folder.iterdir() if path.is_file()}


def blob_name(name: str, data: bytes) -> str:
    """What huggingface_hub names a blob: the sha256 of an LFS file (weights), else the git blob id."""
    if name.endswith(".safetensors"):
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def hub_cache(
    cache: Path,
    files: dict[str, bytes],
    repo: str = REPO,
    commit: str = COMMIT,
    refs: tuple[str, ...] = ("main",),
) -> Path:
    """A model in huggingface_hub's cache layout, as snapshot_download leaves it; its snapshot folder."""
    storage = cache / f"models--{repo.replace('/', '--')}"
    snapshot = storage / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (storage / "blobs").mkdir(exist_ok=True)
    for name, data in files.items():
        blob = storage / "blobs" / blob_name(name, data)
        blob.write_bytes(data)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    (storage / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (storage / "refs" / ref).write_text(commit)
    return snapshot


def one_line(error: BaseException) -> str:
    text = str(error)
    assert "\n" not in text, text
    return text


def test_hub_ids_and_revisions_are_parsed() -> None:
    assert parse_hub_id("Qwen/Qwen2.5-0.5B-Instruct") == HubModel("Qwen/Qwen2.5-0.5B-Instruct")
    assert parse_hub_id("meta-llama/Llama-3.1-8B-Instruct@v1.0") == HubModel(
        "meta-llama/Llama-3.1-8B-Instruct", "v1.0"
    )
    assert parse_hub_id("org/name", revision=COMMIT) == HubModel("org/name", COMMIT)
    assert str(HubModel("org/name", "main")) == "org/name@main"
    for bad in ("tuneline-tiny", "a/b/c", "org/", "org/na me", "../x"):
        with pytest.raises(ValueError, match="neither a checkpoint directory on this machine nor a hub id"):
            parse_hub_id(bad)
    with pytest.raises(ValueError, match="names revision 'v1' but revision 'v2'"):
        parse_hub_id("org/name@v1", revision="v2")


def test_a_cached_hub_model_resolves_offline_by_branch_tag_or_commit(
    checkpoint_files: dict[str, bytes], tmp_path: Path
) -> None:
    from tuneline.server.modeling import ChatModel

    cache = tmp_path / "cache"
    snapshot = hub_cache(cache, checkpoint_files, refs=("main", "v1"))
    for name, revision in ((REPO, None), (f"{REPO}@v1", None), (REPO, COMMIT), (f"{REPO}@{COMMIT}", None)):
        assert resolve_model(name, cache, revision=revision, offline=True) == snapshot.resolve()
    # The snapshot is a usable checkpoint: transformers reads it through the cache's links.
    chat = ChatModel.load(snapshot)
    answer = chat.generate([{"role": "user", "content": "Where is my parcel?"}], temperature=0, max_tokens=3)
    assert answer.completion_tokens <= 3 and answer.prompt_tokens > 0


def test_hf_hub_offline_keeps_resolution_on_this_machine(
    checkpoint_files: dict[str, bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    snapshot = hub_cache(cache, checkpoint_files)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model(REPO, cache) == snapshot.resolve()
    with pytest.raises(ModelNotCached) as missing:
        resolve_model("acme/other-model", cache)
    message = one_line(missing.value)
    assert "acme/other-model" in message and str(cache.resolve()) in message and "--model-dir" in message
    assert "offline" in message


def test_a_revision_that_is_not_cached_fails_in_one_line(
    checkpoint_files: dict[str, bytes], tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    hub_cache(cache, checkpoint_files)
    with pytest.raises(ModelNotCached) as missing:
        resolve_model(f"{REPO}@v2", cache, offline=True)
    message = one_line(missing.value)
    assert f"{REPO}@v2" in message and str(cache.resolve()) in message and "--model-dir" in message


def test_an_interrupted_download_is_not_taken_for_a_model(
    checkpoint_files: dict[str, bytes], tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    weights = {name: data for name, data in checkpoint_files.items() if not name.endswith(".safetensors")}
    snapshot = hub_cache(cache, weights)  # config and tokenizer arrived, the weights did not
    partial = snapshot.parent.parent / "blobs" / f"{'0' * 64}.incomplete"
    partial.write_bytes(b"\0" * 10)
    with pytest.raises(ModelNotCached, match="incomplete") as missing:
        resolve_model(REPO, cache, offline=True)
    assert "--model-dir" in one_line(missing.value)


def test_a_file_that_fails_its_checksum_is_named_and_verification_is_once_per_commit(
    checkpoint_files: dict[str, bytes], tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    snapshot = hub_cache(cache, checkpoint_files)
    weights = next(snapshot.glob("*.safetensors"))
    blob = weights.resolve()
    original = blob.read_bytes()
    blob.write_bytes(original[:-7] + b"garbage")  # same size, other bytes
    with pytest.raises(ModelUnavailable, match="fail their checksums") as corrupt:
        resolve_model(REPO, cache, offline=True)
    message = one_line(corrupt.value)
    assert weights.name in message and "download it again" in message
    marker = snapshot.parent.parent / VERIFIED_DIR / COMMIT
    assert not marker.exists()
    blob.write_bytes(original)
    assert resolve_model(REPO, cache, offline=True) == snapshot.resolve()
    assert marker.is_file()  # verified once: the next resolution does not hash the weights again
    config = (snapshot / "config.json").resolve()
    config.write_bytes(config.read_bytes() + b" ")
    assert resolve_model(REPO, cache, offline=True) == snapshot.resolve()


def test_a_local_checkpoint_directory_is_used_where_it_is(
    checkpoint_files: dict[str, bytes], tmp_path: Path
) -> None:
    folder = tmp_path / "my-model"
    folder.mkdir()
    for name, data in checkpoint_files.items():
        (folder / name).write_bytes(data)
    assert resolve_model(folder, tmp_path / "cache", offline=True) == folder.resolve()
    empty = tmp_path / "org" / "empty"
    empty.mkdir(parents=True)
    with pytest.raises(ValueError, match="not a model checkpoint") as refused:
        resolve_model(empty, tmp_path / "cache", offline=True)
    one_line(refused.value)
    assert not (tmp_path / "cache").exists()  # nothing was looked up or created


def test_online_with_the_hub_unreachable_uses_the_cache_or_says_why(
    checkpoint_files: dict[str, bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    # A closed loopback port stands for the hub (whatever HF_HUB_OFFLINE this process started with).
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "2")
    cache = tmp_path / "cache"
    snapshot = hub_cache(cache, checkpoint_files)
    assert resolve_model(REPO, cache, offline=False) == snapshot.resolve()
    with pytest.raises(ModelNotCached) as missing:
        resolve_model("acme/never-downloaded", cache, offline=False)
    message = one_line(missing.value)
    assert "acme/never-downloaded" in message and "cannot be reached" in message and "--model-dir" in message
