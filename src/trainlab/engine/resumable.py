"""A torch DataLoader that a run killed part-way through an epoch continues exactly.

Three things make a DataLoader's epoch depend on more than its epoch number, and each is
replaced here:
- the order: RandomSampler draws it from torch's global generator when the pass starts, so a
  resumed pass would draw another; `EpochSampler` takes it from (seed, epoch) instead;
- the random transforms: they draw from the global generator of whichever process loads the
  sample (a worker's, or the main one, which dropout shares), so they depend on what that
  process loaded before; `SeededSamples` seeds each sample's draws by (seed, epoch, index);
- the position: `ResumableDataLoader` counts the batches it has yielded in the pass, which
  Lightning saves in checkpoints (`state_dict()`, under "combined_loader") and hands back on
  resumption (`load_state_dict()`); the next pass starts after them. It counts batches handed
  to the training loop, not indices sent ahead to workers, so workers' prefetching is safe.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler


def run_seed(trainer) -> int:
    """The seed torch was last seeded with (the run's seed, which seed_everything sets, else a
    random one), rank 0's: every rank must shuffle alike."""
    seed = torch.initial_seed() % 2**62
    return trainer.strategy.broadcast(seed) if trainer is not None else seed


def sample_seed(*keys: int) -> int:
    return int(np.random.SeedSequence(list(keys)).generate_state(1, np.uint64)[0])


class EpochSampler(DistributedSampler):
    """A rank's share of the order of (seed, epoch), as DistributedSampler gives it (Lightning
    then injects no sampler of its own under DDP), as (epoch, index) keys for `SeededSamples`,
    from the `start`-th key on."""

    start = 0

    def __iter__(self) -> Iterator[tuple[int, int]]:
        indices = list(super().__iter__())
        return iter([(self.epoch, i) for i in indices[self.start :]])


class SeededSamples(Dataset):
    """`dataset`, read with (epoch, index) keys. Where reading a sample draws random numbers
    (`random=True`: random transforms), the draws come from torch's global generator seeded by
    (seed, epoch, index), and the generator's state is put back afterwards: each sample gets the
    same augmentation in any process and after any other sample, and the main process's stream
    (dropout's) is left as it was."""

    def __init__(self, dataset: Dataset, seed: int, random: bool):
        self.dataset, self.seed, self.random = dataset, seed, random

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        if not self.random:
            return self.dataset[index]
        generator = torch.default_generator  # torch.manual_seed would cost 40 times as much
        state = generator.get_state()
        generator.manual_seed(sample_seed(self.seed, epoch, index))
        try:
            return self.dataset[index]
        finally:
            generator.set_state(state)


class ResumableDataLoader(DataLoader):
    """A shuffling DataLoader over `dataset` that continues an interrupted epoch where it stood.

    `seed` fixes the order of every epoch and the random draws of every sample (`random=True`
    where reading a sample draws any); `rank` and `world_size` shard it as DistributedSampler
    does. Other keyword arguments go to DataLoader.
    """

    def __init__(
        self,
        dataset: Dataset,
        *,
        seed: int,
        random: bool,
        rank: int = 0,
        world_size: int = 1,
        **kwargs,
    ):
        sampler = EpochSampler(dataset, num_replicas=world_size, rank=rank, seed=seed)
        # A private generator: the workers' base seed is otherwise drawn from the global
        # generator at every pass, one draw more in a resumed run than in an uninterrupted one.
        generator = torch.Generator().manual_seed(seed)
        super().__init__(
            SeededSamples(dataset, seed, random), sampler=sampler, generator=generator, **kwargs
        )
        self._pass = [0, 0]  # [epoch, batches yielded]
        self._resume_at: dict | None = None

    def __iter__(self) -> Iterator:
        epoch, first = self.sampler.epoch, 0
        resume, self._resume_at = self._resume_at, None
        if resume is not None and resume["epoch"] == epoch:  # the rest of an interrupted epoch
            first = resume["batches"]
        self.sampler.start = first * self.batch_size
        self._pass = [epoch, first]
        for batch in super().__iter__():
            self._pass[1] += 1  # before the yield: the pass waits there while the batch trains
            yield batch

    def state_dict(self) -> dict:
        if self._resume_at is not None:  # restored, not yet continued
            return dict(self._resume_at)
        epoch, batches = self._pass
        return {"epoch": epoch, "batches": batches}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state` at the next pass over its epoch (Lightning sets that epoch
        again); a pass over any other epoch starts from the beginning."""
        self._resume_at = dict(state)
        self.sampler.set_epoch(state["epoch"])
