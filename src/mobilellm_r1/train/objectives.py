"""Training objectives on top of the output head, fused so a large vocabulary never materialises in full.

One autograd function, :func:`head_loss`, serves every stage. Given the final hidden states ``(N, d)``, the
(tied) head weight ``(V, d)`` and targets ``(N,)`` (``IGNORE`` = no loss: padding, prompt tokens in SFT, a
document boundary), it returns the *sum* over the kept tokens of

    (1 - alpha) * CE(target)  +  alpha * T^2 * KL(p_teacher^T || p_student^T)        (paper section 3.2)

where ``p^T = softmax(logits / T)``. The teacher is either online (its hidden states and head weight: its
logits are computed chunk by chunk like the student's) or a top-k cache of log-probs
(``mobilellm-r1 distill cache``), renormalised over the k kept ids; with k = vocab the two are identical.

Why fused: a 128k-vocab head over a 4k x 16 micro-batch is 8.4 GB of fp32 logits, and autograd would keep
them (and the softmax) for the backward pass. Here rows are processed in chunks, and the gradients with
respect to the hidden states and the head weight are computed in the forward pass from the chunk's logits,
which are then freed; backward only scales them. Peak extra memory is a few ``(chunk, V)`` fp32 buffers.

Gradients per row, with ``z`` the student logits, ``p = softmax(z)``, ``q = softmax(z / T)``, ``t`` the
teacher distribution at temperature T:  d CE / dz = p - onehot(target);  d (T^2 KL) / dz = T (q - t).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE = -100
_CHUNK_ELEMENTS = 1 << 25  # logits elements per chunk on CPU: 128 MB in fp32
_CHUNK_ELEMENTS_CUDA = 1 << 28  # on a GPU: fewer, larger chunks keep the kernels busy (1 GB in fp32)
_COMPILE = False


def set_compile(enabled: bool) -> None:
    """Run each chunk's loss through ``torch.compile`` on CUDA, fusing the elementwise passes over the
    ``(chunk, V)`` logits (softmax, gradient, masking) that otherwise dominate the head's time."""
    global _COMPILE
    _COMPILE = enabled


_compiled = None


def _compiled_chunk_loss():
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(_chunk_loss, dynamic=False)
    return _compiled


@dataclass
class TeacherTargets:
    """The teacher's side of distillation for the same N rows: online (``hidden`` + ``weight``) or cached
    top-k (``topk_ids`` + ``topk_logp``)."""

    hidden: torch.Tensor | None = None  # (N, d_teacher)
    weight: torch.Tensor | None = None  # (V, d_teacher)
    topk_ids: torch.Tensor | None = None  # (N, k) int64
    topk_logp: torch.Tensor | None = None  # (N, k) log-probs at temperature 1

    def __post_init__(self) -> None:
        online = self.hidden is not None and self.weight is not None
        cached = self.topk_ids is not None and self.topk_logp is not None
        if online == cached:
            raise ValueError("TeacherTargets needs either hidden+weight (online) or topk_ids+topk_logp (cache)")


@dataclass
class LossParts:
    loss: torch.Tensor  # scalar: the weighted sum (carries the gradient)
    ce_sum: torch.Tensor  # scalar: sum of CE over kept tokens (no gradient)
    kd_sum: torch.Tensor  # scalar: sum of KL (temperature T, not multiplied by T^2) over kept tokens
    tokens: torch.Tensor  # scalar int: kept tokens


