"""``[deploy]`` of a recipe: the quantization scheme, export formats and benchmark contexts."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import ConfigError

SCHEMES = ("8da4w",)
FORMATS = ("hf", "executorch", "gguf")
GGUF_DTYPES = ("f32", "f16", "q8_0", "q4_0")  # tensor types of a GGUF's matrices (q4_0: the paper's scheme)
# Decode runtimes the benchmark compares: plain eager PyTorch with our KV cache, our generator
# (model/generate.py after Transformer.decode_layout), the exported 8da4w ExecuTorch/XNNPACK program, and
# llama.cpp on our q4_0 GGUF export (the runtime a phone app would otherwise ship): through the prebuilt
# bindings, or a llama.cpp built for this CPU (its llama-bench binary; not in the default rows).
RUNTIMES = ("eager_fp32", "generator_fp32", "executorch_8da4w", "llamacpp_q4_0", "llamacpp_native")


@dataclass
class DeployConfig:
    """Paper section 8: linear layers with 8-bit dynamic per-token activations and 4-bit symmetric
    grouped weights, embeddings 4-bit group 32.

    ``group_size`` 0 picks the paper's rule: 32 when the hidden size is not a multiple of 128, else 128.
    ``contexts`` are prompt+generation lengths (Table 10's columns); ``runtimes`` its rows.
    """

    scheme: str = "8da4w"
    group_size: int = 0
    embedding_group_size: int = 32
    embedding_bits: int = 4
    formats: list[str] = field(default_factory=lambda: ["executorch"])
    max_context: int = 0  # static KV-cache length of the .pte; 0: the largest of ``contexts``
    contexts: list[int] = field(default_factory=lambda: [1024, 2048, 4096, 8192])
    new_tokens: int = 32  # decode steps timed at each context
    # Decode rounds per context (over the same positions after one prefill; the median is reported) and
    # the bandwidth is re-measured around each context: on a shared machine a neighbour's load drifts, so
    # one early bandwidth figure and one decode run can land in different load regimes.
    rounds: int = 3
    threads: int = 1  # torch / XNNPACK threads in the benchmark workers
    runtimes: list[str] = field(default_factory=lambda: list(RUNTIMES[:4]))
    llama_bench: str = ""  # llamacpp_native: a llama-bench binary (llama.cpp built with GGML_NATIVE for this CPU)
    # Decode speed does not depend on the cached values: "synthetic" starts decoding at position
    # context - new_tokens over a zero cache instead of a real prefill (fast at 16k/32k).
    fill: str = "prefill"
    memory_limit_gb: float = 0.0  # 0: the machine's available memory; contexts predicted above it are "OOM"

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ConfigError(f"deploy.scheme {self.scheme!r} is not one of {SCHEMES}")
        bad = [f for f in self.formats if f not in FORMATS]
        if bad:
            raise ConfigError(f"deploy.formats: unknown format {bad[0]!r} (known: {', '.join(FORMATS)})")
        if self.group_size < 0 or self.embedding_group_size <= 0:
            raise ConfigError("deploy.group_size must be >= 0 and deploy.embedding_group_size > 0")
        if self.embedding_bits not in (4, 8):
            raise ConfigError(f"deploy.embedding_bits must be 4 or 8, got {self.embedding_bits}")
        if any(c <= 0 for c in self.contexts):
            raise ConfigError(f"deploy.contexts must be positive, got {self.contexts}")
        if self.rounds < 1:
            raise ConfigError(f"deploy.rounds must be >= 1, got {self.rounds}")
        if self.fill not in ("prefill", "synthetic"):
            raise ConfigError(f"deploy.fill must be 'prefill' or 'synthetic', got {self.fill!r}")
        bad = [r for r in self.runtimes if r not in RUNTIMES]
        if bad:
            raise ConfigError(f"deploy.runtimes: unknown runtime {bad[0]!r} (known: {', '.join(RUNTIMES)})")
