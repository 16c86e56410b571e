"""`tuneline export-model`: a model of this server's state directory (a fine-tuned model or a kept
checkpoint), written as a folder that transformers, peft and vLLM load without tuneline.

- `adapter`: a LoRA fine-tune's adapter as peft saved it (adapter_config.json, adapter_model.safetensors)
  and its tokenizer with the chat template. `base_model_name_or_path` names the base the way the
  loader will find it: the hub id (and `revision` its commit) when the base is a snapshot of the hub
  cache, else the base's directory on this machine. vLLM serves it over the base: `--enable-lora --lora-modules NAME=DIR`.
  A full fine-tune has no adapter (ExportError: export it merged), nor does a LoRA fine-tune of another
  fine-tune (its base is not a model any loader knows: export it merged).
- `merged`: a plain transformers checkpoint (config.json, model.safetensors, generation config,
  tokenizer with the chat template): a full fine-tune as it is, a LoRA fine-tune with its adapters
  folded into the base (peft's merge_and_unload). Saved in the base's declared dtype (float16 or
  bfloat16 when the base checkpoint says so, float32 otherwise).

The folder is written next to `out` and renamed into place when complete, so a failed export leaves
nothing that looks like a model. transformers and peft write the files; this module only chooses them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tuneline.server.catalog import ADAPTER_CONFIG, MODEL_CARD, is_model_dir
from tuneline.server.store import Store

FORMATS = ("adapter", "merged")
EXPORT_CARD = "tuneline_export.json"  # which model, from which base, in which format


class ExportError(ValueError):
    """Why a model cannot be exported as asked (one line)."""


def export_model(state_dir: Path, model_id: str, fmt: str, out: Path) -> Path:
    """Write `model_id` of the server state in `state_dir` to the new folder `out` as `fmt`; returns `out`."""
    if fmt not in FORMATS:
        raise ExportError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    out = Path(out).expanduser().resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"--out {out} exists and is not an empty folder: name a new folder")
    store = Store(state_dir)
    try:
        record = store.get_model(model_id)
        job = store.get_job(record.job_id) if record is not None else None
    finally:
        store.close()
    if record is None:
        raise ExportError(
            f"the model {model_id} is not a fine-tuned model or checkpoint of the server state in {state_dir}"
        )
    source = Path(record.path)
    if not is_model_dir(source):
        raise ExportError(f"the files of {model_id} are missing from {source}")
    base_name = job.base_model if job is not None else None
    staging = out.with_name(f".{out.name}.exporting")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        is_adapter = (source / ADAPTER_CONFIG).is_file() and not (source / "config.json").is_file()
        if fmt == "adapter":
            _adapter(source, staging, model_id, is_adapter)
        else:
            _merged(source, staging)
        card = {"model": model_id, "base_model": base_name, "format": fmt}
        (staging / EXPORT_CARD).write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
        if out.exists():
            out.rmdir()
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def hub_snapshot(path: Path) -> tuple[str, str] | None:
    """(hub id, commit) of a snapshot folder of a hub cache (`models--org--name/snapshots/<commit>`)."""
    path = Path(path)
    storage = path.parent.parent.name
    if path.parent.name != "snapshots" or not storage.startswith("models--"):
        return None
    return storage.removeprefix("models--").replace("--", "/"), path.name


def _adapter(source: Path, target: Path, model_id: str, is_adapter: bool) -> None:
    if not is_adapter:
        raise ExportError(
            f"{model_id} is a full fine-tune, not a LoRA adapter: export it with --format merged"
        )
    config = json.loads((source / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    base = Path(str(config.get("base_model_name_or_path", "")))
    if (base / ADAPTER_CONFIG).is_file() and not (base / "config.json").is_file():
        raise ExportError(
            f"{model_id} adapts another fine-tune (an adapter over an adapter), which no loader takes as "
            "a base: export it with --format merged"
        )
    for path in source.iterdir():
        if path.is_file() and path.name not in (ADAPTER_CONFIG, MODEL_CARD):
            shutil.copyfile(path, target / path.name)
    snapshot = hub_snapshot(base)
    config["base_model_name_or_path"] = snapshot[0] if snapshot else str(base)
    if snapshot:
        config["revision"] = snapshot[1]
    config["inference_mode"] = True
    (target / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def _merged(source: Path, target: Path) -> None:
    import torch

    from tuneline.server.modeling import adapter_base, load_causal_lm, load_tokenizer

    root = source
    while (root / ADAPTER_CONFIG).is_file() and not (root / "config.json").is_file():
        root = adapter_base(root)
    declared = json.loads((root / "config.json").read_text(encoding="utf-8"))
    name = declared.get("dtype") or declared.get("torch_dtype")
    dtype = getattr(torch, name) if name in ("float16", "bfloat16") else torch.float32
    model = load_causal_lm(source, torch.device("cpu"), dtype)
    model.save_pretrained(str(target))
    load_tokenizer(source).save_pretrained(str(target))
