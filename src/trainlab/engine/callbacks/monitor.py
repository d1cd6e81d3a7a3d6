"""The best value a run reached of the monitored metric (the config's top-level `monitor`).

Whatever says which epoch or which run is best reads the same `monitor`: best.ckpt
(conf/callbacks/default.yaml), the Optuna sweeper and its pruning, the W&B summary, compare and
wandb_sweep. Best tracks the run's best value itself, so that none of them depends on a model
logging a `*_best` metric or on a checkpoint callback being configured; train() records it in
metrics.json as `monitor: {metric, mode, best, epoch}`.
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl

from trainlab.engine.errors import UserError


class Best(pl.Callback):
    """The best finite value of `metric` after any validation (sanity checks aside), and the
    epoch it came at. Kept in checkpoints, so a resumed run remembers the epochs before."""

    def __init__(self, metric: str | None, mode: str = "max"):
        self.metric = metric
        self.mode = mode
        self.best: float | None = None
        self.epoch: int | None = None

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        logged = trainer.callback_metrics
        if self.metric and self.metric not in logged and not trainer.sanity_checking:
            raise UserError(
                f"monitor.metric={self.metric} was not logged by validation (the metrics logged "
                f"so far: {', '.join(sorted(logged))}): set monitor.metric to one of them, and "
                "monitor.mode to min or max as lower or higher is better.",
                discard=True,  # no best was ever known: nothing of the run is worth resuming
            )
        self.update(trainer)

    def update(self, trainer: pl.Trainer) -> float | None:
        """Take in the value just validated (any number of calls per validation: the same
        value changes nothing); the best so far."""
        value = trainer.callback_metrics.get(self.metric) if self.metric else None
        if value is None or trainer.sanity_checking or not math.isfinite(float(value)):
            return self.best
        value = float(value)
        if self.best is None or (value < self.best if self.mode == "min" else value > self.best):
            self.best, self.epoch = value, trainer.current_epoch
        return self.best

    def record(self) -> dict[str, Any]:
        return {"metric": self.metric, "mode": self.mode, "best": self.best, "epoch": self.epoch}

    def state_dict(self) -> dict[str, Any]:
        return self.record()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("metric") == self.metric and state.get("mode") == self.mode:
            self.best, self.epoch = state.get("best"), state.get("epoch")


def tracker(trainer: pl.Trainer) -> Best | None:
    return next((c for c in trainer.callbacks if isinstance(c, Best)), None)
