"""TensorBoard as the logger of every ready experiment: a short real run of each, on tiny data in
the real formats, leaves its training curves (and, where the experiment draws, its images) in
the run's event files. (fast_dev_run would not: Lightning swaps every logger out for it.)

What each run needs comes from its config (its data module, its model), not from a table of
experiments: a new experiment on a data set the template knows, or on one that ships with its
package, is covered as it is."""

import inspect
from pathlib import Path

import pytest
from hydra.utils import get_class
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_data import N_VAL, accept_cifar10_checksums, write_cifar10, write_mnist
from test_folder_data import write_images, write_lists

from trainlab.engine.config import group_options
from trainlab.train import train

EXPERIMENTS = group_options("experiment")


def write_tiny_data(data: dict, data_dir: Path, monkeypatch) -> list[str]:
    """Tiny data in the real format of a data module, and the overrides that read it."""
    kind = data["_target_"].rpartition(".")[2]
    if kind in ("MNISTDataModule", "FashionMNISTDataModule"):
        write_mnist(data_dir, folder=kind.removesuffix("DataModule"))
    elif kind == "CIFAR10DataModule":
        write_cifar10(data_dir)
        accept_cifar10_checksums(data_dir, monkeypatch)
    elif kind in ("ImageFolderDataModule", "ImageListDataModule"):  # two classes of images
        write_images(data_dir / "images", {"train": 6, "val": 2})
        write_lists(data_dir / "images", data_dir / "images", splits=("train", "val"))
        small = f"data.input_shape=[{data['input_shape'][0]},32,32]"
        return ["data.num_classes=2", "data.num_workers=0", small]
    elif kind == "TextDataModule":
        data_dir.mkdir(parents=True, exist_ok=True)
        (data_dir / "input.txt").write_text("to be or not to be, that is the question. " * 20)
        return ["data.block_size=16", "data.batches_per_epoch=2"]
    else:  # a data set that ships with its package (digits, wine): nothing to write
        return []
    return ["data.download=false", f"data.val_size={N_VAL}"]  # the torchvision data sets


def validates(cfg) -> bool:
    """Whether a run of cfg validates, as its config says: not where its data set holds out no
    validation split (val_size 0 or null, set in its config or its class's default)."""
    param = inspect.signature(get_class(cfg.data._target_)).parameters.get("val_size")
    default = param.default if param is not None else 1  # without val_size: a split of its own
    return cfg.data.get("val_size", default) not in (0, None)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_logs_its_curves_to_tensorboard(compose, tmp_path, monkeypatch, name):
    check_experiment(compose, tmp_path, monkeypatch, f"experiment={name}")


def check_experiment(compose, tmp_path: Path, monkeypatch, *experiment: str) -> None:
    """A short real run of the experiment (`experiment=<name>` and any overrides) records what
    its config says it should: its curves, its metrics (validation ones only where it
    validates), its best value of the metric it monitors, and its place in compare."""
    from trainlab.engine import TrainlabModule
    from trainlab.engine.compare import find_runs, leaderboard, monitored, without_validation
    from trainlab.models.classifier import Classifier
    from trainlab.models.gan import GAN
    from trainlab.models.language_model import LanguageModel

    planned = compose(*experiment)
    data = write_tiny_data(dict(planned.data), tmp_path / "data", monkeypatch)
    model = get_class(planned.model._target_)
    short = ["trainer.max_epochs=2", "+trainer.limit_train_batches=3"]  # onecycle: > 1 warm-up
    short += ["+trainer.limit_val_batches=1", "+trainer.limit_test_batches=1"]
    short += ["data.batch_size=4"]
    if "sample" in planned.model:  # a language model's text at the end: a few bytes of it
        short += ["model.sample.length=20"]
    cfg = compose(*experiment, "logger=tensorboard", *short, *data)
    record = train(cfg, tmp_path / "run")
    assert record["status"] == "finished"

    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"images": 0})
    tags = events.Reload().Tags()
    scalars, images = set(tags["scalars"]), set(tags["images"])
    if issubclass(model, TrainlabModule):  # the template's modules log a point an epoch
        curve = "train/g_loss" if issubclass(model, GAN) else "train/loss_epoch"
        assert len(events.Scalars(curve)) == 2
    else:  # a fork's own LightningModule logs what it chooses (per step, say): some of training
        assert [key for key in record if key.startswith("train/")]
    validated = validates(cfg)
    if not validated:
        assert not [tag for tag in scalars if tag.startswith("val/")]
        assert not [key for key in record if key.startswith("val/")]
    if issubclass(model, GAN):
        assert "samples" in images
    elif issubclass(model, LanguageModel):
        assert "val/loss" in scalars or not validated
    elif issubclass(model, Classifier):  # its metrics and its confusion matrices
        assert "test/acc" in scalars and "test/confusion_matrix" in images
        if validated:
            assert {"val/acc", "val/f1"} <= scalars and "val/confusion_matrix" in images

    # the best value of what it monitors, where it validates and monitors a metric ...
    monitors = cfg.monitor.metric is not None and validated
    assert (record["monitor"]["best"] is not None) == monitors
    # ... by which compare ranks it; without validation, by its test split's counterpart
    runs, problems = find_runs([tmp_path / "run"])
    assert not problems
    if monitors:
        assert leaderboard(runs, monitored(runs))
    elif cfg.monitor.metric and cfg.get("test") and f"{cfg.monitor.metric}".startswith("val/"):
        assert not leaderboard(runs, monitored(runs))
        assert without_validation(runs, monitored(runs))[0] == runs


