"""The LightningModule for next-byte language modelling: wraps any net that maps (batch, time)
byte ids to (batch, time, 256) logits, and writes a sample of generated text when training ends.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from torch import nn

from trainlab.epoch_sums import EpochSums
from trainlab.errors import UserError
from trainlab.schedulers import with_schedule

SAMPLE_FILE = "samples.txt"
SAMPLE = {"prompt": "\n", "length": 500, "temperature": 0.8, "top_k": None}


class LanguageModel(EpochSums, pl.LightningModule):
    """Cross-entropy of each next byte; val and test report it also in bits per byte (`bpc`).

    `optimizer` and `scheduler` are factories (Hydra partials), as for the Classifier. `sample`
    sets the text generated at the end of training (keys of SAMPLE; length 0: none), written to
    <run dir>/samples.txt, printed, and logged to TensorBoard and W&B when they are loggers.
    """

    SUMS = ("_loss_sum", "_batches")  # kept in checkpoints (EpochSums)

    def __init__(
        self,
        net: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None = None,
        sample: Mapping[str, Any] | None = None,
    ):
        super().__init__()
        self.net = net
        self.make_optimizer = optimizer
        self.make_scheduler = scheduler
        self.sample = {**SAMPLE, **(sample or {})}
        _check_sample(self.sample)
        # The training loss is summed on the device each step and logged once an epoch, as the
        # Classifier does: each batch has the same number of bytes, so the mean of the batch
        # means is the mean over bytes.
        self._loss_sum = torch.zeros(())
        self._batches = 0
        self._means_logged = False

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.net(idx)

    def _loss(self, batch) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x).flatten(0, 1), y.flatten())

    def training_step(self, batch, batch_idx):
        loss = self._loss(batch)
        self._loss_sum.add_(loss.detach())
        self._batches += 1
        if (self.global_step + 1) % self.trainer.log_every_n_steps == 0:  # when Lightning logs
            self.log("train/loss_step", loss, prog_bar=True, batch_size=batch[1].numel())
        if batch_idx + 1 == self.trainer.num_training_batches:
            self._log_train_mean()  # here, so that callbacks see it at the epoch's end
        return loss

    def on_train_start(self) -> None:
        # A run resumed mid-epoch starts no epoch: it continues the checkpoint's sum.
        if not self.restore_sums():
            self._reset_train_sum()
        self._means_logged = False  # logged again at the end of a resumed epoch

    def on_train_epoch_start(self) -> None:
        self._reset_train_sum()

    def on_train_epoch_end(self) -> None:
        if not self._means_logged:  # an epoch cut short, by max_steps or a stop
            self._log_train_mean()

    def _reset_train_sum(self) -> None:
        self._loss_sum = torch.zeros((), device=self.device)
        self._batches = 0
        self._means_logged = False

    def _log_train_mean(self) -> None:
        mean = self._loss_sum / max(1, self._batches)
        self.log(
            "train/loss_epoch", mean, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True
        )
        self._means_logged = True

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, "test")

    def _eval_step(self, batch, split: str) -> None:
        loss = self._loss(batch)
        # weighted by bytes, so that the epoch's value is the mean over every byte of the split
        # (the last batch of a split may be short)
        n = batch[1].numel()
        self.log(f"{split}/loss", loss, prog_bar=True, batch_size=n, sync_dist=True)
        self.log(f"{split}/bpc", loss / math.log(2), batch_size=n, sync_dist=True)

    def on_train_end(self) -> None:
        if self.sample["length"] and self.trainer.is_global_zero:
            self.write_sample()

    def write_sample(self) -> str:
        """Generate text from the configured prompt; write, print and log it; return it."""
        s = self.sample
        text = self.generate_text(s["prompt"], s["length"], s["temperature"], s["top_k"])
        path = Path(self.trainer.default_root_dir) / SAMPLE_FILE
        path.write_text(text, encoding="utf-8")
        print(f"Sample ({s['length']} bytes after the prompt, in {path}):\n{text}", flush=True)
        for logger in self.trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                # TensorBoard renders text as Markdown: indented, it shows as it is
                shown = "\n".join("    " + line for line in text.splitlines())
                logger.experiment.add_text("sample", shown, self.global_step)
            elif isinstance(logger, WandbLogger):
                logger.log_text("sample", columns=["prompt", "text"], data=[[s["prompt"], text]])
        return text

    def generate_text(
        self, prompt: str, length: int, temperature: float = 1.0, top_k: int | None = None
    ) -> str:
        """The prompt followed by `length` generated bytes, decoded as UTF-8 (a byte sequence
        that is not UTF-8 shows as U+FFFD)."""
        idx = torch.tensor([list(prompt.encode())], device=self.device)
        training = self.net.training
        self.net.eval()
        try:
            out = self.net.generate(idx, length, temperature=temperature, top_k=top_k)
        finally:
            self.net.train(training)
        return bytes(out[0].tolist()).decode("utf-8", errors="replace")

    def configure_optimizers(self):
        # Weight decay on the weight matrices only, not on biases and LayerNorms, as usual for
        # Transformers. (The tied embedding and output weight are one parameter.)
        params = list(self.parameters())
        groups = [
            {"params": [p for p in params if p.dim() >= 2]},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        optimizer = self.make_optimizer(params=groups)
        return with_schedule(optimizer, self.make_scheduler, self.trainer)


def _check_sample(sample: dict[str, Any]) -> None:
    unknown = set(sample) - set(SAMPLE)
    problem = None
    if unknown:
        problem = f"has unknown keys {sorted(unknown)}; its keys are {', '.join(SAMPLE)}"
    elif not isinstance(sample["prompt"], str) or not sample["prompt"]:
        problem = "prompt must be a non-empty text, e.g. a newline"
    elif not isinstance(sample["length"], int) or sample["length"] < 0:
        problem = "length must be a number of bytes >= 0 (0: no sample)"
    elif not sample["temperature"] > 0:
        problem = "temperature must be > 0 (for the most likely byte each time, set top_k=1)"
    elif sample["top_k"] is not None and not sample["top_k"] >= 1:
        problem = "top_k must be a positive integer, or null for all 256 bytes"
    if problem:
        raise UserError(f"model.sample {problem}: {sample}.")
