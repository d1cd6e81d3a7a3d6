"""Classify image files: `python -m trainlab.predict model_path=<file> inputs=[a.png,b.jpg]`.

model_path is a checkpoint (.ckpt) or a model written by `trainlab.export` (.onnx, .pt); inputs
names image files or folders of them (searched recursively). Each image is read with PIL,
converted to the model's channel mode (L or RGB) and resized as the training images were. The
predictions (file, class, probability) are printed as a table and written to
<run dir>/predictions.csv, or to output=<file> (a .json name writes JSON).

A TorchScript file (.pt) is a program that can do anything when run, so it is read only with
trust_model_file=true (docs/trust.md); a checkpoint loads with weights_only and an ONNX model
runs on onnxruntime, neither of which runs code from the file.

An ONNX model runs on onnxruntime alone: torch is imported only for the other two kinds.
"""

from __future__ import annotations

# ruff: noqa: E402
# The stop handler first of all, then the imports (see trainlab.engine.stopping).
from trainlab.engine import stopping

if __name__ == "__main__":
    stopping.install()

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from trainlab.engine import cli
from trainlab.engine.config import CONF_DIR
from trainlab.engine.errors import UserError, exit_on_user_error
from trainlab.engine.model_files import load_model


# The key of the preprocessing JSON: ONNX metadata_props key, TorchScript extra file name.
def image_files(inputs: str | Sequence[str]) -> list[Path]:
    """The files named, and the images inside the folders named, in order."""
    from PIL import Image

    readable = {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}
    files: list[Path] = []
    for item in [inputs] if isinstance(inputs, str) else inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(
                p for p in path.rglob("*") if p.suffix.lower() in readable and p.is_file()
            )
            if not found:
                raise UserError(f"the folder {path} holds no image files that PIL can read.")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise UserError(
                f"the input {path} does not exist. inputs=[a.png,b.jpg] names image files, or "
                "folders of them."
            )
    if not files:
        raise UserError("inputs names no files: give some, e.g. inputs=[a.png,b.jpg].")
    return files


def read_images(files: Sequence[Path], meta: dict[str, Any]):
    """uint8 [N, C, H, W]: each image in the model's channel mode, resized as in training
    (PIL's bilinear resize, which torchvision's Resize uses for PIL images)."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    height, width = meta["resize"]
    arrays = []
    for path in files:
        try:
            with Image.open(path) as image:
                image = image.convert(meta["channels"])
                pixels = np.asarray(image.resize((width, height), Image.Resampling.BILINEAR))
        except Image.DecompressionBombError as e:  # decoding it could take all memory
            raise UserError(
                f"the image {path} is too large to decode safely: {str(e).rstrip('.')}. Shrink "
                f"it (predict resizes every image to {width}x{height} anyway), or leave it out "
                "of inputs."
            ) from None
        except (OSError, UnidentifiedImageError, ValueError) as e:  # cut short, not an image
            raise UserError(
                f"cannot read the image {path}: it is damaged, cut short or not an image ({e}). "
                "Replace it, or leave it out of inputs."
            ) from None
        arrays.append(pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1))
    return np.ascontiguousarray(np.stack(arrays), dtype=np.uint8)


def classify(outputs, meta: dict[str, Any]) -> list[tuple[str, float]]:
    """(class, its probability) per row: softmax over logits, or sigmoid > 0.5 of one logit."""
    import numpy as np

    classes = meta["classes"]
    outputs = outputs.astype(np.float64)
    if meta["output"] == "binary_logit":
        positive = 0.5 * (1 + np.tanh(outputs[:, 0] / 2))  # the sigmoid, without overflow
        return [(classes[int(p > 0.5)], float(max(p, 1 - p))) for p in positive]
    probs = np.exp(outputs - outputs.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    return [(classes[i], float(row[i])) for row, i in zip(probs, probs.argmax(axis=1), strict=True)]


def predict(cfg: DictConfig, run_dir: str | Path) -> tuple[list[dict[str, Any]], Path]:
    """Classify cfg.inputs with cfg.model_path; write and return the rows and their file."""
    if not isinstance(cfg.batch_size, int) or cfg.batch_size < 1:
        raise UserError(f"batch_size must be a positive integer, but it is {cfg.batch_size!r}.")
    trust = cfg.get("trust_model_file", False)
    if not isinstance(trust, bool):
        raise UserError(f"trust_model_file must be true or false, but it is {trust!r}.")
    files = image_files(cfg.inputs)
    model = load_model(cfg.model_path, trust_model_file=trust)
    rows = []
    for start in range(0, len(files), cfg.batch_size):
        batch = files[start : start + cfg.batch_size]
        outputs = model.run(read_images(batch, model.meta))
        for path, (label, probability) in zip(batch, classify(outputs, model.meta), strict=True):
            rows.append({"file": str(path), "class": label, "probability": probability})
    output = Path(cfg.output or Path(run_dir) / "predictions.csv")
    output.parent.mkdir(parents=True, exist_ok=True)
    if output.suffix.lower() == ".json":
        output.write_text(json.dumps(rows, indent=2) + "\n")
    else:
        with open(output, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["file", "class", "probability"])
            writer.writeheader()
            writer.writerows(rows)
    return rows, output


def print_table(rows: list[dict[str, Any]]) -> None:
    file_width = max(len("file"), *(len(r["file"]) for r in rows))
    class_width = max(len("class"), *(len(r["class"]) for r in rows))
    print(f"{'file':<{file_width}}  {'class':<{class_width}}  probability")
    for r in rows:
        print(f"{r['file']:<{file_width}}  {r['class']:<{class_width}}  {r['probability']:.4f}")


@hydra.main(config_path=str(CONF_DIR), config_name="predict", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    with exit_on_user_error():
        rows, output = predict(cfg, HydraConfig.get().runtime.output_dir)
    print_table(rows)
    print(f"predictions written to {output}")


def main() -> None:
    """Check and complete the command line (trainlab.engine.cli), then run Hydra."""
    cli.run("predict", _hydra_main, sweeps=False)


if __name__ == "__main__":
    main()
