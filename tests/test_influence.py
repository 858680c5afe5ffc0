"""Influence fidelity (issue 7): batched factored per-sample gradients against explicit per-sample autograd,
the projection against exact, the first-order prediction against a real SGD step, the sign convention,
Adam preconditioning and Eq. 6. Real text (the Python standard library's docs strings and sources) through
the real SmolLM2 tokenizer; our real model code and a real transformers Llama."""

import dataclasses
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mobilellm_r1.config import ModelConfig
from mobilellm_r1.influence.features import GradientFeaturizer, ParamSelection, factored_gram, materialise, pad_rows
from mobilellm_r1.influence.mixing import mix, source_rho, weights_from_rho
from mobilellm_r1.influence.scores import InfluenceConfig, Sample, score_model, spearman
from mobilellm_r1.model.transformer import Transformer
from mobilellm_r1.train.objectives import IGNORE, head_loss

VOCAB = 49152
SMALL = ModelConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=16, ffn_dim=64,
                    max_seq_len=128, bos_id=0, eos_ids=[0], pad_id=0)


@pytest.fixture(scope="module")
def rows():
    from mobilellm_r1.tokenizer import load_tokenizer

    tok = load_tokenizer("smollm2")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [f.read_text(errors="ignore")[:1500] for f in sorted(stdlib.glob("[a-m]*.py"))[:40]]
    return [r for r in tok.encode_batch(texts, bos=True, eos=True) if len(r) > 24]


def _model(cfg=SMALL, seed=0, steps=8, rows=None, dtype=torch.float64):
    torch.manual_seed(seed)
    m = Transformer(cfg)
    if rows is not None and steps:  # a few real steps so gradients are not those of a random init
        opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
        inp, tgt = pad_rows(rows[:16], 48)
        for _ in range(steps):
            parts = head_loss(m(inp, return_hidden=True), m.head_weight, tgt)  # the trainer's fused head: fast
            loss = parts.loss / parts.tokens
            opt.zero_grad()
            loss.backward()
            opt.step()
        m.zero_grad(set_to_none=True)
    return m.to(dtype)


_CACHE: dict = {}


def _trained(rows, dtype=torch.float64):
    """The default small model after a few real steps, trained once per module (copies handed out)."""
    import copy

    if "m" not in _CACHE:
        _CACHE["m"] = _model(rows=rows, dtype=torch.float32)
    return copy.deepcopy(_CACHE["m"]).to(dtype)


def _explicit(model, inputs, targets, names, logits_fn=None):
    """Per-sample gradients by the textbook loop: one loss.backward() per sample."""
    params = dict(model.named_parameters())
    out = []
    for i in range(inputs.shape[0]):
        model.zero_grad(set_to_none=True)
        logits = logits_fn(inputs[i:i + 1]) if logits_fn else model(inputs[i:i + 1])
        F.cross_entropy(logits[0].double(), targets[i], ignore_index=IGNORE).backward()
        out.append(torch.cat([params[n].grad.flatten() for n in names]))
    model.zero_grad(set_to_none=True)
    return torch.stack(out)


