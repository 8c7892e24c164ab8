"""Loading and running an ONNX classifier with onnxruntime: numpy only, never torch.

A model file is checked before it is loaded (external weights must stay inside its folder),
its Meta is read from the metadata (or stated by the user for models exported elsewhere),
and a requested CUDA device never falls back to the CPU silently.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from toolkit import UserError
from toolkit.core.meta import META_KEY, Meta

DEVICES = ("cpu", "cuda", "auto")


def check_external_data(path: Path) -> None:
    """Refuse a model whose external weight files lie outside its own folder (path traversal)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    base = path.parent.resolve()

    def tensors(graph):
        yield from graph.initializer
        for node in graph.node:
            for attr in node.attribute:
                yield from ([attr.t] if attr.HasField("t") else []) + list(attr.tensors)
                for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                    yield from tensors(sub)

    for t in tensors(model.graph):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            location = {e.key: e.value for e in t.external_data}.get("location", "")
            if not (base / location).resolve().is_relative_to(base):
                raise UserError(f"'{path}' keeps weights in '{location}', outside its folder; refusing to load it")


def validate_model(path: str | Path, device: str = "cpu") -> None:
    """Cheap checks before anything is started or overwritten: the file, its external data, the device."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"model file '{path}' does not exist")
    try:
        check_external_data(path)
    except UserError:
        raise
    except Exception as e:  # onnx's own decode errors
        raise UserError(f"'{path}' is not a loadable ONNX model ({str(e).splitlines()[0][:200]})") from None
    providers(device)


def foreign_meta(session, classes: list[str] | None, size: int | None, mean, std, resize: str) -> Meta:
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
    return Meta(arch="external", class_names=list(classes), image_size=int(size), resize=resize,
                mean=list(mean or [0.0] * 3), std=list(std or [1.0] * 3), input_dtype=dtype,
                normalize_in_graph=mean is None and std is None, input_name=session.get_inputs()[0].name,
                output_name=session.get_outputs()[0].name)


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
    CPU silently: if onnxruntime cannot use CUDA, that is an error.
    """

    def __init__(self, path: str | Path, threads: int = 0, fallback: dict | None = None, device: str = "cpu",
                 device_id: int = 0, checked: bool = False):
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise UserError(f"model file '{path}' does not exist")
        wanted = providers(device, device_id)
        try:
            if not checked:  # a worker loads a file the main process has already checked
                check_external_data(path)
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
        else:
            self.meta = foreign_meta(self.session, **(fallback or {"classes": None, "size": None, "mean": None,
                                                                  "std": None, "resize": "center_crop"}))
        self.input_name = self.session.get_inputs()[0].name
        self.path = path
        std = np.asarray(self.meta.std, np.float32)
        self.gain = (1 / (255 * std)).reshape(1, 3, 1, 1)
        self.shift = (-np.asarray(self.meta.mean, np.float32) / std).reshape(1, 3, 1, 1)

    def logits(self, pixels: np.ndarray) -> np.ndarray:
        """(B, H, W, 3) uint8 -> (B, classes) float32 logits."""
        x = pixels.transpose(0, 3, 1, 2)
        if self.meta.input_dtype == "uint8":
            x = np.ascontiguousarray(x)
        elif self.meta.normalize_in_graph:
            x = x.astype(np.float32) * np.float32(1 / 255)
        else:  # normalisation outside the graph: a model exported elsewhere
            x = x.astype(np.float32) * self.gain + self.shift
        return self.session.run(None, {self.input_name: x})[0]

    def probabilities(self, pixels: np.ndarray) -> np.ndarray:
        z = self.logits(pixels).astype(np.float64)
        z = np.exp(z - z.max(1, keepdims=True))
        return z / z.sum(1, keepdims=True)
