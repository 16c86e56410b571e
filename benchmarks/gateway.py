"""The gateway's added latency: p50/p99 through `tuneline gateway` minus calling the upstream directly.

Three processes on this machine: an OpenAI-compatible upstream that answers a canned completion after
`--upstream-latency-ms` (tuneline/gateway/echo.py: what is measured is the gateway, not a model), the
real `tuneline gateway` CLI with tracing on (a SQLite MLflow store in a temp dir; the registry holds
one version, `champion`, pointing at the upstream), and this script, which runs `--clients` concurrent
clients (aiohttp, closed loop: each sends its next request when the last one is answered). Rounds
alternate direct and through-the-gateway runs of `--requests` requests each, so that both see the same
machine; the figures pool the rounds. Printed: p50/p99 per path, the added latency (gateway minus
direct) and the ratio, the gateway's request rate, and what the trace exporter did (exported, dropped).

    .venv/bin/python benchmarks/gateway.py [--clients 50] [--requests 2000] [--rounds 3]
        [--upstream-latency-ms 50]

On a shared machine the added latency under a closed loop is also queueing: with N clients, each
millisecond of CPU the gateway spends per request can cost up to N milliseconds of waiting once the CPU
is saturated; `--upstream-latency-ms 0` shows that throughput-bound case.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODEL = "bench-assistant"
MODEL_ID = "ft:bench:tuneline:support:0001"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def wait_http(url: str, process: subprocess.Popen[bytes], timeout_s: float = 60.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args} exited with {process.returncode}")
        try:
            httpx.get(url, timeout=1.0)
            return
        except httpx.TransportError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer in {timeout_s}s")


def register(config: dict[str, Any], upstream_url: str) -> None:
    from tuneline import tracking
    from tuneline.config import parse_config

    tracking_config = parse_config(config).tracking
    run = tracking.RunLog.start(tracking_config, flow="benchmark", name="gateway")
    record = tracking.register_external_model(
        tracking_config,
        run.run_id,
        MODEL_ID,
        params={"model_id": MODEL_ID},
        tags={"tuneline.provider_kind": "compatible", "tuneline.base_url": upstream_url},
        metrics={},
    )
    tracking.set_alias(tracking_config, "champion", record.version)
    run.finish()


async def load(url: str, model: str, clients: int, requests: int) -> tuple[list[float], float, int]:
    """Latencies (ms) of `requests` chat completions from `clients` closed-loop clients; wall seconds;
    failures."""
    latencies: list[float] = []
    failures = 0
    sent = 0
    connector = aiohttp.TCPConnector(limit=clients, force_close=False)
    headers = {"authorization": "Bearer bench", "content-type": "application/json"}

    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:

        async def client(index: int) -> None:
            nonlocal sent, failures
            while sent < requests:
                sent += 1
                body = json.dumps(
                    {
                        "model": model,
                        "messages": [{"role": "user", "content": f"Where is my parcel? (ticket {sent})"}],
                        "user": f"user-{index}",
                        "max_tokens": 64,
                    }
                ).encode()
                started = time.perf_counter()
                async with session.post(url, data=body) as response:
                    await response.read()
                    if response.status != 200:
                        failures += 1
                latencies.append((time.perf_counter() - started) * 1000)

        # Warm the connections first (not counted).
        warm = [
            asyncio.create_task(
                session.post(
                    url,
                    data=json.dumps(
                        {"model": model, "messages": [{"role": "user", "content": "warm"}]}
                    ).encode(),
                )
            )
            for _ in range(clients)
        ]
        for task in warm:
            (await task).release()
        started = time.perf_counter()
        await asyncio.gather(*(client(i) for i in range(clients)))
        wall = time.perf_counter() - started
    return latencies, wall, failures


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--requests", type=int, default=2000, help="Requests per run (per path and round).")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--upstream-latency-ms", type=float, default=50.0)
    parser.add_argument("--no-tracing", action="store_true", help="Measure with tracing off.")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="tuneline-gateway-bench-") as tmp:
        root = Path(tmp)
        upstream_port, gateway_port = free_port(), free_port()
        config = {
            "data": {"sources": [{"name": "s", "uri": str(root / "raw")}]},
            "tracking": {
                "tracking_uri": f"sqlite:///{root / 'mlflow.db'}",
                "artifact_location": str(root / "mlartifacts"),
                "experiment": "bench",
                "registered_model": MODEL,
            },
            "serving": {
                "port": gateway_port,
                "tracing": not args.no_tracing,
                "feedback_spool": str(root / "spool"),
                "trace_queue_size": 100_000,
            },
        }
        config_path = root / "config.yaml"
        config_path.write_text(yaml.safe_dump(config))
        env = {**os.environ, "TUNELINE_API_KEY": "bench", "TUNELINE_PROJECT": str(root)}
        upstream = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tuneline.gateway.echo",
                "--port",
                str(upstream_port),
                "--latency-ms",
                str(args.upstream_latency_ms),
            ],
            env=env,
        )
        gateway: subprocess.Popen[bytes] | None = None
        try:
            upstream_url = f"http://127.0.0.1:{upstream_port}/v1"
            wait_http(f"{upstream_url}/models", upstream)
            register(config, upstream_url)
            tuneline = Path(sys.executable).with_name("tuneline")
            gateway = subprocess.Popen(
                [str(tuneline), "gateway", "--config", str(config_path)], env=env, stderr=subprocess.DEVNULL
            )
            gateway_url = f"http://127.0.0.1:{gateway_port}"
            wait_http(f"{gateway_url}/health", gateway)

            gateway_process = psutil.Process(gateway.pid)
            upstream_process = psutil.Process(upstream.pid)
            cpu = {"gateway": 0.0, "upstream": 0.0, "exporter": 0.0}
            direct: list[float] = []
            through: list[float] = []
            walls = {"direct": 0.0, "gateway": 0.0}
            failures = {"direct": 0, "gateway": 0}
            for round_ in range(args.rounds):
                for path, url, model, into in (
                    ("direct", f"{upstream_url}/chat/completions", MODEL_ID, direct),
                    ("gateway", f"{gateway_url}/v1/chat/completions", MODEL, through),
                ):
                    before = cpu_seconds(gateway_process), cpu_seconds(upstream_process)
                    latencies, wall, failed = asyncio.run(load(url, model, args.clients, args.requests))
                    if path == "gateway":
                        cpu["gateway"] += cpu_seconds(gateway_process) - before[0]
                        cpu["upstream"] += cpu_seconds(upstream_process) - before[1]
                    into.extend(latencies)
                    walls[path] += wall
                    failures[path] += failed
                    print(
                        f"round {round_ + 1} {path:8s} p50 {percentile(latencies, 50):7.2f} ms  "
                        f"p99 {percentile(latencies, 99):7.2f} ms  {len(latencies) / wall:7.0f} req/s",
                        flush=True,
                    )
            import httpx

            deadline = time.monotonic() + 120
            stats: dict[str, Any] = {}
            while time.monotonic() < deadline:
                stats = httpx.get(
                    f"{gateway_url}/gateway/stats", headers={"authorization": "Bearer bench"}
                ).json()
                if not stats.get("trace_queue_depth"):
                    break
                time.sleep(0.5)
            cpu["exporter"] = sum(cpu_seconds(child) for child in gateway_process.children(recursive=True))
        finally:
            for process in (gateway, upstream):
                if process is not None:
                    process.terminate()
                    try:
                        process.wait(timeout=15)
                    except subprocess.TimeoutExpired:
                        process.kill()

    print()
    print(
        f"{args.clients} clients, {args.rounds} x {args.requests} requests per path, upstream latency "
        f"{args.upstream_latency_ms:g} ms, tracing {'off' if args.no_tracing else 'on'}, "
        f"{os.cpu_count()} CPUs"
    )
    print(f"{'':10s}{'p50 ms':>10s}{'p99 ms':>10s}{'req/s':>10s}{'failed':>8s}")
    for name, values in (("direct", direct), ("gateway", through)):
        print(
            f"{name:10s}{percentile(values, 50):10.2f}{percentile(values, 99):10.2f}"
            f"{len(values) / walls[name]:10.0f}{failures[name]:8d}"
        )
    p50 = percentile(through, 50) - percentile(direct, 50)
    p99 = percentile(through, 99) - percentile(direct, 99)
    print(
        f"added     {p50:+10.2f}{p99:+10.2f}   (ratio p50 {percentile(through, 50) / percentile(direct, 50):.3f}, "
        f"p99 {percentile(through, 99) / percentile(direct, 99):.3f})"
    )
    traces = stats.get("traces") or {}
    if traces:
        print(
            f"traces: {traces.get('exported')} exported, {traces.get('dropped_queue_full')} dropped (queue "
            f"full), {traces.get('failed_export')} failed exports, {stats.get('trace_queue_depth')} still queued"
        )
    served = len(through)
    print(
        f"CPU per request through the gateway: gateway process {cpu['gateway'] / served * 1000:.2f} ms, "
        f"upstream {cpu['upstream'] / served * 1000:.2f} ms; trace exporter process "
        f"{cpu['exporter'] / max(1, served) * 1000:.2f} ms per trace (off the gateway's interpreter)"
    )
    print(f"load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"target p50 added < 5 ms: {'met' if p50 < 5 else 'NOT met'}")


if __name__ == "__main__":
    main()
