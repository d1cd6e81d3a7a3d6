"""Training statistics summed over an epoch survive a resumption part-way through it."""

from __future__ import annotations

from typing import Any

import torch

KEY = "train_sums"


class EpochSums:
    """For LightningModules that sum training statistics over the epoch in the attributes named
    by `SUMS` and log their means at its end: the sums go into every checkpoint and come back
    on resumption, so that an epoch resumed part-way reports its mean over all its batches, as
    the uninterrupted run does, and not over the batches after the resumption alone.
    """

    SUMS: tuple[str, ...] = ()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[KEY] = {name: getattr(self, name) for name in self.SUMS}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._sums_to_restore = checkpoint.get(KEY)

    def restore_sums(self) -> bool:
        """Put back the sums of the checkpoint just loaded, on this module's device; False when
        nothing was loaded (a fresh run), or the checkpoint has none (an older one)."""
        sums = getattr(self, "_sums_to_restore", None)
        self._sums_to_restore = None
        if not sums:
            return False
        for name, value in sums.items():
            setattr(self, name, value.to(self.device) if isinstance(value, torch.Tensor) else value)
        return True
