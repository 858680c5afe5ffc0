"""The MobileLLM-R1 decoder: a dense Llama-4-text style transformer (paper Table 1).

Per block: ``x + attn(rmsnorm(x))`` then ``x + swiglu(rmsnorm(x))``. Attention is grouped-query attention
through ``F.scaled_dot_product_attention``; RoPE rotates *interleaved* pairs ``(x[2j], x[2j+1])`` (the
complex-multiply convention Llama 4 uses) with ``inv_freq = 1/theta^(arange(0, hd, 2)/hd)``; then q and k
are RMS-normalised per head with no learnable weight (QK-norm, after RoPE, as ``Llama4TextL2Norm``).
The token embedding is tied to the output head; nothing has a bias.

Module names follow Hugging Face's ``Llama4TextModel`` minus the ``model.`` prefix (``embed_tokens``,
``layers.N.self_attn.q_proj``, ``layers.N.feed_forward.gate_proj``, ``layers.N.input_layernorm``, ...), so
the HF mapping in :mod:`.hf` is a prefix plus, for weight sharing, a layer-index change.

Options (all from :class:`~mobilellm_r1.config.ModelConfig`):

- ``weight_sharing``: MobileLLM-LS block-wise sharing. ``n_layers`` distinct blocks, each applied twice in
  a row (A1 A1 A2 A2 ...), so depth doubles and the parameter count does not change. Each *application*
  has its own KV-cache slot.
- ``rope_theta`` / ``max_seq_len``: :func:`long_context_config` gives the x8-theta, 32k-context variant;
  :meth:`Transformer.set_rope` switches an existing model.
- Packed sequences: ``forward(ids, doc_ids=...)`` or ``forward(ids, position_ids=...)`` restarts positions per
  document and blocks attention across documents (block-diagonal causal mask). Without either, the plain
  causal path uses ``is_causal=True``.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ModelConfig


def long_context_config(cfg: ModelConfig, theta_scale: float = 8.0, max_seq_len: int = 32768) -> ModelConfig:
    """The long-context variant of ``cfg``: RoPE theta multiplied by ``theta_scale`` (the 32k reasoning
    models use 8 × 1e6 = 8e6) and ``max_seq_len`` positions."""
    return dataclasses.replace(cfg, rope_theta=cfg.rope_theta * theta_scale, max_seq_len=max_seq_len)


def rope_tables(head_dim: int, max_len: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos``/``sin`` of shape ``(max_len, head_dim // 2)`` in fp32 (the same arithmetic as HF's
    ``Llama4TextRotaryEmbedding``: fp32 ``pos * inv_freq``)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    freqs = torch.outer(torch.arange(max_len, dtype=torch.float32, device=device), inv_freq)
    return freqs.cos(), freqs.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of ``x`` ``(B, S, H, hd)`` by ``cos``/``sin`` ``(B|1, S, 1, hd/2)``, in fp32."""
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)
    return out.type_as(x)


