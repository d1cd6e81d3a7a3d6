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

    Validation's matrix is drawn once, at the end of training (or of `validate`), from the counts
    the module keeps each epoch: the last epoch's.
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


# Light to dark blue by the share of the true class (matplotlib's "Blues" at 0 and 1).
_LIGHT, _DARK = (247, 251, 255), (8, 48, 107)


def _shade(share: float) -> tuple[int, int, int]:
    return tuple(round(a + (b - a) * share) for a, b in zip(_LIGHT, _DARK, strict=True))


def _upward(text: str, length: int, font, anchor: str = "mm"):
    """`text` on a white strip `length` px long, turned to read upward: centred, or ending at
    the strip's end (anchor "rm", so that names of any length end at the grid)."""
    from PIL import ImageDraw

    strip = Image.new("RGB", (length, 16), "white")
    at = (length - 2, 8) if anchor == "rm" else (length // 2, 8)
    ImageDraw.Draw(strip).text(at, text, fill="black", font=font, anchor=anchor)
    return strip.rotate(90, expand=True)


def draw(counts, classes: list[str], title: str):
    """The matrix as an RGB array: counts in the cells, shaded by the share of each true class,
    classes named along both sides, and a scale of the shading.

    Drawn with PIL rather than matplotlib: the same figure took matplotlib about 0.4 s (twice a
    run, and 0.8 s to import it), longer than the default run's training; PIL takes milliseconds."""
    import numpy as np
    from PIL import ImageDraw, ImageFont

    n = len(counts)
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    labelled = n <= 30  # beyond that, numbers and names no longer fit
    cell = max(36, 240 // n) if labelled else max(4, 720 // n)  # a grid of 240 px at least
    font = ImageFont.load_default(size=12)
    names = [str(c) for c in classes] if labelled else []
    name_width = max((int(font.getlength(name)) for name in names), default=0)
    left, top = 40 + name_width, 40  # room for "true" and the names; for the title
    grid = cell * n
    bottom = top + grid + 30 + name_width  # the names below, then "predicted"
    width = left + grid + 110  # the scale beside the grid
    image = Image.new("RGB", (width, bottom), "white")
    pen = ImageDraw.Draw(image)
    pen.text((width // 2, 20), title, fill="black", font=font, anchor="mm")
    for i in range(n):
        for j in range(n):
            x, y = left + j * cell, top + i * cell
            pen.rectangle((x, y, x + cell, y + cell), fill=_shade(float(shares[i, j])))
            if labelled:
                colour = "white" if shares[i, j] > 0.5 else "black"
                middle = (x + cell // 2, y + cell // 2)
                pen.text(middle, str(counts[i, j]), fill=colour, font=font, anchor="mm")
    pen.rectangle((left, top, left + grid, top + grid), outline="black")
    for k, name in enumerate(names):
        middle = top + k * cell + cell // 2
        pen.text((left - 6, middle), name, fill="black", font=font, anchor="rm")
        # a predicted class's name reads upward below its column
        upward = _upward(name, name_width + 2, font, anchor="rm")
        image.paste(upward, (left + k * cell + cell // 2 - 8, top + grid + 6))
    pen.text((left + grid // 2, bottom - 12), "predicted", fill="black", font=font, anchor="mm")
    image.paste(_upward("true", 40, font), (6, top + grid // 2 - 20))
    # the scale: the share of the true class, 0 at the bottom, 1 at the top
    x = left + grid + 20
    for y in range(grid):
        pen.line((x, top + y, x + 14, top + y), fill=_shade(1 - y / max(1, grid - 1)))
    pen.rectangle((x, top, x + 14, top + grid), outline="black")
    pen.text((x + 18, top), "1", fill="black", font=font, anchor="lt")
    pen.text((x + 18, top + grid), "0", fill="black", font=font, anchor="lb")
    image.paste(_upward("share of true class", 150, font), (x + 34, top + grid // 2 - 75))
    return np.asarray(image).copy()
