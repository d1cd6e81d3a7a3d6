"""Image files in class folders: real PNG and JPEG files, decoded by real DataLoader workers."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli
from hydra.utils import instantiate
from PIL import Image

from trainlab.engine.errors import UserError
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


def write_lists(images: Path, lists: Path, splits=("train", "val", "test"), seed: int = 0) -> None:
    """<lists>/<split>.csv naming every image of images/<split>/<class>/, with paths relative to
    the list file, in shuffled order, after a header line."""
    rng = np.random.default_rng(seed)
    lists.mkdir(parents=True, exist_ok=True)
    for split in splits:
        files = sorted((images / split).glob("*/*"))
        lines = [f"{os.path.relpath(f, lists)},{f.parent.name}" for f in files]
        lines = [lines[i] for i in rng.permutation(len(lines))]
        (lists / f"{split}.csv").write_text("\n".join(["path,label", *lines]) + "\n")


def list_data(compose, *overrides):
    return instantiate(
        compose(
            "data=image_list",
            "data.lists.train=lists/train.csv",
            "data.lists.val=lists/val.csv",
            "data.lists.test=lists/test.csv",
            "data.num_classes=2",
            "data.input_shape=[3,32,32]",
            "data.num_workers=0",
            *overrides,
        ).data
    )


def test_list_data_module_reads_what_the_folder_module_reads(compose, images, tmp_path):
    write_lists(images, tmp_path / "data" / "lists")
    folder = instantiate(
        compose("data=image_folder", "data.input_shape=[3,32,32]", "data.num_workers=0").data
    )
    listed = list_data(compose, "data.mean=[0.5,0.5,0.5]", "data.std=[0.5,0.5,0.5]")
    folder.setup("fit")
    listed.setup("fit")
    assert listed.classes == folder.classes == ["cats", "dogs"]
    for split in ("train", "val", "test"):
        ours = {Path(p).resolve(): label for p, label in listed.splits[split].samples}
        theirs = {Path(p).resolve(): label for p, label in folder.splits[split].samples}
        assert ours == theirs and len(ours) == {"train": 24, "val": 8, "test": 8}[split]
    # Pixel for pixel, after the same resizing and normalisation (val: no augmentation).
    by_path = {
        Path(path).resolve(): listed.splits["val"][i]
        for i, (path, _) in enumerate(listed.splits["val"].samples)
    }
    for i, (path, label) in enumerate(folder.splits["val"].samples):
        x, y = folder.splits["val"][i]
        x_listed, y_listed = by_path[Path(path).resolve()]
        assert y == y_listed == label and torch.equal(x, x_listed)


def test_list_labels_can_be_named_in_config(compose, images, tmp_path):
    write_lists(images, tmp_path / "data" / "lists")
    listed = list_data(compose, "data.classes=[dogs,cats]")
    listed.setup("fit")
    x, y = next(iter(listed.val_dataloader()))
    assert listed.classes == ["dogs", "cats"]
    assert x[y == 0].mean() > 0 > x[y == 1].mean()  # label 0 is now the bright dogs


@pytest.mark.parametrize(
    ("split", "line", "says"),
    [
        ("train", "../images/train/cats/0.jpg,cats,extra", "expected `path,label`"),
        ("train", "../images/train/cats/0.jpg", "expected `path,label`"),
        ("train", "../images/train/cats/missing.png,cats", "missing.png does not exist"),
        # train's labels make the classes: an unknown one can only turn up in the others
        ("val", "../images/val/cats/0.jpg,birds", "the label 'birds' is not one of the classes"),
    ],
)
def test_a_bad_line_of_a_list_is_named(compose, images, tmp_path, split, line, says):
    lists = tmp_path / "data" / "lists"
    write_lists(images, lists)
    rows = (lists / f"{split}.csv").read_text().splitlines()
    rows.insert(3, line)
    (lists / f"{split}.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(UserError, match=f"{lists / split}.csv, line 4: .*{says}") as error:
        list_data(compose).setup("fit")
    assert "\n" not in str(error.value)


def test_a_missing_list_and_a_class_count_mismatch_are_explained(compose, images, tmp_path):
    write_lists(images, tmp_path / "data" / "lists", splits=("train", "val"))
    with pytest.raises(UserError, match=r"test.csv does not exist.*data.lists"):
        list_data(compose).setup("fit")
    with pytest.raises(UserError, match="must name a list file for train and val"):
        list_data(compose, "data.lists.val=null").setup("fit")
    with pytest.raises(UserError, match=r"make 2 classes \(cats, dogs\) but data.num_classes=3"):
        list_data(compose, "data.lists.test=null", "data.num_classes=3").setup("fit")
    datamodule = list_data(compose, "data.lists.test=null")
    datamodule.setup("fit")
    assert len(datamodule.test_dataloader().dataset) == 8  # no test list: the val list is tested
