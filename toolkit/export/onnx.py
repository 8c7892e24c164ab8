"""The ONNX mechanics of the export: the exportable module (normalisation inside the graph), tracing with a
dynamic batch axis, the Meta record in metadata_props, and the torch-vs-onnxruntime parity check.

`toolkit.export.release.export` puts them together into the checked file and its report.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

import toolkit.export.variants as variants
from toolkit import UserError, __version__
from toolkit.core.meta import META_KEY, Meta
from toolkit.train.batches import Normalize

log = logging.getLogger(__name__)
CHECK_BATCHES = (1, 7, 64)  # a batch of one, an odd size, a full batch: catches fixed-batch exports
LOGIT_RTOL = 1e-4  # fp32: max |logit difference| allowed, relative to max(1, largest |logit|)
MIN_OPSET, MAX_OPSET = 13, 23  # --opset range offered; below 18 the graph is converted down by the exporter


class ExportMismatch(UserError):
    """A check of the exported model failed (parity with torch, NaN/Inf logits, a variant's agreement)."""


def exportable(model: nn.Module, meta: Meta, input_dtype: str = "float32") -> nn.Module:
    """Normalisation + network: takes (B, 3, H, W) float32 in [0, 1] (or uint8 0..255), gives logits."""
    scale = 1.0 if input_dtype == "float32" else 1.0 / 255
    return nn.Sequential(Normalize(meta.mean, meta.std, scale=scale), model).eval()


def to_onnx(module: nn.Module, meta: Meta, path: Path, input_dtype: str = "float32", opset: int | None = None) -> None:
    """Trace `module` to ONNX at `path` with a dynamic batch axis; `opset` None = the exporter's default."""
    dtype = torch.float32 if input_dtype == "float32" else torch.uint8
    example = torch.zeros(2, 3, meta.image_size, meta.image_size, dtype=dtype)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:  # tracing only: writing the file is outside, so a disk error never looks like a tracing failure
            program = torch.onnx.export(
                module, (example,), None, dynamo=True, verbose=False, input_names=[meta.input_name], opset_version=opset,
                output_names=[meta.output_name], dynamic_shapes=({0: torch.export.Dim("batch")},),
            )
        except Exception as e:  # some third-party models only trace with the TorchScript exporter
            if _caused_by_os_error(e):
                raise
            log.warning("dynamo export failed (%s); using the TorchScript exporter", str(e).splitlines()[0][:200])
            torch.onnx.export(module, (example,), str(path), dynamo=False, input_names=[meta.input_name],
                              output_names=[meta.output_name], opset_version=opset or 17,
                              dynamic_axes={meta.input_name: {0: "batch"}, meta.output_name: {0: "batch"}})
            return
        program.save(str(path), external_data=False)


def _caused_by_os_error(e: BaseException) -> bool:
    while e is not None:
        if isinstance(e, OSError):
            return True
        e = e.__cause__ or e.__context__
    return False


def flat_metadata(meta: Meta) -> dict[str, str]:
    """The Meta's input contract as flat metadata keys (strings as they are, numbers and lists as JSON), for
    tools that show key/value pairs (Netron, other runtimes) and do not read the versioned record under META_KEY."""
    return {key: value if isinstance(value, str) else json.dumps(value) for key, value in {
        "class_names": meta.class_names, "num_classes": meta.num_classes, "image_size": meta.image_size,
        "input_size": [meta.channels, meta.image_size, meta.image_size], "resize": meta.resize,
        "interpolation": meta.interpolation, "mean": meta.mean,
        "std": meta.std, "input_dtype": meta.input_dtype, "layout": meta.layout,
        "normalize_in_graph": meta.normalize_in_graph, "architecture": meta.arch}.items()}


def embed_meta(path: Path, meta: Meta, model_version: int = 1) -> int:
    """Write `meta` (the versioned JSON and flat keys), a doc_string and model_version into the file; run the
    full checker; returns the opset."""
    import onnx

    model = onnx.load(str(path))
    meta.extra["opset"] = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, {META_KEY: meta.to_json(), **flat_metadata(meta)})
    model.producer_name, model.producer_version = "toolkit", __version__
    model.model_version = model_version
    model.doc_string = (f"{meta.arch} image classifier, {meta.num_classes} classes; input '{meta.input_name}' "
                        f"(batch, 3, {meta.image_size}, {meta.image_size}) {meta.input_dtype} RGB "
                        f"{'in [0, 1]' if meta.input_dtype == 'float32' else '0..255'}, {meta.resize} resize "
                        f"({meta.interpolation}), "
                        f"normalisation inside the graph; output '{meta.output_name}' (batch, {meta.num_classes}) "
                        f"logits. Classes and preprocessing: metadata keys {META_KEY} (versioned JSON), class_names, "
                        "mean, std, resize, interpolation, image_size.")
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return meta.extra["opset"]


def parity(module: nn.Module, sess, pixels: np.ndarray, input_dtype: str) -> dict:
    """torch vs onnxruntime on the same images at each of CHECK_BATCHES."""
    x = variants.as_input(pixels, input_dtype)
    worst, agree, total, scale = 0.0, 0, 0, 1.0
    for b in CHECK_BATCHES:
        with torch.no_grad():
            ref = module(torch.from_numpy(x[:b])).numpy()
        got = sess.run(None, {sess.get_inputs()[0].name: x[:b]})[0]
        if got.shape != ref.shape:
            raise ExportMismatch(f"ONNX output shape {got.shape} != torch {ref.shape} at batch {b}; nothing was written")
        for name, logits in (("torch", ref), ("the ONNX model", got)):  # max() would step over a NaN
            if not np.isfinite(logits).all():
                raise ExportMismatch(f"{name} gives NaN or Inf logits on real images at batch {b} (damaged weights "
                                     "or a zero std?); nothing was written")
        worst = max(worst, float(np.abs(got - ref).max()))
        scale = max(scale, float(np.abs(ref).max()))
        agree += int((got.argmax(1) == ref.argmax(1)).sum())
        total += len(ref)
    return {"batches": list(CHECK_BATCHES), "max_logit_diff": worst, "tolerance": LOGIT_RTOL * scale,
            "top1_agreement": agree / total}
