from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from trainlab.errors import UserError

# The validation split is carved from the training split with this fixed seed, so that every
# run (whatever its own seed) is validated and tested on the same samples.
SPLIT_SEED = 1234


class InMemoryDataModule(pl.LightningDataModule):
    """A data set small enough to hold in memory: each split is a pair (uint8 images, labels).

    Subclasses implement `load()` and set `mean` and `std` (per channel, on the 0..1 scale).
    `batch_size` is the global batch size: with N devices each one gets batch_size / N.
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __init__(
        self,
        data_dir: str,
        batch_size: int,
        num_classes: int,
        input_shape: list[int],
        val_size: int | float = 0.1,
    ):
        super().__init__()
        self.data_dir = Path(data_dir)
        self.batch_size = batch_size
        self.num_classes = num_classes
        self.input_shape = tuple(input_shape)
        self.val_size = val_size
        self.splits: dict[str, TensorDataset] = {}

    def load(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Return {"train": (x, y), "test": (x, y)} and optionally "val"; x is uint8 NCHW."""
        raise NotImplementedError

    @property
    def batch_size_per_device(self) -> int:
        devices = self.trainer.world_size if self.trainer is not None else 1
        if self.batch_size % devices:
            raise UserError(
                f"data.batch_size={self.batch_size} is the global batch size and must divide "
                f"evenly across the {devices} devices: choose a multiple of {devices}."
            )
        return self.batch_size // devices

    def setup(self, stage: str | None = None) -> None:
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

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.splits["train"], batch_size=self.batch_size_per_device, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.splits["val"], batch_size=self.batch_size_per_device)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.splits["test"], batch_size=self.batch_size_per_device)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        # Normalise on the device, after moving uint8 (a quarter of the bytes of float32).
        x, y = batch
        mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)
        return (x.float().div_(255) - mean) / std, y
