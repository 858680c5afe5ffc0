"""The shipped recipes: every one loads; the paper-scale ones carry the paper's numbers.

The paper checks (arXiv:2509.24945, v1 table numbers) apply to recipes/140m.toml, 360m.toml and 950m.toml
only; any other recipe (e.g. the CPU-sized tiny.toml) just has to load.
"""

import math
import re

import pytest

from mobilellm_r1.config import MODEL_PRESETS, ConfigError, load_recipe, recipes_dir, to_dict

ALL_RECIPES = sorted(recipes_dir().glob("*.toml"))

# Table 1: layers, heads, KV heads, dim, hidden dim; parameter count with the 128,256-id vocabulary.
TABLE1 = {
    "140m": dict(n_layers=15, n_heads=9, n_kv_heads=3, dim=576, ffn_dim=2048, params=140_248_512),
    "360m": dict(n_layers=15, n_heads=16, n_kv_heads=4, dim=1024, ffn_dim=4096, params=359_431_168),
    "950m": dict(n_layers=22, n_heads=24, n_kv_heads=6, dim=1536, ffn_dim=6144, params=949_685_760),
}
PAPER_RECIPES = [recipes_dir() / f"{size}.toml" for size in TABLE1]

STAGE_ORDER = ["pretrain_p1", "pretrain_p2", "midtrain_p1", "midtrain_p2", "sft_general", "sft_reasoning"]

# Sums of the mixture entries as printed (the "Total" rows say 100%).
PRINTED_SUMS = {"pretrain_p1": 1.0001, "pretrain_p2": 0.9999, "midtrain_p1": 0.9999, "midtrain_p2": 0.9998}

# §5.1.1: sources assigned to the Code / Math / Knowledge capability-probing domains.
CAPABILITY_DOMAINS = {
    "code": {"starcoder", "stackexchange", "nemotron_code", "cosmopedia", "natural_reasoning", "pes2o"},
    "math": {"open_web_math", "finemath", "algebraic_stack", "nemotron_math", "cosmopedia", "natural_reasoning",
             "pes2o"},
    "knowledge": {"fineweb_edu", "wiki", "arxiv", "cosmopedia", "nemotron_science", "natural_reasoning", "pes2o"},
}


def _id(p):
    return p.name


@pytest.fixture(scope="module", params=PAPER_RECIPES, ids=_id)
def paper(request):
    return load_recipe(request.param)


# ------------------------------------------------------------------------------------------ every recipe


def test_paper_recipes_are_shipped():
    names = {p.name for p in ALL_RECIPES}
    assert {"140m.toml", "360m.toml", "950m.toml"} <= names


@pytest.mark.parametrize("path", ALL_RECIPES, ids=_id)
def test_every_recipe_loads(path):
    r = load_recipe(path)
    assert r.stages, f"{path} defines no stages"
    assert r.model.preset in MODEL_PRESETS
    declared = {s.name for s in r.data.sources}
    for name, st in r.stages.items():
        if declared:
            assert set(st.mixture) <= declared, name
        assert all(w >= 0 for w in st.mixture.values()), name


@pytest.mark.parametrize("path", ALL_RECIPES, ids=_id)
def test_unknown_key_in_a_copy_raises_naming_the_key(path, tmp_path):
    text = path.read_text()
    first = load_recipe(path).first_training_stage()
    header = re.compile(rf"^\[stages\.{re.escape(first)}\][^\n]*\n", re.MULTILINE)
    assert header.search(text), f"no [stages.{first}] header line in {path}"
    bad = tmp_path / path.name
    bad.write_text(header.sub(lambda m: m.group(0) + "lerning_rate = 1e-3\n", text, count=1))
    with pytest.raises(ConfigError) as e:
        load_recipe(bad)
    msg = str(e.value)
    assert "lerning_rate" in msg and f"stages.{first}" in msg and str(bad) in msg


def test_unknown_key_in_a_source_raises(tmp_path):
    path = recipes_dir() / "140m.toml"
    bad = tmp_path / "140m.toml"
    bad.write_text(path.read_text().replace('name = "fineweb_edu"\n', 'name = "fineweb_edu"\nweight = 0.5\n', 1))
    with pytest.raises(ConfigError, match="'weight'"):
        load_recipe(bad)


