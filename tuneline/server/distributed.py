"""One fine-tuning job on several devices: data parallel (DDP) or fully sharded (FSDP2), one process per
device, started by the trainer itself.

How a job runs on N devices (`train()` in tuneline/server/training.py calls `run_ranks` when N > 1):
- the calling process (the server's job worker) is rank 0: it keeps its reporter (events, metrics,
  checkpoints, the stop signal) and is the only rank that writes files;
- it starts ranks 1..N-1 as child processes (`python -m tuneline.server.distributed`), which read the
  same TrainingSpec from a JSON file, join through a TCP store on 127.0.0.1 (port chosen by the OS),
  write their output to the worker's own log, and die with the worker (PR_SET_PDEATHSIG);
- every rank computes the same epoch order; each batch's examples are shared out by tokens
  (tuneline/server/packing.py split_for_ranks), each rank takes the summed loss of its share divided
  by the trained tokens of the whole batch, and gradients are summed across ranks: one step of N
  ranks equals one step of one process on the whole batch (to float summation order);
- rank 0's stop decision reaches every rank before each step (a CPU-side all-reduce), so all ranks
  stop at the same step; a rank that fails ends the job (a peer's collective fails, or times out
  after TIMEOUT).

The worker needs no launcher (no torchrun): `train(spec, reporter)` with `spec.devices` = the
number of GPUs for the job (`server.gpus_per_job`). On a CPU, `devices` > 1 runs that many gloo
processes: the same code path, which is how it is tested without GPUs.

Strategy ("auto"): DDP, unless the job is a full fine-tune whose weights, gradients and optimizer
state (16 bytes a parameter) would take more than FSDP_ABOVE_FRACTION of one GPU's memory: then FSDP
(each decoder layer and the rest of the model sharded across the ranks, bf16 compute on GPUs that
have it, float32 gradient reduction). LoRA jobs always use DDP (the frozen base fits, or LoRA would
not help).
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import os
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from tuneline.server.packing import split_for_ranks

if TYPE_CHECKING:
    from tuneline.server.training_spec import TrainingOutcome, TrainingReporter, TrainingSpec

TIMEOUT = timedelta(minutes=30)
FSDP_ABOVE_FRACTION = 0.5
STRATEGIES = ("auto", "ddp", "fsdp")


@dataclass
class Ranks:
    """This process's place among the job's ranks (world_size 1: a plain single-process run)."""

    world_size: int = 1
    rank: int = 0
    strategy: str = "single"  # "single" | "ddp" | "fsdp"
    control: Any = None  # a gloo group for CPU-side flags
    children: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def share(self, lengths: Sequence[int]) -> list[int]:
        """Indices (into `lengths`, one batch's examples) this rank trains on."""
        if self.world_size == 1:
            return list(range(len(lengths)))
        return split_for_ranks(lengths, self.world_size)[self.rank]

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The tensor summed over all ranks (in place; a no-op on one rank)."""
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def agree(self, flag: bool) -> bool:
        """Rank 0's flag, on every rank (a CPU-side collective: no GPU synchronisation)."""
        if not self.distributed:
            return flag
        value = torch.tensor([1 if flag and self.main else 0], dtype=torch.int32)
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self.control)
        return bool(value.item())

    def agree_any(self, flag: bool) -> bool:
        """True on every rank when the flag is true on any rank."""
        if not self.distributed:
            return flag
        value = torch.tensor([1 if flag else 0], dtype=torch.int32)
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self.control)
        return bool(value.item())

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier(group=self.control)


def visible_devices(device: torch.device) -> int:
    return torch.cuda.device_count() if device.type == "cuda" else 1


def world_size_for(requested: int | None, device: torch.device) -> int:
    """How many ranks a job runs with: `requested` (server.gpus_per_job; None = every visible GPU),
    at most the visible GPUs on CUDA; on a CPU, `requested` processes (default 1)."""
    if device.type == "cuda":
        available = visible_devices(device)
        if requested is not None and requested > available:
            raise ValueError(
                f"server.gpus_per_job is {requested} but this host shows {available} GPU(s): lower gpus_per_job"
            )
        return max(1, requested or available)
    return max(1, requested or 1)


