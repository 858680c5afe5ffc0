"""Any Hugging Face causal LM behind the interface of our :class:`~.transformer.Transformer`.

The evaluation harness, the probe and the Ask-LLM scorer are written against our decoder: ``forward`` with
``attention_mask`` / ``position_ids`` / ``cache`` / ``return_hidden`` / ``last_only``, ``new_cache``,
``head_weight``, ``embed_tokens``, ``cfg``. Rather than giving each of them a second code path for foreign
architectures (Qwen, SmolLM, GPT-2, …), :class:`ForeignCausalLM` adapts a ``transformers`` model to that
interface, so "score any HF causal LM" is one mechanism everywhere. Only packed documents (``doc_ids``)
are refused: transformers has no portable block-diagonal mask across architectures.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import ModelConfig
from .io import CheckpointError


@dataclasses.dataclass
class ForeignCache:
    """A transformers ``DynamicCache`` plus what our generator expects of a cache: ``length``, ``max_len``
    and the per-slot validity of every cached key (left padding)."""
    hf: Any
    max_len: int
    key_valid: torch.Tensor  # (B, max_len) bool
    length: int = 0


def _config_ids(raw: Any) -> list[int]:
    if raw is None:
        return []
    return [int(x) for x in (raw if isinstance(raw, (list, tuple)) else [raw])]


def model_config_from_hf(hf_cfg: Any, hidden: int) -> ModelConfig:
    """The :class:`ModelConfig` fields the harness reads (vocab, context, special ids, width)."""
    text = hf_cfg.get_text_config() if hasattr(hf_cfg, "get_text_config") else hf_cfg
    eos = _config_ids(getattr(text, "eos_token_id", None))
    bos = _config_ids(getattr(text, "bos_token_id", None))
    pad = _config_ids(getattr(text, "pad_token_id", None))
    ctx = (getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None)
           or getattr(text, "max_seq_len", None) or 2048)
    return ModelConfig(
        preset=f"hf:{getattr(text, 'model_type', '?')}", vocab_size=int(text.vocab_size), dim=int(hidden),
        n_layers=int(getattr(text, "num_hidden_layers", 0) or getattr(text, "n_layer", 0) or 0),
        max_seq_len=int(ctx), bos_id=bos[0] if bos else 0, eos_ids=eos,
        pad_id=pad[0] if pad else (eos[0] if eos else 0),
        tie_embeddings=bool(getattr(hf_cfg, "tie_word_embeddings", False)),
    )


class ForeignCausalLM(nn.Module):
    """A ``transformers`` ``*ForCausalLM`` that duck-types our ``Transformer`` (see module doc)."""

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        self.hf = hf_model.eval()
        self.base = hf_model.base_model
        out = hf_model.get_output_embeddings()
        if out is None:
            raise CheckpointError(f"{type(hf_model).__name__} has no output embeddings: not a causal LM")
        self.embed_tokens = hf_model.get_input_embeddings()
        tied = out.weight is self.embed_tokens.weight
        self.lm_head = None if tied else out
        self._head = out
        self.cfg = model_config_from_hf(hf_model.config, self.embed_tokens.weight.shape[1])

    @property
    def head_weight(self) -> torch.Tensor:
        return self._head.weight

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._head(hidden)

    def decode_layout(self) -> "ForeignCausalLM":
        return self  # our CPU re-layout is specific to our decoder

    def new_cache(self, batch: int, max_len: int | None = None, dtype=None, device=None) -> ForeignCache:
        from transformers import DynamicCache

        max_len = max_len or self.cfg.max_seq_len
        if max_len > self.cfg.max_seq_len:
            raise ValueError(f"cache length {max_len} exceeds max_seq_len {self.cfg.max_seq_len}")
        dev = device or self.embed_tokens.weight.device
        return ForeignCache(DynamicCache(config=self.hf.config), max_len,
                            torch.ones(batch, max_len, dtype=torch.bool, device=dev))

    def forward(self, ids: torch.Tensor, *, position_ids: torch.Tensor | None = None,
                doc_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                cache: ForeignCache | None = None, start_pos: int | None = None,
                return_hidden: bool = False, last_only: bool = False) -> torch.Tensor:
        if doc_ids is not None:
            raise ValueError(f"packed documents (doc_ids) are not supported for {type(self.hf).__name__}; "
                             "score one document per row")
        b, s = ids.shape
        start = 0
        if cache is not None:
            start = cache.length if start_pos is None else start_pos
            if start != cache.length:
                raise ValueError("a transformers cache can only be appended to")
            if start + s > cache.max_len:
                raise ValueError(f"KV cache full: positions {start}..{start + s} exceed its length {cache.max_len}")
            if attention_mask is not None:
                cache.key_valid[:, start:start + s] = attention_mask.bool()
            mask = cache.key_valid[:, :start + s]
        else:
            mask = attention_mask.bool() if attention_mask is not None else None
        if position_ids is None:
            if mask is not None:
                # Our convention: positions count real tokens only, so left padding does not shift them.
                position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)[:, start:start + s]
            else:
                position_ids = torch.arange(start, start + s, device=ids.device)[None].expand(b, s)
        elif position_ids.shape[0] != b:
            position_ids = position_ids.expand(b, -1)
        kw: dict[str, Any] = {}
        if cache is not None:
            kw.update(past_key_values=cache.hf, use_cache=True)
        out = self.base(input_ids=ids, attention_mask=None if mask is None else mask.long(),
                        position_ids=position_ids, **kw)
        if cache is not None:
            cache.length = start + s
        h = out.last_hidden_state
        if last_only:
            h = h[:, -1:]
        return h if return_hidden else self._head(h)


def is_hf_causal_lm(raw: dict[str, Any]) -> bool:
    """Whether a ``config.json`` names a transformers causal-LM architecture."""
    archs = raw.get("architectures") or []
    return bool(raw.get("model_type")) and any(str(a).endswith(("ForCausalLM", "LMHeadModel")) for a in archs)


def load_foreign(path: str | Path, device: str | torch.device = "cpu",
                 dtype: torch.dtype | None = None) -> tuple[ForeignCausalLM, dict[str, Any]]:
    """Load a local HF causal-LM directory through ``transformers.AutoModelForCausalLM``."""
    from transformers import AutoModelForCausalLM

    p = Path(path)
    raw = json.loads((p / "config.json").read_text())
    try:
        hf = AutoModelForCausalLM.from_pretrained(p, dtype=dtype or "auto", local_files_only=True)
    except (ValueError, OSError, KeyError) as e:
        raise CheckpointError(f"{p}: transformers cannot load it as a causal LM: {e}") from None
    model = ForeignCausalLM(hf.to(device))
    tok = str(p.resolve()) if (p / "tokenizer.json").is_file() else ""
    return model, {"tokenizer": tok, "source": str(p), "arch": raw.get("model_type", "?"), "format": "hf",
                   "config": model.cfg}