# ------------------------------------------------------------------------------- paper recipes: Table 1


@pytest.mark.parametrize("size", TABLE1)
def test_table1_shapes_and_param_counts(size):
    m = load_recipe(recipes_dir() / f"{size}.toml").model
    want = TABLE1[size]
    assert m.preset == size
    assert (m.n_layers, m.n_heads, m.n_kv_heads, m.dim, m.ffn_dim) == (
        want["n_layers"], want["n_heads"], want["n_kv_heads"], want["dim"], want["ffn_dim"])
    assert m.param_count() == want["params"]
    assert (m.vocab_size, m.head_dim, m.tie_embeddings, m.qk_norm) == (128256, 64, True, True)
    assert m.max_seq_len == 32768  # 32k context of the post-trained models


def test_sizes_differ_only_in_run_and_model():
    r = {size: load_recipe(recipes_dir() / f"{size}.toml") for size in TABLE1}
    assert to_dict(r["140m"].data) == to_dict(r["360m"].data) == to_dict(r["950m"].data)
    assert to_dict(r["140m"].stages) == to_dict(r["360m"].stages) == to_dict(r["950m"].stages)
    assert len({x.run.name for x in r.values()}) == 3


# ----------------------------------------------------------------------- paper recipes: stages, Table 2


def test_stage_order_and_chaining(paper):
    names = list(paper.stages)
    assert names[:6] == STAGE_ORDER
    assert names[6:] in ([], ["grpo"])
    assert paper.stages["pretrain_p1"].init_from == ""
    for prev, name in zip(names, names[1:]):
        assert paper.stages[name].init_from == prev
    kinds = [paper.stages[n].kind for n in names]
    assert kinds[:6] == ["pretrain", "pretrain", "midtrain", "midtrain", "sft", "sft"]


def test_table2_pretraining(paper):
    for name in ("pretrain_p1", "pretrain_p2"):
        st = paper.stages[name]
        assert (st.tokens, st.steps, st.seq_len, st.micro_batch_size, st.lr) == (2e12, 500_000, 2048, 16, 4e-3)
        assert st.global_batch_tokens == 16 * 128 * 2048
        # §3.2: Adam (0.9, 0.95, 1e-8), weight decay 0.1, 2k warmup, linear decay to 0.1x peak.
        assert (st.betas, st.eps, st.weight_decay) == ([0.9, 0.95], 1e-8, 0.1)
        assert (st.warmup_steps, st.schedule, st.min_lr_ratio) == (2000, "linear", 0.1)
    assert paper.data.seq_len == 2048


def test_table2_midtraining_with_kd(paper):
    for name in ("midtrain_p1", "midtrain_p2"):
        st = paper.stages[name]
        assert (st.tokens, st.steps, st.seq_len, st.micro_batch_size, st.lr) == (1e11, 50_000, 4096, 4, 3.6e-4)
        assert (st.schedule, st.min_lr_ratio) == ("linear", 0.0)  # linear decay to zero
        assert st.kd is not None and st.kd.teacher == "meta-llama/Llama-3.1-8B-Instruct" and st.kd.alpha == 1.0


def test_table2_post_training(paper):
    g, r = paper.stages["sft_general"], paper.stages["sft_reasoning"]
    assert (g.epochs, g.seq_len, g.micro_batch_size, g.lr, g.warmup_ratio) == (2, 4096, 4, 5e-6, 0.03)
    assert (r.epochs, r.seq_len, r.micro_batch_size, r.lr, r.warmup_ratio) == (4, 32768, 8, 8e-5, 0.1)
    for st in (g, r):
        assert (st.weight_decay, st.schedule, st.min_lr_ratio, st.kd) == (0.0, "linear", 0.0, None)
        assert not st.mixture


def test_section_7_4_grpo_if_present(paper):
    if "grpo" not in paper.stages:
        pytest.skip("no grpo stage")
    st = paper.stages["grpo"]
    assert (st.kind, st.steps, st.lr, st.datasets) == ("grpo", 100, 3e-6, ["numinamath_tir"])
    assert paper.data.source("numinamath_tir").hf == "AI-MO/NuminaMath-TIR"


