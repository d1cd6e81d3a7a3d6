"""Callbacks that stop a run safely: on a signal, on a loss that is no longer a number, and
when the ranks of a distributed run end out of step."""

from __future__ import annotations

import math
import signal
import sys
import threading
from pathlib import Path

import lightning.pytorch as pl

from trainlab.engine import stopping
from trainlab.engine.callbacks import RunInfo
from trainlab.engine.errors import Interrupted, UserError


class StopOnSignal(pl.Callback):
    """SIGINT (Ctrl-C) or SIGTERM (a scheduler's notice): finish the current step (or block of
    steps_per_call steps), save <run dir>/checkpoints/last.ckpt, and stop with a message saying
    how to resume.

    It takes the signals over from the entry point's handler (trainlab.engine.stopping) while
    the model fits, so that a stop waits for the end of a step; before and after, a stop ends the
    run at once. A stop asked again (after engine.stopping.SAME_STOP_S) stops at once.
    Lightning also sees SIGTERM (and tells the other ranks). The message's command is
    run_info.resume_command (see trainlab.engine.callbacks.RunInfo).
    """

    def __init__(self):
        self.run_info = RunInfo()
        self.ckpt_dir = Path("checkpoints")
        self.signum: int | None = None
        self._previous: stopping.Taker | None = None
        self._taken = False
        self._handlers: dict = {}  # signal handlers to restore after the fit (on_train_start)

    def setup(self, trainer, pl_module, stage: str) -> None:
        self.ckpt_dir = Path(trainer.default_root_dir) / "checkpoints"

    def on_fit_start(self, trainer, pl_module) -> None:
        self.signum = None
        self._previous, self._taken = stopping.take_over(self._on_stop), True

    def on_train_start(self, trainer, pl_module) -> None:
        if not stopping.installed() and threading.current_thread() is threading.main_thread():
            # Trained in-process (a notebook, say): SIGINT comes here for this fit only. Here,
            # after Lightning noted the handlers it puts back when the fit ends; SIGTERM stays
            # Lightning's.
            self._handlers = {signal.SIGINT: signal.getsignal(signal.SIGINT)}
            previous = signal.getsignal(signal.SIGTERM)
            stopping.install(afresh=True)
            stopping.take_over(self._on_stop)
            signal.signal(signal.SIGTERM, previous)

    def _on_stop(self, signum: int, again: bool) -> bool:
        if again:
            return True  # stop now
        self.signum = signum
        if signum == signal.SIGINT:
            message = "\nCtrl-C: stopping after this step (press again to stop at once)"
            print(message, file=sys.stderr)
        return False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        signum = self.signum or (signal.SIGTERM if trainer.received_sigterm else None)
        stop = signum is not None
        if trainer.world_size > 1:  # all ranks stop at the same step, or none does
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
            signum = signum or signal.SIGTERM
        if stop:
            self._save_and_stop(trainer, signum)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        # SIGTERM during validation: Lightning raises there, before any training step ends.
        if type(exception).__name__ == "SIGTERMException":
            self._save_and_stop(trainer, signal.SIGTERM)

    def on_fit_end(self, trainer, pl_module) -> None:
        self._restore()

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._restore()

    def _restore(self) -> None:
        if self._taken:
            stopping.take_over(self._previous)
            self._previous, self._taken = None, False
        for signum, handler in self._handlers.items():
            signal.signal(signum, handler)
        self._handlers = {}

    def _save_and_stop(self, trainer, signum: int) -> None:
        path = self.ckpt_dir / "last.ckpt"
        trainer.save_checkpoint(path, weights_only=False)  # the full state, quietly
        name = signal.Signals(signum).name
        self._restore()
        raise Interrupted(
            signum,
            f"stopped by {name} at epoch {trainer.current_epoch}, step {trainer.global_step}; "
            f"checkpoint saved to {path}. Resume with: {self.run_info.resume_command}",
        )


class StopOnNonFiniteLoss(pl.Callback):
    """A training loss that is NaN or infinite, or that has grown `divergence_factor` times
    over its starting value, stops the run at once, naming the step, the learning rate and the
    last good checkpoint. Checked every step at the cost of a scalar comparison.

    The starting value is the first step's |loss|, and at least 1, so that a loss that starts
    near 0 is not called diverging for reaching 0.01. It is kept in checkpoints, so that a
    resumed run compares with the same start. divergence_factor=None checks NaN and infinity
    only.
    """

    def __init__(self, divergence_factor: float | None = None):
        self.ckpt_dir = Path("checkpoints")
        self.factor = divergence_factor
        self.reference: float | None = None  # the first step's |loss|, at least 1
        self.limit = math.inf

    def setup(self, trainer, pl_module, stage: str) -> None:
        self.ckpt_dir = Path(trainer.default_root_dir) / "checkpoints"  # named in the message

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if isinstance(outputs, dict) and "losses" in outputs:  # a block: one loss a step
            values = outputs["losses"].tolist()
        else:
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            if loss is None:
                return
            values = [float(loss)]
        first_step = trainer.global_step - len(values) + 1
        for i, value in enumerate(values):
            if self.reference is None and math.isfinite(value):
                self._set_reference(max(abs(value), 1.0))
            if not abs(value) < self.limit:  # NaN and infinity fail this too
                self._stop(trainer, value, first_step + i)

    def _set_reference(self, reference: float) -> None:
        self.reference = reference
        self.limit = self.factor * reference if self.factor is not None else math.inf

    def _stop(self, trainer, value: float, step: int) -> None:
        grown = (
            f", more than divergence_factor={self.factor:g} times its start "
            f"({self.reference:.4g}): it diverges"
            if math.isfinite(value)
            else ""
        )
        lrs = ", ".join(f"{g['lr']:.3g}" for opt in trainer.optimizers for g in opt.param_groups)
        last = self.ckpt_dir / "last.ckpt"
        saved = f"the last good checkpoint is {last}" if last.is_file() else "no checkpoint yet"
        raise UserError(
            f"the training loss is {value:.4g} at epoch {trainer.current_epoch}, step "
            f"{step}{grown} (learning rate {lrs}); {saved}. Lower optimizer.lr, "
            "clip gradients (+trainer.gradient_clip_val=1.0), or check the data for NaNs."
        )

    def state_dict(self) -> dict[str, float | None]:
        return {"reference": self.reference}

    def load_state_dict(self, state: dict[str, float | None]) -> None:
        if state.get("reference") is not None:
            self._set_reference(state["reference"])


class RanksAgree(pl.Callback):
    """At the end of a distributed fit, checks that every rank holds the same weights (a
    checksum, gathered from all ranks): DDP keeps them in step, unless something is broken."""

    def __init__(self):
        self.agree: bool | None = None

    def on_fit_end(self, trainer, pl_module) -> None:
        if trainer.world_size == 1:
            return
        import torch

        checksum = sum(p.detach().double().sum() for p in pl_module.parameters())
        gathered = trainer.strategy.all_gather(checksum.to(pl_module.device))
        self.agree = bool(torch.all(gathered == gathered[0]))
        if not self.agree:
            raise UserError(
                f"the {trainer.world_size} ranks ended with different weights (checksums "
                f"{gathered.tolist()}): they went out of step. Check that every rank runs the "
                "same code and config."
            )
