"""Batches sliced straight from tensors held on the training device: no per-sample work, no
workers, no copies between processes. On small data sets this, not arithmetic, decides the speed.

Lightning takes any sized iterable as a data loader, but injects a DistributedSampler only into
torch DataLoaders, so this loader shards by rank itself.

The training loader is resumable mid-epoch: Lightning saves its `state_dict()` in every checkpoint
(under "combined_loader") and hands it back to `load_state_dict()` on resumption, and the next
pass then yields the rest of that epoch, augmented as the uninterrupted run would have.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DistributedSampler, SequentialSampler

Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


class Block(list):
    """Consecutive training batches that one training_step takes, one optimizer step each
    (steps_per_call): Lightning's per-step hooks then run once per block, not once per batch."""


class MemoryLoader:
    """(x, y) batches of `batch_size` from the tensors `x` and `y`, on their device.

    Training (`train=True`) takes its order from torch's DistributedSampler, seeded with `seed`
    and with the epoch that Lightning passes to `sampler.set_epoch`: each of the `world_size`
    ranks gets exactly the indices a DataLoader with that sampler would give it (a new order every
    epoch, shards padded to equal length so that every rank runs the same number of steps), and
    `augment(batch, generator)` draws from a stream of its own per seed, epoch and rank.

    `state_dict()` is where the current pass stands: the epoch and the batches yielded so far.
    Lightning asks for it at a checkpoint, after the training step of the last batch yielded (it
    prefetches nothing from a loader with a length), so those are the batches trained on. A
    resumed pass augments the batches before that point again, unused, so that its stream goes
    on where it stood on every rank (only rank 0's state is saved: the stream's own state would
    be rank 0's).

    Evaluation (`train=False`) gives each rank one contiguous slice, in order and without padding,
    so that every sample is counted exactly once; ranks may differ by one sample (and then by one
    batch), which is safe because evaluation steps make no collective calls. Its batches are views
    of `x` and `y`: change them only out of place.
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        batch_size: int,
        *,
        train: bool = False,
        shuffle: bool = True,
        augment: Augment | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        steps_per_call: int = 1,
    ):
        self.x, self.y, self.batch_size = x, y, batch_size
        # Training yields Blocks of up to this many batches (see _block_ends); Lightning then
        # counts blocks as its batches.
        self.steps_per_call = steps_per_call if train else 1
        self.train, self.augment, self.seed, self.rank = train, augment, seed, rank
        bounds = np.linspace(0, len(x), world_size + 1).round().astype(int).tolist()
        self.start, self.stop = (0, len(x)) if train else (bounds[rank], bounds[rank + 1])
        # Lightning reads `sampler`: to call set_epoch, and to see whether the order is fixed.
        self.sampler: DistributedSampler | SequentialSampler
        if train and (shuffle or world_size > 1):
            self.sampler = DistributedSampler(
                range(len(x)), num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed
            )
        else:
            self.sampler = SequentialSampler(range(self.start, self.stop))
        self._pass = [0, 0]  # the current pass: [epoch, batches yielded]
        self._resume_at: dict | None = None  # a state to continue from, once

    batch_sampler = None  # batches are slices, not lists of indices

    def __len__(self) -> int:
        n, batches = self.steps_per_call, self.num_batches
        # blocks that fit whole epochs; else one more than the fewest, for every epoch alike
        return batches // n if batches % n == 0 else -(-batches // n) + 1

    @property
    def num_batches(self) -> int:
        """Batches (optimizer steps) a pass: len() counts blocks."""
        return -(-len(self.sampler) // self.batch_size)

    def __iter__(self) -> Iterator:
        if not self.train:  # contiguous: views of the data, not copies
            for i in range(self.start, self.stop, self.batch_size):
                j = min(i + self.batch_size, self.stop)
                yield self.x[i:j], self.y[i:j]
            return
        if self.steps_per_call == 1:
            yield from self._train_batches()
            return
        ends, block = set(self._block_ends()), Block()
        for batch, xy in self._train_batches(numbered=True):
            block.append(xy)
            if batch + 1 in ends:
                yield block  # _pass already counts its batches: it waits here while it trains
                block = Block()

    def _block_ends(self) -> list[int]:
        """Where this epoch's blocks end, in batches: on every multiple of steps_per_call of the
        run's steps (epochs before this one had num_batches each), so that intervals counted in
        steps end blocks in every epoch; and len(self) blocks, as Lightning counts on, by
        splitting a block where no multiple falls, when the epoch holds one fewer."""
        n, batches = self.steps_per_call, self.num_batches
        first = -self._epoch() * batches % n or n
        ends = [*range(first, batches, n), batches]
        if len(ends) < len(self):
            starts = [0, *ends[:-1]]
            split = next(s for s, e in zip(starts, ends, strict=True) if e - s > 1)
            ends.insert(starts.index(split), split + 1)
        return ends

    def _train_batches(self, numbered: bool = False) -> Iterator:
        order = torch.tensor(list(self.sampler), device=self.x.device)
        epoch, first = self._epoch(), 0
        resume, self._resume_at = self._resume_at, None
        if resume is not None and resume["epoch"] == epoch:  # the rest of an interrupted epoch
            first = resume["batches"]
        self._pass = [epoch, first]
        generator = self.generator() if self.augment else None
        for batch in range(self.num_batches):
            index = order[batch * self.batch_size : (batch + 1) * self.batch_size]
            if batch < first:  # trained on before the interruption
                if self.augment is not None:  # augmented again, unused: the stream moves on
                    self.augment(self.x.index_select(0, index), generator)
                continue
            x = self.x.index_select(0, index)
            if self.augment is not None:
                x = self.augment(x, generator)
            self._pass[1] = batch + 1  # before the yield: the pass waits there while it trains
            xy = x, self.y.index_select(0, index)
            yield (batch, xy) if numbered else xy

    def state_dict(self) -> dict:
        if self._resume_at is not None:  # restored, not yet continued
            return dict(self._resume_at)
        epoch, batches = self._pass
        return {"epoch": epoch, "batches": batches}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state` at the next pass over its epoch (Lightning sets that epoch
        again); a pass over any other epoch starts from the beginning."""
        self._resume_at = {"epoch": state["epoch"], "batches": state["batches"]}
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(state["epoch"])

    def _epoch(self) -> int:
        return getattr(self.sampler, "epoch", 0)

    def generator(self) -> torch.Generator:
        """The augmentation stream of this epoch and rank: independent of the sampler's, and of
        every other rank's."""
        entropy = np.random.SeedSequence([self.seed, self._epoch(), self.rank])
        generator = torch.Generator(device=self.x.device)
        generator.manual_seed(int(entropy.generate_state(1, np.uint64)[0]))
        return generator
