"""Export a checkpoint for deployment: `python -m trainlab.export ckpt_path=<file> [format=onnx]`.

The exported model takes uint8 images [N, C, H, W], already resized, normalises them inside its
graph, and returns logits (or one binary logit) for any batch size. Its file records the
preprocessing as JSON (ONNX metadata_props, TorchScript extra file `trainlab.json`): input
shape, channel mode, resize size, mean, std, class names and the kind of output. The file is
checked against the checkpoint before `export` reports success.

ONNX is the default: onnxruntime runs its graph without torch and without running code from the
file, so anyone can run it safely. A TorchScript file is a program (it may hold any code, see
docs/trust.md): `predict` reads one only with trust_model_file=true.
"""

from __future__ import annotations

# ruff: noqa: E402
# The stop handler first of all, then the imports (see trainlab.engine.stopping).
from trainlab.engine import stopping

if __name__ == "__main__":
    stopping.install()

import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from trainlab.engine import cli
from trainlab.engine.config import CONF_DIR
from trainlab.engine.errors import UserError, exit_on_user_error
from trainlab.engine.model_files import METADATA_KEY, load_exported

FORMATS = {"onnx": "model.onnx", "torchscript": "model.pt"}  # and the default file names
TOLERANCE = 1e-5


def export(cfg: DictConfig) -> Path:
    """Write the checkpoint at cfg.ckpt_path as cfg.format; return the file's path."""
    if cfg.format not in FORMATS:
        raise UserError(f"format must be one of {', '.join(FORMATS)}, but it is {cfg.format!r}.")
    default = FORMATS[cfg.format]
    path = Path(cfg.output or Path(cfg.ckpt_path).parent / default)
    if path.suffix != Path(default).suffix:  # predict tells the kinds of model by suffix
        raise UserError(
            f"output={path}: a {cfg.format} model's file name must end in {Path(default).suffix}."
        )
    import torch

    from trainlab.engine.deploy import from_checkpoint

    model, meta = from_checkpoint(cfg.ckpt_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    example = torch.randint(0, 256, (2, *meta["input_shape"]), dtype=torch.uint8)
    tmp = path.with_name(f".{path.name}.tmp")  # renamed into place once whole and checked
    try:
        write = _write_onnx if cfg.format == "onnx" else _write_torchscript
        write(model, meta, example, tmp)
        _check(model, tmp, cfg.format, meta)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _write_onnx(model, meta: dict[str, Any], example, path: Path) -> None:
    import torch

    for name in ("onnxscript", "onnx_ir"):  # their graph passes report each step at INFO
        logging.getLogger(name).setLevel(logging.WARNING)
    program = torch.onnx.export(
        model,
        (example,),
        dynamo=True,
        input_names=["images"],
        output_names=["logits"],
        dynamic_shapes={"images": {0: torch.export.Dim("batch")}},
        verbose=False,
    )
    program.model.metadata_props[METADATA_KEY] = json.dumps(meta)
    program.save(str(path), external_data=False)  # one file, weights inside


def _write_torchscript(model, meta: dict[str, Any], example, path: Path) -> None:
    import torch

    with warnings.catch_warnings():  # TorchScript is deprecated in torch, but asked for here
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.trace(model, example)
        torch.jit.save(traced, str(path), _extra_files={METADATA_KEY: json.dumps(meta)})


def _check(model, path: Path, fmt: str, meta: dict[str, Any]) -> None:
    """Run the written file on a batch of another size than the traced one, with the predictor
    that `predict` uses, and compare its outputs with the checkpoint's."""
    import numpy as np
    import torch

    images = torch.randint(0, 256, (5, *meta["input_shape"]), dtype=torch.uint8)
    with torch.no_grad():
        expected = model(images).numpy()
    got = load_exported(path, fmt, trust=True).run(images.numpy())  # the file just written
    if got.shape != expected.shape:
        raise RuntimeError(
            f"the exported {fmt} model gives {got.shape} outputs, not {expected.shape}"
        )
    if not np.allclose(got, expected, rtol=0, atol=TOLERANCE):
        difference = np.abs(got - expected).max()
        raise RuntimeError(
            f"the exported {fmt} model's outputs differ from the checkpoint's by up to "
            f"{difference:.3g}"
        )


@hydra.main(config_path=str(CONF_DIR), config_name="export", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    with exit_on_user_error():
        path = export(cfg)
    print(f"{cfg.format} model written to {path}")
    if cfg.format == "torchscript":
        print(
            "A TorchScript file is a program: predict runs it only with trust_model_file=true "
            "(the default format, onnx, runs no code from the file)."
        )


def main() -> None:
    """Check and complete the command line (trainlab.engine.cli), then run Hydra."""
    cli.run("export", _hydra_main, sweeps=False)


if __name__ == "__main__":
    main()
