"""Images held in memory: the in-memory data module for uint8 N, C, H, W tensors, normalised per
channel with the data set's own mean and std, and optionally augmented."""

from __future__ import annotations

from functools import partial

import torch

from trainlab.data.augment import crop_flip, per_sample_crop_flip
from trainlab.engine import Augment, InMemoryDataModule

PADDING = 4  # of the random crops, in pixels: the usual choice for 32x32 images


class ImageDataModule(InMemoryDataModule):
    """Subclasses implement `load()`, its features uint8 images (N, C, H, W), and set `mean`
    and `std` (per channel, on the 0..1 scale). `augment` adds random crops and horizontal
    flips to the training batches, on either loader path."""

    def __init__(self, *args, augment: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.augment = augment

    def check(self, split: str, x: torch.Tensor) -> None:
        super().check(split, x)
        if x.dtype != torch.uint8:
            raise ValueError(f"{split} images are {x.dtype}, expected uint8 (N, C, H, W)")

    def augment_batch(self) -> Augment | None:
        return partial(crop_flip, padding=PADDING) if self.augment else None

    def augment_sample(self):
        return per_sample_crop_flip(self.input_shape[1:], PADDING) if self.augment else None
