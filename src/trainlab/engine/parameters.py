"""The keyword parameters that a config's `_target_` accepts, and the values each declares it
takes, read from its source code.

The command-line check (trainlab.engine.config) asks for them so that a config need not repeat a
constructor's defaults: `data.per_device=true` is valid because the data module's __init__ takes
`per_device`, though no YAML file writes it. It checks each value against the parameter's
annotation (`dropout: Annotated[float, Field(ge=0, lt=1)] = 0.1`) with pydantic: a new parameter
is checked as it is declared, with no rule to add elsewhere. The source is parsed, never
imported: importing would cost seconds (torch) on every command line, and would run the
module's code; an annotation is turned into a type from what typing, pydantic and
annotated_types name, and type aliases the modules define (`X = Literal["a", "b"]`).
"""

from __future__ import annotations

import ast
import functools
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

NO_DEFAULT = object()  # a parameter without a default, or with one that is not a literal


@dataclass(frozen=True)
class Parameter:
    name: str
    written: str  # as the source writes it, e.g. "per_device: bool = False"
    default: Any = NO_DEFAULT  # where the source writes it as a literal
    annotation: ast.expr | None = field(default=None, compare=False, repr=False)
    module: str = ""  # where the annotation's names are looked up


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
        return _function_parameters(node, module, method=False)[0]
    init = next(
        (s for s in node.body if isinstance(s, ast.FunctionDef) and s.name == "__init__"), None
    )
    own, passes_on = ({}, True) if init is None else _function_parameters(init, module, method=True)
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
    return (bound, module) if isinstance(bound, (ast.ClassDef, ast.FunctionDef)) else None


@functools.cache
def _namespace(module: str) -> dict[str, ast.AST | str] | None:
    """What the top level of `module` binds: its classes and functions as statements, its
    imports as the dotted paths they name, a name assigned once (a type alias) as the
    expression. None where the source cannot be found or read."""
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
        elif isinstance(stmt, ast.Assign) and len(stmt.targets) == 1:
            if isinstance(stmt.targets[0], ast.Name):
                names[stmt.targets[0].id] = stmt.value
        elif isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and stmt.value:
            names[stmt.target.id] = stmt.value
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


def _function_parameters(
    fn: ast.FunctionDef, module: str, method: bool
) -> tuple[dict[str, Parameter], bool]:
    """The parameters `fn` takes by keyword (self aside), and whether it has *args or **kwargs."""
    args = fn.args
    positional = args.posonlyargs + args.args
    defaults = [None] * (len(positional) - len(args.defaults)) + list(args.defaults)
    skip = max(len(args.posonlyargs), 1 if method else 0)
    pairs = list(zip(positional, defaults, strict=True))[skip:]
    pairs += zip(args.kwonlyargs, args.kw_defaults, strict=True)
    found = {arg.arg: _parameter(arg, default, module) for arg, default in pairs}
    return found, args.vararg is not None or args.kwarg is not None


def _parameter(arg: ast.arg, default: ast.expr | None, module: str) -> Parameter:
    written = arg.arg + (f": {ast.unparse(arg.annotation)}" if arg.annotation else "")
    written += f" = {ast.unparse(default)}" if default is not None else ""
    try:
        value = ast.literal_eval(default) if default is not None else NO_DEFAULT
        value = list(value) if isinstance(value, tuple) else value  # as a config holds it
    except ValueError:
        value = NO_DEFAULT
    annotation = arg.annotation
    if annotation is None and type(value) in (bool, int, float, str):  # the default's type
        annotation = ast.Name(type(value).__name__)
    if annotation is not None and default is not None and value is None:  # `x: int = None`
        annotation = ast.BinOp(annotation, ast.BitOr(), ast.Constant(None))
    return Parameter(arg.arg, written, value, annotation, module)


# --- values checked against what a parameter declares ------------------------------------------


def check(target: str, name: str, value: Any) -> str | None:
    """None where `value` is one that the parameter `name` of `target` declares it takes, or
    where it declares nothing this can read; else what it takes, in words."""
    found = _validator(target, name)
    if found is None or (isinstance(value, dict) and "_target_" in value):  # built: unknown
        return None
    from pydantic import ValidationError

    adapter, words = found
    try:
        adapter.validate_python(value)
    except ValidationError:
        return words
    return None


def declares(target: str, name: str) -> bool:
    """Whether the parameter `name` of `target` declares values that check can check."""
    return _validator(target, name) is not None


