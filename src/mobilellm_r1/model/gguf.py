"""Load a llama-architecture GGUF (llama.cpp's format; also the qwen3 form our QK-norm models export to)
into our :class:`Transformer`, and one entry point for any model a user names (:func:`load_any`).

The offline SmolLM2-135M-Instruct GGUF (``assets.smollm2_gguf()``, Q4_1 with a Q8_0 embedding) is the main
user: a real small LM that can act as teacher, scorer or answer writer on this CPU.

Names. GGUF -> ours: ``token_embd`` -> ``embed_tokens``, ``blk.N.attn_q/k/v/output`` ->
``layers.N.self_attn.q/k/v/o_proj``, ``blk.N.ffn_gate/up/down`` -> ``layers.N.feed_forward.*_proj``,
``blk.N.attn_norm`` -> ``input_layernorm``, ``blk.N.ffn_norm`` -> ``post_attention_layernorm``,
``output_norm`` -> ``norm``, ``output`` -> ``lm_head`` (absent: tied embeddings).

Shapes. ggml lists dimensions fastest-first (``[in, out]`` for a matrix); ``gguf`` hands the data over in
numpy order, so a dequantized matrix is ``(out, in)``, exactly ``nn.Linear``'s layout. Shapes are checked
against the model's parameter shapes under the GGUF names, so an error names the GGUF tensor.

RoPE. HF's Llama rotates the two *halves* of each head (``rotate_half``). ``convert_hf_to_gguf.py`` permutes
the q/k rows of every head so that llama.cpp's "normal" RoPE, which rotates *interleaved* pairs
``(x[2j], x[2j+1])``, computes the same thing. Our decoder also rotates interleaved pairs, so the stored
rows are already in our convention and are loaded as they are: **no un-permuting**. (Undoing the permutation
with :func:`to_half_split` gives HF's row order, which under our RoPE is wrong; the tests check both
numerically: the perplexity of English text is low with the stored order and much higher un-permuted.)

QK-norm (``qwen3``). llama.cpp's ``llama`` architecture has no QK-norm; its ``qwen3`` one is our decoder
with a learned per-head RMSNorm on q and k and NEOX (half-split) RoPE. :func:`mobilellm_r1.deploy.export.
export_gguf` writes our QK-norm models as ``qwen3`` with unit norm weights and half-split q/k rows; this
loader reads such files back (q/k rows re-interleaved with :func:`to_interleaved`) and refuses a qwen3 file
whose norm weights are not ones (a real Qwen3).

Config. From the ``<arch>.*`` metadata; ``qk_norm`` is on exactly for ``qwen3`` (plain llama has none); the vocabulary is the
token list's length; ``bos_id``/``pad_id`` come from ``tokenizer.ggml.*``. ``eos_ids`` is the GGUF's
``eos_token_id`` plus ``<|endoftext|>`` when the vocabulary has it (the document delimiter a base model
stops at, as :mod:`mobilellm_r1.tokenizer` also treats it). Without a padding id, pad is the first eos id
(the same fallback as the HF import). Anything our decoder cannot run (another architecture, partial
rotary, RoPE scaling, MoE, biases) is an error.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import ModelConfig
from ..tokenizer import implied_tokenizer
from .io import CONFIG, FORMAT, CheckpointError, check_tensors
from .transformer import Transformer

# GGUF tensor-name stems -> ours (per block and global).
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "feed_forward.gate_proj",
    "ffn_up": "feed_forward.up_proj",
    "ffn_down": "feed_forward.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_NAMES = {"token_embd": "embed_tokens", "output_norm": "norm", "output": "lm_head"}
SUPPORTED_ARCHS = ("llama", "qwen3")
QK_NORM_NAMES = ("attn_q_norm", "attn_k_norm")  # qwen3's per-head QK-norm weights (ours is weightless)


def gguf_name(ours: str) -> str:
    """The GGUF tensor name of one of our parameter names."""
    stem, _, suffix = ours.rpartition(".")  # suffix is "weight"
    if stem.startswith("layers."):
        _, n, rest = stem.split(".", 2)
        inv = {v: k for k, v in _BLOCK_NAMES.items()}
        return f"blk.{n}.{inv[rest]}.{suffix}"
    inv = {v: k for k, v in _GLOBAL_NAMES.items()}
    return f"{inv[stem]}.{suffix}"


def to_half_split(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Interleaved-pair order -> half-split order of the q/k rows of each head, for a ``(n_heads * head_dim,
    in)`` weight: undoes llama.cpp's llama permutation (our decoder does *not* want that, see the module
    docstring; the tests use it to prove the convention), and lays our rows out for qwen3's NEOX RoPE."""
    out, rest = w.shape[0], w.shape[1:]
    return w.reshape(n_heads, out // n_heads // 2, 2, *rest).transpose(1, 2).reshape(w.shape)


def to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of :func:`to_half_split`: HF's (and llama.cpp's NEOX RoPE's) half-split row order ->
    our interleaved-pair order, per head."""
    out, rest = w.shape[0], w.shape[1:]
    return w.reshape(n_heads, 2, out // n_heads // 2, *rest).transpose(1, 2).reshape(w.shape)


def qk_heads(name: str, cfg: ModelConfig) -> int:
    """The head count whose rows a q/k projection weight ``name`` (our naming) holds; 0 for anything else."""
    if name.endswith("q_proj.weight"):
        return cfg.n_heads
    return cfg.n_kv_heads if name.endswith("k_proj.weight") else 0


def _fields(reader) -> dict[str, Any]:
    out = {}
    for key, f in reader.fields.items():
        if key in ("tokenizer.ggml.merges", "tokenizer.ggml.token_type", "tokenizer.ggml.scores"):
            continue  # large and not needed here
        out[key] = f.contents()
    return out


def config_from_gguf(meta: dict[str, Any], tensor_names: set[str], where: str) -> ModelConfig:
    """Our :class:`ModelConfig` from GGUF metadata (``meta``: key -> value)."""
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise CheckpointError(f"{where}: GGUF architecture {arch!r} is not supported "
                              f"(only {', '.join(SUPPORTED_ARCHS)}: a plain llama decoder, or qwen3 as "
                              f"`mobilellm-r1 export --format gguf` writes our QK-norm decoder)")

    def get(key: str, default: Any = None, required: bool = False) -> Any:
        val = meta.get(f"{arch}.{key}", default)
        if val is None and required:
            raise CheckpointError(f"{where}: missing GGUF metadata key {arch}.{key!r}")
        return val

    dim = int(get("embedding_length", required=True))
    n_layers = int(get("block_count", required=True))
    heads = int(get("attention.head_count", required=True))
    kv = int(get("attention.head_count_kv") or heads)
    head_dim = int(get("attention.key_length") or dim // heads)
    if int(get("attention.value_length") or head_dim) != head_dim:
        raise CheckpointError(f"{where}: value head size {get('attention.value_length')} != key head size {head_dim}")
    rot = int(get("rope.dimension_count") or head_dim)
    if rot != head_dim:
        raise CheckpointError(f"{where}: partial rotary embedding ({rot} of {head_dim} dims) is not supported")
    scaling = get("rope.scaling.type")
    if scaling not in (None, "none") or "rope_freqs.weight" in tensor_names:
        raise CheckpointError(f"{where}: RoPE scaling ({scaling or 'rope_freqs.weight'}) is not supported")
    if int(get("expert_count") or 0):
        raise CheckpointError(f"{where}: MoE ({get('expert_count')} experts) is not supported (dense models only)")
    ffn = get("feed_forward_length", required=True)
    if isinstance(ffn, list):  # per-layer sizes
        if len(set(ffn)) != 1:
            raise CheckpointError(f"{where}: per-layer feed-forward sizes {sorted(set(ffn))} are not supported")
        ffn = ffn[0]
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = len(tokens) if tokens else get("vocab_size")
    if vocab is None:
        raise CheckpointError(f"{where}: no token list and no {arch}.vocab_size")
    eos = meta.get("tokenizer.ggml.eos_token_id")
    eos_ids = [] if eos is None else [int(eos)]
    if tokens and "<|endoftext|>" in tokens:
        eos_ids = sorted(set(eos_ids) | {tokens.index("<|endoftext|>")})
    bos = meta.get("tokenizer.ggml.bos_token_id")
    pad = meta.get("tokenizer.ggml.padding_token_id")
    if pad is None:
        pad = int(eos) if eos is not None else (eos_ids[0] if eos_ids else -1)
    return ModelConfig(
        vocab_size=int(vocab), dim=dim, n_layers=n_layers, n_heads=heads, n_kv_heads=kv, head_dim=head_dim,
        ffn_dim=int(ffn), rope_theta=float(get("rope.freq_base") or 10000.0),
        max_seq_len=int(get("context_length") or 4096),
        norm_eps=float(get("attention.layer_norm_rms_epsilon") or 1e-5),
        tie_embeddings="output.weight" not in tensor_names, qk_norm=arch == "qwen3",
        bos_id=-1 if bos is None else int(bos), eos_ids=eos_ids, pad_id=int(pad),
    )


def _dequantize(t) -> np.ndarray:
    from gguf import GGMLQuantizationType, quants

    data = t.data.view(np.ndarray)  # a plain array: numpy's memmap subclass makes block slicing ~2x slower
    try:
        arr = quants.dequantize(data, t.tensor_type)
    except NotImplementedError as e:
        raise CheckpointError(f"tensor {t.name!r}: {e}") from None
    if t.tensor_type == GGMLQuantizationType.F32:
        arr = arr.copy()  # the reader's data is a read-only view of the memory-mapped file
    shape = tuple(int(d) for d in reversed(t.shape))  # ggml order is fastest-first
    return arr.reshape(shape)


def _check_unit_qk_norm(by_name: dict[str, Any], cfg: ModelConfig, where: str) -> None:
    """A qwen3 GGUF loads into our decoder only when its QK-norm weights are all ones (our QK-norm has no
    weight): a real Qwen3's learned ones are refused rather than dropped."""
    for i in range(cfg.n_layers):
        for stem in QK_NORM_NAMES:
            name = f"blk.{i}.{stem}.weight"
            if name not in by_name:
                raise CheckpointError(f"{where}: missing tensor {name!r} (expected shape [{cfg.head_dim}])")
            w = _dequantize(by_name[name])
            if w.shape != (cfg.head_dim,) or not np.allclose(w, 1.0):
                raise CheckpointError(f"{where}: {name} holds learned QK-norm weights; our decoder's QK-norm "
                                      "is weightless, so only qwen3 files with unit norms (as we export) load")


def is_smollm2_asset(path: str | Path) -> bool:
    from ..assets import SMOLLM2_GGUF, cache_dir

    try:
        return Path(path).resolve() == (cache_dir() / SMOLLM2_GGUF).resolve()
    except OSError:
        return False


def load_gguf(path: str | Path, device: str | torch.device = "cpu",
              dtype: torch.dtype = torch.float32) -> tuple[Transformer, dict[str, Any]]:
    """Our :class:`Transformer` (eval mode) from a llama-architecture GGUF file, dequantized to ``dtype``.

    Returns ``(model, meta)``; ``meta`` has ``tokenizer`` (``"smollm2"`` for the offline asset, else the GGUF
    path, which :func:`mobilellm_r1.tokenizer.load_tokenizer` reads), ``source``, ``arch``, ``config``,
    ``name``, ``file_type`` and ``chat_template``."""
    from gguf import GGUFReader

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"GGUF file not found: {path}")
    where = str(path)
    try:
        reader = GGUFReader(path)
    except (ValueError, OSError) as e:
        raise CheckpointError(f"{where}: not a readable GGUF file ({e})") from None
    meta = _fields(reader)
    by_name = {t.name: t for t in reader.tensors}
    cfg = config_from_gguf(meta, set(by_name), where)
    # What io.model_from_tensors does, building the meta-device model once (each build costs ~0.8 s at 30
    # layers) and checking under GGUF names so an error names the GGUF tensor.
    with torch.device("meta"):
        model = Transformer(cfg)
    want = {gguf_name(k): tuple(p.shape) for k, p in model.named_parameters()}
    got = {name: tuple(int(d) for d in reversed(t.shape)) for name, t in by_name.items()}
    if cfg.qk_norm:
        _check_unit_qk_norm(by_name, cfg, where)
        got = {n: shape for n, shape in got.items() if n.split(".")[-2] not in QK_NORM_NAMES}
    check_tensors(want, got, where)
    state = {k: torch.from_numpy(_dequantize(by_name[gguf_name(k)])).to(device=device, dtype=dtype)
             for k, _ in model.named_parameters()}
    if cfg.qk_norm:  # qwen3 rotates half-split pairs (NEOX RoPE); see export_gguf
        for k in state:
            if qk_heads(k, cfg):
                state[k] = to_interleaved(state[k], qk_heads(k, cfg))
    model.load_state_dict(state, strict=True, assign=True)
    model.set_rope()  # the tables were built on the meta device
    model.eval()
    info = {
        "tokenizer": "smollm2" if is_smollm2_asset(path) else str(path.resolve()),
        "source": str(path),
        "arch": meta["general.architecture"],
        "format": "gguf",
        "config": model.cfg,
        "name": meta.get("general.name", ""),
        "file_type": meta.get("general.file_type"),
        "chat_template": meta.get("tokenizer.chat_template", ""),
    }
    return model, info


