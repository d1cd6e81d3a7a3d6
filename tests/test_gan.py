"""The DCGAN experiment: its nets, and the GAN LightningModule trained by a real Trainer on the
bundled digits and on tiny MNIST files (written in the real format), with the sample grids it
saves and logs, both optimizers' steps, resumption, and a measure of the samples' progress.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from test_data import N_VAL, write_mnist
from torchvision.io import read_image

from trainlab.engine.errors import UserError
from trainlab.eval import evaluate
from trainlab.nets.dcgan import Discriminator, Generator
from trainlab.train import train

# The grid of 64 samples: 8 x 8 tiles, 2 pixels of padding around each.
NROW, PAD = 8, 2


def grid_side(size: int) -> int:
    return NROW * (size + PAD) + PAD


def tiles(png: Path, size: int) -> torch.Tensor:
    """The 64 samples of a saved grid, as rows of size x size pixels on the 0..1 scale."""
    grid = read_image(str(png))[0].float() / 255  # make_grid repeats a grey channel three times
    starts = [PAD + i * (size + PAD) for i in range(NROW)]
    return torch.stack([grid[r : r + size, c : c + size].flatten() for r in starts for c in starts])


@pytest.fixture
def tiny_mnist(tmp_path) -> list[str]:
    """Tiny MNIST files under paths.data_dir, and the overrides that read them offline."""
    write_mnist(tmp_path / "data")
    return ["data.download=false", f"data.val_size={N_VAL}", "data.batch_size=16"]


# --- the nets --------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [[1, 28, 28], [1, 8, 8], [3, 32, 32], [1, 16, 12]])
def test_nets_map_latents_to_images_and_images_to_one_logit(shape):
    generator, discriminator = Generator(shape, latent_dim=16), Discriminator(shape)
    images = generator(torch.randn(5, 16))
    assert images.shape == (5, *shape)
    assert images.min() >= -1 and images.max() <= 1  # tanh: the range real images are mapped to
    assert discriminator(images).shape == (5,)
    # DCGAN's initialisation: N(0, 0.02) weights
    weight = discriminator[0].weight
    assert abs(weight.std().item() - 0.02) < 0.005 and abs(weight.mean().item()) < 0.005


@pytest.mark.parametrize("shape", [[1, 30, 30], [3, 32, 10]])
def test_a_size_not_divisible_by_4_is_a_user_error(shape):
    for build in (lambda: Generator(shape, latent_dim=16), lambda: Discriminator(shape)):
        with pytest.raises(UserError, match="divisible by 4") as info:
            build()
        assert str(shape) in str(info.value)


# --- the experiment through a real Trainer -----------------------------------------------------


def test_fast_dev_run_on_tiny_mnist(compose, tiny_mnist, tmp_path):
    cfg = compose("experiment=mnist_gan", *tiny_mnist, "debug=fdr", "logger=tensorboard")
    record = train(cfg, tmp_path / "run")
    assert record["status"] == "finished"
    assert record["steps"] == 2  # one batch: one step of each optimizer
    for key in ("train/d_loss", "train/g_loss", "train/d_real", "train/d_fake"):
        assert math.isfinite(record[key]), key
    assert 0 < record["train/d_real"] < 1 and 0 < record["train/d_fake"] < 1
    grid = read_image(str(tmp_path / "run" / "samples" / "epoch_0000.png"))
    assert grid.shape == (3, grid_side(28), grid_side(28))


def test_sample_grids_reach_tensorboard(compose, tiny_mnist, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # fast_dev_run silences the loggers (Lightning's rule), so two short epochs instead
    cfg = compose("experiment=mnist_gan", *tiny_mnist, "debug=limit", "logger=tensorboard")
    train(cfg, tmp_path / "run")
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert "samples" in events.Tags()["images"]
    images = events.Images("samples")
    assert len(images) == 2  # one an epoch
    assert (images[0].width, images[0].height) == (grid_side(28), grid_side(28))
    assert {"train/d_loss", "train/g_loss"} <= set(events.Tags()["scalars"])
    saved = sorted(p.name for p in (tmp_path / "run" / "samples").iterdir())
    assert saved == ["epoch_0000.png", "epoch_0001.png"]


@pytest.mark.slow
def test_sample_grids_reach_wandb(compose, tiny_mnist, tmp_path):
    cfg = compose("experiment=mnist_gan", *tiny_mnist, "debug=limit", "logger=wandb")
    train(cfg, tmp_path / "run")
    # offline here: W&B keeps each logged image as a file of its run
    folder = next((tmp_path / "run" / "wandb").glob("offline-run-*"))
    logged = list((folder / "files" / "media" / "images").glob("samples_*.png"))
    assert len(logged) == 2
    assert read_image(str(logged[0])).shape == (3, grid_side(28), grid_side(28))


def test_both_optimizers_step_every_batch(compose, tmp_path):
    # the digits, with a cosine schedule (one per optimizer): 2 epochs of 3 batches
    overrides = ["data=digits", "debug=limit", "trainer.limit_train_batches=3", "logger=csv"]
    cfg = compose("experiment=mnist_gan", *overrides, "scheduler=cosine")
    record = train(cfg, tmp_path)
    assert record["steps"] == 2 * 2 * 3  # Lightning counts the steps of both optimizers
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    discriminator_opt, generator_opt = ckpt["optimizer_states"]
    model = instantiate(cfg.model, optimizer=instantiate(cfg.optimizer))
    for state, net in ((discriminator_opt, model.discriminator), (generator_opt, model.generator)):
        assert len(state["state"]) == len(list(net.parameters()))  # its own net's, all of them
        assert {int(s["step"]) for s in state["state"].values()} == {6}  # a step every batch
        assert tuple(state["param_groups"][0]["betas"]) == (0.5, 0.999)
        assert state["param_groups"][0]["lr"] < 2e-4 / 2  # past the middle of the cosine
    assert [s["last_epoch"] for s in ckpt["lr_schedulers"]] == [6, 6]
    assert ckpt["state_dict"]["fixed_z"].shape == (64, 64)

    # a GAN has no test or validation metrics: eval says so instead of failing in Lightning
    for split in ("test", "val"):
        ckpt_path = tmp_path / "checkpoints" / "last.ckpt"
        eval_cfg = compose(f"ckpt_path={ckpt_path}", f"split={split}", config="eval")
        with pytest.raises(UserError, match="has no (test|validation)_step.*samples/"):
            evaluate(eval_cfg, tmp_path / "eval")


def test_resume_auto_continues_as_if_never_stopped(compose, tmp_path):
    overrides = ["data=digits", "+trainer.limit_train_batches=2", "logger=csv"]
    whole = tmp_path / "whole"
    train(compose("experiment=mnist_gan", *overrides, "trainer.max_epochs=3"), whole)
    split = tmp_path / "split"
    train(compose("experiment=mnist_gan", *overrides, "trainer.max_epochs=2"), split)
    record = train(
        compose(
            "experiment=mnist_gan",
            *overrides,
            "trainer.max_epochs=3",
            "resume=auto",
            "resume_allow_changes=true",  # 3 epochs where the first run had 2
        ),
        split,
    )
    assert record["resumed_from"] == str(split / "checkpoints" / "last.ckpt")
    a, b = (torch.load(d / "checkpoints" / "last.ckpt", weights_only=True) for d in (whole, split))
    assert a["global_step"] == b["global_step"] == 3 * 2 * 2
    for key, value in a["state_dict"].items():  # weights, batch-norm statistics and fixed_z
        assert torch.equal(value, b["state_dict"][key]), key
    for opt_a, opt_b in zip(a["optimizer_states"], b["optimizer_states"], strict=True):
        for i, state in opt_a["state"].items():
            assert torch.equal(state["exp_avg_sq"], opt_b["state"][i]["exp_avg_sq"])
    last = "samples/epoch_0002.png"
    assert (whole / last).read_bytes() == (split / last).read_bytes()


@pytest.mark.slow
def test_short_run_on_digits_moves_samples_toward_the_data(compose, tmp_path):
    """Eight epochs on the digits (about 20 s here). Progress is measured on the saved grids
    against the 1293 real training digits: each real digit's distance to the nearest of the
    64 samples (coverage: it stays high if the generator collapses onto a few images) and each
    sample's distance to the nearest real digit (how digit-like the samples are)."""
    cfg = compose("experiment=mnist_gan", "data=digits", "trainer.max_epochs=8", "logger=csv")
    record = train(cfg, tmp_path)
    assert record["status"] == "finished"
    pngs = sorted((tmp_path / "samples").iterdir())
    assert [p.name for p in pngs] == [f"epoch_{e:04d}.png" for e in range(8)]
    assert all(read_image(str(p)).shape == (3, grid_side(8), grid_side(8)) for p in pngs)

    dm = instantiate(cfg.data)
    dm.setup("fit")
    real = dm.splits["train"].tensors[0].flatten(1).float() / 255
    coverage, nearest = [], []
    for png in pngs:
        distances = torch.cdist(real, tiles(png, 8))
        coverage.append(distances.min(dim=1).values.mean().item())
        nearest.append(distances.min(dim=0).values.mean().item())
    # the one image closest to all the digits on average (their mean) covers them this well
    mean_image = torch.cdist(real, real.mean(0, keepdim=True)).mean().item()
    assert coverage[-1] < 0.7 * coverage[0], coverage  # measured: about 3.2 -> 1.9
    assert coverage[-1] < mean_image, (coverage, mean_image)  # measured: 2.15
    assert nearest[-1] < 0.65 * nearest[0], nearest  # measured: about 2.95 -> 1.55

    with open(tmp_path / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/d_loss")]
    assert len(rows) == 8
    assert all(math.isfinite(float(r["train/g_loss"])) for r in rows)
