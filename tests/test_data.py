"""The DataModules on real files: tiny MNIST, Fashion-MNIST and CIFAR-10 sets written in their
real on-disk formats, read by torchvision's own dataset classes, and trained on by a real Trainer.

Nothing here touches the network: downloads are pointed at a closed local port.
"""

from __future__ import annotations

import collections
import hashlib
import json
import pickle
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from torchvision import datasets

from trainlab.data import InMemoryDataModule
from trainlab.engine.errors import UserError
from trainlab.train import train

N_TRAIN, N_TEST, N_VAL = 64, 32, 8
# Nothing listens on port 9 (discard): a connection there is refused at once, offline or not.
UNREACHABLE = "http://127.0.0.1:9/"
MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
# the message names the CIFAR-10 batches as a range, "data_batch_1 ... data_batch_5"
CIFAR_FILES = ("data_batch_1", "data_batch_5", "test_batch", "batches.meta")
VISION = ("mnist", "fashion_mnist", "cifar10")


# --- tiny data sets in the real formats ------------------------------------------------------


def _labels(n: int, seed: int) -> np.ndarray:
    """Every class 0..9 present, in a shuffled order."""
    return np.random.default_rng(seed).permutation(np.arange(n) % 10).astype(np.uint8)


def _images(labels: np.ndarray, channels: int, size: int, seed: int) -> np.ndarray:
    """uint8 N x C x size x size: noise, and a bright band whose row and colour follow the label."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 60, size=(len(labels), channels, size, size), dtype=np.uint8)
    for i, label in enumerate(labels):
        row = 2 * int(label)
        x[i, int(label) % channels, row : row + 3, :] = 255
    return x


def _write_idx(path: Path, array: np.ndarray) -> None:
    """The IDX format: big-endian magic (0x08 = uint8 in byte 3, the number of dims in byte 4),
    one big-endian int32 per dim, then the uint8 data."""
    magic = 0x0800 + array.ndim  # 2049 for labels (1 dim), 2051 for images (3 dims)
    header = struct.pack(">i", magic) + b"".join(struct.pack(">i", d) for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_mnist(
    root: Path, folder: str = "MNIST", n_train: int = N_TRAIN, n_test: int = N_TEST
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """<root>/<folder>/raw/ with the four uncompressed IDX files; returns what was written."""
    raw = root / folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    written = {}
    for split, prefix, n, seed in (("train", "train", n_train, 0), ("test", "t10k", n_test, 1)):
        y = _labels(n, seed)
        x = _images(y, 1, 28, seed)[:, 0]
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", x)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", y)
        written[split] = (x, y)
    return written


def write_cifar10(root: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """<root>/cifar-10-batches-py/ with data_batch_1..5, test_batch and batches.meta.

    The real files are Python 2 pickles whose str keys torchvision reads (encoding="latin1") as
    "data" and "labels"; these hold the same objects: rows of 3072 uint8 (1024 red, 1024 green,
    1024 blue, each row-major) and a list of int labels.
    """
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    y_train = _labels(N_TRAIN, 2)
    x_train = _images(y_train, 3, 32, 2)
    parts = zip(np.array_split(x_train, 5), np.array_split(y_train, 5), strict=True)
    for i, (x, y) in enumerate(parts, start=1):
        _write_cifar_batch(folder / f"data_batch_{i}", x, y, f"training batch {i} of 5")
    written["train"] = (x_train, y_train)
    y_test = _labels(N_TEST, 3)
    x_test = _images(y_test, 3, 32, 3)
    _write_cifar_batch(folder / "test_batch", x_test, y_test, "testing batch 1 of 1")
    written["test"] = (x_test, y_test)
    names = ["airplane", "automobile", "bird", "cat", "deer"]
    names += ["dog", "frog", "horse", "ship", "truck"]
    meta = {"num_cases_per_batch": 13, "label_names": names, "num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return written


def _write_cifar_batch(path: Path, x: np.ndarray, y: np.ndarray, batch_label: str) -> None:
    entry = {
        "batch_label": batch_label,
        "labels": [int(v) for v in y],
        "data": np.ascontiguousarray(x.reshape(len(x), 3 * 32 * 32), dtype=np.uint8),
        "filenames": [f"img_{i}.png" for i in range(len(x))],
    }
    path.write_bytes(pickle.dumps(entry, protocol=2))


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def accept_cifar10_checksums(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torchvision checks each CIFAR-10 file against the md5 of the official one: set those
    constants to the sums of the tiny files. Only the constants change; the reading code runs."""
    folder = root / "cifar-10-batches-py"
    cls = datasets.CIFAR10
    train_list = [[name, _md5(folder / name)] for name, _ in cls.train_list]
    test_list = [[name, _md5(folder / name)] for name, _ in cls.test_list]
    meta = {**cls.meta, "md5": _md5(folder / cls.meta["filename"])}
    monkeypatch.setattr(cls, "train_list", train_list)
    monkeypatch.setattr(cls, "test_list", test_list)
    monkeypatch.setattr(cls, "meta", meta)


