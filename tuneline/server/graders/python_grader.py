"""`python`: the grader's `source` defines `grade(sample, item) -> float`, run in a child process so a
failing, hanging or memory-hungry grader fails its grade with a clear error and never holds the server.

What is enforced, per grade (one fresh `python -I` child; `GraderSettings.python_*` set the limits):
- time: the child is killed (with its whole process group) after `python_timeout_s` of wall time,
  interpreter start included; RLIMIT_CPU stops a child spinning past that on the CPU;
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
CLONE_NEWNET = 0x40000000
CLONE_NEWUSER = 0x10000000

# The child: read the job, limit itself, cut the network, run the grader, write the result to its fd.
RUNNER = r"""
import json, math, os, resource, sys
job = json.loads(sys.stdin.read())
result_fd = int(sys.argv[1])
def answer(body):
    with os.fdopen(result_fd, "w") as out:
        out.write(json.dumps(body))
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
isolation = isolate() if job["isolate"] else "python"
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
namespace = {"__name__": "grader"}
try:
    exec(compile(job["source"], "<grader>", "exec"), namespace)
    reward = namespace["grade"](job["sample"], job["item"])
except MemoryError:
    answer({"error": "the grader ran out of memory (limit %d MB)" % (memory >> 20)})
    sys.exit(0)
except BaseException:
    import traceback
    lines = [line for line in traceback.format_exc().strip().splitlines() if not line.startswith('  File "<string>"')]
    answer({"error": "\n".join(lines[-12:])})
    sys.exit(0)
if isinstance(reward, bool) or not isinstance(reward, (int, float)):
    answer({"error": "grade() returned %s, not a number" % type(reward).__name__})
elif not math.isfinite(reward):
    answer({"error": "grade() returned %r, not a finite number" % reward})
else:
    answer({"reward": float(reward)})
"""


def _child_env(home: str) -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8", "HOME": home}


def _run_child(job: dict[str, Any], timeout_s: float) -> tuple[dict[str, Any] | None, int | None, str, bool]:
    """Run RUNNER on `job`: (its answer or None, its exit status, the tail of its output, timed out)."""
    read_fd, write_fd = os.pipe()
    with tempfile.TemporaryDirectory(prefix="tuneline-grader-") as home:
        output_path = Path(home) / ".output"
        with open(output_path, "wb") as output:
            try:
                child = subprocess.Popen(
                    [sys.executable, "-I", "-c", RUNNER, str(write_fd)],
                    stdin=subprocess.PIPE,
                    stdout=output,
                    stderr=output,
                    cwd=home,
                    env=_child_env(home),
                    pass_fds=(write_fd,),
                    start_new_session=True,
                )
            finally:
                os.close(write_fd)
            timed_out = False
            try:
                assert child.stdin is not None
                try:
                    child.stdin.write(json.dumps(job).encode())
                    child.stdin.close()
                except BrokenPipeError:
                    pass
                child.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            # Whatever the grader left running in its process group goes with it.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(child.pid, signal.SIGKILL)
            child.wait()
        with os.fdopen(read_fd, "rb") as result:
            raw = result.read(OUTPUT_BYTES)
        tail = output_path.read_bytes()[-4000:].decode("utf-8", "replace").strip()
    try:
        answer = json.loads(raw) if raw else None
    except ValueError:
        answer = None
    return answer, child.returncode, tail, timed_out


@cache
def network_isolation() -> str:
    """How python graders are cut off from the network on this host: "namespace" (a new, empty network
    namespace) or "python" (the socket guard only)."""
    answer, _, _, _ = _run_child(_job({}, {}, "", GraderSettings(), probe=True), 30)
    return str(answer.get("isolation")) if answer else "python"


def _job(
    sample: Mapping[str, Any],
    item: Mapping[str, Any],
    source: str,
    settings: GraderSettings,
    probe: bool = False,
) -> dict[str, Any]:
    return {
        "source": source,
        "sample": dict(sample),
        "item": dict(item),
        "memory_bytes": int(settings.python_memory_mb) << 20,
        "cpu_s": max(1, math.ceil(settings.python_timeout_s)),
        "output_bytes": OUTPUT_BYTES,
        "isolate": True,
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
        where = f"{self.param}.source"
        try:
            answer, status, tail, timed_out = _run_child(
                _job(sample, item, self.source, self.settings), self.settings.python_timeout_s
            )
        except OSError as error:
            raise GraderError(
                f"The python grader could not be started: {error}", where, kind="python_grader_server_error"
            ) from None
        if timed_out:
            raise GraderError(
                f"The python grader did not finish within {self.settings.python_timeout_s:g} s and was stopped.",
                where,
                kind="python_grader_runtime_error",
            )
        if answer is not None and "reward" in answer:
            return Grade(float(answer["reward"]))
        if answer is not None and "error" in answer:
            detail = str(answer["error"])
        elif status is not None and status < 0:
            detail = _signal_detail(-status, self.settings)
        else:
            detail = f"the grader process exited with status {status} without a result"
        if tail:
            detail = f"{detail}\n{tail[-2000:]}"
        raise GraderError(f"The python grader failed: {detail}", where, kind="python_grader_runtime_error")

    def spec(self) -> dict[str, Any]:
        spec = {"type": self.type, "name": self.name, "source": self.source}
        if self.image_tag is not None:
            spec["image_tag"] = self.image_tag
        return spec


def _signal_detail(number: int, settings: GraderSettings) -> str:
    if number == signal.SIGXCPU:
        return f"it used more than {math.ceil(settings.python_timeout_s)} s of CPU time"
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
