"""Dataclass configs, model presets and strict TOML recipe loading.

A recipe is one TOML file: ``[run]``, ``[model]``, ``[data]`` with ``[[data.sources]]``, and one
``[stages.NAME]`` table per training stage, in run order. Every table maps onto a dataclass below; a key
that no field names is an error that names the key, the table and the file, so a typo never silently
falls back to a default.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A recipe or config that cannot be used as written."""


# ---------------------------------------------------------------------------------------------- model


@dataclass
class ModelConfig:
    """The decoder's shape (paper Table 1). Field names follow the paper, not HF."""

    preset: str = ""
    vocab_size: int = 128256
    dim: int = 576
    n_layers: int = 15
    n_heads: int = 9
    n_kv_heads: int = 3
    head_dim: int = 64
    ffn_dim: int = 2048
    rope_theta: float = 1_000_000.0
    max_seq_len: int = 4096
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    qk_norm: bool = True
    # MobileLLM-LS block-wise sharing: every block is run twice in a row (A1 A1 A2 A2 ...).
    weight_sharing: bool = False
    init_std: float = 0.02
    bos_id: int = 128000
    eos_ids: list[int] = field(default_factory=lambda: [128001, 128008, 128009])
    pad_id: int = 127999
    # Attention kernel for document-masked (packed) rows: "sdpa" passes a dense (S, S) boolean mask, which
    # keeps SDPA off its flash kernel on GPU; "flex" uses FlexAttention with a block mask from the doc ids
    # (compiled on CUDA). Plain causal rows and the KV-cache paths always use SDPA. The default stays
    # "sdpa" on every device until a GPU run measures flex's backward (torch 2.13 has none on CPU).
    attn_impl: str = "sdpa"

    def __post_init__(self) -> None:
        if self.attn_impl not in ("sdpa", "flex"):
            raise ConfigError(f"attn_impl={self.attn_impl!r}: choose 'sdpa' or 'flex'")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")

    def param_count(self) -> int:
        """Parameters with tied embeddings counted once (the paper's convention)."""
        d, h = self.dim, self.head_dim
        attn = d * self.n_heads * h * 2 + d * self.n_kv_heads * h * 2
        mlp = 3 * d * self.ffn_dim
        per_layer = attn + mlp + 2 * d
        emb = self.vocab_size * d
        head = 0 if self.tie_embeddings else emb
        return emb + head + self.n_layers * per_layer + d

    def non_embedding_param_count(self) -> int:
        emb = self.vocab_size * self.dim * (1 if self.tie_embeddings else 2)
        return self.param_count() - emb


# Paper Table 1. Counts with the 128,256-id vocabulary: 140,248,512 / 359,431,168 / 949,685,760.
_LLAMA3_SPECIALS = dict(vocab_size=128256, bos_id=128000, eos_ids=[128001, 128008, 128009], pad_id=127999)
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "140m": dict(dim=576, n_layers=15, n_heads=9, n_kv_heads=3, ffn_dim=2048, **_LLAMA3_SPECIALS),
    "360m": dict(dim=1024, n_layers=15, n_heads=16, n_kv_heads=4, ffn_dim=4096, **_LLAMA3_SPECIALS),
    "950m": dict(dim=1536, n_layers=22, n_heads=24, n_kv_heads=6, ffn_dim=6144, **_LLAMA3_SPECIALS),
    # CPU presets. They keep the deep-thin shape and head_dim 64; the vocabulary is set by the recipe's
    # tokenizer (the embedded default uses SmolLM2's 49,152 ids, see recipes/tiny.toml).
    "tiny": dict(dim=256, n_layers=8, n_heads=4, n_kv_heads=2, ffn_dim=768, max_seq_len=1024),
    "micro": dict(dim=128, n_layers=4, n_heads=2, n_kv_heads=1, ffn_dim=384, max_seq_len=512),
}


def model_preset(name: str, **overrides: Any) -> ModelConfig:
    if name not in MODEL_PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; known: {', '.join(MODEL_PRESETS)}")
    return ModelConfig(preset=name, **{**MODEL_PRESETS[name], **overrides})


# ----------------------------------------------------------------------------------------------- data


