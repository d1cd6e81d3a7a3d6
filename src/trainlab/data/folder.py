"""Image files in class folders, decoded per sample by DataLoader workers: the path for data
sets that do not fit in memory (or that grow), with transforms set in config."""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader
from torchvision import datasets
from torchvision.transforms import v2

from trainlab.data.base import per_device_batch_size
from trainlab.errors import UserError

SPLITS = ("train", "val", "test")


def load_image(path: str) -> Image.Image:
    """PIL's loader, with an error that names the file and says what to do."""
    try:
        with Image.open(path) as image:
            image.load()
            return image
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise UserError(
            f"cannot read the image {path} ({e}). Replace or delete the file and run again."
        ) from None


class ImageFolderDataModule(pl.LightningDataModule):
    """<data_dir>/<root>/{train,val[,test]}/<class name>/<image file>, any image size.

    Images are converted to grey or RGB (input_shape[0] is 1 or 3), resized to input_shape's
    height and width, augmented by `train_transforms` (torchvision v2 transforms, from config)
    in training only, and normalised with `mean` and `std`.
    """

    def __init__(
        self,
        data_dir: str,
        root: str,
        batch_size: int,
        num_classes: int,
        input_shape: list[int],
        train_transforms: list[Any] = (),
        mean: list[float] = (0.5,),
        std: list[float] = (0.5,),
        num_workers: int | str = "auto",
        per_device: bool = False,
    ):
        super().__init__()
        self.root = Path(data_dir) / root
        self.per_device = per_device
        self.batch_size = batch_size
        self.num_classes = num_classes
        self.input_shape = tuple(input_shape)
        self.train_transforms = list(train_transforms)
        self.mean, self.std = list(mean), list(std)
        self.num_workers = num_workers
        self.splits: dict[str, datasets.ImageFolder] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        if not (self.root / "train").is_dir() or not (self.root / "val").is_dir():
            raise UserError(
                f"{self.root} must hold train/ and val/ (and optionally test/), each with one "
                "folder of images per class; paths.data_dir and data.root say where it is."
            )
        for split in SPLITS:
            if (self.root / split).is_dir():
                self.splits[split] = self._dataset(split)
        classes = self.splits["train"].classes
        if len(classes) != self.num_classes:
            raise UserError(
                f"{self.root / 'train'} has {len(classes)} class folders ({', '.join(classes)}) "
                f"but data.num_classes={self.num_classes}."
            )
        for split, dataset in self.splits.items():
            if dataset.classes != classes:
                raise UserError(f"{self.root / split} has other class folders than train/.")
            for path, _ in dataset.samples:  # headers only: cheap, and catches most bad files
                _check_header(path)

    def _dataset(self, split: str) -> datasets.ImageFolder:
        mode = "L" if self.input_shape[0] == 1 else "RGB"
        steps = [
            v2.Lambda(partial(Image.Image.convert, mode=mode)),
            v2.Resize(self.input_shape[1:]),
        ]
        if split == "train":
            steps += self.train_transforms
        steps += [
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(self.mean, self.std),
        ]
        try:
            return datasets.ImageFolder(
                str(self.root / split), transform=v2.Compose(steps), loader=load_image
            )
        except FileNotFoundError as e:  # a split folder with no images
            raise UserError(f"{self.root / split}: {e}") from None

    @property
    def batch_size_per_device(self) -> int:
        return per_device_batch_size(self.batch_size, self.trainer, self.per_device)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        workers = self.num_workers
        if workers == "auto":  # decoding is the bottleneck; leave a core for the training loop
            workers = max(0, min(8, (len(os.sched_getaffinity(0)) - 1)))
        on_gpu = self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"
        return DataLoader(
            self.splits[split],
            batch_size=self.batch_size_per_device,
            shuffle=shuffle,
            num_workers=workers,
            pin_memory=on_gpu,
            persistent_workers=workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test" if "test" in self.splits else "val", shuffle=False)


def _check_header(path: str) -> None:
    try:
        with Image.open(path):
            pass
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise UserError(
            f"cannot read the image {path} ({e}). Replace or delete the file and run again."
        ) from None
