"""The image-file experiments end to end: lenet_images (LeNet-5 on lists of image files) and
binary_folder (one logit and binary cross-entropy on two class folders), on tiny PNG and JPEG
sets of assorted sizes written here."""

import csv
import json
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_trainer
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from test_folder_data import write_images, write_lists
from torch.utils.data import DataLoader, TensorDataset

from trainlab.engine.errors import UserError
from trainlab.models.classifier import BinaryClassifier
from trainlab.nets.cnn import SmallCNN
from trainlab.train import train

LISTS = ("data.lists.test=images/test.csv", "data.num_classes=2", "data.num_workers=0")
BINARY = ("data.num_workers=0", "data.batch_size=8")


@pytest.fixture
def images(tmp_path) -> Path:
    """data/images/{train,val,test}/{cats,dogs}/: dark cats, bright dogs; lists of them beside."""
    root = tmp_path / "data" / "images"
    write_images(root, {"train": 12, "val": 4, "test": 4})
    write_lists(root, root)
    return root


def model_error(cfg) -> str:
    """The UserError that building cfg.model raises (Hydra wraps it, as its cause)."""
    with pytest.raises(InstantiationException) as info:
        instantiate(cfg.model, optimizer=instantiate(cfg.optimizer))
    assert isinstance(info.value.__cause__, UserError)
    return str(info.value.__cause__)


def epoch_losses(run_dir: Path) -> list[float]:
    rows = csv.DictReader((run_dir / "metrics.csv").open())
    return [float(r["train/loss_epoch"]) for r in rows if r.get("train/loss_epoch")]


def assert_tensorboard_and_confusion(run_dir: Path) -> None:
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert (run_dir / "confusion_matrix_test.png").stat().st_size > 1000


def test_lenet_images_fast_dev_run(compose, images, tmp_path):
    cfg = compose("experiment=lenet_images", "debug=fdr", "logger=tensorboard", *LISTS)
    assert cfg.model.net._target_ == "trainlab.nets.lenet.LeNet5"
    assert list(cfg.data.input_shape) == [1, 32, 32]
    record = train(cfg, tmp_path / "run")
    assert record["status"] == "finished" and record["steps"] == 1
    assert_tensorboard_and_confusion(tmp_path / "run")


def test_lenet_is_the_classic_shape_and_refuses_tiny_images(compose):
    cfg = compose("experiment=lenet_images", "data.num_classes=2")
    model = instantiate(cfg.model, optimizer=instantiate(cfg.optimizer))
    linear = [m for m in model.net if isinstance(m, torch.nn.Linear)]
    conv = [m for m in model.net if isinstance(m, torch.nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size) for c in conv] == [(6, (5, 5)), (16, (5, 5))]
    assert [(m.in_features, m.out_features) for m in linear] == [(400, 120), (120, 84), (84, 2)]
    assert model(torch.zeros(3, 1, 32, 32)).shape == (3, 2)
    small = compose("experiment=lenet_images", "data.input_shape=[1,8,8]")
    assert "at least 16x16" in model_error(small) and "data.input_shape" in model_error(small)


def test_lenet_images_loss_falls(compose, images, tmp_path):
    cfg = compose(
        "experiment=lenet_images", "logger=csv", "trainer.max_epochs=8", "data.batch_size=8", *LISTS
    )
    record = train(cfg, tmp_path / "run")
    losses = epoch_losses(tmp_path / "run")
    assert len(losses) == 8 and losses[-1] < 0.8 * losses[0], losses
    assert record["test/acc"] >= 0.75


def test_binary_folder_fast_dev_run(compose, images, tmp_path):
    cfg = compose("experiment=binary_folder", "debug=fdr", "logger=tensorboard", *BINARY)
    assert list(cfg.data.input_shape) == [3, 224, 224]
    names = [t._target_.rsplit(".", 1)[1] for t in cfg.data.train_transforms]
    assert names == ["RandomAffine", "RandomHorizontalFlip"]
    record = train(cfg, tmp_path / "run")
    assert record["status"] == "finished" and record["steps"] == 1
    assert_tensorboard_and_confusion(tmp_path / "run")
    # the same metric names as a multiclass run, so that checkpoints, sweeps and W&B agree
    for key in ("val/acc", "val/precision", "val/recall", "val/f1", "test/acc", "test/f1"):
        assert 0.0 <= record[key] <= 1.0, key


def test_binary_folder_tells_bright_from_dark(compose, images, tmp_path):
    cfg = compose(
        "experiment=binary_folder",
        "logger=csv",
        "data.input_shape=[3,32,32]",
        "trainer.max_epochs=5",
        *BINARY,
    )
    record = train(cfg, tmp_path / "run")
    losses = epoch_losses(tmp_path / "run")
    assert losses[-1] < 0.7 * losses[0], losses
    assert record["val/acc_best"] > 0.9 and record["test/acc"] > 0.9
    assert Path(record["best_ckpt"]).name == "best.ckpt"  # monitored on val/acc
    rows = list(csv.reader((tmp_path / "run" / "confusion_matrix_test.csv").open()))
    assert rows[0] == ["true/predicted", "cats", "dogs"]
    counts = [[int(c) for c in row[1:]] for row in rows[1:]]
    assert sum(map(sum, counts)) == 8
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert (counts[0][0] + counts[1][1]) / 8 == pytest.approx(metrics["test/acc"])


def test_binary_loss_is_binary_cross_entropy_on_one_logit():
    torch.manual_seed(0)
    net = SmallCNN([3, 16, 16], num_classes=1)
    model = BinaryClassifier(net, 2, partial(torch.optim.SGD, lr=0.0))
    x, y = torch.randn(10, 3, 16, 16), torch.tensor([0, 1] * 5)
    trainer = tiny_trainer()
    loader = DataLoader(TensorDataset(x, y), batch_size=10)
    val_loss = trainer.validate(model, loader, verbose=False)[0]["val/loss"]
    with torch.no_grad():
        logits = net.eval()(x)
    assert logits.shape == (10, 1)
    expected = F.binary_cross_entropy_with_logits(logits.squeeze(1), y.float())
    z = logits.squeeze(1)
    by_hand = -(y * z.sigmoid().log() + (1 - y) * (-z).sigmoid().log())
    assert val_loss == pytest.approx(float(expected), rel=1e-5)
    assert float(expected) == pytest.approx(float(by_hand.mean()), rel=1e-5)


def test_binary_model_wants_two_classes(compose):
    cfg = compose("experiment=binary_folder", "data.num_classes=3")
    assert "two classes" in model_error(cfg) and "data.num_classes=3" in model_error(cfg)
