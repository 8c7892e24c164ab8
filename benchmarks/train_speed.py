"""Training speed, side by side with the classic tutorial pipeline, in one run.

1. Time to accuracy, whole process, cold cache: the tutorial pipeline (ImageFolder + ToTensor +
   Normalize + DataLoader, batch 4, SGD lr 0.001 momentum 0.9, one epoch; tutorial_pipeline.py)
   against `toolkit train` with the same network on the same folder, stopping once it reaches
   the tutorial's one-epoch accuracy minus half a point. Then the toolkit again with a warm
   cache, to show the second run decodes nothing.
2. Training images per second of the toolkit's cached path (the real training loop: uint8
   batches on the device, crop/flip/normalise there, accelerate's step) against compute only
   (random tensors already in memory, the same model, batch and optimizer), per model.

    python benchmarks/train_speed.py                      # generates 30,000 + 5,000 shapes PNGs
    python benchmarks/train_speed.py --data my_folder     # a folder with train/ and val/
    python benchmarks/train_speed.py --easy               # 40,000 + 2,000 jittered digit PNGs (see below)

--easy: an easy set for the tutorial's single epoch at batch 4 (10,000 small steps): scikit-learn's
1,797 handwritten digits, each drawn many times at 24x24 inside a 32x32 canvas, offset by up to 4 px from
the centre, with pixel noise (sd 4). The tutorial reaches about 99.3% in its epoch. The toolkit runs one
epoch of the same network: batch 64, no augmentation (one pass over 40,000 images needs none), a
one-cycle schedule to lr 0.05; it stops at the tutorial's accuracy minus half a point.

The tutorial pipeline runs twice: as it is usually run (OpenMP's default spin-waiting threads) and with
OMP_WAIT_POLICY=PASSIVE, which the `toolkit` command sets (see cpu_threads.py); the ratios against both
are printed. On 2 shared cores the second is much faster, so it is the stricter baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from toolkit.core.metrics import read_records

ROOT = Path(__file__).resolve().parents[1]


def run(cmd: list[str], env: dict | None = None) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    env = {k: v for k, v in {**os.environ, **(env or {})}.items() if v is not None}  # None: leave the variable out
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return seconds, proc


def toolkit_train(data: Path, out: Path, name: str, cache: Path, *overrides: str):
    cmd = [sys.executable, "-m", "toolkit", "train", "configs/quickstart.yaml", "data.kind=imagefolder",
           f"data.root={data}", f"train.out_dir={out}", f"name={name}", "train.progress=false", *overrides]
    seconds, proc = run(cmd, {"TOOLKIT_CACHE_DIR": str(cache)})
    run_dir = Path(proc.stdout.strip().splitlines()[-1])
    records = read_records(run_dir)
    decode_s = sum(float(s) for s in re.findall(r"decoded \d+ images in ([\d.]+) s", proc.stderr))
    return seconds, records, decode_s, proc.stderr


def compute_only(arch: str, batch: int) -> float:
    """compute_only_here() in a fresh process, like the training runs it is compared with."""
    code = f"import sys; sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); import train_speed as t; " \
           f"print(t.compute_only_here({arch!r}, {batch}))"
    _, proc = run([sys.executable, "-c", code])
    return float(proc.stdout.strip().splitlines()[-1])


def compute_only_here(arch: str, batch: int, seconds: float = 4.0) -> float:
    """Images/s of forward + backward + SGD step on random tensors already in memory."""
    import torch

    from toolkit.config import load_config
    from toolkit.train.models import create_model
    from toolkit.train.optim import build_optimizer

    cfg = load_config(ROOT / "configs/quickstart.yaml", [f"model.arch={arch}", f"data.batch_size={batch}"])
    model = create_model(arch, 10, 32).train()
    opt = build_optimizer(model, cfg)
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    loss_fn = torch.nn.CrossEntropyLoss()

    def step():
        loss_fn(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(5):
        step()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        step()
        n += batch
    return n / (time.perf_counter() - start)


def write_easy_digits(out: Path, n_train: int = 40_000, n_val: int = 2_000, seed: int = 0, offset: int = 4,
                      noise: float = 4.0) -> Path:
    """Jittered copies of scikit-learn's digits as 32x32 grey PNGs: out/train/<digit>/, out/val/<digit>/.

    Each is a digit resized to 24x24, placed up to `offset` px from the centre, plus Gaussian noise of sd
    `noise` (0-255 scale)."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    base = [np.asarray(Image.fromarray(np.uint8(d * 255 / 16)).resize((24, 24), Image.Resampling.BILINEAR))
            for d in digits.images]
    for split, n in (("train", n_train), ("val", n_val)):
        for i, k in enumerate(rng.integers(0, len(base), n)):
            canvas = np.zeros((32, 32), np.float32)
            dy, dx = rng.integers(4 - offset // 2, 4 - offset // 2 + offset + 1, 2)
            canvas[dy:dy + 24, dx:dx + 24] = base[k]
            canvas += rng.normal(0, noise, canvas.shape)
            folder = out / split / str(digits.target[k])
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.uint8(canvas.clip(0, 255))).save(folder / f"{i:05d}.png")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, help="folder with train/<class>/ and val/<class>/ (default: generate)")
    p.add_argument("--per-class", type=int, default=3000, help="generated training images per class")
    p.add_argument("--batch", type=int, default=64, help="toolkit batch size")
    p.add_argument("--models", default="tutorial_net,resnet_small", help="models for the throughput table")
    p.add_argument("--repeats", type=int, default=5, help="alternating throughput measurements per model")
    p.add_argument("--skip-time-to-accuracy", action="store_true", help="only the throughput table")
    p.add_argument("--easy", action="store_true", help="time to accuracy on 40,000 jittered digits, one epoch")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="train_speed-"))
    data = args.data
    if args.easy:
        data = data or write_easy_digits(work / "easy_digits")
        time_to_accuracy(data, work, 64, ["train.epochs=1", "data.augment=false", "optim.schedule=onecycle",
                                          "optim.lr=0.05"])
        print(f"\n(work files in {work})")
        return
    if data is None:
        data = work / "shapes"
        t, _ = run([sys.executable, "-m", "toolkit", "data", "shapes", str(data), "--train-per-class",
                    str(args.per_class), "--val-per-class", str(args.per_class // 6)])
        print(f"generated {data} in {t:.0f} s", flush=True)

    if not args.skip_time_to_accuracy:
        time_to_accuracy(data, work, args.batch)
    throughput(work, args)
    print(f"\n(work files in {work})")


def time_to_accuracy(data: Path, work: Path, batch: int, recipe: list[str] = ("train.epochs=20",)) -> None:
    n_train = sum(1 for _ in (data / "train").rglob("*.png"))
    n_val = sum(1 for _ in (data / "val").rglob("*.png"))
    tutorial = [sys.executable, str(ROOT / "benchmarks/tutorial_pipeline.py"), str(data)]
    spin_s, proc = run(tutorial, {"OMP_WAIT_POLICY": None})
    spin = json.loads(proc.stdout.strip().splitlines()[-1])
    base_s, proc = run(tutorial, {"OMP_WAIT_POLICY": "PASSIVE"})
    base = json.loads(proc.stdout.strip().splitlines()[-1])
    target = base["accuracy"] - 0.005
    cold = work / "cache-cold"
    tk_s, records, decode_cold, _ = toolkit_train(
        data, work / "runs", "cold", cold, "model.arch=tutorial_net", f"data.batch_size={batch}",
        *recipe, f"train.stop_at_accuracy={target}")
    warm_s, _, decode_warm, warm_log = toolkit_train(
        data, work / "runs", "warm", cold, "model.arch=tutorial_net", f"data.batch_size={batch}",
        *recipe, f"train.stop_at_accuracy={target}")
    reached = records[-1]
    print(f"\n## time to the tutorial pipeline's one-epoch accuracy ({n_train} train / {n_val} val images, "
          f"tutorial_net, whole process)\n")
    print(f"{'':28} {'wall s':>8} {'val acc':>8}  details")
    print(f"{'tutorial pipeline':28} {spin_s:8.1f} {100 * spin['accuracy']:7.2f}%  1 epoch, batch 4, "
          f"{spin['images_per_s']:.0f} img/s in training (OpenMP default)")
    print(f"{'tutorial pipeline, PASSIVE':28} {base_s:8.1f} {100 * base['accuracy']:7.2f}%  the same with "
          f"OMP_WAIT_POLICY=PASSIVE, {base['images_per_s']:.0f} img/s in training")
    print(f"{'toolkit, cold cache':28} {tk_s:8.1f} {100 * reached['val_accuracy']:7.2f}%  {len(records)} epoch(s), "
          f"batch {batch}, decoding {decode_cold:.1f} s")
    print(f"{'toolkit, warm cache':28} {warm_s:8.1f} {'':8}  decoding {decode_warm:.1f} s"
          + (" (served from cache)" if "from cache" in warm_log else ""))
    print(f"{'ratio toolkit / tutorial':28} {tk_s / spin_s:8.3f}   (cold cache; {tk_s / base_s:.3f} against the "
          f"PASSIVE tutorial; warm cache {warm_s / spin_s:.3f} / {warm_s / base_s:.3f})")


def throughput(work: Path, args) -> None:
    """Cached path vs compute only, each in a fresh process; alternating, medians compared (noisy machine)."""
    small = work / "small"
    run([sys.executable, "-m", "toolkit", "data", "shapes", str(small), "--train-per-class", "200",
         "--val-per-class", "20"])
    print(f"\n## training images per second, batch {args.batch} (cached path: a real run on 2,000 images, "
          f"epochs 2+; median of {args.repeats} alternating measurements)\n")
    print(f"{'model':16} {'compute only':>13} {'cached path':>12} {'ratio':>7}   spread (min-max) compute / cached")
    for arch in args.models.split(","):
        ideal, cached = [], []
        for i in range(args.repeats):
            _, recs, _, _ = toolkit_train(small, work / "runs", f"{arch}-{i}", work / "cache-small",
                                          f"model.arch={arch}", f"data.batch_size={args.batch}", "train.epochs=4")
            cached.append(statistics.median(r["images_per_s"] for r in recs[1:]))
            ideal.append(compute_only(arch, args.batch))
        ideal_m, cached_m = statistics.median(ideal), statistics.median(cached)
        print(f"{arch:16} {ideal_m:13.0f} {cached_m:12.0f} {cached_m / ideal_m:7.2f}   "
              f"{min(ideal):.0f}-{max(ideal):.0f} / {min(cached):.0f}-{max(cached):.0f}", flush=True)


if __name__ == "__main__":
    main()