@pytest.fixture
def data_dir(tmp_path) -> Path:
    """The data folder that `compose` points paths.data_dir at."""
    return tmp_path / "data"


@pytest.fixture
def tiny_data(data_dir, monkeypatch):
    """write(name) puts the tiny set for data config `name` under data_dir; returns its arrays
    as N x C x H x W images and int labels, per split."""

    def write(name: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        if name == "cifar10":
            written = write_cifar10(data_dir)
            accept_cifar10_checksums(data_dir, monkeypatch)
            return written
        folder = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}[name]
        written = write_mnist(data_dir, folder)
        return {split: (x[:, None], y) for split, (x, y) in written.items()}

    return write


@pytest.fixture
def offline(monkeypatch):
    """Downloads go to a closed local port, never through a proxy: fails fast and hermetically."""
    for var in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(datasets.MNIST, "mirrors", [UNREACHABLE])
    monkeypatch.setattr(datasets.FashionMNIST, "mirrors", [UNREACHABLE])
    monkeypatch.setattr(datasets.CIFAR10, "url", UNREACHABLE + "cifar-10-python.tar.gz")


def build(compose, name: str, *overrides: str) -> InMemoryDataModule:
    extra = ["data.batch_size=16"]
    if name in VISION:
        extra += [f"data.val_size={N_VAL}", "data.download=false"]
    return instantiate(compose(f"data={name}", *extra, *overrides).data)


# --- the tiny files are what torchvision expects ----------------------------------------------


def test_tiny_files_are_read_back_by_torchvision(data_dir, tiny_data):
    mnist = tiny_data("mnist")
    cifar = tiny_data("cifar10")
    for is_train, split in ((True, "train"), (False, "test")):
        ds = datasets.MNIST(str(data_dir), train=is_train)
        x, y = mnist[split]
        assert torch.equal(ds.data, torch.from_numpy(x[:, 0]))
        assert torch.equal(ds.targets, torch.from_numpy(y).long())
        ds = datasets.CIFAR10(str(data_dir), train=is_train)
        x, y = cifar[split]
        assert np.array_equal(ds.data, x.transpose(0, 2, 3, 1))  # torchvision keeps HWC
        assert ds.targets == y.tolist()
        assert ds.classes[0] == "airplane" and len(ds.classes) == 10
    raw = (data_dir / "MNIST" / "raw" / "train-images-idx3-ubyte").read_bytes()
    assert raw[:16] == struct.pack(">iiii", 2051, N_TRAIN, 28, 28)
    assert len(raw) == 16 + N_TRAIN * 28 * 28


# --- splits, dtypes, determinism, normalisation -----------------------------------------------


@pytest.mark.parametrize("name", VISION)
def test_vision_splits_shapes_and_dtypes(compose, tiny_data, name):
    written = tiny_data(name)
    dm = build(compose, name)
    dm.setup("fit")
    assert {k: len(v) for k, v in dm.splits.items()} == {
        "train": N_TRAIN - N_VAL,
        "val": N_VAL,
        "test": N_TEST,
    }
    expected_shape = (1, 28, 28) if name != "cifar10" else (3, 32, 32)
    assert dm.input_shape == expected_shape
    for split in ("train", "val", "test"):
        x, y = dm.splits[split].tensors
        assert x.dtype == torch.uint8 and tuple(x.shape[1:]) == expected_shape
        assert y.dtype == torch.int64 and y.min() >= 0 and y.max() <= 9
    # the test split is the official test file, untouched and in order
    x_test, y_test = written["test"]
    assert torch.equal(dm.splits["test"].tensors[0], torch.from_numpy(x_test))
    assert torch.equal(dm.splits["test"].tensors[1], torch.from_numpy(y_test).long())
    # train and val together are exactly the official training file, each sample once
    x_train, y_train = written["train"]
    rows = collections.Counter(
        (xi.numpy().tobytes(), int(yi))
        for split in ("train", "val")
        for xi, yi in zip(*dm.splits[split].tensors, strict=True)
    )
    assert rows == collections.Counter(
        (xi.tobytes(), int(yi)) for xi, yi in zip(x_train, y_train, strict=True)
    )