@dataclass
class SourceConfig:
    """One named data source. ``paths`` are local files/folders/globs; ``hf`` names a hub dataset for
    users with internet access. ``capabilities`` lists the probing sets (code/math/knowledge) the source
    feeds in the paper's domain assignment (section 5.1.1)."""

    name: str
    category: str = "web"
    paths: list[str] = field(default_factory=list)
    hf: str = ""
    hf_config: str = ""
    hf_split: str = "train"
    text_field: str = "text"
    capabilities: list[str] = field(default_factory=list)
    tokens_b: float = 0.0  # size of the source in billions of tokens, as the paper reports it
    license: str = ""
    note: str = ""


@dataclass
class DataConfig:
    tokenizer: str = "llama3"
    seq_len: int = 2048
    corpus_dir: str = ""
    shards_dir: str = ""  # token shards of the sources (``mobilellm-r1 data tokenize``); relative to the recipe's run dir
    # Fraction of every source's chunks reserved for held-out loss (never trained on, in every stage).
    heldout_fraction: float = 0.0
    # Tokenize at most this many documents of each source (0: all); a CPU-scale run trains on ~0.1M tokens.
    max_docs_per_source: int = 0
    sources: list[SourceConfig] = field(default_factory=list)

    def source(self, name: str) -> SourceConfig:
        for s in self.sources:
            if s.name == name:
                return s
        raise ConfigError(f"no source named {name!r}; known: {', '.join(s.name for s in self.sources)}")


# --------------------------------------------------------------------------------------------- stages

STAGE_KINDS = ("pretrain", "midtrain", "sft", "grpo")
NONFINITE_MODES = ("stop", "skip")  # StageConfig.nonfinite, see faults.NonFiniteGuard
# Training precisions (`--dtype` of train, sft and grpo; [pipeline] train_dtype), see train.metrics.use_bf16_autocast.
TRAIN_DTYPES = ("auto", "fast", "float32", "bfloat16")


@dataclass
class KDConfig:
    """Knowledge distillation (paper section 3.2): loss = (1-alpha)*CE + alpha*T^2*KL(teacher||student)."""

    teacher: str = ""
    alpha: float = 1.0
    temperature: float = 1.0
    top_k: int = 0  # >0: use cached top-k teacher log-probs instead of an online teacher
    cache: str = ""  # the top-k cache folder (`mobilellm-r1 distill cache --out`); default <shards>/kd


@dataclass
class GRPOConfig:
    """GRPO (paper section 7.4): ``group_size`` generations per prompt, verifiable rewards, group-normalised
    advantages, the clipped policy-ratio loss and a KL penalty ``kl_beta`` (0 in the paper) to a reference."""

    prompts_per_step: int = 32
    group_size: int = 8
    max_new_tokens: int = 512
    max_prompt_tokens: int = 512  # longer prompts are skipped and counted
    temperature: float = 1.0
    top_p: float = 1.0
    clip_eps: float = 0.2
    kl_beta: float = 0.0
    reference: str = ""  # "" = none (needs kl_beta 0), "init" = the starting weights, or a model spec
    updates_per_batch: int = 1  # optimizer steps on each batch of rollouts (>1 makes the ratio != 1)
    reward: str = "math"  # math (answer graded by eval.grading.math) | code (tests in the sandbox)
    engine: str = "ours"  # rollouts: ours (continuous batching) | vllm (optional extra; weights pushed each step)
    # DAPO's dynamic sampling (Yu et al. 2025, section 3.2): a group whose rewards all agree has zero advantage,
    # so it adds no gradient and only dilutes the step; drop it and draw more prompts (up to
    # ``max_sample_rounds`` generation rounds) until ``prompts_per_step`` groups with mixed rewards are filled.
    # On the tiny arith demo ~27% of the SFT model's groups are all-0 or all-1 (8 samples at temperature 1).
    dynamic_sampling: bool = False
    max_sample_rounds: int = 3
    # "sequence": each completion's mean token term, averaged over completions (GRPO); "token": every token
    # term summed over the step and divided by its token count (DAPO section 3.3).
    loss_norm: str = "sequence"
    # A prompt row field (e.g. "level") whose values every step draws in proportion to their share of the
    # prompts (stratified sampling). Each step's mean reward then varies with the policy, not with how many
    # hard prompts the step happened to draw: on the tiny arith demo the levels' pass rates differ ~5x.
    stratify: str = ""
    # After the last step, the final policy samples again the prompts of the first ``replay_steps`` steps with
    # their engine seeds: a paired measure of what training did to the reward. The first and last steps draw
    # different prompts, and on the tiny arith demo that difference alone moved the three-step means by -0.04
    # at an lr (3e-5) too small to change the policy.
    replay_steps: int = 3


