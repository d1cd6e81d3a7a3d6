"""A run stopped at any step and resumed ends exactly as if it had never stopped, on the CPU:
the training loaders continue their epoch at the right batch with the same augmentations, the
epoch's sums continue, and the epoch's printed time leaves out the time the run was dead."""

from __future__ import annotations

import contextlib
import csv
import json
import re
import signal
import subprocess
import time
from functools import partial
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from conftest import run_cli, start_cli, tiny_trainer
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image
from torch.utils.data import TensorDataset

from trainlab.data.augment import crop_flip, per_sample_crop_flip
from trainlab.data.text import RandomWindows
from trainlab.engine.callbacks import RunInfo, checkpoints
from trainlab.engine.datamodule import _Transformed
from trainlab.engine.memory import MemoryLoader
from trainlab.engine.resumable import ResumableDataLoader

# --- the loaders' state: k batches, state_dict, a new loader, the rest -----------------------


def images(n: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 1, 8, 8), dtype=torch.uint8, generator=generator)
    return x, torch.arange(n)


def memory_loader(rank: int = 0, world_size: int = 1) -> MemoryLoader:
    x, y = images()
    augment = partial(crop_flip, padding=4)
    return MemoryLoader(
        x, y, 16, train=True, augment=augment, seed=7, rank=rank, world_size=world_size
    )


def dataloader(workers: int = 0) -> ResumableDataLoader:
    x, y = images()
    dataset = _Transformed(TensorDataset(x, y), per_sample_crop_flip((8, 8), 4))
    return ResumableDataLoader(
        dataset,
        seed=7,
        random=True,
        batch_size=16,
        num_workers=workers,
        persistent_workers=workers > 0,
    )


def text_loader() -> RandomWindows:
    text = torch.randint(
        0, 256, (500,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    return RandomWindows(text, 8, 4, batches=7, seed=7)


def epoch(loader, number: int, limit: int | None = None) -> list:
    """As Lightning draws them: set the epoch, then take len(loader) batches (or `limit`)."""
    loader.sampler.set_epoch(number)
    batches = iter(loader)
    return [next(batches) for _ in range(len(loader) if limit is None else limit)]


def same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x, u) and torch.equal(y, v) for (x, y), (u, v) in zip(a, b, strict=True)
    )


def saved_and_loaded(state: dict, tmp_path: Path) -> dict:
    """The state as a resumed run gets it: through a checkpoint file read with weights_only."""
    torch.save({"state": state}, tmp_path / "state.pt")
    return torch.load(tmp_path / "state.pt", weights_only=True)["state"]


@pytest.mark.parametrize("make", [memory_loader, dataloader, text_loader])
def test_a_loader_resumed_from_its_state_yields_the_rest_of_the_epoch(make, tmp_path):
    straight = make()
    first = epoch(straight, 0)
    second = epoch(straight, 1)
    third = epoch(straight, 2)
    assert not same(first, second)  # a new order (and new augmentations) every epoch

    interrupted = make()
    epoch(interrupted, 0)
    epoch(interrupted, 1, limit=3)
    state = saved_and_loaded(interrupted.state_dict(), tmp_path)
    assert (state["epoch"], state["batches"]) == (1, 3)

    resumed = make()
    resumed.load_state_dict(state)
    assert resumed.state_dict()["batches"] == 3  # a checkpoint before the first batch keeps it
    rest = epoch(resumed, 1, limit=len(resumed) - 3)
    assert same(rest, second[3:])
    assert same(epoch(resumed, 2), third)  # and the next epoch starts from its beginning


def test_a_state_of_another_epoch_starts_that_epoch_from_its_beginning():
    loader = memory_loader()
    reference = epoch(memory_loader(), 2)
    loader.load_state_dict({"epoch": 1, "batches": 3, "augment": None})
    assert same(epoch(loader, 2), reference)


def test_every_rank_resumes_its_own_stream_from_rank_0s_state(tmp_path):
    """Only rank 0 writes checkpoints, and every rank loads its loader state: the state must
    hold nothing of rank 0's own (such as its augmentation stream)."""
    reference = epoch(memory_loader(rank=1, world_size=2), 1)
    rank_0 = memory_loader(rank=0, world_size=2)
    epoch(rank_0, 1, limit=2)
    rank_1 = memory_loader(rank=1, world_size=2)
    rank_1.load_state_dict(saved_and_loaded(rank_0.state_dict(), tmp_path))
    assert same(epoch(rank_1, 1, limit=len(rank_1) - 2), reference[2:])


