"""Image files in class folders: real PNG and JPEG files, decoded by real DataLoader workers."""

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli
from hydra.utils import instantiate
from PIL import Image

from trainlab.errors import UserError
from trainlab.train import train


def write_images(root: Path, per_class: dict[str, int], seed: int = 0) -> None:
    """Two classes that differ in brightness, in assorted sizes and formats."""
    rng = np.random.default_rng(seed)
    for split, count in per_class.items():
        for label, base in (("cats", 60), ("dogs", 190)):
            folder = root / split / label
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                size = (int(rng.integers(20, 48)), int(rng.integers(20, 48)))
                pixels = np.clip(base + rng.normal(0, 25, (*size, 3)), 0, 255).astype(np.uint8)
                suffix = ".png" if i % 2 else ".jpg"
                Image.fromarray(pixels).save(folder / f"{i}{suffix}")


@pytest.fixture
def images(tmp_path) -> Path:
    root = tmp_path / "data" / "images"
    write_images(root, {"train": 12, "val": 4, "test": 4})
    return root


def test_folder_data_module_reads_resizes_and_normalises(compose, images):
    datamodule = instantiate(
        compose("data=image_folder", "data.input_shape=[3,32,32]", "data.num_workers=0").data
    )
    datamodule.setup("fit")
    assert {k: len(v) for k, v in datamodule.splits.items()} == {"train": 24, "val": 8, "test": 8}
    x, y = next(iter(datamodule.val_dataloader()))
    assert x.shape == (8, 3, 32, 32) and x.dtype.is_floating_point
    assert x.min() >= -1.01 and x.max() <= 1.01  # normalised with mean 0.5, std 0.5
    dark, bright = x[y == 0].mean(), x[y == 1].mean()
    assert dark < 0 < bright  # the class folders' contents arrived under their labels


def test_train_on_image_folders(compose, images, tmp_path):
    cfg = compose(
        "data=image_folder",
        "model=cnn",
        "data.input_shape=[3,32,32]",
        "data.batch_size=8",
        "trainer.max_epochs=3",
        "logger=csv",
    )
    record = train(cfg, tmp_path / "run")
    assert record["status"] == "finished" and record["val/acc_best"] >= 0.75


def test_an_unreadable_image_is_named(compose, images, tmp_path):
    bad = images / "train" / "dogs" / "broken.png"
    bad.write_bytes(b"this is not a png")
    datamodule = instantiate(compose("data=image_folder").data)
    with pytest.raises(UserError, match=str(bad)):
        datamodule.setup("fit")


def test_a_truncated_image_stops_the_run_with_its_name(images, tmp_path):
    # the header is fine, the pixels are cut off: found only when a worker decodes it
    good = next((images / "train" / "cats").glob("*.png"))
    cut = images / "train" / "cats" / "cut.png"
    cut.write_bytes(good.read_bytes()[:60])
    result = run_cli(
        "trainlab.train",
        "data=image_folder",
        "model=cnn",
        "debug=fdr",
        "logger=csv",
        "data.batch_size=32",
        "data.input_shape=[3,32,32]",
        f"paths.data_dir={tmp_path / 'data'}",
        cwd=tmp_path,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: cannot read the image") and str(cut) in last
    assert "Traceback" not in result.stderr


def test_missing_folders_say_what_layout_is_expected(compose):
    datamodule = instantiate(compose("data=image_folder").data)
    with pytest.raises(UserError, match="train/ and val/"):
        datamodule.setup("fit")


def test_class_count_must_match_the_config(compose, images):
    datamodule = instantiate(compose("data=image_folder", "data.num_classes=3").data)
    with pytest.raises(UserError, match="2 class folders"):
        datamodule.setup("fit")


def test_metrics_json_of_a_folder_run(compose, images, tmp_path):
    cfg = compose(
        "data=image_folder",
        "debug=fdr",
        "logger=csv",
        "data.input_shape=[1,16,16]",
        "data.mean=[0.5]",
        "data.std=[0.5]",
        "data.num_workers=0",
    )
    train(cfg, tmp_path / "run")
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["status"] == "finished"
