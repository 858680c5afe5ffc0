"""attn_impl="flex": document-masked rows through FlexAttention's block mask give the dense-mask SDPA
result. torch 2.13 has no FlexAttention backward on CPU, so the CPU test checks the loss (forward); the
CUDA test checks loss and gradients of a training step."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from mobilellm_r1.config import ConfigError, model_preset
from mobilellm_r1.model import Transformer


def pair(device="cpu"):
    cfg = model_preset("micro", vocab_size=256, bos_id=1, eos_ids=[2], pad_id=0, max_seq_len=128, init_std=0.05)
    torch.manual_seed(0)
    dense = Transformer(cfg).to(device)
    flex = Transformer(dataclasses.replace(cfg, attn_impl="flex")).to(device)
    flex.load_state_dict(dense.state_dict())
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 256, (2, 128), generator=g).to(device)
    # three and two documents of uneven lengths, so blocks straddle document boundaries
    doc = torch.tensor([[0] * 40 + [1] * 60 + [2] * 28, [5] * 100 + [6] * 28]).to(device)
    return dense, flex, ids, doc


def loss(model, ids, doc):
    logits = model(ids[:, :-1], doc_ids=doc[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())


def test_flex_forward_equals_dense_mask_cpu():
    dense, flex, ids, doc = pair()
    with torch.no_grad():
        a, b = loss(dense, ids, doc), loss(flex, ids, doc)
        causal = F.cross_entropy(dense(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
    assert abs(a.item() - b.item()) < 1e-5
    assert abs(a.item() - causal.item()) > 1e-3  # the doc mask matters for this input


def test_attn_impl_validated():
    with pytest.raises(ConfigError, match="attn_impl"):
        model_preset("micro", attn_impl="flash")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention backward needs CUDA in torch 2.13")
def test_flex_step_equals_dense_mask_cuda():
    dense, flex, ids, doc = pair("cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    la, lb = loss(dense, ids, doc), loss(flex, ids, doc)
    la.backward()
    lb.backward()
    assert abs(la.item() - lb.item()) < 1e-4
    ga, gb = dict(dense.named_parameters()), dict(flex.named_parameters())
    for k in ga:
        assert torch.allclose(ga[k].grad, gb[k].grad, atol=1e-4, rtol=1e-3), k
