"""Batch prediction speed and memory, side by side in one run.

On a folder of small PNGs (32x32) and one of larger JPEGs (1024x768), images per second of
  (a) the classic per-image loop: PIL open + torchvision transforms + eager torch model, batch 4,
  (b) toolkit predict (the same network exported to ONNX), CSV output,
  (c) decoding only, the same files with the same preprocessing, on all cores,
with the ratios b/a and b/c; then the peak memory (RSS summed over the predict process and its
decode workers, sampled every 20 ms) for 2,000 and 20,000 files.

With --ray (needs toolkit[ray]), the Ray engine beside the built-in one on this machine, both as the
command a user runs (`toolkit predict ... [--engine ray]`, Ray's start included), on N and 2N files:
images per second, peak memory (PSS summed over the command's process tree: Ray's GCS, raylet and
workers, or the decode workers; shared pages counted once), and the marginal images per CPU-second,
N / (CPU(2N) - CPU(N)): start-up excluded, and unlike wall time not inflated by other work on a shared
machine. That is the per-core figure to multiply by the cores of a cluster; the ratio ray / built-in of
it is the engine's overhead on one machine.

    python benchmarks/predict_speed.py [--small 10000] [--jpegs 1000] [--ray [--chunk-size 256]] [--skip-baselines]
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from toolkit.core import images
from toolkit.core.meta import Meta
from toolkit.export import export
from toolkit.predict import predict
from toolkit.train.datasets import shapes
from toolkit.train.models import create_model
from toolkit.train.weights import build_model, save_weights

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def make_data(work: Path, n_small: int, n_jpeg: int) -> tuple[Path, Path]:
    per_class = -(-n_small // 10)
    src = shapes.generate(work / "shapes", train_per_class=per_class, val_per_class=1, seed=0)
    small = src / "train"
    big = work / "jpegs"
    big.mkdir()
    rng = np.random.default_rng(0)
    for i, f in enumerate(sorted(small.rglob("*.png"))[:n_jpeg]):
        up = np.asarray(Image.open(f).resize((1024, 768), Image.Resampling.BICUBIC), dtype=np.int16)
        noisy = np.clip(up + rng.integers(-12, 12, up.shape), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(big / f"{i:05d}.jpg", quality=90)
    return small, big


def classic_loop(weights: Path, folder: Path, out: Path) -> float:
    """The per-image loop most scripts start from; returns images per second."""
    import torchvision.transforms as T

    net, meta = build_model(weights)
    tf = T.Compose([T.Resize(meta.image_size), T.CenterCrop(meta.image_size), T.ToTensor(), T.Normalize(MEAN, STD)])
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".png", ".jpg"))
    start = time.perf_counter()
    with open(out, "w", newline="") as f, torch.no_grad():
        w = csv.writer(f)
        for i in range(0, len(files), 4):
            batch = files[i : i + 4]
            x = torch.stack([tf(Image.open(p).convert("RGB")) for p in batch])
            probs = net(x).softmax(1)
            score, label = probs.max(1)
            w.writerows([str(p), meta.class_names[c], float(s)] for p, c, s in zip(batch, label.tolist(), score))
    return len(files) / (time.perf_counter() - start)


def decode_only(folder: Path, size: int) -> float:
    files = images.find_images(folder)
    start = time.perf_counter()
    with images.Decoder() as decoder:
        n = sum(len(b.paths) for b in decoder.batches(folder, files, images.Preprocess(size), batch_size=128))
    return n / (time.perf_counter() - start)


def toolkit_predict(model: Path, folder: Path, out: Path, **kw) -> float:
    n = sum(1 for _ in images.iter_images(folder))
    start = time.perf_counter()
    predict(model, folder, out, overwrite=True, **kw)
    return n / (time.perf_counter() - start)


def tree_rss(pid: int) -> int:
    """Resident bytes of `pid` and all its descendants."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            status = Path(f"/proc/{p}/status").read_text()
            total += int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS"))) * 1024
            children = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except (OSError, StopIteration):
            continue
        todo += [int(c) for c in children]
    return total


