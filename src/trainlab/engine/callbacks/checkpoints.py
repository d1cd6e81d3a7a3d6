"""Callbacks that make every checkpoint self-describing and resumable, keep last.ckpt at the
run's latest state, and apply the optimizer settings a resumed run was allowed to change.

Reading checkpoints back, and what a resume may change, is trainlab.engine.checkpoint's.
"""

from __future__ import annotations

import contextlib
import random
import subprocess
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Checkpoint

from trainlab import __version__
from trainlab.engine.callbacks import RunInfo
from trainlab.engine.checkpoint import KEY


class CheckpointRecord(pl.Callback):
    """Makes every checkpoint self-describing and resumable to the bit.

    Beside Lightning's own state it stores the resolved run config (plain dicts and lists), the
    git commit, the versions of the main packages, the W&B run id (a resumed run continues the
    same W&B run), the random number generators' states (a resumed run draws the same
    dropout masks and data order as an uninterrupted one), and the class names where the data
    set has them (an exported model names its predictions with them). The config is
    run_info.config (see trainlab.engine.callbacks.RunInfo).
    """

    def __init__(self):
        self.run_info = RunInfo()
        self.commit = _git_commit()
        self._restored = False

    def on_fit_start(self, trainer, pl_module) -> None:
        # Under DDP each rank draws its own dropout masks and augmentations: seed + rank (a
        # resumed run has just had its generators restored instead).
        seed = self.run_info.config.get("seed")
        if trainer.world_size > 1 and seed is not None and not self._restored:
            pl.seed_everything(seed + trainer.global_rank, workers=True, verbose=False)

    def on_train_start(self, trainer, pl_module) -> None:
        # The training loader's position in its epoch (data/memory.py, data/resumable.py): a
        # schedule that asks for the run's length (estimated_stepping_batches) makes Lightning
        # set up the training data before it restores the loops, and it then never hands the
        # loader its saved state. Handed here, before the first batch is drawn.
        trainer.fit_loop._load_combined_loader_states()

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        for logger in trainer.loggers:  # the metric history up to here is on disk too
            logger.save()
        checkpoint[KEY] = {
            "config": self.run_info.config,
            "version": __version__,
            "git_commit": self.commit,
            "packages": _package_versions(),
            "wandb_id": _wandb_id(trainer),
            "rng": _rng_states(),
            "classes": _class_names(trainer),
        }

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        rng = checkpoint.get(KEY, {}).get("rng")
        if rng:
            _set_rng_states(rng)
            self._restored = True


class LastCheckpoint(Checkpoint):
    """Keeps <run dir>/checkpoints/last.ckpt at the run's latest state, whatever the monitored
    metric did: at the end of every epoch, and every `every_n_steps` optimizer steps if set.

    Lightning's ModelCheckpoint(save_last=True) writes last.ckpt only beside a top-k save, so
    after the metric stops improving its last.ckpt stays at the best epoch. As a Checkpoint,
    Lightning runs this after the LightningModule's own on_train_epoch_end and after the other
    checkpoint callbacks (which come first in the list), so the file holds the epoch's
    validation and the best checkpoint's bookkeeping as they end the epoch; a run resumed from
    it starts the next epoch. (StopOnSignal writes the same file at a signal.) The file is
    <trainer.default_root_dir>/checkpoints/last.ckpt.
    """

    def __init__(self, every_n_steps: int | None = None):
        self.path = Path("checkpoints/last.ckpt")
        self.every_n_steps = every_n_steps
        self._saved_step = -1

    def setup(self, trainer, pl_module, stage: str) -> None:
        self.path = Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt"

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        n, step = self.every_n_steps, trainer.global_step
        if not n or step == 0 or step % n or step == self._saved_step:
            return  # (with gradient accumulation a step spans several batches)
        if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            return  # the end of the epoch saves, after its validation
        self._save(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._save(trainer)

    def _save(self, trainer) -> None:
        if trainer.fast_dev_run or trainer.sanity_checking:
            return
        trainer.save_checkpoint(self.path, weights_only=False)  # the full state, quietly
        self._saved_step = trainer.global_step


class ApplyOptimizerChanges(pl.Callback):
    """On a resume with resume_allow_changes=true, the new optimizer settings take effect.

    Lightning restores the optimizer's parameter groups from the checkpoint, over the values
    the new config built them with: without this, `optimizer.lr=0.01` would be recorded while
    the run went on with the old rate. The new config's values are read from the freshly built
    optimizers (on_fit_start, before the restore) and put back after it (on_train_start): a
    changed learning rate scales the restored rate and its schedule, so the schedule goes on
    from where it was; any other changed setting (weight_decay, betas, ...) is copied. The
    changes are run_info.changes (see trainlab.engine.callbacks.RunInfo): none, nothing to do.
    """

    def __init__(self):
        self.run_info = RunInfo()
        self._fresh: list[list[dict[str, Any]]] = []

    @property
    def keys(self) -> set[str]:
        changed = self.run_info.changes
        return {k.removeprefix("optimizer.") for k in changed if k.startswith("optimizer.")}

    def on_fit_start(self, trainer, pl_module) -> None:
        self._fresh = [[dict(g) for g in opt.param_groups] for opt in trainer.optimizers]

    def on_train_start(self, trainer, pl_module) -> None:
        if not self.run_info.changes:
            return
        for opt, fresh_groups in zip(trainer.optimizers, self._fresh, strict=True):
            for group, fresh in zip(opt.param_groups, fresh_groups, strict=True):
                for key in self.keys - {"lr"}:
                    if key in fresh:
                        group[key] = fresh[key]
                self._scale_lr(trainer, opt, group, fresh)  # lr_scaling may change it too

    @staticmethod
    def _scale_lr(trainer, opt, group: dict[str, Any], fresh: dict[str, Any]) -> None:
        # The rate a schedule started from (initial_lr), or the rate itself without one.
        ratio = fresh.get("initial_lr", fresh["lr"]) / group.get("initial_lr", group["lr"])
        if ratio == 1:
            return
        for key in ("lr", "initial_lr", "max_lr", "min_lr"):
            if key in group:
                group[key] *= ratio
        index = opt.param_groups.index(group)
        for config in trainer.lr_scheduler_configs:
            if config.scheduler.optimizer is opt:
                for name in ("base_lrs", "_last_lr"):
                    values = getattr(config.scheduler, name, None)
                    if values is not None:
                        values[index] *= ratio


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).parent,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def _package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for name in ("trainlab", "torch", "lightning", "torchmetrics", "hydra-core", "torchvision"):
        with contextlib.suppress(PackageNotFoundError):
            versions[name] = version(name)
    return versions


def _wandb_id(trainer) -> str | None:
    for logger in trainer.loggers:
        if type(logger).__name__ == "WandbLogger":
            return logger.version
    return None


def _class_names(trainer) -> list[str] | None:
    # Image folders and lists name their classes (`classes`); tensors only have labels.
    classes = getattr(trainer.datamodule, "classes", None)
    return [str(c) for c in classes] if classes else None


def _rng_states() -> dict[str, Any]:
    numpy_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": [
            numpy_state[0],
            torch.from_numpy(numpy_state[1].astype(np.int64)),
            *numpy_state[2:],
        ],
        "python": random.getstate(),
    }


def _set_rng_states(rng: dict[str, Any]) -> None:
    torch.set_rng_state(rng["torch"])
    kind, keys, *rest = rng["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    version, state, gauss = rng["python"]
    random.setstate((version, tuple(state), gauss))
