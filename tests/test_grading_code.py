"""The code sandbox and the code graders: HumanEval end to end, hostile programs, pass@k, I/O and asserts."""

import itertools
import subprocess
import json
import os
import socket
import sys
import tempfile
import time
from math import comb

import pytest

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the sandbox uses Linux rlimits/namespaces")

from mobilellm_r1.eval.grading import code  # noqa: E402
from mobilellm_r1.eval.grading.code import (  # noqa: E402
    check_asserts, check_function, check_io, grade_humaneval, load_humaneval, load_samples, pass_at_k,
    run_program, sandbox_info)

_BOOT_MARK = b"def _lockdown"   # appears in every sandboxed interpreter's command line (the -c bootstrap)


@pytest.fixture(scope="module")
def info():
    res = sandbox_info()
    assert res["ok"], res
    return res


@pytest.fixture(scope="module")
def problems():
    return load_humaneval()


def _sandbox_pids() -> list[int]:
    """Live (non-zombie) sandboxed processes of this test process (as root: any with one of our uids)."""
    lo, hi = code._slot_uid(0), code._slot_uid(code._MAX_SLOTS)
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/status", "rb") as f:
                status = dict(line.split(b":", 1) for line in f.read().splitlines() if b":" in line)
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if status[b"State"].split()[0] == b"Z":
            continue
        uid = int(status[b"Uid"].split()[0])
        if (lo <= uid < hi) if os.geteuid() == 0 else (_BOOT_MARK in cmdline):
            pids.append(int(entry.name))
    return pids


# ------------------------------------------------------------------------------------------ HumanEval

def test_load_humaneval_has_the_164_problems(problems):
    assert len(problems) == 164
    first = problems["HumanEval/0"]
    assert {"task_id", "prompt", "canonical_solution", "test", "entry_point"} <= set(first)


def test_the_canonical_humaneval_solutions_all_pass(problems):
    samples = [{"task_id": t, "completion": p["canonical_solution"]} for t, p in problems.items()]
    t0 = time.monotonic()
    res = grade_humaneval(samples, problems)
    dt = time.monotonic() - t0
    failed = [r for r in res["results"] if r["status"] != "passed"]
    assert not failed, failed[:3]
    assert res["pass@1"] == 1.0 and res["n_tasks"] == 164 and res["n_samples"] == 164
    assert "pass@10" not in res
    print(f"\n164 canonical HumanEval solutions in {dt:.1f} s ({164 / dt:.1f} samples/s, "
          f"{os.cpu_count()} workers)")


def test_empty_humaneval_bodies_all_fail(problems):
    # half the prompts get a `pass` body, the other half nothing at all (the docstring is the body)
    samples = [{"task_id": t, "completion": "    pass\n" if i % 2 == 0 else ""}
               for i, t in enumerate(problems)]
    t0 = time.monotonic()
    res = grade_humaneval(samples, problems)
    dt = time.monotonic() - t0
    assert res["pass@1"] == 0.0 and res["n_tasks"] == 164
    assert all(r["status"] == "failed" for r in res["results"]), \
        [r for r in res["results"] if r["status"] != "failed"][:3]
    print(f"\n164 empty HumanEval bodies in {dt:.1f} s ({164 / dt:.1f} samples/s)")


_TOY = {
    "toy/add": {"task_id": "toy/add", "prompt": "def add(a, b):\n", "entry_point": "add",
                "test": "def check(f):\n    assert f(2, 3) == 5\n    assert f(-1, 1) == 0\n"},
    "toy/neg": {"task_id": "toy/neg", "prompt": "def neg(a):\n", "entry_point": "neg",
                "test": "def check(f):\n    assert f(2) == -2\n"},
}


def test_grade_humaneval_with_several_samples_per_task_reports_pass_at_10():
    samples = [{"task_id": "toy/add", "completion": "    return a + b\n" if i < 3 else "    return a - b\n"}
               for i in range(10)]
    samples += [{"task_id": "toy/neg", "completion": "    return a\n"} for _ in range(10)]
    res = grade_humaneval(samples, _TOY, workers=2)
    assert res["n_tasks"] == 2 and res["n_samples"] == 20
    assert res["pass@1"] == pytest.approx((0.3 + 0.0) / 2)
    assert res["pass@10"] == pytest.approx((1.0 + 0.0) / 2)
    assert [r["task_id"] for r in res["results"]] == [s["task_id"] for s in samples]


