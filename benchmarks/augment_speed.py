"""Cost of each augmentation op on a whole uint8 batch, against the crop+flip gather and a training step.

For each image size: milliseconds per batch of the fused crop+flip gather (the baseline every recipe
pays), then each further op on the gathered batch, and TrivialAugment both ways (each op on its own
samples, `grouped`, against every op on every sample selected with `where`); then one training step of
the recipe's network at that size (forward, backward, SGD step) for scale. Median of --repeats runs,
same process, same threads.

    python benchmarks/augment_speed.py                      # 32, 64, 128 px, batch 256, speedrun_net_s
    python benchmarks/augment_speed.py --sizes 32 --batch 128 --threads 1

Measured on this project's shared 2-core machine while other jobs ran (load average 4.6-5.4),
`--threads 1`, batch 256, ms per batch (the train step: speedrun_net_s, forward + backward + SGD):

| size | crop+flip | rrc | affine | trivial grouped | trivial where | cutout | mix | train step |
|---|---|---|---|---|---|---|---|---|
| 32 px | 7.9 | 9.9 | 8.9 | 13.9 | 97.4 | 0.5 | 9.2 | 742 |
| 64 px | 23.0 | 25.0 | 28.4 | 35.1 | 356 | 1.9 | 43.0 | 6,626 |
| 128 px | 87.8 | 123 | 121 | 73.4 | 2,614 | 23.2 | 373 | 29,671 |

So TrivialAugment groups samples by op (7x to 36x faster than computing every op for every sample),
and every op costs at most a few percent of a training step on a CPU.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    from toolkit.config import load_config
    from toolkit.train import autoaugment
    from toolkit.train.augment import Augment, crop_flip
    from toolkit.train.mixing import CrossEntropy
    from toolkit.train.models import create_model

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 128])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--arch", default="speedrun_net_s", help="network of the training step ('' to skip it)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(None, ["data.random_resized_crop=true", "data.rotate_degrees=10", "data.scale_jitter=0.1",
                             "data.trivial_augment=true", "data.cutout=8", "data.mixup=0.2", "data.cutmix=1.0"]).data
    B = args.batch
    print(f"ms per batch of {B}, median of {args.repeats}, {torch.get_num_threads()} threads")
    print(f"{'size':>5} {'crop+flip':>10} " + " ".join(f"{n:>8}" for n in
          ("rrc", "affine", "triv-grp", "triv-whr", "cutout", "mix", "step")))
    for size in args.sizes:
        g = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (2 * B, 3, size, size), dtype=torch.uint8, generator=g)
        labels = torch.randint(0, 10, (2 * B,), generator=g)
        aug = Augment.from_config(cfg, seed=0, num_classes=10)
        epoch = aug.for_epoch(0, len(images))
        idx = torch.randperm(len(images), generator=g)[:B]
        tables = {op.name: (op, t[idx]) for op, t in zip(epoch.ops, epoch.params)}
        x = crop_flip(images, idx, tables["crop"][1], tables["flip"][1][:, 0], cfg.crop_padding)
        y = labels[idx]
        row = [timed(lambda: crop_flip(images, idx, tables["crop"][1], tables["flip"][1][:, 0], cfg.crop_padding),
                     args.repeats)]
        for name in ("rrc", "affine"):
            op, t = tables[name]
            row.append(timed(lambda: op(x, y, t), args.repeats))
        t = tables["trivial"][1]
        row.append(timed(lambda: autoaugment.apply(x, t, grouped=True), args.repeats))
        row.append(timed(lambda: autoaugment.apply(x, t, grouped=False), args.repeats))
        for name in ("cutout", "mix"):
            op, t = tables[name]
            row.append(timed(lambda: op(x, y, t), args.repeats))
        if args.arch:
            model = create_model(args.arch, 10)
            opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
            loss_fn, xf = CrossEntropy(0.2), x.float() / 255

            def step():
                loss = loss_fn(model(xf), y)
                loss.backward()
                opt.step()
                opt.zero_grad()

            row.append(timed(step, max(2, args.repeats // 2)))
        print(f"{size:>5} " + f"{row[0]:>10.2f} " + " ".join(f"{v:>8.2f}" for v in row[1:]), flush=True)


if __name__ == "__main__":
    main()
