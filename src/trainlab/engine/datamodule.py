from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

import lightning.pytorch as pl
import torch
from pydantic import Field, NonNegativeInt, PositiveInt
from torch.utils.data import DataLoader, Dataset, TensorDataset

from trainlab.engine.errors import UserError
from trainlab.engine.memory import Augment, Block, MemoryLoader
from trainlab.engine.resumable import ResumableDataLoader

# The validation split is carved from the training split with this fixed seed, so that every
# run (whatever its own seed) is validated and tested on the same samples.
SPLIT_SEED = 1234
LOADERS = ("memory", "dataloader")
NORMALISE = (None, "none", "feature", "channel")


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
    """A classification data set small enough to hold in memory: each split is a pair
    (features, labels) of tensors, features of any shape (`input_shape`, one sample's).

    Subclasses implement `load()`. Features are kept as uint8 (a quarter of the bytes, read on
    the 0..1 scale) or made float32, and normalised on the training device, batch by batch:
    `normalise` is none, `feature` (each feature by its mean and standard deviation over the
    training split) or `channel` (each index of the first dimension, over the others, as image
    channels); else `mean` and `std` if given (one value, or one per channel) or the class's.

    `batch_size` is the global batch size: with N devices each one gets batch_size / N
    (`per_device=True`: each gets batch_size). `val_size` (a fraction or a count) is held out of
    the training split for validation unless `load()` gives a "val" split; 0 or None: no
    validation, and best.ckpt is the last epoch's state (see `_without_validation`).

    `loader="memory"` keeps each split as one tensor on the training device and slices batches
    from it (`MemoryLoader`); `loader="dataloader"` goes through torch's DataLoader, sample by
    sample, with `num_workers` worker processes, as a data set too big for memory would.
    """

    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    steps_per_call = 1  # training batches a block (set by the Classifier, see steps_per_call)
    takes_blocks = True  # its transfer hooks take Blocks (trainlab.engine.blocks)

    def __init__(
        self,
        batch_size: PositiveInt,
        num_classes: PositiveInt,
        input_shape: list[PositiveInt],
        data_dir: str | None = None,
        # a count of samples (0: no validation split) or a fraction of the training split
        val_size: NonNegativeInt | Annotated[float, Field(gt=0, lt=1)] | None = 0.1,
        normalise: Literal["none", "feature", "channel"] | None = None,
        mean: list[float] | None = None,
        std: list[Annotated[float, Field(gt=0)]] | None = None,
        loader: Literal["memory", "dataloader"] = "memory",
        num_workers: NonNegativeInt | Literal["auto"] = "auto",
        per_device: bool = False,
    ):
        super().__init__()
        self.data_dir = Path(data_dir) if data_dir is not None else None
        self.batch_size = batch_size
        self.per_device = per_device
        self.num_classes = num_classes
        self.input_shape = tuple(input_shape)
        self.val_size = val_size
        self.normalise = normalise
        if mean is not None or std is not None:  # else the class's own, if it has them
            self.mean, self.std = tuple(mean or (0.0,)), tuple(std or (1.0,))
        self.loader = loader
        self.num_workers = num_workers
        self.splits: dict[str, TensorDataset] = {}
        # x * scale + shift: set by setup, or by the first batch where it needs no data
        self._affine: tuple[torch.Tensor, torch.Tensor] | None = None
        self._affine_set = False
        self._on_device: dict[tuple[str, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}
        self._normalise: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def load(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Return {"train": (x, y), "test": (x, y)} and optionally "val": x of shape
        (N, *input_shape), y the class of each sample (0 .. num_classes - 1)."""
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
        if self.normalise not in NORMALISE:
            raise UserError(
                f"data.normalise must be none, feature or channel, but it is {self.normalise!r}."
            )
        if not self.splits:
            self._load_splits()
        if stage in (None, "fit") and "val" not in self.splits:
            self._without_validation()

    def _load_splits(self) -> None:
        data = self.load()
        if "val" not in data and self.val_size:
            data["train"], data["val"] = self._split(*data["train"])
        for name, (x, y) in data.items():
            self.check(name, x)
            x = x if x.dtype == torch.uint8 else x.float()
            self.splits[name] = TensorDataset(x, y.long())
        if len(self.splits["train"]) < self.batch_size_per_device:
            raise UserError(
                f"the training split has {len(self.splits['train'])} samples, fewer than one "
                f"batch of {self.batch_size_per_device}: lower data.batch_size."
            )
        self._affine, self._affine_set = self._normalisation(self.splits["train"].tensors[0]), True

    def check(self, split: str, x: torch.Tensor) -> None:
        """Refuse features whose shape is not data.input_shape (subclasses add their own)."""
        if tuple(x.shape[1:]) != self.input_shape:
            raise UserError(
                f"the {split} split's samples have the shape {list(x.shape[1:])}, but "
                f"data.input_shape is {list(self.input_shape)}: set data.input_shape="
                f"{list(x.shape[1:])}."
            )

    def _split(self, x: torch.Tensor, y: torch.Tensor):
        n_val = round(len(x) * self.val_size) if isinstance(self.val_size, float) else self.val_size
        if not 0 < n_val < len(x):
            raise UserError(
                f"data.val_size={self.val_size} leaves {len(x) - n_val} of {len(x)} training "
                f"samples for training and {n_val} for validation: give a number of samples "
                f"between 1 and {len(x) - 1}, a fraction between 0 and 1, or 0 for no validation."
            )
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(SPLIT_SEED))
        val, train = order[:n_val], order[n_val:]
        return (x[train], y[train]), (x[val], y[val])

    def _normalisation(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(scale, shift) such that x * scale + shift is a normalised batch, shaped to
        broadcast over one; None where batches pass unchanged (float32, not normalised)."""
        unit = 255.0 if x.dtype == torch.uint8 else 1.0
        channel = (1, -1, *[1] * (len(self.input_shape) - 1))  # one value per index of dim 1
        if self.normalise == "feature":  # asked for: before the class's own mean and std
            x = x.double() / unit
            mean, std = x.mean(0, keepdim=True), x.std(0, keepdim=True)
        elif self.normalise == "channel":
            x = x.double().transpose(0, 1).reshape(self.input_shape[0], -1) / unit
            mean, std = x.mean(1).view(channel), x.std(1).view(channel)
        elif self.mean is not None:
            mean = torch.tensor(self.mean).view(channel)
            std = torch.tensor(self.std).view(channel)
        else:
            return (torch.tensor(1 / unit), torch.tensor(0.0)) if unit != 1.0 else None
        std = torch.where(std > 0, std, 1.0)  # a constant feature is left at 0, not divided by 0
        # (mean and std in float32 first: the image data sets' batches stay bit for bit the same)
        mean, std = mean.float(), std.float()
        return 1 / (unit * std), -mean / std

    def _without_validation(self) -> None:
        """No validation split: best.ckpt keeps the last epoch's state and early stopping is
        off, since neither has a validation metric to go by. Said once in the run's output."""
        trainer = self.trainer
        if trainer is None:
            return
        trainer.limit_val_batches = 0  # Lightning's "no validation": no loader, no sanity check
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, pl.callbacks.ModelCheckpoint):
                callback.monitor = None  # keeps the latest state, under the same file name
        trainer.callbacks = [
            c for c in trainer.callbacks if not isinstance(c, pl.callbacks.EarlyStopping)
        ]
        if trainer.is_global_zero:
            print(
                f"data.val_size={self.val_size}: no validation split; checkpoints/best.ckpt is "
                "the last epoch's state, and early stopping is off."
            )

    def train_dataloader(self) -> MemoryLoader | DataLoader:
        return self._make_loader("train")

    def val_dataloader(self) -> MemoryLoader | DataLoader | list:
        return self._make_loader("val") if "val" in self.splits else []

    def test_dataloader(self) -> MemoryLoader | DataLoader:
        return self._make_loader("test")

    def augment_batch(self) -> Augment | None:
        """What the memory path applies to each training batch (subclasses: e.g. crop_flip)."""
        return None

    def augment_sample(self):
        """What the DataLoader path applies to each training sample (subclasses)."""
        return None

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
            augment=self.augment_batch() if train else None,
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
        transform = self.augment_sample() if split == "train" else None
        if transform is not None:
            dataset = _Transformed(dataset, transform)
        workers = self._workers(per_sample_work=transform is not None)
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
            random=transform is not None,
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
        # x * scale + shift in place on a fresh float copy: 3 to 4 times faster than addcmul,
        # and the constants are moved once per device.
        if isinstance(batch, Block):  # steps_per_call > 1
            return Block(self.on_after_batch_transfer(b, dataloader_idx) for b in batch)
        x, y = batch
        if not self._affine_set:  # not set up (e.g. predicting): only constants can be used
            if self.normalise in ("feature", "channel"):
                raise RuntimeError(f"normalise={self.normalise!r} needs setup() first")
            self._affine, self._affine_set = self._normalisation(x), True
        if self._affine is None:
            return x.float(), y
        if x.device not in self._normalise:
            self._normalise[x.device] = tuple(t.to(x.device) for t in self._affine)
        scale, shift = self._normalise[x.device]
        return x.to(torch.float32, copy=True).mul_(scale).add_(shift), y


class _Transformed(Dataset):
    """A (sample, label) data set with `transform` applied to each sample as it is read."""

    def __init__(self, dataset: Dataset, transform):
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        x, y = self.dataset[i]
        return self.transform(x), y


def check_net_fits(model: pl.LightningModule, datamodule, choices: dict[str, str]) -> None:
    """Refuse, in one line and before training, a net that cannot take the data's samples: one
    forward pass of a zero batch of data.input_shape, without gradients and in eval mode (so no
    statistics change), costs milliseconds, where the first training step would end in a raw
    traceback about weight shapes. Only modules that say their `net` takes the data's samples
    (`net_takes_samples = True`, as a classifier's does) are checked: a GAN's generator takes
    noise, a language model's net tokens."""
    shape = getattr(datamodule, "input_shape", None)
    if not getattr(model, "net_takes_samples", False) or shape is None:
        return
    net = model.net
    training = net.training
    net.eval()
    try:
        with torch.no_grad():
            net(torch.zeros(2, *shape))
    except (RuntimeError, ValueError, IndexError, TypeError) as e:
        model_name = choices.get("model", type(net).__name__)
        data = f"data={choices['data']} gives" if "data" in choices else "the data give"
        images = any(isinstance(m, torch.nn.Conv2d) for m in net.modules())
        if images and len(shape) != 3:
            raise UserError(
                f"model={model_name} takes images [C, H, W]; {data} samples of data.input_shape="
                f"{list(shape)}: use model=mlp, which takes any shape, or a net made for them."
            ) from None
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"model={model_name} does not fit the data: {data} samples of data.input_shape="
            f"{list(shape)}, on which its net fails ({reason}). Use a model whose net takes "
            "that shape (model=mlp takes any), or give the net the data's shape if it is set "
            "apart (model.net.input_shape=${data.input_shape})."
        ) from None
    finally:
        net.train(training)
