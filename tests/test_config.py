import shutil

import pytest

from mobilellm_r1.config import (ConfigError, MODEL_PRESETS, ModelConfig, StageConfig, build, load_recipe,
                                 model_preset, recipe_from_dict, recipes_dir)


def test_preset_param_counts_match_paper_table1():
    assert model_preset("140m").param_count() == 140_248_512
    assert model_preset("360m").param_count() == 359_431_168
    assert model_preset("950m").param_count() == 949_685_760
    cfg = model_preset("140m")
    assert cfg.non_embedding_param_count() == 140_248_512 - 128256 * 576
    untied = model_preset("140m", tie_embeddings=False)
    assert untied.param_count() == 140_248_512 + 128256 * 576


def test_unknown_key_names_key_and_file(tmp_path):
    p = tmp_path / "r.toml"
    p.write_text('[run]\nname = "x"\n[stages.pre]\nkind = "pretrain"\nlerning_rate = 1e-3\n')
    with pytest.raises(ConfigError) as e:
        load_recipe(p)
    assert "lerning_rate" in str(e.value) and str(p) in str(e.value) and "stages.pre" in str(e.value)


def test_unknown_top_level_table_and_bad_types(tmp_path):
    with pytest.raises(ConfigError, match="'modle'"):
        recipe_from_dict({"modle": {}})
    with pytest.raises(ConfigError, match="expected a number"):
        build(StageConfig, {"lr": "fast"}, "stage")
    with pytest.raises(ConfigError, match="expected an integer"):
        build(ModelConfig, {"dim": 1.5}, "model")
    with pytest.raises(ConfigError, match="unknown preset"):
        recipe_from_dict({"model": {"preset": "7b"}})
    with pytest.raises(ConfigError, match="stage kind"):
        build(StageConfig, {"kind": "pretraining"}, "s")


def test_mixture_must_name_declared_sources():
    data = {"data": {"sources": [{"name": "web"}]}, "stages": {"p": {"mixture": {"web": 1.0, "wbe": 0.1}}}}
    with pytest.raises(ConfigError, match="'wbe'"):
        recipe_from_dict(data)


def test_preset_with_override_and_stage_order():
    r = recipe_from_dict({"model": {"preset": "140m", "rope_theta": 8e6, "max_seq_len": 32768},
                          "stages": {"b": {"kind": "pretrain"}, "a": {"kind": "sft"}}})
    assert r.model.dim == 576 and r.model.rope_theta == 8e6 and r.model.max_seq_len == 32768
    assert list(r.stages) == ["b", "a"] and r.first_training_stage() == "b"
    with pytest.raises(ConfigError, match="no stage"):
        r.stage("c")


def test_missing_recipe_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_recipe(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[run\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_recipe(bad)


def test_every_shipped_recipe_loads():
    paths = sorted(recipes_dir().glob("*.toml"))
    assert paths, "recipes/ is empty"
    for p in paths:
        r = load_recipe(p)
        assert r.stages, p
        assert r.model.preset in MODEL_PRESETS, p


def test_recipe_sections_are_built_strictly_by_their_owner():
    from dataclasses import dataclass

    from mobilellm_r1.config import ConfigError, recipe_from_dict

    @dataclass
    class Demo:
        top_fraction: float = 0.1

    r = recipe_from_dict({"curation": {"top_fraction": 0.25}}, "r.toml")
    assert r.section("curation", Demo).top_fraction == 0.25
    assert recipe_from_dict({}, "r.toml").section("deploy", Demo).top_fraction == 0.1
    with pytest.raises(ConfigError, match="top_fractio"):
        recipe_from_dict({"curation": {"top_fractio": 0.25}}, "r.toml").section("curation", Demo)
    with pytest.raises(ConfigError, match="curatoin"):
        recipe_from_dict({"curatoin": {}}, "r.toml")