def test_the_dataloader_leaves_the_global_generator_alone():
    """Dropout draws from torch's global generator: reading augmented samples (in this process,
    without workers) and starting a pass must not move it, or a resumed run would drop other
    units than the uninterrupted one."""
    loader = dataloader()
    before = torch.get_rng_state()
    epoch(loader, 0)
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.slow
def test_workers_give_the_same_batches_and_resume_alike(tmp_path):
    without = epoch(dataloader(0), 1)
    interrupted = dataloader(2)
    epoch(interrupted, 1, limit=2)
    state = saved_and_loaded(interrupted.state_dict(), tmp_path)
    resumed = dataloader(2)
    resumed.load_state_dict(state)
    assert same(epoch(resumed, 1, limit=len(resumed) - 2), without[2:])


# --- a real Trainer, stopped at a step and resumed in process --------------------------------


class StopAt(pl.Callback):
    """Saves a checkpoint after the step `step` and stops the run there (what it does after the
    checkpoint does not matter: the resumed run starts from the file); records each batch's
    step and sum as it trains."""

    def __init__(self, step: int | None, path: Path):
        self.step, self.path, self.batches = step, path, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append((trainer.global_step, float(batch[0].sum())))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)
            trainer.should_stop = True


def fit(cfg, callback: StopAt, ckpt_path: Path | None = None):
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    stored = checkpoints.CheckpointRecord()
    stored.run_info = RunInfo(config=OmegaConf.to_container(cfg, resolve=True))
    trainer = tiny_trainer(max_epochs=2, callbacks=[stored, callback])
    model = instantiate(
        cfg.model, optimizer=instantiate(cfg.optimizer), scheduler=instantiate(cfg.scheduler)
    )
    trainer.fit(model, datamodule=instantiate(cfg.data), ckpt_path=ckpt_path, weights_only=True)
    return trainer, model


TINY_GPT = (
    "experiment=char_gpt",
    "data.block_size=16",
    "data.batch_size=16",
    "data.batches_per_epoch=10",
    "model.net.n_layer=1",
    "model.net.n_head=2",
    "model.net.n_embd=32",
    "model.sample.length=0",
)

# image files with random flips, decoded per sample
FOLDERS = (
    "data=image_folder",
    "model=cnn",
    "data.input_shape=[3,16,16]",
    "data.batch_size=4",
    "data.num_workers=0",
)


def write_images(root: Path) -> None:
    rng = np.random.default_rng(0)
    for label in ("cats", "dogs"):
        (root / label).mkdir(parents=True)
        for i in range(16):
            pixels = rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / label / f"{i}.png")


@pytest.mark.parametrize(
    "overrides",
    [
        ("data.loader=memory", "data.batch_size=128"),
        ("data.loader=dataloader", "data.num_workers=0", "data.batch_size=128"),
        TINY_GPT,
        FOLDERS,
    ],
    ids=["memory", "dataloader", "text", "folders"],
)
def test_a_run_resumed_mid_epoch_trains_the_same_batches_to_the_same_weights(
    compose, tmp_path, overrides
):
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    extra = [f"data.path={text}"] if overrides == TINY_GPT else []
    if overrides == FOLDERS:
        for split in ("train", "val"):
            write_images(tmp_path / "data" / "images" / split)
    cfg = compose(*overrides, *extra)
    straight = StopAt(None, tmp_path / "unused.ckpt")
    straight_trainer, reference = fit(cfg, straight)
    steps = len(straight.batches) // 2  # an epoch's

    ckpt = tmp_path / "mid.ckpt"
    fit(cfg, StopAt(steps + 3, ckpt))  # three steps into the second epoch
    resumed = StopAt(None, tmp_path / "unused.ckpt")
    trainer, model = fit(cfg, resumed, ckpt)

    assert resumed.batches == straight.batches[steps + 3 :]
    for name, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name
    # the resumed epoch's sums and means are over all its batches, as the uninterrupted run's
    assert model._epoch_count == reference._epoch_count
    assert model._epoch_sums.keys() == reference._epoch_sums.keys()
    for name, total in reference._epoch_sums.items():
        assert torch.equal(model._epoch_sums[name], total), name
    expected = {k: float(v) for k, v in straight_trainer.callback_metrics.items()}
    assert {k: float(v) for k, v in trainer.callback_metrics.items()} == expected
    assert "train/loss_epoch" in expected


