import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_BENCH = REPO.parent / "shared" / "data" / "benchmarks"


def run_cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run the real console entry point in a subprocess."""
    res = subprocess.run([sys.executable, "-m", "mobilellm_r1", *map(str, args)],
                         capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if check and res.returncode != 0:
        raise AssertionError(f"mobilellm-r1 {' '.join(map(str, args))} failed ({res.returncode}):\n{res.stderr}")
    return res


def run_cli_json(*args: str):
    return json.loads(run_cli(*args, "--json").stdout)


@pytest.fixture
def shared_benchmarks() -> Path:
    if not SHARED_BENCH.is_dir():
        pytest.skip("../shared/data/benchmarks is absent (fresh clone)")
    return SHARED_BENCH
