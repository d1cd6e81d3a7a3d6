"""Where the configs live, and checks that turn a bad command line into a one-paragraph error.

Hydra would also reject most mistakes, but only deep inside composition or, for a wrong value,
once data and model are built. `check_command_line` runs before Hydra does: it knows every key
and option, so it can say what was expected and suggest the likely spelling. A value is checked
against what the constructor that takes it declares (trainlab.engine.parameters: `dropout:
Annotated[float, Field(ge=0, lt=1)]`); RULES add the template's own top-level keys and what the
signatures of torch's optimizers and Lightning's Trainer leave unsaid; compute.check_hardware
asks for the Trainer's accelerator and devices. The trust model's checks (known_targets,
check_targets, HYDRA_KEYS) keep any config, wherever it comes from, from building code that
conf/ does not name.
"""

from __future__ import annotations

import difflib
import functools
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from trainlab.engine.compute import check_hardware
from trainlab.engine.errors import UserError
from trainlab.engine.jobs import run_name

# Keys that say where a run writes, what it reports or how often it saves, not what it computes:
# changing them on resume is not a change of the run, and compare groups runs across them.
# (Checked as prefixes of dotted keys.)
BOOKKEEPING = (
    "resume",
    "resume_allow_changes",
    "ckpt_path",
    "checkpoint_every_n_steps",
    "steps_per_call",  # the same weights either way; a resumed run keeps the checkpoint's
    "test",
    "tags",
    "threads",
    "paths",
    "logger",
    "data.data_dir",
    "trainer.log_every_n_steps",
    "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
    "trainer.profiler",
    "callbacks.lr_monitor",
    "callbacks.last_checkpoint",  # checkpoint_every_n_steps
    "effective_batch_size",  # derived from keys that are compared
    "effective_lr",
)


def is_bookkeeping(key: str) -> bool:
    """Whether the dotted `key` is one of BOOKKEEPING, or inside one."""
    return any(key == b or key.startswith(f"{b}.") for b in BOOKKEEPING)


def _find_conf_dir() -> Path:
    packaged = Path(__file__).parents[1] / "conf"  # inside an installed wheel
    return packaged if packaged.is_dir() else Path(__file__).resolve().parents[3] / "conf"


CONF_DIR = _find_conf_dir()


def _register_resolvers() -> None:
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("run_name"):
        OmegaConf.register_new_resolver("run_name", run_name, use_cache=True)


_register_resolvers()


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _positive_int(v: Any) -> bool:
    return _is_int(v) and v > 0


def _plain_name(text: Any) -> bool:
    """Letters, digits, _ and - only: no path that could leave a config folder."""
    return isinstance(text, str) and text.replace("_", "a").replace("-", "a").isalnum()


