"""Deployment end to end: real checkpoints exported by the real exporters, run by onnxruntime and
torch.jit, compared with the checkpoint's own model fed by the data modules' own preprocessing."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import run_cli
from hydra.utils import instantiate
from PIL import Image
from test_folder_data import write_images

from trainlab.engine import checkpoint
from trainlab.engine.config import check_command_line
from trainlab.engine.deploy import from_checkpoint
from trainlab.engine.errors import UserError
from trainlab.export import export
from trainlab.predict import classify, load_model, predict, read_images
from trainlab.train import train

TOLERANCE = {"atol": 1e-5, "rtol": 1e-5}
KINDS = ("ckpt", "onnx", "pt")


def compose_config(config: str, *overrides: str):
    """Hydra composition for module-scoped fixtures (conftest's `compose` is per test)."""
    from hydra import initialize_config_dir

    from trainlab.engine.config import CONF_DIR, compose_with_parameters

    with initialize_config_dir(str(CONF_DIR), version_base="1.3", job_name="test"):
        return compose_with_parameters(config, list(overrides))


def train_and_export(root: Path, *overrides: str) -> SimpleNamespace:
    train_cfg = compose_config(
        "train",
        f"paths.data_dir={root / 'data'}",
        f"paths.log_dir={root / 'logs'}",
        "logger=csv",
        "test=false",
        *overrides,
    )
    train(train_cfg, root / "run")
    ckpt = root / "run" / "checkpoints" / "best.ckpt"
    files = {"ckpt": ckpt}
    for fmt, name in (("onnx", "exported.onnx"), ("torchscript", "exported.pt")):
        files[Path(name).suffix[1:]] = export(
            compose_config("export", f"ckpt_path={ckpt}", f"format={fmt}", f"output={root / name}")
        )
    return SimpleNamespace(root=root, cfg=train_cfg, **files)


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> SimpleNamespace:
    """The default MLP on the bundled digits, two epochs."""
    return train_and_export(tmp_path_factory.mktemp("digits"), "trainer.max_epochs=2")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> SimpleNamespace:
    """The CNN on RGB image folders (PNG and JPEG files of assorted sizes), resized to 16x16."""
    root = tmp_path_factory.mktemp("folder")
    write_images(root / "data" / "images", {"train": 12, "val": 4, "test": 4})
    return train_and_export(
        root,
        "data=image_folder",
        "model=cnn",
        "data.input_shape=[3,16,16]",
        "data.batch_size=8",
        "data.num_workers=0",
        "trainer.max_epochs=3",
    )


def checkpoint_model(path: Path):
    return checkpoint.build_model(checkpoint.read(path)).eval()


def test_exported_digits_model_equals_the_checkpoint(digits):
    datamodule = instantiate(digits.cfg.data)
    datamodule.setup("test")
    images, labels = datamodule.splits["test"].tensors
    model = checkpoint_model(digits.ckpt)
    for size in (7, 1):  # the exporters traced a batch of 2
        x = images[:size]
        with torch.no_grad():  # the data module's normalisation, then the LightningModule
            expected = model(datamodule.on_after_batch_transfer((x, labels[:size]), 0)[0])
        for kind in ("onnx", "pt"):
            got = load_model(getattr(digits, kind)).run(x.numpy())
            torch.testing.assert_close(torch.from_numpy(got), expected, **TOLERANCE)


def test_exported_folder_model_reads_images_as_the_validation_loader_does(folder):
    datamodule = instantiate(folder.cfg.data)
    datamodule.setup("fit")
    val = datamodule.splits["val"]
    files = [Path(path) for path, _ in val.samples]
    model = checkpoint_model(folder.ckpt)
    with torch.no_grad():  # decoded, resized and normalised by the training pipeline
        expected = model(torch.stack([val[i][0] for i in range(len(val))]))
    for kind in ("onnx", "pt"):
        exported = load_model(getattr(folder, kind))
        got = exported.run(read_images(files, exported.meta))
        torch.testing.assert_close(torch.from_numpy(got), expected, **TOLERANCE)


def test_metadata_round_trips_in_both_formats(digits, folder):
    import onnx

    for run, expected in (
        (digits, {"input_shape": [1, 8, 8], "channels": "L", "resize": [8, 8]}),
        (folder, {"input_shape": [3, 16, 16], "channels": "RGB", "resize": [16, 16]}),
    ):
        _, meta = from_checkpoint(run.ckpt)
        props = {p.key: p.value for p in onnx.load(str(run.onnx)).metadata_props}
        extra = {"trainlab.json": ""}
        with warnings.catch_warnings():  # torch.jit is deprecated, but still reads its files
            warnings.simplefilter("ignore", FutureWarning)
            torch.jit.load(str(run.pt), _extra_files=extra)
        assert json.loads(props["trainlab.json"]) == json.loads(extra["trainlab.json"]) == meta
        assert {key: meta[key] for key in expected} == expected and meta["output"] == "logits"
    assert from_checkpoint(digits.ckpt)[1]["classes"] == [str(i) for i in range(10)]
    assert from_checkpoint(digits.ckpt)[1]["mean"] == pytest.approx([0.3053])
    _, meta = from_checkpoint(folder.ckpt)
    assert meta["classes"] == ["cats", "dogs"]  # the class folders' names, from the checkpoint
    assert meta["mean"] == meta["std"] == [0.5, 0.5, 0.5]


def write_digit_pngs(folder: Path, count: int = 12) -> tuple[list[Path], torch.Tensor, list[int]]:
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.from_numpy((data.images[:count] * (255 / 16)).round().astype(np.uint8))
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i, pixels in enumerate(images):
        files.append(folder / f"{i:02d}.png")
        Image.fromarray(pixels.numpy(), mode="L").save(files[-1])
    return files, images[:, None], [int(t) for t in data.target[:count]]


def predict_with(compose, model: Path, inputs, output: Path) -> list[dict]:
    listed = f"[{','.join(str(p) for p in inputs)}]" if isinstance(inputs, list) else inputs
    rows, written = predict(
        compose(f"model_path={model}", f"inputs={listed}", f"output={output}", config="predict"),
        output.parent,
    )
    assert written == output
    return rows


def test_predict_on_digit_pngs_agrees_with_every_kind_and_the_data_module(
    digits, compose, tmp_path
):
    files, images, labels = write_digit_pngs(tmp_path / "pngs")
    rows = {
        kind: predict_with(compose, getattr(digits, kind), files, tmp_path / f"{kind}.csv")
        for kind in KINDS
    }
    assert [r["class"] for r in rows["ckpt"]] == [r["class"] for r in rows["onnx"]]
    assert [r["class"] for r in rows["ckpt"]] == [r["class"] for r in rows["pt"]]
    for kind in ("onnx", "pt"):
        assert [r["probability"] for r in rows[kind]] == pytest.approx(
            [r["probability"] for r in rows["ckpt"]], abs=1e-5
        )
    datamodule = instantiate(digits.cfg.data)
    with torch.no_grad():
        logits = checkpoint_model(digits.ckpt)(
            datamodule.on_after_batch_transfer((images, 0), 0)[0]
        )
    probs = logits.softmax(dim=1)
    assert [r["class"] for r in rows["ckpt"]] == [str(int(i)) for i in probs.argmax(dim=1)]
    assert [r["probability"] for r in rows["ckpt"]] == pytest.approx(
        probs.max(dim=1).values.tolist(), abs=1e-5
    )
    assert np.mean([r["class"] == str(t) for r, t in zip(rows["ckpt"], labels, strict=True)]) > 0.7
    with open(tmp_path / "onnx.csv", newline="") as f:
        written = list(csv.DictReader(f))
    assert [(r["file"], r["class"]) for r in written] == [
        (str(p), r["class"]) for p, r in zip(files, rows["onnx"], strict=True)
    ]


def test_predict_on_a_folder_of_images_names_their_classes(folder, compose, tmp_path):
    test_dir = folder.root / "data" / "images" / "test"
    rows = {
        kind: predict_with(compose, getattr(folder, kind), str(test_dir), tmp_path / f"{kind}.json")
        for kind in KINDS
    }
    assert len(rows["ckpt"]) == 8  # the folder's four cats and four dogs, JPEG and PNG
    for kind in ("onnx", "pt"):
        assert [r["class"] for r in rows[kind]] == [r["class"] for r in rows["ckpt"]]
    assert json.loads((tmp_path / "onnx.json").read_text()) == rows["onnx"]
    right = [Path(r["file"]).parent.name == r["class"] for r in rows["ckpt"]]
    assert sum(right) >= 6  # bright dogs and dark cats, after three epochs


def test_a_one_logit_net_is_a_binary_classifier(digits, compose, tmp_path):
    # A checkpoint whose net ends in one output: the MLP with its last layer cut to one row.
    ckpt = torch.load(digits.ckpt, map_location="cpu", weights_only=True)
    ckpt["trainlab"]["config"]["model"]["net"]["num_classes"] = 1
    for name in ("net.7.weight", "net.7.bias"):
        ckpt["state_dict"][name] = ckpt["state_dict"][name][:1].clone()
    one_logit = tmp_path / "one_logit.ckpt"
    torch.save(ckpt, one_logit)
    pt = export(compose(f"ckpt_path={one_logit}", "format=torchscript", config="export"))
    assert pt == tmp_path / "model.pt"  # beside the checkpoint by default
    files, images, _ = write_digit_pngs(tmp_path / "pngs")
    model, meta = from_checkpoint(one_logit)
    assert meta["output"] == "binary_logit" and meta["classes"] == ["0", "1"]
    with torch.no_grad():
        logits = model(images)[:, 0]
    rows = predict_with(compose, pt, files, tmp_path / "binary.csv")
    assert [r["class"] for r in rows] == ["1" if z > 0 else "0" for z in logits]
    assert [r["probability"] for r in rows] == pytest.approx(
        [float(torch.sigmoid(z.abs())) for z in logits], abs=1e-6
    )


def test_classify_softmax_and_sigmoid():
    logits = classify(
        np.array([[0.0, 2.0], [1000.0, 0.0]]), {"output": "logits", "classes": ["a", "b"]}
    )
    assert logits == [("b", pytest.approx(1 / (1 + np.exp(-2)))), ("a", 1.0)]
    binary = classify(
        np.array([[2.0], [-1.0], [0.0], [-1000.0]]),
        {"output": "binary_logit", "classes": ["no", "yes"]},
    )
    assert binary == [
        ("yes", pytest.approx(1 / (1 + np.exp(-2)))),
        ("no", pytest.approx(1 / (1 + np.exp(-1)))),
        ("no", 0.5),  # above 0.5 only is "yes"
        ("no", 1.0),
    ]


def _corrupt_files(root: Path, digits) -> dict[str, Path]:
    import onnx
    from onnx import TensorProto, helper

    files = {
        "garbage.onnx": b"\x00not a model" * 50,
        "truncated.onnx": digits.onnx.read_bytes()[:3000],
        "truncated.pt": digits.pt.read_bytes()[:3000],
        "model.h5": b"whatever",
        "notes.png": b"this is not a png",
    }
    for name, data in files.items():
        (root / name).write_bytes(data)
    # a well-formed ONNX model that trainlab did not write: it records no preprocessing
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "plain",
        [helper.make_tensor_value_info("x", TensorProto.UINT8, [None, 1, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.UINT8, [None, 1, 8, 8])],
    )
    model = helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 21)])
    onnx.save(model, root / "plain.onnx")
    (root / "empty").mkdir()
    return {name: root / name for name in [*files, "plain.onnx", "empty"]}


