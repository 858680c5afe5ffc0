"""On-device runtime formats: ExecuTorch ``.pte`` lowered to XNNPACK (the paper's runtime), GGUF for
llama.cpp, and (already in :mod:`mobilellm_r1.model.hf`) Hugging Face safetensors.

ExecuTorch
----------
:class:`StaticCacheLM` is the export-friendly form of a :class:`~mobilellm_r1.model.transformer.Transformer`:
it holds the model itself (same modules, same weights, the math of ``Attention.project``: projections,
interleaved RoPE, QK-norm, written in ops XNNPACK delegates) and adds a static KV cache as buffers, one
``(1, max_context, kv_heads, head_dim)`` pair per layer application, updated in place by ExecuTorch's llama
custom ops (``llama::update_cache``) and attended by ``llama::custom_sdpa``, which reads only the filled
prefix, so a decode step costs what its context costs, not the cache's size. ``forward(tokens (1, S),
input_pos (1,))`` writes positions ``input_pos .. input_pos+S-1`` and returns the logits of the last
position (``full_logits`` all of them).

:func:`export_executorch` quantizes (optional, :mod:`.quantize`: 8da4w linears, 4-bit group-32 embedding
swapped for ExecuTorch's packed ``quantized_decomposed::embedding_4bit`` lookup), runs ``torch.export``
with static shapes, lowers to XNNPACK with ``to_edge_transform_and_lower`` and writes the ``.pte``
atomically, with the model shape stored as constant methods (``get_max_context_len`` ...) and a ``.json``
sidecar. The program's one method, ``forward``, takes one token at a given position: a prompt is
prefilled token by token. (A dynamic length makes every reshape symbolic, which XNNPACK does not take; a
second static-length ``prefill`` method sharing the cache costs a second lowering, and the Python runtime
bindings here did not share its cache with ``forward``.) :class:`PteRunner` loads a ``.pte`` and steps it.

GGUF
----
:func:`export_gguf`: models without QK-norm as llama.cpp's ``llama`` architecture, our default QK-norm
decoder as ``qwen3`` (unit norm weights, half-split q/k rows); f32, f16, q8_0 or q4_0 (the paper's 4-bit
group-32 scheme in llama.cpp's terms). The tokenizer is embedded from a GGUF tokenizer (``smollm2`` or a
``.gguf``).
"""

from __future__ import annotations

import json
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..atomic import atomic_path, write_json
from ..model.transformer import Transformer


def load_runtime() -> None:
    """What running a ``.pte`` needs: the runtime with the llama custom-op and quantized kernels."""
    from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401
    from executorch.extension.pybindings import portable_lib  # noqa: F401
    from executorch.kernels import quantized  # noqa: F401


def load_custom_ops() -> None:
    """Register ExecuTorch's llama ops (update_cache, custom_sdpa) and quantized kernels (embedding_4bit)
    with torch, for export and for eager runs of :class:`StaticCacheLM`."""
    from executorch.exir.passes import _quant_patterns_and_replacements  # noqa: F401  (embedding_4bit.dtype)

    load_runtime()


# ------------------------------------------------------------------------------------- static-cache module


class PackedEmbedding(nn.Module):
    """A 4-bit (two per byte) or 8-bit grouped embedding table read by ExecuTorch's quantized lookup
    kernels, built from a torchao-quantized ``nn.Embedding`` (same integers, same scales: same values)."""

    def __init__(self, qdata: torch.Tensor, scale: torch.Tensor, bits: int):
        super().__init__()
        self.bits = bits
        if bits == 4:
            u = (qdata.to(torch.int16) + 8).to(torch.uint8).view(qdata.shape[0], -1, 2)
            qdata = u[..., 0] * 16 + u[..., 1]
        self.register_buffer("weight", qdata.contiguous())
        self.register_buffer("scales", scale.float().contiguous())

    @classmethod
    def from_quantized(cls, emb: nn.Embedding) -> "PackedEmbedding":
        w = emb.weight
        bits = {torch.int4: 4, torch.int8: 8}[w.target_dtype]
        zp = getattr(w, "zero_point", None)
        if zp is not None and bool(zp.any()):
            raise ValueError("PackedEmbedding expects symmetric quantization (zero points 0)")
        return cls(w.qdata.detach(), w.scale.detach().reshape(w.qdata.shape[0], -1), bits)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.bits == 4:
            return torch.ops.quantized_decomposed.embedding_4bit.dtype(
                self.weight, self.scales, None, -8, 7, ids, dtype=torch.float32)
        return torch.ops.quantized_decomposed.embedding_byte.dtype(
            self.weight, self.scales, None, -128, 127, ids, dtype=torch.float32)


