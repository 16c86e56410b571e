"""What one `tuneline serve` process runs with: the config's `server:` section plus command-line options."""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tuneline.server.catalog import CatalogEntry

ORGANIZATION = "tuneline"  # the {org} slot of `ft:{base}:{org}:{suffix}:{id}` and `owned_by` of fine-tunes
API_KEY_ENV = "TUNELINE_API_KEY"


@dataclass(frozen=True)
class ServerSettings:
    state_dir: Path
    host: str = "127.0.0.1"
    port: int = 8000
    model_dirs: tuple[Path, ...] = ()
    # The catalog (server.models and --model), each entry resolved to its directory before start.
    models: tuple[CatalogEntry, ...] = ()
    # None: no key configured. Only allowed on a loopback address, where any key is accepted.
    api_key: str | None = None
    fault_rate: float = 0.0
    fault_seed: int | None = None
    fault_retry_after_s: float = 0.25
    latency_ms: float = 0.0
    concurrent_jobs: int = 1
    max_upload_bytes: int = 512 * 1024 * 1024
    # One line of a training file, in bytes: longer lines fail the job's validation unread.
    max_example_bytes: int = 1 << 20
    # A JSON request body, in bytes: a longer one is refused (413) before it is read whole.
    max_request_bytes: int = 8 << 20
    # Web origins (`https://app.example`) whose pages may call this server; requests carrying any
    # other Origin header are refused.
    allowed_origins: tuple[str, ...] = ()
    lora_above_params: int = 300_000_000
    # GPUs one training job uses on this host (data parallel or sharded, tuneline/server/distributed.py);
    # None = every visible GPU. Ignored on a CPU.
    gpus_per_job: int | None = None
    # The hosted service refuses training files with fewer than 10 examples.
    min_training_examples: int = 10
    # Loaded chat models kept in memory (base, fine-tuned and checkpoints), least recently used evicted.
    model_cache_size: int = 4
    # A job interrupted by server restarts this many times fails instead of being resumed again.
    max_job_attempts: int = 3
    # Threads for streamed answers, answers watched for stop strings, and model loading. A model's
    # concurrent requests are decoded as one batch by its own worker (tuneline/server/modeling.py
    # BatchedDecoder); a plain answer is awaited without a thread of its own.
    generation_threads: int = 16
    # Load the built-in model in the background at start (when it is already built).
    warm_up: bool = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.fault_rate <= 1.0:
            raise ValueError(f"fault rate must be between 0 and 1, got {self.fault_rate}")
        if self.latency_ms < 0:
            raise ValueError(f"latency must be >= 0 ms, got {self.latency_ms}")
        if self.concurrent_jobs < 1:
            raise ValueError(f"concurrent jobs must be >= 1, got {self.concurrent_jobs}")
        if self.gpus_per_job is not None and self.gpus_per_job < 1:
            raise ValueError(
                f"server.gpus_per_job must be >= 1 (or unset: every visible GPU), got {self.gpus_per_job}"
            )


def is_loopback(host: str) -> bool:
    """True when `host` only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return all(
                ipaddress.ip_address(info[4][0]).is_loopback for info in socket.getaddrinfo(host, None)
            )
        except OSError:
            return False


def startup_problem(settings: ServerSettings) -> str | None:
    """Why the server must not start with these settings (one line), or None."""
    if settings.api_key is None and not is_loopback(settings.host):
        return (
            f"refusing to listen on {settings.host} without an API key: set {API_KEY_ENV} "
            "(or bind 127.0.0.1), otherwise anyone on the network could train and delete models"
        )
    if settings.api_key is not None and not settings.api_key.strip():
        return f"{API_KEY_ENV} is set but empty: set it to a secret value or unset it (loopback only)"
    return None