@pytest.mark.parametrize("name", ("digits", *VISION))
def test_val_split_is_the_same_in_every_instance(compose, tiny_data, name):
    if name in VISION:
        tiny_data(name)
    first, second = build(compose, name), build(compose, name, "seed=7")
    torch.manual_seed(0)
    first.setup("fit")
    torch.manual_seed(1)  # the global seed must not move the split
    second.setup("fit")
    for split in ("train", "val", "test"):
        for a, b in zip(first.splits[split].tensors, second.splits[split].tensors, strict=True):
            assert torch.equal(a, b), split


@pytest.mark.parametrize("name", ("digits", *VISION))
def test_batches_are_normalised_on_transfer(compose, tiny_data, name):
    if name in VISION:
        tiny_data(name)
    dm = build(compose, name)
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.dtype == torch.uint8 and x.shape[0] == 16
    xn, yn = dm.on_after_batch_transfer((x, y), 0)
    assert xn.dtype == torch.float32 and xn.shape == x.shape
    assert torch.equal(yn, y)
    assert x.dtype == torch.uint8  # the uint8 batch is not overwritten
    mean = torch.tensor(dm.mean).view(1, -1, 1, 1)
    std = torch.tensor(dm.std).view(1, -1, 1, 1)
    assert torch.allclose(xn.double(), (x.double() / 255 - mean.double()) / std.double(), atol=1e-5)
    assert xn.abs().max() < 4  # 0..255 lands on a few standard deviations around 0


def test_digits_statistics_normalise_the_whole_training_split(compose):
    dm = build(compose, "digits")
    dm.setup("fit")
    x, y = dm.on_after_batch_transfer(dm.splits["train"].tensors, 0)
    assert abs(x.mean().item()) < 0.05
    assert abs(x.std().item() - 1) < 0.05


def test_digits_split_is_deterministic_and_disjoint(compose):
    from sklearn.datasets import load_digits

    dm = build(compose, "digits")
    dm.setup("fit")
    sizes = {k: len(v) for k, v in dm.splits.items()}
    n_test = 360  # a fixed 20%, stratified
    n_val = round((1797 - n_test) * 0.1)
    assert sizes == {"train": 1797 - n_test - n_val, "val": n_val, "test": n_test}
    assert dm.input_shape == (1, 8, 8)
    for split in ("train", "val", "test"):
        x, y = dm.splits[split].tensors
        assert x.dtype == torch.uint8 and tuple(x.shape[1:]) == (1, 8, 8) and x.max() == 255
        assert y.dtype == torch.int64
        assert set(y.tolist()) == set(range(10)), split

    def rows(split):
        x, y = dm.splits[split].tensors
        return {(xi.numpy().tobytes(), int(yi)) for xi, yi in zip(x, y, strict=True)}

    train, val, test = rows("train"), rows("val"), rows("test")
    assert len(train) == sizes["train"] and len(val) == n_val and len(test) == n_test
    assert not train & val and not train & test and not val & test
    # together they are exactly scikit-learn's 1797 digits (which holds no duplicate)
    digits = load_digits()
    images = (digits.images * (255 / 16)).round().astype(np.uint8)[:, None]
    everything = {(xi.tobytes(), int(yi)) for xi, yi in zip(images, digits.target, strict=True)}
    assert len(everything) == 1797
    assert train | val | test == everything


# --- every data set with every model, end to end ----------------------------------------------


@pytest.mark.parametrize("model", ("mlp", "cnn"))
@pytest.mark.parametrize("name", ("digits", *VISION))
def test_fast_dev_run_every_data_set_and_model(compose, tiny_data, tmp_path, name, model):
    overrides = [f"data={name}", f"model={model}", "debug=fdr", "logger=csv"]
    overrides += ["data.batch_size=16", "threads=1"]
    if name in VISION:
        tiny_data(name)
        overrides += [f"data.val_size={N_VAL}", "data.download=false"]
    cfg = compose(*overrides)
    run_dir = tmp_path / "run"
    record = train(cfg, run_dir, overrides=overrides)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == record["status"] == "finished"
    assert metrics["steps"] == 1  # fast_dev_run: one training batch
    for key in ("train/loss", "val/loss", "test/acc"):
        assert np.isfinite(metrics[key]), key
    assert 0.0 <= metrics["test/acc"] <= 1.0


