"""Confusion matrices of val and test: PNG and CSV files in the run directory, images in
TensorBoard and W&B, counts that agree with the logged accuracy."""

import csv
import json
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
from hydra.utils import instantiate
from PIL import Image

from trainlab.engine.callbacks.confusion import ConfusionMatrix
from trainlab.eval import evaluate
from trainlab.train import train


def read_counts(path: Path) -> tuple[list[str], np.ndarray]:
    """(class names, rows of counts: true class by predicted class) from a confusion CSV."""
    rows = list(csv.reader(path.open()))
    assert rows[0][0] == "true/predicted" and [r[0] for r in rows[1:]] == rows[0][1:]
    return rows[0][1:], np.array([[int(c) for c in r[1:]] for r in rows[1:]])


def assert_real_image(path: Path) -> None:
    with Image.open(path) as image:
        assert image.format == "PNG" and image.mode == "RGB"
        assert min(image.size) >= 200
        pixels = np.asarray(image)
    assert len(np.unique(pixels[::3, ::3].reshape(-1, 3), axis=0)) > 10  # a drawing, no blank


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """Two epochs on digits, logged to TensorBoard: (run dir, metrics.json, split sizes)."""
    from hydra import compose, initialize_config_dir

    from trainlab.engine.config import CONF_DIR

    root = tmp_path_factory.mktemp("confusion")
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            "train",
            [f"paths.log_dir={root}", "logger=tensorboard", "trainer.max_epochs=2"],
        )
    record = train(cfg, root / "run")
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    sizes = {split: len(data) for split, data in datamodule.splits.items()}
    return root / "run", record, sizes


@pytest.mark.parametrize("split", ["test", "val"])
def test_matrix_files_count_the_split_and_agree_with_its_accuracy(digits_run, split):
    run_dir, record, sizes = digits_run
    assert_real_image(run_dir / f"confusion_matrix_{split}.png")
    classes, counts = read_counts(run_dir / f"confusion_matrix_{split}.csv")
    assert classes == [str(i) for i in range(10)]  # digits name no classes: their indices
    assert counts.sum() == sizes[split]
    # test: the best checkpoint's accuracy; val: the last epoch's (the run's last val/acc)
    on_disk = json.loads((run_dir / "metrics.json").read_text())
    assert np.trace(counts) / counts.sum() == pytest.approx(on_disk[f"{split}/acc"], abs=1e-6)
    assert on_disk[f"{split}/acc"] == record[f"{split}/acc"]


def test_tensorboard_gets_both_images(digits_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _, _ = digits_run
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert {"val/confusion_matrix", "test/confusion_matrix"} <= set(events.Tags()["images"])
    logged = events.Images("test/confusion_matrix")[-1]
    with Image.open(run_dir / "confusion_matrix_test.png") as png:
        assert (logged.width, logged.height) == png.size
    assert logged.encoded_image_string.startswith(b"\x89PNG")


def test_wandb_offline_run_gets_both_images(compose, tmp_path):
    train(compose("debug=limit", "logger=wandb"), tmp_path)
    (offline,) = (tmp_path / "wandb").glob("offline-run-*")
    media = sorted(
        p.relative_to(offline / "files" / "media" / "images").as_posix()
        for p in offline.glob("files/media/images/**/*.png")
    )
    assert any(m.startswith("val/confusion_matrix") for m in media), media
    assert any(m.startswith("test/confusion_matrix") for m in media), media


def test_evaluating_the_val_split_draws_its_matrix(compose, tmp_path):
    train(compose("debug=limit", "logger=csv"), tmp_path / "run")
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    record = evaluate(compose(f"ckpt_path={ckpt}", "split=val", config="eval"), tmp_path / "eval")
    assert_real_image(tmp_path / "eval" / "confusion_matrix_val.png")
    _, counts = read_counts(tmp_path / "eval" / "confusion_matrix_val.csv")
    datamodule = instantiate(compose().data)
    datamodule.setup("validate")
    assert counts.sum() == len(datamodule.splits["val"])  # the whole split: eval has no limit
    assert np.trace(counts) / counts.sum() == pytest.approx(record["val/acc"], abs=1e-6)
    assert not (tmp_path / "eval" / "confusion_matrix_test.png").exists()


def test_a_trainer_without_loggers_writes_no_files(compose, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where Lightning's default_root_dir would be
    cfg = compose("trainer.max_epochs=1")
    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model, optimizer=instantiate(cfg.optimizer))
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        callbacks=[ConfusionMatrix()],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=datamodule)
    trainer.test(model, datamodule=datamodule)
    assert not list(tmp_path.glob("confusion_matrix*"))
