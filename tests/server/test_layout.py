"""The server's module graph: no import cycle (function-level imports count too), and the modules that
neither load nor train a model never import torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import tuneline.server

SERVER = Path(tuneline.server.__file__).resolve().parent


def module_name(path: Path) -> str:
    parts = path.relative_to(SERVER.parent.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The tuneline.server modules a module imports, wherever the import statement is."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        else:
            continue
        found |= {name for name in names if name in known}
    return found


def test_the_server_modules_import_each_other_without_a_cycle() -> None:
    paths = {module_name(p): p for p in SERVER.rglob("*.py")}
    graph = {name: imports_of(path, set(paths)) - {name} for name, path in paths.items()}
    # A package's __init__ listing its own modules is not a cycle: the modules do not need it.
    for name in graph:
        graph[name] = {dep for dep in graph[name] if not (name.startswith(f"{dep}.") and dep in paths)}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(name: str) -> None:
        state[name] = 1
        stack.append(name)
        for dep in sorted(graph[name]):
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*stack[stack.index(dep) :], dep]))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)


def test_the_api_process_imports_no_model_code_until_a_model_is_loaded() -> None:
    probe = (
        "import sys\n"
        "import tuneline.server.app, tuneline.server.catalog, tuneline.server.launcher\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'peft'))\n"
        "print(heavy)\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
