from __future__ import annotations

import os
from functools import partial
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from trainlab.data.augment import crop_flip, per_sample_crop_flip
from trainlab.data.memory import Block, MemoryLoader
from trainlab.data.resumable import ResumableDataLoader
from trainlab.errors import UserError

# The validation split is carved from the training split with this fixed seed, so that every
# run (whatever its own seed) is validated and tested on the same samples.
SPLIT_SEED = 1234
LOADERS = ("memory", "dataloader")
PADDING = 4  # of the random crops, in pixels: the usual choice for 32x32 images


def per_device_batch_size(batch_size: int, trainer, per_device: bool = False) -> int:
    """The policy: data.batch_size is the global batch size, split evenly across the devices
    of all nodes; with data.per_device=true it is each device's batch instead."""
    devices = trainer.world_size if trainer is not None else 1
    if per_device:
        return batch_size
    if batch_size % devices:
        raise UserError(
            f"data.batch_size={batch_size} is the global batch size and must divide evenly "
            f"across the {devices} devices: choose a multiple of {devices}, or set "
            "data.per_device=true to give each device that many."
        )
    return batch_size // devices


class InMemoryDataModule(pl.LightningDataModule):
    """A data set small enough to hold in memory: each split is a pair (uint8 images, labels).

    Subclasses implement `load()` and set `mean` and `std` (per channel, on the 0..1 scale).
    `batch_size` is the global batch size: with N devices each one gets batch_size / N
    (`per_device=True`: each gets batch_size).

    `loader="memory"` keeps each split as one tensor on the training device and slices batches
    from it (`MemoryLoader`); `loader="dataloader"` goes through torch's DataLoader, sample by
    sample, with `num_workers` worker processes, as a data set too big for memory would.
    `augment` adds random crops and horizontal flips to the training batches, on either path.
    Batches are normalised on the device either way.
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    steps_per_call = 1  # training batches a block (set by the Classifier, see steps_per_call)

    def __init__(
        self,
        data_dir: str,
        batch_size: int,
        num_classes: int,
        input_shape: list[int],
        val_size: int | float = 0.1,
        loader: str = "memory",
        augment: bool = False,
        num_workers: int | str = "auto",
        per_device: bool = False,
    ):
        super().__init__()
        self.data_dir = Path(data_dir)
        self.batch_size = batch_size
        self.per_device = per_device
        self.num_classes = num_classes
        self.input_shape = tuple(input_shape)
        self.val_size = val_size
        self.loader = loader
        self.augment = augment
        self.num_workers = num_workers
        self.splits: dict[str, TensorDataset] = {}
        self._on_device: dict[tuple[str, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}
        self._normalise: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def load(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Return {"train": (x, y), "test": (x, y)} and optionally "val"; x is uint8 NCHW."""
        raise NotImplementedError

    @property
    def batch_size_per_device(self) -> int:
        return per_device_batch_size(self.batch_size, self.trainer, self.per_device)

    @property
    def device(self) -> torch.device:
        """Where training runs: the memory path keeps its tensors there."""
        return (
            self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
        )

    def setup(self, stage: str | None = None) -> None:
        if self.loader not in LOADERS:
            raise UserError(
                f"data.loader must be one of {', '.join(LOADERS)}, but it is {self.loader!r}."
            )
        if self.splits:
            return
        data = self.load()
        if "val" not in data:
            data["train"], data["val"] = self._split(*data["train"])
        for name, (x, y) in data.items():
            if tuple(x.shape[1:]) != self.input_shape or x.dtype != torch.uint8:
                raise ValueError(
                    f"{name} images are {x.dtype} {tuple(x.shape[1:])}, "
                    f"expected uint8 {self.input_shape}"
                )
            self.splits[name] = TensorDataset(x, y.long())
        if len(self.splits["train"]) < self.batch_size_per_device:
            raise UserError(
                f"the training split has {len(self.splits['train'])} samples, fewer than one "
                f"batch of {self.batch_size_per_device}: lower data.batch_size."
            )

    def _split(self, x: torch.Tensor, y: torch.Tensor):
        n_val = round(len(x) * self.val_size) if isinstance(self.val_size, float) else self.val_size
        if not 0 < n_val < len(x):
            raise UserError(
                f"data.val_size={self.val_size} leaves {len(x) - n_val} of {len(x)} training "
                f"samples for training and {n_val} for validation: give a number of samples "
                f"between 1 and {len(x) - 1}, or a fraction between 0 and 1."
            )
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(SPLIT_SEED))
        val, train = order[:n_val], order[n_val:]
        return (x[train], y[train]), (x[val], y[val])

    def train_dataloader(self) -> MemoryLoader | DataLoader:
        return self._make_loader("train")

    def val_dataloader(self) -> MemoryLoader | DataLoader:
        return self._make_loader("val")

    def test_dataloader(self) -> MemoryLoader | DataLoader:
        return self._make_loader("test")

    def _make_loader(self, split: str) -> MemoryLoader | DataLoader:
        train = split == "train"
        # Lightning's overfit_batches wants the same few batches every epoch
        shuffle = train and not (self.trainer is not None and self.trainer.overfit_batches)
        if self.loader == "dataloader":
            return self._dataloader(split, shuffle)
        x, y = self._on_device_tensors(split)
        return MemoryLoader(
            x,
            y,
            self.batch_size_per_device,
            train=train,
            shuffle=shuffle,
            augment=partial(crop_flip, padding=PADDING) if train and self.augment else None,
            seed=self._shuffle_seed() if train else 0,
            rank=self.trainer.global_rank if self.trainer is not None else 0,
            world_size=self.trainer.world_size if self.trainer is not None else 1,
            steps_per_call=self.steps_per_call,
        )

    def _on_device_tensors(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The split's tensors on the training device, moved there once."""
        key = (split, self.device)
        if key not in self._on_device:
            x, y = self.splits[split].tensors
            self._on_device[key] = (x.to(self.device), y.to(self.device))
        return self._on_device[key]

    def _shuffle_seed(self) -> int:
        # The seed torch was last seeded with: the run's seed (seed_everything sets it), else a
        # random one. Every rank must shuffle alike, so rank 0's wins.
        seed = torch.initial_seed() % 2**62
        return self.trainer.strategy.broadcast(seed) if self.trainer is not None else seed

    def _dataloader(self, split: str, shuffle: bool) -> DataLoader:
        dataset: Dataset = self.splits[split]
        per_sample_work = split == "train" and self.augment
        if per_sample_work:
            dataset = _Transformed(dataset, per_sample_crop_flip(self.input_shape[1:], PADDING))
        workers = self._workers(per_sample_work)
        options = {
            "batch_size": self.batch_size_per_device,
            "num_workers": workers,
            "pin_memory": self.device.type == "cuda",
            "persistent_workers": workers > 0,
        }
        if not shuffle:  # evaluation, or overfit_batches: the same batches every time
            # A generator of its own: else each pass draws its workers' seed from the global
            # one, which dropout shares, and a resumed run would draw where the first did not.
            return DataLoader(dataset, generator=torch.Generator(), **options)
        return ResumableDataLoader(
            dataset,
            seed=self._shuffle_seed(),
            random=per_sample_work,
            rank=self.trainer.global_rank if self.trainer is not None else 0,
            world_size=self.trainer.world_size if self.trainer is not None else 1,
            **options,
        )

    def _workers(self, per_sample_work: bool) -> int:
        """`auto`: none for plain slices of tensors in memory, where workers would only add
        copies between processes (twice as slow, measured); else the cores that this process's
        torch threads leave free, shared among the devices."""
        if self.num_workers != "auto":
            return int(self.num_workers)
        if not per_sample_work:
            return 0
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        devices = self.trainer.num_devices if self.trainer is not None else 1
        return max(0, min(8, (cores or 1) // devices - torch.get_num_threads()))

    def transfer_batch_to_device(self, batch, device: torch.device, dataloader_idx: int):
        # A pair of tensors, often already there (memory path): skip Lightning's generic walk.
        if isinstance(batch, Block):  # steps_per_call > 1
            return Block(self.transfer_batch_to_device(b, device, dataloader_idx) for b in batch)
        x, y = batch
        return x.to(device, non_blocking=True), y.to(device, non_blocking=True)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        # Normalise on the device, after moving uint8 (a quarter of the bytes of float32), as
        # x * (1 / (255 std)) - mean / std in place on a fresh float copy: 3 to 4 times faster
        # than addcmul, and the constants are made once per device.
        if isinstance(batch, Block):  # steps_per_call > 1
            return Block(self.on_after_batch_transfer(b, dataloader_idx) for b in batch)
        x, y = batch
        if x.device not in self._normalise:
            mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)
            std = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)
            self._normalise[x.device] = (1 / (255 * std), -mean / std)
        scale, shift = self._normalise[x.device]
        return x.to(torch.float32, copy=True).mul_(scale).add_(shift), y


class _Transformed(Dataset):
    """A (image, label) data set with `transform` applied to each image as it is read."""

    def __init__(self, dataset: Dataset, transform):
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        x, y = self.dataset[i]
        return self.transform(x), y
