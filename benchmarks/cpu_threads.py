"""Training speed on CPU under OpenMP's thread settings, on an idle machine and beside other busy processes.

torch runs its CPU kernels on OpenMP threads (one per core by default). When the threads wait for the
next parallel region they spin; if another process takes one of the cores, the spinning threads and
the busy process fight over it and every small step waits for a descheduled thread. `toolkit` (the
command line) therefore sets OMP_WAIT_POLICY=PASSIVE unless the user set it. This script trains the
same small run (tutorial_net_bn on generated shapes, 32 px, batch 64; every epoch's images/s from
metrics.jsonl) in a fresh process per setting, alternating settings over several rounds:

  libgomp default   OMP_WAIT_POLICY unset (spin, then sleep): what torch does on its own
  PASSIVE           what the `toolkit` command sets
  1 thread          OMP_NUM_THREADS=1

each first alone, then beside `--load` busy processes (pure Python loops, one per core by default, as
another user's job would be). Medians of the per-run median images/s, and the ratio to the default.

    python benchmarks/cpu_threads.py [--rounds 3] [--epochs 4] [--load 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from toolkit.core.metrics import read_records

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {"libgomp default": {}, "PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"}, "1 thread": {"OMP_NUM_THREADS": "1"}}
# The training goes through the Python API, not the `toolkit` command, so that nothing sets the policy
# except the environment given here.
DRIVER = """
import sys
from toolkit.config import load_config
from toolkit.train import train
cfg = load_config(sys.argv[1], sys.argv[2:])
print(train(cfg))
"""


def train_rate(data: Path, out: Path, name: str, epochs: int, env: dict) -> float:
    """Median training images/s over epochs 2.. of one run in a fresh process with `env` added."""
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    cmd = [sys.executable, "-c", DRIVER, str(ROOT / "configs/quickstart.yaml"), f"data.root={data}",
           f"train.out_dir={out}", f"name={name}", f"train.epochs={epochs}", "train.progress=false"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**clean, **env})
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    run_dir = Path(proc.stdout.strip().splitlines()[-1])
    return statistics.median(r["images_per_s"] for r in read_records(run_dir)[1:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3, help="alternating runs per setting and load")
    p.add_argument("--epochs", type=int, default=4, help="epochs per run (the first is not counted)")
    p.add_argument("--load", type=int, default=os.cpu_count() or 1, help="busy processes in the loaded phase")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cpu_threads-"))
    data = work / "shapes"
    subprocess.run([sys.executable, "-m", "toolkit", "data", "shapes", str(data), "--train-per-class", "300",
                    "--val-per-class", "30"], check=True, capture_output=True, cwd=ROOT)
    print(f"{os.cpu_count()} cores; tutorial_net_bn, 32 px, batch 64, 3,000 images; median images/s of "
          f"{args.rounds} alternating runs\n")
    print(f"{'':18} {'idle':>10} {'ratio':>7} {f'+{args.load} busy':>12} {'ratio':>7}")
    rates: dict[tuple[str, bool], list[float]] = {}
    for loaded in (False, True):
        busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.load if loaded else 0)]
        try:
            for r in range(args.rounds):
                for label, env in SETTINGS.items():
                    rate = train_rate(data, work / "runs", f"{label[:4]}-{loaded}-{r}".replace(" ", ""), args.epochs, env)
                    rates.setdefault((label, loaded), []).append(rate)
        finally:
            for proc in busy:
                proc.kill()
                proc.wait()
    base = {loaded: statistics.median(rates[("libgomp default", loaded)]) for loaded in (False, True)}
    for label in SETTINGS:
        idle, busy_rate = (statistics.median(rates[(label, loaded)]) for loaded in (False, True))
        print(f"{label:18} {idle:10.0f} {idle / base[False]:7.2f} {busy_rate:12.0f} {busy_rate / base[True]:7.2f}")
    print(f"\n(work files in {work})")


if __name__ == "__main__":
    main()
