"""The LightningModule for classification: wraps any net, gets its optimizer from config.

Small nets take about a millisecond a step on a CPU, so every per-step cost here is measured
(bench/throughput.py, bench/RESULTS.md) and kept to a few tensor operations.
"""

import os
from collections.abc import Callable

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MaxMetric, MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)

from trainlab.errors import UserError

_NVML_CHECK = "PYTORCH_NVML_BASED_CUDA_CHECK"


class Classifier(pl.LightningModule):
    """Cross-entropy training of `net`, with accuracy and macro precision/recall/F1 on val and test.

    `optimizer` and `scheduler` are factories (Hydra partials): the optimizer takes the
    parameters, the scheduler the optimizer and the run's total number of steps.
    """

    def __init__(
        self,
        net: nn.Module,
        num_classes: int,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None = None,
        channels_last: bool = False,
    ):
        super().__init__()
        self.net = net
        self.make_optimizer = optimizer
        self.make_scheduler = scheduler
        # NHWC activations: faster convolutions on recent GPUs, above all in bf16
        self.channels_last = channels_last
        if channels_last:
            self.net.to(memory_format=torch.channels_last)
        # Training loss and accuracy are summed on the device each step and logged once an
        # epoch: Lightning's per-step logging, or a metric update, would cost more than the step
        # itself for small nets.
        self._loss_sum = torch.zeros(())
        self._correct = torch.zeros((), dtype=torch.long)
        self._samples = 0
        self._nvml_check: str | None = None
        metrics = MetricCollection(
            {
                "acc": MulticlassAccuracy(num_classes, average="micro"),
                "precision": MulticlassPrecision(num_classes, average="macro"),
                "recall": MulticlassRecall(num_classes, average="macro"),
                "f1": MulticlassF1Score(num_classes, average="macro"),
            },
            compute_groups=True,
        )
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")
        self.val_acc_best = MaxMetric()
        self.val_acc_best.persistent(True)  # kept in checkpoints, so a resumed run remembers it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(x)

    def __setattr__(self, name: str, value) -> None:
        # Lightning sets this around every hook call, dozens of times a step; nn.Module's checks
        # for parameters and submodules would add about 1 us each time.
        if name == "_current_fx_name":
            self.__dict__[name] = value
        else:
            super().__setattr__(name, value)

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self._loss_sum.add_(loss.detach(), alpha=len(y))
        self._correct.add_((logits.argmax(dim=1) == y).sum())
        self._samples += len(y)
        if (self.global_step + 1) % self.trainer.log_every_n_steps == 0:  # when Lightning logs
            self.log("train/loss_step", loss, prog_bar=True, batch_size=len(y))
        return loss

    def on_train_epoch_start(self) -> None:
        self._reset_train_sums()

    def _reset_train_sums(self) -> None:
        self._loss_sum = torch.zeros((), device=self.device)
        self._correct = torch.zeros((), dtype=torch.long, device=self.device)
        self._samples = 0

    def on_train_epoch_end(self) -> None:
        samples = max(1, self._samples)
        self.log("train/loss_epoch", self._loss_sum / samples, prog_bar=True, sync_dist=True)
        self.log("train/acc", self._correct / samples, sync_dist=True)

    def on_train_start(self) -> None:
        self._reset_train_sums()  # also here: a run resumed mid-epoch starts no epoch
        # Importing Lightning makes torch ask NVML whether CUDA is there (so that fork-based
        # strategies can start before CUDA does), and torch's optimizers then ask on every step
        # of a CPU run: 0.03 to 0.16 ms here. Torch's own check is safe now: the processes exist.
        if self.device.type == "cpu":
            self._nvml_check = os.environ.pop(_NVML_CHECK, None)

    def on_train_end(self) -> None:
        if self._nvml_check is not None:
            os.environ[_NVML_CHECK] = self._nvml_check
            self._nvml_check = None

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, self.val_metrics, "val/loss")

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, self.test_metrics, "test/loss")

    def _eval_step(self, batch, metrics: MetricCollection, loss_name: str) -> None:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.log(loss_name, loss, prog_bar=True, batch_size=len(y), sync_dist=True)
        metrics.update(logits, y)

    # Values logged once an epoch are averaged over devices (one collective call an epoch);
    # torchmetrics' compute() has already gathered the metrics' states from every device.

    def on_validation_epoch_end(self) -> None:
        values = self.val_metrics.compute()
        self.val_metrics.reset()
        acc = values.pop("val/acc")
        self.log("val/acc", acc, prog_bar=True, sync_dist=True)
        self.log_dict(values, sync_dist=True)
        if not self.trainer.sanity_checking:
            self.val_acc_best.update(acc)
            self.log("val/acc_best", self.val_acc_best.compute(), sync_dist=True)

    def on_test_epoch_end(self) -> None:
        self.log_dict(self.test_metrics.compute(), sync_dist=True)
        self.test_metrics.reset()

    def configure_optimizers(self):
        optimizer = self.make_optimizer(params=self.parameters())
        if self.make_scheduler is None:
            return optimizer
        total_steps = self.trainer.estimated_stepping_batches
        if total_steps == float("inf"):
            raise UserError(
                "a learning-rate schedule needs a run of known length: set trainer.max_epochs "
                "or trainer.max_steps, or choose scheduler=none."
            )
        scheduler = self.make_scheduler(optimizer, total_steps=int(total_steps))
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }
