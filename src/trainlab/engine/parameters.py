"""The keyword parameters that a config's `_target_` accepts, read from its source code.

The command-line check (trainlab.engine.config) asks for them so that a config need not repeat a
constructor's defaults: `data.per_device=true` is valid because the data module's __init__ takes
`per_device`, though no YAML file writes it. The source is parsed, never imported: importing
would cost seconds (torch) on every command line, and would run the module's code.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SIMPLE = ("bool", "int", "float", "str")
NO_DEFAULT = object()  # a parameter without a default, or with one that is not a literal


@dataclass(frozen=True)
class Parameter:
    name: str
    kind: str | None  # bool, int, float or str where the annotation (or default) says so
    nullable: bool  # None is a valid value
    written: str  # as the source writes it, e.g. "per_device: bool = False"
    default: Any = NO_DEFAULT  # where the source writes it as a literal


@functools.cache
def parameters(target: str) -> dict[str, Parameter] | None:
    """What `target` (the dotted path of a class or function) takes by keyword: for a class, the
    parameters of its __init__, and of its bases' where that passes on *args or **kwargs. None
    when its source cannot be found or read."""
    return _parameters(target, depth=0)


def _parameters(target: str, depth: int) -> dict[str, Parameter] | None:
    found = _definition(target, depth)
    if found is None:
        return None
    node, module = found
    if isinstance(node, ast.FunctionDef):
        return _function_parameters(node, method=False)[0]
    init = next(
        (s for s in node.body if isinstance(s, ast.FunctionDef) and s.name == "__init__"), None
    )
    own, passes_on = ({}, True) if init is None else _function_parameters(init, method=True)
    if passes_on and depth < 10:  # e.g. super().__init__(**kwargs): the bases' parameters too
        for base in node.bases:
            base_path = _dotted(base, module)
            inherited = _parameters(base_path, depth + 1) if base_path else None
            for name, parameter in (inherited or {}).items():
                own.setdefault(name, parameter)
    return own


def _definition(target: str, depth: int) -> tuple[ast.AST, str] | None:
    """The `class` or `def` statement that `target` names, and its module: found through the
    longest prefix of `target` that is a module, following re-exports (`from a import B`)."""
    module, _, name = target.rpartition(".")
    if depth > 10 or not module or _namespace(module) is None:
        return None
    bound = _namespace(module).get(name)
    if isinstance(bound, str):
        return _definition(bound, depth + 1)
    return None if bound is None else (bound, module)


@functools.cache
def _namespace(module: str) -> dict[str, ast.AST | str] | None:
    """What the top level of `module` binds: its classes and functions as statements, its
    imports as the dotted paths they name. None where the source cannot be found or read."""
    path = _source(module)
    if path is None:
        return None
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
        return None
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: dict[str, ast.AST | str] = {}
    for stmt in _top_level(tree):
        if isinstance(stmt, (ast.ClassDef, ast.FunctionDef)):
            names[stmt.name] = stmt
        elif isinstance(stmt, ast.ImportFrom):
            source = stmt.module or ""
            if stmt.level:  # from .x import y, from .. import z
                base = package.rsplit(".", stmt.level - 1)[0] if stmt.level > 1 else package
                source = f"{base}.{source}" if source else base
            for alias in stmt.names:
                names[alias.asname or alias.name] = f"{source}.{alias.name}"
        elif isinstance(stmt, ast.Import):
            for alias in stmt.names:  # import a.b as c binds c; import a.b binds a
                bound = alias.asname or alias.name.partition(".")[0]
                names[bound] = alias.name if alias.asname else bound
    return names


def _top_level(tree: ast.Module) -> list[ast.stmt]:
    """The module's top-level statements, with those under `if TYPE_CHECKING:` (a package that
    imports its names only when asked, as trainlab.engine does, names them there)."""
    found = []
    for stmt in tree.body:
        checking = isinstance(stmt, ast.If) and ast.unparse(stmt.test).endswith("TYPE_CHECKING")
        found.extend(stmt.body if checking else [stmt])
    return found


def _source(module: str) -> Path | None:
    """The source file of `module`, found without importing it or its packages."""
    top, *rest = module.split(".")
    try:
        spec = importlib.util.find_spec(top)  # a top-level name: finds it, imports nothing
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if not rest:
        origin = spec.origin or ""
        return Path(origin) if origin.endswith(".py") else None
    folders = [Path(p) for p in spec.submodule_search_locations or []]
    for part in rest[:-1]:
        folders = [f / part for f in folders if (f / part).is_dir()]
    for folder in folders:
        for path in (folder / rest[-1] / "__init__.py", folder / f"{rest[-1]}.py"):
            if path.is_file():
                return path
    return None


def _dotted(expr: ast.expr, module: str) -> str | None:
    """The dotted path of a base class as written in `module` (Name, pl.LightningModule...)."""
    if isinstance(expr, ast.Attribute):
        head = _dotted(expr.value, module)
        return f"{head}.{expr.attr}" if head else None
    if isinstance(expr, ast.Name):
        bound = (_namespace(module) or {}).get(expr.id)
        return bound if isinstance(bound, str) else f"{module}.{expr.id}"
    return None


def _function_parameters(fn: ast.FunctionDef, method: bool) -> tuple[dict[str, Parameter], bool]:
    """The parameters `fn` takes by keyword (self aside), and whether it has *args or **kwargs."""
    args = fn.args
    positional = args.posonlyargs + args.args
    defaults = [None] * (len(positional) - len(args.defaults)) + list(args.defaults)
    skip = max(len(args.posonlyargs), 1 if method else 0)
    pairs = list(zip(positional, defaults, strict=True))[skip:]
    pairs += zip(args.kwonlyargs, args.kw_defaults, strict=True)
    found = {arg.arg: _parameter(arg, default) for arg, default in pairs}
    return found, args.vararg is not None or args.kwarg is not None


def _parameter(arg: ast.arg, default: ast.expr | None) -> Parameter:
    kind, nullable = _annotation(arg.annotation)
    if arg.annotation is None and isinstance(default, ast.Constant):
        value = default.value  # no annotation: the default's type, if it is a simple one
        kind = type(value).__name__ if type(value).__name__ in SIMPLE else None
    nullable = nullable or (isinstance(default, ast.Constant) and default.value is None)
    written = arg.arg + (f": {ast.unparse(arg.annotation)}" if arg.annotation else "")
    written += f" = {ast.unparse(default)}" if default is not None else ""
    try:
        value = ast.literal_eval(default) if default is not None else NO_DEFAULT
        value = list(value) if isinstance(value, tuple) else value  # as a config holds it
    except ValueError:
        value = NO_DEFAULT
    return Parameter(arg.arg, kind, nullable, written, value)


def _annotation(node: ast.expr | None) -> tuple[str | None, bool]:
    """(bool, int, float or str where the annotation is one of them, or None; whether it admits
    None): `int`, `float | None`, `Optional[str]`, `Union[int, float]` (a float)."""
    names = _union(node) if node is not None else set()
    nullable = "None" in names
    names.discard("None")
    if names == {"int", "float"}:
        return "float", nullable
    if len(names) == 1 and next(iter(names)) in SIMPLE:
        return names.pop(), nullable
    return None, nullable


def _union(node: ast.expr) -> set[str]:
    """The names of the types an annotation joins (an unknown one shows as '?')."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):  # "int": a string
        try:
            return _union(ast.parse(node.value, mode="eval").body)
        except SyntaxError:
            return {"?"}
    if isinstance(node, ast.Constant) and node.value is None:
        return {"None"}
    if isinstance(node, ast.Name):
        return {node.id}
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        return _union(node.left) | _union(node.right)
    if isinstance(node, ast.Subscript) and ast.unparse(node.value).endswith("Optional"):
        return _union(node.slice) | {"None"}
    if isinstance(node, ast.Subscript) and ast.unparse(node.value).endswith("Union"):
        members = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
        return set().union(*map(_union, members))
    return {"?"}
