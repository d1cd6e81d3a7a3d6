"""A trial of an Optuna sweep reports its metric to the study after every epoch, and stops early
when the study's pruner says it will not catch up.

The Optuna sweeper (hydra_plugins/trainlab_sweeps/optuna_sweeper.py) tells each trial process
where its study is (the environment variable STUDY_ENV, as JSON); the process launcher tells
it its job's number (JOB_ENV), which is the trial's. A pruned run stops at the end of the
epoch like any finished one, keeping its checkpoints and curves; train() records it "pruned".
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import lightning.pytorch as pl

from hydra_plugins.trainlab_sweeps.optuna_sweeper import STUDY_ENV, make_pruner, open_storage
from hydra_plugins.trainlab_sweeps.process_launcher import JOB_ENV
from trainlab.engine.callbacks.monitor import tracker
from trainlab.engine.callbacks.progress import epoch_label


def study_command() -> str | None:
    """In a trial of an Optuna sweep, the command that continues it inside its study: the
    sweep's, run again (a trial continued alone would never report its value)."""
    study, number = os.environ.get(STUDY_ENV), os.environ.get(JOB_ENV)
    return json.loads(study).get("resume") if study and number else None


def pruned(trainer: pl.Trainer) -> bool:
    return any(isinstance(c, ReportToStudy) and c.pruned for c in trainer.callbacks)


class ReportToStudy(pl.Callback):
    """trial.report(best so far, epoch) after each validation, and should_prune(); with several
    devices rank 0 asks the study and tells the others. Outside a trial of an Optuna sweep
    (neither STUDY_ENV nor JOB_ENV set) it does nothing."""

    def __init__(self):
        study, number = os.environ.get(STUDY_ENV), os.environ.get(JOB_ENV)
        self.study: dict[str, Any] | None = json.loads(study) if study and number else None
        self.number = int(number) if self.study else None
        self.pruned = False
        self._trial: Any = None
        self._reported: set[int] = set()

    def on_fit_start(self, trainer, pl_module) -> None:
        if self.study and trainer.is_global_zero:
            try:
                self._trial = self._open_trial()
            except Exception as e:
                self._give_up(e)

    def on_validation_end(self, trainer, pl_module) -> None:
        epoch = trainer.current_epoch
        if not self.study or trainer.sanity_checking or epoch in self._reported:  # once an epoch
            return
        self._reported.add(epoch)
        prune = False
        # The run's best value of the monitored metric so far: the trial's value at its end.
        monitored = tracker(trainer)
        value = monitored.update(trainer) if monitored else None
        if self._trial is not None and value is not None:
            try:
                self._trial.report(float(value), epoch)
                prune = self._trial.should_prune()
            except Exception as e:  # the study's storage out of reach: the run matters more
                self._give_up(e)
        if trainer.world_size > 1:
            prune = trainer.strategy.broadcast(prune)
        if prune:
            self.pruned = True
            trainer.should_stop = True  # a normal end: checkpoints and logs are written
        if prune and trainer.is_global_zero:
            print(
                f"Trial {self.number} pruned after {epoch_label(epoch)} "
                f"(best {monitored.metric} so far {value:.4f}): stopping."
            )

    def _open_trial(self) -> Any:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.load_study(
            study_name=self.study["study"],
            storage=open_storage(self.study["storage"]),
            pruner=make_pruner(self.study["pruner"], self.study.get("pruner_args")),
        )
        (frozen,) = (t for t in study.get_trials(deepcopy=False) if t.number == self.number)
        return optuna.trial.Trial(study, frozen._trial_id)

    def _give_up(self, error: Exception) -> None:
        self._trial = None
        print(
            f"warning: trial {self.number} cannot reach its study at {self.study['storage']} "
            f"({type(error).__name__}: {error}); it trains to its end without pruning.",
            file=sys.stderr,
        )