def choose_strategy(requested: str, lora: bool, trainable_parameters: int, device: torch.device) -> str:
    """ "ddp" or "fsdp" for a multi-rank job (see the module docstring)."""
    if requested not in STRATEGIES:
        raise ValueError(f"parallelism must be one of {', '.join(STRATEGIES)}, got {requested!r}")
    if requested != "auto":
        if requested == "fsdp" and lora:
            raise ValueError("parallelism 'fsdp' is for full fine-tunes; a LoRA job runs data parallel")
        return requested
    if lora or device.type != "cuda":
        return "ddp"
    memory = torch.cuda.get_device_properties(device).total_memory
    return "fsdp" if 16 * trainable_parameters > FSDP_ABOVE_FRACTION * memory else "ddp"


# -- wrapping the loss module ----------------------------------------------------------------------


def wrap(module: torch.nn.Module, model: Any, ranks: Ranks, device: torch.device) -> torch.nn.Module:
    """The module every forward goes through: itself on one rank, DDP or FSDP2 over the ranks."""
    if ranks.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        # The model's buffers (rotary frequencies) never change: no broadcast before each forward.
        keyword = (
            "forward_sync_buffers"
            if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
            else "broadcast_buffers"
        )
        options: dict[str, Any] = {keyword: False}
        return DistributedDataParallel(module, device_ids=ids, **options)
    if ranks.strategy == "fsdp":
        try:
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        except ImportError:  # torch < 2.6
            from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy()
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        layer_names = set(getattr(model, "_no_split_modules", None) or [])
        for sub in model.modules():
            if type(sub).__name__ in layer_names:
                fully_shard(sub, mp_policy=policy)
        fully_shard(module, mp_policy=policy)
        return module
    return module


def full_model_state(module: torch.nn.Module, ranks: Ranks, prefix: str = "model.") -> dict[str, Any] | None:
    """Under FSDP, the whole model's weights gathered on rank 0 (None elsewhere), with `prefix` (the
    loss module's attribute) taken off the names; every rank must call it. None when not sharded."""
    if ranks.strategy != "fsdp":
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not ranks.main:
        return None
    return {name.removeprefix(prefix): tensor for name, tensor in state.items()}


def optimizer_state(
    module: torch.nn.Module, optimizer: torch.optim.Optimizer, ranks: Ranks
) -> dict[str, Any]:
    """The optimizer state to save: as is, or under FSDP gathered whole (by parameter name)."""
    if ranks.strategy != "fsdp":
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return {"by_name": get_optimizer_state_dict(module, optimizer, options=options)}


def load_optimizer_state(
    module: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any], ranks: Ranks
) -> None:
    if "by_name" not in state:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(
        module, optimizer, optim_state_dict=state["by_name"], options=StateDictOptions(full_state_dict=True)
    )


# -- starting the ranks ----------------------------------------------------------------------------


def spec_to_json(spec: TrainingSpec) -> str:
    values = asdict(spec)
    return json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in values.items()})


def spec_from_json(text: str) -> TrainingSpec:
    from tuneline.server.hyperparameters import Hyperparameters
    from tuneline.server.training_spec import TrainingSpec

    values = json.loads(text)
    values["hyperparameters"] = Hyperparameters(**values["hyperparameters"])
    for key in ("base_model_dir", "train_file", "validation_file", "output_dir", "resume_from"):
        if values.get(key) is not None:
            values[key] = Path(values[key])
    return TrainingSpec(**values)


def _join(rank: int, world_size: int, store: Any, device: torch.device) -> Ranks:
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=TIMEOUT)
    control = dist.new_group(backend="gloo", timeout=TIMEOUT) if backend != "gloo" else None
    return Ranks(world_size=world_size, rank=rank, control=control)


def rank_device(rank: int, device: torch.device) -> torch.device:
    if device.type != "cuda":
        return device
    torch.cuda.set_device(rank)
    return torch.device("cuda", rank)


