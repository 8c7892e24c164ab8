"""Inference speed on this CPU: torch eager vs onnxruntime fp32, fp16 and int8, per registered model.

Each model (seeded random weights: speed does not depend on training) is exported three times
with `toolkit export` (the int8 model calibrated on generated shapes images), then measured:
milliseconds per image at batch 1 and images per second at batch 64, on the same uint8 pixels
with the same preprocessing. Measurements of the four runtimes alternate, several rounds, and
medians are printed side by side with the ratio to torch eager.

    python benchmarks/export_speed.py [--models tutorial_net,resnet_small] [--rounds 3]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from toolkit.core.meta import Meta
from toolkit.export import export, exportable, variants
from toolkit.train.datasets import shapes
from toolkit.train.models import create_model, list_models
from toolkit.train.weights import build_model, save_weights


def timed(fn, budget_s: float) -> float:
    """Median seconds of fn() over at least 3 calls and about budget_s."""
    fn()
    times, start = [], time.perf_counter()
    while time.perf_counter() - start < budget_s or len(times) < 3:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(sorted(list_models())))
    p.add_argument("--rounds", type=int, default=3, help="alternating measurement rounds")
    p.add_argument("--budget", type=float, default=0.5, help="seconds per measurement")
    args = p.parse_args()
    logging.basicConfig(level=logging.ERROR)
    work = Path(tempfile.mkdtemp(prefix="export_speed-"))
    data = shapes.generate(work / "shapes", train_per_class=1, val_per_class=26, seed=0)

    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads), onnxruntime default threads, "
          f"{args.rounds} alternating rounds, medians\n")
    print(f"{'model':16} {'runtime':12} {'ms/img @1':>10} {'img/s @64':>10} {'x torch @1':>11} {'x torch @64':>12}"
          f" {'file KB':>8}")
    for arch in args.models.split(","):
        torch.manual_seed(0)
        meta = Meta(arch, list(shapes.CLASSES), 32, "center_crop", [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
        weights = work / f"{arch}.safetensors"
        save_weights(create_model(arch, 10), meta, weights)
        files = {v: export(weights, work / f"{arch}.{v}.onnx", data_dir=str(data / "val"), variant=v,
                           min_agreement=0.0) for v in variants.VARIANTS}
        net, meta = build_model(weights)
        module = exportable(net, meta)
        px = np.random.default_rng(0).integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
        x = variants.as_input(px, "float32")
        runners = {"torch eager": lambda b: module(torch.from_numpy(x[:b]))}
        for v, f in files.items():
            sess = variants.session(f)
            runners[f"onnx {v}"] = (lambda s: lambda b: s.run(None, {"input": x[:b]}))(sess)
        results = {name: {1: [], 64: []} for name in runners}
        with torch.no_grad():
            for _ in range(args.rounds):
                for name, fn in runners.items():
                    for b in (1, 64):
                        results[name][b].append(timed(lambda: fn(b), args.budget))
        base = {b: statistics.median(results["torch eager"][b]) for b in (1, 64)}
        for name in runners:
            t1, t64 = (statistics.median(results[name][b]) for b in (1, 64))
            size = files[name.split()[-1]].stat().st_size / 1024 if name.startswith("onnx") else float("nan")
            print(f"{arch:16} {name:12} {1000 * t1:10.3f} {64 / t64:10.0f} {base[1] / t1:11.2f} {base[64] / t64:12.2f}"
                  f" {size:8.0f}", flush=True)
    print(f"\n(work files in {work})")


if __name__ == "__main__":
    main()
