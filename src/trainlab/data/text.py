"""Any text file as a sequence of bytes, for next-byte language models.

Bytes are the "characters": 256 symbols, whatever the file holds (UTF-8 or not), so the model's
size is known from config before any data is read and a checkpoint needs no vocabulary. The
file is held in memory as one uint8 tensor, on the training device, and batches are cut from it
there, as the in-memory path of the image data sets does (data/memory.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import lightning.pytorch as pl
import numpy as np
import torch
from pydantic import Field, NonNegativeInt, PositiveInt

from trainlab.engine import UserError, per_device_batch_size

VOCAB_SIZE = 256
Batch = tuple[torch.Tensor, torch.Tensor]


class TextDataModule(pl.LightningDataModule):
    """Windows of `block_size + 1` bytes of the file at `path`: the first `block_size` bytes are
    the input, the last `block_size` the targets (each byte's successor).

    `path` is relative to `data_dir` unless absolute. The file is split by position: the start
    trains, then come `val_size` and `test_size` (fractions of the file, or numbers of bytes;
    test_size=0: no test split). An epoch is `batches_per_epoch` batches of windows at random
    places in the train split, drawn from a stream of their own per seed, epoch and rank. Val and
    test batches are consecutive windows that score every byte of their split once (all but its
    first, which has no predecessor there).

    `batch_size` is the global batch size, split across devices (per_device=True: each device's).
    """

    def __init__(
        self,
        data_dir: str,
        path: str = "input.txt",
        block_size: PositiveInt = 128,
        batch_size: PositiveInt = 64,
        batches_per_epoch: PositiveInt = 250,
        # fractions of the file, or numbers of bytes; test_size=0: no test split
        val_size: PositiveInt | Annotated[float, Field(gt=0, lt=1)] = 0.05,
        test_size: NonNegativeInt | Annotated[float, Field(ge=0, lt=1)] = 0.05,
        per_device: bool = False,
    ):
        super().__init__()
        self.data_dir = Path(data_dir)
        self.path = self.data_dir / path  # an absolute `path` stays as it is
        self.block_size = block_size
        self.batch_size = batch_size
        self.batches_per_epoch = batches_per_epoch
        self.val_size = val_size
        self.test_size = test_size
        self.per_device = per_device
        self.splits: dict[str, torch.Tensor] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        text = read_bytes(self.path)
        n = len(text)
        n_val, n_test = _size(self.val_size, n, "val_size"), _size(self.test_size, n, "test_size")
        n_train = n - n_val - n_test
        if n_train < self.block_size + 1 or n_val < 2 or n_test == 1:
            raise UserError(
                f"{self.path} has {n} bytes: split into {n_train} for training, {n_val} for "
                f"validation and {n_test} for test (data.val_size={self.val_size}, "
                f"data.test_size={self.test_size}), but training needs at least one window of "
                f"data.block_size+1 = {self.block_size + 1} bytes, and val and test (unless 0) at "
                "least 2 each. Use a longer text, lower data.block_size, or change the sizes."
            )
        self.splits = {
            "train": text[:n_train],
            "val": text[n_train : n_train + n_val],
            "test": text[n_train + n_val :],
        }

    @property
    def device(self) -> torch.device:
        return (
            self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
        )

    def _split(self, name: str) -> torch.Tensor:
        """The split on the training device, moved there once."""
        split = self.splits[name]
        if split.device != self.device:
            split = self.splits[name] = split.to(self.device)
        return split

    def train_dataloader(self) -> RandomWindows:
        trainer = self.trainer
        return RandomWindows(
            self._split("train"),
            self.block_size,
            per_device_batch_size(self.batch_size, trainer, self.per_device),
            self.batches_per_epoch,
            # every epoch alike under overfit_batches, which wants the same few batches
            follow_epochs=not (trainer is not None and trainer.overfit_batches),
            seed=self._seed(),
            rank=trainer.global_rank if trainer is not None else 0,
        )

    def val_dataloader(self) -> ConsecutiveWindows:
        return self._eval_loader("val")

    def test_dataloader(self) -> ConsecutiveWindows:
        if not len(self.splits["test"]):
            raise UserError(
                "data.test_size=0 leaves no test split: set test=false, or give data.test_size "
                "a fraction of the file (e.g. 0.05) or a number of bytes."
            )
        return self._eval_loader("test")

    def _eval_loader(self, name: str) -> ConsecutiveWindows:
        trainer = self.trainer
        world_size = trainer.world_size if trainer is not None else 1
        windows = -(-(len(self.splits[name]) - 1) // self.block_size)
        if windows < world_size:  # a rank without a batch would never join the metrics' sync
            raise UserError(
                f"the {name} split has {len(self.splits[name])} bytes, {windows} window(s) of "
                f"data.block_size={self.block_size}: too few for {world_size} devices. Give it "
                f"more (data.{name}_size) or lower data.block_size."
            )
        return ConsecutiveWindows(
            self._split(name),
            self.block_size,
            per_device_batch_size(self.batch_size, trainer, self.per_device),
            rank=trainer.global_rank if trainer is not None else 0,
            world_size=world_size,
        )

    def _seed(self) -> int:
        # The seed torch was last seeded with (the run's seed, which seed_everything sets, else a
        # random one), taken from rank 0: the ranks' streams then differ by rank alone.
        seed = torch.initial_seed() % 2**62
        return self.trainer.strategy.broadcast(seed) if self.trainer is not None else seed

    def transfer_batch_to_device(self, batch: Batch, device: torch.device, dataloader_idx: int):
        # Already there: skip Lightning's generic walk through the batch.
        x, y = batch
        return x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def read_bytes(path: Path) -> torch.Tensor:
    """The file as a uint8 tensor, or a UserError that says what to put where."""
    if not path.is_file():
        raise UserError(
            f"the text file {path} does not exist. Any text file will do (the model reads "
            f"bytes, so any encoding): put one there, e.g. tinyshakespeare's input.txt at "
            f"{path.parent / 'input.txt'}, or pass data.path=/path/to/file.txt (relative paths "
            "are taken inside paths.data_dir)."
        )
    text = torch.from_numpy(np.fromfile(path, dtype=np.uint8))
    if not len(text):
        raise UserError(
            f"the text file {path} is empty: fill it with the text to learn, or point data.path "
            "at another file."
        )
    return text


def _size(size: int | float, n: int, key: str) -> int:
    if size < 0 or (isinstance(size, float) and size >= 1):
        raise UserError(
            f"data.{key}={size}: give a fraction of the file in [0, 1), or a number of bytes."
        )
    return round(n * size) if isinstance(size, float) else int(size)


class RandomWindows:
    """`batches` batches an epoch of `batch_size` windows at random places in `text`.

    The generator of each epoch is seeded from (seed, epoch, rank): runs repeat exactly, a
    resumed run draws what the uninterrupted one would have, and every rank has its own stream.
    `state_dict()` is where the current pass stands (the epoch, the batches yielded); Lightning
    saves it in checkpoints and hands it back to `load_state_dict()`, and the next pass over
    that epoch continues from there, drawing the skipped batches' places again, unused, so that
    its stream goes on where it stood on every rank.
    """

    def __init__(
        self,
        text: torch.Tensor,
        block_size: int,
        batch_size: int,
        batches: int,
        *,
        follow_epochs: bool = True,
        seed: int = 0,
        rank: int = 0,
    ):
        self.windows = text.unfold(0, block_size + 1, 1)  # every window, as a view of text
        self.batch_size, self.batches, self.seed, self.rank = batch_size, batches, seed, rank
        self.epoch = 0
        if follow_epochs:
            self.sampler = self  # Lightning calls loader.sampler.set_epoch(epoch) each epoch
        self._pass = [0, 0]  # the current pass: [epoch, batches yielded]
        self._resume_at: dict | None = None  # a state to continue from, once

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.batches

    def __iter__(self) -> Iterator[Batch]:
        device = self.windows.device
        state = np.random.SeedSequence([self.seed, self.epoch, self.rank]).generate_state(1)
        generator = torch.Generator(device=device).manual_seed(int(state[0]))
        first, resume, self._resume_at = 0, self._resume_at, None
        if resume is not None and resume["epoch"] == self.epoch:  # the rest of an epoch
            first = resume["batches"]
        self._pass = [self.epoch, first]
        for batch in range(self.batches):
            starts = torch.randint(
                len(self.windows), (self.batch_size,), generator=generator, device=device
            )
            if batch < first:  # trained on before the interruption: drawn only to move on
                continue
            window = self.windows[starts].long()
            self._pass[1] = batch + 1  # before the yield: the pass waits there while it trains
            yield window[:, :-1], window[:, 1:]

    def state_dict(self) -> dict:
        if self._resume_at is not None:  # restored, not yet continued
            return dict(self._resume_at)
        epoch, batches = self._pass
        return {"epoch": epoch, "batches": batches}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state` at the next pass over its epoch (Lightning sets that epoch
        again); a pass over any other epoch starts from the beginning."""
        self._resume_at = {"epoch": state["epoch"], "batches": state["batches"]}
        self.epoch = state["epoch"]


class ConsecutiveWindows:
    """Windows starting every `block_size` bytes of `text`, in order, `batch_size` a batch: the
    targets of all windows together are every byte of `text` but the first, each once. The last
    window is shorter when the text does not divide evenly, and comes as a batch of its own.

    With several ranks each takes a contiguous share of the windows; shares may differ by one
    batch, which is safe because evaluation steps make no collective calls.
    """

    def __init__(
        self,
        text: torch.Tensor,
        block_size: int,
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.text, self.block_size, self.batch_size = text, block_size, batch_size
        starts = range(0, len(text) - 1, block_size)
        bounds = np.linspace(0, len(starts), world_size + 1).round().astype(int)
        self.starts = starts[bounds[rank] : bounds[rank + 1]]

    def __len__(self) -> int:
        full, short = self._counts()
        return -(-full // self.batch_size) + short

    def _counts(self) -> tuple[int, int]:
        """(whole windows, short ones: 0 or 1) of this rank."""
        last = self.starts[-1] if self.starts else 0
        short = int(bool(self.starts) and last + self.block_size + 1 > len(self.text))
        return len(self.starts) - short, short

    def __iter__(self) -> Iterator[Batch]:
        full, short = self._counts()
        size = self.block_size + 1
        for i in range(0, full, self.batch_size):
            first = self.starts[i]
            count = min(self.batch_size, full - i)
            # count windows overlapping by one byte, as a view: unfold at a stride of block_size
            span = self.text[first : first + count * self.block_size + 1]
            window = span.unfold(0, size, self.block_size).long()
            yield window[:, :-1], window[:, 1:]
        if short:
            window = self.text[self.starts[-1] :].long().unsqueeze(0)
            yield window[:, :-1], window[:, 1:]
