"""What a run does when the machine misbehaves: preemption, a full disk, a loss that turns non-finite.

Each fault ends in one line a user can act on (the CLI prints a :class:`FaultError` without a traceback,
exit status 2) and never in a lost or poisoned checkpoint:

- **preemption** (SIGTERM, or SIGUSR1 that SLURM can send ahead of the kill with ``--signal``): the training
  loop finishes its step, writes a checkpoint and raises :class:`Preempted`; the CLI exits with
  :data:`EXIT_PREEMPTED` so a job script can tell "requeue me" from a crash;
- **disk full** (ENOSPC, EDQUOT, or EFBIG from a file-size limit): the write's temporary files are removed,
  the previous checkpoint stays, and :class:`DiskFullError` says how many bytes were needed and where;
- **non-finite loss or gradient norm**: :class:`NonFiniteGuard` stops the stage naming the step and the
  batch's rows, or skips the update when the stage says ``nonfinite = "skip"`` (counted, up to a limit).

No torch here: the CLI imports this module to print these errors.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import threading
from pathlib import Path
from typing import Any

# 128 + SIGTERM, what a shell reports for a process SIGTERM ended: schedulers and job scripts already read it
# as "stopped from outside, run me again". A preempted stage exits with it after writing its checkpoint.
EXIT_PREEMPTED = 128 + signal.SIGTERM
PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


class FaultError(Exception):
    """A fault with one clear line of what happened and what to do (printed without a traceback)."""


class DiskFullError(FaultError, OSError):
    """A write that ran out of space (still an ``OSError``, with the original ``errno``)."""


class NonFiniteError(FaultError):
    """A non-finite loss, gradient norm or weights; nothing was saved from that step on."""


class Preempted(Exception):
    """The stage stopped on a signal after checkpointing; the same command with ``--resume`` continues."""

    def __init__(self, signame: str, step: int, checkpoint: str | Path):
        self.signame, self.step, self.checkpoint = signame, step, str(checkpoint)
        super().__init__(f"stopped by {signame} after step {step}; checkpoint {checkpoint} written: the same "
                         "command with --resume continues from it (`mobilellm-r1 run` resumes by itself)")


# ------------------------------------------------------------------------------------------ preemption


class PreemptionWatch:
    """While active, SIGTERM / SIGUSR1 only set :attr:`signame` (the loop polls it between steps) instead
    of killing the process mid-write. The previous handlers come back at :meth:`stop`. Signals can only be caught
    in the main thread; elsewhere the watch does nothing and the default behaviour stays."""

    def __init__(self) -> None:
        self.signame: str | None = None
        self._old: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        self.signame = self.signame or signal.Signals(signum).name

    def start(self) -> "PreemptionWatch":
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._handler) for s in PREEMPT_SIGNALS}
        return self

    def stop(self) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old = {}

    def __enter__(self) -> "PreemptionWatch":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


# ------------------------------------------------------------------------------------------- disk full


def disk_full_errno(exc: BaseException) -> int | None:
    """The ENOSPC / EDQUOT / EFBIG behind ``exc``, if any. Writers in C++/Rust hide it: torch.save (given a
    Python file) leaves the OSError as the exception's context, safetensors says "(os error 28)"."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        code = getattr(exc, "errno", None) if isinstance(exc, OSError) else None
        if code is None and (m := re.search(r"os error (\d+)", str(exc))):
            code = int(m.group(1))
        if code in DISK_FULL_ERRNOS:
            return code
        exc = exc.__cause__ or exc.__context__
    return None


def disk_full_error(exc: BaseException, what: str, where: str | Path, needed: int) -> DiskFullError | None:
    """A :class:`DiskFullError` for ``exc`` when it is a full disk / quota / file-size limit, else None."""
    code = disk_full_errno(exc)
    if code is None:
        return None
    where = Path(where)
    probe = next((p for p in (where, *where.parents) if p.exists()), Path("."))
    free = shutil.disk_usage(probe).free
    limit = " (a file-size limit: see `ulimit -f`)" if code == errno.EFBIG else ""
    err = DiskFullError(f"no room to write {what} in {where}: {os.strerror(code)}{limit}; it needs about "
                        f"{needed:,} bytes ({needed / 1e6:,.1f} MB), {free:,} bytes are free there. The partial files "
                        "were removed and what was there before (the previous checkpoint too) is intact: make room "
                        "and run the same command again (with --resume for a training stage)")
    err.errno = code
    return err


# -------------------------------------------------------------------------------------- non-finite loss


class NonFiniteGuard:
    """The stage's ``nonfinite`` policy for a step whose loss or gradient norm is not finite: ``"stop"``
    raises :class:`NonFiniteError`; ``"skip"`` drops that step's update (its batch is consumed and the step
    counted) up to ``max_skips`` times in the stage, then stops as well. ``skips`` is checkpointed."""

    def __init__(self, mode: str, max_skips: int, skips: int = 0):
        self.mode, self.max_skips, self.skips = mode, max_skips, skips

    def on_nonfinite(self, step: int, loss: float, grad_norm: float, rows: str, resume_from: str) -> None:
        """Count a skip, or raise naming the step, the values, the batch's rows and the resume point."""
        if self.mode == "skip" and self.skips < self.max_skips:
            self.skips += 1
            return
        why = (f" and {self.skips} steps were skipped already (nonfinite_max_skips)" if self.mode == "skip" else "")
        raise NonFiniteError(f"step {step}: loss {loss} / gradient norm {grad_norm} is not finite{why}; batch rows "
                             f"(source@offset): {rows}. Nothing of this step was saved; --resume starts from "
                             f"{resume_from}. Lower the lr, check those rows, or set nonfinite = \"skip\" in the stage")
