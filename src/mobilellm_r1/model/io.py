"""Our checkpoint directory: ``model.safetensors`` + ``config.json``.

``config.json`` is ``{"format": "mobilellm-r1", "model": <ModelConfig as a dict>, "tokenizer": <spec>}``.
The tokenizer spec is what :func:`mobilellm_r1.tokenizer.load_tokenizer` takes (``"llama3"``, ``"smollm2"``,
a path); a relative path is resolved against the checkpoint directory (see :func:`resolve_tokenizer_spec`).

Every directory is written into a temporary sibling and renamed into place, so a crash never leaves a
half-written checkpoint under the target name; an existing directory is moved aside first and removed
only after the new one is in place.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch

from ..config import ConfigError, ModelConfig, build, to_dict
from .transformer import Transformer

FORMAT = "mobilellm-r1"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read as asked (missing file, missing/unexpected/wrong-shaped tensor)."""


@contextlib.contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary directory next to ``target``; on success it replaces ``target``."""
    target = Path(target).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp = target.parent / f".{target.name}.tmp-{tag}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if target.exists() or target.is_symlink():
        if not target.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(f"{target} exists and is not a directory")
        old = target.parent / f".{target.name}.old-{tag}"
        os.replace(target, old)
    try:
        os.replace(tmp, target)
    except BaseException:
        if old is not None:
            os.replace(old, target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def model_tensors(model: Transformer) -> dict[str, torch.Tensor]:
    """The model's parameters by name (tied weights once), contiguous and detached."""
    return {name: p.detach().contiguous() for name, p in model.named_parameters()}


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        m = Transformer(cfg)
    return {name: tuple(p.shape) for name, p in m.named_parameters()}


def check_tensors(expected: Mapping[str, tuple[int, ...]], got: Mapping[str, tuple[int, ...]], where: str) -> None:
    """Raise :class:`CheckpointError` naming the first missing, wrong-shaped or unexpected tensor."""
    for name, shape in expected.items():
        if name not in got:
            raise CheckpointError(f"{where}: missing tensor {name!r} (expected shape {list(shape)})")
        if tuple(got[name]) != tuple(shape):
            raise CheckpointError(f"{where}: tensor {name!r} has shape {list(got[name])}, expected {list(shape)}")
    extra = sorted(set(got) - set(expected))
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise CheckpointError(f"{where}: unexpected tensor {extra[0]!r} with shape {list(got[extra[0]])}{more}")


def model_from_tensors(cfg: ModelConfig, tensors: Mapping[str, torch.Tensor], where: str,
                       device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> Transformer:
    """Build a :class:`Transformer` for ``cfg`` holding ``tensors`` (checked by name and shape)."""
    check_tensors(expected_shapes(cfg), {k: tuple(v.shape) for k, v in tensors.items()}, where)
    with torch.device("meta"):
        model = Transformer(cfg)
    state = {k: v.to(device=device, dtype=dtype or v.dtype) for k, v in tensors.items()}
    model.load_state_dict(state, strict=True, assign=True)
    model.set_rope()  # the tables were built on the meta device
    return model.eval()


def write_model_files(path: Path, tensors: Mapping[str, torch.Tensor], cfg: ModelConfig, tokenizer: str) -> None:
    """``model.safetensors`` + ``config.json`` into an existing directory."""
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path / WEIGHTS),
              metadata={"format": "pt"})
    write_json(path / CONFIG, {"format": FORMAT, "model": to_dict(cfg), "tokenizer": tokenizer})


def save_model(path: str | Path, model: Transformer, tokenizer_spec: str = "",
               extra_files: Mapping[str, str | Path] | None = None) -> Path:
    """Write ``model`` as our checkpoint directory at ``path`` (atomically). ``extra_files`` maps relative
    names inside the checkpoint to files copied in (e.g. tokenizer files)."""
    path = Path(path)
    with atomic_dir(path) as tmp:
        write_model_files(tmp, model_tensors(model), model.cfg, tokenizer_spec)
        for rel, src in (extra_files or {}).items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, tmp / rel)
    return path


def read_config_json(cfg_path: Path, missing: str) -> dict[str, Any]:
    """A directory's ``config.json``; :class:`CheckpointError` with ``missing`` when absent, naming the
    file when it is not JSON."""
    if not cfg_path.is_file():
        raise CheckpointError(missing)
    try:
        return json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path}: invalid JSON: {e}") from None


def read_meta(path: str | Path) -> dict[str, Any]:
    """``config.json`` of our checkpoint, with ``meta["config"]`` the parsed :class:`ModelConfig`."""
    path = Path(path)
    cfg_path = path / CONFIG
    meta = read_config_json(cfg_path, f"{path} is not a checkpoint directory (no {CONFIG})")
    if meta.get("format") != FORMAT or "model" not in meta:
        hint = " (a Hugging Face directory? use `mobilellm-r1 model import`)" if "model_type" in meta else ""
        raise CheckpointError(f"{cfg_path}: not a {FORMAT} checkpoint{hint}")
    try:
        meta["config"] = build(ModelConfig, meta["model"], f"{cfg_path}:model")
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    meta.setdefault("tokenizer", "")
    return meta


def load_model(path: str | Path, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None) -> tuple[Transformer, dict[str, Any]]:
    """Load our checkpoint directory. Returns ``(model in eval mode, meta)``; ``meta`` is the parsed
    ``config.json`` plus ``meta["config"]`` (the :class:`ModelConfig`). ``dtype`` None keeps the stored dtype."""
    from safetensors.torch import load_file

    path = Path(path)
    meta = read_meta(path)
    weights = path / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{path}: no {WEIGHTS}")
    tensors = load_file(str(weights), device=str(device) if str(device) != "meta" else "cpu")
    model = model_from_tensors(meta["config"], tensors, str(weights), device=device, dtype=dtype)
    return model, meta


def resolve_tokenizer_spec(ckpt_dir: str | Path, spec: str) -> str:
    """A relative tokenizer path is relative to the checkpoint directory when it exists there."""
    if spec and spec not in ("llama3", "smollm2") and not Path(spec).is_absolute():
        cand = Path(ckpt_dir) / spec
        if cand.exists():
            return str(cand)
    return spec
