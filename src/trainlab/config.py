"""Where the configs live, and checks that turn a bad command line into a one-paragraph error.

Hydra would also reject most mistakes, but only deep inside composition or, for a wrong value,
once data and model are built. `check_command_line` runs before Hydra does: it knows every key
and option, so it can say what was expected and suggest the likely spelling.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from trainlab.errors import UserError


def _find_conf_dir() -> Path:
    packaged = Path(__file__).parent / "conf"  # inside an installed wheel
    return packaged if packaged.is_dir() else Path(__file__).resolve().parents[2] / "conf"


CONF_DIR = _find_conf_dir()


def run_name() -> str:
    """The name of a run's directory (`${run_name:}` in conf/hydra/default.yaml): the job's
    name under a distributed launcher (see shared_run_name), else its start time. The entry
    points make a time-named directory unique (trainlab.run_dirs)."""
    import time

    return shared_run_name() or time.strftime("%Y-%m-%d_%H-%M-%S")


def shared_run_name() -> str | None:
    """The job's id where a distributed launcher started one process per node: these must all
    agree on one directory, and a requeued SLURM job must find its own again."""
    import os

    env = os.environ
    if env.get("SLURM_JOB_ID") and int(env.get("SLURM_NTASKS", "1")) > 1:
        job = env.get("SLURM_ARRAY_JOB_ID", env["SLURM_JOB_ID"])
        task = env.get("SLURM_ARRAY_TASK_ID")
        return f"slurm-{job}" + (f"_{task}" if task else "")
    if int(env.get("WORLD_SIZE", "1")) > 1 and env.get("TORCHELASTIC_RUN_ID"):
        run_id = env["TORCHELASTIC_RUN_ID"]
        if run_id == "none":  # static rendezvous: the master's address is what all share
            run_id = f"{env.get('MASTER_ADDR', 'localhost')}-{env.get('MASTER_PORT', '')}"
        return f"torchrun-{run_id}"
    return None


def _register_resolvers() -> None:
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("run_name"):
        OmegaConf.register_new_resolver("run_name", run_name, use_cache=True)


_register_resolvers()


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# Values that must hold whatever sets them (command line, experiment or edited YAML).
RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "optimizer.lr": (lambda v: _is_number(v) and v > 0, "a positive number, e.g. 1e-3"),
    "optimizer.weight_decay": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
    "data.batch_size": (lambda v: _is_int(v) and v > 0, "a positive integer, e.g. 64"),
    "trainer.max_epochs": (
        lambda v: v is None or (_is_int(v) and (v >= 1 or v == -1)),
        "a positive integer, or -1 for no limit",
    ),
    "seed": (lambda v: v is None or (_is_int(v) and v >= 0), "an integer >= 0, or null"),
    "threads": (lambda v: v == "auto" or (_is_int(v) and v > 0), "a positive integer or auto"),
    "resume": (lambda v: v in (None, "auto", "restart"), "auto, restart or null"),
    "resume_allow_changes": (lambda v: isinstance(v, bool), "true or false"),
    "lr_scaling.rule": (lambda v: v in ("none", "linear", "sqrt"), "none, linear or sqrt"),
    "lr_scaling.base_batch_size": (lambda v: _is_int(v) and v > 0, "a positive integer"),
    "checkpoint_every_n_steps": (
        lambda v: v is None or (_is_int(v) and v > 0),
        "a positive integer or null",
    ),
}


def check_value(key: str, value: Any, source: str = "") -> None:
    rule = RULES.get(key)
    if rule and not rule[0](value):
        where = f" (in '{source}')" if source else ""
        raise UserError(f"'{key}' must be {rule[1]}, but it is {value!r}{where}.")


def check_values(cfg: Any) -> None:
    """Apply RULES to a composed config."""
    from omegaconf import OmegaConf

    for key in RULES:
        value = OmegaConf.select(cfg, key, default="<absent>")
        if value != "<absent>":
            check_value(key, value)


def group_options(group: str) -> list[str]:
    folder = CONF_DIR / group
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def check_command_line(config_name: str, argv: list[str]) -> None:
    """Reject unknown keys, unknown group options and ill-typed values before Hydra runs."""
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    args, _ = get_args_parser().parse_known_args(argv)
    if args.help or args.hydra_help or args.shell_completion or args.config_dir or args.info:
        return  # Hydra answers these itself
    config_name = args.config_name or config_name
    try:
        overrides = OverridesParser.create().parse_overrides(args.overrides)
    except HydraException as e:
        raise UserError(
            f"cannot read the command line: {str(e).splitlines()[0]}. Overrides are written "
            "key=value (e.g. optimizer.lr=1e-3), group=option (e.g. model=cnn), or key=a,b,c to "
            "sweep with -m."
        ) from None

    group_overrides, key_overrides = [], []
    for o in overrides:
        key = o.key_or_group
        if key.startswith("hydra") or o.is_delete():
            continue
        if (CONF_DIR / key).is_dir():
            _check_group_option(o)
            sign = "++" if o.is_force_add() else "+" if o.is_add() else ""  # keep +model=mlp
            group_overrides.append(f"{sign}{key}={_values(o)[0]}")
        else:
            key_overrides.append(o)

    base = compose(config_name, group_overrides)
    tree = _to_tree(base)
    check_values(base)
    for o in key_overrides:
        key = o.key_or_group
        found, default = _lookup(tree, key)
        if not found and not (o.is_add() or o.is_force_add()):
            raise UserError(_unknown_key_message(key, o.input_line, tree))
        if key.split(".")[-1] == "_target_":
            targets = known_targets()
            for value in _values(o):
                if value not in targets:
                    raise UserError(
                        f"'{o.input_line}' names code that no config file names. Only the "
                        f"_target_ values in {CONF_DIR} are built: add a config file for it."
                    )
        for value in _values(o):
            if (
                found
                and (_is_number(default) or isinstance(default, bool))
                and isinstance(value, str)
            ):
                kind = "true or false" if isinstance(default, bool) else "a number"
                raise UserError(
                    f"'{key}' expects {kind} (its default is {default!r}), "
                    f"but '{o.input_line}' gives the text {value!r}."
                )
            check_value(key, value, o.input_line)


def _values(override: Any) -> list[Any]:
    """The value of an override, or every value of a sweep (`a=1,2,3`)."""
    if override.is_sweep_override():
        return list(override.sweep_iterator())
    return [override.value()]


def _check_group_option(o: Any) -> None:
    group, options = o.key_or_group, group_options(o.key_or_group)
    for value in _values(o):
        if value is None or value in options:
            continue
        close = difflib.get_close_matches(str(value), options, n=1)
        hint = f" Did you mean '{group}={close[0]}'?" if close else ""
        raise UserError(
            f"'{group}={value}' names no config in conf/{group}/: the options are "
            f"{', '.join(options)}.{hint}"
        )


def compose(config_name: str, overrides: list[str]) -> Any:
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    try:
        with initialize_config_dir(str(CONF_DIR), version_base="1.3", job_name="check"):
            return compose(config_name, overrides=overrides)
    except HydraException as e:
        raise UserError(f"the configs do not compose: {e}") from None


def _to_tree(cfg: Any) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=False)


def _lookup(tree: Any, key: str) -> tuple[bool, Any]:
    node = tree
    for part in key.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return False, None
    return True, node


def _all_keys(tree: Any, prefix: str = "") -> Iterator[str]:
    if isinstance(tree, dict):
        for k, v in tree.items():
            if k.startswith("_"):  # _target_ and friends are not knobs
                continue
            yield f"{prefix}{k}"
            yield from _all_keys(v, f"{prefix}{k}.")


def _unknown_key_message(key: str, text: str, tree: dict) -> str:
    keys = list(_all_keys(tree)) + [p.name for p in CONF_DIR.iterdir() if p.is_dir()]
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    parent = key.rpartition(".")[0]
    found, node = _lookup(tree, parent) if parent else (True, tree)
    siblings = ""
    if found and isinstance(node, dict):
        names = [k for k in node if not k.startswith("_")]
        siblings = (
            f" Keys under '{parent}': {', '.join(names)}."
            if parent
            else f" Top-level keys: {', '.join(names)}."
        )
    return (
        f"'{text}' sets '{key}', which is not in the config.{hint}{siblings} "
        f"To add a new key on purpose, write +{text}."
    )


def known_targets() -> set[str]:
    """Every `_target_` that the config files name: the only code a stored config may build."""
    import re

    # also list items (`- _target_: ...`), as in lists of transforms
    pattern = re.compile(r"^\s*(?:-\s+)?_target_:\s*([\w.]+)", re.MULTILINE)
    return {m for path in CONF_DIR.rglob("*.yaml") for m in pattern.findall(path.read_text())}


def check_targets(cfg: Any, source: str) -> None:
    """Refuse a config (e.g. one read from a checkpoint) that would build code no config names."""
    from omegaconf import OmegaConf

    allowed = known_targets()
    tree = OmegaConf.to_container(cfg, resolve=False) if not isinstance(cfg, dict) else cfg
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            target = node.get("_target_")
            if target is not None and target not in allowed:
                raise UserError(
                    f"{source} asks to build '{target}', which no file in {CONF_DIR} names. "
                    "Only targets named by the config files are built from stored configs."
                )
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
