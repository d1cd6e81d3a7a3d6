"""What the template does to keep a training step cheap, checked for what it must still deliver:
epoch means of loss and accuracy, the loss every few steps in metrics.csv, a live bar that ends
complete, torch's own CUDA check while training on the CPU, channels_last nets.

No timing here: what these save is measured by bench/throughput.py (bench/RESULTS.md).
"""

from __future__ import annotations

import csv
import io
import os
from functools import partial

import lightning.pytorch as pl
import pytest
import torch
from conftest import tiny_trainer
from hydra.utils import instantiate

from trainlab.engine.callbacks.progress import LiveBar
from trainlab.engine.compute import NVML_CHECK, torch_cuda_check
from trainlab.engine.module import TrainlabModule
from trainlab.engine.profiler import NullProfiler
from trainlab.models.classifier import Classifier
from trainlab.nets import MLP, SmallCNN
from trainlab.train import train


@pytest.fixture
def digits(compose):
    def make():
        dm = instantiate(compose("data=digits").data)
        dm.setup("fit")
        return dm

    return make


def mlp() -> Classifier:
    return Classifier(MLP([1, 8, 8], 10), 10, partial(torch.optim.Adam, lr=1e-3))


def fit(dm, callbacks, **trainer_args) -> pl.Trainer:
    trainer = tiny_trainer(callbacks=callbacks, **trainer_args)
    trainer.fit(mlp(), datamodule=dm)
    return trainer


def test_epoch_loss_is_the_sample_weighted_mean_of_the_steps(digits):
    class Steps(pl.Callback):
        def __init__(self):
            self.loss, self.samples = 0.0, 0

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.loss += float(outputs["loss"]) * len(batch[1])
            self.samples += len(batch[1])

    steps = Steps()
    dm = digits()
    trainer = fit(dm, [steps], limit_val_batches=0)
    assert steps.samples == len(dm.splits["train"])  # the last batch is partial: weights matter
    loss = float(trainer.callback_metrics["train/loss_epoch"])
    assert loss == pytest.approx(steps.loss / steps.samples, rel=1e-5)


def test_epoch_accuracy_counts_the_correct_predictions(digits):
    dm = digits()
    model = Classifier(MLP([1, 8, 8], 10, dropout=0.0), 10, partial(torch.optim.SGD, lr=0.0))
    trainer = tiny_trainer(limit_val_batches=0)
    trainer.fit(model, datamodule=dm)  # lr 0: the weights never move, so accuracy is fixed
    x, y = dm.on_after_batch_transfer(dm.splits["train"].tensors, 0)
    expected = (model(x).argmax(1) == y).float().mean()
    assert float(trainer.callback_metrics["train/acc"]) == pytest.approx(float(expected))


def test_the_step_loss_is_logged_every_n_steps(compose, tmp_path):
    overrides = ["logger=csv", "trainer.max_epochs=1", "trainer.log_every_n_steps=5"]
    train(compose(*overrides, "test=false"), tmp_path)
    with open(tmp_path / "metrics.csv", newline="") as f:
        steps = [int(row["step"]) for row in csv.DictReader(f) if row["train/loss_step"]]
    assert steps == [4, 9, 14, 19]  # 21 batches of digits: Lightning's steps 5, 10, 15, 20


def test_each_epoch_line_shows_that_epochs_training_loss(compose, tmp_path, capsys):
    train(compose("logger=csv", "trainer.max_epochs=2", "test=false"), tmp_path)
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("epoch ")]
    shown = [float(x.split("train/loss ")[1].split()[0]) for x in lines]
    with open(tmp_path / "metrics.csv", newline="") as f:
        logged = [float(r["train/loss_epoch"]) for r in csv.DictReader(f) if r["train/loss_epoch"]]
    assert len(shown) == len(logged) == 2
    assert shown == pytest.approx(logged, abs=1e-4)


@pytest.fixture
def allow_test_callbacks(monkeypatch):
    """Let the run's config build this file's recording callbacks: the allow-list builds only
    targets that conf/ names, and these exist for the tests alone."""
    from trainlab.engine import config

    named = config.known_targets()
    extra = {f"{__name__}.RecordCudaCheck", f"{__name__}.RecordMode"}
    monkeypatch.setattr(config, "known_targets", lambda: named | extra)


class RecordCudaCheck(pl.Callback):
    """Records Lightning's NVML switch as each training step sees it."""

    seen: list[str | None] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        RecordCudaCheck.seen.append(os.environ.get(NVML_CHECK))


@pytest.mark.parametrize("model", ["mlp", "char_gpt"])
def test_cpu_training_uses_torchs_own_cuda_check_and_restores_lightnings(
    compose, tmp_path, monkeypatch, model, allow_test_callbacks
):
    monkeypatch.setenv(NVML_CHECK, "1")  # as importing Lightning sets it
    RecordCudaCheck.seen = []
    record = f"+callbacks.nvml._target_={__name__}.RecordCudaCheck"
    overrides = ["logger=csv", "+trainer.max_steps=3", "+trainer.limit_val_batches=0", "test=false"]
    if model == "char_gpt":  # a LanguageModel: the same for every LightningModule
        (tmp_path / "input.txt").write_text("the quick brown fox jumps over the lazy dog. " * 20)
        overrides += ["experiment=char_gpt", f"data.path={tmp_path / 'input.txt'}"]
        overrides += ["data.block_size=16", "model.net.n_layer=1", "model.net.n_embd=32"]
        overrides += ["model.sample.length=5"]
    train(compose(*overrides, record), tmp_path / "run")
    assert RecordCudaCheck.seen and set(RecordCudaCheck.seen) == {None}  # every model alike
    assert os.environ.get(NVML_CHECK) == "1"


