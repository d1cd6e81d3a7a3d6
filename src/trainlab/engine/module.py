"""The base of trainlab's LightningModules: what keeps a training step cheap, written once.

Small nets take about a millisecond a step on a CPU, so every per-step cost here is measured
(bench/throughput.py, bench/RESULTS.md) and kept to a few tensor operations:

- the optimizer step of a plain PyTorch loop, unless a Trainer flag needs Lightning's loop;
- steps_per_call: N optimizer steps per trip through Lightning's loop (trainlab.engine.blocks);
- training statistics summed on the device and logged once an epoch, as means, with the sums
  kept in checkpoints so that an epoch resumed part-way reports its mean over all its batches.

A subclass writes `training_loss(batch)`: the batch's loss, having handed what it reports to
`add_to_epoch_means`. One that steps its optimizers itself (manual optimisation, as the GAN)
writes `training_step` instead, and still reports through `add_to_epoch_means`.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch

from trainlab.engine import blocks
from trainlab.engine.memory import Block

# In checkpoints. Older ones kept their sums under "train_sums", by attribute names of modules
# that are gone: they are not read, and an epoch resumed from one averages the rest of it alone.
EPOCH_SUMS = "epoch_sums"


class TrainlabModule(pl.LightningModule):
    # Optimizer steps a training_step takes (engine.blocks): auto, or a count; train sets it
    # from the config, and records steps_per_call_choice, what was taken and why.
    steps_per_call: int | str = 1
    _steps_per_call = 1
    _direct = None  # (optimizer, Lightning's step counter) for blocks: see blocks.direct
    _schedule = None  # stepped after every plain step

    def __init__(self):
        super().__init__()
        self._epoch_sums: dict[str, torch.Tensor] = {}
        self._epoch_count = 0
        self._means_logged = False
        self._sums_to_restore: dict | None = None

    def training_loss(self, batch) -> torch.Tensor:
        """The loss of one training batch, which the base steps the optimizer with."""
        raise NotImplementedError(f"{type(self).__name__} must define training_loss(batch)")

    def __setattr__(self, name: str, value) -> None:
        # Lightning sets this around every hook call, dozens of times a step; nn.Module's checks
        # for parameters and submodules would add about 1 us each time.
        if name == "_current_fx_name":
            self.__dict__[name] = value
        else:
            super().__setattr__(name, value)

    # --- the plain step ---------------------------------------------------------------------

    @property
    def automatic_optimization(self) -> bool:
        # Lightning's automatic optimisation (its closure, hooks and bookkeeping) costs about
        # 0.25 ms a step, a fifth of a small MLP's step (bench/RESULTS.md). What it adds to the
        # plain step below is gradient accumulation and clipping by Trainer flags: only runs
        # that set one of those use it. Both paths compute the same weights (tests/test_speed.py).
        trainer = self._trainer
        if trainer is None or not self._automatic_optimization:
            return self._automatic_optimization
        return trainer.accumulate_grad_batches != 1 or bool(trainer.gradient_clip_val)

    @automatic_optimization.setter
    def automatic_optimization(self, value: bool) -> None:
        self._automatic_optimization = value  # False: the module steps its optimizers itself

    @property
    def plain_steps(self) -> bool:
        """Whether this base takes the optimizer steps, as a plain PyTorch loop does."""
        return self._automatic_optimization and not self.automatic_optimization

    def training_step(self, batch, batch_idx):
        if isinstance(batch, Block):
            return self._train_block(batch)
        return self._train_on(batch)

    def _train_block(self, block: Block) -> dict[str, torch.Tensor]:
        """One optimizer step per batch of the block, exactly as one call per batch would."""
        losses = [self._train_on(batch) for batch in block]
        # Lightning counts one batch a call; its loggers' step axis counts optimizer steps.
        self.trainer.fit_loop.epoch_loop._batches_that_stepped += len(block) - 1
        # every step's loss, for the NaN/divergence guard (one device sync a block)
        return {"loss": losses[-1], "losses": torch.stack(losses).detach()}

    def _train_on(self, batch) -> torch.Tensor:
        loss = self.training_loss(batch)
        if self.plain_steps:
            self._plain_step(loss)
        if (self.global_step + 1) % self.trainer.log_every_n_steps == 0:  # when Lightning logs
            self.log("train/loss_step", loss, prog_bar=True)
        return loss

    def _plain_step(self, loss: torch.Tensor) -> None:
        """The step a plain PyTorch loop takes: zero the gradients, back-propagate, step the
        optimizer and the schedule (Lightning's precision and strategy still apply)."""
        if self._direct is not None:  # in blocks, where Lightning's wrappers do nothing
            optimizer, progress = self._direct
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            progress.increment_ready()  # global_step counts optimizer steps, as Lightning does
            optimizer.step()
            progress.increment_completed()
        else:
            optimizer = self.optimizers()
            optimizer.zero_grad(set_to_none=True)
            self.manual_backward(loss)
            optimizer.step()
        if self._schedule is not None:
            self._schedule.step()

    # --- steps_per_call blocks ----------------------------------------------------------------

    def setup(self, stage: str) -> None:
        if stage == "fit":  # before Lightning builds the training loader and the schedule
            self._steps_per_call, why = blocks.choose(self, self.steps_per_call)
            self.steps_per_call_choice = {"steps_per_call": self._steps_per_call, "why": why}
            blocks.apply(self.trainer, self._steps_per_call)

    def on_train_start(self) -> None:
        configs = self.trainer.lr_scheduler_configs
        self._schedule = configs[0].scheduler if configs and self.plain_steps else None
        self._direct = None
        if self._steps_per_call > 1 and blocks.direct(self, self.trainer):
            self._direct = (
                self.trainer.optimizers[0],
                self.trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress,
            )
        # A run resumed mid-epoch starts no epoch: it continues the checkpoint's sums.
        if not self._restore_sums():
            self._reset_sums()
        self._means_logged = False  # logged again at the end of a resumed epoch

    # --- epoch means ------------------------------------------------------------------------

    def add_to_epoch_means(self, totals: Mapping[str, torch.Tensor], count: int) -> None:
        """Add `totals` to the epoch's sums: each a tensor summed over `count` samples (or
        batches), such as a mean loss times the batch's size, or a number of right predictions.
        Each name is logged once, at the epoch's end, as its sum over the sum of the counts.

        The sums stay on the device: Lightning's per-step logging, or a metric update, would cost
        more than a small net's whole step."""
        for name, total in totals.items():
            if name in self._epoch_sums:
                self._epoch_sums[name].add_(total.detach())
            else:
                self._epoch_sums[name] = total.detach().clone()
        self._epoch_count += count

    def on_train_epoch_start(self) -> None:
        self._reset_sums()

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if batch_idx + 1 == self.trainer.num_training_batches:
            self._log_epoch_means()  # here, so that callbacks see them at the epoch's end

    def on_train_epoch_end(self) -> None:
        if not self._means_logged:  # an epoch cut short, by max_steps or a stop
            self._log_epoch_means()

    def _reset_sums(self) -> None:
        self._epoch_sums, self._epoch_count = {}, 0
        self._means_logged = False

    def _log_epoch_means(self) -> None:
        count = max(1, self._epoch_count)
        for name, total in self._epoch_sums.items():
            # batch_size=1: logged once, the mean as it is (Lightning would weight it by the
            # size of the batch at hand, and round differently for each)
            shown = "loss" in name  # the losses show in the progress bar
            self.log(
                name,
                total / count,
                on_step=False,
                on_epoch=True,
                prog_bar=shown,
                sync_dist=True,
                batch_size=1,
            )
        self._means_logged = True

    # --- checkpoints ------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[EPOCH_SUMS] = {"sums": dict(self._epoch_sums), "count": self._epoch_count}
        checkpoint[blocks.KEY] = self._steps_per_call

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self._trainer is None or self._trainer.state.fn != "fit":
            return  # loaded to validate, test or predict: nothing to resume
        self._sums_to_restore = checkpoint.get(EPOCH_SUMS)
        _count_steps_on_either_path(checkpoint)
        # A run resumed mid-epoch keeps its blocks; this comes after setup and before Lightning
        # builds the training loader.
        choice = getattr(self, "steps_per_call_choice", None)
        if choice is not None:
            kept = blocks.resumed(choice, checkpoint.get(blocks.KEY))
            if kept is not None:
                blocks.apply(self.trainer, kept["steps_per_call"], before=self._steps_per_call)
                self._steps_per_call, self.steps_per_call_choice = kept["steps_per_call"], kept

    def _restore_sums(self) -> bool:
        """Put back the sums of the checkpoint just loaded, on this module's device; False when
        nothing was loaded (a fresh run), or the checkpoint has none (an older one)."""
        saved, self._sums_to_restore = self._sums_to_restore, None
        if not saved:
            return False
        self._epoch_sums = {name: s.to(self.device) for name, s in saved["sums"].items()}
        self._epoch_count = saved["count"]
        return True


def _count_steps_on_either_path(checkpoint: dict[str, Any]) -> None:
    """Lightning counts optimizer steps apart by the path that took them, its automatic
    optimisation or the module's own steps, and reads global_step from this run's path. A
    checkpoint written on the other one (with gradient clipping turned on or off since, or by a
    LanguageModel from before it took plain steps) gets its count on both, so that the resumed
    run goes on from its step, not from 0. (This runs before Lightning restores its loops.)"""
    fit_loop = checkpoint.get("loops", {}).get("fit_loop", {})
    automatic = fit_loop.get("epoch_loop.automatic_optimization.optim_progress")
    own = fit_loop.get("epoch_loop.manual_optimization.optim_step_progress")
    if automatic is None or own is None:
        return
    steps = automatic["optimizer"]["step"]
    if steps["total"]["completed"] > own["total"]["completed"]:
        own.update(copy.deepcopy(steps))
    else:
        automatic["optimizer"]["step"] = copy.deepcopy(own)