# ------------------------------------------------------------------ paper recipes: Tables 3-5 and §5.1.1


def test_mixtures_sum_to_the_printed_totals(paper):
    for name, total in PRINTED_SUMS.items():
        mix = paper.stages[name].mixture
        assert mix and all(w > 0 for w in mix.values()), name
        assert math.isclose(sum(mix.values()), total, abs_tol=1e-9), (name, sum(mix.values()))
        assert abs(sum(mix.values()) - 1.0) < 5e-4


def test_table3_pretraining_mix(paper):
    p1, p2 = paper.stages["pretrain_p1"].mixture, paper.stages["pretrain_p2"].mixture
    assert len(p1) == 7 and len(p2) == 14 and set(p1) < set(p2)
    assert (p1["fineweb_edu"], p2["fineweb_edu"]) == (0.6375, 0.5483)
    assert (p1["starcoder"], p2["starcoder"]) == (0.1066, 0.0052)
    assert (p1["open_web_math"], p2["open_web_math"]) == (0.0693, 0.2333)
    assert (p1["algebraic_stack"], p2["algebraic_stack"]) == (0.0225, 0.0126)
    assert (p2["finemath"], p2["natural_reasoning"], p2["nemotron_science"], p2["pes2o"]) == (
        0.0801, 0.0318, 0.0003, 0.0008)
    tokens = {s.name: s.tokens_b for s in paper.data.sources if s.name in p2}
    assert (tokens["fineweb_edu"], tokens["starcoder"], tokens["natural_reasoning"]) == (1300.0, 263.8, 1.8)
    assert round(sum(tokens.values()), 1) == 1784.1  # §3.3.1: "1.8T" in total
    assert paper.data.source("fineweb_edu").hf == "HuggingFaceFW/fineweb-edu"
    assert paper.data.source("finemath").hf_config == "finemath-3plus"


def test_table4_midtraining_mix(paper):
    m1, m2 = paper.stages["midtrain_p1"].mixture, paper.stages["midtrain_p2"].mixture
    assert len(m1) == 9 and len(m2) == 10 and set(m2) - set(m1) == {"benchmark_train"}
    assert (m1["dolmino_dclm"], m2["dolmino_dclm"]) == (0.3703, 0.0651)
    assert (m1["nemotron_pretraining_code"], m2["nemotron_pretraining_code"]) == (0.2069, 0.2910)
    assert (m1["nemotron_cc_math"], m2["nemotron_cc_math"]) == (0.0345, 0.1940)
    assert (m1["starcoder"], m2["starcoder"], m2["dolmino_math"]) == (0.0690, 0.0970, 0.2910)
    assert m2["benchmark_train"] == 0.0097
    assert {paper.data.source(n).hf for n in m1 if n.startswith("dolmino_")} == {"allenai/dolmino-mix-1124"}


def test_table5_post_training_data(paper):
    assert paper.stages["sft_general"].datasets == ["tulu3_sft"]
    assert paper.stages["sft_reasoning"].datasets == [
        "open_math_reasoning", "open_science_reasoning_2", "open_code_reasoning_2"]
    assert paper.data.source("tulu3_sft").hf == "allenai/tulu-3-sft-olmo-2-mixture-0225"
    assert paper.data.source("open_math_reasoning").hf == "nvidia/OpenMathReasoning"


def test_every_named_dataset_is_declared_and_every_source_is_used(paper):
    declared = {s.name for s in paper.data.sources}
    used = set()
    for st in paper.stages.values():
        used |= set(st.mixture) | set(st.datasets)
    assert used == declared


def test_section_5_1_1_capability_domains(paper):
    allowed = {"code", "math", "knowledge"}
    for s in paper.data.sources:
        assert set(s.capabilities) <= allowed, s.name
        assert len(s.capabilities) == len(set(s.capabilities)), s.name
    for cap, members in CAPABILITY_DOMAINS.items():
        assert {s.name for s in paper.data.sources if cap in s.capabilities} == members, cap
