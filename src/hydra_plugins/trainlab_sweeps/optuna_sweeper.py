"""Bayesian search with Optuna (TPE by default), on current Optuna releases.

The search space is written in Hydra's sweep syntax, e.g.
    optimizer.lr: tag(log, interval(1e-4, 1e-1))
    data.batch_size: choice(32, 64, 128)
Trials run through the sweep's launcher (one process each, n_jobs at a time). The study lives
in <sweep dir>/optuna.db, so the same command run again continues the study: finished trials
are kept and counted, a trial cut off by an interruption is marked failed and not counted.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep
from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from omegaconf import DictConfig

log = logging.getLogger(__name__)

STORAGE_FILE = "optuna.db"


class OptunaSweeper(Sweeper):
    def __init__(
        self,
        params: dict[str, str],
        n_trials: int,
        metric: str = "val/acc_best",
        direction: str = "maximize",
        study_name: str = "study",
        seed: int | None = None,
    ) -> None:
        self.params = dict(params or {})
        self.n_trials = n_trials
        self.metric = metric
        self.direction = direction
        self.study_name = study_name
        self.seed = seed
        self.config: DictConfig | None = None
        self.launcher: Any = None

    def setup(self, *, hydra_context, task_function, config: DictConfig) -> None:
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def sweep(self, arguments: list[str]) -> None:
        import optuna
        from optuna.trial import TrialState

        assert self.config is not None
        space = search_space(self.params)
        fixed = _fixed_arguments(arguments)
        if self.config.hydra.launcher.get("dry_run"):
            goal = "maximising" if self.direction == "maximize" else "minimising"
            print(f"Optuna study '{self.study_name}': {self.n_trials} trials {goal} {self.metric}")
            for key, dist in space.items():
                print(f"  {key}: {dist}")
            print(f"Each trial also gets: {' '.join(fixed) or '(no other overrides)'}")
            return

        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(
            study_name=self.study_name,
            storage=f"sqlite:///{sweep_dir / STORAGE_FILE}",
            direction=self.direction,
            sampler=optuna.samplers.TPESampler(seed=self.seed),
            load_if_exists=True,
        )
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            log.info(f"Trial {trial.number} was cut off by an interruption: marked failed")
            study.tell(trial.number, state=TrialState.FAIL)

        def counted() -> int:  # finished trials and trials that failed on their own
            return sum(
                t.state == TrialState.COMPLETE or "error" in t.user_attrs
                for t in study.get_trials(deepcopy=False)
            )

        if counted():
            log.info(f"Continuing study '{self.study_name}': {counted()} of {self.n_trials} done")
        batch = getattr(self.launcher, "n_jobs", 1)
        while (done := counted()) < self.n_trials:
            trials = [study.ask(space) for _ in range(min(batch, self.n_trials - done))]
            overrides = [fixed + [f"{k}={t.params[k]}" for k in space] for t in trials]
            returns = self.launcher.launch(overrides, initial_job_idx=trials[0].number)
            for trial, ret in zip(trials, returns, strict=True):
                record = ret.return_value or {}
                value = record.get(self.metric) if record.get("status") == "finished" else None
                if value is None or not math.isfinite(value):
                    trial.set_user_attr("error", record.get("error") or f"no {self.metric}")
                    study.tell(trial, state=TrialState.FAIL)
                else:
                    study.tell(trial, value)

        completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if completed:
            best = study.best_trial
            params = " ".join(f"{k}={v}" for k, v in best.params.items())
            log.info(f"Best {self.metric} = {best.value:.4f} (trial {best.number}): {params}")


def search_space(params: dict[str, str]) -> dict[str, Any]:
    """Optuna distributions from Hydra sweep expressions."""
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    parser = OverridesParser.create()
    space = {}
    for key, expression in params.items():
        value = parser.parse_override(f"{key}={expression}").value()
        log_scale = "log" in getattr(value, "tags", set())
        if isinstance(value, ChoiceSweep):
            space[key] = CategoricalDistribution(list(value.list))
        elif isinstance(value, IntervalSweep):
            ints = isinstance(value.start, int) and isinstance(value.end, int)
            dist = IntDistribution if ints else FloatDistribution
            space[key] = dist(value.start, value.end, log=log_scale)
        elif isinstance(value, RangeSweep):
            space[key] = CategoricalDistribution(list(range(value.start, value.stop, value.step)))
        else:
            raise ValueError(
                f"hydra.sweeper.params.{key}={expression!r} is not a search space: use "
                "choice(a, b, ...), interval(lo, hi), tag(log, interval(lo, hi)) or range(...)"
            )
    return space


def _fixed_arguments(arguments: list[str]) -> list[str]:
    """Command-line overrides shared by every trial; sweeps belong in the search space."""
    parsed = OverridesParser.create().parse_overrides(arguments)
    for override in parsed:
        if override.is_sweep_override():
            raise ValueError(
                f"'{override.input_line}' sweeps, but with the Optuna sweeper the search "
                f"space goes in hydra.sweeper.params (e.g. "
                f"'hydra.sweeper.params.{override.get_key_element()}=choice(...)')."
            )
    return [o.input_line for o in parsed]