@functools.cache
def _validator(target: str, name: str) -> tuple[Any, str] | None:
    from pydantic import TypeAdapter

    parameter = (parameters(target) or {}).get(name)
    if parameter is None or parameter.annotation is None:
        return None
    try:
        declared = _type(parameter.annotation, parameter.module, 0)
        return None if declared is Any else (TypeAdapter(declared), describe(declared))
    except Exception:  # an annotation this cannot make a type of: nothing is checked
        return None


class _Built:
    """Marks what a parameter annotated with a class (nn.Module, Strategy) takes in a config:
    a config node that builds it."""


def _node() -> Any:
    from typing import Annotated

    return Annotated[dict, _Built()]


# Names that annotations use, by the module that defines them: typing's, pydantic's
# constraints and annotated_types'. Any other imported name is a class (Node).
def _known(dotted: str) -> Any:
    import typing

    import annotated_types
    import pydantic

    module, _, name = dotted.rpartition(".")
    if module in ("typing", "typing_extensions", "collections.abc", "builtins"):
        aliases = {"List": list, "Dict": dict, "Tuple": tuple, "Set": list, "FrozenSet": list}
        aliases |= dict.fromkeys(("Sequence", "MutableSequence", "Iterable", "Collection"), list)
        aliases |= dict.fromkeys(("Mapping", "MutableMapping"), dict)
        if name in ("Callable", "Type", "type"):  # passed by code, or built: not checked
            return Any
        forms = ("Any", "Optional", "Union", "Literal", "Annotated")  # nothing else is called
        return aliases.get(name, getattr(typing, name) if name in forms else None)
    if module == "pydantic" and name in (
        "Field", "Strict", "AllowInfNan", "conint", "confloat", "PositiveInt",
        "NonNegativeInt", "NegativeInt", "NonPositiveInt", "PositiveFloat",
        "NonNegativeFloat", "FiniteFloat", "StrictInt", "StrictFloat", "StrictStr", "StrictBool",
    ):  # fmt: skip
        return getattr(pydantic, name)
    if module == "annotated_types":
        return getattr(annotated_types, name, None)
    if dotted in ("pathlib.Path", "pathlib.PurePath", "os.PathLike"):
        return str
    return None


def _strict(kind: Any) -> Any:
    """A plain type (or pydantic's PositiveInt...) checked strictly: Hydra has typed every
    value already, so the text "5" or the number 5.0 is no integer here; floats finite."""
    import typing
    from typing import Annotated

    from pydantic import AllowInfNan, Strict

    if typing.get_origin(kind) is Annotated:  # PositiveInt: Annotated[int, Gt(0)]
        return Annotated[(_strict(kind.__origin__), *kind.__metadata__)]
    if kind is float:
        return Annotated[float, Strict(), AllowInfNan(False)]
    return Annotated[kind, Strict()] if kind in (int, str, bool) else kind


BUILTINS = {"int": int, "float": float, "str": str, "bool": bool, "list": list, "dict": dict}
BUILTINS |= {"tuple": tuple, "set": list, "frozenset": list, "object": Any, "type": Any}


def _type(node: ast.expr, module: str, depth: int) -> Any:
    """The type an annotation (as parsed from `module`) names."""
    from typing import Annotated, Literal, Optional, Union

    if depth > 20:
        return Any
    again = functools.partial(_type, module=module, depth=depth + 1)
    if isinstance(node, ast.Constant):
        if node.value is None:
            return type(None)
        if isinstance(node.value, str):  # a forward reference: "int"
            return again(ast.parse(node.value, mode="eval").body)
        return Any if node.value is ... else node.value
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        return Union[again(node.left), again(node.right)]  # noqa: UP007 (built from parts)
    if isinstance(node, (ast.Name, ast.Attribute)):
        return _named(node, module, depth)
    if isinstance(node, ast.Subscript):
        head = again(node.value)
        items = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
        if head is Literal:
            return Literal[tuple(ast.literal_eval(item) for item in items)]
        if head is Annotated:
            return Annotated[(again(items[0]), *(_metadata(item, module) for item in items[1:]))]
        if head is Any or _is_node(head):
            return head
        args = tuple(again(item) for item in items)
        if head is Optional:
            return Optional[args[0]]  # noqa: UP045
        if head is tuple and len(args) == 2 and args[1] is Any:  # tuple[int, ...]
            return list[args[0]]
        return head[args] if head in (Union, list, dict, tuple) else head
    if isinstance(node, ast.Call):
        return _metadata(node, module)  # conint(gt=0)
    return Any


