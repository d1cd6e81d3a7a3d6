"""The in-memory data path against the ordinary DataLoader path: the same batches, the same shards
per rank, the same augmentation statistics; and its place in real Lightning runs (epochs,
seeds, overfitting, DDP on two CPU processes).

No timing here: speed is measured by bench/throughput.py.
"""

from __future__ import annotations

import collections
import json
import os
from functools import partial

import lightning.pytorch as pl
import pytest
import torch
from hydra.utils import instantiate
from test_data import accept_cifar10_checksums, write_cifar10
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from trainlab.data import DigitsDataModule
from trainlab.data.augment import crop_flip, per_sample_crop_flip
from trainlab.engine.errors import UserError
from trainlab.engine.memory import MemoryLoader
from trainlab.models.classifier import Classifier
from trainlab.nets import MLP


def numbered(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n 1x2x2 uint8 images whose pixels all hold the sample's number, and labels = number."""
    x = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    return x, torch.arange(n)


def batches(loader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.clone(), y.clone()) for x, y in loader]


def same_batches(a, b) -> bool:
    return len(a) == len(b) and all(
        torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b, strict=True)
    )


@pytest.fixture
def tiny_cifar10(tmp_path, monkeypatch) -> None:
    """A tiny CIFAR-10 in the real file format where `compose` points paths.data_dir."""
    write_cifar10(tmp_path / "data")
    accept_cifar10_checksums(tmp_path / "data", monkeypatch)


def digits(compose, *overrides: str) -> DigitsDataModule:
    dm = instantiate(compose("data=digits", *overrides).data)
    dm.setup("fit")
    return dm


# --- the same batches as the DataLoader path --------------------------------------------------


def test_val_and_test_batches_equal_the_dataloaders(compose):
    memory = digits(compose, "data.batch_size=48")
    ordinary = digits(compose, "data.batch_size=48", "data.loader=dataloader", "data.num_workers=0")
    for split in ("val", "test"):
        loader = getattr(memory, f"{split}_dataloader")()
        reference = getattr(ordinary, f"{split}_dataloader")()
        assert isinstance(loader, MemoryLoader) and isinstance(reference, DataLoader)
        assert len(loader) == len(reference)
        assert same_batches(batches(loader), batches(reference)), split
        # and normalised alike
        x, y = next(iter(loader))
        xn, _ = memory.on_after_batch_transfer((x, y), 0)
        xr, _ = ordinary.on_after_batch_transfer(next(iter(reference)), 0)
        assert torch.equal(xn, xr)


def test_a_training_epoch_has_every_sample_once_in_the_dataloaders_batch_sizes(compose):
    memory = digits(compose, "data.batch_size=64")
    ordinary = digits(compose, "data.batch_size=64", "data.loader=dataloader", "data.num_workers=0")
    got, expected = batches(memory.train_dataloader()), batches(ordinary.train_dataloader())
    assert [len(y) for _, y in got] == [len(y) for _, y in expected]  # the last one partial
    x, y = memory.splits["train"].tensors

    def rows(pairs):
        return collections.Counter(
            (xi.numpy().tobytes(), int(yi))
            for xb, yb in pairs
            for xi, yi in zip(xb, yb, strict=True)
        )

    assert rows(got) == rows([(x, y)]) == rows(expected)
    assert not torch.equal(torch.cat([y for _, y in got]), y)  # shuffled


@pytest.mark.parametrize("world", [2, 3])
def test_training_shards_are_the_distributed_samplers(world):
    """What Lightning's DistributedSampler gives each rank of a DataLoader, batch for batch."""
    x, y = numbered(50)
    for epoch in (0, 1):
        for rank in range(world):
            loader = MemoryLoader(x, y, 8, train=True, seed=7, rank=rank, world_size=world)
            loader.sampler.set_epoch(epoch)  # as Lightning does at each epoch's start
            sampler = DistributedSampler(
                TensorDataset(x, y), num_replicas=world, rank=rank, shuffle=True, seed=7
            )
            sampler.set_epoch(epoch)
            reference = DataLoader(TensorDataset(x, y), batch_size=8, sampler=sampler)
            assert len(loader) == len(reference)
            assert same_batches(batches(loader), batches(reference)), (epoch, rank)


