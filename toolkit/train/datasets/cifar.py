"""CIFAR-10 in the official python format, read without running code from the files.

cifar-10-batches-py/ holds data_batch_1..5, test_batch and batches.meta: pickled dicts
whose keys are bytes in the published files (written by Python 2; the site's own recipe is
`pickle.load(f, encoding='bytes')`) and str in copies re-packed with Python 3. A pickle can
name any callable, so the files are read with a restricted unpickler that resolves only the
few numpy names an array needs (see ALLOWED): a file naming anything else is refused before
anything runs. The download (torchvision's helper) checks the archive's published md5.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from toolkit import UserError

BASE_FOLDER = "cifar-10-batches-py"
BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
ALLOWED = {  # (module, name) an array in a pickle needs, and nothing else
    ("numpy.core.multiarray", "_reconstruct"),  # numpy < 2 spelling (the published files)
    ("numpy._core.multiarray", "_reconstruct"),  # numpy >= 2 spelling
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),  # protocol-2 pickles written by Python 3 spell bytes as encode(str, 'latin1')
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in ALLOWED:
            raise pickle.UnpicklingError(f"it names '{module[:40]}.{name[:40]}', which a CIFAR file never needs")
        return super().find_class(module, name)


def read_pickle(path: Path) -> dict:
    """One CIFAR file -> dict with str keys (bytes keys decoded). Raises UserError naming the file."""
    try:
        with open(path, "rb") as f:
            obj = _RestrictedUnpickler(f, encoding="bytes").load()
    except OSError as e:
        raise UserError(f"CIFAR-10 file '{path}' cannot be read ({e.strerror or e})") from None
    except Exception as e:  # UnpicklingError, EOFError, ValueError ... from a damaged or hostile file
        raise UserError(f"CIFAR-10 file '{path}' is refused: {str(e)[:200] or type(e).__name__}") from None
    if not isinstance(obj, dict):
        raise UserError(f"CIFAR-10 file '{path}' does not hold a dict")
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}


def _text(v) -> str:
    return v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)


def _batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """-> ((N, 32, 32, 3) uint8, (N,) int64) from one batch file (rows of 3072 bytes: R, G, B planes)."""
    d = read_pickle(path)
    data, labels = d.get("data"), d.get("labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise UserError(f"CIFAR-10 file '{path}' has no uint8 'data' array of 3072-byte rows")
    if not isinstance(labels, list) or len(labels) != len(data) or not all(
            isinstance(v, int) and 0 <= v < 10 for v in labels):
        raise UserError(f"CIFAR-10 file '{path}' has no 'labels' list of {len(data)} class numbers 0..9")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), np.asarray(labels, dtype=np.int64)


def _download(root: str) -> None:
    from torchvision.datasets import CIFAR10
    from torchvision.datasets.utils import download_and_extract_archive

    try:
        download_and_extract_archive(CIFAR10.url, root, filename=CIFAR10.filename, md5=CIFAR10.tgz_md5)
    except (OSError, RuntimeError) as e:  # URLError is an OSError; a bad checksum a RuntimeError
        raise UserError(f"could not download CIFAR-10 into '{root}' ({e}); copy {BASE_FOLDER} there") from None


def load_cifar10(root: str, download: bool = True):
    """-> (class names, (train x (N, 32, 32, 3) uint8, y int64), (test x, y))."""
    folder = Path(root) / BASE_FOLDER
    if not folder.is_dir():
        if not download:
            raise UserError(f"CIFAR-10 is not at '{folder}'; set data.download=true or copy it there")
        _download(root)
    missing = [n for n in BATCHES + ["test_batch", "batches.meta"] if not (folder / n).is_file()]
    if missing:
        raise UserError(f"CIFAR-10 at '{folder}' is incomplete: {', '.join(missing)} missing")
    names = read_pickle(folder / "batches.meta").get("label_names")
    if not isinstance(names, list) or len(names) != 10:
        raise UserError(f"CIFAR-10 file '{folder / 'batches.meta'}' has no list of 10 'label_names'")
    train = [_batch(folder / n) for n in BATCHES]
    test = _batch(folder / "test_batch")
    xtr, ytr = np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train])
    return [_text(n) for n in names], (xtr, ytr), test
