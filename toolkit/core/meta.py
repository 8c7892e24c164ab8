"""The Meta record: one versioned JSON object that travels with the weights.

It is stored in the safetensors header and in the ONNX metadata_props under the key
`toolkit_meta`, and it is everything a runtime needs to use the model: class names in
index order, the input contract (size, resize policy and filter, mean/std, dtype, layout, whether
normalisation is inside the graph), the metrics at save time and the config hash.
Preprocess is the decoding part of that contract as one object (from a Meta or a DataConfig).
JSON only: never str() and eval(). No torch here: predict reads it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field

from toolkit import UserError, __version__

SCHEMA_VERSION = 1
META_KEY = "toolkit_meta"
RESIZE_POLICIES = ("center_crop", "squash")  # see core.images.resize
INTERPOLATIONS = ("bilinear", "bicubic")  # resampling filters of the resize (PIL's, see core.images.FILTERS)
DEFAULT_INTERPOLATION = "bilinear"  # the filter of every model file written before the field existed
MAX_IMAGE_SIZE = 4096  # pixels per side; bounds what a model file (or a config) can make us allocate
MAX_CLASSES = 100_000
INPUT_DTYPES = ("float32", "uint8")


def short(value, limit: int = 60) -> str:
    """repr(value), cut to `limit` characters: error messages never echo a huge (or hostile) value."""
    import reprlib

    r = reprlib.Repr()
    r.maxstring = r.maxother = r.maxlong = limit
    try:
        text = r.repr(value)
    except ValueError:  # an int too long to print
        text = f"<{type(value).__name__} too long to show>"
    return text if len(text) <= limit else text[: limit - 3] + "..."

# The input contract's defaults, written once: config, decoding, export and predict take them from here.
IMAGENET_MEAN = [0.485, 0.456, 0.406]  # per channel, on the [0, 1] scale
IMAGENET_STD = [0.229, 0.224, 0.225]
MAX_PIXELS = 89_478_485  # decompression-bomb cap, pixels per image (PIL's own default)


@dataclass(frozen=True)
class Preprocess:
    """The decode settings: file -> (size, size, 3) uint8 RGB (core.images.load). One object, built from the
    training config (DataConfig.decoding) or from a model's Meta (Preprocess.of), passed whole to every decode
    function, hashed whole into the training decode cache's key: a new field reaches every caller and the key.
    Field order is the cache key's order (train/cache.py): add new fields at the end."""

    size: int  # pixels per side of the output
    resize: str = "center_crop"  # center_crop | squash (see images.resize)
    max_pixels: int = MAX_PIXELS  # refuse larger images before decoding their pixels (decompression bombs)
    interpolation: str = DEFAULT_INTERPOLATION  # bilinear | bicubic: the resize filter

    @classmethod
    def of(cls, meta: Meta, max_pixels: int = MAX_PIXELS) -> Preprocess:
        """The decoding a model file asks for (its input contract), with the caller's pixel cap."""
        return cls(meta.image_size, meta.resize, max_pixels, meta.interpolation)


@dataclass
class Meta:
    arch: str  # registry name, or timm/<name>
    class_names: list[str]  # index order: logit i is class_names[i]
    image_size: int  # pixels; the model takes image_size x image_size
    resize: str  # center_crop | squash (see images.resize)
    mean: list[float]  # per channel, on the [0, 1] scale
    std: list[float]
    interpolation: str = DEFAULT_INTERPOLATION  # bilinear | bicubic: the resize filter (absent in older files)
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
        meta = cls(**{k: v for k, v in data.items() if k in names})
        meta.validate(source)
        return meta

    def validate(self, source: str = "the model file") -> None:
        """Check every field's type and range; a file is data from anywhere, so nothing in it is trusted."""
        def bad(name: str, need: str):
            raise UserError(f"{source} has metadata field '{name}' = {short(getattr(self, name))}; it must be {need}")

        def number(v) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        for name in ("arch", "resize", "interpolation", "layout", "input_dtype", "input_name", "output_name",
                     "config_hash", "toolkit_version"):
            if not isinstance(getattr(self, name), str) or len(getattr(self, name)) > 1000:
                bad(name, "a short text")
        names = self.class_names
        if (not isinstance(names, list) or not 1 <= len(names) <= MAX_CLASSES
                or not all(isinstance(c, str) and len(c) <= 1000 for c in names)):
            bad("class_names", f"a list of 1 to {MAX_CLASSES} names")
        if len(set(names)) != len(names):
            bad("class_names", "a list of distinct names")
        if not isinstance(self.image_size, int) or isinstance(self.image_size, bool) or not (
                1 <= self.image_size <= MAX_IMAGE_SIZE):
            bad("image_size", f"a whole number of pixels from 1 to {MAX_IMAGE_SIZE}")
        if self.resize not in RESIZE_POLICIES:
            bad("resize", " or ".join(RESIZE_POLICIES))
        if self.interpolation not in INTERPOLATIONS:
            bad("interpolation", " or ".join(INTERPOLATIONS))
        if self.input_dtype not in INPUT_DTYPES:
            bad("input_dtype", " or ".join(INPUT_DTYPES))
        if self.channels != 3 or self.layout != "NCHW":
            bad("channels" if self.channels != 3 else "layout", "3 channels in NCHW layout")
        if not isinstance(self.mean, list) or len(self.mean) != 3 or not all(number(v) for v in self.mean):
            bad("mean", "three finite numbers")
        if not isinstance(self.std, list) or len(self.std) != 3 or not all(number(v) and v > 0 for v in self.std):
            bad("std", "three finite positive numbers")
        if not isinstance(self.normalize_in_graph, bool):
            bad("normalize_in_graph", "true or false")
        for name in ("metrics", "extra"):
            if not isinstance(getattr(self, name), dict):
                bad(name, "a mapping")

    def check_outputs(self, outputs, source: str = "the model file") -> None:
        """The graph's class axis (an int, or None when dynamic) must match the class names."""
        if isinstance(outputs, int) and outputs != self.num_classes:
            raise UserError(f"{source} names {self.num_classes} classes in its metadata but its graph has {outputs} "
                            "outputs; re-export the model")


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
            onnx_file = OnnxFile(path)
            props = onnx_file.metadata()
            outputs = onnx_file.graph().output
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
    meta = Meta.from_json(props[META_KEY], f"'{path}'")
    if path.suffix.lower() == ".onnx" and outputs and outputs[0].shape:
        meta.check_outputs(outputs[0].shape[-1], f"'{path}'")  # an int when fixed, a name when dynamic
    return meta