def peak_memory(model: Path, folder: Path, out: Path) -> tuple[int, float]:
    cmd = [sys.executable, "-m", "toolkit", "predict", str(model), str(folder), "-o", str(out), "--overwrite"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peak, start = 0, time.perf_counter()
    while proc.poll() is None:
        peak = max(peak, tree_rss(proc.pid))
        time.sleep(0.02)
    return peak, time.perf_counter() - start


def _tree(pid: int) -> list[int]:
    """`pid` and all its descendants."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        try:
            todo += [int(c) for t in os.listdir(f"/proc/{p}/task")
                     for c in Path(f"/proc/{p}/task/{t}/children").read_text().split()]
        except OSError:
            continue
    return found


def _pss(pid: int) -> int:
    """Proportional set size in bytes (shared pages split between the processes that use them)."""
    rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
    return int(next(line.split()[1] for line in rollup.splitlines() if line.startswith("Pss:"))) * 1024


def _cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def command_run(model: Path, folder: Path, out: Path, *extra: str) -> tuple[float, float, int]:
    """`toolkit predict` as a user runs it: -> (wall seconds, CPU seconds and peak PSS of its whole process
    tree: the decode workers, or Ray's GCS, raylet and workers), sampled every 50 ms."""
    cmd = [sys.executable, "-m", "toolkit", "predict", str(model), str(folder), "-o", str(out), "--overwrite", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak, ticks, start = 0, {}, time.perf_counter()
    while proc.poll() is None:
        pss = 0
        for p in _tree(proc.pid):
            try:
                pss += _pss(p)
                ticks[p] = max(ticks.get(p, 0), _cpu_ticks(p))
            except (OSError, StopIteration, ValueError, IndexError):
                pass
        peak = max(peak, pss)
        time.sleep(0.05)
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr.read().decode()[-2000:]}")
    return seconds, sum(ticks.values()) / os.sysconf("SC_CLK_TCK"), peak


def ray_section(model: Path, folders: list[tuple[str, Path]], work: Path, repeats: int, chunk: int) -> None:
    cores = len(os.sched_getaffinity(0))
    print(f"\n## the Ray engine beside the built-in one, {cores} cores, whole commands; load average before: "
          f"{os.getloadavg()[0]:.1f}\n")
    print(f"{'folder':26} {'engine':9} {'img/s N':>8} {'img/s 2N':>9} {'peak MiB':>9} {'img per CPU-s':>14}"
          f"   (marginal: N / (CPU(2N) - CPU(N)), start-up excluded)")
    rates = {}
    for name, folder in folders:
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        doubled = work / f"twice-{folder.name}"
        if not doubled.exists():
            linked(files + files, doubled, 2 * len(files))
        for engine in ("local", "ray"):
            runs = {f: [command_run(model, f, work / f"e-{engine}.csv", "--engine", engine, "--chunk-size", str(chunk))
                        for _ in range(repeats)] for f in (folder, doubled)}
            wall = {f: statistics.median(r[0] for r in v) for f, v in runs.items()}
            cpu = {f: statistics.median(r[1] for r in v) for f, v in runs.items()}
            peak = max(r[2] for v in runs.values() for r in v) / 2**20
            extra_cpu = cpu[doubled] - cpu[folder]
            rates[name, engine] = len(files) / extra_cpu if extra_cpu > 0 else float("nan")  # nan: N too small
            print(f"{name:26} {engine:9} {len(files) / wall[folder]:8.0f} {2 * len(files) / wall[doubled]:9.0f}"
                  f" {peak:9.0f} {rates[name, engine]:14.0f}", flush=True)
    print(f"\nratio ray / built-in, images per CPU-second: " + ", ".join(
        f"{name} {rates[name, 'ray'] / rates[name, 'local']:.2f}" for name, _ in folders) +
          f"; load average after: {os.getloadavg()[0]:.1f}")


def linked(src_files: list[Path], folder: Path, n: int) -> Path:
    folder.mkdir()
    for i in range(n):
        (folder / f"{i:06d}.png").symlink_to(src_files[i % len(src_files)])
    return folder


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", type=int, default=10_000, help="small PNGs")
    p.add_argument("--jpegs", type=int, default=1_000, help="1024x768 JPEGs")
    p.add_argument("--repeats", type=int, default=3, help="alternating measurements (medians are printed)")
    p.add_argument("--ray", action="store_true", help="also the Ray engine beside the built-in one")
    p.add_argument("--chunk-size", type=int, default=256, help="--engine ray: files per chunk (Ray task, part file)")
    p.add_argument("--skip-baselines", action="store_true", help="skip the per-image loop and memory sections")
    args = p.parse_args()
    logging.basicConfig(level=logging.ERROR)
    work = Path(tempfile.mkdtemp(prefix="predict_speed-"))
    small, big = make_data(work, args.small, args.jpegs)
    torch.manual_seed(0)
    weights = work / "model.safetensors"
    save_weights(create_model("tutorial_net_bn", 10), Meta("tutorial_net_bn", list(shapes.CLASSES), 32, "center_crop",
                                                           MEAN, STD), weights)
    model = export(weights, work / "model.onnx", data_dir=str(small))

    folders = [(f"{args.small:,} small PNGs", small), (f"{args.jpegs:,} JPEGs 1024x768", big)]
    if args.ray:
        ray_section(model, folders, work, args.repeats, args.chunk_size)
    if args.skip_baselines:
        print(f"\n(work files in {work})")
        return
    print(f"\n## images per second, {os.cpu_count()} cores (tutorial_net_bn, 32x32 input)\n")
    print(f"{'folder':26} {'per-image loop':>15} {'toolkit predict':>16} {'decode only':>12} {'x loop':>7}"
          f" {'of decode':>10}   spread (min-max)")
    for name, folder in folders:
        runs = {"loop": [], "predict": [], "decode": []}
        for _ in range(args.repeats):  # this machine is noisy: alternate the three, compare medians
            runs["loop"].append(classic_loop(weights, folder, work / "loop.csv"))
            runs["predict"].append(toolkit_predict(model, folder, work / "p.csv"))
            runs["decode"].append(decode_only(folder, 32))
        loop, fast, decode = (statistics.median(runs[k]) for k in ("loop", "predict", "decode"))
        print(f"{name:26} {loop:15.0f} {fast:16.0f} {decode:12.0f} {fast / loop:7.1f} {fast / decode:10.2f}   "
              + ", ".join(f"{k} {min(v):.0f}-{max(v):.0f}" for k, v in runs.items()), flush=True)

    print("\n## peak memory of toolkit predict (process + decode workers), whole process\n")
    files = sorted(small.rglob("*.png"))
    results = {}
    for n in (2_000, 20_000):
        folder = linked(files, work / f"n{n}", n)
        results[n] = peak_memory(model, folder, work / f"m{n}.csv")
        print(f"{n:>7,} files: peak {results[n][0] / 2**20:7.1f} MiB, {results[n][1]:.1f} s", flush=True)
    print(f"ratio 20,000 / 2,000: {results[20_000][0] / results[2_000][0]:.3f}")
    print(f"\n(work files in {work})")


if __name__ == "__main__":
    main()
