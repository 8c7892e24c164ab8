"""The layout of an image-folder dataset: where training, validation and test images are.

    root/train/<class>/...   training images (or root/<class>/... when there is no train/)
    root/val/<class>/...     validation, also found as valid/ or validation/ (one of them)
    root/test/<class>/...    held out: never trained or validated on, when a validation folder
                             exists; the validation folder itself when it is the only other split

These split names are never class names. Shared by training and `toolkit preview`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from toolkit import UserError

VAL_NAMES = ("val", "valid", "validation")  # the names labelling tools and dataset hubs use, in order of preference
TEST_NAME = "test"
SPLIT_NAMES = ("train",) + VAL_NAMES + (TEST_NAME,)


@dataclass
class Layout:
    train: Path  # folder of class subfolders
    val: Path | None  # folder of class subfolders, or None: a split of train is used
    test: Path | None  # held-out folder, not used by training (None when absent or used as val)
    note: str  # one sentence saying where validation comes from, for the log


def find_layout(root: str | Path) -> Layout:
    """The split folders of `root`. Raises UserError when it is missing or names two validation folders."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"data.root '{root}' does not exist; point it at a folder of class subfolders")
    train = root / "train" if (root / "train").is_dir() else root
    vals = [root / n for n in VAL_NAMES if (root / n).is_dir()]
    if len(vals) > 1:
        raise UserError(f"'{root}' has {' and '.join(v.name + '/' for v in vals)}: keep one validation folder "
                        "(or rename the other), so it is clear which one is used")
    test = root / TEST_NAME if (root / TEST_NAME).is_dir() else None
    if vals:
        note = f"validation: {vals[0]}/"
        if test:
            note += f"; {test}/ is held out (never trained or validated on: `toolkit evaluate RUN {test}`)"
        return Layout(train, vals[0], test, note)
    if test:
        return Layout(train, test, None, f"validation: {test}/ (no {', '.join(n + '/' for n in VAL_NAMES)} "
                                         f"folder); it selects the best epoch, so its accuracy is not an untouched "
                                         "test figure")
    return Layout(train, None, None, f"validation: a seeded, stratified split of {train}/ (data.val_fraction; "
                                     f"no {', '.join(n + '/' for n in VAL_NAMES)} or {TEST_NAME}/ folder)")
