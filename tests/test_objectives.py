"""The fused head loss against plain autograd, knowledge distillation identities, SFT masks, schedules."""

import pytest
import torch
import torch.nn.functional as F

from mobilellm_r1.config import StageConfig
from mobilellm_r1.train.objectives import IGNORE, TeacherTargets, head_loss, next_token_targets
from mobilellm_r1.train.schedule import lr_at


def _case(seed=0, n=37, d=16, v=50):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(v, d, dtype=torch.float64, generator=g, requires_grad=True)
    t = torch.randint(0, v, (n,), generator=g)
    t[3] = t[10] = IGNORE
    th = torch.randn(n, 8, dtype=torch.float64, generator=g)
    tw = torch.randn(v, 8, dtype=torch.float64, generator=g)
    return h, w, t, th, tw


def _reference(h, w, t, th, tw, alpha, temp):
    z = h @ w.T
    keep = t != IGNORE
    ce = F.cross_entropy(z, t, ignore_index=IGNORE, reduction="sum")
    tl = th @ tw.T / temp
    kl = (F.softmax(tl, -1) * (F.log_softmax(tl, -1) - F.log_softmax(z / temp, -1))).sum(-1)[keep].sum()
    return (1 - alpha) * ce + alpha * temp ** 2 * kl, ce, kl


@pytest.mark.parametrize("alpha,temp", [(0.0, 1.0), (0.5, 2.0), (1.0, 1.0), (0.3, 0.7)])
def test_fused_loss_and_gradients_equal_autograd(alpha, temp):
    h, w, t, th, tw = _case()
    teacher = TeacherTargets(hidden=th, weight=tw) if alpha else None
    out = head_loss(h, w, t, alpha=alpha, temperature=temp, teacher=teacher, chunk=5)
    ref, ce, kl = _reference(h, w, t, th, tw, alpha, temp)
    gh, gw = torch.autograd.grad(out.loss, [h, w])
    rh, rw = torch.autograd.grad(ref, [h, w])
    assert abs(float(out.loss - ref)) < 1e-9 and abs(float(out.ce_sum - ce)) < 1e-9
    if alpha:
        assert abs(float(out.kd_sum - kl)) < 1e-9
    assert torch.allclose(gh, rh, atol=1e-10) and torch.allclose(gw, rw, atol=1e-10)
    assert int(out.tokens) == 35


def test_chunking_does_not_change_the_result():
    h, w, t, th, tw = _case(1)
    a = head_loss(h, w, t, chunk=1).loss
    b = head_loss(h, w, t, chunk=1000).loss
    assert abs(float(a - b)) < 1e-10


def test_kd_term_is_zero_when_teacher_is_the_student():
    h, w, t, _, _ = _case(2)
    out = head_loss(h, w, t, alpha=1.0, temperature=2.0,
                    teacher=TeacherTargets(hidden=h.detach(), weight=w.detach()))
    assert abs(float(out.kd_sum)) < 1e-12 and abs(float(out.loss)) < 1e-12
    gh, gw = torch.autograd.grad(out.loss, [h, w])
    assert float(gh.abs().max()) < 1e-12 and float(gw.abs().max()) < 1e-12


def test_topk_cache_with_full_vocabulary_equals_online_teacher():
    h, w, t, th, tw = _case(3)
    online = head_loss(h, w, t, alpha=0.7, temperature=1.5, teacher=TeacherTargets(hidden=th, weight=tw))
    logp = torch.log_softmax(th @ tw.T, -1)
    lp, ids = logp.topk(logp.shape[-1], dim=-1)  # k = vocabulary, in a shuffled (sorted) id order
    cached = head_loss(h, w, t, alpha=0.7, temperature=1.5, teacher=TeacherTargets(topk_ids=ids, topk_logp=lp))
    assert abs(float(online.loss - cached.loss)) < 1e-9
    g1 = torch.autograd.grad(online.loss, [h, w])
    g2 = torch.autograd.grad(cached.loss, [h, w])
    assert all(torch.allclose(a, b, atol=1e-10) for a, b in zip(g1, g2))
    # a truncated cache is a different (renormalised) target, but still a finite, non-negative KL
    small = head_loss(h, w, t, alpha=1.0, teacher=TeacherTargets(topk_ids=ids[:, :5], topk_logp=lp[:, :5]))
    assert torch.isfinite(small.loss) and float(small.kd_sum) > 0


def test_bfloat16_inputs_accumulate_in_float32():
    h, w, t, _, _ = _case(4)
    ref = head_loss(h, w, t).loss
    out = head_loss(h.detach().bfloat16().requires_grad_(), w.detach().bfloat16().requires_grad_(), t)
    assert out.loss.dtype == torch.float32 and abs(float(out.loss) - float(ref)) / float(ref) < 2e-2


