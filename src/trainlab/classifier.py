"""The LightningModule for classification: wraps any net, gets its optimizer from config."""

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
    ):
        super().__init__()
        self.net = net
        self.make_optimizer = optimizer
        self.make_scheduler = scheduler
        # Training accuracy is a running mean of per-batch values: a full metric update on every
        # step would cost more than the step itself for small nets.
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
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self.net(x)
        loss = F.cross_entropy(logits, y)
        acc = (logits.argmax(dim=1) == y).float().mean()
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        self.log("train/acc", acc, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, self.val_metrics, "val/loss")

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, self.test_metrics, "test/loss")

    def _eval_step(self, batch, metrics: MetricCollection, loss_name: str) -> None:
        x, y = batch
        logits = self.net(x)
        self.log(loss_name, F.cross_entropy(logits, y), prog_bar=True)
        metrics.update(logits, y)

    def on_validation_epoch_end(self) -> None:
        values = self.val_metrics.compute()
        self.val_metrics.reset()
        acc = values.pop("val/acc")
        self.log("val/acc", acc, prog_bar=True)
        self.log_dict(values)
        if not self.trainer.sanity_checking:
            self.val_acc_best.update(acc)
            self.log("val/acc_best", self.val_acc_best.compute())

    def on_test_epoch_end(self) -> None:
        self.log_dict(self.test_metrics.compute())
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