def positions_from_doc_ids(doc_ids: torch.Tensor) -> torch.Tensor:
    """Position of each token inside its document; documents are runs of equal ids along the row."""
    b, s = doc_ids.shape
    idx = torch.arange(s, device=doc_ids.device).expand(b, s)
    boundary = torch.ones_like(doc_ids, dtype=torch.bool)
    boundary[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    starts = torch.cummax(torch.where(boundary, idx, torch.zeros_like(idx)), dim=1).values
    return idx - starts


def doc_ids_from_positions(positions: torch.Tensor) -> torch.Tensor:
    """A new document starts wherever the position does not follow the previous one by 1."""
    boundary = torch.ones_like(positions, dtype=torch.bool)
    boundary[:, 1:] = positions[:, 1:] != positions[:, :-1] + 1
    return boundary.cumsum(dim=1)


class RMSNorm(nn.Module):
    """RMS normalisation computed in fp32, then cast back and scaled by ``weight`` (HF's order)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x) * self.weight


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.qk_norm, self.eps = cfg.qk_norm, cfg.norm_eps
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.qkv_t: torch.Tensor | None = None  # (dim, q+k+v) storage shared with q/k/v_proj (decode layout)

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """``q, k, v`` of shape ``(B, S, heads, hd)``: projected, RoPE'd and (QK-norm) normalised. Shared by
        :meth:`forward` and the exportable static-cache module in :mod:`mobilellm_r1.deploy.export`."""
        b, s, _ = x.shape
        h, hkv, hd = self.n_heads, self.n_kv_heads, self.head_dim
        if _fused(self.qkv_t, self.q_proj.weight):
            qkv = (x @ self.qkv_t).view(b, s, h + 2 * hkv, hd)
            qk = apply_rope(qkv[:, :, : h + hkv], cos, sin)
            if self.qk_norm:
                qk = F.rms_norm(qk.float(), (hd,), eps=self.eps).type_as(qk)
            q, k, v = qk[:, :, :h], qk[:, :, h:], qkv[:, :, h + hkv:]
        else:
            q = apply_rope(self.q_proj(x).view(b, s, h, hd), cos, sin)
            k = apply_rope(self.k_proj(x).view(b, s, hkv, hd), cos, sin)
            v = self.v_proj(x).view(b, s, hkv, hd)
            if self.qk_norm:
                q = F.rms_norm(q.float(), (hd,), eps=self.eps).type_as(q)
                k = F.rms_norm(k.float(), (hd,), eps=self.eps).type_as(k)
        return q, k, v

    def forward(self, x, cos, sin, mask, is_causal, kv, start, end: int) -> torch.Tensor:
        b, s, _ = x.shape
        h, hkv, hd = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = self.project(x, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if kv is not None and isinstance(start, torch.Tensor):
            # slot decode (continuous batching): x's row r writes at its own position start[r]
            k_buf, v_buf = kv
            r = torch.arange(b, device=x.device)
            k_buf[r, :, start] = k[:, :, 0]
            v_buf[r, :, start] = v[:, :, 0]
            k, v = k_buf[:, :, :end], v_buf[:, :, :end]
        elif kv is not None:
            k_buf, v_buf = kv
            k_buf[:, :, start:end] = k
            v_buf[:, :, start:end] = v
            k, v = k_buf[:, :, :end], v_buf[:, :, :end]
        if mask is not None and not isinstance(mask, torch.Tensor):  # a FlexAttention BlockMask
            o = _flex_attention(q.device)(q, k, v, block_mask=mask, enable_gqa=h != hkv)
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                               enable_gqa=h != hkv)
        return self.o_proj(o.transpose(1, 2).reshape(b, s, h * hd))


class FeedForward(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)
        self.gate_up_t: torch.Tensor | None = None  # (dim, 2*hidden) storage shared with gate/up (decode layout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _fused(self.gate_up_t, self.gate_proj.weight):
            gate, up = (x @ self.gate_up_t).chunk(2, dim=-1)
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def _fused(fused: torch.Tensor | None, first: torch.Tensor) -> bool:
    """Use a decode-layout fused weight only without autograd (it is not a parameter) and only while the
    parameters still live in its storage (``.to()``/``load_state_dict(assign=True)`` replace them)."""
    return fused is not None and not torch.is_grad_enabled() and first.data_ptr() == fused.data_ptr()


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg.dim, cfg.ffn_dim)

    def forward(self, x, cos, sin, mask, is_causal, kv, start, end: int) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, is_causal, kv, start, end)
        return x + self.feed_forward(self.post_attention_layernorm(x))


class KVCache:
    """Pre-allocated keys/values: one ``(batch, n_kv_heads, max_len, head_dim)`` buffer pair per layer
    *application* (with weight sharing a block applied twice owns two slots).

    ``length`` is how many positions are filled; a forward pass with the cache writes at ``length``
    (or an explicit ``start_pos``) and advances it. ``key_valid`` marks left-padding: once a forward pass
    has been given an ``attention_mask``, every later pass masks the invalid keys too.
    """

    def __init__(self, n_slots: int, batch: int, n_kv_heads: int, max_len: int, head_dim: int,
                 device=None, dtype: torch.dtype = torch.float32):
        shape = (n_slots, batch, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.key_valid = torch.ones(batch, max_len, device=device, dtype=torch.bool)
        self.masked = False
        self.length = 0

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def slot(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[i], self.v[i]

    def rows(self, i: int, j: int) -> "KVCache":
        """A cache over batch rows ``i:j`` that shares this one's storage (prefilling one slot; decoding the
        engine's live rows)."""
        view = object.__new__(KVCache)
        view.k, view.v, view.key_valid = self.k[:, i:j], self.v[:, i:j], self.key_valid[i:j]
        view.masked, view.length = False, 0
        return view

    def reset(self) -> None:
        self.length = 0
        self.masked = False
        self.key_valid.fill_(True)


class Transformer(nn.Module):
    slot_decode = True  # forward(slot_pos=...) decodes rows of a slot cache (model/engine.py)

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        # The order blocks are applied in: A1 A1 A2 A2 ... with weight sharing.
        reps = 2 if cfg.weight_sharing else 1
        self.schedule = [i for i in range(cfg.n_layers) for _ in range(reps)]
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        self.reset_parameters()

    # ------------------------------------------------------------------------------------ set-up

    def reset_parameters(self) -> None:
        """normal(0, init_std) for every linear and the embedding; RMSNorm weights 1; fresh RoPE tables
        (so meta-device construction + ``to_empty`` + ``reset_parameters`` works)."""
        std = self.cfg.init_std
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=std)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
        self.set_rope()

    def set_rope(self, theta: float | None = None, max_seq_len: int | None = None) -> None:
        """Recompute the RoPE tables (fp32, on the embedding's device); optionally switch theta / context
        (e.g. to :func:`long_context_config`'s values). Updates ``self.cfg``."""
        self.cfg = dataclasses.replace(self.cfg, rope_theta=self.cfg.rope_theta if theta is None else theta,
                                       max_seq_len=self.cfg.max_seq_len if max_seq_len is None else max_seq_len)
        cos, sin = rope_tables(self.cfg.head_dim, self.cfg.max_seq_len, self.cfg.rope_theta,
                               device=self.embed_tokens.weight.device)
        self.rope_cos, self.rope_sin = cos, sin

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        # .to(bf16) would cast the RoPE tables too: rebuild them in fp32 instead.
        if self.rope_cos.dtype != torch.float32 and self.rope_cos.device.type != "meta":
            self.set_rope()
        return self

    @torch.inference_mode(False)  # normal tensors even when called inside inference mode
    @torch.no_grad()
    def decode_layout(self) -> "Transformer":
        """Re-store the weights for fast small-batch decoding on CPU; values, shapes and memory unchanged.

        MKL's matrix-vector product reads a row-major ``(out, in)`` weight at about half the memory
        bandwidth it reaches on the same matrix stored column-major (measured here: 128,256 x 576 head
        21 ms vs 10 ms). So every linear weight and the (tied) head are re-stored column-major, and q/k/v and
        gate/up each share one ``(in, out)`` buffer so a block runs 4 matrix products instead of 7. The
        parameters become strided views of those buffers: training, ``state_dict`` and export still work,
        and the fused products are used only without autograd. Returns ``self``.
        """
        def colmajor(p: nn.Parameter) -> None:
            p.data = p.data.t().contiguous().t()

        for blk in self.layers:
            a, ff = blk.self_attn, blk.feed_forward
            projs = [a.q_proj, a.k_proj, a.v_proj]
            a.qkv_t = torch.cat([m.weight.t() for m in projs], dim=1).contiguous()
            _share(a.qkv_t, projs)
            colmajor(a.o_proj.weight)
            ff.gate_up_t = torch.cat([ff.gate_proj.weight.t(), ff.up_proj.weight.t()], dim=1).contiguous()
            _share(ff.gate_up_t, [ff.gate_proj, ff.up_proj])
            colmajor(ff.down_proj.weight)
        colmajor(self.head_weight)
        return self

    @property
    def n_applications(self) -> int:
        """Effective depth (blocks applied per forward pass)."""
        return len(self.schedule)

    @property
    def head_weight(self) -> torch.Tensor:
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def param_count(self) -> int:
        """Parameters with the tied embedding counted once (equals ``ModelConfig.param_count()``)."""
        return sum(p.numel() for p in self.parameters())

    def non_embedding_param_count(self) -> int:
        emb = self.embed_tokens.weight.numel() + (0 if self.lm_head is None else self.lm_head.weight.numel())
        return self.param_count() - emb

    def new_cache(self, batch: int, max_len: int | None = None, dtype: torch.dtype | None = None,
                  device=None) -> KVCache:
        w = self.embed_tokens.weight
        max_len = max_len or self.cfg.max_seq_len
        if max_len > self.cfg.max_seq_len:
            raise ValueError(f"cache length {max_len} exceeds max_seq_len {self.cfg.max_seq_len}")
        return KVCache(self.n_applications, batch, self.cfg.n_kv_heads, max_len, self.cfg.head_dim,
                       device=device or w.device, dtype=dtype or w.dtype)

    # ----------------------------------------------------------------------------------- forward

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.head_weight)

    def forward(
        self,
        ids: torch.Tensor,
        *,
        position_ids: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        start_pos: int | None = None,
        return_hidden: bool = False,
        last_only: bool = False,
        slot_pos: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits ``(B, S, vocab)`` for token ids ``(B, S)``.

        - ``position_ids`` ``(B|1, S)``: RoPE positions. Without a cache they also define documents (a new
          document starts where a position does not follow the previous one by 1).
        - ``doc_ids`` ``(B, S)``: document id per token (packed sequences); positions restart per document
          and attention stays inside documents.
        - ``attention_mask`` ``(B, S)``: 1/True for real tokens, 0/False for (left) padding, which no token
          attends to. Default positions then count real tokens only.
        - ``cache``: write keys/values at ``start_pos`` (default ``cache.length``) and attend to everything
          cached before; ``cache.length`` advances by ``S``.
        - ``return_hidden``: return the final-normed hidden states ``(B, S, dim)`` instead of logits
          (pair with :meth:`logits` for a chunked loss).
        - ``last_only``: only the last position (prefill for generation).
        - ``slot_pos`` ``(B,)`` with ``ids`` ``(B, 1)``: one decode step of a slot cache (continuous batching,
          :mod:`mobilellm_r1.model.engine`): row r writes at its own position ``slot_pos[r]`` of cache row
          r and attends to that row's positions up to it (the engine passes a view of its live rows,
          :meth:`KVCache.rows`). ``cache.length`` is left alone: each slot keeps its own length.
        """
        b, s = ids.shape
        h = self.embed_tokens(ids)
        mask, is_causal = None, False
        if slot_pos is not None:
            if cache is None or s != 1:
                raise ValueError("slot_pos is one decode step (ids of shape (B, 1)) on a KV cache")
            end = int(slot_pos.max()) + 1
            if end > cache.max_len:
                raise ValueError(f"KV cache full: position {end - 1} exceeds its length {cache.max_len}")
            mask = (torch.arange(end, device=ids.device)[None, :] <= slot_pos[:, None])[:, None, None, :]
            cos, sin = self.rope_cos[slot_pos][:, None, None], self.rope_sin[slot_pos][:, None, None]
            for app, li in enumerate(self.schedule):
                h = self.layers[li](h, cos, sin, mask, False, cache.slot(app), slot_pos, end)
            h = self.norm(h)
            return h if return_hidden else self.logits(h)
        if cache is not None:
            if doc_ids is not None:
                raise ValueError("doc_ids cannot be combined with a KV cache")
            start = cache.length if start_pos is None else start_pos
            end = start + s
            if end > cache.max_len:
                raise ValueError(f"KV cache full: positions {start}..{end} exceed its length {cache.max_len}")
            if attention_mask is not None:
                cache.key_valid[:, start:end] = attention_mask.bool()
                cache.masked = True
            if cache.masked:
                valid = cache.key_valid[:, :end]
                if position_ids is None:
                    position_ids = (valid.cumsum(dim=1)[:, start:end] - 1).clamp_(min=0)
                mask = valid[:, None, None, :]
                if s > 1 or start > 0:
                    mask = mask & _causal(s, end, start, ids.device)
                mask = mask | _diagonal(s, end, start, ids.device)  # padded queries attend to themselves
            elif s > 1:
                if start == 0:
                    is_causal = True
                else:
                    mask = _causal(s, end, start, ids.device)
        else:
            start, end = 0, s
            if position_ids is not None and doc_ids is None:
                doc_ids = doc_ids_from_positions(position_ids.expand(b, s))
            if doc_ids is not None and position_ids is None:
                position_ids = positions_from_doc_ids(doc_ids)
            if doc_ids is None and attention_mask is None:
                is_causal = True
            elif self.cfg.attn_impl == "flex" and attention_mask is None:
                mask = doc_block_mask(doc_ids)
            else:
                mask = _causal(s, s, 0, ids.device)[None, None]
                if doc_ids is not None:
                    mask = mask & (doc_ids[:, None, :, None] == doc_ids[:, None, None, :])
                if attention_mask is not None:
                    valid = attention_mask.bool()
                    mask = (mask & valid[:, None, None, :]) | _diagonal(s, s, 0, ids.device)
                    if position_ids is None:
                        position_ids = (valid.cumsum(dim=1) - 1).clamp_(min=0)
        if position_ids is None:
            if end > self.cfg.max_seq_len:
                raise ValueError(f"position {end - 1} is beyond max_seq_len {self.cfg.max_seq_len}")
            cos, sin = self.rope_cos[None, start:end, None], self.rope_sin[None, start:end, None]
        else:
            cos, sin = self.rope_cos[position_ids].unsqueeze(2), self.rope_sin[position_ids].unsqueeze(2)

        for app, li in enumerate(self.schedule):
            kv = cache.slot(app) if cache is not None else None
            h = self.layers[li](h, cos, sin, mask, is_causal, kv, start, end)
        if cache is not None:
            cache.length = end
        if last_only:
            h = h[:, -1:]
        h = self.norm(h)
        return h if return_hidden else self.logits(h)


_FLEX: dict[str, object] = {}


def _flex_attention(device: torch.device):
    """FlexAttention, compiled on CUDA (eager flex materialises the full score matrix: no gain there)."""
    from torch.nn.attention.flex_attention import flex_attention

    if device.type != "cuda":
        return flex_attention
    if "cuda" not in _FLEX:
        _FLEX["cuda"] = torch.compile(flex_attention, dynamic=False)
    return _FLEX["cuda"]


def doc_block_mask(doc_ids: torch.Tensor):
    """A FlexAttention block mask for causal attention inside documents of packed rows ``(B, S)``: the
    same function as the dense ``causal & same-doc`` mask, but blocks wholly outside a document are skipped."""
    from torch.nn.attention.flex_attention import create_block_mask

    def doc_causal(b, h, q, k):
        return (k <= q) & (doc_ids[b, q] == doc_ids[b, k])

    b, s = doc_ids.shape
    return create_block_mask(doc_causal, b, None, s, s, device=doc_ids.device)


def _share(fused_t: torch.Tensor, linears: list[nn.Linear]) -> None:
    """Point each linear's weight at its column block of ``fused_t`` ``(in, sum of outs)``."""
    col = 0
    for m in linears:
        n = m.weight.shape[0]
        m.weight.data = fused_t[:, col:col + n].t()
        col += n


def _causal(s: int, end: int, start: int, device) -> torch.Tensor:
    """``(s, end)`` bool: query i (at absolute position start+i) may see key j <= start+i."""
    q = torch.arange(start, start + s, device=device)[:, None]
    return torch.arange(end, device=device)[None, :] <= q


def _diagonal(s: int, end: int, start: int, device) -> torch.Tensor:
    q = torch.arange(start, start + s, device=device)[:, None]
    return torch.arange(end, device=device)[None, :] == q
