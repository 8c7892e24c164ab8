"""Export release weights to a verified, self-describing ONNX file (fp32, fp16 or int8).

A clean fp32 eval model is rebuilt from the safetensors file (whatever precision, process
count or torch.compile it was trained with), normalisation is put inside the graph, the
batch axis is dynamic, and the Meta record goes into metadata_props. Nothing is written
until the file passes: onnx.checker (full check), onnxruntime against torch on real
validation images at batch sizes 1, 7 and 64, and for fp16/int8 top-1 agreement with fp32
on the validation images. A report with versions, the input contract, parity, accuracy,
size, sha256 and CPU latency is written next to the model as <name>.json.

This file holds `export()`, the command: output checks, the order of the checks, the report, and
writing the files together. The ONNX mechanics it calls (tracing, metadata, parity) are in onnx.py,
the fp16 / int8 conversions in variants.py, the check images in check_data.py, the sidecars in card.py.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
from pathlib import Path

import numpy as np
import torch
from torch import nn

import toolkit.export.card as card
import toolkit.export.variants as variants
from toolkit import UserError, __version__
from toolkit.core.files import temp_path
from toolkit.core.lock import Lock, lock_path, remove_stale_temps
from toolkit.core.meta import Meta
from toolkit.core.progress import progress_bar
from toolkit.export.check_data import CheckData, check_data
from toolkit.export.onnx import (CHECK_BATCHES, MAX_OPSET, MIN_OPSET, ExportMismatch, embed_meta, exportable, parity,
                                 to_onnx)
from toolkit.train.weights import build_model, weights_path

log = logging.getLogger(__name__)


def default_output(checkpoint: str | Path, variant: str = "fp32") -> Path:
    """exported/<run name>.onnx (or <file stem>.onnx for another .safetensors), <name>.<variant>.onnx for fp16/int8."""
    w = weights_path(checkpoint)
    name = w.parent.name if w.name in ("best.safetensors", "last.safetensors") else w.stem
    return Path("exported") / (f"{name}.onnx" if variant == "fp32" else f"{name}.{variant}.onnx")


def _fill(pixels: np.ndarray, n: int) -> np.ndarray:
    """At least n images (a small folder is repeated) so every check batch size is exercised."""
    return pixels if len(pixels) >= n else np.concatenate([pixels] * (n // len(pixels) + 1))[:n]


def export(checkpoint: str | Path, output: str | Path | None = None, data_dir: str | None = None,
           input_dtype: str = "float32", variant: str = "fp32", min_agreement: float = 0.99, overwrite: bool = False,
           opset: int | None = None, model_version: int = 1) -> Path:
    """Export `checkpoint` (a .safetensors file or run directory) to a checked ONNX file; returns its path.

    Beside it: <name>.json (the export report), <name>.config.json (preprocessing in timm's pretrained_cfg
    vocabulary) and <name>.README.md (the model card). Raises UserError when any of them exists and not
    `overwrite`, or exists while <name>.onnx does not (then it is not an earlier export's file: never replaced),
    and ExportMismatch when a check fails (nothing is written then).
    """
    if variant not in variants.VARIANTS:
        raise UserError(f"unknown variant '{variant}'; choose one of {', '.join(variants.VARIANTS)}")
    if input_dtype not in ("float32", "uint8"):
        raise UserError(f"--input must be float32 or uint8; got '{input_dtype}'")
    if opset is not None and not MIN_OPSET <= opset <= MAX_OPSET:
        raise UserError(f"--opset must be between {MIN_OPSET} and {MAX_OPSET}; got {opset}")
    model, meta = build_model(checkpoint)
    out = Path(output) if output else default_output(checkpoint, variant)
    _check_output(out)
    with Lock(lock_path(out), f"output '{out}'"):  # one writer per output, for the whole export
        for name in (out.name, out.with_suffix(".json").name):  # what an export killed here left behind
            remove_stale_temps(out.parent, prefix=f".{name}.")
        existing = [p for p in [out, out.with_suffix(".json"), *card.sidecars(out)] if p.exists()]
        if existing and not out.exists():  # an export always leaves its model: without it these are someone's files
            raise UserError(f"'{existing[0]}' exists and was not written by an export of '{out.name}' (that model is "
                            "not beside it), so it is never replaced, even with --overwrite; choose another -o")
        if existing and not overwrite:
            raise UserError(f"'{existing[0]}' already exists; --overwrite replaces it (and the files beside it), "
                            "or choose another -o")
        command = card.export_command(checkpoint, out, data_dir, input_dtype, variant, min_agreement, opset,
                                      model_version)
        try:
            return _export(checkpoint, out, model, meta, data_dir, input_dtype, variant, min_agreement, opset,
                           model_version, command)
        except OSError as e:  # a full disk, a folder that became unwritable: one line, and no other exporter
            raise UserError(f"cannot write '{e.filename or out}' ({e.strerror or e})") from None


def _check_output(out: Path) -> None:
    """Refuse an output that cannot work before any work is done; create its folder."""
    if out.is_dir():
        raise UserError(f"output '{out}' is a folder; give a file name such as '{out / 'model.onnx'}'")
    if out.suffix.lower() != ".onnx":
        raise UserError(f"output '{out}' must end in .onnx (its report is written beside it as .json)")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the output folder '{out.parent}' ({e.strerror or e})") from None
    for p in [out.with_suffix(".json"), *card.sidecars(out)]:
        if p.is_dir():
            raise UserError(f"'{p}' is a folder; the export writes a file there")


def _export(checkpoint, out: Path, model: nn.Module, meta: Meta, data_dir, input_dtype: str, variant: str,
            min_agreement: float, opset: int | None, model_version: int, command: str) -> Path:
    meta.normalize_in_graph, meta.input_dtype = True, input_dtype
    module = exportable(model, meta, input_dtype)
    bar = progress_bar(4 if variant == "fp32" else 5, f"export {variant}: trace, check, " +
                       ("" if variant == "fp32" else f"{variant}, ") + "report")
    data = check_data(checkpoint, data_dir, meta)
    bar.update()
    tmp32 = out.with_name(f".{out.name}.fp32-{os.getpid()}.onnx")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}.onnx")
    report_tmp = temp_path(out.with_suffix(".json"))
    try:
        to_onnx(module, meta, tmp32, input_dtype, opset)
        bar.update()
        fp32 = variants.session(tmp32)
        check = parity(module, fp32, _fill(data.val, max(CHECK_BATCHES)), input_dtype)
        log.info("onnxruntime vs torch on real images, batches %s: max logit difference %.2e (allowed %.1e), "
                 "top-1 agreement %.2f%%", CHECK_BATCHES, check["max_logit_diff"], check["tolerance"],
                 100 * check["top1_agreement"])
        if check["max_logit_diff"] > check["tolerance"] or check["top1_agreement"] < 1.0:
            raise ExportMismatch(f"the ONNX model disagrees with torch (max logit difference {check['max_logit_diff']:.2e}, "
                                 f"allowed {check['tolerance']:.1e}; top-1 agreement "
                                 f"{100 * check['top1_agreement']:.2f}%); nothing was written")
        with torch.no_grad():
            torch_logits = torch.cat([module(torch.from_numpy(variants.as_input(data.val[i : i + 64], input_dtype)))
                                      for i in range(0, len(data.val), 64)]).numpy()
        fp32_logits = variants.logits(fp32, data.val, input_dtype)
        final_logits, drift = fp32_logits, {}
        bar.update()
        if variant == "fp32":
            os.replace(tmp32, tmp)
        else:
            verified: dict = {}
            if variant == "fp16":  # range-checked on the fp32 graph, then run where fp16 is really computed if possible
                verified = variants.to_fp16(tmp32, tmp, np.concatenate([data.val, data.calibration]), input_dtype)
                candidate = variants.session(tmp, provider=variants.fp16_provider())
            else:
                variants.to_int8(tmp32, tmp, data.calibration, input_dtype)
                candidate = variants.session(tmp)
            final_logits = variants.logits(candidate, data.val, input_dtype)
            if not np.isfinite(final_logits).all():
                raise ExportMismatch(f"the {variant} model gives NaN or Inf logits on real images (an activation "
                                     f"beyond the {variant} range?); nothing was written")
            drift = _drift(fp32, candidate, fp32_logits, final_logits, data.val, input_dtype)
            provider = candidate.get_providers()[0]
            verified["provider"] = provider
            if variant == "fp16":
                verified["method"] = ("fp16 kernels of the CUDA provider" if provider == "CUDAExecutionProvider" else
                                      "range check of every fp32 tensor on the check images (the CPU provider "
                                      "computes fp16 through fp32 casts, so it cannot see an overflow)")
            drift["verified_by"] = meta.extra["verified_by"] = verified
            log.info("%s vs fp32 on %d validation images: top-1 agreement %.2f%% (required %.2f%%)", variant,
                     len(data.val), 100 * drift["top1_agreement"], 100 * min_agreement)
            if drift["top1_agreement"] < min_agreement:
                accuracy = ""
                if data.labels is not None:  # what the user weighs: how much accuracy the smaller model gives up
                    accuracy = (f"; its accuracy is {100 * _accuracy(final_logits, data.labels):.2f}% against fp32's "
                                f"{100 * _accuracy(fp32_logits, data.labels):.2f}% on these labelled images")
                raise ExportMismatch(f"the {variant} model agrees with fp32 on only {100 * drift['top1_agreement']:.2f}% "
                                     f"of {len(data.val)} validation images (required {100 * min_agreement:.2f}%, "
                                     f"--min-agreement){accuracy}; nothing was written")
            bar.update()
        meta.extra.update(variant=variant, parity={k: check[k] for k in ("max_logit_diff", "top1_agreement")},
                          exporter=f"torch {torch.__version__}")
        opset = embed_meta(tmp, meta, model_version)
        report = _report(tmp, out, meta, opset, check, drift, data, torch_logits, final_logits, input_dtype,
                         checkpoint)
        # the model and the files describing it must never disagree, whenever a crash comes: the new report is
        # complete before the old files go; between the renames the new model stands with fewer files beside it
        report_path = out.with_suffix(".json")
        with open(report_tmp, "w") as f:
            f.write(json.dumps(report, indent=1))
            f.flush()
            os.fsync(f.fileno())
        for old in [report_path, *card.sidecars(out)]:
            old.unlink(missing_ok=True)
        os.replace(tmp, out)
        os.replace(report_tmp, report_path)
    finally:
        for t in (tmp32, tmp, report_tmp):
            t.unlink(missing_ok=True)
    sidecars = card.write_sidecars(out, meta, report, command, weights_path(checkpoint))
    bar.update()
    bar.close()
    log.info("wrote %s (%.1f KB, %s) and %s", out, out.stat().st_size / 1024, variant,
             ", ".join(str(p) for p in [report_path, *sidecars]))
    return out


def _accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(1) == labels).mean()) if len(labels) else 0.0


def _drift(fp32, candidate, fp32_logits: np.ndarray, got: np.ndarray, pixels: np.ndarray, input_dtype: str) -> dict:
    """Variant vs fp32: top-1 agreement on all validation images, and at each check batch size."""
    sample, name = _fill(pixels, max(CHECK_BATCHES)), fp32.get_inputs()[0].name
    per_batch = {}
    for b in CHECK_BATCHES:
        x = variants.as_input(sample[:b], input_dtype)
        per_batch[str(b)] = variants.agreement(fp32.run(None, {name: x})[0], candidate.run(None, {name: x})[0])
    return {"top1_agreement": min([variants.agreement(fp32_logits, got)] + list(per_batch.values())),
            "per_batch": per_batch, "max_logit_diff": float(np.abs(fp32_logits - got).max()) if len(got) else 0.0}


def _report(model: Path, out: Path, meta: Meta, opset: int, check: dict, drift: dict, data: CheckData,
            torch_logits: np.ndarray, onnx_logits: np.ndarray, input_dtype: str, checkpoint) -> dict:
    """The export report of the file `model`, which will be renamed to `out`."""
    import onnx
    import onnxruntime as ort

    def accuracy(logits):
        return _accuracy(logits, data.labels) if data.labels is not None else None

    report = {
        "model": str(out), "variant": meta.extra["variant"], "checkpoint": str(weights_path(checkpoint)),
        "versions": {"toolkit": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
                     "onnxruntime": ort.__version__, "python": platform.python_version()},
        "opset": opset,
        "input": {"name": meta.input_name, "dtype": input_dtype, "layout": meta.layout,
                  "shape": ["batch", 3, meta.image_size, meta.image_size],
                  "range": "0..1 (pixels / 255)" if input_dtype == "float32" else "0..255",
                  "resize": meta.resize, "interpolation": meta.interpolation, "mean": meta.mean, "std": meta.std,
                  "normalize_in_graph": True,
                  "channel_order": "RGB"},
        "classes": meta.class_names,
        "parity_vs_torch": check,
        "variant_vs_fp32": drift or None,
        "validation": {"images": len(data.val), "source": data.source, "torch_accuracy": accuracy(torch_logits),
                       "onnx_accuracy": accuracy(onnx_logits)},
        "file": {"bytes": model.stat().st_size, "sha256": hashlib.sha256(model.read_bytes()).hexdigest()},
        "latency_ms_per_image": {f"batch_{b}": round(variants.latency(model, meta.image_size, input_dtype, b), 4)
                                 for b in (1, 64)},
        "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "metrics_at_save": meta.metrics,
        "run_figures": card.figures_of(meta, weights_path(checkpoint)),  # best (chosen on validation), last, test
    }
    return report