def _named(node: ast.expr, module: str, depth: int) -> Any:
    """What a name in an annotation stands for: a plain type, a name from typing, pydantic or
    annotated_types, a type alias (followed into the module that defines it), or a class."""
    if isinstance(node, ast.Name):
        bound = (_namespace(module) or {}).get(node.id)
        if bound is None:
            return _strict(BUILTINS.get(node.id, Any))
        if isinstance(bound, ast.expr):
            return _type(bound, module, depth + 1)  # X = Literal[...] in this module
        dotted = bound if isinstance(bound, str) else f"{module}.{node.id}"
    else:
        dotted = _dotted(node, module)
        if dotted is None:
            return Any
    for _ in range(10):  # follow re-exports to the alias or class they name
        known = _known(dotted)
        if known is not None:
            return _strict(known)
        where, _, name = dotted.rpartition(".")
        bound = (_namespace(where) or {}).get(name) if where else None
        if isinstance(bound, str):
            dotted = bound
        elif isinstance(bound, ast.expr):
            return _type(bound, where, depth + 1)
        else:
            break
    return _node()  # a class, found or not: a config builds it from a node


def _metadata(node: ast.expr, module: str) -> Any:
    """Annotated's extras: Field(ge=0), Gt(0)... with literal arguments; others (a docstring,
    an unknown call) check nothing."""
    if isinstance(node, ast.Call):
        made = _named(node.func, module, 0)
        if made is not Any and not _is_node(made) and callable(made):
            args = [ast.literal_eval(a) for a in node.args]
            return made(*args, **{k.arg: ast.literal_eval(k.value) for k in node.keywords})
    if isinstance(node, ast.Constant):
        return node.value
    return None


def describe(declared: Any) -> str:
    """A type, in words: 'an integer > 0', 'a list, each an integer', 'one of 'a', 'b''."""
    import types
    import typing

    origin, args = typing.get_origin(declared), typing.get_args(declared)
    if declared is type(None):
        return "null"
    if _is_node(declared):
        return "a config node"
    if origin is typing.Annotated:
        bounds = _bounds(args[1:])
        return describe(args[0]) + (f" {' and '.join(bounds)}" if bounds else "")
    if origin in (typing.Union, types.UnionType):
        literals = [v for a in args if typing.get_origin(a) is typing.Literal for v in a.__args__]
        words = [describe(a) for a in args if typing.get_origin(a) is not typing.Literal]
        if literals:
            words.insert(0, describe(typing.Literal[tuple(literals)]))
        words = list(dict.fromkeys(words))
        return ", ".join(words[:-1]) + f" or {words[-1]}" if len(words) > 1 else words[0]
    if origin is typing.Literal:  # as a command line writes them: auto, not 'auto'
        words = list(dict.fromkeys(map(str, args)))  # 16 and "16" read alike
        return "one of " + ", ".join(words) if len(words) > 1 else words[0]
    if origin is list or declared is list:
        return f"a list, each {describe(args[0])}" if args else "a list"
    if origin is tuple:
        return f"a list of {len(args)}: " + ", ".join(map(describe, args))
    if origin is dict or declared is dict:
        return "a mapping (key: value)"
    names = {int: "an integer", float: "a number", str: "text", bool: "true or false"}
    return names.get(declared, getattr(declared, "__name__", str(declared)))


def _is_node(declared: Any) -> bool:
    return any(isinstance(m, _Built) for m in getattr(declared, "__metadata__", ()))


def _bounds(metadata: tuple) -> list[str]:
    """The bounds among Annotated's extras (Field(gt=0), Ge(0)...), in words: '> 0'."""
    import annotated_types

    signs = {"gt": ">", "ge": ">=", "lt": "<", "le": "<=", "min_length": "of length >=",
             "max_length": "of length <="}  # fmt: skip
    found = []
    for item in metadata:
        for part in getattr(item, "metadata", None) or [item]:  # a FieldInfo holds several
            if isinstance(part, annotated_types.BaseMetadata):
                for attr, sign in signs.items():
                    if getattr(part, attr, None) is not None:
                        found.append(f"{sign} {getattr(part, attr)}")
    return found
