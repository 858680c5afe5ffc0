"""Training checkpoints: ``<out>/checkpoints/step_NNNNNNNN/`` holding

- ``model.safetensors`` + ``config.json``: the model, in the format :func:`mobilellm_r1.model.io.load_model`
  reads (so any step directory is also a usable model checkpoint);
- ``optim.pt``: the optimizer state (full, by parameter name: independent of DDP/FSDP and world size);
- ``rng.pt``: every rank's RNG states (torch, CUDA, numpy, python);
- ``trainer_state.json``: step, tokens seen, every rank's sampler state, the stage and its schedule.

A directory is written under a temporary name and renamed (``model.io.atomic_dir``), so a killed run never
leaves a half-written checkpoint under a real name; only the newest ``keep`` are kept, and older ones are
pruned only after the new one is complete. A full disk (or quota, or file-size limit) removes the temporary
directory and raises :class:`~mobilellm_r1.faults.DiskFullError` with the checkpoint's size. Loading
validates everything before anything is changed, and a damaged checkpoint is reported by name and left in
place.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import ModelConfig
from ..faults import NonFiniteError, disk_full_error
from ..model.io import CONFIG, WEIGHTS, CheckpointError, atomic_dir, write_json, write_model_files

STATE = "trainer_state.json"
OPTIM = "optim.pt"
RNG = "rng.pt"
_STEP_RE = re.compile(r"^step_(\d{8})$")


def checkpoints_dir(out: str | Path) -> Path:
    return Path(out) / "checkpoints"


def list_checkpoints(out: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoint directories (temporary ones are hidden and never match), oldest first."""
    root = checkpoints_dir(out)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_RE.match(p.name)) and p.is_dir()]
    return sorted(found)


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(out: str | Path, step: int, *, model_state: dict[str, torch.Tensor], cfg: ModelConfig,
                    tokenizer: str, optim_state: dict[str, Any], rng_states: list[dict[str, Any]],
                    trainer_state: dict[str, Any], keep: int) -> Path:
    target = checkpoints_dir(out) / f"step_{step:08d}"
    if not all_finite(model_state):  # --resume must always find weights worth continuing from
        raise NonFiniteError(f"step {step}: the weights are not finite: checkpoint not written (--resume keeps "
                             "the previous one). Lower the lr")
    try:
        with atomic_dir(target) as tmp:
            write_model_files(tmp, model_state, cfg, tokenizer)
            for name, obj in ((OPTIM, optim_state), (RNG, rng_states)):
                with open(tmp / name, "wb") as f:  # a Python file: torch.save then keeps a full disk's OSError
                    torch.save(obj, f)
            write_json(tmp / STATE, {**trainer_state, "step": step})  # written last: its presence marks completion
    except Exception as e:
        full = disk_full_error(e, f"checkpoint step {step}", target.parent,
                               tensor_bytes([model_state, optim_state, rng_states]))
        if full is not None:
            raise full from None
        raise
    if keep > 0:
        for _, old in list_checkpoints(out)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return target


def publish_final(step_dir: Path, final: Path) -> Path:
    """Copy a checkpoint's model files to ``final`` (the stage's result), atomically; a full disk leaves the
    previous ``final`` and raises :class:`~mobilellm_r1.faults.DiskFullError`."""
    names = (WEIGHTS, CONFIG, STATE)
    try:
        with atomic_dir(final) as tmp:
            for name in names:
                shutil.copy2(step_dir / name, tmp / name)
    except Exception as e:
        full = disk_full_error(e, "the final model", final.parent, sum((step_dir / n).stat().st_size for n in names))
        if full is not None:
            raise full from None
        raise
    return final


def all_finite(tensors: dict[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in tensors.values() if v.is_floating_point())


def tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors and arrays in a nest of dicts/lists/tuples: about what a checkpoint of it takes."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, np.ndarray):
        return obj.nbytes
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read and validate a checkpoint directory. Returns ``{"model", "optim", "rng", "state"}``; raises
    :class:`CheckpointError` naming the damaged file (nothing on disk is touched)."""
    from safetensors.torch import load_file

    path = Path(path)
    for name in (STATE, WEIGHTS, CONFIG, OPTIM, RNG):
        if not (path / name).is_file():
            raise CheckpointError(f"corrupt checkpoint {path}: {name} is missing")
    try:
        state = json.loads((path / STATE).read_text())
        step = int(state["step"])
    except (json.JSONDecodeError, KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"corrupt checkpoint {path}: {STATE} is unreadable ({e})") from None
    try:
        model = load_file(str(path / WEIGHTS))
    except Exception as e:  # safetensors raises its own error types for truncated/garbled files
        raise CheckpointError(f"corrupt checkpoint {path}: {WEIGHTS} is unreadable ({e})") from None
    try:
        optim = torch.load(path / OPTIM, map_location="cpu", weights_only=False)
        rng = torch.load(path / RNG, map_location="cpu", weights_only=False)
    except Exception as e:
        raise CheckpointError(f"corrupt checkpoint {path}: optimizer/RNG state is unreadable ({e})") from None
    state["step"] = step
    return {"model": model, "optim": optim, "rng": rng, "state": state}