# --- missing files, failed downloads, too little data ----------------------------------------


@pytest.mark.parametrize(
    ("name", "folder", "files"),
    [
        ("mnist", "MNIST/raw", MNIST_FILES),
        ("fashion_mnist", "FashionMNIST/raw", MNIST_FILES),
        ("cifar10", "cifar-10-batches-py", CIFAR_FILES),
    ],
)
def test_missing_files_without_download_name_the_folder_and_files(
    compose, data_dir, offline, name, folder, files
):
    dm = build(compose, name)
    for step in (dm.prepare_data, dm.setup):
        with pytest.raises(UserError) as info:
            step()
        message = str(info.value)
        assert str(data_dir) in message
        assert f"{data_dir}/{folder}" in message
        for file in files:
            assert file in message, file
        assert "data.download=false" in message and "data.download=true" in message
    assert not data_dir.exists() or not any(data_dir.rglob("*")), "nothing is written"


@pytest.mark.parametrize("name", VISION)
def test_failed_download_is_a_user_error(compose, data_dir, offline, name):
    dm = build(compose, name, "data.download=true")
    started = time.perf_counter()
    with pytest.raises(UserError, match="could not be downloaded") as info:
        dm.prepare_data()
    assert time.perf_counter() - started < 30
    message = str(info.value)
    assert str(data_dir) in message
    if name != "cifar10":  # torchvision's own reason travels along, with the mirror it tried
        assert f"Tried {UNREACHABLE}" in message


@pytest.mark.parametrize("name", VISION)
def test_download_on_with_files_present_reads_them_without_network(
    compose, tiny_data, offline, name
):
    written = tiny_data(name)
    dm = build(compose, name, "data.download=true")
    dm.prepare_data()  # the mirrors are unreachable: this passes only if nothing is fetched
    dm.setup("fit")
    assert torch.equal(dm.splits["test"].tensors[0], torch.from_numpy(written["test"][0]))


@pytest.mark.parametrize("name", VISION)
def test_fewer_samples_than_one_batch_asks_for_a_smaller_batch(compose, tiny_data, name):
    tiny_data(name)
    dm = build(compose, name, "data.batch_size=512")
    with pytest.raises(UserError, match=r"data\.batch_size") as info:
        dm.setup("fit")
    assert f"{N_TRAIN - N_VAL} samples" in str(info.value)
    assert "512" in str(info.value)


def test_a_batch_as_large_as_the_training_split_is_accepted(compose, tiny_data):
    tiny_data("mnist")
    dm = build(compose, "mnist", f"data.batch_size={N_TRAIN - N_VAL}")
    dm.setup("fit")
    assert len(dm.train_dataloader()) == 1


# --- the global batch size -------------------------------------------------------------------


def test_batch_size_is_global_and_whole_on_one_device(compose):
    import lightning.pytorch as pl

    dm = build(compose, "digits", "data.batch_size=48")
    assert dm.trainer is None
    assert dm.batch_size_per_device == dm.batch_size == 48
    dm.setup("fit")
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
        assert loader.batch_size == 48
    # attached to a real single-device Trainer, the world size is 1 as well
    dm.trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False)
    assert dm.trainer.world_size == 1
    assert dm.batch_size_per_device == 48


@pytest.mark.parametrize("val_size", [str(N_TRAIN), "1.0"])
def test_val_size_that_leaves_no_split_names_the_key(compose, tiny_data, val_size):
    tiny_data("mnist")
    datamodule = instantiate(
        compose("data=mnist", "data.download=false", f"data.val_size={val_size}").data
    )
    with pytest.raises(UserError, match="data.val_size"):
        datamodule.setup("fit")


def test_a_damaged_file_is_a_user_error(compose, tiny_data, data_dir):
    tiny_data("mnist")
    (data_dir / "MNIST" / "raw" / "train-images-idx3-ubyte").write_bytes(b"<html>oops</html>")
    datamodule = instantiate(compose("data=mnist", "data.download=false").data)
    with pytest.raises(UserError, match="unreadable"):
        datamodule.setup("fit")


# --- any tensors: features of any shape, float or uint8 -----------------------------------------


