"""Latency of `tuneline serve` under client load while a job trains.

10 concurrent clients (the `openai` SDK, one per thread) call jobs.retrieve and jobs.list in a loop
for a fixed time, twice on the same server: first while it is idle (the baseline), then while a
fine-tuning job trains in its worker process. Prints p50/p99 per call and the ratio of the two runs:
how much a training job slows the API down.

    .venv/bin/python benchmarks/server_load.py [--clients 10] [--duration 20] [--examples 200]
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from openai import OpenAI

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tuneline.server.launcher import start_server


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def training_file(n: int) -> bytes:
    topics = ["refund", "password", "shipping", "invoice", "login", "delivery", "warranty", "account"]
    lines = []
    for i in range(n):
        topic = topics[i % len(topics)]
        example = {
            "messages": [
                {"role": "system", "content": "You are the support assistant."},
                {"role": "user", "content": f"Ticket {i}: I need help with my {topic}, please."},
                {"role": "assistant", "content": f"Category: {topic}. We are on it (ticket {i})."},
            ]
        }
        lines.append(json.dumps(example))
    return ("\n".join(lines) + "\n").encode()


def load(base_url: str, api_key: str, job_id: str, clients: int, duration_s: float) -> dict[str, list[float]]:
    """Run `clients` threads for `duration_s`; latencies in ms per call kind."""
    results: dict[str, list[float]] = {"retrieve": [], "list": []}
    lock = threading.Lock()
    stop_at = time.monotonic() + duration_s
    errors: list[BaseException] = []

    def client_loop() -> None:
        client = OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=30)
        mine: dict[str, list[float]] = {"retrieve": [], "list": []}
        try:
            while time.monotonic() < stop_at:
                started = time.perf_counter()
                client.fine_tuning.jobs.retrieve(job_id)
                mine["retrieve"].append((time.perf_counter() - started) * 1000)
                started = time.perf_counter()
                client.fine_tuning.jobs.list(limit=20)
                mine["list"].append((time.perf_counter() - started) * 1000)
        except BaseException as exc:  # reported after the run
            errors.append(exc)
        finally:
            client.close()
        with lock:
            for kind, values in mine.items():
                results[kind].extend(values)

    threads = [threading.Thread(target=client_loop) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise RuntimeError(f"{len(errors)} client(s) failed; first: {errors[0]!r}")
    return results


def summary(results: dict[str, list[float]], duration_s: float) -> dict[str, dict[str, float]]:
    return {
        kind: {
            "n": len(values),
            "p50": statistics.median(values),
            "p99": percentile(values, 99),
            "per_s": len(values) / duration_s,
        }
        for kind, values in results.items()
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per run")
    parser.add_argument(
        "--examples", type=int, default=200, help="training examples (enough to outlast the run)"
    )
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--model", default="tuneline-tiny")
    args = parser.parse_args()

    with (
        tempfile.TemporaryDirectory(prefix="tuneline-load-") as state,
        start_server(state, api_key="bench") as server,
    ):
        client = OpenAI(base_url=server.base_url, api_key=server.api_key, max_retries=0, timeout=60)
        file_id = client.files.create(
            file=("train.jsonl", io.BytesIO(training_file(args.examples))), purpose="fine-tune"
        ).id
        # Some jobs to list, finished ones (a file that fails validation fails fast).
        bad = client.files.create(
            file=("bad.jsonl", io.BytesIO(b'{"messages": []}\n')), purpose="fine-tune"
        ).id
        for _ in range(20):
            client.fine_tuning.jobs.create(model=args.model, training_file=bad)
        probe = client.fine_tuning.jobs.create(model=args.model, training_file=bad).id

        idle = summary(
            load(server.base_url, server.api_key, probe, args.clients, args.duration), args.duration
        )

        job = client.fine_tuning.jobs.create(
            model=args.model,
            training_file=file_id,
            hyperparameters={"n_epochs": args.epochs, "batch_size": 1},
        )
        deadline = time.monotonic() + 600
        while not any(e.type == "metrics" for e in client.fine_tuning.jobs.list_events(job.id, limit=5)):
            status = client.fine_tuning.jobs.retrieve(job.id).status
            if status in ("failed", "cancelled", "succeeded") or time.monotonic() > deadline:
                print(f"the job never reached a training step (status {status})", file=sys.stderr)
                return 1
            time.sleep(0.5)
        steps_before = _last_step(client, job.id)
        busy = summary(
            load(server.base_url, server.api_key, job.id, args.clients, args.duration), args.duration
        )
        after = client.fine_tuning.jobs.retrieve(job.id)
        steps_after = _last_step(client, job.id)
        if after.status in ("running", "queued"):
            client.fine_tuning.jobs.cancel(job.id)

    print(f"server_load: {args.clients} clients x {args.duration:.0f} s per run, model {args.model}")
    print(f"{'call':<10}{'run':<16}{'n':>7}{'p50 ms':>10}{'p99 ms':>10}{'calls/s':>10}")
    for kind in ("retrieve", "list"):
        for name, run in (("idle", idle), ("while training", busy)):
            row = run[kind]
            print(
                f"{kind:<10}{name:<16}{row['n']:>7}{row['p50']:>10.1f}{row['p99']:>10.1f}{row['per_s']:>10.1f}"
            )
        print(
            f"{kind:<10}{'ratio busy/idle':<16}{'':>7}{busy[kind]['p50'] / idle[kind]['p50']:>10.2f}"
            f"{busy[kind]['p99'] / idle[kind]['p99']:>10.2f}"
        )
    print(
        f"training advanced from step {steps_before} to {steps_after} during the loaded run (job {after.status})"
    )
    return 0


def _last_step(client: OpenAI, job_id: str) -> int:
    for event in client.fine_tuning.jobs.list_events(job_id, limit=20):
        data = event.data if isinstance(event.data, dict) else {}
        if event.type == "metrics" and "step" in data:
            return int(data["step"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
