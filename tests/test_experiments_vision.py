"""The classic classifiers as experiments: MLP, CNNs, ResNet-18, LSTM/GRU and a small ViT.

Each experiment runs through a real Trainer on tiny data sets written in the real MNIST and
CIFAR-10 formats (the digits are bundled), once as a fast_dev_run logging to TensorBoard and
once for a few epochs to show its loss falling. The nets are checked on their own for the
shapes they accept and for what makes them what they are (the ResNet's stem, the RNN's cell).
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from conftest import start_cli
from hydra.utils import instantiate
from omegaconf import OmegaConf
from test_data import N_VAL, accept_cifar10_checksums, write_cifar10, write_mnist
from torch import nn
from torchvision.models import resnet18 as torchvision_resnet18

from trainlab.engine.config import check_command_line
from trainlab.engine.errors import UserError
from trainlab.nets.cnn_classic import ClassicCNN
from trainlab.nets.resnet import resnet18
from trainlab.nets.rnn import RowRNN
from trainlab.nets.vit import ViT
from trainlab.train import train

# experiment -> its data set and net
EXPERIMENTS = {
    "mnist_mlp": ("mnist", "trainlab.nets.mlp.MLP"),
    "mnist_cnn": ("mnist", "trainlab.nets.cnn_classic.ClassicCNN"),
    "cifar10_cnn": ("cifar10", "trainlab.nets.cnn_classic.ClassicCNN"),
    "cifar10_resnet18": ("cifar10", "trainlab.nets.resnet.resnet18"),
    "digits_lstm": ("digits", "trainlab.nets.rnn.RowRNN"),
    "mnist_vit": ("mnist", "trainlab.nets.vit.ViT"),
}
DATA_SHAPES = {"mnist": [1, 28, 28], "cifar10": [3, 32, 32], "digits": [1, 8, 8]}
SHAPES = tuple(DATA_SHAPES.values())


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    """tiny(data) writes the tiny files of that data set under paths.data_dir and returns the
    overrides that read them offline (the digits need neither)."""

    def write(data: str) -> list[str]:
        root = tmp_path / "data"
        if data == "digits":
            return [f"data={data}"]
        if data == "mnist":
            write_mnist(root)
        else:
            write_cifar10(root)
            accept_cifar10_checksums(root, monkeypatch)
        return [f"data={data}", "data.download=false", f"data.val_size={N_VAL}"]

    return write


def train_losses(run_dir: Path) -> list[float]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return [float(r["train/loss_epoch"]) for r in csv.DictReader(f) if r["train/loss_epoch"]]


# --- every experiment through a real Trainer ---------------------------------------------------


# (test_tensorboard runs every experiment to its curves and metrics in the fast suite)
@pytest.mark.slow
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_fast_dev_run_logs_to_tensorboard(compose, tiny, tmp_path, experiment):
    data, _ = EXPERIMENTS[experiment]
    cfg = compose(
        f"experiment={experiment}",
        *tiny(data),
        "data.batch_size=8",
        "debug=fdr",
        "logger=tensorboard",
    )
    record = train(cfg, tmp_path / "run")
    assert record["status"] == "finished" and record["steps"] == 1
    assert 0.0 <= record["test/acc"] <= 1.0  # the test split ran too
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    # the experiment's net takes the data set's batches and gives one logit per class
    dm = instantiate(cfg.data)
    dm.setup("fit")
    x, y = dm.on_after_batch_transfer(next(iter(dm.train_dataloader())), 0)
    assert instantiate(cfg.model.net).eval()(x).shape == (8, 10)


# A few epochs of a few small batches, enough for each recipe to make progress (the tiny MNIST
# and CIFAR-10 sets hold 56 training images; the digits are the real 1617).
SHORT_RUNS = {
    "mnist_mlp": ["data.batch_size=8", "trainer.max_epochs=4"],
    "mnist_cnn": ["data.batch_size=8", "trainer.max_epochs=6"],
    "cifar10_cnn": ["data.batch_size=4", "trainer.max_epochs=4"],
    "digits_lstm": ["data.batch_size=32", "trainer.max_epochs=4", "+trainer.limit_train_batches=8"],
    "mnist_vit": ["data.batch_size=8", "trainer.max_epochs=5"],
}


@pytest.mark.parametrize("experiment", SHORT_RUNS)
def test_short_run_lowers_the_loss(compose, tiny, tmp_path, experiment):
    data, _ = EXPERIMENTS[experiment]
    cfg = compose(
        f"experiment={experiment}",
        *tiny(data),
        *SHORT_RUNS[experiment],
        "logger=csv",
        "callbacks=none",
        "test=false",
    )
    record = train(cfg, tmp_path)
    losses = train_losses(tmp_path)
    assert record["status"] == "finished"
    assert len(losses) == cfg.trainer.max_epochs
    assert losses[0] > losses[-1], losses


@pytest.mark.slow
def test_resnet18_short_run_lowers_the_loss(compose, tiny, tmp_path):
    cfg = compose(
        "experiment=cifar10_resnet18",
        *tiny("cifar10"),
        "data.batch_size=8",
        "lr_scaling.rule=linear",  # lr 0.1 is for batch 128: 0.00625 for 8
        "debug=limit",  # a few batches an epoch
        "trainer.max_epochs=4",
        "trainer.limit_train_batches=4",
        "trainer.limit_val_batches=1",
        "logger=csv",
        "callbacks=none",
        "test=false",
    )
    assert train(cfg, tmp_path)["effective_lr"] == pytest.approx(0.1 * 8 / 128)
    losses = train_losses(tmp_path)
    assert len(losses) == 4 and losses[0] > losses[-1], losses


def test_lstm_experiment_also_reads_mnist(compose, tiny, tmp_path):
    cfg = compose(
        "experiment=digits_lstm", *tiny("mnist"), "data.batch_size=16", "debug=fdr", "logger=csv"
    )
    assert cfg.data.input_shape == [1, 28, 28]
    record = train(cfg, tmp_path)
    assert record["status"] == "finished" and record["steps"] == 1
    assert instantiate(cfg.model.net).rnn.input_size == 28  # 28 steps of 28 pixels


# --- the configs --------------------------------------------------------------------------------


def test_every_experiment_composes_on_the_command_line(tmp_path):
    """`python -m trainlab.train experiment=<name> --cfg job` for all six, side by side."""
    procs = {
        name: start_cli("trainlab.train", f"experiment={name}", "--cfg", "job", cwd=tmp_path)
        for name in EXPERIMENTS
    }
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-2000:]
        cfg = OmegaConf.create(out)
        data, net = EXPERIMENTS[name]
        assert cfg.model.net._target_ == net
        assert list(cfg.data.input_shape) == DATA_SHAPES[data]


def test_recipes(compose):
    mlp = compose("experiment=mnist_mlp")
    assert mlp.model.net.hidden == [128] and mlp.model.net.dropout == 0.2
    assert mlp.optimizer._target_ == "torch.optim.Adam" and mlp.data.batch_size == 64
    cnn = compose("experiment=mnist_cnn")
    assert cnn.optimizer._target_ == "torch.optim.SGD" and cnn.optimizer.lr == 0.01
    assert list(cnn.model.net.channels) == [32, 64] and cnn.model.net.hidden == 128
    cifar = compose("experiment=cifar10_cnn")
    assert cifar.model.net.hidden == 1024 and cifar.optimizer.lr == 1e-3
    assert cifar.optimizer.momentum == 0.9 and cifar.data.batch_size == 64
    resnet = compose("experiment=cifar10_resnet18")
    assert resnet.optimizer.lr == 0.1 and resnet.optimizer.nesterov
    assert resnet.optimizer.weight_decay == 5e-4 and resnet.data.augment
    assert resnet.scheduler._target_ == "trainlab.models.schedulers.cosine"
    assert resnet.lr_scaling.base_batch_size == 128 and resnet.data.batch_size == 128
    vit = compose("experiment=mnist_vit")
    assert vit.model.net.patch_size == 7 and vit.optimizer._target_ == "torch.optim.AdamW"
    assert vit.scheduler._target_ == "trainlab.models.schedulers.cosine"


def test_gru_by_config(compose):
    check_command_line("train", ["experiment=digits_lstm", "model.net.cell=gru"])
    net = instantiate(compose("experiment=digits_lstm", "model.net.cell=gru").model.net)
    assert isinstance(net.rnn, nn.GRU)
    assert isinstance(instantiate(compose("experiment=digits_lstm").model.net).rnn, nn.LSTM)


# --- the nets -----------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
def test_cnn_classic_flattens_the_whole_map(shape):
    net = ClassicCNN(shape, 10, channels=[32, 64], hidden=128)
    side = shape[1] // 4  # two 2x2 max-pools
    assert net[7].in_features == 64 * side * side  # Flatten, then the first fc layer
    assert net(torch.rand(2, *shape)).shape == (2, 10)


def test_cnn_classic_refuses_more_pooling_than_the_image_allows():
    ClassicCNN([1, 8, 8], 10, channels=[8, 8, 8])  # 8 -> 4 -> 2 -> 1
    with pytest.raises(UserError, match="at most 3 conv layers"):
        ClassicCNN([1, 8, 8], 10, channels=[8, 8, 8, 8])


def test_resnet18_stem_keeps_32x32():
    net = resnet18([3, 32, 32], 10).eval()
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
    assert isinstance(net.maxpool, nn.Identity)
    x = torch.rand(2, 3, 32, 32)
    stem = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    assert stem.shape == (2, 64, 32, 32)
    assert net.layer4(net.layer3(net.layer2(net.layer1(stem)))).shape[-2:] == (4, 4)
    # torchvision's ResNet-18 but for the stem: 7x7x3 kernels become 3x3x3 ones
    params = sum(p.numel() for p in net.parameters())
    reference = sum(p.numel() for p in torchvision_resnet18(num_classes=10).parameters())
    assert params == reference - 64 * 3 * (7 * 7 - 3 * 3)


@pytest.mark.parametrize("shape", SHAPES)
def test_resnet18_output_shapes(shape):
    net = resnet18(shape, 10).eval()
    assert net.conv1.in_channels == shape[0]
    with torch.no_grad():
        assert net(torch.rand(2, *shape)).shape == (2, 10)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_rnn_reads_rows_and_switches_cell(shape, cell):
    net = RowRNN(shape, 10, cell=cell, hidden=16)
    assert isinstance(net.rnn, nn.LSTM if cell == "lstm" else nn.GRU)
    seen = []
    net.rnn.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    x = torch.rand(3, *shape)
    assert net(x).shape == (3, 10)
    rows = seen[0]
    assert rows.shape == (3, shape[1], shape[0] * shape[2])  # H steps of C x W features
    assert torch.equal(rows[:, 5], x[:, :, 5, :].reshape(3, -1))


@pytest.mark.parametrize("bidirectional", [False, True])
def test_rnn_classifies_from_the_last_hidden_state(bidirectional):
    net = RowRNN([1, 8, 8], 10, hidden=16, layers=2, bidirectional=bidirectional).eval()
    x = torch.rand(4, 1, 8, 8)
    outputs, _ = net.rnn(x[:, 0])  # one channel: the rows are the image itself
    if bidirectional:  # forward direction at the last step, backward at the first
        last = torch.cat([outputs[:, -1, :16], outputs[:, 0, 16:]], dim=1)
    else:
        last = outputs[:, -1]
    torch.testing.assert_close(net(x), net.head(last))


def test_rnn_refuses_an_unknown_cell():
    with pytest.raises(UserError, match="lstm or gru"):
        RowRNN([1, 8, 8], 10, cell="rnn")


@pytest.mark.parametrize(
    ("shape", "patch", "patches"),
    [([1, 28, 28], 7, 16), ([1, 28, 28], 4, 49), ([3, 32, 32], 4, 64), ([1, 8, 8], 2, 16)],
)
def test_vit_patches_and_output(shape, patch, patches):
    net = ViT(shape, 10, patch_size=patch, dim=32, depth=2, heads=4).eval()
    assert net.num_patches == patches
    assert net.pos_embed.shape == (1, patches + 1, 32)  # and the class token
    tokens = net.patch_embed(torch.rand(2, *shape)).flatten(2)
    assert tokens.shape == (2, 32, patches)
    with torch.no_grad():
        assert net(torch.rand(2, *shape)).shape == (2, 10)
    layer = net.encoder.layers[0]
    assert layer.norm_first and layer.self_attn.batch_first
    assert isinstance(net.encoder.norm, nn.LayerNorm)


def test_vit_refuses_patches_that_do_not_tile_the_image():
    with pytest.raises(UserError, match="choose one of 2, 4, 7, 14, 28"):
        ViT([1, 28, 28], 10, patch_size=5)
    with pytest.raises(UserError, match="multiple of heads"):
        ViT([1, 28, 28], 10, dim=30, heads=4)