def test_a_fork_based_launcher_keeps_lightnings_cuda_check(monkeypatch):
    # Forked processes must not find CUDA initialised: there, only NVML may be asked.
    monkeypatch.setenv(NVML_CHECK, "1")
    for strategy, kept in [("ddp_fork", "1"), ("ddp_spawn", None), ("auto", None)]:
        devices = 1 if strategy == "auto" else 2
        trainer = pl.Trainer(accelerator="cpu", devices=devices, strategy=strategy, logger=False)
        with torch_cuda_check(trainer):
            assert os.environ.get(NVML_CHECK) == kept, strategy
        assert os.environ.get(NVML_CHECK) == "1"
    with torch_cuda_check():  # no trainer: always torch's own (the benchmark's plain loops)
        assert os.environ.get(NVML_CHECK) is None
    assert os.environ.get(NVML_CHECK) == "1"


@pytest.mark.parametrize(("interval", "draws"), [(0.0, 21), (3600.0, 2)])
def test_live_bar_draws_less_often_and_ends_complete(digits, interval, draws):
    class Counting(LiveBar):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.train_draws = 0

        def _update_metrics(self, trainer, pl_module) -> None:
            if trainer.training and not trainer.sanity_checking:
                self.train_draws += 1
            super()._update_metrics(trainer, pl_module)

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            task = self.progress.tasks[self.train_progress_bar_id]
            self.completed = (task.completed, task.total)
            super().on_train_epoch_end(trainer, pl_module)

    console = {"file": io.StringIO(), "force_terminal": True, "width": 100}
    bar = Counting(interval=interval, console_kwargs=console)
    fit(digits(), [bar], enable_progress_bar=True, limit_val_batches=0)
    # draws after steps (21 a epoch), and one at the epoch's end
    assert bar.train_draws == draws + 1
    assert bar.completed == (21, 21)


def test_channels_last_model_computes_the_same_logits():
    torch.manual_seed(0)
    net = SmallCNN([3, 16, 16], 10)
    x = torch.randn(4, 3, 16, 16)
    expected = net.eval()(x)
    model = Classifier(net, 10, partial(torch.optim.SGD, lr=0.1), channels_last=True).eval()
    conv = next(m for m in model.net if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(model(x), expected, atol=1e-5)


def test_default_trainer_profiles_nothing_and_debug_profiler_still_profiles(compose):
    default = instantiate(compose().trainer, logger=False)
    assert isinstance(default.profiler, NullProfiler)
    assert default.profiler.profile("a") is default.profiler.profile("b")  # nothing built
    profiled = instantiate(compose("debug=profiler").trainer, logger=False)
    assert type(profiled.profiler).__name__ == "SimpleProfiler"


class RecordMode(pl.Callback):
    """Records whether the model trained with Lightning's automatic optimisation."""

    seen: list[bool] = []

    def on_train_start(self, trainer, pl_module) -> None:
        RecordMode.seen.append(pl_module.automatic_optimization)


def test_the_plain_step_and_lightnings_automatic_one_train_the_same_weights(
    compose, tmp_path, allow_test_callbacks
):
    # Clipping at a norm no gradient reaches changes no gradient, but needs Lightning's
    # automatic optimisation; without it the classifier takes the plain step.
    runs = {"plain": [], "automatic": ["+trainer.gradient_clip_val=1e12"]}
    RecordMode.seen = []
    weights = {}
    for name, extra in runs.items():
        record_mode = f"+callbacks.mode._target_={__name__}.RecordMode"
        cfg = compose("logger=csv", "trainer.max_epochs=2", "test=false", record_mode, *extra)
        record = train(cfg, tmp_path / name)
        assert record["steps"] == 2 * 21  # every batch one optimizer step, on either path
        ckpt = torch.load(tmp_path / name / "checkpoints" / "last.ckpt", weights_only=True)
        weights[name] = ckpt["state_dict"]
        assert ckpt["lr_schedulers"][0]["last_epoch"] == 2 * 21  # the schedule stepped alike
    assert RecordMode.seen == [False, True]
    assert weights["plain"].keys() == weights["automatic"].keys()
    for key, tensor in weights["plain"].items():
        assert torch.equal(tensor, weights["automatic"][key]), key


class Regression(TrainlabModule):
    """A module of one's own, as a forker writes it: a loss, what to report, an optimizer."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(3, 1)

    def training_loss(self, batch) -> torch.Tensor:
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x).squeeze(1), y)
        self.add_to_epoch_means({"train/mse": loss.detach() * len(y)}, len(y))
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def test_a_module_of_ones_own_takes_plain_steps_and_logs_epoch_means():
    class Steps(pl.Callback):
        def __init__(self):
            self.automatic, self.weighted, self.samples = [], 0.0, 0

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.automatic.append(pl_module.automatic_optimization)
            self.weighted += float(outputs["loss"]) * len(batch[1])
            self.samples += len(batch[1])

    torch.manual_seed(0)
    x = torch.randn(100, 3)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x.sum(1)), 32)
    steps, model = Steps(), Regression()
    before = model.net.weight.detach().clone()
    trainer = tiny_trainer(callbacks=[steps])
    trainer.fit(model, train_dataloaders=loader)  # loaders, no data module: no blocks
    assert model.steps_per_call_choice["steps_per_call"] == 1
    assert steps.automatic == [False] * 4 and trainer.global_step == 4  # 32, 32, 32, 4
    assert not torch.equal(model.net.weight, before)
    mse = float(trainer.callback_metrics["train/mse"])
    assert mse == pytest.approx(steps.weighted / steps.samples, rel=1e-6)