def _acc(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: fp32 for half types, the input's own for fp32/fp64."""
    return torch.promote_types(dtype, torch.float32)


def _teacher_probs(teacher: TeacherTargets, rows: slice, vocab: int, temperature: float,
                   dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher distribution ``t`` at temperature T as (probs, log-probs), both ``(c, V)`` fp32; for a top-k
    teacher, zero / -inf outside the kept ids (the kept mass renormalised to 1)."""
    if teacher.hidden is not None:
        t_logits = (teacher.hidden[rows].to(teacher.weight.dtype) @ teacher.weight.t()).to(_acc(dtype))
        if t_logits.shape[-1] != vocab:
            raise ValueError(f"teacher vocabulary {t_logits.shape[-1]} != student vocabulary {vocab}")
        logt = torch.log_softmax(t_logits / temperature, dim=-1)
        return logt.exp(), logt
    ids, logp = teacher.topk_ids[rows].long(), teacher.topk_logp[rows].to(_acc(dtype))
    logt_k = torch.log_softmax(logp / temperature, dim=-1)
    logt = torch.full((ids.shape[0], vocab), float("-inf"), device=logp.device, dtype=logt_k.dtype)
    logt.scatter_(1, ids, logt_k)
    return logt.exp(), logt


def _chunk_loss(h, weight, tgt, alpha, temperature, t, logt, want_grad):
    """Loss terms (and d loss / d logits when ``want_grad``) for one chunk of rows; ``t``/``logt`` are the
    teacher's probabilities / log-probabilities (None without distillation)."""
    logits = (h @ weight.t()).to(_acc(h.dtype))
    keep = tgt != IGNORE
    safe = tgt.clamp(min=0)
    lse = torch.logsumexp(logits, dim=-1)
    ce = (lse - logits.gather(1, safe[:, None]).squeeze(1)) * keep
    grad = None
    if want_grad and alpha < 1:
        grad = torch.exp(logits - lse[:, None]).mul_(1 - alpha)
        grad[torch.arange(len(tgt), device=tgt.device), safe] -= (1 - alpha)
    kl = torch.zeros_like(ce)
    if alpha > 0 and t is not None:
        logq = torch.log_softmax(logits / temperature, dim=-1)
        # t * (log t - log q), with 0 * log 0 = 0 where the (top-k) teacher puts no mass
        kl = (t * (logt - logq)).nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0).sum(-1) * keep
        if want_grad:
            g_kd = (logq.exp_() - t).mul_(alpha * temperature)
            grad = g_kd if grad is None else grad.add_(g_kd)
    if grad is not None:
        grad = grad.mul_(keep[:, None]).to(h.dtype)
    loss = ((1 - alpha) * ce + alpha * temperature ** 2 * kl).sum()
    return loss, ce.sum(), kl.sum(), grad


def _chunk_loss_inplace(h, weight, tgt, alpha, temperature, t, logt, want_grad, buf):
    """:func:`_chunk_loss` computed inside one reusable ``(chunk, V)`` buffer (the eager path).

    On a CPU each freshly allocated ``(chunk, V)`` fp32 tensor costs page faults on top of its arithmetic
    (measured: a subtraction into a new 134 MB buffer 50-75 ms, in place 7 ms), so the logits become the
    softmax and then the gradient in the same memory. The functional version stays for ``torch.compile``,
    which fuses those passes itself."""
    z = buf[: h.shape[0]]
    if h.dtype == z.dtype and weight.dtype == z.dtype and not torch.is_autocast_enabled(h.device.type):
        torch.mm(h, weight.t(), out=z)
    else:
        z.copy_(h @ weight.t())
    keep = tgt != IGNORE
    safe = tgt.clamp(min=0)
    z_t = z.gather(1, safe[:, None]).squeeze(1)
    kd = alpha > 0 and t is not None
    logq = torch.log_softmax(z / temperature, dim=-1) if kd else None
    m = z.amax(dim=-1, keepdim=True)
    z.sub_(m).exp_()
    total = z.sum(dim=-1, keepdim=True)
    ce = ((total.log() + m).squeeze(1) - z_t) * keep
    kl = torch.zeros_like(ce)
    if kd:
        kl = (t * (logt - logq)).nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0).sum(-1) * keep
    grad = None
    if want_grad and (alpha < 1 or kd):
        z.div_(total)  # softmax
        if alpha < 1:
            if alpha:
                z.mul_(1 - alpha)
            z[torch.arange(len(tgt), device=tgt.device), safe] -= (1 - alpha)
        else:
            z.zero_()
        if kd:
            z.add_(logq.exp_().sub_(t).mul_(alpha * temperature))
        if z.is_cuda or not bool(keep.all()):  # the check is a host sync on a GPU; the multiply is cheap there
            z.mul_(keep[:, None])
        grad = z
    loss = ((1 - alpha) * ce + alpha * temperature ** 2 * kl).sum()
    return loss, ce.sum(), kl.sum(), grad


class _FusedHeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, alpha, temperature, teacher, chunk):
        n = hidden.shape[0]
        grad_h = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros(weight.shape, dtype=_acc(weight.dtype), device=weight.device) \
            if ctx.needs_input_grad[1] else None
        want = grad_h is not None or grad_w is not None
        loss = hidden.new_zeros((), dtype=_acc(hidden.dtype))
        ce_sum, kd_sum = loss.clone(), loss.clone()
        compiled = _COMPILE and hidden.is_cuda
        mixed = torch.is_autocast_enabled(hidden.device.type)
        buf = None if compiled else torch.empty(min(chunk, n), weight.shape[0], dtype=_acc(hidden.dtype),
                                                device=hidden.device)
        for i in range(0, n, chunk):
            rows = slice(i, min(i + chunk, n))
            h = hidden[rows]
            t = logt = None
            if alpha > 0 and teacher is not None:
                t, logt = _teacher_probs(teacher, rows, weight.shape[0], temperature, h.dtype)
            if compiled:
                l, c, k, g = _compiled_chunk_loss()(h, weight, targets[rows], alpha, temperature, t, logt, want)
            else:
                l, c, k, g = _chunk_loss_inplace(h, weight, targets[rows], alpha, temperature, t, logt, want, buf)
            loss += l
            ce_sum += c
            kd_sum += k
            # fp32/fp64 without autocast: accumulate in place (`out=`/in-place matmuls bypass autocast, so
            # under bf16 autocast they would run as fp32 GEMMs: measured 2 x 0.8 s of a 3.9 s profile at 140m)
            if g is not None and g.dtype == h.dtype == weight.dtype and not mixed:
                if grad_h is not None:
                    torch.mm(g, weight, out=grad_h[rows])
                if grad_w is not None:
                    grad_w.addmm_(g.t(), h)
            elif g is not None:
                g = g.to(h.dtype)
                if grad_h is not None:
                    grad_h[rows] = g @ weight
                if grad_w is not None:
                    grad_w += (g.t() @ h).to(grad_w.dtype)
            elif grad_h is not None:  # alpha == 1 without a teacher: no gradient from this chunk
                grad_h[rows] = 0
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype) if grad_w is not None else None)
        ctx.mark_non_differentiable(ce_sum, kd_sum)
        return loss, ce_sum, kd_sum

    @staticmethod
    def backward(ctx, grad_loss, _ce, _kd):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_loss.to(grad_h.dtype) if grad_h is not None else None
        gw = grad_w * grad_loss.to(grad_w.dtype) if grad_w is not None else None
        return gh, gw, None, None, None, None, None