def _optional(test: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is None or test(v)


def _batches(v: Any) -> bool:  # Lightning's limit_*_batches and friends: a share or a count
    return v is None or (isinstance(v, float) and 0 <= v <= 1) or (_is_int(v) and v >= 0)


def _devices(v: Any) -> bool:
    if isinstance(v, str):
        return v == "auto" or all(p.strip().isdigit() for p in v.split(",") if p.strip())
    if isinstance(v, list):
        return bool(v) and all(_is_int(d) and d >= 0 for d in v)
    return _is_int(v) and (v >= 1 or v == -1)


BATCHES = "a fraction of the batches between 0.0 and 1.0, a count >= 0, or null"

# Values that must hold whatever sets them (command line, experiment or edited YAML), by full
# key: the template's own keys, and what torch's optimizers and Lightning's Trainer take beyond
# what their signatures declare. The keys of nets, data sets and LightningModules are checked by
# their constructors' annotations instead (check_declared).
RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "optimizer.lr": (lambda v: _is_number(v) and v > 0, "a positive number, e.g. 1e-3"),
    "optimizer.weight_decay": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
    "optimizer.momentum": (lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "optimizer.betas": (
        lambda v: (
            isinstance(v, list) and len(v) == 2 and all(_is_number(b) and 0 <= b < 1 for b in v)
        ),
        "two numbers in [0, 1), e.g. [0.9, 0.999]",
    ),
    "optimizer.eps": (lambda v: _is_number(v) and v > 0, "a positive number, e.g. 1e-8"),
    # every data module takes it, and the engine reads it (lr_scaling, effective_batch_size)
    "data.batch_size": (_positive_int, "a positive integer, e.g. 64"),
    "steps_per_call": (
        lambda v: v == "auto" or _positive_int(v),
        "auto or a positive integer (optimizer steps per trip through Lightning's loop), e.g. 8",
    ),
    "trainer.max_epochs": (
        lambda v: v is None or (_is_int(v) and (v >= 1 or v == -1)),
        "a positive integer, or -1 for no limit",
    ),
    "trainer.min_epochs": (_optional(lambda v: _is_int(v) and v >= 0), "an integer >= 0, or null"),
    "trainer.max_steps": (
        lambda v: _is_int(v) and (v >= 1 or v == -1),
        "a positive integer, or -1 for no limit",
    ),
    "trainer.min_steps": (_optional(lambda v: _is_int(v) and v >= 0), "an integer >= 0, or null"),
    "trainer.devices": (
        _devices,
        "a positive integer, -1 (all), auto, or a list of device indices such as [0, 1]",
    ),
    "trainer.num_nodes": (_positive_int, "a positive integer"),
    "trainer.log_every_n_steps": (_positive_int, "a positive integer"),
    "trainer.check_val_every_n_epoch": (_optional(_positive_int), "a positive integer, or null"),
    "trainer.val_check_interval": (
        _optional(lambda v: (isinstance(v, float) and 0 < v <= 1) or _positive_int(v)),
        "a fraction of an epoch in (0.0, 1.0], a count of batches >= 1, or null",
    ),
    "trainer.limit_train_batches": (_batches, BATCHES),
    "trainer.limit_val_batches": (_batches, BATCHES),
    "trainer.limit_test_batches": (_batches, BATCHES),
    "trainer.limit_predict_batches": (_batches, BATCHES),
    "trainer.overfit_batches": (_batches, BATCHES),
    "trainer.accumulate_grad_batches": (_positive_int, "a positive integer"),
    "trainer.gradient_clip_val": (
        _optional(lambda v: _is_number(v) and v >= 0),
        "a number >= 0 (0: no clipping), or null",
    ),
    "trainer.num_sanity_val_steps": (
        lambda v: _is_int(v) and v >= -1,
        "an integer >= 0, or -1 for all",
    ),
    "seed": (lambda v: v is None or (_is_int(v) and v >= 0), "an integer >= 0, or null"),
    "threads": (lambda v: v == "auto" or (_is_int(v) and v > 0), "a positive integer or auto"),
    "resume": (lambda v: v in (None, "auto", "restart"), "auto, restart or null"),
    "resume_allow_changes": (lambda v: isinstance(v, bool), "true or false"),
    "compile": (lambda v: isinstance(v, bool), "true or false"),
    "test": (lambda v: isinstance(v, bool), "true or false"),
    "lr_scaling.rule": (lambda v: v in ("none", "linear", "sqrt"), "none, linear or sqrt"),
    "lr_scaling.base_batch_size": (_positive_int, "a positive integer"),
    "monitor.metric": (
        _optional(lambda v: isinstance(v, str) and v != ""),
        "the name of a logged metric (e.g. val/loss), or null",
    ),
    "monitor.mode": (lambda v: v in ("min", "max"), "min (lower is better) or max"),
    "checkpoint_every_n_steps": (_optional(_positive_int), "a positive integer or null"),
    # it names the module a sweep's launcher runs (trainlab.<name>): a plain name only
    "hydra.job.name": (_plain_name, "a plain name (letters, digits, _ and -)"),
    "divergence_factor": (
        _optional(lambda v: _is_number(v) and v > 1),
        "a number > 1 (e.g. 1e4), or null to switch the check off",
    ),
}


def check_value(key: str, value: Any, source: str = "") -> None:
    """A finite number wherever a number is, and RULES."""
    if isinstance(value, str) and "${" in value:
        return  # an interpolation: checked once resolved (check_values in the entry points)
    where = f" (in {source})" if source else " (set in the config files or an experiment)"
    if any(isinstance(v, float) and not math.isfinite(v) for v in _numbers(value)):
        raise UserError(
            f"'{key}' must be a finite number, but it is {value!r}{where}: a value beyond "
            "1.8e308 reads as inf. Give a finite value."
        )
    rule = RULES.get(key)
    if rule and not rule[0](value):
        raise UserError(f"'{key}' must be {rule[1]}, but it is {value!r}{where}.")


def _numbers(value: Any) -> Iterator[Any]:
    if isinstance(value, (list, tuple)):
        for v in value:
            yield from _numbers(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _numbers(v)
    else:
        yield value


def check_declared(
    target: Any, key: str, value: Any, source: str = "", known: set[str] | None = None
) -> bool:
    """`value`, for the parameter that `key` names, of the kind that `target` (a `_target_`
    that conf/ names: `known`, else known_targets()) declares it takes
    (trainlab.engine.parameters.check); whether it declares one."""
    from trainlab.engine.parameters import check, declares, parameters

    name = key.rpartition(".")[2]
    if not isinstance(target, str) or target not in (known or known_targets()):
        return False  # code that no config file names is never looked into
    if isinstance(value, str) and "${" in value:
        return declares(target, name)  # an interpolation: checked once resolved
    takes = check(target, name, value)
    if takes is None:
        return declares(target, name)
    written = parameters(target)[name].written
    where = f" (in {source})" if source else " (set in the config files or an experiment)"
    raise UserError(f"'{key}' takes {takes} (`{written}` in {target}), but it is {value!r}{where}.")


def check_values(cfg: Any) -> None:
    """Check every value of a composed config (hydra.* aside): RULES, finite numbers, what
    each `_target_` declares; and refuse code that no config file names (check_targets), as
    resolved. The entry points call this on a run's config before they build anything."""
    known = known_targets()
    for key, value in _leaves(cfg):
        check_value(key, value)
        parent = _parent(cfg, key)
        if parent is not None:
            check_declared(parent.get("_target_"), key, value, known=known)
    check_targets(cfg, "the run's config")


def _parent(cfg: Any, key: str) -> Any:
    from omegaconf import DictConfig, OmegaConf

    parent = OmegaConf.select(cfg, key.rpartition(".")[0]) if "." in key else None
    return parent if isinstance(parent, DictConfig) and "_target_" in parent else None


def _leaves(cfg: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, resolved value) of every leaf, lists whole, and of every node without a
    `_target_` under one that has it (a parameter that takes a mapping); a value that cannot be
    resolved here (e.g. ${hydra:...} outside a run) is left out."""
    from omegaconf import DictConfig, ListConfig

    for key in cfg.keys() if isinstance(cfg, DictConfig) else []:
        path = f"{prefix}{key}"
        if path == "hydra" or str(key).startswith("_"):
            continue
        try:
            value = cfg[key]
        except Exception:
            continue
        if isinstance(value, DictConfig) and "_target_" in cfg and "_target_" not in value:
            try:
                yield path, _plain(value, resolve=True)
            except Exception:
                continue
        elif isinstance(value, DictConfig):
            yield from _leaves(value, f"{path}.")
        elif isinstance(value, ListConfig):
            try:
                yield path, _plain(value, resolve=True)
            except Exception:
                continue
        else:
            yield path, value


def group_options(group: str) -> list[str]:
    folder = CONF_DIR / group
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def check_command_line(config_name: str, argv: list[str]) -> list[str]:
    """Reject unknown keys, unknown group options, ill-typed values and code that no config file
    names, before Hydra runs (Hydra builds hydra.callbacks before any task code runs).

    A key that no YAML file writes is valid where the `_target_` above it takes it as a parameter
    (`data.per_device=true`): configs write only what differs from the defaults. Returns `argv`
    as Hydra must read it, with such keys marked `++` (add or override), as Hydra refuses to set
    a key that is not in the composed config."""
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    args, _ = get_args_parser().parse_known_args(argv)
    _refuse_other_configs(args)
    if args.help or args.hydra_help or args.shell_completion or args.info:
        return argv  # Hydra answers these itself
    config_name = args.config_name or config_name
    try:
        overrides = OverridesParser.create().parse_overrides(args.overrides)
    except HydraException as e:
        raise UserError(
            f"cannot read the command line: {str(e).splitlines()[0]}. Overrides are written "
            "key=value (e.g. optimizer.lr=1e-3), group=option (e.g. model=cnn), or key=a,b,c to "
            "sweep with -m; a value with spaces, quotes or letters beyond ASCII goes in quotes "
            "for Hydra, inside the shell's: \"paths.log_dir='/data/my runs'\"."
        ) from None

    group_overrides, key_overrides, hydra_overrides = [], [], []
    swept_groups = {}  # index in group_overrides: every option a group sweep expands to
    for o in overrides:
        key = o.key_or_group
        if key == "hydra" or key.startswith(("hydra.", "hydra/")):
            check_hydra_override(o)
            if "/" in key:  # hydra/launcher=process
                group_overrides.append(f"{key}={_values(o)[0]}")
            else:
                hydra_overrides.append(o)
        elif o.is_delete():
            continue
        elif (CONF_DIR / key).is_dir():
            _check_group_option(o)
            sign = "++" if o.is_force_add() else "+" if o.is_add() else ""  # keep +model=mlp
            prefix = f"{sign}{key}{_package(o)}="  # model@where=mlp
            options = [_option_text(v) for v in _values(o)]
            if len(options) > 1:
                swept_groups[len(group_overrides)] = [f"{prefix}{v}" for v in options]
            group_overrides.append(f"{prefix}{options[0]}")
        else:
            key_overrides.append(o)

    # Each option of a group sweep composes its own config: the key overrides are checked
    # against each (the others' first options held), as each of its jobs will get them.
    variants = [group_overrides] + [
        [*group_overrides[:i], other, *group_overrides[i + 1 :]]
        for i, options in swept_groups.items()
        for other in options[1:]
    ]
    parameters_set: list[str] = []  # overrides of constructor parameters that no YAML writes
    whole = None
    for n, groups in enumerate(variants):
        base = compose(config_name, groups, hydra=True)
        if n == 0:
            _refuse_intervals_without_search(overrides, base)
        try:
            found, full = _check_key_overrides(base, key_overrides, hydra_overrides)
        except UserError as e:
            if not swept_groups:
                raise
            which = " ".join(groups[i].lstrip("+") for i in swept_groups)
            raise UserError(f"in the jobs with {which}: {e}") from None
        parameters_set += found
        if n == 0 and not swept_groups and not any(o.is_delete() for o in overrides):
            whole = full  # what composing the whole command line gives, but Hydra's records
    argv = [f"++{arg}" if arg in parameters_set else arg for arg in argv]
    if whole is not None:
        _remember_as_composed(config_name, argv, whole)
    return argv


def _remember_as_composed(config_name: str, argv: list[str], cfg: Any) -> None:
    """Keep the config the check built (the groups composed, the key overrides applied as Hydra
    applies them) as compose's answer for the whole command line, once Hydra's records of that
    command line are set in it as Hydra's compose sets them (hydra.overrides, and
    hydra.job.override_dirname, which a run directory's name may use). The run directory's
    compose (run_dirs.compose) then costs nothing: about 0.3 s of each run's start."""
    from hydra._internal.config_loader_impl import get_overrides_dirname
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import open_dict

    args, _ = get_args_parser().parse_known_args(argv)
    parsed = OverridesParser.create().parse_overrides(args.overrides)
    single = [o for o in parsed if not o.is_sweep_override()]
    task = [o for o in single if not o.is_hydra_override()]
    names = cfg.hydra.job.config.override_dirname
    with open_dict(cfg.hydra):
        cfg.hydra.overrides.task = [o.input_line for o in task]
        cfg.hydra.overrides.hydra = [o.input_line for o in single if o.is_hydra_override()]
        cfg.hydra.job.override_dirname = get_overrides_dirname(
            overrides=task,
            kv_sep=names.kv_sep,
            item_sep=names.item_sep,
            exclude_keys=names.exclude_keys,
        )
    _composed[(config_name, tuple(o.input_line for o in single), True)] = cfg


def _refuse_intervals_without_search(overrides: list[Any], cfg: Any) -> None:
    """interval() is a range a search draws from; a grid (Hydra's basic sweeper) cannot."""
    from hydra.core.override_parser.types import IntervalSweep

    drawn = [o.input_line for o in overrides if isinstance(o.value(), IntervalSweep)]
    if drawn and "optuna" not in str(cfg.hydra.sweeper.get("_target_", "")).lower():
        raise UserError(
            f"'{drawn[0]}' is a range for a search to draw from, and this sweep is a grid: add "
            "hydra/sweeper=optuna (with hydra.sweeper.n_trials=N) to search it, or list the "
            "values to try (key=a,b,c or key=range(start,stop,step))."
        )


def _check_key_overrides(
    base: Any, key_overrides: list[Any], hydra_overrides: list[Any]
) -> tuple[list, Any]:
    """Check the key overrides against one composed config; the input lines of those that set
    a constructor parameter no YAML file writes (to be marked `++`), and the config with every
    override applied."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    tree = {k: v for k, v in _to_tree(base).items() if k != "hydra"}
    parameters_set = []  # overrides of constructor parameters that no YAML file writes
    for o in key_overrides:
        key = o.key_or_group
        found, default = _lookup(tree, key)
        if not found and not (o.is_add() or o.is_force_add()):
            if _constructor_parameter(tree, key) is None:
                raise UserError(_unknown_key_message(key, o.input_line, tree))
            parameters_set.append(o.input_line)
        parent = _lookup(tree, key.rpartition(".")[0])[1] if "." in key else None
        target = parent.get("_target_") if isinstance(parent, dict) else None
        for value in _values(o):
            check_value(key, value, f"'{o.input_line}'")
            if check_declared(target, key, value, f"'{o.input_line}'"):
                continue
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
    parser = OverridesParser.create()
    key_overrides = [
        parser.parse_override(f"++{o.input_line}") if o.input_line in parameters_set else o
        for o in key_overrides
    ]
    return parameters_set, _check_whole_config(base, key_overrides + hydra_overrides)


def _package(o: Any) -> str:
    """`@package` of a group override as written, refused where it would land in hydra.*."""
    if o.package is None:
        return ""
    if o.package.removeprefix("_global_").lstrip(".").split(".")[0] == "hydra":
        raise UserError(
            f"'{o.input_line}' is refused: it puts a config into hydra.*, whose settings the "
            "command line may not change beyond the plain ones (see README, The trust model)."
        )
    return f"@{o.package}"


def _values(override: Any) -> list[Any]:
    """The value of an override, every value of a sweep (`a=1,2,3`), as a job gets it, or the
    bounds of an interval that a search draws from (`interval(1e-4, 1e-1)`)."""
    from hydra.core.override_parser.types import Glob, IntervalSweep

    value = override.value()
    if isinstance(value, IntervalSweep):
        return [value.start, value.end]
    if isinstance(value, Glob):  # Hydra expands it only once it runs: here, over conf/<group>/
        return glob_options(override)
    if override.is_sweep_override():
        return [_unquoted(v) for v in override.sweep_iterator()]
    return [value]


def glob_options(override: Any) -> list[str]:
    """The options of the group that `group=glob(...)` matches, in Hydra's order (sorted)."""
    group, glob = override.key_or_group, override.value()
    options = group_options(group)
    if not options:
        raise UserError(
            f"'{override.input_line}': glob() picks among the options of a config group "
            f"(a folder of conf/, e.g. experiment=glob(mnist_*)), and '{group}' is none: "
            f"list its values instead ({group}=a,b,c)."
        )
    matched = glob.filter(options)
    if not matched:
        raise UserError(
            f"'{override.input_line}' matches no config in conf/{group}/: the options are "
            f"{', '.join(options)}."
        )
    return matched


def _unquoted(value: Any) -> Any:
    """A sweep's element with its quoted strings as the text they hold."""
    from hydra.core.override_parser.types import QuotedString

    if isinstance(value, QuotedString):
        return value.text
    if isinstance(value, dict):
        return {k: _unquoted(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_unquoted(v) for v in value]
    return value


def _option_text(value: Any) -> str:
    """A group's option as an override writes it: `mlp`, or a list of options `[default,swa]`."""
    return f"[{','.join(map(str, value))}]" if isinstance(value, list) else str(value)


def _check_group_option(o: Any) -> None:
    _check_group_values(o.key_or_group, _values(o))


def _check_group_values(group: str, values: Iterable[Any]) -> None:
    options = group_options(group)
    # a list of options composes them all: callbacks=[default,early_stopping]
    chosen = [v for value in values for v in (value if isinstance(value, list) else [value])]
    for value in chosen:
        if value is None or value in options:
            continue
        close = difflib.get_close_matches(str(value), options, n=1)
        hint = f" Did you mean '{group}={close[0]}'?" if close else ""
        raise UserError(
            f"'{group}={value}' names no config in conf/{group}/: the options are "
            f"{', '.join(options)}.{hint}"
        )


_composed: dict[tuple, Any] = {}


def forget_compositions() -> None:
    """Drop what compose cached (a process that forks jobs must not hand them its own)."""
    _composed.clear()


def compose(config_name: str, overrides: list[str], hydra: bool = False) -> Any:
    """The config `python -m trainlab.<config_name> <overrides>` composes (with Hydra's own part
    where `hydra`), as a fresh copy; a UserError where it does not compose. Composed once per
    process for the same arguments: the command-line check, resume=auto and the run directory
    all ask for it before Hydra starts."""
    import copy

    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    key = (config_name, tuple(overrides), hydra)
    if key not in _composed:
        try:
            with initialize_config_dir(str(CONF_DIR), version_base="1.3", job_name=config_name):
                _composed[key] = compose(config_name, overrides, return_hydra_config=hydra)
        except (HydraException, AssertionError) as e:  # OmegaConf asserts on some bad updates
            raise UserError(f"the configs do not compose: {e}") from None
    return copy.deepcopy(_composed[key])


def compose_with_parameters(config_name: str, overrides: list[str]) -> Any:
    """Hydra's compose (inside its initialize_config_dir), where a key that no YAML file writes
    but the `_target_` above it takes as a parameter (`data.per_device=true`) is set as if
    written `++key=value`, as on the command line (check_command_line): for code that composes
    configs itself, such as tests and notebooks. Any other unknown key fails as in Hydra."""
    import re

    from hydra import compose as hydra_compose
    from hydra.errors import ConfigCompositionException

    overrides, marked = list(overrides), []
    while True:
        try:
            cfg = hydra_compose(config_name, overrides=overrides)
            break
        except ConfigCompositionException as e:  # Hydra names one key it cannot set at a time
            refused = re.match(r"Could not override '([^']+)'", str(e))
            at = [i for i, o in enumerate(overrides) if refused and _key_of(o) == refused[1]]
            if not at or refused[1] in marked:
                raise
            for i in at:  # a key given twice: Hydra's last one wins, once all can be set
                overrides[i] = f"++{overrides[i]}"
            marked.append(refused[1])
    tree = _to_tree(cfg)
    for key in marked:
        if _constructor_parameter(tree, key) is None:
            raise ConfigCompositionException(
                f"Could not override '{key}'.\nTo append to your config use +{key}=..."
            )
    return cfg


def _key_of(override: str) -> str:
    return override.partition("=")[0].lstrip("+~")


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


def _target_parameters(tree: dict, parent: str) -> tuple[str, dict[str, Any]] | None:
    """The `_target_` of the node at `parent` and the parameters it takes (engine.parameters),
    where conf/ names that target: code that no config file names is never looked into."""
    from trainlab.engine.parameters import parameters

    found, node = _lookup(tree, parent) if parent else (False, None)
    target = node.get("_target_") if found and isinstance(node, dict) else None
    if not isinstance(target, str) or target not in known_targets():
        return None
    accepted = parameters(target)
    return None if accepted is None else (target, accepted)


def _constructor_parameter(tree: dict, key: str) -> Any:
    """The parameter of the `_target_` above `key` that `key` names, or None."""
    parent, _, name = key.rpartition(".")
    found = _target_parameters(tree, parent)
    return found[1].get(name) if found else None


def parameter_default(target: Any, name: str) -> tuple[bool, Any]:
    """(True, the default) where `target`, a `_target_` that conf/ names, takes `name` with a
    literal default; else (False, None)."""
    from trainlab.engine.parameters import NO_DEFAULT, parameters

    if not isinstance(target, str) or target not in known_targets():
        return False, None
    parameter = (parameters(target) or {}).get(name)
    if parameter is None or parameter.default is NO_DEFAULT:
        return False, None
    return True, parameter.default


def _unknown_key_message(key: str, text: str, tree: dict) -> str:
    keys = list(_all_keys(tree)) + [p.name for p in CONF_DIR.iterdir() if p.is_dir()]
    parent = key.rpartition(".")[0]
    target = _target_parameters(tree, parent)
    unwritten = []  # parameters the target takes that no YAML file writes
    if target:
        found, node = _lookup(tree, parent)
        unwritten = [name for name in target[1] if name not in node]
        keys += [f"{parent}.{name}" for name in unwritten]
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    found, node = _lookup(tree, parent) if parent else (True, tree)
    siblings = ""
    if found and isinstance(node, dict):
        names = [k for k in node if not k.startswith("_")]
        siblings = (
            f" Keys under '{parent}': {', '.join(names)}"
            if parent
            else f" Top-level keys: {', '.join(names)}"
        )
        if unwritten:
            siblings += f"; {target[0]} also takes {', '.join(unwritten)}"
        siblings += "."
    return (
        f"'{text}' sets '{key}', which is not in the config.{hint}{siblings} "
        f"To add a new key on purpose, write +{text}."
    )


# The trust model (README, "The trust model"): configs are code, as a `_target_` names a
# callable that is called. Only the `_target_`s that the files in conf/ name are ever built,
# wherever a config comes from: the command line, a sweep, or a checkpoint.

# The hydra.* keys a command line (or a sweep's search space) may set: paths, verbosity, and
# the plain settings of the launchers and sweepers. The rest of hydra.* is code (callbacks,
# logging handlers), environment variables or commands (the launcher's module, SLURM's setup
# lines), and is set in conf/hydra/ only.
HYDRA_KEYS = (
    "hydra.run.dir",
    "hydra.sweep.dir",
    "hydra.sweep.subdir",
    "hydra.output_subdir",
    "hydra.job.name",  # with output_subdir, set by Lightning's DDP launcher for its children
    "hydra.verbose",
    "hydra.job.chdir",
    "hydra.mode",
    "hydra.launcher.n_jobs",
    "hydra.launcher.gpus_per_job",
    "hydra.launcher.dry_run",
    "hydra.launcher.warm",
    "hydra.launcher.partition",
    "hydra.launcher.timeout_min",
    "hydra.launcher.nodes",
    "hydra.launcher.gpus_per_node",
    "hydra.launcher.tasks_per_node",
    "hydra.launcher.cpus_per_task",
    "hydra.launcher.mem_gb",
    "hydra.launcher.array_parallelism",
    "hydra.sweeper.n_trials",
    "hydra.sweeper.metric",
    "hydra.sweeper.direction",
    "hydra.sweeper.study_name",
    "hydra.sweeper.seed",
    "hydra.sweeper.max_batch_size",
    "hydra.sweeper.storage",
    "hydra.sweeper.pruner",
    "hydra.sweeper.pruner_args.*",
    "hydra.sweeper.storage",
    "hydra.sweeper.pruner",
    "hydra.sweeper.pruner_args.*",
    "hydra.sweeper.params.*",  # a search space: its values are checked like the command line's
    "hydra/launcher",
    "hydra/sweeper",
    "hydra/job_logging",
    "hydra/hydra_logging",
)
# Hydra builds its launcher and sweeper from registered plugin classes only.
PLUGIN_NODES = ("hydra.launcher", "hydra.sweeper")
# Resolvers that turn text into config nodes when a value is resolved.
NODE_MAKERS = ("oc.create", "oc.decode")


def _refuse_other_configs(args: Any) -> None:
    """Configs come from conf/ alone: another config dir could name any code, and a rerun
    pickle is unpickled (code) before any check."""
    for flag, given in (
        ("--config-dir (-cd)", args.config_dir),
        ("--config-path (-cp)", args.config_path),
        ("--experimental-rerun", args.experimental_rerun),
    ):
        if given is not None:
            raise UserError(
                f"{flag} {given} is refused: configs are read from {CONF_DIR} only, so that "
                "nothing builds code that no file there names. Copy the configs you need into "
                "conf/ (e.g. conf/experiment/) and select them with group=option."
            )
    name = args.config_name
    if name is not None and not (_plain_name(name) and (CONF_DIR / f"{name}.yaml").is_file()):
        raise UserError(
            f"--config-name (-cn) {name} is refused: it must name a config at the top of "
            f"{CONF_DIR} ({', '.join(sorted(p.stem for p in CONF_DIR.glob('*.yaml')))})."
        )


def check_hydra_override(o: Any) -> None:
    """A hydra.* override must set one of HYDRA_KEYS to a plain value."""
    key = o.key_or_group
    _check_hydra_key(key, f"'{o.input_line}'", deleted=o.is_delete())
    if key.startswith("hydra.sweeper.params."):
        value = o.value() if isinstance(o.value(), str) else o.input_line.split("=", 1)[1]
        check_sweep_params({key.removeprefix("hydra.sweeper.params."): value}, o.input_line)
        return
    check_sweep_setting(_written_key(o), _values(o), f"'{o.input_line}'")


def _written_key(o: Any) -> str:
    """An override's key as written, with its +, ++ or ~."""
    return o.input_line.partition("=")[0]


def _is_hydra(key: str) -> bool:
    return key == "hydra" or key.startswith(("hydra.", "hydra/"))


def check_sweep_setting(written: str, values: Iterable[Any], source: str, cfg: Any = None) -> str:
    """One key that a sweep sets in each of its jobs, with every value it may give it: a `-m`
    sweep on the command line, a search space (hydra.sweeper.params, an hparams_search file,
    the Optuna sweeper's) or a W&B sweep's parameter. Each job's command line gets
    `written=value`, so both are checked as that command line would be: a flag (anything that
    starts with -, such as --config-dir or --experimental-rerun) is refused; the key, its +, ++
    or ~ taken off, must read as written in Hydra's grammar, be one of HYDRA_KEYS under hydra.*
    and name an option in conf/ for a group; and each value passes check_sweep_value, which
    compares a `_target_` given as the key or inside a value with the allow-list, and, given
    the config `cfg` the jobs start from, with what the `_target_` above the key declares.
    Returns the key that the jobs set."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    key = written.removeprefix("++").removeprefix("+").removeprefix("~")
    if written.startswith("-") or key.startswith(("-", "+", "~")):
        raise UserError(
            f"{source} is refused: {written} is a flag, not a config key. Each job's command "
            f"line would get {written}=<value>, which Hydra reads as an option of its own (as "
            "--config-dir or --experimental-rerun, which load configs or pickles from "
            "elsewhere). A sweep sets config keys only, e.g. optimizer.lr."
        )
    try:
        o = OverridesParser.create().parse_override(f"{written}=0")
    except HydraException:
        o = None
    package = "" if o is None or o.package is None else f"@{o.package}"
    if o is None or f"{o.key_or_group}{package}" != key:
        raise UserError(
            f"{source} is refused: {written!r} is not a config key as Hydra reads one: dotted "
            "names (optimizer.lr), a group (model) or hydra/<group>, after +, ++ or ~ at most."
        )
    key = o.key_or_group
    into_hydra = package.lstrip("@").removeprefix("_global_").lstrip(".").split(".")[0] == "hydra"
    if _is_hydra(key) or into_hydra:
        _check_hydra_key(f"{key}{package}" if into_hydra else key, source, o.is_delete())
    values = list(values)
    for value in values:
        check_sweep_value(key, value, source, cfg)
        if key.startswith("hydra.sweeper.params.") and isinstance(value, str):  # a search space
            check_sweep_params({key.removeprefix("hydra.sweeper.params."): value}, source, cfg)
    if (CONF_DIR / key).is_dir():
        _check_group_values(key, values)
    return key


def _check_hydra_key(key: str, source: str, deleted: bool = False) -> None:
    import fnmatch

    if deleted or not any(fnmatch.fnmatchcase(key, k) for k in HYDRA_KEYS):
        raise UserError(
            f"{source} is refused: of Hydra's own settings, a command line or a sweep may set "
            "only the run and sweep directories (hydra.run.dir, hydra.sweep.dir, "
            "hydra.sweep.subdir), hydra.verbose, the plain settings of the launcher and the "
            "sweeper (e.g. hydra.launcher.n_jobs, hydra.sweeper.n_trials), a search space "
            "(hydra.sweeper.params.<key>) and the groups hydra/launcher, hydra/sweeper, "
            "hydra/job_logging and hydra/hydra_logging. The others build code, set environment "
            "variables or run commands: change them in conf/hydra/ instead."
        )


def check_sweep_value(key: str, value: Any, source: str, cfg: Any = None) -> None:
    """One value that a command line or a sweep gives `key`: no code that no config file
    names, no text that turns into nodes, a plain value for hydra.*, RULES, and, given the
    config `cfg` the sweep's jobs start from, what the `_target_` above `key` declares."""
    if _is_hydra(key):
        _check_hydra_key(key, source)
        if key.startswith("hydra/") and not (value is None or _plain_name(value)):
            raise UserError(f"{source} is refused: {key} takes the name of an option.")
        if not (value is None or isinstance(value, (str, int, float, bool))):
            raise UserError(
                f"{source} is refused: {key} takes a plain value (a number, a word or a "
                f"path), not {value!r}."
            )
    parent, _, name = key.rpartition(".")
    _refuse_unknown_targets({name: value}, source, parent)  # `model.net._target_=...` too
    for text in _strings(value):
        if _makes_nodes(text):
            raise UserError(
                f"{source} gives {key} the text {text!r}, which turns into config nodes only "
                "when resolved, out of reach of the checks: write the value out instead."
            )
    if not (CONF_DIR / key).is_dir():  # a group's options are files in conf/
        check_value(key, value, source)
        parent = _parent(cfg, key) if cfg is not None else None
        if parent is not None:
            check_declared(parent.get("_target_"), key, value, source)


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def check_sweep_params(params: Any, source: str, cfg: Any = None) -> None:
    """A search space (hydra.sweeper.params, an hparams_search file, an Optuna or W&B sweep):
    each key is set for a job as a command line would set it, so the same checks apply (those
    of the `_target_`s' declarations given `cfg`, the config the jobs start from)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    for key, expression in (params or {}).items():
        if isinstance(expression, Mapping):  # `hydra.sweeper.params.a.b=...` nests: a.b
            check_sweep_params({f"{key}.{k}": v for k, v in expression.items()}, source, cfg)
            continue
        text = f"{key}={expression}"
        try:
            o = parser.parse_override(text)
        except HydraException as e:
            check_sweep_setting(str(key), [], f"'{text}' in {source}")  # a flag, say
            raise UserError(
                f"the search space of {source} cannot be read at '{text}': "
                f"{str(e).splitlines()[0]}."
            ) from None
        check_sweep_setting(str(key), _values(o), f"'{text}' in {source}", cfg)


def known_targets() -> set[str]:
    """Every `_target_` that the config files name: the only code a config may build. (Read
    again whenever a file in conf/ changes, as a long-lived process may see them change.)"""
    return set(_targets_in(tuple((p, p.stat().st_mtime_ns) for p in CONF_DIR.rglob("*.yaml"))))


@functools.cache
def _targets_in(files: tuple[tuple[Path, int], ...]) -> frozenset[str]:
    import re

    # also list items (`- _target_: ...`), as in lists of transforms
    pattern = re.compile(r"^\s*(?:-\s+)?_target_:\s*([\w.]+)\s*$", re.MULTILINE)
    return frozenset(m for path, _ in files for m in pattern.findall(path.read_text()))


# `_target_`s that conf/ once named by another path (package re-exports, the net now called
# ClassicCNN, the modules that moved into trainlab.models and trainlab.engine). A checkpoint's
# stored config is read with the new names (checkpoint.read), so that runs trained before still
# evaluate, export and resume.
MOVED_TARGETS = {
    "trainlab.nets.MLP": "trainlab.nets.mlp.MLP",
    "trainlab.nets.SmallCNN": "trainlab.nets.cnn.SmallCNN",
    "trainlab.nets.convnet.ConvNet": "trainlab.nets.cnn_classic.ClassicCNN",
    "trainlab.data.DigitsDataModule": "trainlab.data.digits.DigitsDataModule",
    "trainlab.data.MNISTDataModule": "trainlab.data.vision.MNISTDataModule",
    "trainlab.data.FashionMNISTDataModule": "trainlab.data.vision.FashionMNISTDataModule",
    "trainlab.data.CIFAR10DataModule": "trainlab.data.vision.CIFAR10DataModule",
    "trainlab.data.ImageFolderDataModule": "trainlab.data.folder.ImageFolderDataModule",
    "trainlab.callbacks.NullProfiler": "trainlab.engine.profiler.NullProfiler",
}
MOVED_MODULES = {  # old module prefix: new one
    **{f"trainlab.{m}.": f"trainlab.models.{m}." for m in ("classifier", "gan", "schedulers")},
    "trainlab.language_model.": "trainlab.models.language_model.",
    "trainlab.callbacks.": "trainlab.engine.callbacks.",
    "trainlab.profiler.": "trainlab.engine.profiler.",
}


def moved_target(target: str) -> str:
    """The name conf/ gives today to a `_target_` a stored config names."""
    target = MOVED_TARGETS.get(target, target)
    for old, new in MOVED_MODULES.items():
        if target.startswith(old):
            return new + target[len(old) :]
    return target


def rename_moved_targets(tree: Any) -> None:
    """Give the `_target_`s of a plain stored config (dicts and lists) their names of today
    (moved_target), in place."""
    if isinstance(tree, dict):
        if isinstance(tree.get("_target_"), str):
            tree["_target_"] = moved_target(tree["_target_"])
        children = list(tree.values())
    else:
        children = tree if isinstance(tree, list) else []
    for child in children:
        rename_moved_targets(child)


def check_targets(cfg: Any, source: str) -> None:
    """Refuse a config that would build code no config file names: a `_target_` at any depth,
    in dicts and lists, as written and as resolved (${oc.create:...} and ${oc.decode:...} make
    nodes only when resolved). For stored configs and for each run's config before anything
    in it is built."""
    _refuse_unknown_targets(_plain(cfg), source)
    _refuse_unknown_targets_when_resolved(cfg, source)


def _refuse_unknown_targets(tree: Any, source: str, prefix: str = "") -> None:
    found = _unknown_target(tree, known_targets(), prefix)
    if found:
        raise _target_error(source, *found)


def _target_error(source: str, path: str, target: Any) -> UserError:
    return UserError(
        f"{source} asks to build {target!r} (at {path}), which no file in {CONF_DIR} names. "
        "Only the _target_ values that the config files name are built, from the command "
        "line, sweeps and checkpoints alike: to build something new, add a config file for it."
    )


def _unknown_target(tree: Any, allowed: set[str], path: str = "") -> tuple[str, Any] | None:
    """The first `_target_` in a plain tree (dicts and lists, any depth) that is not allowed."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            here = f"{path}.{key}" if path else str(key)
            known = isinstance(value, str) and value in allowed
            if key == "_target_" and not known and path not in PLUGIN_NODES:
                return here, value
            found = _unknown_target(value, allowed, here)
            if found:
                return found
    elif isinstance(tree, list):
        for i, value in enumerate(tree):
            found = _unknown_target(value, allowed, f"{path}[{i}]")
            if found:
                return found
    return None


def _refuse_unknown_targets_when_resolved(cfg: Any, source: str) -> None:
    """Resolve every interpolation (hydra.* aside) and look into the nodes it makes. One that
    cannot be resolved here is refused if it could make nodes; otherwise the entry point
    checks it again, resolved, before it builds anything."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if not OmegaConf.is_config(cfg):
        try:
            cfg = OmegaConf.create(cfg)
        except Exception:
            return  # not a config OmegaConf reads, so nothing in it resolves
    stack: list[tuple[Any, str]] = [(cfg, "")]
    while stack:
        node, path = stack.pop()
        keys = node.keys() if isinstance(node, DictConfig) else range(len(node))
        for key in keys:
            here = f"{path}.{key}" if path else str(key)
            if here == "hydra":
                continue  # paths and plain values only (check_hydra_override)
            child = node._get_node(key)
            if child is None:
                continue
            if child._is_interpolation():
                text = str(child._value())
                try:
                    value = node[key]
                    tree = _plain(value, resolve=True) if OmegaConf.is_config(value) else value
                except Exception:
                    if _makes_nodes(text):
                        raise UserError(
                            f"{source} sets {here} to {text!r}, which makes config nodes from "
                            "text that cannot be checked before the run: write the value out."
                        ) from None
                    continue
                _refuse_unknown_targets(tree, f"{source} ({here}: {text!r})", here)
            elif isinstance(child, (DictConfig, ListConfig)) and _has_content(child):
                stack.append((child, here))


def _has_content(node: Any) -> bool:
    return not (node._is_missing() or node._is_none())


def _makes_nodes(text: str) -> bool:
    """Whether an interpolation may turn text into nodes: a node-making resolver, or a resolver
    whose name is itself computed (${${name}:...})."""
    import re

    squeezed = re.sub(r"\s+", "", text)
    computed_name = re.search(r"\$\{[\w.]*\$\{", squeezed)  # ${${a}:...}, ${oc.${b}:...}
    return any(m in squeezed for m in NODE_MAKERS) or computed_name is not None


def _plain(cfg: Any, resolve: bool = False) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=resolve) if OmegaConf.is_config(cfg) else cfg


def _check_references(cfg: Any, overrides: list[Any]) -> None:
    """A value the command line gives that refers to a key the config has not (`${x}` in a
    log dir, say): one paragraph here, not Hydra's traceback once the job starts."""
    from omegaconf import OmegaConf
    from omegaconf.errors import InterpolationKeyError

    for o in overrides:
        if isinstance(o.value(), str) and "${" in o.value():
            try:
                OmegaConf.select(cfg, o.key_or_group, throw_on_resolution_failure=True)
            except InterpolationKeyError:
                raise UserError(
                    f"'{o.input_line}' refers with ${{...}} to a key that the config does not "
                    "have (Hydra reads ${...} as a reference to another key): write the value "
                    "out, or escape it as \\${...} to keep the text as written."
                ) from None
            except Exception:
                continue  # e.g. ${hydra:...}, resolved only inside a run


def _check_whole_config(base: Any, overrides: list[Any]) -> Any:
    """Apply the key overrides to the composed config as Hydra does (hydra.* included, sweeps
    aside) and refuse any code in the result that no config file names; then check each value
    of each sweep as its job will get it. The config with the overrides applied."""
    import copy

    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra.errors import HydraException

    full = copy.deepcopy(base)
    try:
        single = [o for o in overrides if not o.is_sweep_override()]
        ConfigLoaderImpl._apply_overrides_to_config(single, full)
    except (HydraException, AssertionError) as e:  # OmegaConf asserts on some bad updates
        raise UserError(f"the configs do not compose: {e}") from None
    found = _unknown_target(_plain(full), known_targets())
    if found:
        path = found[0]
        culprit = next((o.input_line for o in overrides if path.startswith(o.key_or_group)), None)
        raise _target_error(f"'{culprit}'" if culprit else "the command line's config", *found)
    check_targets(full, "the command line")
    _check_references(full, single)
    check_values(full)
    check_hardware(full)  # trainlab.engine.compute
    check_sweep_params(full.hydra.sweeper.get("params"), "hydra.sweeper.params", full)
    for o in overrides:
        if o.is_sweep_override() and not _is_hydra(o.key_or_group):
            check_sweep_setting(_written_key(o), _values(o), f"'{o.input_line}'", full)
    return full