def _rope_rotation(head_dim: int) -> torch.Tensor:
    """``P`` with ``x @ P`` = the interleaved pairs ``(x0, x1)`` turned into ``(-x1, x0)``, so RoPE is
    ``x * cos + (x @ P) * sin`` with ``cos``/``sin`` repeated per pair: two muls, an add and a small
    matmul instead of the strided selects of :func:`~mobilellm_r1.model.transformer.apply_rope`."""
    p = torch.zeros(head_dim, head_dim)
    i = torch.arange(0, head_dim, 2)
    p[i + 1, i] = -1.0
    p[i, i + 1] = 1.0
    return p


class StaticCacheLM(nn.Module):
    """``model`` plus a static KV cache, exportable with ``torch.export`` (see the module docstring).

    The math is the model's (same weights and modules; checked against ``Transformer.forward`` in the tests),
    written with ops XNNPACK takes: its partitioner has no last-dim ``mean``, no scalar ``add`` and no
    ``select``, so ``F.rms_norm`` and the strided RoPE would stay in portable kernels and cut every block
    into ~6 delegates (each lowered separately: most of the export time, and slow at run time). Here a
    mean over the last dim is a matmul with a constant ``1/n`` column, ``eps`` a tensor constant, RoPE a
    constant pair-rotation matmul; only the KV-cache custom ops split the graph, one delegate per block.
    """

    def __init__(self, model: Transformer, max_context: int, full_logits: bool = False):
        super().__init__()
        load_custom_ops()
        cfg = model.cfg
        if max_context > cfg.max_seq_len:
            # The RoPE tables must cover the cache; the model's theta is kept (long_context_config changes it).
            model.set_rope(max_seq_len=max_context)
        self.model = model
        self.max_context = max_context
        self.full_logits = full_logits
        shape = (1, max_context, cfg.n_kv_heads, cfg.head_dim)
        self.n_apps = model.n_applications
        for i in range(self.n_apps):
            self.register_buffer(f"k_cache_{i}", torch.zeros(shape), persistent=False)
            self.register_buffer(f"v_cache_{i}", torch.zeros(shape), persistent=False)
        cos, sin = model.rope_cos[:max_context], model.rope_sin[:max_context]
        self.register_buffer("cos", cos.repeat_interleave(2, dim=-1).contiguous(), persistent=False)
        self.register_buffer("sin", sin.repeat_interleave(2, dim=-1).contiguous(), persistent=False)
        self.register_buffer("rot", _rope_rotation(cfg.head_dim).T.contiguous(), persistent=False)
        self.register_buffer("mean_dim", torch.full((1, cfg.dim), 1.0 / cfg.dim), persistent=False)
        self.register_buffer("mean_head", torch.full((1, cfg.head_dim), 1.0 / cfg.head_dim), persistent=False)
        self.register_buffer("eps", torch.tensor([cfg.norm_eps]), persistent=False)

    def reset(self) -> None:
        for name, b in self.named_buffers():
            if name.startswith(("k_cache_", "v_cache_")):
                b.zero_()

    def _rms(self, x: torch.Tensor, mean: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        y = x * torch.rsqrt(F.linear(x * x, mean) + self.eps)
        return y if weight is None else y * weight

    @staticmethod
    def _ffn(ff, x: torch.Tensor) -> torch.Tensor:
        """SwiGLU with ``silu`` spelled out (``g * sigmoid(g)``): ``silu`` is not a core ATen op, and one
        non-core op makes ExecuTorch run a whole extra decomposition pass over the program."""
        g = ff.gate_proj(x)
        return ff.down_proj(g * torch.sigmoid(g) * ff.up_proj(x))

    def _project(self, attn, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """``Attention.project`` (projections, interleaved RoPE, then QK-norm) in XNNPACK's ops."""
        b, s, _ = x.shape
        hd = attn.head_dim
        q = attn.q_proj(x).view(b, s, attn.n_heads, hd)
        k = attn.k_proj(x).view(b, s, attn.n_kv_heads, hd)
        v = attn.v_proj(x).view(b, s, attn.n_kv_heads, hd)
        q = q * cos + F.linear(q, self.rot) * sin
        k = k * cos + F.linear(k, self.rot) * sin
        if attn.qk_norm:
            q, k = self._rms(q, self.mean_head), self._rms(k, self.mean_head)
        return q, k, v

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        m = self.model
        b, s = tokens.shape
        # ``item()`` spelled as its core-ATen form: see ``_ffn``
        start = torch.ops.aten._local_scalar_dense.default(input_pos[0])
        torch._check_is_size(start)
        torch._check(start + s <= self.max_context)
        cos = self.cos[start:start + s].view(1, s, 1, -1)
        sin = self.sin[start:start + s].view(1, s, 1, -1)
        h = m.embed_tokens(tokens)
        for app, li in enumerate(m.schedule):
            blk = m.layers[li]
            attn = blk.self_attn
            k_cache, v_cache = getattr(self, f"k_cache_{app}"), getattr(self, f"v_cache_{app}")
            x = self._rms(h, self.mean_dim, blk.input_layernorm.weight)
            q, k, v = self._project(attn, x, cos, sin)  # (B, S, heads, hd): the cache layout
            torch.ops.llama.update_cache(k, k_cache, start)
            torch.ops.llama.update_cache(v, v_cache, start)
            o = torch.ops.llama.custom_sdpa(q, k_cache, v_cache, start, None, 0, True)
            h = h + attn.o_proj(o.reshape(b, s, -1))
            h = h + self._ffn(blk.feed_forward, self._rms(h, self.mean_dim, blk.post_attention_layernorm.weight))
        if not self.full_logits:  # unconditional: with a dynamic ``s`` a test on it would be a guard
            h = h[:, -1:]
        return m.logits(self._rms(h, self.mean_dim, m.norm.weight))


def prepare_quantized_for_export(model: Transformer) -> Transformer:
    """Swap a torchao-quantized embedding for :class:`PackedEmbedding` (ExecuTorch's lookup kernel; the
    table is never dequantized whole). A no-op for a float embedding."""
    if hasattr(model.embed_tokens.weight, "qdata"):
        model.embed_tokens = PackedEmbedding.from_quantized(model.embed_tokens)
    return model


# ---------------------------------------------------------------------------------------- ExecuTorch


def xnnpack_partitioner():
    """XNNPACK's partitioner with two export-time savings for this graph (the lowered program computes the
    same: the tests compare it with eager). Both cut work that is repeated over every node of the program.

    - XNNPACK runs ~17 graph passes on every delegate (conv, batch-norm, pooling, concat, channels-last,
      ...); our blocks have none of those ops, so only ``ConvertToLinearPass`` runs (the pass set XNNPACK's
      own dynamically-quantized partitioner selects with the ``dqlinear_partitioner`` spec).
    - Ops XNNPACK lowers whole (``linear``, torchao's quantize/dequantize) are kept from decomposition
      without its per-node ``check_op_support``, so ``to_edge`` decomposes the program once instead of three
      times (every op here is core ATen already, see :class:`StaticCacheLM`, so that once is enough).
    """
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir.backend.compile_spec_schema import CompileSpec

    class _Partitioner(XnnpackPartitioner):
        def __init__(self):
            super().__init__()
            self.delegation_spec.compile_specs.append(CompileSpec("dqlinear_partitioner", b""))

        def ops_to_not_decompose(self, ep):
            ops, _ = super().ops_to_not_decompose(ep)
            return ops, None

    return _Partitioner()


def export_executorch(model: Transformer, out: str | Path, max_context: int, *, quantize: bool = True,
                      group_size: int = 0, embedding_group_size: int = 32, embedding_bits: int = 4,
                      quantized: bool | None = None, source: str = "", prefill_chunk: int = 128) -> dict[str, Any]:
    """Write ``model`` as an XNNPACK-lowered ``.pte`` at ``out`` with a static KV cache of ``max_context``
    positions. ``quantize`` applies the paper's 8da4w scheme first (in place on ``model``) unless the model
    is already quantized (e.g. from :func:`~.quantize.load_quantized`). ``source`` (the checkpoint it came
    from) is recorded so a benchmark of the file can find the fp32 model. Returns a summary (also written
    next to the file as ``OUT.json``)."""
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes import MemoryPlanningPass

    from .quantize import quantize_model, quiet_torchao

    quiet_torchao()
    out = Path(out)
    if prefill_chunk < 1:
        raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
    chunk = min(prefill_chunk, max_context)
    already = quantized if quantized is not None else hasattr(model.embed_tokens.weight, "qdata")
    summary: dict[str, Any] = {"format": "executorch", "backend": "xnnpack", "max_context": max_context,
                               "model": _model_dict(model),
                               "source": str(Path(source).absolute()) if source else ""}
    if quantize and not already:
        summary["quantization"] = quantize_model(model, group_size, embedding_group_size, embedding_bits)
    elif already:
        summary["quantization"] = {"scheme": "8da4w", "prequantized": True}
    else:
        summary["quantization"] = None
    prepare_quantized_for_export(model)
    # a checkpoint loaded with ``assign=True`` keeps ``requires_grad`` on its (integer) quantized tensors,
    # which ExecuTorch's unwrapping of tensor subclasses cannot turn back into parameters
    model.requires_grad_(False)
    lm = StaticCacheLM(model.eval(), max_context).eval()
    cfg = model.cfg
    constants = {"get_max_context_len": max_context, "get_max_seq_len": chunk, "get_vocab_size": cfg.vocab_size,
                 "get_bos_id": cfg.bos_id, "get_eos_ids": list(cfg.eos_ids), "use_kv_cache": True}
    times: dict[str, float] = {}
    with torch.no_grad():
        t = time.perf_counter()
        example = torch.zeros(1, min(chunk, 2), dtype=torch.long)  # 2: an example of 1 would specialize
        dynamic = ({1: torch.export.Dim("seq", min=1, max=chunk)}, None) if chunk > 1 else None
        ep = torch.export.export(lm, (example, torch.zeros(1, dtype=torch.long)), dynamic_shapes=dynamic,
                                 strict=False)
        times["torch_export"] = time.perf_counter() - t
        t = time.perf_counter()
        edge = to_edge_transform_and_lower(ep, partitioner=[xnnpack_partitioner()], constant_methods=constants,
                                           compile_config=EdgeCompileConfig(_check_ir_validity=False))
        times["lower"] = time.perf_counter() - t
        t = time.perf_counter()
        prog = edge.to_executorch(ExecutorchBackendConfig(
            extract_delegate_segments=True, do_quant_fusion_and_const_prop=True,
            memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False)))
        times["to_executorch"] = time.perf_counter() - t
    summary["delegates"] = _count_delegates(edge.exported_program())
    summary["prefill_chunk"] = chunk
    summary["export_seconds"] = times
    with atomic_path(out) as tmp, open(tmp, "wb") as f:
        prog.write_to_file(f)
    summary["bytes"] = out.stat().st_size
    summary["fp32_bytes"] = 4 * cfg.param_count()
    summary["size_ratio"] = summary["bytes"] / summary["fp32_bytes"]
    write_json(sidecar(out), summary, indent=2)
    return summary


def _count_delegates(ep) -> int:
    return sum(1 for n in ep.graph.nodes if n.op == "call_function" and "call_delegate" in str(n.target))


def sidecar(pte: str | Path) -> Path:
    pte = Path(pte)
    return pte.with_name(pte.name + ".json")


def pte_tokenizer(pte: str | Path) -> str:
    """The tokenizer spec of an exported ``.pte``: its source checkpoint's (the sidecar records where it
    came from), else Llama-3's when the vocabulary is the paper's 128,256 ids."""
    from ..model.io import CheckpointError, read_meta, resolve_tokenizer_spec

    meta = json.loads(sidecar(pte).read_text()) if sidecar(pte).is_file() else {}
    src = meta.get("source") or ""
    if src and Path(src).is_dir():
        try:
            spec = read_meta(src).get("tokenizer") or ""
        except CheckpointError:
            spec = ""
        if spec:
            return resolve_tokenizer_spec(src, spec)
    from ..tokenizer import implied_tokenizer

    spec = implied_tokenizer((meta.get("model") or {}).get("vocab_size", 0))
    if spec:
        return spec
    raise ValueError(f"{pte}: cannot tell its tokenizer (its source checkpoint {src or '(none)'} names none); "
                     "pass --tokenizer")


def _model_dict(model: Transformer) -> dict[str, Any]:
    from ..config import to_dict

    return to_dict(model.cfg)


class PteRunner:
    """A loaded ``.pte`` with its KV cache: ``step(token, pos)`` returns the next token's logits
    ``(vocab,)``; ``prefill`` feeds a prompt."""

    def __init__(self, path: str | Path, threads: int = 0):
        load_runtime()
        from executorch.extension.pybindings import portable_lib

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no such .pte file: {path}")
        if threads:
            portable_lib._unsafe_reset_threadpool(threads)
        self.path = path
        self.meta = json.loads(sidecar(path).read_text()) if sidecar(path).is_file() else {}
        self.module = portable_lib._load_for_executorch(str(path))
        names = set(self.module.method_names()) if hasattr(self.module, "method_names") else {"forward"}
        if "forward" not in names:
            raise ValueError(f"{path} has no 'forward' method (methods: {sorted(names)}): not an exported LM")
        self.max_context = int(self._const("get_max_context_len", self.meta.get("max_context", 0)))
        if self.max_context < 1:
            raise ValueError(f"{path}: no get_max_context_len method and no sidecar: not an exported LM")
        self.prefill_chunk = max(1, int(self._const("get_max_seq_len", 1)))
        try:  # a list constant comes back as one output per element
            self.eos_ids = [int(i) for i in self.module.run_method("get_eos_ids", [])]
        except Exception:  # noqa: BLE001 - an older file without the constant method
            self.eos_ids = [int(i) for i in self.meta.get("model", {}).get("eos_ids", [])]

    def _const(self, name: str, default: Any) -> Any:
        try:
            return self.module.run_method(name, [])[0]
        except Exception:  # noqa: BLE001 - an older file without the constant method
            return default

    def _forward(self, tokens: list[int], pos: int) -> torch.Tensor:
        if pos < 0 or pos + len(tokens) > self.max_context:
            raise ValueError(f"position {pos + len(tokens) - 1} exceeds the exported context {self.max_context}")
        out = self.module.forward((torch.tensor([tokens], dtype=torch.long), torch.tensor([pos], dtype=torch.long)))[0]
        return out.reshape(-1)

    def step(self, token: int | list[int], pos: int) -> torch.Tensor:
        """Decode one token at ``pos``: the logits ``(vocab,)`` of the next."""
        tokens = [token] if isinstance(token, int) else list(token)
        if len(tokens) != 1:
            raise ValueError(f"step decodes one token, got {len(tokens)}: use prefill for a prompt")
        return self._forward(tokens, pos)

    def prefill(self, tokens: list[int], pos: int = 0, chunk: int | None = None) -> torch.Tensor:
        """Write ``tokens`` at ``pos..`` in chunks of up to ``chunk`` tokens (default: the file's
        ``get_max_seq_len``, 1 for a file exported before batched prefill); the logits after the last."""
        tokens = list(tokens)
        if not tokens:
            raise ValueError("prefill needs at least one token")
        chunk = self.prefill_chunk if chunk is None else chunk
        if not 1 <= chunk <= self.prefill_chunk:
            raise ValueError(f"chunk {chunk} outside 1..{self.prefill_chunk} (the exported prefill chunk)")
        if pos + len(tokens) > self.max_context:
            raise ValueError(f"position {pos + len(tokens) - 1} exceeds the exported context {self.max_context}")
        logits = None
        for i in range(0, len(tokens), chunk):
            logits = self._forward(tokens[i:i + chunk], pos + i)
        return logits

    def generate(self, prompt_ids: list[int], max_new_tokens: int, *, stop_ids: list[int] | None = None,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None, on_token=None) -> list[int]:
        """Generate up to ``max_new_tokens`` after ``prompt_ids`` (greedy at ``temperature`` 0, else
        sampled, nucleus ``top_p``); stops after a token in ``stop_ids`` (default: the file's
        ``get_eos_ids``; pass ``[]`` for none), which is included in the result, or at the exported
        context. ``on_token(id)`` is called as each token is chosen (streaming)."""
        from ..model.generate import sample_next

        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        stops = set(self.eos_ids if stop_ids is None else stop_ids)
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        out: list[int] = []
        if max_new_tokens == 0:
            return out
        logits = self.prefill(prompt_ids)
        pos = len(prompt_ids)
        while True:
            t = int(sample_next(logits.float()[None], temperature, top_p, gen)[0])
            out.append(t)
            if on_token is not None:
                on_token(t)
            if t in stops or len(out) >= max_new_tokens or pos >= self.max_context:
                return out
            logits = self.step(t, pos)
            pos += 1

    def greedy(self, prompt: list[int], n: int) -> list[int]:
        return self.generate(prompt, n, stop_ids=[])


# ---------------------------------------------------------------------------------------------- GGUF


def bpe_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The merge list of a byte-level BPE given only its ranks (tiktoken's form: no merges stored).

    tiktoken merges, at each step, the adjacent pair whose concatenation has the lowest rank. A merge list
    applied by priority does the same when it holds every pair ``(a, b)`` of tokens whose concatenation is
    a token, ordered by the rank of that concatenation: a token reachable by several splits gets one merge
    per split, so the result never depends on which parts happened to form first."""
    merges = []
    for tok, r in sorted(ranks.items(), key=lambda kv: kv[1]):
        pairs = [(ranks[tok[:i]], tok[:i], tok[i:]) for i in range(1, len(tok))
                 if tok[:i] in ranks and tok[i:] in ranks]
        merges += [(x, y) for _, x, y in sorted(pairs)]
    return merges


@lru_cache(maxsize=1)
def _llama3_tokenizer_fields() -> tuple:
    """The Llama-3 vocabulary (the paper's 128,256 ids) as GGUF ``tokenizer.*`` fields, from the tiktoken
    ranks our ``llama3`` tokenizer reads offline: byte-level tokens in GPT-2's alphabet, merges recovered
    from the ranks, the 256 specials as control tokens, and llama.cpp's ``llama-bpe`` pre-tokenizer (the
    Llama-3 split pattern)."""
    from gguf import GGUFValueType

    from ..assets import llama3_tokenizer_model
    from ..tokenizer import LLAMA3_NUM_BASE, _byte_decoder, _read_tiktoken_ranks, llama3_special_tokens

    ranks = _read_tiktoken_ranks(llama3_tokenizer_model())
    enc = {b: c for c, b in _byte_decoder().items()}

    def text(b: bytes) -> str:
        return "".join(enc[x] for x in b)

    by_rank = sorted(ranks, key=ranks.__getitem__)
    if [ranks[t] for t in by_rank] != list(range(len(ranks))):
        raise ValueError("llama3 tokenizer: the ranks are not 0..n-1")
    named = llama3_special_tokens()
    specials = sorted(named.items(), key=lambda kv: kv[1])
    tokens = [text(t) for t in by_rank] + [name for name, _ in specials]
    types = [1] * len(by_rank) + [3] * len(specials)  # llama.cpp token types: 1 normal, 3 control
    merges = [f"{text(a)} {text(b)}" for a, b in bpe_merges(ranks)]
    S, A, U32, I32 = GGUFValueType.STRING, GGUFValueType.ARRAY, GGUFValueType.UINT32, GGUFValueType.INT32
    return (("tokenizer.ggml.model", "gpt2", S, None),
            ("tokenizer.ggml.pre", "llama-bpe", S, None),
            ("tokenizer.ggml.tokens", tokens, A, S),
            ("tokenizer.ggml.token_type", types, A, I32),
            ("tokenizer.ggml.merges", merges, A, S),
            ("tokenizer.ggml.bos_token_id", named["<|begin_of_text|>"], U32, None),
            ("tokenizer.ggml.eos_token_id", named["<|eot_id|>"], U32, None),  # where a chat turn ends
            ("tokenizer.ggml.padding_token_id", LLAMA3_NUM_BASE - 1, U32, None),  # as llama3_tokenizer()
            ("tokenizer.ggml.add_bos_token", True, GGUFValueType.BOOL, None))


def _gguf_tokenizer_fields(spec: str):
    """``(key, value, type, sub_type)`` of the ``tokenizer.*`` metadata of a GGUF tokenizer spec."""
    from gguf import GGUFReader, GGUFValueType

    from ..assets import smollm2_gguf
    from ..tokenizer import vocab_prefix_of

    if spec == "llama3":
        yield from _llama3_tokenizer_fields()
        return
    cut = vocab_prefix_of(spec) if not Path(spec).exists() else None
    base = cut[0] if cut else spec
    path = smollm2_gguf() if base == "smollm2" else Path(base)
    if not (path.is_file() and path.suffix == ".gguf"):
        raise ValueError(f"GGUF export needs a GGUF tokenizer to embed ('llama3', 'smollm2', a .gguf file, or one "
                         f"of them cut to its first ids); the model's tokenizer is {spec!r}")
    fields = {name: f for name, f in GGUFReader(path).fields.items() if name.startswith("tokenizer.")}
    tokens = fields["tokenizer.ggml.tokens"].contents() if "tokenizer.ggml.tokens" in fields else []
    index = {t: i for i, t in enumerate(tokens)}
    for name, f in fields.items():
        sub = f.types[1] if f.types and f.types[0] == GGUFValueType.ARRAY and len(f.types) > 1 else None
        value = f.contents()
        if cut and sub is not None and name == "tokenizer.ggml.merges":  # the merges that build a kept token
            value = [m for m in value if index.get(m.replace(" ", "", 1), cut[1]) < cut[1]]
        elif cut and sub is not None and len(value) == len(tokens):  # per-token arrays: tokens, types, scores
            value = value[:cut[1]]
        yield name, value, f.types[0], sub


def export_gguf(model: Transformer, out: str | Path, tokenizer_spec: str, dtype: str = "f32") -> dict[str, Any]:
    """Write a GGUF for llama.cpp with the tokenizer of ``tokenizer_spec`` embedded. Returns a summary.

    Architecture. A model without QK-norm is written as ``llama``: llama.cpp's normal RoPE rotates
    interleaved pairs like ours, so q/k rows are stored as they are (see :mod:`mobilellm_r1.model.gguf`).
    Our QK-norm decoder is written as ``qwen3``, llama.cpp's decoder with a per-head RMSNorm on q and k:
    unit norm weights (ours is weightless), and q/k rows permuted to half-split order because qwen3 uses
    NEOX RoPE. qwen3 normalises *before* RoPE and we after; with no weight the two agree, since RoPE is a
    rotation and keeps each head's RMS.

    ``dtype``: ``f32`` / ``f16`` matrices, or ``q8_0`` / ``q4_0`` block quantization of every matrix, the
    embedding included (norms stay f32). ``q4_0`` is the paper's scheme in llama.cpp's terms: 4-bit
    symmetric weights in groups of 32 with a scale each, the tied embedding 4-bit group 32 too, and
    activations quantized to 8 bits at run time (per 32-value block rather than per token).
    Refuses weight sharing, and a tokenizer whose size is not the model's vocabulary."""
    import gguf
    import numpy as np

    from ..model.gguf import gguf_name, qk_heads, to_half_split
    from .config import GGUF_DTYPES

    cfg = model.cfg
    if cfg.weight_sharing:
        raise ValueError("GGUF export: weight sharing is not supported; export to hf (which unrolls it) instead")
    if dtype not in GGUF_DTYPES:
        raise ValueError(f"GGUF export: dtype must be one of {', '.join(GGUF_DTYPES)}, not {dtype!r}")
    tok_fields = list(_gguf_tokenizer_fields(tokenizer_spec))
    n_tok = next((len(v) for k, v, _, _ in tok_fields if k == "tokenizer.ggml.tokens"), None)
    if n_tok is not None and n_tok != cfg.vocab_size:
        raise ValueError(f"GGUF export: the tokenizer {tokenizer_spec!r} has {n_tok} tokens but the model's "
                         f"vocabulary is {cfg.vocab_size}; llama.cpp needs them equal")
    arch = "qwen3" if cfg.qk_norm else "llama"
    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[dtype]
    out = Path(out)
    with atomic_path(out) as tmp:
        w = gguf.GGUFWriter(str(tmp), arch)
        w.add_name("mobilellm-r1")
        w.add_file_type(ftype)
        w.add_context_length(cfg.max_seq_len)
        w.add_embedding_length(cfg.dim)
        w.add_block_count(cfg.n_layers)
        w.add_feed_forward_length(cfg.ffn_dim)
        w.add_head_count(cfg.n_heads)
        w.add_head_count_kv(cfg.n_kv_heads)
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
        w.add_rope_dimension_count(cfg.head_dim)
        w.add_rope_freq_base(cfg.rope_theta)
        w.add_layer_norm_rms_eps(cfg.norm_eps)
        w.add_vocab_size(cfg.vocab_size)
        for key, val, vtype, sub in tok_fields:
            w.add_key_value(key, val, vtype, sub)
        unit = np.ones(cfg.head_dim, dtype=np.float32)
        for name, p in model.named_parameters():
            t = p.detach().float().cpu()
            if cfg.qk_norm and qk_heads(name, cfg):
                t = to_half_split(t, qk_heads(name, cfg))
            a, g = np.ascontiguousarray(t.numpy()), gguf_name(name)
            if a.ndim == 1 or dtype == "f32":
                w.add_tensor(g, a)
            elif dtype == "f16":
                w.add_tensor(g, a.astype(np.float16))
            else:
                qtype = gguf.GGMLQuantizationType[dtype.upper()]  # Q8_0 / Q4_0
                w.add_tensor(g, gguf.quants.quantize(a, qtype), raw_dtype=qtype)
            if cfg.qk_norm and name.endswith("q_proj.weight"):
                w.add_tensor(g.replace("attn_q.", "attn_q_norm."), unit)
                w.add_tensor(g.replace("attn_q.", "attn_k_norm."), unit)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    size, fp32 = out.stat().st_size, 4 * cfg.param_count()
    return {"format": "gguf", "arch": arch, "dtype": dtype, "bytes": size, "fp32_bytes": fp32,
            "size_ratio": size / fp32}


__all__ = ["PackedEmbedding", "PteRunner", "pte_tokenizer", "StaticCacheLM", "export_executorch", "export_gguf",
           "load_custom_ops", "prepare_quantized_for_export", "sidecar"]
