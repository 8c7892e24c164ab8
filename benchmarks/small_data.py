"""Small real data, side by side on the same split: `toolkit train DIR` (the recipe chosen from the data),
an RBF SVM on raw pixels with a small grid search (scikit-learn), and the literal PyTorch tutorial pipeline.

Data (no download):
  digits   scikit-learn's 1,797 handwritten digits (8x8, shipped inside scikit-learn), its classic
           50/50 split (first half train, second half test, as in scikit-learn's own example), written
           as PNG class folders: DIR/train/<digit>/, DIR/test/<digit>/
  --data   any folder with train/<class>/ and val/ (or valid/, validation/, test/) <class>/, e.g. the
           ants/bees photos of the PyTorch transfer-learning tutorial (245 train, 153 val)

Every figure is on the held-out folder; whole-process wall times include Python start-up, imports,
decoding and (for the toolkit) the run report. The toolkit's figure is its best epoch, chosen on that
same folder (there is no other); its last epoch is printed beside it.

    python benchmarks/small_data.py                         # digits
    python benchmarks/small_data.py --data DIR --svm-size 32
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
HELD_OUT = ("val", "valid", "validation", "test")


def write_digits(out: Path) -> Path:
    """scikit-learn's digits as 8x8 grey PNGs: out/train (first 898), out/test (last 899)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    n = len(d.images) // 2  # sklearn's example: train_test_split(test_size=0.5, shuffle=False)
    for split, sl in (("train", slice(0, n)), ("test", slice(n, None))):
        for i, (img, t) in enumerate(zip(d.images[sl], d.target[sl])):
            folder = out / split / str(t)
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.round(img * 255 / 16).astype(np.uint8), "L").save(folder / f"{i:04d}.png")
    return out


def held_out(data: Path) -> Path:
    return next(data / n for n in HELD_OUT if (data / n).is_dir())


def timed(cmd: list[str], env: dict | None = None) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start, proc


def toolkit(data: Path, work: Path, overrides: list[str]) -> dict:
    cmd = [sys.executable, "-m", "toolkit", "train", str(data), f"train.out_dir={work / 'runs'}",
           "train.progress=false", *overrides]
    seconds, proc = timed(cmd, {"TOOLKIT_CACHE_DIR": str(work / "cache")})
    run = Path(proc.stdout.strip().splitlines()[-1])
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    best = max(recs, key=lambda r: r["val_accuracy"])
    return {"seconds": seconds, "best": best["val_accuracy"], "best_epoch": best["epoch"],
            "last": recs[-1]["val_accuracy"], "epochs": recs[-1]["epoch"], "run": run,
            "recipe": [line[len("recipe: "):] for line in proc.stderr.splitlines() if line.startswith("recipe: ")]}


def export_and_evaluate(run: Path, data: Path, work: Path) -> float:
    onnx = work / f"{run.name}.onnx"
    timed([sys.executable, "-m", "toolkit", "export", str(run), "-o", str(onnx), "--data", str(held_out(data))])
    _, proc = timed([sys.executable, "-m", "toolkit", "evaluate", str(onnx), str(held_out(data)), "--json"])
    return json.loads(proc.stdout)["accuracy"]


def svm_here(data: str, size: int, grey: bool) -> dict:
    """Grid-searched RBF SVM on raw pixels (5-fold CV on train), scored on the held-out folder."""
    from sklearn.model_selection import GridSearchCV
    from sklearn.svm import SVC

    from toolkit.core import folders, images

    def load(folder: Path):
        found = folders.find_labelled(folder)
        prep = images.Preprocess(size, "center_crop")
        x = np.stack([images.load(folder / p, prep) for p in found.paths]).astype(np.float32) / 255
        x = x.mean(3) if grey else x
        return x.reshape(len(x), -1), np.array([found.classes[i] for i in found.labels])

    start = time.perf_counter()
    xtr, ytr = load(Path(data) / "train")
    xte, yte = load(held_out(Path(data)))
    d = xtr.shape[1]  # pixels in [0, 1]; scikit-learn's digits example: gamma 0.001 on 0..16 = 0.256 / 64 here
    grid = {"C": [1, 3, 10, 30, 100], "gamma": ["scale", 4 / d, 16 / d, 64 / d]}
    search = GridSearchCV(SVC(kernel="rbf"), grid, cv=5, n_jobs=-1).fit(xtr, ytr)
    return {"accuracy": float((search.predict(xte) == yte).mean()), "train_s": time.perf_counter() - start,
            "params": {k: round(v, 5) if isinstance(v, float) else v for k, v in search.best_params_.items()}}


def svm(data: Path, size: int, grey: bool) -> dict:
    code = (f"import sys, json; sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); import small_data as s; "
            f"print(json.dumps(s.svm_here({str(data)!r}, {size}, {grey})))")
    seconds, proc = timed([sys.executable, "-c", code])
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "seconds": seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, help="a folder with train/ and val/ (default: write scikit-learn's digits)")
    p.add_argument("--svm-size", type=int, default=0, help="SVM input side in px (default: 8 for digits, else 32)")
    p.add_argument("--tutorial-epochs", type=int, default=2, help="the tutorial trains 2 epochs")
    p.add_argument("--skip-export", action="store_true", help="do not export and evaluate the ONNX file")
    p.add_argument("overrides", nargs="*", help="key=value for `toolkit train DIR`")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="small_data-"))
    data = args.data or write_digits(work / "digits")
    grey = args.data is None
    size = args.svm_size or (8 if grey else 32)
    n_train = sum(1 for f in (data / "train").rglob("*") if f.is_file())
    n_test = sum(1 for f in held_out(data).rglob("*") if f.is_file())
    print(f"## {data.name}: {n_train} train / {n_test} held-out images ({held_out(data).name}/)\n", flush=True)

    tk = toolkit(data, work, args.overrides)
    for line in tk["recipe"]:
        print(f"  recipe: {line}")
    onnx = None if args.skip_export else export_and_evaluate(tk["run"], data, work)
    sv = svm(data, size, grey)
    tut_s, proc = timed([sys.executable, str(ROOT / "benchmarks/tutorial_pipeline.py"), str(data), "--epochs",
                         str(args.tutorial_epochs)])
    tut = json.loads(proc.stdout.strip().splitlines()[-1])

    print(f"\n{'':34} {'accuracy':>9} {'wall s':>8}  details")
    print(f"{'toolkit train DIR':34} {100 * tk['best']:8.2f}% {tk['seconds']:8.1f}  best epoch {tk['best_epoch']} of "
          f"{tk['epochs']} (chosen on {held_out(data).name}/), last epoch {100 * tk['last']:.2f}%"
          + ("" if onnx is None else f"; exported ONNX evaluated: {100 * onnx:.2f}%"))
    print(f"{'RBF SVM, raw pixels, grid search':34} {100 * sv['accuracy']:8.2f}% {sv['seconds']:8.1f}  "
          f"{size}x{size} {'grey' if grey else 'RGB'}, C={sv['params']['C']}, gamma={sv['params']['gamma']}, "
          "5-fold CV on train")
    print(f"{'tutorial pipeline':34} {100 * tut['accuracy']:8.2f}% {tut_s:8.1f}  {tut['epochs']} epochs, batch 4, "
          "32x32")
    print(f"\n(work files in {work})")


if __name__ == "__main__":
    main()
