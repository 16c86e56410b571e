"""The `calculate_output` formula of a `multi` grader: arithmetic over the sub-graders' names.

Grammar: numbers, names, `+ - * /` (and unary `+ -`), parentheses, and the functions `min`, `max`
(two or more arguments), `abs`, `sqrt`, `log`, `exp`, `floor`, `ceil` (one argument). The formula is
parsed once with Python's `ast` (mode "eval") and every node is checked against that grammar, so
nothing but this arithmetic is ever evaluated: no `eval()`, no attribute access, no calls but these.

Written by hand over `ast`: the grammar is a dozen lines; the expression libraries (numexpr, asteval,
simpleeval) bring either eval() underneath or a far larger language than the hosted API accepts.
"""

from __future__ import annotations

import ast
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

MAX_LENGTH = 1000

FUNCTIONS: dict[str, tuple[Callable[..., float], int | None]] = {
    "min": (min, None),
    "max": (max, None),
    "abs": (abs, 1),
    "sqrt": (math.sqrt, 1),
    "log": (math.log, 1),
    "exp": (math.exp, 1),
    "floor": (math.floor, 1),
    "ceil": (math.ceil, 1),
}
BINARY: dict[type[ast.operator], Callable[[float, float], float]] = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,
}


class FormulaError(ValueError):
    """A formula outside the grammar (when parsed) or that cannot be computed (when evaluated)."""


@dataclass(frozen=True)
class Formula:
    text: str
    tree: ast.expr
    names: frozenset[str]

    def __call__(self, values: Mapping[str, float]) -> float:
        try:
            result = float(_evaluate(self.tree, values))
        except (ZeroDivisionError, ValueError, OverflowError) as error:
            raise FormulaError(f"calculate_output {self.text!r} cannot be computed: {error}") from None
        if not math.isfinite(result):
            raise FormulaError(f"calculate_output {self.text!r} is not a finite number ({result})")
        return result


def parse(text: str, names: frozenset[str] | set[str]) -> Formula:
    """The formula `text`, checked against the grammar; every name must be in `names`."""
    if len(text) > MAX_LENGTH:
        raise FormulaError(f"the formula is longer than {MAX_LENGTH} characters")
    try:
        tree = ast.parse(text.strip(), mode="eval").body
    except SyntaxError as error:
        raise FormulaError(f"the formula is not valid: {error.msg}") from None
    used: set[str] = set()
    _check(tree, names, used)
    return Formula(text, tree, frozenset(used))


def _check(node: ast.AST, names: frozenset[str] | set[str], used: set[str]) -> None:
    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, int | float):
            raise FormulaError(f"{node.value!r} is not a number")
    elif isinstance(node, ast.Name):
        if node.id not in names:
            known = ", ".join(sorted(names)) or "none"
            raise FormulaError(f"{node.id!r} is not the name of one of its graders ({known})")
        used.add(node.id)
    elif isinstance(node, ast.BinOp):
        if type(node.op) not in BINARY:
            raise FormulaError(f"the operator {type(node.op).__name__} is not allowed (use + - * /)")
        _check(node.left, names, used)
        _check(node.right, names, used)
    elif isinstance(node, ast.UnaryOp):
        if not isinstance(node.op, ast.UAdd | ast.USub):
            raise FormulaError(f"the operator {type(node.op).__name__} is not allowed")
        _check(node.operand, names, used)
    elif isinstance(node, ast.Call):
        if not isinstance(node.func, ast.Name) or node.func.id not in FUNCTIONS or node.keywords:
            raise FormulaError(f"only the functions {', '.join(FUNCTIONS)} can be called")
        arity = FUNCTIONS[node.func.id][1]
        count = len(node.args)
        if (arity is None and count < 2) or (arity is not None and count != arity):
            wanted = "two or more arguments" if arity is None else "one argument"
            raise FormulaError(f"{node.func.id}() takes {wanted}, got {count}")
        for argument in node.args:
            if isinstance(argument, ast.Starred):
                raise FormulaError("starred arguments are not allowed")
            _check(argument, names, used)
    else:
        raise FormulaError(f"{type(node).__name__} expressions are not allowed")


def _evaluate(node: ast.AST, values: Mapping[str, float]) -> float:
    if isinstance(node, ast.Constant):
        assert isinstance(node.value, int | float)
        return float(node.value)
    if isinstance(node, ast.Name):
        return values[node.id]
    if isinstance(node, ast.BinOp):
        return BINARY[type(node.op)](_evaluate(node.left, values), _evaluate(node.right, values))
    if isinstance(node, ast.UnaryOp):
        operand = _evaluate(node.operand, values)
        return -operand if isinstance(node.op, ast.USub) else operand
    assert isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
    return float(FUNCTIONS[node.func.id][0](*(_evaluate(argument, values) for argument in node.args)))