@dataclass
class StageConfig:
    """One training stage (paper Table 2 for hyper-parameters, Tables 3-5 for data)."""

    kind: str = "pretrain"
    tokens: float = 0.0  # token budget (pre/mid-training)
    epochs: float = 0.0  # passes over the data (SFT)
    steps: int = 0  # explicit step count; 0 = derived from tokens/epochs
    seq_len: int = 2048
    global_batch_tokens: int = 0
    micro_batch_size: int = 8
    lr: float = 4e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    schedule: str = "linear"  # warmup then linear decay to min_lr_ratio * lr (also cosine, constant, wsd)
    decay_ratio: float = 0.2  # wsd: the share of steps, at the end, over which the lr decays linearly
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    grad_clip: float = 1.0
    rope_theta_scale: float = 1.0
    init_from: str = ""  # previous stage name, or a checkpoint path
    # Mixture weights by source name (Tables 3-4); SFT stages list datasets instead (Table 5).
    mixture: dict[str, float] = field(default_factory=dict)
    datasets: list[str] = field(default_factory=list)
    kd: KDConfig | None = None
    # SFT (Table 5 data): "auto" gives problem/solution rows the math system prompt and input/output rows
    # the code one (as the official README evaluates); "none" adds none; other text is added to every
    # conversation that has no system message.
    system_prompt: str = "auto"
    packing: bool = True  # pack conversations into seq_len rows (attention and positions reset per conversation)
    max_samples: int = 0  # >0: use at most this many conversations per dataset (CPU-sized runs)
    optional_datasets: list[str] = field(default_factory=list)  # used when their files exist, else reported
    grpo: GRPOConfig | None = None
    # Packed sequences: restart positions and block attention at document boundaries.
    doc_mask: bool = False
    # Bookkeeping (not in the paper): how often to log, evaluate held-out loss, and checkpoint.
    log_every: int = 1
    eval_every: int = 0  # 0: only before the first and after the last step
    eval_batches: int = 4
    save_every: int = 0  # 0: only at the end
    keep_checkpoints: int = 2
    # A step whose loss or gradient norm is NaN/inf: "stop" the stage naming the step and its rows, or "skip"
    # its update (counted as nonfinite_skips in the metrics) at most nonfinite_max_skips times, then stop.
    nonfinite: str = "stop"
    nonfinite_max_skips: int = 10
    note: str = ""

    def __post_init__(self) -> None:
        if self.kind not in STAGE_KINDS:
            raise ConfigError(f"stage kind {self.kind!r} is not one of {STAGE_KINDS}")
        bad = {k: v for k, v in self.mixture.items() if v < 0}
        if bad:
            raise ConfigError(f"negative mixture weights: {bad}")
        if self.nonfinite not in NONFINITE_MODES:
            raise ConfigError(f"nonfinite = {self.nonfinite!r} is not one of {NONFINITE_MODES}")


@dataclass
class RunConfig:
    name: str = "run"
    seed: int = 0
    description: str = ""
    paper: str = ""


@dataclass
class Recipe:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    stages: dict[str, StageConfig] = field(default_factory=dict)
    # Tables owned by one subsystem each ([curation], [influence], [eval], [deploy], [pipeline]); kept raw
    # here so config.py need not import them, and built strictly by their owner through ``section``.
    sections: dict[str, dict[str, Any]] = field(default_factory=dict)
    path: str = ""

    def section(self, name: str, cls: type) -> Any:
        """The ``[name]`` table built as dataclass ``cls`` (defaults when the recipe has none)."""
        if name not in SECTIONS:
            raise ConfigError(f"unknown recipe section {name!r}; known: {', '.join(SECTIONS)}")
        return build(cls, self.sections.get(name, {}), f"[{name}] of {self.path or self.run.name}")

    def stage(self, name: str) -> StageConfig:
        if name not in self.stages:
            raise ConfigError(f"recipe {self.path or self.run.name} has no stage {name!r}; "
                              f"stages: {', '.join(self.stages)}")
        return self.stages[name]

    def first_training_stage(self) -> str:
        if not self.stages:
            raise ConfigError(f"recipe {self.path or self.run.name} defines no stages")
        return next(iter(self.stages))