def import_gguf(path: str | Path, out_dir: str | Path, tokenizer_spec: str | None = None,
                dtype: torch.dtype | None = None) -> tuple[Path, Transformer, str]:
    """Convert a GGUF file into our checkpoint at ``out_dir`` (same return shape as :func:`.hf.import_hf`).
    The tokenizer spec defaults to :func:`load_gguf`'s (``"smollm2"`` or the GGUF's absolute path)."""
    from .io import save_model

    model, meta = load_gguf(path, dtype=dtype or torch.float32)
    spec = meta["tokenizer"] if tokenizer_spec is None else tokenizer_spec
    save_model(out_dir, model, tokenizer_spec=spec)
    return Path(out_dir), model, spec


def load_any(spec: str | Path, device: str | torch.device = "cpu",
             dtype: torch.dtype | None = None) -> tuple[Transformer, dict[str, Any]]:
    """A model a user names. ``spec`` is one of:

    - ``"smollm2"``: the offline SmolLM2-135M-Instruct GGUF asset;
    - a ``.gguf`` file (llama architecture);
    - our checkpoint directory (``config.json`` with ``"format": "mobilellm-r1"``);
    - a Hugging Face directory whose ``config.json`` has ``model_type: llama4_text`` (loaded into our
      decoder), or any other transformers causal LM (adapted by :class:`.foreign.ForeignCausalLM`).

    Returns ``(model in eval mode, meta)``. ``meta`` always has ``tokenizer`` (a spec
    :func:`mobilellm_r1.tokenizer.load_tokenizer` takes, resolved to an absolute path when it is one; ``""``
    when unknown), ``source``, ``arch``, ``format`` and ``config`` (the :class:`ModelConfig`). ``dtype`` None
    keeps a checkpoint's stored dtype and dequantizes a GGUF to float32. Anything else is a
    :class:`CheckpointError`."""
    if isinstance(spec, str) and spec == "smollm2":
        from ..assets import smollm2_gguf

        try:
            path = smollm2_gguf()
        except FileNotFoundError as e:
            raise CheckpointError(str(e)) from None
        return load_gguf(path, device=device, dtype=dtype or torch.float32)
    p = Path(spec)
    kinds = ("'smollm2', a .gguf file, a mobilellm-r1 checkpoint directory or a Hugging Face causal-LM "
             "directory (config.json with a *ForCausalLM architecture)")
    if p.is_file() and p.suffix == ".gguf":
        return load_gguf(p, device=device, dtype=dtype or torch.float32)
    if not p.exists():
        raise CheckpointError(f"model {str(spec)!r} not found: expected {kinds}")
    cfg_path = p / CONFIG
    if not p.is_dir() or not cfg_path.is_file():
        raise CheckpointError(f"{p}: not a model: expected {kinds}")
    try:
        raw = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path}: invalid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{cfg_path}: not a model config")
    if raw.get("format") == FORMAT:
        from .io import load_model, resolve_tokenizer_spec

        if "quantization" in raw:  # `mobilellm-r1 quantize` output: the fake-quant (torchao) model
            from ..deploy.quantize import load_quantized

            model, meta = load_quantized(p)
        else:
            model, meta = load_model(p, device=device, dtype=dtype)
        meta["tokenizer"] = resolve_tokenizer_spec(p, meta.get("tokenizer") or "")
        meta.update(source=str(p), arch="mobilellm-r1")
        return model, meta
    if raw.get("model_type") == "llama4_text":
        from .hf import load_hf

        model = load_hf(p, device=device, dtype=dtype)
        cfg = model.cfg
        if (p / "tokenizer.json").is_file():
            tok = str(p.resolve())
        else:
            tok = implied_tokenizer(cfg.vocab_size, cfg.bos_id)
        return model, {"tokenizer": tok, "source": str(p), "arch": "llama4_text", "format": "hf", "config": cfg}
    from .foreign import is_hf_causal_lm, load_foreign

    if is_hf_causal_lm(raw):  # any other transformers causal LM (Qwen, SmolLM, GPT-2, …), adapted
        return load_foreign(p, device=device, dtype=dtype)
    what = raw.get("model_type") or raw.get("format")
    what = f"model_type/format {what!r}" if what else "unrecognised config.json"
    raise CheckpointError(f"{p}: unsupported model ({what}); expected {kinds}")
