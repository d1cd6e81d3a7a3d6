"""Callbacks that stop a run safely: on a signal, on a loss that is no longer a number, on
parameters that do not train, and when the ranks of a distributed run end out of step."""

from __future__ import annotations

import math
import signal
import sys
import threading
from pathlib import Path

import lightning.pytorch as pl
import torch

from trainlab.engine import stopping
from trainlab.engine.callbacks import RunInfo
from trainlab.engine.callbacks.progress import epoch_label
from trainlab.engine.errors import Interrupted, UserError
from trainlab.engine.memory import Block


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

    takes_blocks = True  # its batch hooks take blocks of steps_per_call (trainlab.engine.blocks)

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
            f"stopped by {name} in {epoch_label(trainer.current_epoch)}, "
            f"step {trainer.global_step}; "
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

    takes_blocks = True  # its batch hooks take blocks of steps_per_call (trainlab.engine.blocks)

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
            f"the training loss is {value:.4g} in {epoch_label(trainer.current_epoch)}, step "
            f"{step}{grown} (learning rate {lrs}); {saved}. Lower optimizer.lr, "
            "clip gradients (+trainer.gradient_clip_val=1.0), or check the data for NaNs."
        )

    def state_dict(self) -> dict[str, float | None]:
        return {"reference": self.reference}

    def load_state_dict(self, state: dict[str, float | None]) -> None:
        if state.get("reference") is not None:
            self._set_reference(state["reference"])


class StopOnStall(pl.Callback):
    """A run whose trainable parameters are all as they started after its first `batches`
    training batches (times any gradient accumulation), while its loss is a number (or None),
    stops with the likely causes: nothing is training, and a run that goes on would only spend
    its time. Checked once: a sample of each parameter (up to SAMPLE evenly spread values) is
    copied when training starts and compared after those batches.
    """

    takes_blocks = True  # its batch hook takes blocks of steps_per_call (trainlab.engine.blocks)
    SAMPLE = 4096

    def __init__(self, batches: int = 4):
        self.batches = batches
        self._start: list | None = None
        self._seen = 0

    def on_train_start(self, trainer, pl_module) -> None:
        params = [p for p in pl_module.parameters() if p.requires_grad]
        self._start = [(p, self._sample(p).clone()) for p in params]
        self._seen = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._start is None:
            return  # checked already
        self._seen += len(batch) if isinstance(batch, Block) else 1
        if self._seen < self.batches * trainer.accumulate_grad_batches:
            return
        start, self._start = self._start, None
        if any(not torch.equal(self._sample(p), kept) for p, kept in start):
            return
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is not None and not math.isfinite(float(loss)):
            return  # StopOnNonFiniteLoss says what is wrong
        self._stop(trainer, pl_module, loss, len(start))

    def _sample(self, p: torch.Tensor) -> torch.Tensor:
        flat = p.detach().reshape(-1)
        return flat[:: max(1, len(flat) // self.SAMPLE)]

    def _stop(self, trainer, pl_module, loss, trainable: int) -> None:
        name = type(pl_module).__name__
        lrs = ", ".join(f"{g['lr']:.3g}" for opt in trainer.optimizers for g in opt.param_groups)
        shown = "None" if loss is None else f"{float(loss):.4g}"
        raise UserError(
            f"{name} has not trained: its {trainable} trainable parameter tensors are as they "
            f"started after {self._seen} training batches ({trainer.global_step} optimizer "
            f"steps, loss {shown}, learning rate {lrs or 'none'}). Likely causes: "
            "automatic_optimization = False with a training_step that does not step the "
            "optimizers (call self.manual_backward(loss) and opt.step(), or leave automatic "
            "optimisation on); a learning rate of 0; every parameter frozen (requires_grad="
            "False) or left out of configure_optimizers; a training_step that returns None "
            "(Lightning then skips the step) or a loss cut from the graph (.detach(), .item(), "
            "torch.no_grad). If that is meant, drop this check with ~callbacks.stop_on_stall."
        )


class RanksAgree(pl.Callback):
    """At the end of a distributed fit, checks that every rank holds the same weights (a
    checksum, gathered from all ranks): DDP keeps them in step, unless something is broken."""

    def __init__(self):
        self.agree: bool | None = None

    def on_fit_end(self, trainer, pl_module) -> None:
        if trainer.world_size == 1:
            return
        checksum = sum(p.detach().double().sum() for p in pl_module.parameters())
        gathered = trainer.strategy.all_gather(checksum.to(pl_module.device))
        self.agree = bool(torch.all(gathered == gathered[0]))
        if not self.agree:
            raise UserError(
                f"the {trainer.world_size} ranks ended with different weights (checksums "
                f"{gathered.tolist()}): they went out of step. Check that every rank runs the "
                "same code and config."
            )
