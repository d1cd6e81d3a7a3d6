"""A trained net as a deployed model: it takes uint8 images [N, C, H, W], already resized, and
normalises them itself, so that whoever runs it needs only the preprocessing recorded beside it.

`export` writes such a model to a file; `predict` runs it (or rebuilds it from a checkpoint).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from torch import nn

from trainlab import __version__
from trainlab.engine import checkpoint
from trainlab.engine.config import check_targets
from trainlab.engine.errors import UserError

CHANNELS = {1: "L", 3: "RGB"}  # PIL's modes, by number of input channels


class Deployed(nn.Module):
    """uint8 images -> the net's outputs, as [N, classes] logits or [N, 1] for one binary logit.

    The normalisation is the data modules' own: x * (1 / (255 std)) - mean / std per channel.
    """

    def __init__(self, net: nn.Module, mean: list[float], std: list[float]):
        super().__init__()
        self.net = net
        mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.register_buffer("scale", 1 / (255 * std_t))
        self.register_buffer("shift", -mean_t / std_t)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.net(images.to(torch.float32) * self.scale + self.shift)
        return out.reshape(images.shape[0], -1)


def from_checkpoint(path: str | Path) -> tuple[Deployed, dict[str, Any]]:
    """The deployed model of a checkpoint, in eval mode, and the preprocessing it expects (the
    JSON that exported files record)."""
    ckpt = checkpoint.read(path)
    cfg = checkpoint.stored_config(ckpt)
    check_targets({"_target_": cfg.data._target_}, "the checkpoint's data config")
    # Constructing a data module reads no files, and it knows its input shape, mean and std;
    # what it holds (e.g. training transforms) is left unbuilt.
    datamodule = instantiate(cfg.data, _recursive_=False)
    shape = [int(n) for n in datamodule.input_shape]
    if len(shape) != 3 or datamodule.mean is None or getattr(datamodule, "normalise", None):
        raise UserError(
            f"{path} was trained on samples of shape {shape} normalised by "
            f"{getattr(datamodule, 'normalise', None) or 'no given mean and std'}: only image "
            "models normalised by a given per-channel mean and std (data.mean, data.std) can be "
            "deployed. Load the checkpoint in Python instead (engine.checkpoint.build_model)."
        )
    model = Deployed(checkpoint.build_model(ckpt).net, datamodule.mean, datamodule.std).eval()
    if shape[0] not in CHANNELS:
        raise UserError(
            f"{path} takes {shape[0]}-channel inputs; only grey (1) or RGB (3) images can be "
            "read for it."
        )
    with torch.no_grad():
        width = model(torch.zeros(1, *shape, dtype=torch.uint8)).shape[1]
    binary = width == 1
    classes = ckpt[checkpoint.KEY].get("classes") or [str(i) for i in range(max(width, 2))]
    if len(classes) != (2 if binary else width):
        raise UserError(
            f"{path}: the net emits {width} outputs but the data set has {len(classes)} classes "
            f"({', '.join(classes)}); it cannot be deployed as a classifier."
        )
    meta = {
        "input": "uint8 images [N, C, H, W], resized, not normalised",
        "input_shape": shape,
        "channels": CHANNELS[shape[0]],
        "resize": shape[1:],
        "interpolation": "bilinear",
        "mean": [float(m) for m in datamodule.mean],
        "std": [float(s) for s in datamodule.std],
        "classes": list(classes),
        "output": "binary_logit" if binary else "logits",
        "checkpoint": str(Path(path).resolve()),
        "trainlab_version": __version__,
    }
    return model, meta