def test_a_forks_experiment_without_validation_passes_the_same_checks(
    compose, tmp_path, monkeypatch
):
    """A fork adds a data set that holds out no validation split and an experiment on it, as
    config files of its own (here beside the template's, on Hydra's search path): the checks
    every experiment passes hold for it unedited."""
    fork = tmp_path / "fork"
    (fork / "data").mkdir(parents=True)
    (fork / "experiment").mkdir()
    (fork / "data" / "my_digits.yaml").write_text(
        "defaults:\n  - digits\n  - _self_\n\nval_size: 0\n"
    )
    (fork / "experiment" / "my_digits_mlp.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /data: my_digits\n  - override /model: mlp\n"
    )
    searchpath = f"hydra.searchpath=[file://{fork}]"
    assert compose(searchpath, "experiment=my_digits_mlp").data.val_size == 0
    check_experiment(compose, tmp_path, monkeypatch, searchpath, "experiment=my_digits_mlp")


def test_a_tensorboard_sweep_ranks_its_runs_in_the_hparams_tab(tmp_path):
    """A real 2-job sweep: each run, named by the value it changes, holds TensorBoard's HParams
    with the keys a user chose (no bookkeeping) against the monitored metric's best, the final
    validation and the test metrics (no placeholder hp_metric), as TensorBoard reads them."""
    import json

    from conftest import run_cli
    from tensorboard.plugins.hparams import metadata

    from trainlab.engine.config import is_bookkeeping

    args = (
        "-m",
        "optimizer.lr=1e-3,2e-3",
        "logger=tensorboard",
        "debug=limit",
        "trainer.max_epochs=1",
    )
    result = run_cli("trainlab.train", *args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (sweep,) = (tmp_path / "logs" / "train" / "sweeps").iterdir()
    runs = sorted(p.name for p in (sweep / "tensorboard").iterdir())
    assert runs == ["0 optimizer.lr=0.001", "1 optimizer.lr=0.002"]  # not <date>/0/tensorboard
    for num, lr in ((0, 0.001), (1, 0.002)):
        events = EventAccumulator(str(sweep / "tensorboard" / runs[num]))
        events.Reload()
        content = events.PluginTagToContent(metadata.PLUGIN_NAME)
        experiment = metadata.parse_experiment_plugin_data(content[metadata.EXPERIMENT_TAG])
        metrics = {m.name.tag for m in experiment.metric_infos}
        assert {"val/acc_best", "val/acc", "test/acc", "test/loss"} <= metrics
        assert "hp_metric" not in metrics and "hp_metric" not in events.Tags()["scalars"]
        record = json.loads((sweep / str(num) / "metrics.json").read_text())
        best = events.Scalars("val/acc_best")[-1]  # where the HParams tab reads the metric
        assert best.value == pytest.approx(record["monitor"]["best"]) and best.value > 0
        assert events.Scalars("test/acc")[-1].value == pytest.approx(record["test/acc"])

        start = metadata.parse_session_start_info_plugin_data(
            content[metadata.SESSION_START_INFO_TAG]
        )
        hparams = {k: v.number_value or v.string_value for k, v in start.hparams.items()}
        assert hparams["optimizer.lr"] == pytest.approx(lr) and hparams["model"] == "mlp"
        assert "trainer.max_epochs" in hparams and "data.batch_size" in hparams
        assert not [k for k in hparams if is_bookkeeping(k) or k.startswith("callbacks")]
