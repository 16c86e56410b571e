"""`python`: the grader's `source` defines `grade(sample, item) -> float`, run in a child process so a
failing, hanging or memory-hungry grader fails its grade with a clear error and never holds the server.

What is enforced (one fresh `python -I` child per grade, or per batch of `evaluate_many`;
`GraderSettings.python_*` set the limits):
- time: each grade (and the import of the source) is stopped by a timer after `python_timeout_s` of
  wall time; should the grader be stuck where the timer cannot interrupt it (one long C call), the
  child is killed, with its whole process group, 2 s past its budget; RLIMIT_CPU backs both, set at
  the same point (budget + 2 s of CPU), so a busy loop always meets the timer first (the child's own
  start-up uses CPU too) and the message says which limit stopped it the same way every time;
- memory: RLIMIT_AS caps the child's address space at `python_memory_mb` (a big allocation raises
  MemoryError, reported as such);
- network: the child first moves itself into a new, empty network namespace (`unshare(CLONE_NEWNET)`,
  or with CLONE_NEWUSER where only unprivileged user namespaces are allowed): there is no interface
  but a downed loopback, so no connection can be made, by any means. Where the kernel refuses both
  (some containers), only the Python-level guard remains: `socket.socket`, `socket.create_connection`,
  `socket.getaddrinfo` and `_socket.socket` raise before the grader runs — code reaching the C library
  directly (ctypes) gets past that guard. `network_isolation()` says which applies on this host;
- environment: the child gets only PATH, LANG and a HOME in its own temporary directory (its working
  directory, removed after): no proxy variables, no API keys, no PYTHON* settings (`-I`);
- output: what the grader prints goes to a file capped at 1 MB (RLIMIT_FSIZE, also capping any file
  it writes); the last lines of its stderr are the error details when it fails.
Not enforced: file-system reads (the child reads what the server's user may read), and child processes
that leave the process group. Run the server in a container for a hard sandbox.

`image_tag` (the hosted grader image) is accepted and shown back; the grader runs on this server's
Python, with the packages installed beside it.
"""

from __future__ import annotations

import ast
import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from tuneline.server.graders.base import (
    Grade,
    GraderError,
    GraderSettings,
    refuse_unknown,
    require_string,
)

MAX_SOURCE_BYTES = 256 * 1024
OUTPUT_BYTES = 1 << 20

# The child: read the job, cut the network, limit itself, run the grader on each pair, one JSON line per
# grade in the results file (0x40000000: CLONE_NEWNET, 0x10000000: CLONE_NEWUSER).
RUNNER = r"""
import json, math, os, resource, signal, sys
job = json.loads(sys.stdin.read())
results = open(job["results_path"], "w")
def answer(body):
    results.write(json.dumps(body) + "\n")
    results.flush()
def isolate():
    import ctypes
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        for flags in (0x40000000, 0x40000000 | 0x10000000):
            if libc.unshare(flags) == 0:
                return "namespace"
    except Exception:
        pass
    return "python"
isolation = isolate()
def blocked(*args, **kwargs):
    raise OSError("network access is disabled in python graders")
import socket, _socket
socket.socket = socket.SocketType = _socket.socket = blocked
socket.create_connection = socket.getaddrinfo = socket.socketpair = socket.fromfd = blocked
memory = job["memory_bytes"]
resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
resource.setrlimit(resource.RLIMIT_CPU, (job["cpu_s"], job["cpu_s"] + 1))
resource.setrlimit(resource.RLIMIT_FSIZE, (job["output_bytes"], job["output_bytes"]))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
if job["probe"]:
    answer({"isolation": isolation})
    sys.exit(0)
class OutOfTime(BaseException):
    pass
def out_of_time(*args):
    raise OutOfTime()
signal.signal(signal.SIGALRM, out_of_time)
limit = job["item_timeout_s"]
def timed(call, *args):
    signal.setitimer(signal.ITIMER_REAL, limit)
    try:
        return call(*args)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
def failure():
    kind = sys.exc_info()[0]
    if kind is OutOfTime:
        return {"error": "the grader did not finish within %g s and was stopped" % limit}
    if kind is MemoryError:
        return {"error": "the grader ran out of memory (limit %d MB)" % (memory >> 20)}
    import traceback
    lines = [line for line in traceback.format_exc().strip().splitlines() if not line.startswith('  File "<string>"')]
    return {"error": "\n".join(lines[-12:])}
namespace = {"__name__": "grader"}
try:
    timed(exec, compile(job["source"], "<grader>", "exec"), namespace)
except BaseException:
    broken = failure()
    for _ in job["pairs"]:
        answer(broken)
    sys.exit(0)
for sample, item in job["pairs"]:
    try:
        reward = timed(namespace["grade"], sample, item)
    except BaseException:
        answer(failure())
        continue
    if isinstance(reward, bool) or not isinstance(reward, (int, float)):
        answer({"error": "grade() returned %s, not a number" % type(reward).__name__})
    elif not math.isfinite(reward):
        answer({"error": "grade() returned %r, not a finite number" % reward})
    else:
        answer({"reward": float(reward)})
"""
# The parent's own guard, past the child's per-grade timer: for a grader stuck where the timer cannot
# interrupt it (inside one long C call), the whole process group is killed.
GRACE_S = 2.0