def test_bad_arguments_are_named():
    h, w, t, th, tw = _case()
    with pytest.raises(ValueError, match="teacher"):
        head_loss(h, w, t, alpha=0.5)
    with pytest.raises(ValueError, match="alpha"):
        head_loss(h, w, t, alpha=1.5, teacher=TeacherTargets(hidden=th, weight=tw))
    with pytest.raises(ValueError, match="targets"):
        head_loss(h, w, t[:-1])
    with pytest.raises(ValueError, match="hidden size"):
        head_loss(h, w[:, :-1], t)
    with pytest.raises(ValueError, match="either"):
        TeacherTargets(hidden=th)


def test_targets_mask_document_boundaries_and_prompts():
    tokens = torch.tensor([[1, 5, 6, 2, 1, 7, 8]])
    doc = torch.tensor([[0, 0, 0, 0, 1, 1, 1]])
    inputs, targets = next_token_targets(tokens, doc)
    assert inputs.tolist() == [[1, 5, 6, 2, 1, 7]]
    assert targets.tolist() == [[5, 6, 2, IGNORE, 7, 8]]  # EOS of doc 0 does not predict doc 1's BOS
    assistant = torch.tensor([[0, 0, 0, 1, 1, 1, 0]])
    _, t2 = next_token_targets(tokens, loss_mask=assistant)
    assert t2.tolist() == [[IGNORE, IGNORE, 2, 1, 7, IGNORE]]


def test_schedules_of_table_2():
    pre = StageConfig(kind="pretrain", lr=4e-3, warmup_steps=2000, min_lr_ratio=0.1)
    assert lr_at(0, 10000, pre) == pytest.approx(4e-3 / 2000)
    assert lr_at(1999, 10000, pre) == pytest.approx(4e-3)
    assert lr_at(9999, 10000, pre) == pytest.approx(4e-4)
    assert lr_at(5999, 10000, pre) == pytest.approx(4e-3 - 0.9 * 4e-3 * 3999 / 7999)
    mid = StageConfig(kind="midtrain", lr=3.6e-4, min_lr_ratio=0.0)
    assert lr_at(0, 100, mid) == pytest.approx(3.6e-4) and lr_at(99, 100, mid) == pytest.approx(0.0)
    sft = StageConfig(kind="sft", lr=8e-5, warmup_ratio=0.1, min_lr_ratio=0.0, weight_decay=0.0)
    assert lr_at(9, 100, sft) == pytest.approx(8e-5) and lr_at(4, 100, sft) == pytest.approx(4e-5)
    cos = StageConfig(lr=1.0, schedule="cosine", min_lr_ratio=0.0)
    assert lr_at(50, 101, cos) == pytest.approx(0.5)
    wsd = StageConfig(lr=1.0, warmup_steps=10, schedule="wsd", decay_ratio=0.2, min_lr_ratio=0.0)
    assert lr_at(4, 100, wsd) == pytest.approx(0.5) and lr_at(79, 100, wsd) == 1.0  # stable until 80%
    assert lr_at(80, 100, wsd) == 1.0 and lr_at(99, 100, wsd) == pytest.approx(0.0)
    assert lr_at(90, 100, wsd) == pytest.approx(1 - 10 / 19)


@pytest.mark.parametrize("alpha", [0.0, 0.4, 1.0])
def test_in_place_and_functional_chunk_paths_agree(alpha):
    """The eager in-place chunk (CPU) and the functional chunk (compiled on CUDA) are the same maths."""
    from mobilellm_r1.train.objectives import _chunk_loss, _chunk_loss_inplace, _teacher_probs

    h, w, t, th, tw = _case(5)
    h, w = h.detach(), w.detach()
    teacher = TeacherTargets(hidden=th, weight=tw)
    tp, logtp = _teacher_probs(teacher, slice(0, len(t)), w.shape[0], 1.3, h.dtype) if alpha else (None, None)
    a = _chunk_loss(h, w, t, alpha, 1.3, tp, logtp, True)
    b = _chunk_loss_inplace(h, w, t, alpha, 1.3, tp, logtp, True, torch.empty(len(t), w.shape[0], dtype=h.dtype))
    for x, y in zip(a[:3], b[:3]):
        assert abs(float(x - y)) < 1e-10
    assert torch.allclose(a[3], b[3], atol=1e-12)


def test_rows_without_targets_are_skipped_exactly():
    """On a CPU the head runs on target rows only: a batch with no target at all gives zero loss and zero
    gradients (not an empty-tensor error), and one kept row gives that row's cross-entropy."""
    h, w, t, _, _ = _case(4)
    none = torch.full_like(t, IGNORE)
    out = head_loss(h, w, none)
    gh, gw = torch.autograd.grad(out.loss, [h, w])
    assert float(out.loss) == 0.0 and int(out.tokens) == 0 and not gh.any() and not gw.any()
    one = none.clone()
    one[5] = t[5]
    out = head_loss(h, w, one)
    assert abs(float(out.loss) - float(F.cross_entropy((h[5:6] @ w.T), t[5:6], reduction="sum"))) < 1e-9
