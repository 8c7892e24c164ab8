"""The Meta record: one versioned JSON object that travels with the weights.

It is stored in the safetensors header and in the ONNX metadata_props under the key
`toolkit_meta`, and it is everything a runtime needs to use the model: class names in
index order, the input contract (size, resize policy, mean/std, dtype, layout, whether
normalisation is inside the graph), the metrics at save time and the config hash.
JSON only: never str() and eval(). No torch here: predict reads it.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from toolkit import UserError, __version__

SCHEMA_VERSION = 1
META_KEY = "toolkit_meta"

# The input contract's defaults, written once: config, decoding, export and predict take them from here.
IMAGENET_MEAN = [0.485, 0.456, 0.406]  # per channel, on the [0, 1] scale
IMAGENET_STD = [0.229, 0.224, 0.225]
MAX_PIXELS = 89_478_485  # decompression-bomb cap, pixels per image (PIL's own default)


@dataclass
class Meta:
    arch: str  # registry name, or timm/<name>
    class_names: list[str]  # index order: logit i is class_names[i]
    image_size: int  # pixels; the model takes image_size x image_size
    resize: str  # center_crop | squash (see images.resize)
    mean: list[float]  # per channel, on the [0, 1] scale
    std: list[float]
    channels: int = 3  # RGB
    layout: str = "NCHW"
    input_dtype: str = "float32"  # float32: pixels / 255 in [0, 1]; uint8: raw pixels 0..255
    normalize_in_graph: bool = False  # True in exported ONNX files; False for training weights
    input_name: str = "input"
    output_name: str = "logits"
    metrics: dict = field(default_factory=dict)  # at save time, e.g. val_accuracy, val_count, epoch
    config_hash: str = ""
    toolkit_version: str = __version__
    schema: int = SCHEMA_VERSION
    extra: dict = field(default_factory=dict)  # export details: opset, variant, parity figures

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str = "the model file") -> "Meta":
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            raise UserError(f"{source} has a damaged toolkit metadata record (not JSON)") from None
        if not isinstance(data, dict):
            raise UserError(f"{source} has a damaged toolkit metadata record")
        schema = data.get("schema")
        if schema != SCHEMA_VERSION:
            raise UserError(
                f"{source} has metadata schema version {schema!r}; this toolkit ({__version__}) reads "
                f"version {SCHEMA_VERSION}: upgrade the toolkit or re-export the model"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.name not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        if missing:
            raise UserError(f"{source} has a metadata record without {', '.join(missing)}")
        return cls(**{k: v for k, v in data.items() if k in names})


def read_meta(path) -> Meta:
    """The Meta of an ONNX file, a safetensors file or a run directory, without loading weights or torch."""
    import struct
    from pathlib import Path

    from toolkit.core.checkpoint import weights_file

    path = Path(path)
    if path.is_dir():
        path = weights_file(path)  # a run directory without weights says why
    if not path.is_file():
        raise UserError(f"no model at '{path}'")
    if path.suffix.lower() == ".onnx":
        from toolkit.core.onnxfile import NotOnnx, OnnxFile

        try:  # the metadata alone, without the onnx package or loading any weight
            props = OnnxFile(path).metadata()
        except (NotOnnx, OSError) as e:
            raise UserError(f"'{path}' is not a readable ONNX file ({str(e).splitlines()[0][:100]})") from None
    else:
        try:
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))  # safetensors: 8-byte header length, then JSON
                if n > 100_000_000:
                    raise ValueError("header too long")
                props = json.loads(f.read(n)).get("__metadata__") or {}
        except (struct.error, ValueError, AttributeError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise UserError(f"'{path}' is not a readable safetensors file") from None
    if META_KEY not in props:
        raise UserError(f"'{path}' has no toolkit metadata")
    return Meta.from_json(props[META_KEY], f"'{path}'")