def _child_env(home: str) -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8", "HOME": home}


def _run_child(job: dict[str, Any], timeout_s: float) -> tuple[list[dict[str, Any]], int | None, str, bool]:
    """Run RUNNER on `job`: (its answers, one per pair so far, its exit status, the tail of its
    output, killed at the deadline)."""
    with tempfile.TemporaryDirectory(prefix="tuneline-grader-") as home:
        output_path = Path(home) / ".output"
        results_path = Path(home) / ".results"
        results_path.touch()
        job = {**job, "results_path": str(results_path)}
        with open(output_path, "wb") as output:
            child = subprocess.Popen(
                [sys.executable, "-I", "-c", RUNNER],
                stdin=subprocess.PIPE,
                stdout=output,
                stderr=output,
                cwd=home,
                env=_child_env(home),
                start_new_session=True,
            )
            timed_out = False
            try:
                assert child.stdin is not None
                with contextlib.suppress(BrokenPipeError):
                    child.stdin.write(json.dumps(job, default=str).encode())
                    child.stdin.close()
                child.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            # Whatever the grader left running in its process group goes with it.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(child.pid, signal.SIGKILL)
            child.wait()
        answers = []
        with open(results_path, "rb") as results:
            for line in results.read(OUTPUT_BYTES).splitlines():
                try:
                    answers.append(json.loads(line))
                except ValueError:
                    break
        tail = output_path.read_bytes()[-4000:].decode("utf-8", "replace").strip()
    return answers, child.returncode, tail, timed_out


@cache
def network_isolation() -> str:
    """How python graders are cut off from the network on this host: "namespace" (a new, empty network
    namespace) or "python" (the socket guard only)."""
    answers, _, _, _ = _run_child(_job([], "", GraderSettings(), probe=True), 30)
    return str(answers[0].get("isolation")) if answers else "python"


def _job(
    pairs: list[tuple[Mapping[str, Any], Mapping[str, Any]]],
    source: str,
    settings: GraderSettings,
    probe: bool = False,
) -> dict[str, Any]:
    budget = settings.python_timeout_s * max(1, len(pairs))
    return {
        "source": source,
        "pairs": [[dict(sample), dict(item)] for sample, item in pairs],
        "memory_bytes": int(settings.python_memory_mb) << 20,
        "item_timeout_s": float(settings.python_timeout_s),
        "cpu_s": max(1, math.ceil(budget + GRACE_S)),
        "output_bytes": OUTPUT_BYTES,
        "probe": probe,
    }


