"""Exported model files read back: ONNX on onnxruntime (torch is not imported), a checkpoint
with weights_only, and TorchScript only when the user trusts the file (a TorchScript file is a
program: docs/trust.md). predict reads them; export checks what it wrote with them."""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainlab.engine.errors import UserError

METADATA_KEY = "trainlab.json"
KINDS = {".ckpt": "checkpoint", ".onnx": "onnx", ".pt": "torchscript"}


@dataclass
class Model:
    """What `predict` needs of any kind of model: its recorded preprocessing, and a function
    from uint8 images [N, C, H, W] (numpy) to its outputs [N, classes] or [N, 1]."""

    meta: dict[str, Any]
    run: Callable[[Any], Any]


def load_model(path: str | Path, trust_model_file: bool = False) -> Model:
    """The model at `path`; a TorchScript file only if `trust_model_file` (it runs its code)."""
    path = Path(path)
    kind = KINDS.get(path.suffix.lower())
    if kind is None:
        raise UserError(
            f"model_path={path} is no kind of model that predict knows (by its suffix): give a "
            "checkpoint (.ckpt) or a model written by trainlab.export (.onnx or .pt)."
        )
    if kind == "checkpoint":
        import torch

        from trainlab.engine.deploy import from_checkpoint

        model, meta = from_checkpoint(path)  # reports a missing or unreadable file itself

        def run(images):
            with torch.no_grad():
                return model(torch.from_numpy(images)).numpy()

        return Model(meta, run)
    if not path.is_file():
        raise UserError(f"model {path} does not exist. Write one with python -m trainlab.export.")
    return load_exported(path, kind, trust=trust_model_file)


def load_exported(path: Path, kind: str, trust: bool = False) -> Model:
    """An ONNX or TorchScript file written by `trainlab.export`, whatever its name. A
    TorchScript file is refused unless `trust`: loading and running it runs its code."""
    if kind == "torchscript" and not trust:
        raise UserError(
            f"model_path={path} is a TorchScript file, which is a program: running it runs "
            "whatever code it holds, with your permissions (it can write any file), and "
            "predict does not read one unless you say that you trust it. If you wrote it "
            "(python -m trainlab.export format=torchscript) or trust whoever did, add "
            "trust_model_file=true. Otherwise use a model that cannot run code: the checkpoint "
            "it was exported from (model_path=<run dir>/checkpoints/best.ckpt) or its ONNX "
            "export (python -m trainlab.export ckpt_path=<that checkpoint> writes model.onnx)."
        )
    try:
        meta_text, run = _open_onnx(path) if kind == "onnx" else _open_torchscript(path)
    except Exception as e:  # truncated, random bytes, or another format altogether
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise UserError(
            f"the {kind} model {path} cannot be read ({reason}). It may be truncated or not "
            f"a {kind} file; export it again with python -m trainlab.export."
        ) from None
    if not meta_text:
        raise UserError(
            f"{path} records no preprocessing: it was not written by trainlab.export. Export "
            "the checkpoint with python -m trainlab.export ckpt_path=<file>."
        )
    return Model(json.loads(meta_text), run)


def _open_onnx(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: its warnings are about graph optimisations
    session = ort.InferenceSession(str(path), options, providers=ort.get_available_providers())
    name = session.get_inputs()[0].name
    meta_text = session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
    return meta_text, lambda images: session.run(None, {name: images})[0]


def _open_torchscript(path: Path):
    import torch

    extra = {METADATA_KEY: ""}
    with warnings.catch_warnings():  # TorchScript is deprecated in torch, but asked for here
        warnings.simplefilter("ignore", FutureWarning)
        module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)

    def run(images):
        with torch.no_grad():
            return module(torch.from_numpy(images)).numpy()

    return extra[METADATA_KEY], run