def test_grade_humaneval_rejects_unknown_tasks_and_incomplete_samples():
    with pytest.raises(ValueError, match="toy/nope"):
        grade_humaneval([{"task_id": "toy/nope", "completion": ""}], _TOY)
    with pytest.raises(ValueError, match=r"sample 1: missing field 'completion'"):
        grade_humaneval([{"task_id": "toy/add", "completion": ""}, {"task_id": "toy/add"}], _TOY)


def test_load_samples_names_the_line_and_the_field(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text('{"task_id": "HumanEval/0", "completion": "    pass\\n"}\n\n'
                    '{"task_id": "HumanEval/1", "completion": ""}\n')
    assert [r["task_id"] for r in load_samples(good)] == ["HumanEval/0", "HumanEval/1"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"task_id": "HumanEval/0", "completion": "x"}\n{"task_id": "HumanEval/1"}\n')
    with pytest.raises(ValueError, match=rf"{bad}:2: missing field 'completion'"):
        load_samples(bad)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"task_id": "HumanEval/0", "completion": "x"}\n{not json\n')
    with pytest.raises(ValueError, match=rf"{broken}:2: not valid JSON"):
        load_samples(broken)


def test_check_function_needs_the_program_to_reach_its_end():
    prompt, test = "def f():\n", "def check(c):\n    assert c() == 2\n"
    assert check_function(prompt, "    return 2\n", test, "f").status == "passed"
    wrong = check_function(prompt, "    return 1\n", test, "f")
    assert wrong.status == "failed" and "AssertionError" in wrong.detail
    # leaving early with exit code 0 must not count as passing the tests that never ran
    for cheat in ("    return 1\nexit(0)\n", "    return 1\nimport sys\nsys.exit(0)\n",
                  "    return 1\nimport os\nos._exit(0)\n"):
        res = check_function(prompt, cheat, test, "f")
        assert res.status == "failed", (cheat, res)
    syntax = check_function(prompt, "    return (\n", test, "f")
    assert syntax.status == "failed" and "SyntaxError" in syntax.detail


# -------------------------------------------------------------------------------------------- pass@k

def _brute_pass_at_k(n: int, c: int, k: int) -> float:
    outcomes = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(outcomes[i] for i in s) for s in subsets) / len(subsets)


def test_pass_at_k_matches_a_brute_force_count():
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(_brute_pass_at_k(n, c, k), abs=1e-12), (n, c, k)
    assert pass_at_k(200, 13, 100) == pytest.approx(1 - comb(187, 100) / comb(200, 100), rel=1e-9)
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    with pytest.raises(ValueError):
        pass_at_k(5, 6, 1)
    with pytest.raises(ValueError):
        pass_at_k(5, 2, 6)


# ------------------------------------------------------------------------------------- I/O and asserts

_SUM = "a, b = map(int, input().split())\nprint(a + b)\n"


def test_check_io_compares_stdout_line_by_line():
    assert check_io(_SUM, [("1 2\n", "3\n"), ("10 -4", "6")]).status == "passed"
    # trailing whitespace per line and trailing blank lines do not matter
    assert check_io("print('a  ')\nprint('b')\nprint()\n", [("", "a\nb")]).status == "passed"
    assert check_io("print('x', end='')\nimport sys\nsys.exit(0)\n", [("", "x\n")]).status == "passed"
    wrong = check_io(_SUM, [("1 2\n", "3\n"), ("2 2\n", "5\n")])
    assert wrong.status == "failed" and "case 2/2" in wrong.detail and "'5'" in wrong.detail
    assert check_io("print(' a')\n", [("", "a")]).status == "failed"      # leading whitespace counts
    assert check_io("print(1)\nprint(2)\n", [("", "1\n")]).status == "failed"
    crash = check_io("raise SystemExit(3)\n", [("", "")])
    assert crash.status == "failed"
    slow = check_io("while True: pass\n", [("", "")], timeout=1)
    assert slow.status == "timeout"


def test_check_asserts_mbpp_style():
    prog = "def area(r):\n    return math.pi * r * r\n"
    tests = ["assert abs(area(1) - 3.14159) < 1e-3", "assert area(0) == 0"]
    assert check_asserts(prog, tests, setup="import math").status == "passed"
    res = check_asserts(prog, tests)                    # without the setup, `math` is undefined
    assert res.status == "failed" and "NameError" in res.detail
    res = check_asserts("def f(x):\n    return x\n", ["assert f(1) == 1", "assert f(2) == 3"])
    assert res.status == "failed" and "assert f(2) == 3" in res.detail


