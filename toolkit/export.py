"""Export release weights to a verified, self-describing ONNX file.

A clean fp32 eval model is rebuilt from the safetensors file (whatever precision or
wrapping it was trained with), normalisation is put inside the graph, the batch axis is
dynamic, and the Meta record goes into metadata_props. The file is written under a
temporary name, checked (onnx.checker, then onnxruntime against torch on real validation
images at batch sizes 1, 7 and 64) and only then renamed into place.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from toolkit import UserError, images
from toolkit.checkpoint import build_model, weights_path
from toolkit.data import Normalize
from toolkit.meta import META_KEY, Meta

log = logging.getLogger(__name__)
CHECK_BATCHES = (1, 7, 64)  # a batch of one, an odd size, a full batch: catches fixed-batch exports
LOGIT_RTOL = 1e-4  # fp32: max |logit difference| allowed, relative to max(1, largest |logit|)


class ExportMismatch(UserError):
    pass


def exportable(model: nn.Module, meta: Meta, input_dtype: str = "float32") -> nn.Module:
    """Normalisation + network: takes (B, 3, H, W) float32 in [0, 1] (or uint8 0..255), gives logits."""
    scale = 1.0 if input_dtype == "float32" else 1.0 / 255
    return nn.Sequential(Normalize(meta.mean, meta.std, scale=scale), model).eval()


def check_images(checkpoint: str | Path, data_dir: str | None, meta: Meta, n: int = max(CHECK_BATCHES)) -> np.ndarray:
    """(n, H, W, 3) uint8 real validation images for the numerical check."""
    if data_dir is None:
        data_dir = _validation_dir(checkpoint)
    if data_dir is not None:
        files = images.find_images(data_dir)
        picked, out = files[:: max(1, len(files) // n)], []
        for rel in picked:
            try:
                out.append(images.load(Path(data_dir) / rel, meta.image_size, meta.resize))
            except images.DecodeError:
                continue
            if len(out) == n:
                break
        if out:
            while len(out) < n:  # a small folder: reuse its images to fill the largest batch
                out += out[: n - len(out)]
            return np.stack(out)
    log.warning("no validation images found for the export check; checking on random pixels instead "
                "(pass --data DIR to check on real images)")
    return np.random.default_rng(0).integers(0, 256, (n, meta.image_size, meta.image_size, 3), dtype=np.uint8)


def _validation_dir(checkpoint: str | Path) -> str | None:
    """The run's validation folder, from the config.yaml next to the weights."""
    from toolkit.config import load_config

    config = weights_path(checkpoint).parent / "config.yaml"
    if not config.is_file():
        return None
    cfg = load_config(config)
    for candidate in (Path(cfg.data.root) / "val", Path(cfg.data.root) / "train", Path(cfg.data.root)):
        if candidate.is_dir() and cfg.data.kind != "cifar10":
            return str(candidate)
    return None


def to_onnx(module: nn.Module, meta: Meta, path: Path, input_dtype: str = "float32") -> None:
    """Trace `module` to ONNX at `path` with a dynamic batch axis."""
    dtype = torch.float32 if input_dtype == "float32" else torch.uint8
    example = torch.zeros(2, 3, meta.image_size, meta.image_size, dtype=dtype)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(
                module, (example,), None, dynamo=True, verbose=False, input_names=[meta.input_name],
                output_names=[meta.output_name], dynamic_shapes=({0: torch.export.Dim("batch")},),
            )
            program.save(str(path), external_data=False)
        except Exception as e:  # some third-party models only trace with the TorchScript exporter
            log.warning("dynamo export failed (%s); using the TorchScript exporter", str(e).splitlines()[0][:200])
            torch.onnx.export(module, (example,), str(path), dynamo=False, input_names=[meta.input_name],
                              output_names=[meta.output_name], opset_version=17,
                              dynamic_axes={meta.input_name: {0: "batch"}, meta.output_name: {0: "batch"}})


def embed_meta(path: Path, meta: Meta) -> int:
    """Write `meta` into the file's metadata_props, run the full checker; returns the opset."""
    import onnx

    model = onnx.load(str(path))
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    meta.extra["opset"] = opset
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, {META_KEY: meta.to_json()})
    model.producer_name = "toolkit"
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return opset


def compare(module: nn.Module, onnx_path: Path, pixels: np.ndarray, input_dtype: str) -> dict:
    """Run torch and onnxruntime on the same batches; max logit difference and top-1 agreement."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    x = pixels.transpose(0, 3, 1, 2)  # (N, 3, H, W) uint8
    x = x.astype(np.float32) / 255.0 if input_dtype == "float32" else np.ascontiguousarray(x)
    worst, agree, total, scale = 0.0, 0, 0, 1.0
    for b in CHECK_BATCHES:
        batch = x[:b]
        with torch.no_grad():
            ref = module(torch.from_numpy(batch)).numpy()
        got = sess.run(None, {name: batch})[0]
        if got.shape != ref.shape:
            raise ExportMismatch(f"ONNX output shape {got.shape} != torch {ref.shape} at batch {b}")
        worst = max(worst, float(np.abs(got - ref).max()))
        scale = max(scale, float(np.abs(ref).max()))
        agree += int((got.argmax(1) == ref.argmax(1)).sum())
        total += b
    return {"max_logit_diff": worst, "logit_scale": scale, "top1_agreement": agree / total,
            "batches": list(CHECK_BATCHES)}


def default_output(checkpoint: str | Path) -> Path:
    w = weights_path(checkpoint)
    name = w.parent.name if w.name in ("best.safetensors", "last.safetensors") else w.stem
    return Path("exported") / f"{name}.onnx"


def export(checkpoint: str | Path, output: str | Path | None = None, data_dir: str | None = None,
           input_dtype: str = "float32") -> Path:
    """Export `checkpoint` (a .safetensors file or run directory) to a checked ONNX file."""
    model, meta = build_model(checkpoint)
    out = Path(output) if output else default_output(checkpoint)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta.normalize_in_graph, meta.input_dtype = True, input_dtype
    module = exportable(model, meta, input_dtype)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        to_onnx(module, meta, tmp, input_dtype)
        pixels = check_images(checkpoint, data_dir, meta)
        parity = compare(module, tmp, pixels, input_dtype)
        tol = LOGIT_RTOL * parity["logit_scale"]
        log.info("onnxruntime vs torch on %d real images: max logit difference %.2e (allowed %.1e), top-1 "
                 "agreement %.2f%%", sum(CHECK_BATCHES), parity["max_logit_diff"], tol,
                 100 * parity["top1_agreement"])
        if parity["max_logit_diff"] > tol or parity["top1_agreement"] < 1.0:
            raise ExportMismatch(
                f"the ONNX model disagrees with torch (max logit difference {parity['max_logit_diff']:.2e}, "
                f"allowed {tol:.1e}; top-1 agreement {100 * parity['top1_agreement']:.2f}%); nothing was written"
            )
        meta.extra.update(parity={k: parity[k] for k in ("max_logit_diff", "top1_agreement")},
                          exporter=f"torch {torch.__version__}")
        embed_meta(tmp, meta)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("wrote %s (%.1f KB)", out, out.stat().st_size / 1024)
    return out
