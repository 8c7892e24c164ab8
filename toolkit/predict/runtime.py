"""Loading and running an ONNX classifier with onnxruntime: numpy only, never torch.

A model file is checked before it is loaded (external weights must stay inside its folder),
its Meta is read from the metadata (or stated by the user for models exported elsewhere),
and a requested CUDA device never falls back to the CPU silently.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from toolkit import UserError
from toolkit.core import images
from toolkit.core.files import absent
from toolkit.core.meta import DEFAULT_INTERPOLATION, META_KEY, Meta
from toolkit.core.onnxfile import NotOnnx, OnnxFile

DEVICES = ("cpu", "cuda", "auto")
OUTPUTS = ("logits", "probabilities", "log-probabilities")  # what the model's output holds
LAST_OP_KIND = {"Softmax": "probabilities", "LogSoftmax": "log-probabilities", "Sigmoid": "probabilities"}
VALUE_PRESERVING = ("Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Cast", "CastLike")  # looked through


@dataclass
class GraphInfo:
    """What the graph itself says, read before any session starts."""

    input_shape: list  # e.g. ['batch', 3, 224, 224]; an int is a fixed size
    output_kind: str  # one of OUTPUTS, from the op that computes the first output

    @property
    def fixed_batch(self) -> int | None:
        b = self.input_shape[0] if self.input_shape else None
        return b if isinstance(b, int) and b > 0 else None


def output_kind(graph) -> str:
    """logits, probabilities or log-probabilities: from the op computing the graph's first output
    (Softmax and Sigmoid: probabilities; LogSoftmax: log-probabilities; anything else: logits),
    looking through ops that only reshape or cast."""
    producers = {out: node for node in graph.node for out in node.output}
    node = producers.get(graph.output[0].name)
    while node is not None and node.op_type in VALUE_PRESERVING and node.input:
        node = producers.get(node.input[0])
    return LAST_OP_KIND.get(node.op_type, "logits") if node is not None else "logits"


def read_graph(path: Path) -> GraphInfo:
    """Check the file's external data (see check_external_data) and read its input shape and output kind.
    Read by core.onnxfile, without the onnx package (the base install has none) and without loading weights."""
    model = OnnxFile(path)
    check_external_data(path, model)
    graph = model.graph()
    inputs = [i for i in graph.input if i.name not in graph.initializer_names]
    return GraphInfo(inputs[0].shape if inputs else [], output_kind(graph))


def external_data_files(path: Path, model: OnnxFile | None = None) -> list[str]:
    """Locations (relative to the model's folder) of the weight files an ONNX model keeps outside itself."""
    return (model or OnnxFile(path)).external_locations()


def check_external_data(path: Path, model: OnnxFile | None = None) -> None:
    """Refuse a model whose external weight files lie outside its own folder (path traversal)."""
    base = path.parent.resolve()
    for location in external_data_files(path, model):
        if not (base / location).resolve().is_relative_to(base):
            raise UserError(f"'{path}' keeps weights in '{location}', outside its folder; refusing to load it")


def validate_model(path: str | Path, device: str = "cpu") -> GraphInfo:
    """Cheap checks before anything is started or overwritten: the file, its external data, the device;
    -> what the graph says (input shape, output kind)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"model file '{path}' {absent(path, folder=False)}")
    try:
        info = read_graph(path)
    except UserError:
        raise
    except (NotOnnx, OSError) as e:  # not a model, or unreadable
        raise UserError(f"'{path}' is not a loadable ONNX model ({str(e).splitlines()[0][:200]})") from None
    providers(device)
    return info


def resolve_outputs(stated: str | None, detected: str) -> str:
    """The output kind to use: what the user states (--outputs), else what the graph shows."""
    if stated is None:
        return detected
    if stated not in OUTPUTS:
        raise UserError(f"--outputs must be one of {', '.join(OUTPUTS)}; got '{stated}'")
    if stated != detected:
        import logging

        logging.getLogger(__name__).warning("--outputs %s, but the graph's last op gives %s; using %s as stated",
                                            stated, detected, stated)
    return stated


def foreign_meta(session, classes: list[str] | None, size: int | None, mean, std, resize: str,
                 interpolation: str = DEFAULT_INTERPOLATION) -> Meta:
    """A Meta for an ONNX classifier exported elsewhere, from what the user states and the graph shows."""
    if not classes:
        raise UserError("this model has no toolkit metadata; pass --classes (and --size, --mean, --std if "
                        "normalisation is not inside the graph)")
    shape = session.get_inputs()[0].shape  # e.g. ['batch', 3, 224, 224]
    kind = session.get_inputs()[0].type
    if len(shape) != 4 or (isinstance(shape[1], int) and shape[1] != 3):
        raise UserError(f"the model's input has shape {shape}; predict feeds (batch, 3, height, width) RGB images")
    if kind not in ("tensor(float)", "tensor(uint8)"):
        raise UserError(f"the model's input is {kind}; predict feeds float32 or uint8 pixels")
    size = size or (shape[-1] if isinstance(shape[-1], int) else None)
    if not size:
        raise UserError("this model's input size is not fixed; pass --size")
    outputs_n = session.get_outputs()[0].shape[-1]
    if isinstance(outputs_n, int) and outputs_n != len(classes):
        raise UserError(f"--classes names {len(classes)} classes but the model has {outputs_n} outputs")
    dtype = "uint8" if session.get_inputs()[0].type == "tensor(uint8)" else "float32"
    meta = Meta(arch="external", class_names=list(classes), image_size=int(size), resize=resize,
                interpolation=interpolation,
                mean=list(mean or [0.0] * 3), std=list(std or [1.0] * 3), input_dtype=dtype,
                normalize_in_graph=mean is None and std is None, input_name=session.get_inputs()[0].name,
                output_name=session.get_outputs()[0].name)
    meta.validate("the model as described by --classes/--size/--mean/--std/--interpolation")
    return meta


def providers(device: str, device_id: int = 0) -> list:
    import onnxruntime as ort

    if device not in DEVICES:
        raise UserError(f"--device must be one of {', '.join(DEVICES)}; got '{device}'")
    has_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    if device == "cuda" and not has_cuda:
        raise UserError("--device cuda: this onnxruntime build has no CUDA support (pip install onnxruntime-gpu), "
                        "or use --device cpu")
    if device == "cpu" or not has_cuda:
        return ["CPUExecutionProvider"]
    return [("CUDAExecutionProvider", {"device_id": device_id}), "CPUExecutionProvider"]


class OnnxClassifier:
    """An ONNX classifier and its Meta: uint8 pixels in, probabilities out.

    `fallback` (classes, size, mean, std, resize) describes a model exported elsewhere; it is
    used only when the file carries no toolkit metadata. `device` cuda never falls back to the
    CPU silently: if onnxruntime cannot use CUDA, that is an error. `outputs` (one of OUTPUTS)
    says what the model's output holds; None: read from the graph (`checked` models must state it).
    A graph with a fixed batch size is fed batches of exactly that size (padded).
    """

    def __init__(self, path: str | Path, threads: int = 0, fallback: dict | None = None, device: str = "cpu",
                 device_id: int = 0, checked: bool = False, outputs: str | None = None):
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise UserError(f"model file '{path}' {absent(path, folder=False)}")
        wanted = providers(device, device_id)
        try:
            if not checked:  # a worker loads a file the main process has already checked
                outputs = resolve_outputs(outputs, read_graph(path).output_kind)
            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            options.log_severity_level = 3
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # idle threads yield the core
            self.session = ort.InferenceSession(str(path), options, providers=wanted)
        except UserError:
            raise
        except Exception as e:  # onnx and onnxruntime raise their own exception types
            raise UserError(f"'{path}' is not a loadable ONNX model ({str(e).splitlines()[0][:200]})") from None
        used = self.session.get_providers()[0]
        if device == "cuda" and used != "CUDAExecutionProvider":
            raise UserError("--device cuda: onnxruntime could not start CUDA (are the CUDA and cuDNN libraries "
                            "installed?); refusing to fall back to the CPU")
        self.device = "cuda" if used == "CUDAExecutionProvider" else "cpu"
        props = self.session.get_modelmeta().custom_metadata_map
        if META_KEY in props:
            self.meta = Meta.from_json(props[META_KEY], f"'{path}'")
            outputs = self.session.get_outputs()[0].shape
            self.meta.check_outputs(outputs[-1] if outputs else None, f"'{path}'")
        else:
            self.meta = foreign_meta(self.session, **(fallback or {"classes": None, "size": None, "mean": None,
                                                                  "std": None, "resize": "center_crop"}))
        self.input_name = self.session.get_inputs()[0].name
        self.path = path
        self.outputs = outputs or "logits"
        shape = self.session.get_inputs()[0].shape  # e.g. ['batch', 3, 224, 224]
        self.fixed_batch = shape[0] if shape and isinstance(shape[0], int) and shape[0] > 0 else None
        fixed_hw = [d for d in shape[2:] if isinstance(d, int)]
        if any(d != self.meta.image_size for d in fixed_hw):
            raise UserError(f"'{path}' takes images of {shape[2]}x{shape[3]} pixels but its metadata (or --size) "
                            f"says {self.meta.image_size}; pass --size {fixed_hw[0]}" if len(fixed_hw) == 2 else
                            f"'{path}' has input shape {shape}, which does not fit {self.meta.image_size}-pixel images")
        gain, shift = images.normalization(self.meta.mean, self.meta.std)
        self.gain, self.shift = gain.reshape(1, 3, 1, 1), shift.reshape(1, 3, 1, 1)

    def logits(self, pixels: np.ndarray) -> np.ndarray:
        """(B, H, W, 3) uint8 -> (B, classes) float32 logits."""
        x = pixels.transpose(0, 3, 1, 2)
        if self.meta.input_dtype == "uint8":
            x = np.ascontiguousarray(x)
        elif self.meta.normalize_in_graph:
            x = x.astype(np.float32) * np.float32(1 / 255)
        else:  # normalisation outside the graph: a model exported elsewhere
            x = x.astype(np.float32) * self.gain + self.shift
        return self.run(x)

    def run(self, x: np.ndarray) -> np.ndarray:
        """The model on input x (B, 3, H, W): in pieces of the graph's fixed batch size if it has one
        (the last piece padded with zeros); an error of the runtime becomes one UserError line."""
        b = self.fixed_batch
        try:
            if b is None or len(x) == b:
                return self.session.run(None, {self.input_name: x})[0]
            out = []
            for i in range(0, len(x), b):
                piece = x[i : i + b]
                if len(piece) < b:
                    piece = np.concatenate([piece, np.zeros((b - len(piece),) + piece.shape[1:], piece.dtype)])
                out.append(self.session.run(None, {self.input_name: piece})[0][: min(b, len(x) - i)])
            return np.concatenate(out) if out else np.zeros((0, self.meta.num_classes), np.float32)
        except Exception as e:  # onnxruntime's own exception types
            raise UserError(f"'{self.path}' failed on an input of shape {list(x.shape)} "
                            f"({' '.join(str(e).split())[:300]})") from None

    def probabilities(self, pixels: np.ndarray) -> np.ndarray:
        """(B, H, W, 3) uint8 -> (B, classes) float64 probabilities, by the model's output kind:
        softmax of logits, exp of log-probabilities, probabilities as they are (e.g. sigmoid scores)."""
        z = self.logits(pixels).astype(np.float64)
        if self.outputs == "probabilities":
            return z
        if self.outputs == "log-probabilities":
            return np.exp(z)
        z = np.exp(z - z.max(1, keepdims=True))
        return z / z.sum(1, keepdims=True)
