"""Hugging Face interop: a directory ``transformers.AutoModelForCausalLM.from_pretrained`` loads as
``Llama4ForCausalLM`` (``model_type: llama4_text``), and the way back.

Export writes ``config.json`` (dense Llama-4 text settings: no MoE layers, RoPE and full attention on every
layer, no attention temperature tuning, QK-norm on, tied embeddings), ``generation_config.json``,
``model.safetensors`` with HF names (``model.embed_tokens.weight``, ``model.layers.N.self_attn.q_proj.weight``,
``model.layers.N.feed_forward.gate_proj.weight``, ``model.layers.N.input_layernorm.weight``,
``model.layers.N.post_attention_layernorm.weight``, ``model.norm.weight``; no ``lm_head.weight`` when tied)
and, when given a folder of tokenizer files, copies of them.

``export_hf(..., arch="qwen3")`` writes ``Qwen3ForCausalLM`` instead (q/k rows permuted to half-split
order, unit q/k norm weights; :func:`qwen3_tensors`), the class other inference engines run.

No q/k permutation is needed for Llama 4: HF's Llama 4 applies RoPE to interleaved pairs (``view_as_complex`` on
``reshape(..., -1, 2)``), the same convention as ours; the parity tests check it numerically.

Weight sharing (MobileLLM-LS) has no HF equivalent, so export writes each shared block twice, as two
consecutive HF layers (2·n_layers layers in all). Import recognises a model whose layers come in
bit-identical consecutive pairs and folds it back into a weight-sharing model (``detect_sharing``).

Import reads single-file or sharded (``model.safetensors.index.json``) safetensors, with or without
``lm_head.weight`` (ignored when embeddings are tied), in any float dtype, e.g. a downloaded MobileLLM-R1.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from ..config import MODEL_PRESETS, ModelConfig
from ..tokenizer import implied_tokenizer
from .io import (CheckpointError, atomic_dir, check_tensors, expected_shapes, load_model, model_from_tensors,
                 model_tensors, read_config_json, read_meta, resolve_tokenizer_spec, save_model, write_json)
from .transformer import Transformer

# Files export writes itself; a tokenizer folder's copies of these are skipped.
_OWN_FILES = {"config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json"}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                    "chat_template.jinja", "chat_template.json")
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


# ------------------------------------------------------------------------------------------- config


def _token_id(cfg: ModelConfig, i: int) -> int | None:
    return i if 0 <= i < cfg.vocab_size else None


def _eos_ids(cfg: ModelConfig) -> list[int]:
    return [i for i in cfg.eos_ids if 0 <= i < cfg.vocab_size]


def _shape_config(cfg: ModelConfig, n: int) -> dict[str, Any]:
    """The ``config.json`` fields Llama4 and Qwen3 spell alike."""
    return {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "num_hidden_layers": n,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "initializer_range": cfg.init_std,
        "rms_norm_eps": cfg.norm_eps,
        "use_cache": True,
        "bos_token_id": _token_id(cfg, cfg.bos_id),
        "eos_token_id": _eos_ids(cfg),
        "pad_token_id": _token_id(cfg, cfg.pad_id),
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        # Both spellings: transformers 5 reads rope_parameters, 4.x reads rope_theta.
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
    }


def hf_config(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """``config.json`` for ``Llama4ForCausalLM`` with ``cfg``'s shape (weight sharing unrolled). Special
    token ids outside the vocabulary (a small test vocabulary with Llama-3 ids) are written as null:
    HF's embedding rejects an out-of-range ``pad_token_id``."""
    n = cfg.n_layers * (2 if cfg.weight_sharing else 1)
    return {
        "architectures": ["Llama4ForCausalLM"],
        "model_type": "llama4_text",
        **_shape_config(cfg, n),
        # Dense layers use intermediate_size_mlp; intermediate_size sizes MoE experts (none here).
        "intermediate_size": cfg.ffn_dim,
        "intermediate_size_mlp": cfg.ffn_dim,
        "use_qk_norm": cfg.qk_norm,
        "no_rope_layers": [1] * n,
        "layer_types": ["full_attention"] * n,
        # null, not the context length: vLLM builds chunked local attention from any number here, while
        # transformers and our loader read null as full attention (old exports with the length still load).
        "attention_chunk_size": None,
        "attn_temperature_tuning": False,
        "floor_scale": 8192,
        "attn_scale": 0.1,
        "moe_layers": [],
        "interleave_moe_layer_step": 0,
        "num_local_experts": 0,
        "num_experts_per_tok": 0,
        "output_router_logits": False,
        "router_aux_loss_coef": 0.001,
        "router_jitter_noise": 0.0,
        "dtype": _DTYPE_NAMES.get(dtype, "float32"),
    }


