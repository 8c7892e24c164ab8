"""`python tests/faults.py train CONFIG ...`: toolkit's command line with one fault injected.

FAULT=kill|raise|term|nan|stop   what happens
FAULT_STEP=N                at optimizer step N (kill/raise/term) or micro-batch N (nan)
FAULT_RANK=R                on process R only (default 0)

kill   SIGKILL the whole process group (launcher and every process) right before step N is applied
raise  an exception on one process
term   SIGTERM to the launcher (or to this process when there is none), as SLURM or a scheduler would
nan    one non-finite loss on one process
stop   one process stops taking part and sleeps (stuck: alive, silent, holding its sockets), SIGTERM left to its
       default action: when another process fails, the launcher's SIGTERM ends it at once. (A SIGSTOPped
       process would wait for the SIGKILL that follows 30 s later, a grace that TORCH_ELASTIC_SHUTDOWN_TIMEOUT
       does not shorten on this path.)
"""

import os
import signal
import sys
import time

import toolkit.train.loop as train_module
import toolkit.train.setup as setup_module
from toolkit.cli import main

KIND, STEP, RANK = os.environ["FAULT"], int(os.environ["FAULT_STEP"]), int(os.environ.get("FAULT_RANK", "0"))
HERE = int(os.environ.get("RANK", "0")) == RANK
real_lr_at = train_module.lr_at


def lr_at(step, *args):  # called once per optimizer step, after backward, before the update
    if HERE and step == STEP:
        if KIND == "kill":
            os.killpg(os.getpgid(0), signal.SIGKILL)
        elif KIND == "raise":
            raise RuntimeError(f"injected failure at step {step}")
        elif KIND == "term":
            launcher = os.getppid() if "LOCAL_RANK" in os.environ else os.getpid()
            os.kill(launcher, signal.SIGTERM)
        elif KIND == "stop":
            signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the stop-signal handler would only wait for a next step
            while True:
                time.sleep(3600)
    return real_lr_at(step, *args)


class NaNOnce(setup_module.CrossEntropy):  # the training loss, as the set-up builds it
    calls = 0

    def forward(self, logits, target):
        loss = super().forward(logits, target)
        NaNOnce.calls += 1
        return loss * float("nan") if HERE and NaNOnce.calls == STEP else loss


train_module.lr_at = lr_at
if KIND == "nan":
    setup_module.CrossEntropy = NaNOnce
main(sys.argv[1:])
