"""CIFAR-10 through torchvision, as uint8 arrays.

torchvision reads the official python format (cifar-10-batches-py/data_batch_1..5,
test_batch, batches.meta) and downloads it when asked. Its per-file MD5 check is turned off
here: it only recognises the official files, so it would reject a subset or a re-packed
copy that reads fine; a broken file still fails when it is read, with an error naming it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from toolkit import UserError

BATCHES = [f"data_batch_{i}" for i in range(1, 6)]


def load_cifar10(root: str, download: bool = True):
    """-> (class names, (train x (N, 32, 32, 3) uint8, y int64), (test x, y))."""
    from torchvision.datasets import CIFAR10

    class LocalCIFAR10(CIFAR10):
        train_list = [[name, None] for name in BATCHES]  # md5 None: existence check only
        test_list = [["test_batch", None]]
        meta = {**CIFAR10.meta, "md5": None}

    folder = Path(root) / CIFAR10.base_folder
    if not folder.is_dir() and not download:
        raise UserError(f"CIFAR-10 is not at '{folder}'; set data.download=true or copy it there")
    try:
        train = LocalCIFAR10(root, train=True, download=download)
        test = LocalCIFAR10(root, train=False, download=download)
    except (OSError, RuntimeError) as e:  # URLError is an OSError; torchvision raises RuntimeError
        if not folder.is_dir():
            raise UserError(
                f"could not download CIFAR-10 into '{root}' ({e}); copy cifar-10-batches-py there"
            ) from None
        raise UserError(f"CIFAR-10 at '{folder}' is incomplete or unreadable ({e})") from None
    except Exception as e:  # unpickling errors of a damaged batch file
        raise UserError(f"CIFAR-10 at '{folder}' is unreadable ({type(e).__name__}: {e})") from None
    as_arrays = lambda d: (np.asarray(d.data, dtype=np.uint8), np.asarray(d.targets, dtype=np.int64))  # noqa: E731
    return list(train.classes), as_arrays(train), as_arrays(test)