ARCHS = ("llama4", "qwen3")


def qwen3_config(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """``config.json`` for ``Qwen3ForCausalLM`` with ``cfg``'s shape (weight sharing unrolled). Qwen3 has
    q/k RMSNorm before half-split RoPE; see :func:`qwen3_tensors` for why that is our decoder."""
    if not cfg.qk_norm:
        raise CheckpointError("a qwen3 export needs a QK-norm model (qwen3 always normalises q and k); "
                              "use --arch llama4")
    n = cfg.n_layers * (2 if cfg.weight_sharing else 1)
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        **_shape_config(cfg, n),
        "intermediate_size": cfg.ffn_dim,
        "rope_scaling": None,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": n,
        "layer_types": ["full_attention"] * n,
        "dtype": _DTYPE_NAMES.get(dtype, "float32"),
    }


def generation_config(cfg: ModelConfig) -> dict[str, Any]:
    return {"bos_token_id": _token_id(cfg, cfg.bos_id), "eos_token_id": _eos_ids(cfg),
            "pad_token_id": _token_id(cfg, cfg.pad_id)}


def config_from_hf(hf: dict[str, Any], where: str = "config.json") -> ModelConfig:
    """Our :class:`ModelConfig` from an HF ``llama4_text`` config; anything our dense decoder cannot run
    (MoE layers, NoPE layers, chunked attention shorter than the context, RoPE scaling) is an error."""
    def bad(msg: str) -> CheckpointError:
        return CheckpointError(f"{where}: {msg}")

    if hf.get("model_type") != "llama4_text":
        raise bad(f"model_type is {hf.get('model_type')!r}, expected 'llama4_text'")
    try:
        n = int(hf["num_hidden_layers"])
        dim = int(hf["hidden_size"])
        heads = int(hf["num_attention_heads"])
        vocab = int(hf["vocab_size"])
    except KeyError as e:
        raise bad(f"missing key {e.args[0]!r}") from None
    kv = int(hf.get("num_key_value_heads") or heads)
    head_dim = int(hf.get("head_dim") or dim // heads)
    ffn = hf.get("intermediate_size_mlp") or hf.get("intermediate_size")
    if not ffn:
        raise bad("missing key 'intermediate_size_mlp'")
    if hf.get("hidden_act", "silu") != "silu":
        raise bad(f"hidden_act {hf['hidden_act']!r} is not supported (silu only)")
    if hf.get("attention_bias"):
        raise bad("attention_bias is not supported")
    moe = hf.get("moe_layers")
    if moe is None:
        step = int(hf.get("interleave_moe_layer_step", 1))
        moe = list(range(step - 1, n, step)) if step > 0 else []
    if moe:
        raise bad(f"MoE layers {moe} are not supported (dense models only)")
    no_rope = hf.get("no_rope_layers")
    if no_rope is None:
        interval = int(hf.get("no_rope_layer_interval", 4))
        no_rope = [int((i + 1) % interval != 0) for i in range(n)]
    if not all(no_rope[:n]):
        raise bad(f"NoPE layers (no_rope_layers has 0 at {[i for i, x in enumerate(no_rope[:n]) if not x]}) "
                  "are not supported")
    max_pos = int(hf.get("max_position_embeddings", 4096))
    chunk = hf.get("attention_chunk_size")
    for i, t in enumerate(hf.get("layer_types") or ["chunked_attention"] * n):
        if t == "full_attention" or (t == "chunked_attention" and (chunk is None or int(chunk) >= max_pos)):
            continue
        raise bad(f"layer {i} has attention type {t!r} (chunk size {chunk}); only full attention is supported")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise bad(f"RoPE type {rope.get('rope_type', rope.get('type'))!r} is not supported")
    theta = float(rope.get("rope_theta") or hf.get("rope_theta") or 500000.0)
    eos = hf.get("eos_token_id")
    eos_ids = [] if eos is None else ([int(eos)] if isinstance(eos, int) else [int(e) for e in eos])
    bos = hf.get("bos_token_id")
    pad = hf.get("pad_token_id")
    return ModelConfig(
        vocab_size=vocab, dim=dim, n_layers=n, n_heads=heads, n_kv_heads=kv, head_dim=head_dim, ffn_dim=int(ffn),
        rope_theta=theta, max_seq_len=max_pos, norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), qk_norm=bool(hf.get("use_qk_norm", True)),
        init_std=float(hf.get("initializer_range", 0.02)),
        bos_id=-1 if bos is None else int(bos), eos_ids=eos_ids,
        pad_id=(eos_ids[0] if eos_ids else -1) if pad is None else int(pad),
    )