class Signals(InMemoryDataModule):
    """80 two-channel signals of 40 samples, float64 as numpy gives them; channel 0 around 1
    with spread 3, channel 1 around -2 with spread 0.5."""

    def load(self):
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(80, 2, 40, generator=generator, dtype=torch.float64)
        x = x * torch.tensor([3.0, 0.5]).view(1, 2, 1) + torch.tensor([1.0, -2.0]).view(1, 2, 1)
        y = torch.arange(80) % 3
        return {"train": (x[:64], y[:64]), "test": (x[64:], y[64:])}


def signals(**options) -> Signals:
    dm = Signals(**{"batch_size": 8, "num_classes": 3, "input_shape": [2, 40], **options})
    dm.setup("fit")
    return dm


def normalised(dm: InMemoryDataModule, split: str) -> torch.Tensor:
    return dm.on_after_batch_transfer(dm.splits[split].tensors, 0)[0]


def test_float_features_are_held_as_float32_and_split_for_validation():
    dm = signals()
    assert {k: len(v) for k, v in dm.splits.items()} == {"train": 58, "val": 6, "test": 16}
    assert all(dm.splits[s].tensors[0].dtype == torch.float32 for s in dm.splits)
    # no normalisation: batches are the features as they were
    x = torch.cat([dm.splits["train"].tensors[0], dm.splits["val"].tensors[0]])
    everything = Signals.load(dm)["train"][0].float()
    assert sorted(map(bytes, x.numpy())) == sorted(map(bytes, everything.numpy()))
    assert torch.equal(normalised(dm, "test"), Signals.load(dm)["test"][0].float())


@pytest.mark.parametrize(("normalise", "dims"), [("feature", (0,)), ("channel", (0, 2))])
def test_normalisation_from_the_training_split(normalise, dims):
    dm = signals(normalise=normalise)
    x = normalised(dm, "train").double()
    assert x.mean(dims).abs().max() < 1e-5
    assert (x.std(dims) - 1).abs().max() < 1e-4
    # the test split is scaled by the training split's statistics, not its own
    channel_means = normalised(dm, "test").double().mean((0, 2))
    assert 0 < channel_means.abs().max() < 1


def test_given_mean_and_std_are_per_channel():
    dm = signals(mean=[1.0, -2.0], std=[3.0, 0.5])
    raw = dm.splits["val"].tensors[0].double()
    expected = (raw - torch.tensor([1.0, -2.0]).view(1, 2, 1)) / torch.tensor([3.0, 0.5]).view(
        1, 2, 1
    )
    assert torch.allclose(normalised(dm, "val").double(), expected, atol=1e-5)


def test_uint8_features_are_read_on_the_0_to_1_scale():
    class Bytes(InMemoryDataModule):
        def load(self):
            x = torch.arange(40 * 5, dtype=torch.int64).remainder(256).to(torch.uint8).view(40, 5)
            return {"train": (x, torch.arange(40) % 2), "test": (x[:8], torch.arange(8) % 2)}

    dm = Bytes(batch_size=4, num_classes=2, input_shape=[5])
    dm.setup("fit")
    assert dm.splits["train"].tensors[0].dtype == torch.uint8  # a quarter of float32's bytes
    x = dm.splits["test"].tensors[0]
    assert torch.allclose(normalised(dm, "test"), x.float() / 255)


@pytest.mark.parametrize("val_size", [0, None, 0.0])
def test_val_size_0_or_null_means_no_validation_split(val_size):
    dm = signals(val_size=val_size)
    assert set(dm.splits) == {"train", "test"}
    assert len(dm.splits["train"]) == 64  # every training sample trains
    assert dm.val_dataloader() == []


def test_features_of_another_shape_than_input_shape_name_the_key():
    with pytest.raises(
        UserError, match=r"data.input_shape is \[40\]: set data.input_shape=\[2, 40\]"
    ):
        signals(input_shape=[40])


def test_an_unknown_normalisation_is_a_user_error():
    with pytest.raises(UserError, match="data.normalise must be none, feature or channel"):
        signals(normalise="pixel")


# --- no validation split: a real run ---------------------------------------------------------


def test_a_run_without_validation_keeps_the_last_state_as_best(compose, tmp_path, capsys):
    overrides = ["experiment=wine_mlp", "logger=csv", "data.val_size=0", "trainer.max_epochs=3"]
    record = train(compose(*overrides), tmp_path / "run", overrides=overrides)
    assert record["status"] == "finished", record.get("error")
    said = capsys.readouterr().out
    assert "data.val_size=0: no validation split; checkpoints/best.ckpt is the last epoch's" in said
    best = torch.load(record["best_ckpt"], map_location="cpu", weights_only=False)
    last = torch.load(
        tmp_path / "run/checkpoints/last.ckpt", map_location="cpu", weights_only=False
    )
    assert best["epoch"] == last["epoch"] == 2 and best["global_step"] == last["global_step"]
    assert not any(key.startswith("val/") for key in record)
    assert record["test/acc"] > 0.5  # tested on the last state, which has learnt (chance: 1/3)


