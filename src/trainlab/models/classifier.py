"""The LightningModules for classification: wrap any net, get their optimizer from config."""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from pydantic import PositiveInt
from torch import nn
from torchmetrics import MaxMetric, Metric, MetricCollection
from torchmetrics.classification import (
    BinaryAccuracy,
    BinaryConfusionMatrix,
    BinaryF1Score,
    BinaryPrecision,
    BinaryRecall,
    MulticlassAccuracy,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)

from trainlab.engine import TrainlabModule, UserError
from trainlab.models.schedulers import with_schedule


class Classifier(TrainlabModule):
    """Cross-entropy training of `net`, with accuracy and macro precision/recall/F1 on val and
    test, and their confusion matrices (drawn by trainlab.engine.callbacks.confusion).

    `optimizer` and `scheduler` are factories (Hydra partials): the optimizer takes the
    parameters, the scheduler the optimizer and the run's total number of steps.
    """

    net_takes_samples = True  # the run checks that `net` takes data.input_shape before training

    def __init__(
        self,
        net: nn.Module,
        num_classes: PositiveInt,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None = None,
        channels_last: bool = False,
    ):
        super().__init__()
        self.check_num_classes(num_classes)
        self.net = net
        self.make_optimizer = optimizer
        self.make_scheduler = scheduler
        # NHWC activations: faster convolutions on recent GPUs, above all in bf16
        self.channels_last = channels_last
        if channels_last:
            self.net.to(memory_format=torch.channels_last)
        # Updated every evaluation step, computed (and so synchronised) once an epoch.
        metrics = MetricCollection(self.metrics(num_classes), compute_groups=True)
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")
        self.val_acc_best = MaxMetric()
        self.val_acc_best.persistent(True)  # kept in checkpoints, so a resumed run remembers it
        # The latest counts of each split, true class by predicted class, for the callback
        # that draws them (trainlab.engine.callbacks.confusion).
        self.confusion_matrices: dict[str, torch.Tensor] = {}

    def check_num_classes(self, num_classes: int) -> None:
        """Refuse a number of classes this model cannot tell apart."""

    def metrics(self, num_classes: int) -> dict[str, Metric]:
        return {
            "acc": MulticlassAccuracy(num_classes, average="micro"),
            "precision": MulticlassPrecision(num_classes, average="macro"),
            "recall": MulticlassRecall(num_classes, average="macro"),
            "f1": MulticlassF1Score(num_classes, average="macro"),
            "confusion_matrix": MulticlassConfusionMatrix(num_classes),
        }

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, y)

    def predict(self, logits: torch.Tensor) -> torch.Tensor:
        """The predicted class of each sample."""
        return logits.argmax(dim=1)

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """What the metrics take: logits here (torchmetrics checks class indices more slowly)."""
        return logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(x)

    def training_loss(self, batch) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = self.loss(logits, y)
        right = (self.predict(logits) == y).sum()
        totals = {"train/loss_epoch": loss.detach() * len(y), "train/acc": right}
        self.add_to_epoch_means(totals, len(y))
        return loss

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, self.val_metrics, "val/loss")

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, self.test_metrics, "test/loss")

    def _eval_step(self, batch, metrics: MetricCollection, loss_name: str) -> None:
        x, y = batch
        logits = self(x)
        self.log(loss_name, self.loss(logits, y), prog_bar=True, batch_size=len(y), sync_dist=True)
        metrics.update(self.scores(logits), y)

    # Values logged once an epoch are averaged over devices (one collective call an epoch);
    # torchmetrics' compute() has already gathered the metrics' states from every device.

    def on_validation_epoch_end(self) -> None:
        values = self.val_metrics.compute()
        self.val_metrics.reset()
        confusion = values.pop("val/confusion_matrix")
        acc = values.pop("val/acc")
        self.log("val/acc", acc, prog_bar=True, sync_dist=True)
        self.log_dict(values, sync_dist=True)
        if not self.trainer.sanity_checking:
            self.confusion_matrices["val"] = confusion
            self.val_acc_best.update(acc)
            self.log("val/acc_best", self.val_acc_best.compute(), sync_dist=True)

    def on_test_epoch_end(self) -> None:
        values = self.test_metrics.compute()
        self.test_metrics.reset()
        self.confusion_matrices["test"] = values.pop("test/confusion_matrix")
        self.log_dict(values, sync_dist=True)

    def configure_optimizers(self):
        optimizer = self.make_optimizer(params=self.parameters())
        return with_schedule(optimizer, self.make_scheduler, self.trainer)


class BinaryClassifier(Classifier):
    """Two classes, one logit: `net` emits one output per sample, the logit of label 1 (the
    second class folder, in sorted order), trained with binary cross-entropy (sigmoid included).
    Val and test get accuracy, precision, recall and F1 of label 1, and the confusion matrix,
    under the same names as Classifier's.
    """

    def check_num_classes(self, num_classes: int) -> None:
        if num_classes != 2:
            raise UserError(
                f"a binary classifier tells two classes apart, but data.num_classes={num_classes}:"
                " give it data with two classes, or use a multiclass model (e.g. model=cnn)."
            )

    def metrics(self, num_classes: int) -> dict[str, Metric]:
        return {
            "acc": BinaryAccuracy(),
            "precision": BinaryPrecision(),
            "recall": BinaryRecall(),
            "f1": BinaryF1Score(),
            "confusion_matrix": BinaryConfusionMatrix(),
        }

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(logits.squeeze(1), y.to(logits.dtype))

    def predict(self, logits: torch.Tensor) -> torch.Tensor:
        return (logits.squeeze(1) > 0).long()

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        # Probabilities, not logits: torchmetrics takes a batch of logits that all fall in
        # [0, 1] for probabilities, and would threshold them at 0.5 instead of 0.
        return logits.squeeze(1).sigmoid()
