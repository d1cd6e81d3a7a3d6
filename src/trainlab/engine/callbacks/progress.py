"""The progress display: a live bar in a terminal, one line per epoch in a log file."""

import math
import sys
import time

from lightning.pytorch.callbacks import ProgressBar, RichProgressBar

# Both displays' key in checkpoints: a run resumed in a terminal from one that wrote to a file
# (or the other way round) then finds the display's state where it expects it, without a warning.
PROGRESS_STATE_KEY = "progress_bar"


def epoch_label(epoch: int, max_epochs: int | None = None) -> str:
    """ "epoch 17/50" for Lightning's 0-based `epoch` 16 of 50: epochs as a person counts them,
    the same in the live bar, the log lines and every message."""
    of = f"/{max_epochs}" if max_epochs and max_epochs > 0 else ""
    return f"epoch {epoch + 1}{of}"


class EpochLines(ProgressBar):
    """One line per epoch with its metrics and time: a progress display for log files,
    where a live bar's redraws turn into noise.

    The time is the epoch's training time: a checkpoint keeps what the epoch had taken so far,
    and an epoch resumed part-way adds to it, leaving out the time the run was not running.
    """

    def __init__(self):
        super().__init__()
        self._enabled = True
        self._epoch_start = time.perf_counter()
        self._restored_s = 0.0  # of the epoch, before the resumption

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def on_train_start(self, trainer, pl_module) -> None:
        self._epoch_start = time.perf_counter() - self._restored_s

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._epoch_start = time.perf_counter()

    @property
    def state_key(self) -> str:
        return PROGRESS_STATE_KEY

    def state_dict(self) -> dict:
        return {"epoch_s": time.perf_counter() - self._epoch_start}

    def load_state_dict(self, state_dict: dict) -> None:
        self._restored_s = state_dict.get("epoch_s", 0.0)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if not self._enabled:
            return
        metrics = {
            k.removesuffix("_epoch"): v
            for k, v in self.get_metrics(trainer, pl_module).items()
            if k != "v_num" and not k.endswith("_step")
        }
        shown = "  ".join(
            f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()
        )
        took = time.perf_counter() - self._epoch_start
        label = epoch_label(trainer.current_epoch, trainer.max_epochs)
        print(f"{label}  {shown}  ({took:.1f}s)", flush=True)


class LiveBar(RichProgressBar):
    """Rich's live bar, redrawn at most every `interval` seconds instead of after every step.

    Each redraw reads the logged values (on a GPU, a wait for the device) and costs about 0.3 ms
    (bench/RESULTS.md): a quarter of a small net's step. The last batch of a loop always draws.
    """

    takes_blocks = True  # its batch hooks take blocks of steps_per_call (trainlab.engine.blocks)

    def __init__(self, interval: float = 0.1, **kwargs):
        super().__init__(**kwargs)
        self.interval = interval
        self._drawn = -math.inf  # the first batch draws, however recently the clock started

    @property
    def state_key(self) -> str:
        return PROGRESS_STATE_KEY

    def _get_train_description(self, current_epoch: int) -> str:
        # Lightning's own reads "Epoch 16/49" for the 17th of 50 epochs
        description = epoch_label(current_epoch, self.trainer.max_epochs)
        return f"{description:{len(self.validation_description)}}"  # as wide: no flicker

    def _due(self, batch_idx: int, total: float) -> bool:
        now = time.monotonic()
        if now - self._drawn < self.interval and batch_idx + 1 < total:
            return False
        self._drawn = now
        return True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._due(batch_idx, self.total_train_batches):
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, *args):
        if self._due(batch_idx, self.total_val_batches_current_dataloader):
            super().on_validation_batch_end(trainer, pl_module, outputs, batch, batch_idx, *args)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, *args) -> None:
        if self._due(batch_idx, self.total_test_batches_current_dataloader):
            super().on_test_batch_end(trainer, pl_module, outputs, batch, batch_idx, *args)


def progress_bar() -> ProgressBar:
    """A live bar in a terminal, one line per epoch when output goes to a file or pipe."""
    return LiveBar() if sys.stdout.isatty() else EpochLines()
