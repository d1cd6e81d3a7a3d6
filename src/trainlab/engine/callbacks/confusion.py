"""Confusion matrices as files and images: what a classifier's val and test splits got wrong."""

import csv
from pathlib import Path

import lightning.pytorch as pl
from PIL import Image

from trainlab.engine.loggers import log_image


class ConfusionMatrix(pl.Callback):
    """Writes <run dir>/confusion_matrix_<split>.csv and .png, and logs the image to every logger
    that takes images, from the counts a module keeps in `confusion_matrices` (the Classifier's:
    split name to counts, true class by predicted class, gathered from every device). Modules
    without them get nothing.

    Validation's matrix is drawn once, at the end of training (or of `validate`): a figure of 10
    classes takes 0.1 to 0.4 s on a 2-core CPU (and importing matplotlib 0.8 s, once), more than
    a whole epoch of the default digits run (about 0.2 s). Keeping its counts each epoch is free.
    """

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._show(trainer, pl_module, "val")

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "validate":  # validating only, no training
            self._show(trainer, pl_module, "val")

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._show(trainer, pl_module, "test")

    def _show(self, trainer: pl.Trainer, pl_module: pl.LightningModule, split: str) -> None:
        counts = getattr(pl_module, "confusion_matrices", {}).get(split)
        # A trainer without loggers (logger=False) keeps no record, so none of this either.
        if counts is None or not trainer.is_global_zero or not trainer.loggers:
            return
        counts = counts.long().cpu().numpy()
        classes = getattr(trainer.datamodule, "classes", None)
        if classes is None or len(classes) != len(counts):
            classes = [str(i) for i in range(len(counts))]
        run_dir = Path(trainer.default_root_dir)
        with (run_dir / f"confusion_matrix_{split}.csv").open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["true/predicted", *classes])
            for name, row in zip(classes, counts.tolist(), strict=True):
                writer.writerow([name, *row])
        right, total = int(counts.trace()), int(counts.sum())
        title = f"{split}: {right} of {total} right ({right / max(1, total):.1%})"
        image = draw(counts, classes, title)
        Image.fromarray(image).save(run_dir / f"confusion_matrix_{split}.png")
        log_image(trainer.loggers, f"{split}/confusion_matrix", image, trainer.global_step)


def draw(counts, classes: list[str], title: str):
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
