"""Lightning's contract holds: a LightningModule written as Lightning's documentation teaches,
subclassing the template's Classifier or plain pl.LightningModule, trains through train() to the
same weights, to the bit, as under a bare pl.Trainer on the same data and seed; a callback of
one's own sees batches; the template's own modules keep their fast path; a run that does not
train stops and says why."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from hydra.utils import instantiate
from omegaconf import open_dict

from trainlab.engine import blocks
from trainlab.engine.errors import UserError
from trainlab.models.classifier import Classifier
from trainlab.train import train

EPOCHS = 1
PER_EPOCH = 21  # digits' training split in batches of 64


class DocsClassifier(Classifier):
    """The template's classifier with the training_step every Lightning example writes."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss


class DictClassifier(Classifier):
    def training_step(self, batch, batch_idx):
        x, y = batch
        return {"loss": F.cross_entropy(self(x), y)}


class PlainModule(pl.LightningModule):
    """Lightning's own kind: its __init__, its optimizer, self.log; no test_step."""

    def __init__(self, input_shape: list[int], num_classes: int, hidden: int = 32):
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Flatten(),
            torch.nn.Linear(math.prod(input_shape), hidden),
            torch.nn.ReLU(),
            torch.nn.Dropout(0.1),  # draws from the seeded generator: the runs must agree
            torch.nn.Linear(hidden, num_classes),
        )

    def forward(self, x):
        return self.layers(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/acc", (self(x).argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=3e-3)


class NeverSteps(Classifier):
    """Manual optimisation, and a training_step that forgets to step."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)


class Batches(pl.Callback):
    """A callback of one's own: what its batch hook receives."""

    seen: list[tuple[str, int, int]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        x, y = batch
        Batches.seen.append((type(batch).__name__, len(y), batch_idx))


@pytest.fixture(autouse=True)
def allow_test_targets(monkeypatch):
    """Let the run's config build this file's modules and callback: the allow-list builds only
    targets that conf/ names (a fork names its own there)."""
    from trainlab.engine import config

    named = config.known_targets()
    extra = {f"{__name__}.{c}" for c in ("DocsClassifier", "DictClassifier", "PlainModule")}
    extra |= {f"{__name__}.NeverSteps", f"{__name__}.Batches"}
    monkeypatch.setattr(config, "known_targets", lambda: named | extra)


def config(compose, module: str, *overrides: str):
    # A PlainModule has no test_step and no net to compile: train() says it skips both.
    tested = ["compile=true"] if module == "PlainModule" else ["test=false"]
    cfg = compose("logger=csv", f"trainer.max_epochs={EPOCHS}", *tested, *overrides)
    with open_dict(cfg):
        if module == "PlainModule":
            cfg.model = {
                "_target_": f"{__name__}.PlainModule",
                "input_shape": cfg.data.input_shape,
                "num_classes": cfg.data.num_classes,
            }
        else:
            cfg.model._target_ = f"{__name__}.{module}"
    return cfg


def bare_weights(cfg) -> dict[str, torch.Tensor]:
    """The weights a bare pl.Trainer trains the same module to, on the same data and seed."""
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = instantiate(cfg.data)
    if "PlainModule" in cfg.model._target_:
        model = instantiate(cfg.model)
    else:
        factories = {
            "optimizer": instantiate(cfg.optimizer),
            "scheduler": instantiate(cfg.scheduler),
        }
        model = instantiate(cfg.model, **factories)
    trainer = pl.Trainer(
        max_epochs=EPOCHS,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=datamodule)
    assert trainer.global_step == EPOCHS * PER_EPOCH
    return model.state_dict()


@pytest.mark.parametrize("module", ["DocsClassifier", "DictClassifier", "PlainModule"])
def test_a_docs_style_module_trains_as_under_a_bare_trainer(compose, tmp_path, module):
    expected = bare_weights(config(compose, module))
    for steps_per_call in ("auto", "1"):  # the default, and one step a call
        run_dir = tmp_path / steps_per_call
        record = train(config(compose, module, f"steps_per_call={steps_per_call}"), run_dir)
        assert record["status"] == "finished" and record["steps"] == EPOCHS * PER_EPOCH
        choice = record["steps_per_call"]
        assert choice["steps_per_call"] == 1 and choice["why"].endswith(blocks.ONE_BATCH)
        assert module in choice["why"]
        weights = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
        assert weights["state_dict"].keys() == expected.keys()
        for name, tensor in expected.items():
            assert torch.equal(weights["state_dict"][name], tensor), (steps_per_call, name)
    if module == "PlainModule":  # what the config asks that it does not take, and why
        assert set(record["not_applied"]) == {"optimizer", "scheduler", "compile", "test"}
        assert "configure_optimizers" in record["not_applied"]["optimizer"]
    else:
        assert "training_step is its own" in choice["why"]


def test_a_callback_of_ones_own_sees_every_batch(compose, tmp_path):
    Batches.seen = []
    cfg = compose("logger=csv", "trainer.max_epochs=2", "test=false")
    with open_dict(cfg):
        cfg.callbacks.batches = {"_target_": f"{__name__}.Batches"}
    record = train(cfg, tmp_path)
    why = record["steps_per_call"]["why"]
    assert why.startswith("the callback Batches.on_train_batch_end sees every batch")
    assert [kind for kind, _, _ in Batches.seen] == ["tuple"] * 2 * PER_EPOCH  # (x, y)
    assert [size for _, size, _ in Batches.seen[:PER_EPOCH]] == [64] * 20 + [1293 - 20 * 64]
    assert [i for _, _, i in Batches.seen] == [*range(PER_EPOCH)] * 2


def test_the_templates_own_module_keeps_its_fast_path(compose, tmp_path):
    record = train(compose("logger=csv", "trainer.max_epochs=1", "test=false"), tmp_path)
    assert record["status"] == "finished"  # the stall guard, among the defaults, let it be
    assert record["steps_per_call"]["steps_per_call"] > 1
    assert record["steps_per_call"]["why"].startswith("auto: a step takes")


def test_a_run_that_does_not_train_stops_and_says_why(compose, tmp_path):
    cfg = config(compose, "NeverSteps")
    with pytest.raises(UserError) as caught:
        train(cfg, tmp_path)
    message = str(caught.value)
    assert message.startswith("NeverSteps has not trained")
    assert "after 4 training batches (0 optimizer steps" in message
    assert "automatic_optimization = False" in message and "\n" not in message