# --- real processes, killed with SIGKILL at a mid-epoch step checkpoint ----------------------

RUN = ("logger=csv", "trainer.max_epochs=3", "checkpoint_every_n_steps=5")
GAP_S = 5  # the time the killed run lies dead before it is resumed


def train(cwd: Path, run_dir: Path, *args: str) -> subprocess.CompletedProcess:
    result = run_cli("trainlab.train", *RUN, *args, f"hydra.run.dir={run_dir}", cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def checkpoint_steps(run_dir: Path) -> list[int]:
    steps = []
    for path in (run_dir / "checkpoints").glob("*.ckpt"):
        with contextlib.suppress(Exception):  # replaced while read: the next poll sees it
            steps.append(torch.load(path, map_location="cpu", weights_only=True)["global_step"])
    return steps


def kill_at_a_mid_epoch_checkpoint(cwd: Path, run_dir: Path, per_epoch: int, *args: str) -> int:
    """Start a run, and SIGKILL it once its newest checkpoint is part-way through an epoch; the
    step of that checkpoint. The run is stopped (SIGSTOP) while its checkpoints are looked at,
    so that it cannot write a newer one in between."""
    proc = start_cli("trainlab.train", *RUN, *args, f"hydra.run.dir={run_dir}", cwd=cwd)
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            steps = checkpoint_steps(run_dir)
            if steps and max(steps) % per_epoch:
                proc.send_signal(signal.SIGSTOP)
                steps = checkpoint_steps(run_dir)
                if max(steps) % per_epoch:
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                    return max(steps)
                proc.send_signal(signal.SIGCONT)
            time.sleep(0.01)
        raise AssertionError("no mid-epoch checkpoint in time")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def per_epoch_metrics(run_dir: Path) -> dict[tuple[str, str], str]:
    """{(epoch, metric): value} from metrics.csv, the last value logged of each: the resumed run
    appends to the killed run's file, and logs again what that one logged after the checkpoint."""
    values = {}
    with (run_dir / "metrics.csv").open() as f:
        for row in csv.DictReader(f):
            for key, value in row.items():
                if "/" in key and value and not key.endswith("_step"):
                    values[(row["epoch"], key)] = value
    return values


def final_metrics(run_dir: Path) -> dict[str, float]:
    record = json.loads((run_dir / "metrics.json").read_text())
    assert record["status"] == "finished"
    return {key: value for key, value in record.items() if "/" in key}


def weights(run_dir: Path) -> tuple[int, dict]:
    """The state of the run's latest checkpoint (by its step, not its file name)."""
    ckpts = [
        torch.load(p, map_location="cpu", weights_only=True)
        for p in (run_dir / "checkpoints").glob("*.ckpt")
    ]
    latest = max(ckpts, key=lambda c: c["global_step"])
    return latest["global_step"], latest["state_dict"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "args",
    [(), ("data.loader=dataloader", "data.num_workers=0")],
    ids=["memory", "dataloader"],
)
def test_kill_9_mid_epoch_then_resume_auto_ends_as_an_uninterrupted_run(tmp_path, args):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    train(tmp_path, straight, *args)
    record = json.loads((straight / "metrics.json").read_text())
    per_epoch = record["steps"] // record["epochs"]

    step = kill_at_a_mid_epoch_checkpoint(tmp_path, killed, per_epoch, *args)
    time.sleep(GAP_S)
    resumed = train(tmp_path, killed, *args, "resume=auto")

    assert re.search(rf"Resuming from .*step {step}\)", resumed.stdout), resumed.stdout[-2000:]
    assert "not resumable" not in resumed.stderr  # Lightning's warning about the data loader
    assert final_metrics(killed) == final_metrics(straight)
    assert per_epoch_metrics(killed) == per_epoch_metrics(straight)  # train/loss_epoch included
    (step_a, a), (step_b, b) = weights(straight), weights(killed)
    assert step_a == step_b == record["steps"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the resumed epoch's time is training time: the dead gap is not in it
    resumed_epoch = step // per_epoch + 1
    line = re.search(rf"^epoch {resumed_epoch}/3 .*\((\d+\.\d)s\)$", resumed.stdout, re.M)
    assert line and float(line.group(1)) < GAP_S, resumed.stdout[-2000:]
