"""Smaller and faster ONNX variants of a verified fp32 export, and how far they may drift.

fp16: weights and arithmetic in half precision, float32 inputs and outputs kept
      (onnxruntime's float16 converter).
int8: static quantization in the QDQ format with per-channel int8 weights and uint8
      activations, calibrated on training images: the format onnxruntime recommends for CNNs.
A variant is accepted only when its top-1 prediction agrees with the fp32 model's on at
least `min_agreement` of the validation images.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)
VARIANTS = ("fp32", "fp16", "int8")


def session(path: Path, threads: int = 0):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3  # errors only
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def as_input(pixels: np.ndarray, input_dtype: str) -> np.ndarray:
    """(N, H, W, 3) uint8 -> the model's NCHW input: float32 in [0, 1], or uint8 as is."""
    x = pixels.transpose(0, 3, 1, 2)
    return x.astype(np.float32) * np.float32(1 / 255) if input_dtype == "float32" else np.ascontiguousarray(x)


def logits(sess, pixels: np.ndarray, input_dtype: str, batch: int = 64) -> np.ndarray:
    name = sess.get_inputs()[0].name
    out = [sess.run(None, {name: as_input(pixels[i : i + batch], input_dtype)})[0] for i in range(0, len(pixels), batch)]
    return np.concatenate(out).astype(np.float32)


def to_fp16(src: Path, dst: Path) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    _sort_nodes(model.graph)  # the converter appends its input casts after their users
    onnx.save(model, str(dst))


def _sort_nodes(graph) -> None:
    """Reorder graph.node topologically (stable), as the ONNX checker requires."""
    ready = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        rest = []
        for node in pending:
            if all(name in ready for name in node.input):
                ordered.append(node)
                ready.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):  # a cycle or a missing input: leave the rest for the checker to report
            ordered += rest
            break
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)


def to_int8(src: Path, dst: Path, calibration: np.ndarray, input_dtype: str) -> None:
    """Static QDQ quantization calibrated on `calibration` ((N, H, W, 3) uint8 training images)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    name = session(src).get_inputs()[0].name
    batches = [{name: as_input(calibration[i : i + 32], input_dtype)} for i in range(0, len(calibration), 32)]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(batches)

        def get_next(self):
            return next(self.it, None)

    prepared = dst.with_name(dst.name + ".pre.onnx")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:  # shape inference + graph optimisation first, as onnxruntime advises
                quant_pre_process(str(src), str(prepared))
                source = prepared
            except Exception as e:  # some graphs do not survive symbolic shape inference
                log.warning("quantization pre-processing skipped (%s)", str(e).splitlines()[0][:120])
                source = src
            quantize_static(str(source), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8)
    finally:
        prepared.unlink(missing_ok=True)


def agreement(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Fraction of rows whose argmax agrees."""
    return float((reference.argmax(1) == candidate.argmax(1)).mean()) if len(reference) else 1.0


def latency(path: Path, image_size: int, input_dtype: str, batch: int, budget_s: float = 0.5) -> float:
    """Median milliseconds per image at `batch` on this CPU (default onnxruntime threads)."""
    import time

    sess = session(path)
    pixels = np.random.default_rng(0).integers(0, 256, (batch, image_size, image_size, 3), dtype=np.uint8)
    x = as_input(pixels, input_dtype)
    name = sess.get_inputs()[0].name
    for _ in range(3):
        sess.run(None, {name: x})
    times, start = [], time.perf_counter()
    while time.perf_counter() - start < budget_s or len(times) < 5:
        t = time.perf_counter()
        sess.run(None, {name: x})
        times.append(time.perf_counter() - t)
    return 1000 * float(np.median(times)) / batch