_SHAPE_KEYS = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim")


def _matching_preset(cfg: ModelConfig) -> str:
    """The preset whose shape (Table 1 fields the preset sets; the CPU presets leave the vocabulary to the
    tokenizer) ``cfg`` has, else ""."""
    for name, p in MODEL_PRESETS.items():
        if all(p[k] == getattr(cfg, k) for k in _SHAPE_KEYS if k in p):
            return name
    return ""


# ------------------------------------------------------------------------------------------ tensors


def hf_tensors(model: Transformer) -> dict[str, torch.Tensor]:
    """The model's weights under HF names; a shared block appears as two layers (copies, as safetensors
    refuses tensors that share memory)."""
    ours = model_tensors(model)
    out: dict[str, torch.Tensor] = {}
    for name, t in ours.items():
        if not name.startswith("layers."):
            out["lm_head.weight" if name == "lm_head.weight" else f"model.{name}"] = t
    for j, li in enumerate(model.schedule):
        prefix = f"layers.{li}."
        for name, t in ours.items():
            if name.startswith(prefix):
                dup = j > 0 and model.schedule[j - 1] == li
                out[f"model.layers.{j}.{name[len(prefix):]}"] = t.clone() if dup else t
    return out


def qwen3_tensors(model: Transformer) -> dict[str, torch.Tensor]:
    """The model's weights under ``Qwen3ForCausalLM`` names. Our weightless QK-norm after interleaved RoPE
    equals Qwen3's unit-weight q/k RMSNorm before half-split RoPE: RoPE rotates pairs, so it keeps each
    head's RMS and commutes with the norm (same eps), and permuting each head's q/k output rows from
    interleaved to half-split order (the GGUF export's permutation) makes rotate_half rotate our pairs.
    The q.k dot product is a sum over dims, so the permutation leaves attention scores unchanged."""
    from .gguf import to_half_split

    cfg = model.cfg
    out: dict[str, torch.Tensor] = {}
    for name, t in hf_tensors(model).items():
        m = _LAYER.match(name)
        if m and m.group(2) in ("self_attn.q_proj.weight", "self_attn.k_proj.weight"):
            heads = cfg.n_heads if m.group(2).startswith("self_attn.q") else cfg.n_kv_heads
            t = to_half_split(t, heads).contiguous()
        elif m and m.group(2).startswith("feed_forward."):
            name = f"model.layers.{m.group(1)}.mlp.{m.group(2).removeprefix('feed_forward.')}"
        out[name] = t
        if m and m.group(2) == "self_attn.q_proj.weight":
            for norm in ("q_norm", "k_norm"):
                out[f"model.layers.{m.group(1)}.self_attn.{norm}.weight"] = torch.ones(
                    cfg.head_dim, dtype=t.dtype, device=t.device)
    return out


