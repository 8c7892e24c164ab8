"""Smaller and faster ONNX variants of a verified fp32 export, and how far they may drift.

fp16: weights and arithmetic in half precision, float32 inputs and outputs kept
      (onnxruntime's float16 converter). onnxruntime's CPU provider computes most fp16 ops
      through inserted casts in fp32, so it cannot see an overflow that fp16 kernels (GPUs)
      would turn into inf/NaN: every tensor of the fp32 graph is range-checked on the check
      images first, and nodes that touch values beyond fp16's range stay in fp32. The fp16
      file is then checked on a CUDA provider when one works here (real fp16 arithmetic).
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
FP16_MAX = 65504.0  # largest finite float16
FP16_HEADROOM = 2.0  # images beyond the check images may reach further: keep nodes in fp32 from FP16_MAX / 2


def session(path: Path, threads: int = 0, provider: str = "CPUExecutionProvider"):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3  # errors only
    return ort.InferenceSession(str(path), options, providers=[provider])


def fp16_provider() -> str:
    """CUDAExecutionProvider when onnxruntime can use it here (fp16 computed in fp16), else the CPU's."""
    import onnxruntime as ort

    return "CUDAExecutionProvider" if "CUDAExecutionProvider" in ort.get_available_providers() else "CPUExecutionProvider"


def as_input(pixels: np.ndarray, input_dtype: str) -> np.ndarray:
    """(N, H, W, 3) uint8 -> the model's NCHW input: float32 in [0, 1], or uint8 as is."""
    x = pixels.transpose(0, 3, 1, 2)
    return x.astype(np.float32) * np.float32(1 / 255) if input_dtype == "float32" else np.ascontiguousarray(x)


def logits(sess, pixels: np.ndarray, input_dtype: str, batch: int = 64) -> np.ndarray:
    name = sess.get_inputs()[0].name
    out = [sess.run(None, {name: as_input(pixels[i : i + batch], input_dtype)})[0] for i in range(0, len(pixels), batch)]
    return np.concatenate(out).astype(np.float32)


def activation_ranges(src: Path, pixels: np.ndarray, input_dtype: str, batch: int = 32) -> dict[str, float]:
    """max |x| of every float tensor of the fp32 graph at `src` (weights, and each node output over
    `pixels`, (N, H, W, 3) uint8): what fp16 would have to hold. Non-finite values count as inf."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(src))
    ranges = {t.name: float(np.abs(numpy_helper.to_array(t)).max(initial=0.0)) for t in model.graph.initializer
              if t.data_type == onnx.TensorProto.FLOAT}
    known = {o.name for o in model.graph.output}
    names = [o for node in model.graph.node for o in node.output if o and o not in known]
    model.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names)  # expose every intermediate tensor
    tmp = src.with_name(src.name + ".ranges.onnx")
    try:
        onnx.save(model, str(tmp))
        sess = session(tmp)
        outs = [o.name for o in sess.get_outputs()]
        name = sess.get_inputs()[0].name
        for i in range(0, len(pixels), batch):
            for out, value in zip(outs, sess.run(None, {name: as_input(pixels[i : i + batch], input_dtype)})):
                if value.dtype.kind == "f" and value.size:
                    a = np.abs(value.astype(np.float64))
                    ranges[out] = max(ranges.get(out, 0.0), float(a.max()) if np.isfinite(a).all() else float("inf"))
    finally:
        tmp.unlink(missing_ok=True)
    return ranges


def to_fp16(src: Path, dst: Path, pixels: np.ndarray, input_dtype: str) -> dict:
    """fp16 copy of the fp32 model at `src`; nodes reading or writing values beyond FP16_MAX / FP16_HEADROOM
    on `pixels` (the check images) stay in fp32. -> what the range check found (for the export report)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    ranges = activation_ranges(src, pixels, input_dtype)
    limit = FP16_MAX / FP16_HEADROOM
    model = onnx.load(str(src))
    kept = [n.name for n in model.graph.node if any(ranges.get(t, 0.0) > limit for t in (*n.input, *n.output))]
    if kept:
        log.warning("%d node(s) stay in fp32: their values reach %.3g on the check images, beyond fp16's range "
                    "(%g, with %gx headroom): %s", len(kept), max(ranges.values()), FP16_MAX, FP16_HEADROOM,
                    ", ".join(kept[:8]) + (", ..." if len(kept) > 8 else ""))
    model = convert_float_to_float16(model, keep_io_types=True, node_block_list=kept)
    if kept:
        _drop_cast_pairs(model.graph)
        del model.graph.value_info[:]  # the converter leaves fp16 records on tensors the kept nodes compute in fp32
    _sort_nodes(model.graph)  # the converter appends its input casts after their users
    onnx.save(model, str(dst))
    return {"max_abs_value": max(ranges.values(), default=0.0), "fp16_max": FP16_MAX, "headroom": FP16_HEADROOM,
            "images": len(pixels), "nodes_kept_fp32": kept}


def _drop_cast_pairs(graph) -> None:
    """Between two nodes kept in fp32 the converter still rounds the tensor to fp16 and back
    (Cast to fp16 -> Cast to fp32), where a value beyond fp16's range overflows all the same: the
    second node reads the fp32 tensor instead, and casts left without a reader are removed."""
    import onnx

    def to(node) -> int:
        return next((a.i for a in node.attribute if a.name == "to"), -1)

    producer = {out: node for node in graph.node for out in node.output}
    rename = {}
    for node in graph.node:
        src = producer.get(node.input[0]) if node.op_type == "Cast" and node.input else None
        if to(node) == onnx.TensorProto.FLOAT and src is not None and src.op_type == "Cast" \
                and to(src) == onnx.TensorProto.FLOAT16:
            rename[node.output[0]] = src.input[0]
    for node in graph.node:
        node.input[:] = [rename.get(name, name) for name in node.input]
    graph_outputs = {o.name for o in graph.output}
    while True:  # remove casts nobody reads any more
        read = {name for node in graph.node for name in node.input} | graph_outputs
        dead = [n for n in graph.node if n.op_type == "Cast" and not any(o in read for o in n.output)]
        if not dead:
            return
        for n in dead:
            graph.node.remove(n)


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
