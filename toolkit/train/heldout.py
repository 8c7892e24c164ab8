"""The untouched test figure: the released weights on the test/ folder that training never saw.

A dataset with both a validation folder (val/, valid/, validation/) and test/ selects the best epoch on
validation, so validation accuracy is optimistic for new pictures; test/ is evaluated once, at the end,
with the released best weights (the file export and predict use), through the shared preprocessing.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from toolkit.config import Config
from toolkit.core import folders

log = logging.getLogger(__name__)


def test_accuracy(run_dir: Path, cfg: Config, classes: list[str], device) -> dict | None:
    """{'test_accuracy', 'test_count', 'test_dir'} of <run>/best.safetensors on the held-out test folder,
    written to <run>/test.json; None when the data has no untouched test folder."""
    from toolkit.train.cache import decode_cached
    from toolkit.train.data import Normalize
    from toolkit.train.weights import build_model

    if cfg.data.kind != "imagefolder" or not (run_dir / "best.safetensors").is_file():
        return None
    layout = folders.find_layout(cfg.data.root)
    if layout.test is None:
        return None
    found = folders.find_labelled(layout.test)
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted({found.classes[i] for i in found.labels} - set(index))
    if unknown:
        log.warning("test: classes the model does not know are left out: %s", ", ".join(unknown))
    keep = [(p, index[found.classes[i]]) for p, i in zip(found.paths, found.labels) if found.classes[i] in index]
    if not keep:
        return None
    x, ok = decode_cached([str(layout.test / p) for p, _ in keep], cfg.data)
    labels = torch.tensor([c for _, c in keep])[torch.from_numpy(ok)]
    x = torch.from_numpy(np.array(x[ok]))
    model, meta = build_model(run_dir / "best.safetensors")
    model.to(device)
    norm = Normalize(meta.mean, meta.std).to(device)
    correct = 0
    with torch.no_grad():
        for xs, ys in zip(x.split(256), labels.split(256)):
            correct += int((model(norm(xs.to(device))).argmax(1).cpu() == ys).sum())
    result = {"test_accuracy": correct / max(1, len(labels)), "test_count": len(labels), "test_dir": str(layout.test)}
    (run_dir / "test.json").write_text(json.dumps(result) + "\n")
    return result
