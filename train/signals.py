"""Stopping on a signal, and the fault-injection seams the tests drive.

SIGTERM (a scheduler's preemption notice, torchrun stopping a job) and SIGINT only set a flag;
the loop saves a checkpoint after the step in flight and raises TrainingInterrupted, and every
rank of a job stops after the same step.
"""
from __future__ import annotations

import dataclasses
import os
import signal
import threading
import time

import torch
import torch.distributed as dist

# Test seam for the fault-tolerance test, read by fault_injection_hooks() only: "RANK:STEP" makes
# global rank RANK kill itself (SIGKILL) when it reaches step STEP, on the job's first attempt
# (TORCHELASTIC_RESTART_COUNT = 0), so that torchrun --max-restarts restarts the job.
FAULT_ENV = "MEDITRON_TRAIN_TEST_KILL_RANK_AT_STEP"
# The same for preemption: "RANK:STEP" sends SIGTERM to global rank RANK alone before step STEP.
SIGNAL_ENV = "MEDITRON_TRAIN_TEST_SIGTERM_RANK_AT_STEP"


class TrainingInterrupted(RuntimeError):
    """Raised after SIGTERM or SIGINT, once the checkpoint of the last finished step is saved."""

    def __init__(self, signum: int, step: int, path: str):
        self.signum, self.step, self.path = signum, step, path
        super().__init__(f"{signal.Signals(signum).name} after step {step}: checkpoint {path} saved; "
                         "continue with --resume")


class StopSignal:
    """SIGTERM and SIGINT handlers that ask the loop to stop at the next step boundary.

    The handler only records the signal: the loop saves a checkpoint after the step in flight
    and leaves. Repeats are ignored (torchrun's agent forwards the signal it got to workers
    that may have had it already), except a second Ctrl-C at least 2 s after the first, which
    quits at once without saving."""

    def __init__(self, announce: bool):
        self.signum = 0
        self.first_at = 0.0
        self.announce = announce
        self.previous = {}

    def install(self) -> "StopSignal":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}

    def _handle(self, signum, frame) -> None:
        now = time.monotonic()
        if self.signum:
            if signum == signal.SIGINT and now - self.first_at >= 2.0:
                os.write(2, b"\nsecond Ctrl-C: quitting without saving\n")
                os._exit(128 + signum)
            return
        self.signum, self.first_at = signum, now
        if self.announce:
            name = signal.Signals(signum).name
            os.write(2, f"\n{name}: saving a checkpoint after the current step, then stopping\n".encode())

    def agree(self, finite: torch.Tensor, distributed: bool) -> tuple[bool, int]:
        """-> (finite on every rank, the signal to stop on or 0), the step's one host sync.

        In a job every rank stops after the same step: the largest signal number any rank saw,
        reduced together with the finite flag."""
        if not distributed:
            return bool(finite), self.signum
        flag = torch.tensor(float(self.signum), device=finite.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        ok, signum = torch.stack([finite.float(), flag]).tolist()
        return bool(ok), int(signum)


@dataclasses.dataclass
class Hooks:
    """Test seams. ``loss``: transform a micro batch's loss (e.g. inject a NaN at a given step;
    not called under pipeline parallelism, where the schedule owns the micro batches).
    ``before_step``: called with the step index before each step (fault injection)."""
    loss: callable = None
    before_step: callable = None


def fault_injection_hooks() -> Hooks:
    """Hooks for the command line: empty unless a fault-injection test variable is set."""
    kill = os.environ.get(FAULT_ENV, "")
    term = os.environ.get(SIGNAL_ENV, "")
    if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        kill = ""
    if not kill and not term:
        return Hooks()
    actions = {}
    for spec, sig in ((kill, signal.SIGKILL), (term, signal.SIGTERM)):
        if spec:
            rank, step = (int(v) for v in spec.split(":"))
            if int(os.environ.get("RANK", "0")) == rank:
                actions[step] = sig

    def before_step(s: int) -> None:
        if s in actions:
            os.kill(os.getpid(), actions[s])

    return Hooks(before_step=before_step)
