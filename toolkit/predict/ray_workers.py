"""What runs inside the Ray workers of the Ray engine (predict/engine_ray.py drives them).

On the CPU one actor decodes, predicts and writes whole chunks; on a GPU, `decode_chunks` tasks decode
on the CPUs and hand packed pixels to the GPU actors. Either way a chunk's rows come from the one row
builder (predict/table.py) and are written whole as the chunk's part file (predict/dataset.py).
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
from pathlib import Path

import numpy as np

import toolkit.predict.dataset as dataset
import toolkit.predict.table as table
from toolkit import UserError
from toolkit.core import images
from toolkit.predict.runtime import OnnxClassifier
from toolkit.predict.storage import Location


def _model_dir(files: dict[str, bytes], sha256: str) -> Path:
    """The model's files on this node, written once per model (whole: renamed into place)."""
    folder = Path(tempfile.gettempdir()) / "toolkit-ray-models" / sha256[:16]
    for name, data in files.items():
        if not (folder / name).is_file():  # another actor of this node may have written it already
            Location(str(folder / name)).write_bytes(data)
    return folder


class ChunkPredictor:
    """A Ray actor: (decodes,) predicts and writes whole chunks; returns each chunk's row count."""

    def __init__(self, model_files: dict[str, bytes], model_name: str, sha256: str, fallback: dict | None, outputs: str,
                 device: str, threads: int, source: Location, parts: Location, topk: int, batch_size: int,
                 max_pixels: int):
        for where, what in ((source, "input folder"), (parts, "output folder")):
            if not where.url and not os.path.isdir(str(where)):
                raise UserError(f"the {what} '{where}' is not on Ray node {socket.gethostname()}; on a cluster, "
                                "use a URL (s3://...) or a folder that every node mounts at the same path")
        path = _model_dir(model_files, sha256) / model_name
        self.clf = OnnxClassifier(path, threads, fallback, device, checked=True, outputs=outputs)
        self.source, self.parts, self.topk = source, parts, topk
        self.batch_size, self.max_pixels = batch_size, max_pixels

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        meta, rows_written = self.clf.meta, []
        for i, chunk in enumerate(batch["chunk"]):
            if "pixels" in batch:  # decoded by a decode task
                decoded = [_unpack(batch, i, meta.image_size)]
            else:
                paths = [os.fsdecode(p) for p in batch["paths"][i]]
                prep = images.Preprocess.of(meta, self.max_pixels)
                decoded = (self.source.decode(sub, prep) for sub in images.chunked(paths, self.batch_size))
            rows = []
            for b in decoded:
                probs = self.clf.probabilities(b.pixels) if len(b.pixels) else np.zeros((0, meta.num_classes))
                rows += table.rows_for(b.paths, b.reasons(), probs, meta.class_names, self.topk)
            self.parts.child(dataset.part_name(int(chunk))).write_bytes(dataset.encode_part(rows, self.topk))
            rows_written.append(len(rows))
        return {"chunk": np.asarray(batch["chunk"]), "rows": np.asarray(rows_written)}


def decode_chunks(batch: dict[str, np.ndarray], source: Location, prep: images.Preprocess) -> dict[str, np.ndarray]:
    """A Ray task (GPU runs): decode whole chunks into packed uint8 pixels for the GPU actors."""
    out = {"chunk": [], "paths": [], "pixels": [], "ok": [], "errors": []}
    for chunk, paths in zip(batch["chunk"], batch["paths"]):
        b = source.decode([os.fsdecode(p) for p in paths], prep)
        out["chunk"].append(chunk)
        out["paths"].append(list(paths))
        out["pixels"].append(b.pixels.tobytes())  # (k, prep.size, prep.size, 3) uint8, k = ok.sum()
        out["ok"].append(b.ok.tobytes())
        out["errors"].append(json.dumps({str(k): v for k, v in b.errors.items()}))
    return {k: _column(v) for k, v in out.items()}


def _column(values: list) -> np.ndarray:
    """A 1-D column, also of lists or bytes (np.asarray would make equal-length lists a 2-D array)."""
    col = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        col[i] = v
    return col


def _unpack(batch: dict, i: int, size: int) -> images.Batch:
    ok = np.frombuffer(batch["ok"][i], dtype=bool)
    pixels = np.frombuffer(batch["pixels"][i], dtype=np.uint8).reshape(int(ok.sum()), size, size, 3)
    errors = {int(k): v for k, v in json.loads(batch["errors"][i]).items()}
    return images.Batch([os.fsdecode(p) for p in batch["paths"][i]], pixels, ok, errors)