def test_run_program_stdin_exit_codes_and_output_tail():
    res = run_program("import sys\nprint(sys.stdin.read().upper())\n", stdin="hello\n")
    assert res.status == "passed" and "HELLO" in res.detail
    assert run_program("raise ValueError('boom')\n").status == "failed"
    res = run_program("print('x' * 1_000_000)\nraise SystemExit(1)\n")
    assert res.status == "failed" and len(res.detail) <= code.TAIL_BYTES + 10
    res = run_program("import sys\nwhile True: sys.stdout.write('y' * 65536)\n", timeout=20)
    assert res.status == "failed" and "File too large" in res.detail       # RLIMIT_FSIZE, not our RAM


# -------------------------------------------------------------------------------------------- sandbox

def test_sandbox_layers_are_active(info):
    assert info["cwd"] == info["workdir"]
    if os.geteuid() == 0:
        assert info["uid_drop"] and info["uid"] >= code._UID_BASE
    if info["netns"]:
        assert info["interfaces"] == ["lo"]


def test_infinite_loop_costs_only_its_timeout():
    t0 = time.monotonic()
    res = run_program("while True:\n    pass\n", timeout=2)
    assert res.status == "timeout"
    assert time.monotonic() - t0 < 6


def test_fork_bombs_are_contained(info):
    # the prelude's os.fork refuses outright
    res = run_program("import os\nwhile True:\n    os.fork()\n", timeout=3)
    assert res.status == "failed" and "os.fork is disabled" in res.detail
    # a bounded bomb with the real fork first: one process forks 200 sleepers; RLIMIT_NPROC stops it
    bounded = ("import posix, time\nok = 0\nfor i in range(200):\n    try:\n        pid = posix.fork()\n"
               "    except OSError:\n        continue\n    if pid == 0:\n        time.sleep(30)\n"
               "        posix._exit(0)\n    ok += 1\nprint(ok)\n")
    res = run_program(bounded, timeout=10)
    assert res.status == "passed", res
    assert int(res.detail.split()[-1]) < code.NPROC + 1
    assert not _sandbox_pids(), "the sleepers outlived their run"
    # now the real thing, never giving up: contained, killed at the timeout, nothing left behind
    bomb = "import posix\nwhile True:\n    try:\n        posix.fork()\n    except OSError:\n        pass\n"
    t0 = time.monotonic()
    res = run_program(bomb, timeout=3)
    assert res.status == "timeout"
    assert time.monotonic() - t0 < 10
    assert not _sandbox_pids()
    # and one that lets every process die of its own error
    res = run_program("import posix\nwhile True:\n    posix.fork()\n", timeout=3)
    assert res.status != "passed"
    assert not _sandbox_pids()


def test_huge_allocations_fail_cleanly():
    for prog in ("x = bytearray(10**10)\n", "x = ' ' * 10**10\n", "x = [0] * 10**10\n"):
        res = run_program(prog, timeout=5)
        assert res.status == "failed" and "MemoryError" in res.detail, res