def read_hf_tensors(hf_dir: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of an HF directory: ``model.safetensors`` or the shards listed in
    ``model.safetensors.index.json``."""
    from safetensors.torch import load_file

    hf_dir = Path(hf_dir)
    single, index = hf_dir / "model.safetensors", hf_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a safetensors index ({e})") from None
        out: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            p = hf_dir / shard
            if not p.is_file():
                raise CheckpointError(f"{index} lists shard {shard!r}, which is missing")
            out.update(load_file(str(p)))
        missing = sorted(set(weight_map) - set(out))
        if missing:
            raise CheckpointError(f"{index}: tensor {missing[0]!r} is listed but not in its shard")
        return out
    if single.is_file():
        return load_file(str(single))
    raise CheckpointError(f"{hf_dir}: no model.safetensors or model.safetensors.index.json")


def _fold_sharing(cfg: ModelConfig, tensors: dict[str, torch.Tensor]) -> bool:
    """True when HF layers come in bit-identical consecutive pairs (an exported weight-sharing model)."""
    if cfg.n_layers < 2 or cfg.n_layers % 2:
        return False
    by_layer: dict[int, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        m = _LAYER.match(name)
        if m:
            by_layer.setdefault(int(m.group(1)), {})[m.group(2)] = t
    for i in range(0, cfg.n_layers, 2):
        a, b = by_layer.get(i, {}), by_layer.get(i + 1, {})
        if not a or a.keys() != b.keys() or not all(torch.equal(a[k], b[k]) for k in a):
            return False
    return True


def load_hf(hf_dir: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
            detect_sharing: bool = True) -> Transformer:
    """Our :class:`Transformer` from an HF ``Llama4ForCausalLM`` directory (dense, RoPE on every layer)."""
    hf_dir = Path(hf_dir)
    cfg_path = hf_dir / "config.json"
    hf = read_config_json(cfg_path, f"{hf_dir}: no config.json")
    cfg = config_from_hf(hf, str(cfg_path))
    tensors = read_hf_tensors(hf_dir)
    where = str(hf_dir)
    # Check against the unrolled HF layout first, so errors name HF tensors.
    want = {("lm_head.weight" if k == "lm_head.weight" else f"model.{k}"): s for k, s in expected_shapes(cfg).items()}
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    if cfg.tie_embeddings and "lm_head.weight" in got:
        want["lm_head.weight"] = want["model.embed_tokens.weight"]  # tied: present on disk but unused
    check_tensors(want, got, where)
    if cfg.tie_embeddings:
        tensors.pop("lm_head.weight", None)
    shared = detect_sharing and _fold_sharing(cfg, tensors)
    if shared:
        cfg.n_layers //= 2
        cfg.weight_sharing = True
    cfg.preset = _matching_preset(cfg)
    ours: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        m = _LAYER.match(name)
        if m:
            j = int(m.group(1))
            if shared and j % 2:
                continue
            ours[f"layers.{j // 2 if shared else j}.{m.group(2)}"] = t
        else:
            ours[name if name == "lm_head.weight" else name.removeprefix("model.")] = t
    return model_from_tensors(cfg, ours, where, device=device, dtype=dtype)


# --------------------------------------------------------------------------------------- entry points


def _as_model(src: Transformer | str | Path) -> tuple[Transformer, Path | None]:
    """The model, and the folder of HF tokenizer files its checkpoint's tokenizer spec points at, if any."""
    if isinstance(src, Transformer):
        return src, None
    model, meta = load_model(src)
    spec = resolve_tokenizer_spec(src, meta["tokenizer"])
    p = Path(spec) if spec else None
    if p is not None and p.is_file() and p.name == "tokenizer.json":
        p = p.parent
    return model, p if p is not None and (p / "tokenizer.json").is_file() else None


def export_hf(src: Transformer | str | Path, out_dir: str | Path,
              tokenizer_files_dir: str | Path | None = None, dtype: torch.dtype | None = None,
              arch: str = "llama4") -> Path:
    """Write ``src`` (a model or our checkpoint directory) as an HF ``Llama4ForCausalLM`` directory, or
    with ``arch="qwen3"`` as ``Qwen3ForCausalLM`` (the class vLLM, SGLang, MLX and llama.cpp's converter
    all run; :func:`qwen3_tensors`). Our import reads llama4 exports only.

    ``tokenizer_files_dir``: a folder whose files (tokenizer.json, tokenizer_config.json, ...) are copied
    alongside. Without it, a checkpoint whose tokenizer spec is a ``tokenizer.json`` folder/file has those
    tokenizer files copied; the built-in ``llama3``/``smollm2`` specs have no HF files to copy."""
    from safetensors.torch import save_file

    if arch not in ARCHS:
        raise CheckpointError(f"unknown export arch {arch!r}; choose one of {', '.join(ARCHS)}")
    model, spec_dir = _as_model(src)
    tensors, config = ((qwen3_tensors(model), qwen3_config) if arch == "qwen3"
                       else (hf_tensors(model), hf_config))
    if dtype is not None:
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    out_dtype = next(iter(tensors.values())).dtype
    tensors = {k: v.cpu().contiguous() for k, v in tensors.items()}
    tok_dir = Path(tokenizer_files_dir) if tokenizer_files_dir else None
    if tok_dir is not None and not tok_dir.is_dir():
        raise CheckpointError(f"tokenizer files directory not found: {tok_dir}")
    names = None  # copy every file of an explicit folder, only tokenizer files of a spec's folder
    if tok_dir is None and spec_dir is not None:
        tok_dir, names = spec_dir, set(_TOKENIZER_FILES)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        write_json(tmp / "config.json", config(model.cfg, out_dtype))
        write_json(tmp / "generation_config.json", generation_config(model.cfg))
        if tok_dir is not None:
            for f in sorted(tok_dir.iterdir()):
                if f.is_file() and f.name not in _OWN_FILES and (names is None or f.name in names):
                    shutil.copy2(f, tmp / f.name)
        elif not isinstance(src, Transformer) and (spec := read_meta(src).get("tokenizer")):
            # a built-in spec (llama3, smollm2, a .gguf): write HF files with the chat template, so
            # AutoTokenizer + apply_chat_template reproduce our chat rendering
            from ..tokenizer import load_tokenizer, save_hf_tokenizer

            save_hf_tokenizer(load_tokenizer(spec), tmp)
    return out_dir


def import_hf(hf_dir: str | Path, out_dir: str | Path, tokenizer_spec: str | None = None,
              dtype: torch.dtype | None = None, detect_sharing: bool = True) -> tuple[Path, Transformer, str]:
    """Convert an HF directory into our checkpoint at ``out_dir``. The tokenizer spec defaults to
    ``"llama3"`` for the Llama-3 vocabulary (128,256 ids, bos 128000, as MobileLLM-R1); otherwise the HF
    tokenizer files are copied into ``out_dir/tokenizer`` and the spec is that relative folder."""
    hf_dir = Path(hf_dir)
    model = load_hf(hf_dir, dtype=dtype, detect_sharing=detect_sharing)
    spec = tokenizer_spec
    tok_files = [hf_dir / f for f in _TOKENIZER_FILES if (hf_dir / f).is_file()]
    if spec is None:
        if implied_tokenizer(model.cfg.vocab_size, model.cfg.bos_id):
            spec, tok_files = "llama3", []
        elif (hf_dir / "tokenizer.json").is_file():
            spec = "tokenizer"
        else:
            spec, tok_files = "", []
    elif spec != "tokenizer":
        tok_files = []
    save_model(out_dir, model, tokenizer_spec=spec, extra_files={f"tokenizer/{f.name}": f for f in tok_files})
    return Path(out_dir), model, spec
