"""The LightningModules for classification: wrap any net, get their optimizer from config.

Small nets take about a millisecond a step on a CPU, so every per-step cost here is measured
(bench/throughput.py, bench/RESULTS.md) and kept to a few tensor operations.
"""

import csv
from collections.abc import Callable
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from PIL import Image
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

from trainlab import blocks
from trainlab.data.memory import Block
from trainlab.epoch_sums import EpochSums
from trainlab.errors import UserError
from trainlab.loggers import log_image
from trainlab.schedulers import with_schedule

CONFUSION = "confusion_matrix"


class Classifier(EpochSums, pl.LightningModule):
    """Cross-entropy training of `net`, with accuracy and macro precision/recall/F1 on val and test,
    and their confusion matrices as images (run directory and image-taking loggers).

    `optimizer` and `scheduler` are factories (Hydra partials): the optimizer takes the
    parameters, the scheduler the optimizer and the run's total number of steps.
    """

    SUMS = ("_loss_sum", "_correct", "_samples")  # kept in checkpoints (EpochSums)
    # Optimizer steps a training_step takes (trainlab.blocks): auto, or a count; train sets it
    # from the config, and records steps_per_call_choice, what was taken and why.
    steps_per_call: int | str = 1
    _steps_per_call = 1
    _direct = None  # (optimizer, Lightning's step counter, schedule) for blocks: see blocks.direct

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
        self._means_logged = False
        # Updated every evaluation step, computed (and so synchronised) once an epoch.
        metrics = MetricCollection(self._metrics(num_classes), compute_groups=True)
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")
        self._val_confusion: torch.Tensor | None = None  # the latest validation's
        self.val_acc_best = MaxMetric()
        self.val_acc_best.persistent(True)  # kept in checkpoints, so a resumed run remembers it

    def _metrics(self, num_classes: int) -> dict[str, Metric]:
        return {
            "acc": MulticlassAccuracy(num_classes, average="micro"),
            "precision": MulticlassPrecision(num_classes, average="macro"),
            "recall": MulticlassRecall(num_classes, average="macro"),
            "f1": MulticlassF1Score(num_classes, average="macro"),
            CONFUSION: MulticlassConfusionMatrix(num_classes),
        }

    def _loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, y)

    def _predict(self, logits: torch.Tensor) -> torch.Tensor:
        """The predicted class of each sample."""
        return logits.argmax(dim=1)

    def _scores(self, logits: torch.Tensor) -> torch.Tensor:
        """What the metrics take: logits here (torchmetrics checks class indices more slowly)."""
        return logits

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

    @property
    def automatic_optimization(self) -> bool:
        # Lightning's automatic optimisation (its closure, hooks and bookkeeping) costs about
        # 0.25 ms a step, a fifth of a small MLP's step (bench/RESULTS.md). What it adds to the
        # plain step below is gradient accumulation and clipping by Trainer flags: only runs
        # that set one of those use it. Both paths compute the same weights (tests/test_speed.py).
        trainer = self._trainer
        return (
            trainer is None
            or trainer.accumulate_grad_batches != 1
            or bool(trainer.gradient_clip_val)
        )

    def setup(self, stage: str) -> None:
        if stage == "fit":  # before Lightning builds the training loader and the schedule
            self._steps_per_call, why = blocks.choose(self, self.steps_per_call)
            self.steps_per_call_choice = {"steps_per_call": self._steps_per_call, "why": why}
            blocks.apply(self.trainer, self._steps_per_call)

    def training_step(self, batch, batch_idx):
        if isinstance(batch, Block):
            return self._train_block(batch, batch_idx)
        loss = self._train_on(*batch)
        if batch_idx + 1 == self.trainer.num_training_batches:
            self._log_train_means()  # here, so that callbacks see them at the epoch's end
        return loss

    def _train_block(self, block: Block, batch_idx: int) -> dict[str, torch.Tensor]:
        """One optimizer step per batch of the block, exactly as one call per batch would."""
        losses = [self._train_on(x, y) for x, y in block]
        # Lightning counts one batch a call; its loggers' step axis counts optimizer steps.
        self.trainer.fit_loop.epoch_loop._batches_that_stepped += len(block) - 1
        if batch_idx + 1 == self.trainer.num_training_batches:
            self._log_train_means()
        # every step's loss, for the NaN/divergence guard (one device sync a block)
        return {"loss": losses[-1], "losses": torch.stack(losses).detach()}

    def _train_on(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = self(x)
        loss = self._loss(logits, y)
        if not self.automatic_optimization:
            self._plain_step(loss)
        self._loss_sum.add_(loss.detach(), alpha=len(y))
        self._correct.add_((self._predict(logits) == y).sum())
        self._samples += len(y)
        if (self.global_step + 1) % self.trainer.log_every_n_steps == 0:  # when Lightning logs
            self.log("train/loss_step", loss, prog_bar=True, batch_size=len(y))
        return loss

    def _plain_step(self, loss: torch.Tensor) -> None:
        """The step a plain PyTorch loop takes: zero the gradients, back-propagate, step the
        optimizer and the schedule (Lightning's precision and strategy still apply)."""
        if self._direct is not None:  # in blocks, where Lightning's wrappers do nothing
            optimizer, progress, scheduler = self._direct
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            progress.increment_ready()  # global_step counts optimizer steps, as Lightning does
            optimizer.step()
            progress.increment_completed()
            if scheduler is not None:
                scheduler.step()
            return
        optimizer = self.optimizers()
        optimizer.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        optimizer.step()
        if self.make_scheduler is not None:
            self.lr_schedulers().step()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint[blocks.KEY] = self._steps_per_call

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        # A run resumed mid-epoch keeps its blocks; this comes after setup and before Lightning
        # builds the training loader.
        choice = getattr(self, "steps_per_call_choice", None)
        if choice is not None and self.trainer.state.fn == "fit":
            kept = blocks.resumed(choice, checkpoint.get(blocks.KEY))
            if kept is not None:
                blocks.apply(self.trainer, kept["steps_per_call"], before=self._steps_per_call)
                self._steps_per_call, self.steps_per_call_choice = kept["steps_per_call"], kept

    def on_train_epoch_start(self) -> None:
        self._reset_train_sums()

    def on_train_epoch_end(self) -> None:
        if not self._means_logged:  # an epoch cut short, by max_steps or a stop
            self._log_train_means()

    def _reset_train_sums(self) -> None:
        self._loss_sum = torch.zeros((), device=self.device)
        self._correct = torch.zeros((), dtype=torch.long, device=self.device)
        self._samples = 0
        self._means_logged = False

    def _log_train_means(self) -> None:
        samples = max(1, self._samples)
        means = {"train/loss_epoch": self._loss_sum / samples, "train/acc": self._correct / samples}
        for name, value in means.items():
            shown = name == "train/loss_epoch"
            # batch_size=1: logged once, the mean as it is (Lightning would weight it by the
            # size of the batch at hand, and round differently for each)
            self.log(
                name,
                value,
                on_epoch=True,
                on_step=False,
                prog_bar=shown,
                sync_dist=True,
                batch_size=1,
            )
        self._means_logged = True

    def on_train_start(self) -> None:
        self._direct = None
        if self._steps_per_call > 1 and blocks.direct(self, self.trainer):
            configs = self.trainer.lr_scheduler_configs
            self._direct = (
                self.trainer.optimizers[0],
                self.trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress,
                configs[0].scheduler if configs else None,
            )
        # A run resumed mid-epoch starts no epoch: it continues the checkpoint's sums.
        if not self.restore_sums():
            self._reset_train_sums()
        self._means_logged = False  # logged again at the end of a resumed epoch

    def on_train_end(self) -> None:
        # The latest validation's matrix is drawn once, at the end: a figure of 10 classes takes
        # 0.1 to 0.4 s on a 2-core CPU (and importing matplotlib 0.8 s, once), more than a whole
        # epoch of the default digits run (about 0.2 s). Keeping its counts each epoch is free.
        if self._val_confusion is not None:
            self._show_confusion("val", self._val_confusion)

    def on_validation_end(self) -> None:
        if self.trainer.state.fn == "validate" and self._val_confusion is not None:
            self._show_confusion("val", self._val_confusion)  # validating only, no training

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, self.val_metrics, "val/loss")

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, self.test_metrics, "test/loss")

    def _eval_step(self, batch, metrics: MetricCollection, loss_name: str) -> None:
        x, y = batch
        logits = self(x)
        loss = self._loss(logits, y)
        self.log(loss_name, loss, prog_bar=True, batch_size=len(y), sync_dist=True)
        metrics.update(self._scores(logits), y)

    # Values logged once an epoch are averaged over devices (one collective call an epoch);
    # torchmetrics' compute() has already gathered the metrics' states from every device.

    def on_validation_epoch_end(self) -> None:
        values = self.val_metrics.compute()
        self.val_metrics.reset()
        confusion = values.pop(f"val/{CONFUSION}")
        acc = values.pop("val/acc")
        self.log("val/acc", acc, prog_bar=True, sync_dist=True)
        self.log_dict(values, sync_dist=True)
        if not self.trainer.sanity_checking:
            self._val_confusion = confusion
            self.val_acc_best.update(acc)
            self.log("val/acc_best", self.val_acc_best.compute(), sync_dist=True)

    def on_test_epoch_end(self) -> None:
        values = self.test_metrics.compute()
        self.test_metrics.reset()
        confusion = values.pop(f"test/{CONFUSION}")
        self.log_dict(values, sync_dist=True)
        self._show_confusion("test", confusion)

    def _show_confusion(self, split: str, confusion: torch.Tensor) -> None:
        """Write <run dir>/confusion_matrix_<split>.png and .csv, and log the image to every
        logger that takes images. The counts are already gathered from every device. A trainer
        without loggers (logger=False) keeps no record, so none of this either."""
        if not self.trainer.is_global_zero or not self.loggers:
            return
        counts = confusion.long().cpu().numpy()
        classes = getattr(self.trainer.datamodule, "classes", None)
        if classes is None or len(classes) != len(counts):
            classes = [str(i) for i in range(len(counts))]
        run_dir = Path(self.trainer.default_root_dir)
        with (run_dir / f"{CONFUSION}_{split}.csv").open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["true/predicted", *classes])
            for name, row in zip(classes, counts.tolist(), strict=True):
                writer.writerow([name, *row])
        right, total = int(counts.trace()), int(counts.sum())
        title = f"{split}: {right} of {total} right ({right / max(1, total):.1%})"
        image = _draw_confusion(counts, classes, title)
        Image.fromarray(image).save(run_dir / f"{CONFUSION}_{split}.png")
        log_image(self.loggers, f"{split}/{CONFUSION}", image, self.global_step)

    def configure_optimizers(self):
        optimizer = self.make_optimizer(params=self.parameters())
        return with_schedule(optimizer, self.make_scheduler, self.trainer)


