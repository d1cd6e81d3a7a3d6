"""Write a W&B sweep definition for the same search space as an `hparams_search` config.

    python -m trainlab.wandb_sweep hparams_search=optuna_lr_batch [fixed overrides] > sweep.yaml
    wandb sweep sweep.yaml           # prints the sweep id
    wandb agent <entity/project/id>  # on each machine that should run trials

The agent runs `python -m trainlab.train <fixed overrides> key=value ...`: W&B's
${args_no_hyphens} writes the sampled values as Hydra overrides.
"""

from __future__ import annotations

import sys
from typing import Any

from trainlab.errors import UserError, exit_on_user_error


def definition(overrides: list[str]) -> dict[str, Any]:
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep

    from trainlab.config import CONF_DIR

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
    return {
        "method": "bayes" if searched else "grid",
        "metric": {
            "name": cfg.hydra.sweeper.get("metric", "val/acc_best"),
            "goal": cfg.hydra.sweeper.get("direction", "maximize"),
        },
        "parameters": parameters,
        "command": [
            "${env}",
            "${interpreter}",
            "-m",
            "trainlab.train",
            *fixed,
            "${args_no_hyphens}",
        ],
    }


def main() -> None:
    import yaml

    with exit_on_user_error():
        print(yaml.safe_dump(definition(sys.argv[1:]), sort_keys=False), end="")


if __name__ == "__main__":
    main()