# ----------------------------------------------------------------------------------- strict building


def _strip_optional(tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _coerce(value: Any, tp: Any, where: str) -> Any:
    tp = _strip_optional(tp)
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {type(value).__name__}")
        return build(tp, value, where)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        key_tp, val_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {type(value).__name__}")
        return {str(k): _coerce(v, val_tp, f"{where}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def build(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Build dataclass ``cls`` from a dict, rejecting unknown keys and wrongly-typed values."""
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ConfigError(f"unknown key {unknown[0]!r} in {where or cls.__name__} "
                          f"(valid keys: {', '.join(sorted(fields))})")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field is missing
        raise ConfigError(f"{where or cls.__name__}: {e}") from None


def to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_dict(v) for v in obj]
    return obj


def build_model_config(table: dict[str, Any], where: str = "model") -> ModelConfig:
    """``preset = "140m"`` fills the Table 1 shape; any other key overrides it."""
    table = dict(table)
    preset = table.pop("preset", "")
    if preset:
        if preset not in MODEL_PRESETS:
            raise ConfigError(f"{where}.preset: unknown preset {preset!r}; known: {', '.join(MODEL_PRESETS)}")
        table = {**MODEL_PRESETS[preset], **table}
    return build(ModelConfig, {"preset": preset, **table}, where)


# Top-level tables a subsystem owns (see ``Recipe.section``).
SECTIONS = ("curation", "influence", "eval", "deploy", "pipeline")


def recipe_from_dict(data: dict[str, Any], where: str = "recipe") -> Recipe:
    data = dict(data)
    valid = ("run", "model", "data", "stages") + SECTIONS
    unknown = sorted(set(data) - set(valid))
    if unknown:
        raise ConfigError(f"unknown top-level table {unknown[0]!r} in {where} (valid: {', '.join(valid)})")
    for name in SECTIONS:
        if name in data and not isinstance(data[name], dict):
            raise ConfigError(f"{where}: [{name}] must be a table")
    stages_raw = data.get("stages", {})
    if not isinstance(stages_raw, dict):
        raise ConfigError(f"{where}: [stages] must be a table of stage tables")
    recipe = Recipe(
        run=build(RunConfig, data.get("run", {}), f"[run] of {where}"),
        model=build_model_config(data.get("model", {}), f"[model] of {where}"),
        data=build(DataConfig, data.get("data", {}), f"[data] of {where}"),
        stages={name: build(StageConfig, tbl, f"[stages.{name}] of {where}") for name, tbl in stages_raw.items()},
        sections={name: dict(data[name]) for name in SECTIONS if name in data},
        path=where,
    )
    names = [s.name for s in recipe.data.sources]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ConfigError(f"{where}: duplicate source names {sorted(dup)}")
    known = set(names)
    for sname, st in recipe.stages.items():
        missing = sorted(set(st.mixture) - known) if known else []
        if missing:
            raise ConfigError(f"[stages.{sname}] of {where}: mixture names unknown source {missing[0]!r}")
    return recipe


def load_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None


def load_recipe(path: str | Path) -> Recipe:
    return recipe_from_dict(load_toml(path), str(path))


def recipes_dir() -> Path:
    """The repository's ``recipes/`` folder (also works from an editable install)."""
    return Path(__file__).resolve().parents[2] / "recipes"


def resolve_recipe(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.is_file():
        return p
    cand = recipes_dir() / (name_or_path if name_or_path.endswith(".toml") else f"{name_or_path}.toml")
    if cand.is_file():
        return cand
    raise ConfigError(f"no recipe {name_or_path!r} (not a file, and not in {recipes_dir()})")
