"""Image files, decoded per sample by DataLoader workers: the path for data sets that do not fit
in memory (or that grow), with transforms set in config. The files are found in class folders
(ImageFolderDataModule) or in lists of `path,label` lines (ImageListDataModule)."""

from __future__ import annotations

import csv
import os
from functools import partial
from pathlib import Path
from typing import Annotated, Any, Literal

import lightning.pytorch as pl
import torch
from PIL import Image, UnidentifiedImageError
from pydantic import Field, NonNegativeInt, PositiveInt
from torch.utils.data import DataLoader, Dataset
from torchvision import datasets
from torchvision.transforms import v2

from trainlab.engine import ResumableDataLoader, UserError, per_device_batch_size, run_seed

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


class ImageFilesDataModule(pl.LightningDataModule):
    """What both sources of image files share: the transforms, the checks and the loaders.

    Images are converted to grey or RGB (input_shape[0] is 1 or 3), resized to input_shape's
    height and width, augmented by `train_transforms` (torchvision v2 transforms, from config)
    in training only, and normalised with `mean` and `std`. Subclasses find the samples.
    """

    def __init__(
        self,
        batch_size: PositiveInt,
        num_classes: PositiveInt,
        input_shape: list[PositiveInt],
        train_transforms: list[Any] = (),
        mean: list[float] = (0.5,),
        std: list[Annotated[float, Field(gt=0)]] = (0.5,),
        num_workers: NonNegativeInt | Literal["auto"] = "auto",
        per_device: bool = False,
    ):
        super().__init__()
        self.per_device = per_device
        self.batch_size = batch_size
        self.num_classes = num_classes
        self.input_shape = tuple(input_shape)
        self.train_transforms = list(train_transforms)
        self.mean, self.std = list(mean), list(std)
        self.num_workers = num_workers
        # Each split holds `samples` [(path, label)] and `classes` [name of each label].
        self.splits: dict[str, datasets.ImageFolder | ImageList] = {}

    def find_splits(self) -> dict[str, datasets.ImageFolder | ImageList]:
        """{"train": ..., "val": ...[, "test": ...]}, checked against num_classes."""
        raise NotImplementedError

    @property
    def classes(self) -> list[str] | None:
        """The name of each label, in label order; None until set up."""
        train = self.splits.get("train")
        return train.classes if train is not None else None

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        self.splits = self.find_splits()
        for dataset in self.splits.values():
            for path, _ in dataset.samples:  # headers only: cheap, and catches most bad files
                _check_header(path)

    def transform(self, split: str) -> v2.Compose:
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
        return v2.Compose(steps)

    @property
    def batch_size_per_device(self) -> int:
        return per_device_batch_size(self.batch_size, self.trainer, self.per_device)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        workers = self.num_workers
        if workers == "auto":  # decoding is the bottleneck; leave a core for the training loop
            workers = max(0, min(8, (len(os.sched_getaffinity(0)) - 1)))
        on_gpu = self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"
        options = {
            "batch_size": self.batch_size_per_device,
            "num_workers": workers,
            "pin_memory": on_gpu,
            "persistent_workers": workers > 0,
        }
        trainer = self.trainer
        if not shuffle or (trainer is not None and trainer.overfit_batches):
            # A generator of its own: else each pass draws its workers' seed from the global
            # one, which dropout shares, and a resumed run would draw where the first did not.
            return DataLoader(self.splits[split], generator=torch.Generator(), **options)
        return ResumableDataLoader(  # resumes mid-epoch, with the same random transforms
            self.splits[split],
            seed=run_seed(trainer),
            random=bool(self.train_transforms),
            rank=trainer.global_rank if trainer is not None else 0,
            world_size=trainer.world_size if trainer is not None else 1,
            **options,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test" if "test" in self.splits else "val", shuffle=False)


class ImageFolderDataModule(ImageFilesDataModule):
    """<data_dir>/<root>/{train,val[,test]}/<class name>/<image file>, any image size; the
    labels are the class folders in sorted order. The other arguments: ImageFilesDataModule."""

    def __init__(self, data_dir: str, root: str, **options: Any):
        super().__init__(**options)
        self.root = Path(data_dir) / root

    def find_splits(self) -> dict[str, datasets.ImageFolder]:
        if not (self.root / "train").is_dir() or not (self.root / "val").is_dir():
            raise UserError(
                f"{self.root} must hold train/ and val/ (and optionally test/), each with one "
                "folder of images per class; paths.data_dir and data.root say where it is."
            )
        splits = {s: self._dataset(s) for s in SPLITS if (self.root / s).is_dir()}
        classes = splits["train"].classes
        if len(classes) != self.num_classes:
            raise UserError(
                f"{self.root / 'train'} has {len(classes)} class folders ({', '.join(classes)}) "
                f"but data.num_classes={self.num_classes}."
            )
        for split, dataset in splits.items():
            if dataset.classes != classes:
                raise UserError(f"{self.root / split} has other class folders than train/.")
        return splits

    def _dataset(self, split: str) -> datasets.ImageFolder:
        try:
            return datasets.ImageFolder(
                str(self.root / split), transform=self.transform(split), loader=load_image
            )
        except FileNotFoundError as e:  # a split folder with no images
            raise UserError(f"{self.root / split}: {e}") from None


class ImageListDataModule(ImageFilesDataModule):
    """Images named by one list file per split: CSV lines `path,label` (an optional first line
    `path,label` is a header), each path relative to the list file's folder; any image size.

    `lists` maps train, val and optionally test to list files, relative to `data_dir`; without
    a test list the val list is tested. `classes` names the labels in label order; null takes
    the training list's labels, sorted (numerically when they are all integers), as class
    folders are. The other arguments: ImageFilesDataModule.
    """

    def __init__(
        self,
        data_dir: str,
        lists: dict[str, str | None],
        classes: list[str] | None = None,
        **options: Any,
    ):
        super().__init__(**options)
        self.data_dir, self.lists = Path(data_dir), dict(lists)
        self.class_names = [str(c) for c in classes] if classes is not None else None

    def find_splits(self) -> dict[str, ImageList]:
        if set(self.lists) - set(SPLITS) or not all(self.lists.get(s) for s in ("train", "val")):
            raise UserError(
                "data.lists must name a list file for train and val, and may name one for "
                f"test (or null), but it is {self.lists}."
            )
        files = {s: self.data_dir / self.lists[s] for s in SPLITS if self.lists.get(s)}
        rows = {split: _read_list(path) for split, path in files.items()}
        train_list = files["train"]
        if self.class_names is not None:
            classes, source = self.class_names, "data.classes"
        else:
            labels = {label for _, label, _ in rows["train"]}
            numeric = all(label.isdigit() for label in labels)
            classes = sorted(labels, key=int) if numeric else sorted(labels)
            source = f"the labels of {train_list}"
        if len(classes) != self.num_classes:
            raise UserError(
                f"{source} make {len(classes)} classes ({', '.join(classes)}) but "
                f"data.num_classes={self.num_classes}: set one to match the other."
            )
        index = {name: i for i, name in enumerate(classes)}
        splits = {}
        for split, path in files.items():
            samples = []
            for image, label, line in rows[split]:
                if label not in index:
                    raise UserError(
                        f"{path}, line {line}: the label {label!r} is not one of the classes "
                        f"({', '.join(classes)}, from {source}). Correct the line, or list "
                        "every class in data.classes."
                    )
                samples.append((image, index[label]))
            splits[split] = ImageList(samples, classes, self.transform(split))
        return splits


class ImageList(Dataset):
    """(image, label) pairs from a list of (path, label): ImageFolder's interface."""

    def __init__(self, samples: list[tuple[str, int]], classes: list[str], transform):
        self.samples, self.classes, self.transform = samples, classes, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        return self.transform(load_image(path)), label


def _read_list(list_file: Path) -> list[tuple[str, str, int]]:
    """(image path, label, line number) for each line of a `path,label` list file."""
    if not list_file.is_file():
        raise UserError(
            f"the image list {list_file} does not exist: data.lists names it, relative to "
            "paths.data_dir. Write it (one `path,label` line per image) or correct the path."
        )
    rows = []
    with list_file.open(newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        try:
            for row in reader:
                line = reader.line_num
                fields = [field.strip() for field in row]
                header = line == 1 and [field.lower() for field in fields] == ["path", "label"]
                if header or not any(fields):
                    continue
                if len(fields) != 2 or not all(fields):
                    raise UserError(
                        f"{list_file}, line {line}: expected `path,label` but found "
                        f"{','.join(row)!r}. Each line names one image, relative to "
                        f"{list_file.parent}, and its class, e.g. `cats/1.png,cats`."
                    )
                image = list_file.parent / fields[0]
                if not image.is_file():
                    raise UserError(
                        f"{list_file}, line {line}: the image {image} does not exist. Correct "
                        f"the path (relative to {list_file.parent}) or remove the line."
                    )
                rows.append((str(image), fields[1], line))
        except csv.Error as e:
            raise UserError(
                f"{list_file}, line {reader.line_num}: cannot read it as CSV ({e}). A list is a "
                "text file of `path,label` lines."
            ) from None
        except UnicodeDecodeError:  # decoded ahead in blocks: the line is not known
            raise UserError(
                f"the image list {list_file} is not UTF-8 text: write it as a UTF-8 text file "
                "of `path,label` lines."
            ) from None
    if not rows:
        raise UserError(f"the image list {list_file} lists no images: add `path,label` lines.")
    return rows


def _check_header(path: str) -> None:
    try:
        with Image.open(path):
            pass
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise UserError(
            f"cannot read the image {path} ({e}). Replace or delete the file and run again."
        ) from None
