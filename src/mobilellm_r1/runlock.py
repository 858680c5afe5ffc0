"""One writer per run directory: an ``fcntl.flock`` on ``<dir>/.lock``.

``run``, ``train``, ``sft`` and ``grpo`` hold the lock of the directory they write for as long as they
write it; a second writer fails at once with the holder's pid, host and command. The kernel drops a flock
when its holder dies however it dies (SIGKILL, OOM, a lost node's process), so a killed run never leaves a
stale lock to clean up: the file stays, the lock does not.

- **Re-entrant in a process**: ``run`` holds the run directory and trains its stages in-process, and a
  training stage locks its own folder (``<run>/<stage>``); the same process taking a lock it holds, or a
  folder inside a folder it holds, just goes on.
- **A stage folder inside a held run directory** is refused to other processes: ``train --out
  runs/x/pretrain`` fails while ``mobilellm-r1 run`` writes ``runs/x``.
- **Child processes**: the holder lists its locks in ``MOBILELLM_R1_RUN_LOCKS`` (dir -> pid), so a child it
  starts (today every stage runs in-process; a future one might be a subprocess or ``torchrun``) may write
  the same directory while that pid still holds it, instead of deadlocking against its parent.
- **torchrun**: only rank 0 (``RANK``) takes the lock; the job is one writer.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import threading
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .faults import FaultError

LOCK_FILE = ".lock"
ENV = "MOBILELLM_R1_RUN_LOCKS"
_NO_LOCKS = {errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK}

_held: dict[str, list[int]] = {}  # resolved dir -> [fd, depth] of the locks this process holds
_mutex = threading.Lock()


class RunLockError(FaultError):
    """Another process writes this directory."""


def _key(directory: str | Path) -> str:
    return str(Path(directory).resolve())


def _describe(lock: Path) -> str:
    """Who holds ``lock``, from what the holder wrote into it."""
    for _ in range(3):  # the holder writes its pid right after taking the lock: a reader may be a moment early
        try:
            info = json.loads(lock.read_text())
            return (f"pid {info['pid']} on {info.get('host', '?')}, since "
                    f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(info.get('since', 0)))}: "
                    f"{' '.join(info.get('argv', []))}")
        except (OSError, ValueError, KeyError, TypeError):
            time.sleep(0.05)
    return "pid unknown"


def _env_locks() -> dict[str, int]:
    try:
        locks = json.loads(os.environ.get(ENV) or "{}")
    except ValueError:
        return {}
    return locks if isinstance(locks, dict) else {}


def _inherited(key: str) -> bool:
    """Whether an ancestor process holds ``key`` for us (see the module docstring)."""
    pid = _env_locks().get(key)
    try:
        holder = json.loads((Path(key) / LOCK_FILE).read_text())["pid"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return pid is not None and pid == holder and _is_locked(Path(key) / LOCK_FILE)


def _is_locked(lock: Path) -> bool:
    """Whether some process holds ``lock`` (a shared probe that is released at once)."""
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return True
        if e.errno in _NO_LOCKS:
            return False
        raise
    finally:
        os.close(fd)  # closing drops the probe's lock


def _set_env() -> None:
    """List this process's locks (and its ancestors') for the processes it starts."""
    theirs = {k: v for k, v in _env_locks().items() if v != os.getpid()}
    os.environ[ENV] = json.dumps({**theirs, **{k: os.getpid() for k in _held}})


def _acquire(key: str) -> int:
    parent = str(Path(key).parent)
    if parent not in _held and not _inherited(parent) and _is_locked(Path(parent) / LOCK_FILE):
        raise RunLockError(f"{parent} is being written by another process ({_describe(Path(parent) / LOCK_FILE)}), "
                           f"so {key} inside it is too: wait for it to finish or stop it")
    Path(key).mkdir(parents=True, exist_ok=True)
    lock = Path(key) / LOCK_FILE
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)  # not inherited by children (PEP 446)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in _NO_LOCKS:  # e.g. Lustre mounted without -o flock: run unguarded rather than not at all
            warnings.warn(f"{key}: this filesystem has no file locks ({os.strerror(e.errno)}); nothing stops a "
                          "second writer of this directory", stacklevel=3)
            return fd
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise RunLockError(f"{key} is being written by another process ({_describe(lock)}): wait for it to "
                               "finish or stop it (a killed process frees the lock by itself)") from None
        raise
    argv = sys.argv
    if Path(argv[0]).name == "mobilellm-r1" or Path(argv[0]).parent.name == "mobilellm_r1":  # script or -m
        argv = ["mobilellm-r1", *argv[1:]]
    info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(), "argv": argv}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
    return fd


@contextmanager
def run_lock(directory: str | Path) -> Iterator[None]:
    """Hold ``directory``'s lock for the ``with`` block (creating the directory); raises
    :class:`RunLockError` naming the holder when another process has it."""
    if int(os.environ.get("RANK", "0")) != 0:  # torchrun: rank 0 writes for the job
        yield
        return
    key = _key(directory)
    with _mutex:
        if key in _held:
            _held[key][1] += 1
        elif _inherited(key):
            key = ""
        else:
            _held[key] = [_acquire(key), 1]
            _set_env()
    try:
        yield
    finally:
        if key:
            with _mutex:
                _held[key][1] -= 1
                if _held[key][1] == 0:
                    os.close(_held.pop(key)[0])  # closing the descriptor releases the flock
                    _set_env()