def _check(f, inputs, targets, explicit):
    fac, _ = f.factors(inputs, targets)
    g = materialise(fac)
    assert (g - explicit).norm() / explicit.norm() <= 1e-4
    gram, exact = factored_gram(fac, fac), explicit @ explicit.t()
    assert ((gram - exact).abs().max() / exact.abs().max()) <= 1e-4
    iu = np.triu_indices(len(exact), 1)
    assert spearman(gram.numpy()[iu], exact.numpy()[iu]) == pytest.approx(1.0)
    q = {n: torch.randn(gr.out_dim, gr.in_dim, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
         for n, gr in f.groups.items()}
    q2 = {n: torch.randn_like(v) for n, v in q.items()}
    for qs in ([q], [q, q2]):  # one query: a product per query; several: per-sample gradients once
        d, _ = f.dots(inputs, targets, qs)
        for j, qj in enumerate(qs):
            want = explicit @ torch.cat([qj[n].flatten() for n in f.groups])
            assert ((d[:, j] - want).abs().max() / want.abs().max()) <= 1e-4
            assert spearman(d[:, j].numpy(), want.numpy()) == pytest.approx(1.0)


@pytest.mark.parametrize("sharing", [False, True])
def test_factored_per_sample_gradients_equal_explicit_autograd(rows, sharing):
    m = _model(dataclasses.replace(SMALL, weight_sharing=True), rows=rows) if sharing else _trained(rows)
    inputs, targets = pad_rows([r[:20 + 4 * i] for i, r in enumerate(rows[:6])], 40)  # unequal lengths: padding targets are IGNORE
    assert (targets == IGNORE).any()
    f = GradientFeaturizer(m)
    assert "embed_tokens.weight" in f.groups  # the tied matrix: head part + input-embedding part
    _check(f, inputs, targets, _explicit(m, inputs, targets, list(f.groups)))
    # a subset: the last block only (no embedding, no head)
    f = GradientFeaturizer(m, ParamSelection(last_k=1, head=False, embed_input=False))
    assert all(n.startswith("layers.1.") for n in f.groups)
    _check(f, inputs, targets, _explicit(m, inputs, targets, list(f.groups)))


def test_hf_llama_generic_hooks(rows):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)).double()
    inputs, targets = pad_rows(rows[:5], 32)
    logits = lambda x: hf(input_ids=x).logits  # noqa: E731
    for sel in (ParamSelection(), ParamSelection(last_k=1, head=False, embed_input=False)):
        f = GradientFeaturizer(hf, sel)
        _check(f, inputs, targets, _explicit(hf, inputs, targets, list(f.groups), logits))
    assert "model.embed_tokens.weight" in GradientFeaturizer(hf).groups  # lm_head tied into the embedding
    # the sketched features through the generic hooks (tied lm_head + embedding lookup in one sketch)
    train, probe = pad_rows(rows[:16], 32), pad_rows(rows[-4:], 32)
    f = GradientFeaturizer(hf)
    q = f.mean_gradient([probe])
    exact = f.dots(*train, [q])[0][:, 0].numpy()
    fp = GradientFeaturizer(hf, proj_dim=4096)
    proj = (fp.features(*train)[0] @ fp.project(q)).numpy()
    assert np.corrcoef(exact, proj)[0, 1] > 0.85  # measured 0.93-0.94 over seeds 0-2 (untrained model)


def test_projection_tracks_exact_influence(rows):
    """8192-dim sketched influence vs exact, rank correlation >= 0.95 on every seed (issue 7). Measured
    0.992-0.9996 over seeds 0-5 with the TensorSketch; LoGra's Kronecker Gaussian gave 0.82-0.93 here."""
    m = _model(dataclasses.replace(SMALL, dim=64, ffn_dim=128, n_heads=4, n_kv_heads=2), rows=rows, steps=4,
               dtype=torch.float32)
    train, probe = pad_rows(rows[:32], 48), pad_rows(rows[-8:], 48)
    f = GradientFeaturizer(m)
    q = f.mean_gradient([probe])
    exact = f.dots(*train, [q])[0][:, 0].numpy()
    assert np.std(exact) > 0
    sps = []
    for seed in range(3):
        f = GradientFeaturizer(m, proj_dim=8192, seed=seed, calibrate=probe)
        assert 7000 <= f.dim <= 8400
        feats, _ = f.features(*train)
        sps.append(spearman(exact, (feats @ f.project(q)).numpy()))
    assert min(sps) >= 0.95, sps
    # a different seed is a different sketch (the check above is not one lucky draw repeated)
    assert len(set(np.round(sps, 6))) == 3, sps


def test_first_order_prediction_matches_one_sgd_step(rows):
    m = _trained(rows)
    probe = rows[-6:]
    pin, ptg = pad_rows(probe, 40)
    cfg = InfluenceConfig(seq_len=40, batch_size=4)
    samples = [Sample("s", i, r[:41]) for i, r in enumerate(rows[:12])]
    lr = 2e-3
    pred = score_model(m, samples, {"code": probe}, cfg, lr=lr)[:, 0]

    def probe_loss(model):
        with torch.no_grad():
            ce = F.cross_entropy(model(pin).flatten(0, 1), ptg.flatten(), ignore_index=IGNORE, reduction="none")
            keep = (ptg != IGNORE).double()
            return float(((ce.view_as(keep) * keep).sum(1) / keep.sum(1)).mean())

    base = probe_loss(m)
    actual = []
    state = {k: v.clone() for k, v in m.state_dict().items()}
    for s in samples:
        m.load_state_dict(state)
        inp, tgt = pad_rows([s.ids], 40)
        m.zero_grad(set_to_none=True)
        F.cross_entropy(m(inp)[0], tgt[0], ignore_index=IGNORE).backward()
        with torch.no_grad():
            for p in m.parameters():
                p -= lr * p.grad
        actual.append(base - probe_loss(m))  # positive = the probe loss went down
    m.load_state_dict(state)
    r = np.corrcoef(pred, actual)[0, 1]
    assert r >= 0.9, (r, pred, actual)
    assert np.sign(pred).tolist() == np.sign(actual).tolist() or r >= 0.95