def test_network_is_unreachable(info):
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    srv.setblocking(False)
    port = srv.getsockname()[1]
    try:
        res = run_program(f"import socket\ns = socket.socket()\ns.connect(('127.0.0.1', {port}))\n")
        assert res.status == "failed" and "socket.socket is disabled" in res.detail
        res = run_program(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\n")
        assert res.status == "failed"
        # bypassing the prelude with the C module: only the network namespace stops this one
        raw = (f"import _socket\ns = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)\ns.settimeout(2)\n"
               f"s.connect(('127.0.0.1', {port}))\nprint('connected')\n")
        res = run_program(raw, timeout=5)
        if info["netns"]:
            assert res.status == "failed" and "unreachable" in res.detail, res
            with pytest.raises(BlockingIOError):
                srv.accept()
    finally:
        srv.close()


@pytest.mark.parametrize("namespaces", [True, False], ids=["namespaced", "no-namespaces"])
def test_files_outside_the_sandbox_cannot_be_deleted(tmp_path, monkeypatch, namespaces):
    if os.geteuid() != 0:
        pytest.skip("as a normal user the sandbox runs as that user: only the prelude guards its files")
    if not namespaces:
        monkeypatch.setenv("MOBILELLM_SANDBOX_NO_NAMESPACES", "1")
    sentinel = tmp_path / "sentinel.txt"
    sentinel.write_text("keep me")
    for attempt in ("import os\nos.remove(PATH)\n", "import posix\nposix.unlink(PATH)\n",
                    "import posix\nposix.rename(PATH, PATH + '.moved')\n",
                    "import posix\nposix.truncate(PATH, 0)\n",
                    "import shutil\nshutil.rmtree(DIR)\n",
                    "import posix\nposix.rmdir(DIR)\n"):
        prog = f"PATH = {str(sentinel)!r}\nDIR = {str(tmp_path)!r}\n" + attempt
        res = run_program(prog, timeout=5)
        assert res.status == "failed", (attempt, res)
        assert sentinel.read_text() == "keep me"
    if not namespaces:
        # /tmp is shared here and the sandbox can see the file: only the dropped uid protects it
        res = run_program(f"import os\nprint(os.path.exists({str(sentinel)!r}))\n")
        assert res.status == "passed" and "True" in res.detail
        res = run_program(f"import posix\nposix.unlink({str(sentinel)!r})\n")
        assert "PermissionError" in res.detail
    assert sentinel.read_text() == "keep me"


def test_the_sandbox_cannot_write_outside_its_directory():
    res = run_program("import os\nopen('/sandbox-probe-' + str(os.getpid()), 'w')\n")
    try:
        assert res.status == "failed" and ("PermissionError" in res.detail or "Read-only" in res.detail)
    finally:
        for name in os.listdir("/"):
            if name.startswith("sandbox-probe-"):
                os.unlink("/" + name)
    res = run_program("open('scratch.txt', 'w').write('ok')\nprint(open('scratch.txt').read())\n")
    assert res.status == "passed" and "ok" in res.detail


def test_the_harness_survives_hostile_programs_and_leaves_nothing_behind(monkeypatch):
    made, real_mkdtemp = [], tempfile.mkdtemp

    def mkdtemp(*args, **kwargs):
        made.append(real_mkdtemp(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(code.tempfile, "mkdtemp", mkdtemp)
    hostile = ["while True:\n    pass\n", "import posix\nwhile True:\n    try:\n        posix.fork()\n"
               "    except OSError:\n        pass\n", "x = bytearray(10**10)\n",
               "import os\nos.kill(os.getpid(), 9)\n", "import os\nos.system('echo hi')\n",
               "import subprocess\nsubprocess.run(['true'])\n", "import time\ntime.sleep(60)\n"]
    t0 = time.monotonic()
    results = [run_program(p, timeout=2) for p in hostile]
    assert all(r.status != "passed" for r in results), results
    assert time.monotonic() - t0 < 2 * len(hostile) + 10
    assert run_program("print(sum(range(10)))\n").detail.strip() == "45"
    assert check_function("def f():\n", "    return 1\n", "def check(c):\n    assert c() == 1\n",
                          "f").status == "passed"
    assert not _sandbox_pids()
    assert len(made) == len(hostile) + 2 and not [d for d in made if os.path.exists(d)]


def test_sandbox_info_is_json_serialisable(info):
    json.dumps(info)


def test_a_namespace_set_up_failure_falls_back_to_the_other_layers(monkeypatch):
    if os.geteuid() != 0:
        pytest.skip("namespaces are set up this way only as root")
    broken = code._BOOTSTRAP.replace('"size=%dm,mode=1777"', '"no-such-option=%d"')
    assert broken != code._BOOTSTRAP
    monkeypatch.setattr(code, "_BOOTSTRAP", broken)
    monkeypatch.setattr(code, "_namespaces_broken", False)
    with pytest.warns(RuntimeWarning, match="namespace set-up failed"):
        res = run_program("import os\nprint(os.getuid())\n")
    assert res.status == "passed" and int(res.detail) >= code._UID_BASE
    assert code._namespaces_broken
    info = sandbox_info()                       # later runs skip the namespaces without trying again
    assert info["ok"] and not info["mntns"] and info["uid_drop"]


def test_namespaces_are_in_force_wherever_the_kernel_allows_them(info):
    """Isolation must not silently fall back when it is available: a checkout or interpreter under /tmp
    once made the private-/tmp set-up fail and every run went on without network/mount namespaces."""
    import shutil

    if os.geteuid() != 0 or not shutil.which("unshare") or \
            subprocess.run(["unshare", "--net", "--mount", "true"], capture_output=True).returncode != 0:
        pytest.skip("this machine does not allow new network/mount namespaces")
    assert info["netns"] and info["mntns"] and info["uid_drop"], info