@pytest.mark.parametrize(("n", "world"), [(50, 2), (50, 3), (7, 4), (10, 1)])
def test_training_shards_are_equal_in_length_and_cover_everything(n, world):
    x, y = numbered(n)
    loaders = [MemoryLoader(x, y, 4, train=True, rank=r, world_size=world) for r in range(world)]
    seen = [torch.cat([yb for _, yb in loader]) for loader in loaders]
    assert len({len(s) for s in seen}) == 1  # every rank runs the same number of steps
    assert len({len(loader) for loader in loaders}) == 1
    assert set(torch.cat(seen).tolist()) == set(range(n))
    assert len(torch.cat(seen)) == world * -(-n // world)  # padded by at most world - 1 repeats


@pytest.mark.parametrize(("n", "world"), [(50, 2), (50, 3), (7, 4), (3, 4), (10, 1)])
def test_evaluation_shards_hold_every_sample_exactly_once(n, world):
    x, y = numbered(n)
    shards = [batches(MemoryLoader(x, y, 4, rank=r, world_size=world)) for r in range(world)]
    labels = [torch.cat([yb for _, yb in shard]).tolist() if shard else [] for shard in shards]
    assert sum(labels, []) == list(range(n))  # in order, no sample twice, none missing
    assert max(map(len, labels)) - min(map(len, labels)) <= 1
    for shard in shards:
        for xb, yb in shard:
            assert torch.equal(xb[:, 0, 0, 0].long(), yb)  # images travel with their labels


def test_order_depends_on_seed_and_epoch_only(compose):
    x, y = numbered(64)

    def order(seed, epoch):
        loader = MemoryLoader(x, y, 16, train=True, seed=seed)
        loader.sampler.set_epoch(epoch)
        return torch.cat([yb for _, yb in loader])

    assert torch.equal(order(1, 0), order(1, 0))
    assert not torch.equal(order(1, 0), order(1, 1))
    assert not torch.equal(order(1, 0), order(2, 0))


# --- augmentation -----------------------------------------------------------------------------


SIZE, PADDING = 8, 4
# pixel (i, j) holds 1 + 8 i + j: every crop shows at least 4 x 4 of them, which tell where it was
# cut and whether it was mirrored
IMAGE = (torch.arange(SIZE * SIZE) + 1).to(torch.uint8).view(1, SIZE, SIZE)


def _decode(out: torch.Tensor) -> tuple[int, int, bool]:
    """(dy, dx, mirrored) of a crop of IMAGE, from its top-left visible pixel and the next."""
    rows, cols = torch.nonzero(out[0], as_tuple=True)
    r, c = int(rows[0]), int(cols[0])
    i, j = divmod(int(out[0, r, c]) - 1, SIZE)
    mirrored = bool(out[0, r, c + 1] < out[0, r, c])
    return i + PADDING - r, j + PADDING - (SIZE - 1 - c if mirrored else c), mirrored


def _crop(dy: int, dx: int, mirrored: bool) -> torch.Tensor:
    out = torch.nn.functional.pad(IMAGE, (PADDING,) * 4)[:, dy : dy + SIZE, dx : dx + SIZE]
    return out.flip(-1) if mirrored else out


def test_batched_and_per_sample_augmentation_draw_the_same_distribution():
    n = 6000
    batched = crop_flip(IMAGE.expand(n, 1, SIZE, SIZE), torch.Generator().manual_seed(0), PADDING)
    torch.manual_seed(0)
    transform = per_sample_crop_flip((SIZE, SIZE), PADDING)  # torchvision's, one image at a time
    ordinary = torch.stack([transform(IMAGE) for _ in range(n)])
    span = 2 * PADDING + 1
    frequencies = {}
    for name, outs in (("batched", batched), ("per sample", ordinary)):
        draws = [_decode(out) for out in outs]
        for out, draw in zip(outs, draws, strict=True):
            assert torch.equal(out, _crop(*draw)), name  # exactly the padded image, cut there
        dy = collections.Counter(d[0] for d in draws)
        dx = collections.Counter(d[1] for d in draws)
        frequencies[name] = [dy[k] / n for k in range(span)] + [dx[k] / n for k in range(span)]
        # offsets uniform over 0..2 * padding, mirrored half the time (5 standard deviations)
        assert set(dy) == set(dx) == set(range(span)), name
        assert max(abs(f - 1 / span) for f in frequencies[name]) < 0.021, name
        assert sum(d[2] for d in draws) / n == pytest.approx(0.5, abs=0.033), name
    for a, b in zip(frequencies["batched"], frequencies["per sample"], strict=True):
        assert abs(a - b) < 0.03
    # and so the same mean image
    assert (batched.float().mean(0) - ordinary.float().mean(0)).abs().max() < 2.5


def test_augmentation_streams_repeat_by_seed_and_differ_by_epoch_and_rank():
    x = torch.randint(0, 256, (32, 3, 8, 8), dtype=torch.uint8)
    y = torch.arange(32)

    def first_batch(seed=0, epoch=0, rank=0):
        # two ranks, unshuffled: the samples are fixed, only the augmentation varies
        options = dict(shuffle=False, augment=crop_flip, seed=seed, rank=rank, world_size=2)
        loader = MemoryLoader(x, y, 8, train=True, **options)
        loader.sampler.set_epoch(epoch)
        return next(iter(loader))

    xb, yb = first_batch()
    assert torch.equal(yb, torch.arange(0, 16, 2))
    assert not torch.equal(xb, x[yb])  # augmented
    assert torch.equal(xb, first_batch()[0])
    assert not torch.equal(xb, first_batch(seed=1)[0])
    assert not torch.equal(xb, first_batch(epoch=1)[0])
    streams = [MemoryLoader(x, y, 8, train=True, rank=r, world_size=2).generator() for r in (0, 1)]
    assert not torch.equal(torch.rand(8, generator=streams[0]), torch.rand(8, generator=streams[1]))


def test_only_training_batches_are_augmented(compose, tiny_cifar10):
    extra = ("data.val_size=8", "data.download=false", "data.batch_size=16")
    for loader in ("memory", "dataloader"):
        dm = instantiate(
            compose("data=cifar10", *extra, f"data.loader={loader}", "data.num_workers=0").data
        )
        assert dm.augment  # the cifar10 config asks for it
        dm.setup("fit")
        x_val, _ = next(iter(dm.val_dataloader()))
        assert torch.equal(x_val, dm.splits["val"].tensors[0][:8])
        train = torch.cat([xb for xb, _ in dm.train_dataloader()])
        originals = {xi.numpy().tobytes() for xi in dm.splits["train"].tensors[0]}
        changed = sum(xi.numpy().tobytes() not in originals for xi in train)
        assert changed > len(train) // 2, loader  # most images moved or mirrored


# --- in real Lightning runs -------------------------------------------------------------------


class Seen(pl.Callback):
    """The labels of the training batches, per epoch."""

    def __init__(self):
        self.epochs: dict[int, list[int]] = collections.defaultdict(list)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.epochs[trainer.current_epoch] += batch[1].tolist()


def fit(dm, epochs=2, **trainer_args) -> Seen:
    seen = Seen()
    net = MLP(list(dm.input_shape), dm.num_classes)
    model = Classifier(net, dm.num_classes, partial(torch.optim.Adam, lr=1e-3))
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[seen],
        **trainer_args,
    )
    trainer.fit(model, datamodule=dm)
    return seen