class BinaryClassifier(Classifier):
    """Two classes, one logit: `net` emits one output per sample, the logit of label 1 (the
    second class folder, in sorted order), trained with binary cross-entropy (sigmoid included).
    Val and test get accuracy, precision, recall and F1 of label 1, and the confusion matrix,
    under the same names as Classifier's.
    """

    def __init__(
        self,
        net: nn.Module,
        num_classes: int,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None = None,
        channels_last: bool = False,
    ):
        super().__init__(net, num_classes, optimizer, scheduler, channels_last)
        if num_classes != 2:
            raise UserError(
                f"a binary classifier tells two classes apart, but data.num_classes={num_classes}:"
                " give it data with two classes, or use a multiclass model (e.g. model=cnn)."
            )

    def _metrics(self, num_classes: int) -> dict[str, Metric]:
        return {
            "acc": BinaryAccuracy(),
            "precision": BinaryPrecision(),
            "recall": BinaryRecall(),
            "f1": BinaryF1Score(),
            CONFUSION: BinaryConfusionMatrix(),
        }

    def _loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(logits.squeeze(1), y.to(logits.dtype))

    def _predict(self, logits: torch.Tensor) -> torch.Tensor:
        return (logits.squeeze(1) > 0).long()

    def _scores(self, logits: torch.Tensor) -> torch.Tensor:
        # Probabilities, not logits: torchmetrics takes a batch of logits that all fall in
        # [0, 1] for probabilities, and would threshold them at 0.5 instead of 0.
        return logits.squeeze(1).sigmoid()


def _draw_confusion(counts, classes: list[str], title: str):
    """The matrix as an RGB array: counts in the cells, shaded by the share of each true class."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # Agg: no display, no pyplot
    from matplotlib.figure import Figure

    n = len(counts)
    side = min(16.0, 2.5 + 0.45 * n)
    figure = Figure(figsize=(side + 1, side), dpi=100)
    canvas = FigureCanvasAgg(figure)
    ax = figure.subplots()
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    shading = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    figure.colorbar(shading, ax=ax, label="share of the true class")
    if n <= 30:  # beyond that, numbers and names no longer fit
        for (i, j), count in np.ndenumerate(counts):
            colour = "white" if shares[i, j] > 0.5 else "black"
            ax.text(j, i, str(count), ha="center", va="center", fontsize=8, color=colour)
        ax.set_xticks(range(n), classes, rotation=90)
        ax.set_yticks(range(n), classes)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    figure.tight_layout()
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