def test_sign_a_sample_identical_to_the_probe_set_has_positive_influence(rows):
    m = _trained(rows)
    cfg = InfluenceConfig(seq_len=40, batch_size=4)
    for probe in rows[:4]:
        s = score_model(m, [Sample("x", 0, probe[:41])], {"math": [probe[:41]]}, cfg, lr=1.0)
        assert s[0, 0] > 0


def test_adam_preconditioner_divides_the_probe_gradient_by_sqrt_v(rows):
    m = _trained(rows)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    inp, tgt = pad_rows(rows[:8], 40)
    F.cross_entropy(m(inp).flatten(0, 1), tgt.flatten(), ignore_index=IGNORE).backward()
    opt.step()
    names = {id(p): n for n, p in m.named_parameters()}
    v = {names[id(p)]: st["exp_avg_sq"] for p, st in opt.state.items()}
    cfg = InfluenceConfig(seq_len=40, batch_size=4, preconditioner="adam")
    samples = [Sample("s", i, r[:41]) for i, r in enumerate(rows[8:12])]
    probe = rows[-4:]
    got = score_model(m, samples, {"code": probe}, cfg, lr=1.0, adam_v=v, eps=1e-8)[:, 0]
    f = GradientFeaturizer(m)
    sin, stg = pad_rows([s.ids for s in samples], 40)
    g = _explicit(m, sin, stg, list(f.groups))
    pin, ptg = pad_rows(probe, 40)
    q = _explicit(m, pin, ptg, list(f.groups)).mean(0)
    h = torch.cat([(v[n].sqrt() + 1e-8).flatten() for n in f.groups])
    want = (g @ (q / h)).numpy()
    assert np.abs(got - want).max() / np.abs(want).max() <= 1e-4
    # the projected path preconditions the same probe side: against the exact scorer on 16 samples (with 4,
    # Pearson swung between -0.6 and 0.9 over sketch seeds for any projection; 16 gave 0.98-0.997)
    samples = [Sample("s", i, r[:41]) for i, r in enumerate(rows[8:24])]
    exact = score_model(m, samples, {"code": probe}, cfg, lr=1.0, adam_v=v, eps=1e-8)[:, 0]
    cfgp = InfluenceConfig(seq_len=40, batch_size=4, preconditioner="adam", proj_dim=8192)
    proj = score_model(m, samples, {"code": probe}, cfgp, lr=1.0, adam_v=v, eps=1e-8)[:, 0]
    assert np.corrcoef(proj, exact)[0, 1] > 0.9


def test_datainf_runs_on_projected_features(rows):
    m = _trained(rows, torch.float32)
    cfg = InfluenceConfig(seq_len=40, batch_size=4, preconditioner="datainf", proj_dim=2048)
    samples = [Sample("s", i, r[:41]) for i, r in enumerate(rows[:8])]
    s = score_model(m, samples, {"code": rows[-4:], "math": rows[-8:-4]}, cfg, lr=1.0)
    assert s.shape == (8, 2) and np.isfinite(s).all() and np.abs(s).sum() > 0


def test_eq6_weights_sum_to_one_and_negative_rho_is_floored(tmp_path):
    rows = [{"source": "a", "tokens": 100, "joint": 2.0}, {"source": "a", "tokens": 300, "joint": 1.0},
            {"source": "b", "tokens": 50, "joint": -4.0}, {"source": "c", "tokens": 10, "joint": 0.5}]
    rho = source_rho(rows)
    assert rho["a"] == pytest.approx((2.0 * 100 + 1.0 * 300) / 400)
    w, clamped = weights_from_rho(rho, floor=0.01)
    assert sum(w.values()) == pytest.approx(1.0) and clamped == ["b"]
    assert w["b"] == pytest.approx(0.01 * rho["a"] / (rho["a"] + rho["c"] + 0.01 * rho["a"]))
    res = mix(rows, tmp_path / "m.toml", stage="midtrain_p2")
    import tomllib

    got = tomllib.loads((tmp_path / "m.toml").read_text())["stages"]["midtrain_p2"]["mixture"]
    assert sum(got.values()) == pytest.approx(1.0, abs=1e-5) and set(got) == {"a", "b", "c"}
    assert res["weights"]["a"] > res["weights"]["c"] > res["weights"]["b"]
    w, clamped = weights_from_rho({"x": -1.0, "y": -2.0})
    assert w == {"x": 0.5, "y": 0.5} and clamped == ["x", "y"]