def test_epochs_are_shuffled_anew_and_runs_repeat_with_their_seed(compose):
    def run(seed):
        pl.seed_everything(seed, verbose=False)
        return fit(digits(compose), epochs=2, limit_val_batches=0).epochs

    first, again, other = run(3), run(3), run(4)
    assert first[0] != first[1]  # Lightning sets each epoch on the sampler
    assert sorted(first[0]) == sorted(first[1])
    assert first == again
    assert first[0] != other[0]


def test_overfit_batches_repeat_the_same_batches(compose, recwarn):
    seen = fit(digits(compose), epochs=3, overfit_batches=2)
    assert seen.epochs[0] == seen.epochs[1] == seen.epochs[2]
    assert len(seen.epochs[0]) == 2 * 64
    assert not [w for w in recwarn if "shuffling" in str(w.message)]


def test_dataloader_path_defaults(compose, tiny_cifar10):
    plain = digits(compose, "data.loader=dataloader").train_dataloader()
    assert plain.num_workers == 0  # plain slices of a tensor: workers would only add copies
    assert plain.pin_memory is False  # nothing to pin for on a CPU run
    extra = ("data.val_size=8", "data.download=false", "data.batch_size=16")
    cifar = instantiate(compose("data=cifar10", *extra, "data.loader=dataloader").data)
    cifar.setup("fit")
    augmented = cifar.train_dataloader()  # crops and flips, sample by sample
    cores = len(os.sched_getaffinity(0))
    assert augmented.num_workers == max(0, min(8, cores - torch.get_num_threads()))
    assert augmented.persistent_workers == (augmented.num_workers > 0)
    assert cifar.val_dataloader().num_workers == 0
    chosen = digits(compose, "data.loader=dataloader", "data.num_workers=2")
    assert chosen.train_dataloader().num_workers == chosen.val_dataloader().num_workers == 2


