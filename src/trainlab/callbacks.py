"""Callbacks of our own; the standard ones come from Lightning through conf/callbacks/."""

import sys
import time

from lightning.pytorch.callbacks import ProgressBar, RichProgressBar


class EpochLines(ProgressBar):
    """One line per epoch with its metrics and time: a progress display for log files,
    where a live bar's redraws turn into noise."""

    def __init__(self):
        super().__init__()
        self._enabled = True
        self._epoch_start = 0.0

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._epoch_start = time.perf_counter()

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
        epochs = f"/{trainer.max_epochs}" if trainer.max_epochs and trainer.max_epochs > 0 else ""
        took = time.perf_counter() - self._epoch_start
        print(f"epoch {trainer.current_epoch + 1}{epochs}  {shown}  ({took:.1f}s)", flush=True)


def progress_bar() -> ProgressBar:
    """A live bar in a terminal, one line per epoch when output goes to a file or pipe."""
    return RichProgressBar() if sys.stdout.isatty() else EpochLines()
