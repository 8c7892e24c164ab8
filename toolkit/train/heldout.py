"""The untouched test figure: the released weights on the test set that training never saw.

The test set is a test/ folder beside a validation folder, or, without one, `data.test_fraction` of the
training images (imagefolder.held_out: seeded, per class, by a keyed hash of each path). Validation
selects the best epoch, so its accuracy is optimistic for new pictures; the test set is evaluated once,
at the end, with the released best weights (the file export and predict use), through the shared
preprocessing. The result goes to <run>/test.json; a held-out part of the training folder is also
listed in <run>/test_files.txt, so `toolkit evaluate MODEL DIR --files <run>/test_files.txt` measures
an exported model on exactly those files.
"""

from __future__ import annotations

import logging
import shlex
from pathlib import Path

import torch

from toolkit.config import Config
from toolkit.core import folders, images
from toolkit.core.files import write_atomic
from toolkit.core.metrics import TEST_FILES, TEST_RECORD

log = logging.getLogger(__name__)


def test_accuracy(run_dir: Path, cfg: Config, ds, device) -> dict | None:
    """{'test_accuracy', 'test_count', 'unreadable', 'epoch', 'test_source', 'test_dir', 'command'} of
    <run>/best.safetensors on the dataset's test set (`ds.test`), written to <run>/test.json; None when
    there is no test set or no released weights. `epoch` is the best weights' epoch."""
    import json

    from toolkit.train.batches import Normalize
    from toolkit.train.weights import build_model

    best = run_dir / "best.safetensors"
    if ds.test is None or not len(ds.test) or not best.is_file():
        return None
    model, meta = build_model(best)
    model.to(device).eval()
    norm = Normalize(meta.mean, meta.std).to(device)
    d = cfg.data
    workers = max(1, d.num_workers) if d.num_workers >= 0 else None
    correct, count, pos = 0, 0, 0
    with torch.no_grad():  # streamed in batches: a test set of any size, decoded once, never cached
        prep = images.Preprocess.of(meta, d.max_image_pixels)
        for batch in images.decode_batches("", ds.test.files, prep, 256, workers):
            labels = ds.test.labels[pos : pos + len(batch.paths)][torch.from_numpy(batch.ok)]
            pos += len(batch.paths)
            if len(labels):
                x = torch.from_numpy(batch.pixels).permute(0, 3, 1, 2).to(device)
                correct += int((model(norm(x)).argmax(1).cpu() == labels).sum())
                count += len(labels)
    command = ["toolkit", "evaluate", "MODEL", str(ds.test_dir)]
    if d.test_fraction:  # the held-out part of the training folder, as a list `toolkit evaluate --files` reads
        folders.write_file_list(run_dir / TEST_FILES, folders.relpaths(ds.test.files, ds.test_dir))
        command += ["--files", str(run_dir / TEST_FILES)]
    result = {"test_accuracy": correct / max(1, count), "test_count": count, "unreadable": len(ds.test) - count,
              "epoch": meta.metrics.get("epoch"), "test_source": ds.test_source, "test_dir": ds.test_dir,
              "command": shlex.join(command)}
    write_atomic(run_dir / TEST_RECORD, json.dumps(result) + "\n")
    return result