def test_an_unknown_loader_is_a_user_error(compose):
    with pytest.raises(UserError, match="data.loader must be one of memory, dataloader"):
        digits(compose, "data.loader=fast")


def test_dataloader_path_with_workers_trains_cifar(compose, tiny_cifar10, tmp_path):
    from trainlab.train import train

    overrides = ["data=cifar10", "data.val_size=8", "data.download=false", "data.batch_size=16"]
    overrides += ["data.loader=dataloader", "data.num_workers=1", "model=cnn", "debug=fdr"]
    record = train(compose(*overrides, "logger=csv"), tmp_path / "run")
    assert record["status"] == "finished" and record["steps"] == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_memory_path_keeps_the_data_on_the_gpu(compose):
    dm = digits(compose)
    seen = []

    class Where(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            seen.append(batch[0].device.type)

    trainer = pl.Trainer(
        accelerator="gpu", devices=1, max_steps=3, logger=False, callbacks=[Where()]
    )
    model = Classifier(MLP([1, 8, 8], 10), 10, partial(torch.optim.Adam, lr=1e-3))
    trainer.fit(model, datamodule=dm)
    assert seen == ["cuda"] * 3
    assert dm.train_dataloader().x.device.type == "cuda"


# --- two processes under DDP ------------------------------------------------------------------


def image_keys(x: torch.Tensor) -> list[str]:
    """One key per (normalised) image, the same in every process."""
    return [",".join(f"{v:.3f}" for v in row) for row in x.flatten(1).tolist()]


class RecordShards(pl.Callback):
    """Writes the images each rank trained on in its first epoch, and validated on."""

    def __init__(self, out: str):
        self.out = out
        self.seen: dict[str, list[str]] = {"train": [], "val": []}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.current_epoch == 0:
            self.seen["train"] += image_keys(batch[0])

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dl_idx=0) -> None:
        if not trainer.sanity_checking:
            self.seen["val"] += image_keys(batch[0])

    def on_train_end(self, trainer, pl_module) -> None:
        with open(f"{self.out}/rank{trainer.global_rank}.json", "w") as f:
            json.dump(self.seen, f)


@pytest.mark.slow
def test_ddp_ranks_train_on_their_own_shards_and_validate_every_sample_once(compose, tmp_path):
    dm = digits(compose)
    n_train, n_val = len(dm.splits["train"]), len(dm.splits["val"])
    dm = instantiate(compose("data=digits").data)  # loaded again in each process
    model = Classifier(MLP([1, 8, 8], 10), 10, partial(torch.optim.Adam, lr=1e-3))
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
        callbacks=[RecordShards(str(tmp_path))],
    )
    trainer.fit(model, datamodule=dm)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert len(ranks[0]["train"]) == len(ranks[1]["train"]) == -(-n_train // 2)
    assert len(ranks[0]["val"]) + len(ranks[1]["val"]) == n_val
    reference = digits(compose)
    keys = {
        split: collections.Counter(
            image_keys(reference.on_after_batch_transfer(reference.splits[split].tensors, 0)[0])
        )
        for split in ("train", "val")
    }
    assert collections.Counter(ranks[0]["val"] + ranks[1]["val"]) == keys["val"]
    trained = collections.Counter(ranks[0]["train"] + ranks[1]["train"])
    assert set(trained) == set(keys["train"])
    assert trained.total() - keys["train"].total() == 2 * -(-n_train // 2) - n_train  # padding