def run_ranks(
    spec: TrainingSpec,
    reporter: TrainingReporter,
    world_size: int,
    device: torch.device,
    body: Callable[[TrainingSpec, TrainingReporter, torch.device, Ranks], TrainingOutcome],
) -> TrainingOutcome:
    """Run `body` as rank 0 of `world_size` ranks, the others in child processes (see the module
    docstring); returns rank 0's outcome once every rank has ended."""
    store = dist.TCPStore("127.0.0.1", 0, world_size, is_master=True, timeout=TIMEOUT, wait_for_workers=False)
    with tempfile.NamedTemporaryFile("w", suffix=".json", prefix="tuneline-spec-", delete=False) as handle:
        handle.write(spec_to_json(spec))
        spec_path = handle.name
    children: list[subprocess.Popen[bytes]] = []
    done = threading.Event()
    try:
        for rank in range(1, world_size):
            command = [
                sys.executable, "-m", "tuneline.server.distributed",
                "--body", f"{body.__module__}:{body.__qualname__}", "--spec", spec_path, "--rank", str(rank), "--world-size", str(world_size),
                "--port", str(store.port), "--parent", str(os.getpid()), "--device", device.type,
            ]  # fmt: skip
            children.append(subprocess.Popen(command, stdin=subprocess.DEVNULL))
        watchdog = threading.Thread(target=_watch, args=(children, done), daemon=True, name="tuneline-ranks")
        watchdog.start()
        ranks = _join(0, world_size, store, device)
        ranks.children = children
        try:
            outcome = body(spec, reporter, rank_device(0, device), ranks)
        finally:
            with contextlib.suppress(Exception):
                dist.destroy_process_group()
        for child in children:
            code = child.wait()
            if code != 0:
                raise RuntimeError(f"a training rank exited with code {code}; its error is in the job's log")
        return outcome
    finally:
        done.set()
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
        Path(spec_path).unlink(missing_ok=True)


def _watch(children: list[subprocess.Popen[bytes]], done: threading.Event) -> None:
    """Ends the job's process when a rank fails and rank 0 has not ended on its own within a minute
    (a collective waiting on a dead peer under NCCL only times out after TIMEOUT)."""
    while not done.wait(1.0):
        for child in children:
            code = child.poll()
            if code not in (None, 0):
                if done.wait(60):
                    return
                print(f"tuneline: training rank (pid {child.pid}) exited with code {code}", file=sys.stderr)
                sys.stderr.flush()
                os._exit(1)
        if all(child.poll() == 0 for child in children):
            return


class _FollowerReporter:
    """Ranks above 0 report nothing: rank 0 reports for the job."""

    def message(self, text: str, level: str = "info") -> None:
        pass

    def metrics(self, step: int, total_steps: int, data: dict[str, float]) -> None:
        pass

    def checkpoint(self, step: int, model_dir: Path, metrics: dict[str, float]) -> None:
        pass

    def should_stop(self) -> bool:
        return False


def _die_with_parent(parent_pid: int) -> None:
    with contextlib.suppress(OSError, AttributeError):
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent_pid:
        sys.exit(3)


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="one rank of a multi-device tuneline training job")
    # The function each rank runs, as module:name (run_ranks' `body`: the trainer's rank loop), looked
    # up here rather than imported, so this module does not depend on the trainer that calls it.
    parser.add_argument("--body", required=True)
    parser.add_argument("--spec", required=True, type=Path)
    parser.add_argument("--rank", required=True, type=int)
    parser.add_argument("--world-size", required=True, type=int)
    parser.add_argument("--port", required=True, type=int)
    parser.add_argument("--parent", required=True, type=int)
    parser.add_argument("--device", choices=("cpu", "cuda"), required=True)
    args = parser.parse_args(argv)
    _die_with_parent(args.parent)
    module, _, name = args.body.partition(":")
    run_rank = getattr(importlib.import_module(module), name)
    spec = spec_from_json(args.spec.read_text(encoding="utf-8"))
    device = torch.device(args.device)
    store = dist.TCPStore("127.0.0.1", args.port, args.world_size, is_master=False, timeout=TIMEOUT)
    ranks = _join(args.rank, args.world_size, store, device)
    try:
        run_rank(spec, _FollowerReporter(), rank_device(args.rank, device), ranks)
    finally:
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