def test_early_stopping_on_a_validation_metric_is_off_without_validation(tmp_path):
    from functools import partial

    import lightning.pytorch as pl

    from trainlab.models.classifier import Classifier
    from trainlab.nets import MLP

    dm = Signals(batch_size=8, num_classes=3, input_shape=[2, 40], val_size=0)
    model = Classifier(MLP([2, 40], 3), 3, optimizer=partial(torch.optim.SGD, lr=0.1))
    callbacks = [
        pl.callbacks.ModelCheckpoint(tmp_path, monitor="val/acc", mode="max", filename="best"),
        pl.callbacks.EarlyStopping(
            monitor="val/acc", mode="max"
        ),  # strict: a missing metric raises
    ]
    trainer = pl.Trainer(max_epochs=2, callbacks=callbacks, logger=False, enable_progress_bar=False)
    trainer.fit(model, datamodule=dm)
    assert trainer.current_epoch == 2
    assert not any(isinstance(c, pl.callbacks.EarlyStopping) for c in trainer.callbacks)
    assert trainer.checkpoint_callback.best_model_path == str(tmp_path / "best.ckpt")


# --- a net and data whose shapes do not fit ----------------------------------------------------


def test_a_net_for_images_on_1d_data_is_refused_in_one_line(tmp_path):
    from conftest import run_cli

    result = run_cli("trainlab.train", "data=wine", "model=cnn", "logger=csv", cwd=tmp_path)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: model=cnn takes images [C, H, W]; data=wine gives samples of data.input_shape="
        "[13]: use model=mlp, which takes any shape, or a net made for them."
    ]
    assert "Traceback" not in result.stderr


def test_an_mlp_of_another_input_size_is_refused_before_training(compose, tmp_path):
    overrides = ["data=wine", "model=mlp", "logger=csv", "model.net.input_shape=[12]"]
    with pytest.raises(UserError, match=r"data=wine gives samples of data.input_shape=\[13\]"):
        train(compose(*overrides), tmp_path / "run", overrides=overrides, choices={"data": "wine"})
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_float_features_without_validation_resume_mid_epoch_exactly(compose, tmp_path):
    from test_exact_resume import StopAt, fit

    cfg = compose("experiment=wine_mlp", "data.val_size=0", "data.batch_size=32")
    straight = StopAt(None, tmp_path / "unused.ckpt")
    _, reference = fit(cfg, straight)
    steps = len(straight.batches) // 2  # an epoch's
    fit(cfg, StopAt(steps + 2, tmp_path / "mid.ckpt"))  # two steps into the second epoch
    resumed = StopAt(None, tmp_path / "unused.ckpt")
    _, model = fit(cfg, resumed, tmp_path / "mid.ckpt")
    assert resumed.batches == straight.batches[steps + 2 :]
    for name, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name


def test_float_features_in_blocks_train_the_same_weights(compose):
    from test_steps_per_call import Record, fit

    cfg = compose("experiment=wine_mlp", "data.val_size=0")
    (trainer_one, one), (trainer_four, four) = fit(cfg, 1, Record()), fit(cfg, 4, Record())
    assert four.steps_per_call_choice["steps_per_call"] == 4
    assert trainer_four.global_step == trainer_one.global_step == 2 * 9  # 142 wines, batches of 16
    for name, value in one.state_dict().items():
        assert torch.equal(four.state_dict()[name], value), name


def test_statistics_from_the_data_replace_an_image_sets_own(compose):
    dm = build(compose, "digits", "data.normalise=channel")
    dm.setup("fit")
    x = normalised(dm, "train").double()
    assert abs(x.mean()) < 1e-5 and abs(x.std() - 1) < 1e-4  # the class's constants: within 0.05


def test_deploying_a_model_of_features_is_refused_in_one_line(compose, tmp_path):
    from trainlab.engine.deploy import from_checkpoint

    overrides = ["experiment=wine_mlp", "logger=csv", "trainer.max_epochs=1", "test=false"]
    record = train(compose(*overrides), tmp_path / "run")
    with pytest.raises(UserError, match=r"samples of shape \[13\] normalised by feature: only"):
        from_checkpoint(record["best_ckpt"])
