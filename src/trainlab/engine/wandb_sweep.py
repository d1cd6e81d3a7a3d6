"""Write a W&B sweep definition for the same search space as an `hparams_search` config.

    python -m trainlab.wandb_sweep hparams_search=optuna_lr_batch [fixed overrides] > sweep.yaml
    wandb sweep sweep.yaml           # prints the sweep id
    wandb agent <entity/project/id>  # on each machine that should run trials

The agent runs `python -m trainlab.train <fixed overrides> key=value ...`: W&B's
${args_no_hyphens} writes the sampled values as Hydra overrides.

    python -m trainlab.wandb_sweep --check sweep.yaml

checks a sweep definition that someone else wrote or edited: it must run trainlab.train, and
each key and value it may give passes the checks of a command line (config.check_sweep_setting:
no flags, no hydra.* beyond its plain settings, no `_target_` that conf/ does not name; see
docs/trust.md).
Each trial's command line is checked again when it starts, whatever the W&B server sends.
"""

from __future__ import annotations

import sys
from typing import Any

from trainlab.engine import stopping
from trainlab.engine.errors import UserError, exit_on_user_error

COMMAND_HEAD = ["${env}", "${interpreter}", "-m", "trainlab.train"]
COMMAND_TAIL = "${args_no_hyphens}"


def definition(overrides: list[str]) -> dict[str, Any]:
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep

    from hydra_plugins.trainlab_sweeps.optuna_sweeper import direction
    from trainlab.engine.config import CONF_DIR, check_command_line

    overrides = check_command_line("train", overrides)
    with initialize_config_dir(str(CONF_DIR), version_base="1.3", job_name="train"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    params = cfg.hydra.sweeper.get("params") or {}
    if not params:
        raise UserError(
            "no search space: choose one with hparams_search=<name> (see conf/hparams_search/) "
            "or give hydra.sweeper.params.<key>=<values>."
        )

    parser = OverridesParser.create()
    parameters: dict[str, Any] = {}
    for key, expression in params.items():
        value = parser.parse_override(f"{key}={expression}").value()
        if isinstance(value, IntervalSweep):
            log_scale = "log" in value.tags
            ints = isinstance(value.start, int) and isinstance(value.end, int)
            kind = (
                ("q_log_uniform_values" if log_scale else "int_uniform")
                if ints
                else ("log_uniform_values" if log_scale else "uniform")
            )
            parameters[key] = {"distribution": kind, "min": value.start, "max": value.end}
        elif isinstance(value, ChoiceSweep):
            parameters[key] = {"values": list(value.list)}
        elif isinstance(value, RangeSweep):
            parameters[key] = {"values": list(range(value.start, value.stop, value.step))}
        else:  # a single value
            parameters[key] = {"value": value}

    searched = any("distribution" in p for p in parameters.values())
    fixed = [o for o in overrides if not o.startswith(("hparams_search=", "hydra."))]
    if searched and not cfg.monitor.metric:
        raise UserError(
            "monitor.metric is null, so W&B's Bayesian search has nothing to optimise: set the "
            "metric whose best value ranks runs, e.g. 'monitor.metric=val/loss monitor.mode=min'."
        )
    sweep: dict[str, Any] = {"method": "bayes" if searched else "grid"}
    if (
        cfg.monitor.metric
    ):  # W&B reads the run summary's, which trainlab.engine.loggers makes the best
        sweep["metric"] = {"name": cfg.monitor.metric, "goal": direction(cfg)}
    sweep["parameters"] = parameters
    sweep["command"] = [*COMMAND_HEAD, *fixed, COMMAND_TAIL]
    check_definition(sweep, "the sweep definition")
    return sweep


def check_definition(sweep: Any, source: str) -> None:
    """Refuse a W&B sweep definition that runs anything but trainlab.train, or that may give a
    key or value that a command line could not (a flag, code that no config file names,
    hydra.* beyond plain settings, a value that breaks RULES)."""
    from trainlab.engine.config import check_command_line, check_sweep_setting

    command = sweep.get("command") if isinstance(sweep, dict) else None
    if (
        "program" in sweep
        or not isinstance(command, list)
        or command[: len(COMMAND_HEAD)] != COMMAND_HEAD
        or command[-1:] != [COMMAND_TAIL]
        or any(not isinstance(arg, str) or arg.startswith("-") for arg in command[4:-1])
    ):
        raise UserError(
            f"{source} does not run `{' '.join(COMMAND_HEAD)} <overrides> {COMMAND_TAIL}` "
            f"(its command is {command!r}): W&B would run whatever it names. Write the "
            "definition with python -m trainlab.wandb_sweep."
        )
    check_command_line("train", command[len(COMMAND_HEAD) : -1])
    parameters = sweep.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise UserError(f"{source}: its parameters must be a mapping of keys, not {parameters!r}.")
    for key, spec in parameters.items():
        spec = spec if isinstance(spec, dict) else {"value": spec}
        if "parameters" in spec:  # W&B would hand the job a whole dict for the key
            raise UserError(
                f"{source}: the parameter {key} nests parameters of its own; write each one "
                "as a dotted key (optimizer.lr), as python -m trainlab.wandb_sweep does."
            )
        values = spec.get("values") or [spec[k] for k in ("value", "min", "max") if k in spec]
        # the agent runs `key=value` for each (${args_no_hyphens}): checked as that command line
        check_sweep_setting(str(key), values, f"the parameter {key} in {source}")


def main() -> None:
    try:
        _main()
    except stopping.Stopped as stop:
        stopping.exit_with(stop, f"stopped by {stop.name}; nothing was checked or written.")


def _main() -> None:
    import yaml

    with exit_on_user_error():
        if sys.argv[1:2] == ["--check"]:
            for name in sys.argv[2:]:
                check_definition(_read(name), name)
                print(f"{name}: runs trainlab.train, and every value it may give passes")
            return
        print(yaml.safe_dump(definition(sys.argv[1:]), sort_keys=False), end="")


def _read(name: str) -> Any:
    import yaml

    try:
        with open(name, encoding="utf-8") as f:
            return yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"cannot read the sweep definition {name}: {e}") from None


if __name__ == "__main__":
    main()