def test_bad_predict_inputs_get_one_paragraph_each(digits, compose, tmp_path):
    bad = _corrupt_files(tmp_path, digits)
    good_png = write_digit_pngs(tmp_path / "pngs", count=1)[0][0]
    cases = [
        (digits.onnx, tmp_path / "missing.png", "the input .*missing.png does not exist"),
        (digits.onnx, bad["empty"], "holds no image files"),
        (digits.onnx, bad["notes.png"], "cannot read the image .*notes.png"),
        (bad["model.h5"], good_png, "no kind of model that predict knows"),
        (tmp_path / "absent.onnx", good_png, "absent.onnx does not exist"),
        (tmp_path / "absent.ckpt", good_png, "absent.ckpt does not exist"),
        (bad["garbage.onnx"], good_png, "onnx model .*garbage.onnx cannot be read"),
        (bad["truncated.onnx"], good_png, "onnx model .*truncated.onnx cannot be read"),
        (bad["truncated.pt"], good_png, "torchscript model .*truncated.pt cannot be read"),
        (bad["plain.onnx"], good_png, "not written by trainlab.export"),
    ]
    for model, inputs, message in cases:
        with pytest.raises(UserError, match=message):
            predict_with(compose, model, [inputs], tmp_path / "out.csv")
    with pytest.raises(UserError, match="batch_size must be a positive integer"):
        predict(
            compose(f"model_path={digits.onnx}", "inputs=[]", "batch_size=0", config="predict"),
            tmp_path,
        )