def head_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *, alpha: float = 0.0,
              temperature: float = 1.0, teacher: TeacherTargets | None = None, chunk: int = 0) -> LossParts:
    """Summed CE / KD loss of ``hidden`` ``(..., d)`` through ``weight`` ``(V, d)`` against ``targets`` ``(...)``.

    ``alpha`` is the distillation weight (0 = plain CE, 1 = pure KD as in the paper's mid-training);
    ``chunk`` rows per step (0 = about 32M logits per chunk). Divide ``loss`` by the kept-token count of
    the whole (global) batch to get a mean.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"KD alpha must be in [0, 1], got {alpha}")
    if alpha > 0 and teacher is None:
        raise ValueError("KD alpha > 0 needs teacher targets")
    if temperature <= 0:
        raise ValueError(f"KD temperature must be positive, got {temperature}")
    d = hidden.shape[-1]
    hidden, targets = hidden.reshape(-1, d), targets.reshape(-1)
    if targets.shape[0] != hidden.shape[0]:
        raise ValueError(f"{hidden.shape[0]} hidden rows but {targets.shape[0]} targets")
    if weight.shape[-1] != d:
        raise ValueError(f"head weight {tuple(weight.shape)} does not match hidden size {d}")
    if teacher is not None and teacher.hidden is not None:
        teacher = TeacherTargets(hidden=teacher.hidden.reshape(hidden.shape[0], -1), weight=teacher.weight)
    elif teacher is not None:
        k = teacher.topk_ids.shape[-1]
        teacher = TeacherTargets(topk_ids=teacher.topk_ids.reshape(-1, k), topk_logp=teacher.topk_logp.reshape(-1, k))
    budget = _CHUNK_ELEMENTS_CUDA if hidden.is_cuda else _CHUNK_ELEMENTS
    chunk = chunk or max(16, budget // weight.shape[0])
    keep = targets != IGNORE
    tokens = keep.sum()
    if not hidden.is_cuda and not bool(keep.all()):
        # Rows without a target add nothing to the loss or the gradients, but their (rows, V) logits cost as
        # much as the others: SFT prompts and padding are half the rows of a short-answer batch, and the head
        # is two thirds of the tiny model's FLOPs. (On a GPU the selection would be a host sync per step.)
        idx = keep.nonzero().squeeze(1)
        hidden, targets = hidden.index_select(0, idx), targets.index_select(0, idx)
        if teacher is not None and teacher.hidden is not None:
            teacher = TeacherTargets(hidden=teacher.hidden.index_select(0, idx), weight=teacher.weight)
        elif teacher is not None:
            teacher = TeacherTargets(topk_ids=teacher.topk_ids.index_select(0, idx),
                                     topk_logp=teacher.topk_logp.index_select(0, idx))
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        loss, ce, kd = _FusedHeadLoss.apply(hidden, weight, targets, float(alpha), float(temperature), teacher, chunk)
    else:
        with torch.no_grad():
            loss, ce, kd = _FusedHeadLoss.forward(_NoGradCtx(), hidden, weight, targets, float(alpha),
                                                  float(temperature), teacher, chunk)
    return LossParts(loss=loss, ce_sum=ce, kd_sum=kd, tokens=tokens)


class _NoGradCtx:
    needs_input_grad = (False, False)

    def save_for_backward(self, *a):
        pass

    def mark_non_differentiable(self, *a):
        pass


def next_token_targets(tokens: torch.Tensor, doc_ids: torch.Tensor | None = None,
                       loss_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets from rows of ``seq_len + 1`` tokens: ``inputs = tokens[:, :-1]``,
    ``targets = tokens[:, 1:]``. With ``doc_ids`` (packed documents with masked attention) the first token
    of a document is not a target of the previous document's last token. ``loss_mask`` ``(B, S+1)`` keeps
    only tokens marked 1 as targets (SFT: assistant tokens)."""
    inputs, targets = tokens[:, :-1], tokens[:, 1:].clone()
    if doc_ids is not None:
        targets[doc_ids[:, 1:] != doc_ids[:, :-1]] = IGNORE
    if loss_mask is not None:
        targets[~loss_mask[:, 1:].bool()] = IGNORE
    return inputs, targets
