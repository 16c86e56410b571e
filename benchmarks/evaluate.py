"""Evaluation client throughput: N chat completions against `tuneline serve --latency MS` at concurrency C.

The baseline is the ideal time of a perfectly concurrent client, N x latency / C (the latency is the
server's injected delay per chat completion, awaited asynchronously, so C requests really overlap).
Target: ratio = measured / ideal <= 1.25 for N=500, latency 200 ms, C=16.

The requests go through the evaluate stage's own path (tasks/evaluate.py `ask_all`: bounded thread
pool, per-request retries, a provider from tuneline/provider.py) to the built-in model. Every request is
distinct (the eval questions, numbered), since `ask_all` sends identical requests only once. The
canary questions (short prompts) and `--max-tokens` keep the model's own work small, so that the
figure measures the client's concurrency rather than the CPU speed of the model; the time per request
(injected latency included) is printed beside it. On a CPU-starved machine the server's generation
itself becomes the bottleneck: compare with `--latency-ms 0`, which prints the generation-only time.

The timed pass runs `--repeat` times (default 3) on the same server; the ratio judged is their median,
each pass is printed. On a virtual machine the share of CPU time the host gave to other guests
during the passes (steal, from /proc/stat) is printed too: it slows every pass it falls on.

    .venv/bin/python benchmarks/evaluate.py [--requests 500] [--concurrency 16] [--latency-ms 200]
"""

from __future__ import annotations

import argparse
import os
import resource
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tuneline.config import load_config
from tuneline.provider import connect
from tuneline.server.launcher import start_server
from tuneline.tasks.eval_requests import Answer, ChatRequest, ask_all
from tuneline.tasks.evaluate import load_eval_set


def requests_for(n: int, model: str, eval_set: str) -> list[ChatRequest]:
    items = load_eval_set("canary", eval_set).items
    requests = []
    for number in range(n):
        item = items[number % len(items)]
        *context, last = item.messages
        numbered = {**last, "content": f"{last['content']} (ticket {number})"}
        requests.append(ChatRequest(model, (*context, numbered)))
    return requests


def cpu_steal() -> tuple[float, float] | None:
    """(steal, all) CPU time in ticks since boot, from /proc/stat (Linux); None where it is not there."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except (OSError, IndexError):
        return None
    ticks = [float(field) for field in fields[:8]]  # user nice system idle iowait irq softirq steal
    return (ticks[7], sum(ticks)) if len(ticks) == 8 else None


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--latency-ms", type=float, default=200.0)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument(
        "--eval-set",
        default=None,
        help="JSONL of eval questions (default: the config's canary set, short prompts)",
    )
    parser.add_argument("--target", type=float, default=1.25)
    parser.add_argument(
        "--builtin-cache",
        default=None,
        help="an already built tuneline-tiny directory (skips the ~20 s build)",
    )
    parser.add_argument("--repeat", type=int, default=3, help="timed passes with latency (median judged)")
    args = parser.parse_args()

    def timed_runs(latency_ms: float, passes: int) -> list[tuple[float, float, list[Answer]]]:
        """(wall seconds, client CPU seconds, answers) of each timed pass, on one fresh server."""
        key = secrets.token_urlsafe(16)
        runs = []
        with tempfile.TemporaryDirectory(prefix="tuneline-bench-") as state:
            if args.builtin_cache:
                shutil.copytree(args.builtin_cache, Path(state) / "models" / Path(args.builtin_cache).name)
            with start_server(Path(state), api_key=key, latency_ms=latency_ms) as server:
                config = load_config(
                    None,
                    overrides={
                        "provider.kind": "compatible",
                        "provider.base_url": server.base_url,
                        "evaluation.concurrency": args.concurrency,
                        "evaluation.max_tokens": args.max_tokens,
                    },
                )
                requests = requests_for(
                    args.requests, config.model.base, args.eval_set or config.data.canary_set
                )
                with connect(config, api_key=key) as provider:
                    ask_all(provider, requests[:1], config.evaluation)  # loads the model: not timed
                    for _ in range(passes):
                        cpu_before = resource.getrusage(resource.RUSAGE_SELF)
                        started = time.perf_counter()
                        answers = ask_all(provider, requests, config.evaluation)
                        elapsed = time.perf_counter() - started
                        cpu_after = resource.getrusage(resource.RUSAGE_SELF)
                        cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (
                            cpu_after.ru_stime - cpu_before.ru_stime
                        )
                        runs.append((elapsed, cpu, answers))
        return runs

    # Baseline 1, computed: the ideal time. Baseline 2, measured: the same requests without injected
    # latency, i.e. what the server's generation alone costs on this machine at this concurrency.
    [(generation_only, _, _)] = timed_runs(0.0, 1)
    steal_before = cpu_steal()
    runs = timed_runs(args.latency_ms, max(1, args.repeat))
    steal_after = cpu_steal()
    elapsed, client_cpu, answers = sorted(runs, key=lambda run: run[0])[len(runs) // 2]  # the median
    unanswered = max(sum(a.error is not None for a in answers) for _, _, answers in runs)
    per_request = sorted(a.latency_s for a in answers)

    ideal = args.requests * args.latency_ms / 1000 / args.concurrency
    ratio = elapsed / ideal
    floor = max(ideal, generation_only)
    print(
        f"{args.requests} requests, concurrency {args.concurrency}, server latency {args.latency_ms:g} ms, "
        f"max_tokens {args.max_tokens}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}"
    )
    if steal_before and steal_after:
        stolen = (steal_after[0] - steal_before[0]) / max(1.0, steal_after[1] - steal_before[1])
        print(f"host CPU steal during the timed passes: {stolen:.1%} of CPU time")
    print(
        f"timed passes: {', '.join(f'{run[0]:.2f} s' for run in runs)}; "
        f"ratios {', '.join(f'{run[0] / ideal:.3f}' for run in runs)}"
    )
    print(f"median pass {elapsed:.2f} s; {unanswered} unanswered; client CPU {client_cpu:.2f} s")
    print(
        f"baseline: ideal {ideal:.2f} s (N x latency / C); generation alone (latency 0) {generation_only:.2f} s"
    )
    print(
        f"per request: median {statistics.median(per_request) * 1000:.0f} ms, "
        f"p99 {per_request[int(0.99 * (len(per_request) - 1))] * 1000:.0f} ms "
        f"(of which {args.latency_ms:g} ms injected)"
    )
    print(
        f"ratio median pass/ideal = {ratio:.3f} (target <= {args.target:g}): "
        f"{'MET' if ratio <= args.target else 'MISSED'}"
    )
    print(f"ratio measured/max(ideal, generation alone) = {elapsed / floor:.3f}")
    return 0 if ratio <= args.target and not unanswered else 1


if __name__ == "__main__":
    raise SystemExit(main())