def test_bad_export_requests(digits, compose, tmp_path):
    with pytest.raises(UserError, match="format must be one of onnx, torchscript"):
        export(compose(f"ckpt_path={digits.ckpt}", "format=tflite", config="export"))
    with pytest.raises(UserError, match=r"must end in \.onnx"):
        export(compose(f"ckpt_path={digits.ckpt}", f"output={tmp_path / 'm.pt'}", config="export"))
    with pytest.raises(UserError, match="nope.ckpt does not exist"):
        export(compose(f"ckpt_path={tmp_path / 'nope.ckpt'}", config="export"))
    with pytest.raises(UserError, match="Did you mean 'model_path'"):
        check_command_line("predict", ["model_pth=x.onnx", "inputs=[a.png]"])


def test_predict_command_line(folder, tmp_path):
    test_dir = folder.root / "data" / "images" / "test"
    result = run_cli(
        "trainlab.predict", f"model_path={folder.onnx}", f"inputs={test_dir}", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (written,) = (tmp_path / "logs" / "predict" / "runs").glob("*/predictions.csv")
    with open(written, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8
    assert result.stdout.splitlines()[0].split() == ["file", "class", "probability"]
    table = [line.split() for line in result.stdout.splitlines()[1:9]]  # one line per file
    assert table == [[r["file"], r["class"], f"{float(r['probability']):.4f}"] for r in rows]

    bad = tmp_path / "broken.onnx"
    bad.write_bytes(folder.onnx.read_bytes()[:2000])
    result = run_cli("trainlab.predict", f"model_path={bad}", f"inputs={test_dir}", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().startswith(f"error: the onnx model {bad} cannot be read")
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


@pytest.mark.slow  # a child process that imports torch and Lightning: ~5 s alone
def test_export_command_line(digits, tmp_path):
    result = run_cli(
        "trainlab.export", f"ckpt_path={digits.ckpt}", "format=torchscript", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    written = digits.ckpt.parent / "model.pt"  # beside the checkpoint
    assert f"torchscript model written to {written}" in result.stdout
    x = np.zeros((3, 1, 8, 8), dtype=np.uint8)
    np.testing.assert_allclose(load_model(written).run(x), load_model(digits.pt).run(x), atol=1e-6)


def test_help_and_onnx_predictions_without_torch(digits, tmp_path):
    result = run_cli("trainlab.export", "--help", cwd=tmp_path)
    assert result.returncode == 0 and "ckpt_path" in result.stdout
    # --help imports the entry points only; an ONNX model runs on onnxruntime alone
    probe = (
        "import sys, numpy, trainlab.export, trainlab.predict; "
        f"model = trainlab.predict.load_model({str(digits.onnx)!r}); "
        "model.run(numpy.zeros((2, 1, 8, 8), numpy.uint8)); "
        "print(sorted({'torch', 'lightning'} & set(sys.modules)))"
    )
    assert subprocess.check_output([sys.executable, "-c", probe], text=True).strip() == "[]"
