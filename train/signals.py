"""Signals a run honours: SIGTERM / SIGUSR1 (SLURM preemption, walltime) and SIGINT (Ctrl-C) ask for a
checkpoint and a clean exit after the current step; a second Ctrl-C stops at once."""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist

from train.distributed import collective_device


class Signals:
    """Installed for the training loop (a signal during start-up ends the process at once); every rank
    learns at the end of a step whether any rank received one."""

    def __init__(self):
        self.received: int | None = None
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum

    def any_rank(self) -> bool:
        """Whether any rank received a signal (collective)."""
        flag = torch.tensor(
            [1 if self.received is not None else 0], dtype=torch.int64, device=collective_device()
        )
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
