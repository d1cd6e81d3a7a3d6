"""TensorBoard as the logger of every ready experiment: a short real run of each, on tiny data in
the real formats, leaves its training curves (and, where the experiment draws, its images) in
the run's event files. (fast_dev_run would not: Lightning swaps every logger out for it.)"""

from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_data import N_VAL, accept_cifar10_checksums, write_cifar10, write_mnist
from test_folder_data import write_images, write_lists

from trainlab.config import group_options
from trainlab.train import train

IMAGES = ["data.num_classes=2", "data.num_workers=0"]
# For each experiment: the tiny data it reads, and overrides that keep its run short.
SETUP = {
    "mnist_mlp": ("mnist", []),
    "mnist_cnn": ("mnist", []),
    "mnist_vit": ("mnist", []),
    "mnist_gan": ("mnist", []),
    "digits_lstm": (None, []),
    "digits_cnn": (None, ["trainer.limit_train_batches=3"]),  # onecycle: > 1 warm-up step
    "cifar10_cnn": ("cifar10", []),
    "cifar10_resnet18": ("cifar10", []),
    "binary_folder": ("images", ["data.input_shape=[3,32,32]", "data.num_workers=0"]),
    "lenet_images": (
        "images",
        [*IMAGES, "data.lists.train=images/train.csv", "data.lists.val=images/val.csv"],
    ),
    "char_gpt": (
        "text",
        ["data.block_size=16", "data.batches_per_epoch=2", "model.net.n_layer=1"]
        + ["model.net.n_embd=32", "model.sample.length=20"],
    ),
}
EXPERIMENTS = group_options("experiment")


def test_every_experiment_is_covered():
    assert sorted(SETUP) == EXPERIMENTS  # a new experiment gets its tiny data here


def write_data(kind: str | None, data_dir: Path, monkeypatch) -> None:
    if kind == "mnist":
        write_mnist(data_dir)
    elif kind == "cifar10":
        write_cifar10(data_dir)
        accept_cifar10_checksums(data_dir, monkeypatch)
    elif kind == "images":
        write_images(data_dir / "images", {"train": 6, "val": 2})
        write_lists(data_dir / "images", data_dir / "images", splits=("train", "val"))
    elif kind == "text":
        data_dir.mkdir(parents=True, exist_ok=True)
        (data_dir / "input.txt").write_text("to be or not to be, that is the question. " * 20)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_logs_its_curves_to_tensorboard(compose, tmp_path, monkeypatch, name):
    kind, extra = SETUP[name]
    write_data(kind, tmp_path / "data", monkeypatch)
    short = ["trainer.max_epochs=2", "+trainer.limit_train_batches=2"]
    short += ["+trainer.limit_val_batches=1", "+trainer.limit_test_batches=1"]
    batch = [] if name == "char_gpt" else ["data.batch_size=4"]
    download = (
        ["data.download=false", f"data.val_size={N_VAL}"] if kind in ("mnist", "cifar10") else []
    )
    cfg = compose(f"experiment={name}", "logger=tensorboard", *short, *batch, *download, *extra)
    record = train(cfg, tmp_path / "run")
    assert record["status"] == "finished"

    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"images": 0})
    tags = events.Reload().Tags()
    curve = "train/g_loss" if name == "mnist_gan" else "train/loss_epoch"
    assert len(events.Scalars(curve)) == 2  # one point an epoch
    if name == "mnist_gan":
        assert "samples" in tags["images"]
    elif name == "char_gpt":
        assert "val/loss" in tags["scalars"]
    else:  # every classifier: its metrics and its confusion matrices
        assert {"val/acc", "val/f1", "test/acc"} <= set(tags["scalars"])
        assert {"val/confusion_matrix", "test/confusion_matrix"} <= set(tags["images"])