@dataclass
class PythonGrader:
    name: str
    source: str
    image_tag: str | None = None
    settings: GraderSettings = field(default_factory=GraderSettings)
    param: str = "grader"
    type: str = "python"

    def grade(self, sample: Mapping[str, Any], item: Mapping[str, Any]) -> float:
        return self.evaluate(sample, item).reward

    def evaluate(self, sample: Mapping[str, Any], item: Mapping[str, Any]) -> Grade:
        outcome = self.evaluate_many([(sample, item)])[0]
        if isinstance(outcome, GraderError):
            raise outcome
        return outcome

    def evaluate_many(
        self, pairs: list[tuple[Mapping[str, Any], Mapping[str, Any]]]
    ) -> list[Grade | GraderError]:
        """Grade many answers in one child process (one interpreter start for all; each grade still has
        its own time limit, and module-level state of the grader carries from one to the next)."""
        if not pairs:
            return []
        where = f"{self.param}.source"
        timeout = self.settings.python_timeout_s
        job = _job(pairs, self.source, self.settings)
        try:
            answers, status, tail, killed = _run_child(job, timeout * len(pairs) + GRACE_S)
        except OSError as error:
            failed = GraderError(
                f"The python grader could not be started: {error}", where, kind="python_grader_server_error"
            )
            return [failed] * len(pairs)
        outcomes: list[Grade | GraderError] = []
        for answer in answers[: len(pairs)]:
            if "reward" in answer:
                outcomes.append(Grade(float(answer["reward"])))
            else:
                detail = str(answer.get("error"))
                if detail.startswith("the grader did not finish"):
                    message = f"The python grader did not finish within {timeout:g} s and was stopped."
                else:
                    message = f"The python grader failed: {detail}"
                outcomes.append(GraderError(message, where, kind="python_grader_runtime_error"))
        if len(outcomes) < len(pairs):
            if killed:
                detail = f"it did not finish within {timeout:g} s and was stopped"
            elif status is not None and status < 0:
                detail = _signal_detail(-status, self.settings, job["cpu_s"])
            else:
                detail = f"the grader process exited with status {status} without a result"
            if tail:
                detail = f"{detail}\n{tail[-2000:]}"
            missing = GraderError(
                f"The python grader failed: {detail}", where, kind="python_grader_runtime_error"
            )
            outcomes.extend([missing] * (len(pairs) - len(outcomes)))
        return outcomes

    def spec(self) -> dict[str, Any]:
        spec = {"type": self.type, "name": self.name, "source": self.source}
        if self.image_tag is not None:
            spec["image_tag"] = self.image_tag
        return spec


def _signal_detail(number: int, settings: GraderSettings, cpu_s: int) -> str:
    if number == signal.SIGXCPU:
        return f"it used more than {cpu_s} s of CPU time"
    if number == signal.SIGXFSZ:
        return f"it wrote more than {OUTPUT_BYTES >> 20} MB of output"
    if number in (signal.SIGSEGV, signal.SIGABRT, signal.SIGBUS):
        return (
            f"it crashed ({signal.Signals(number).name}; the memory limit is {settings.python_memory_mb} MB)"
        )
    try:
        return f"it was killed by {signal.Signals(number).name}"
    except ValueError:
        return f"it was killed by signal {number}"


def parse(spec: Mapping[str, Any], param: str, settings: GraderSettings) -> PythonGrader:
    refuse_unknown(spec, param, ("type", "name", "source", "image_tag"))
    name = require_string(spec, "name", param)
    source = require_string(spec, "source", param)
    image_tag = require_string(spec, "image_tag", param, required=False)
    assert name is not None and source is not None
    where = f"{param}.source"
    if len(source.encode("utf-8", "replace")) > MAX_SOURCE_BYTES:
        raise GraderError(f"'{where}' is longer than {MAX_SOURCE_BYTES // 1024} KB.", where)
    try:
        tree = ast.parse(source, "<grader>")
    except SyntaxError as error:
        raise GraderError(
            f"Invalid python grader in '{where}': {error.msg} (line {error.lineno}).", where
        ) from None
    except (ValueError, RecursionError, MemoryError) as error:
        raise GraderError(f"Invalid python grader in '{where}': {type(error).__name__}.", where) from None
    defined = any(
        isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name == "grade"
        for node in tree.body
    )
    if not defined:
        raise GraderError(
            f"Invalid python grader in '{where}': it must define `def grade(sample, item) -> float` at the top level.",
            where,
        )
    return PythonGrader(name, source, image_tag, settings, param)
