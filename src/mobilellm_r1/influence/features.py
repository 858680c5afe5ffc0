"""Per-sample gradient features of a causal LM without a per-sample backward loop.

For a linear map ``y = x W^T`` the gradient of one sample's loss is ``sum_t g_t x_t^T`` (``g_t`` the output
gradient at token t, ``x_t`` the input). Summing the per-sample losses and running ONE batched backward
gives every sample its own ``g_t`` (samples do not interact in a causal LM), so forward hooks (``x``) and
tensor hooks on the outputs (``g``) capture the factors of all per-sample gradients at once. From them:

- exact dot products with a fixed full gradient ``Q`` (e.g. a probe set's mean gradient):
  ``<G_i, Q> = sum_t g_t . (Q x_t)``, never materialising ``G_i`` (:meth:`GradientFeaturizer.dots`);
- exact Gram entries between two samples ``sum_{t,t'} (x_t . x'_t') (g_t . g'_t')`` (:func:`factored_gram`);
- a LoGra-style projection: two seeded Gaussian matrices ``P_out`` (k_o x out), ``P_in`` (k_i x in) per
  parameter, feature = ``sum_t (P_out g_t)(P_in x_t)^T`` = ``P_out G_i P_in^T`` (the Kronecker-factored
  projection of the gradient; entries N(0, 1/k) so dot products are preserved in expectation).

No parameter gets a ``.grad``: parameters are frozen for the pass and only activations carry gradients, so
the backward does no weight-gradient products and stops below the first selected layer.

The tied embedding / output head of :class:`~mobilellm_r1.model.transformer.Transformer` is ONE parameter
``E`` (V x d) with two gradient parts, both handled: the head part ``sum_t (p_t - onehot(y_t)) h_t^T``
(computed chunk by chunk from the final hidden states, as the fused loss in ``train/objectives.py`` does,
so the logits never exist in full) and the input-embedding part ``sum_t onehot(id_t) e_t^T`` (``e_t`` =
gradient at the embedding output; a scatter at the token ids). For Hugging Face models every selected
``nn.Linear``/``nn.Embedding`` is hooked generically and modules sharing a weight (tied ``lm_head``) are
summed into one parameter group.

Norm gains (RMSNorm weights) are not part of any feature: they are vectors with < 0.1% of the parameters.

Per-sample loss: mean next-token CE over the sample's kept targets (``IGNORE`` = padding), the training
loss of one sample in Eq. 2.
"""

from __future__ import annotations

import contextlib
import re
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..train.objectives import IGNORE, _acc

_HEAD_CHUNK_ELEMENTS = 1 << 24  # logits per chunk of the head pass (64 MB fp32)


# ------------------------------------------------------------------------------------------ selection


@dataclass
class ParamSelection:
    """Which parameters the features cover. ``last_k = 0``: every block; ``k > 0``: the last k blocks.
    ``head``: the output head (for tied models, the shared embedding matrix's head part); ``embed_input``:
    the input-embedding part of the tied/untied embedding. ``include``/``exclude``: regexes on module names
    (applied after the rules above)."""

    last_k: int = 0
    head: bool = True
    embed_input: bool = True
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)


def _blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(prefix, block list) of our Transformer or a HF decoder."""
    for prefix in ("layers", "model.layers", "transformer.h", "gpt_neox.layers"):
        mod = model
        try:
            for part in prefix.split("."):
                mod = getattr(mod, part)
        except AttributeError:
            continue
        if isinstance(mod, nn.ModuleList):
            return prefix, mod
    raise TypeError(f"{type(model).__name__}: cannot find its list of transformer blocks")


def _is_ours(model: nn.Module) -> bool:
    from ..model.transformer import Transformer

    return isinstance(model, Transformer)


# ------------------------------------------------------------------------------------------- factors


@dataclass
class Factor:
    """One contribution ``sum_t out_t in_t^T`` to a parameter's per-sample gradient. ``out`` is
    ``(B, T, out_dim)`` or, for an embedding lookup, ``ids`` ``(B, T)`` standing for one-hot rows."""

    inp: torch.Tensor  # (B, T, in_dim)
    out: torch.Tensor | None = None  # (B, T, out_dim)
    ids: torch.Tensor | None = None  # (B, T) int64: out = onehot(ids, out_dim)
    out_dim: int = 0

    def materialise(self) -> torch.Tensor:
        """Per-sample gradients ``(B, out_dim, in_dim)``."""
        if self.out is not None:
            return torch.einsum("bto,bti->boi", self.out, self.inp)
        b = self.inp.shape[0]
        g = self.inp.new_zeros(b, self.out_dim, self.inp.shape[-1])
        return g.scatter_add_(1, self.ids[..., None].expand(-1, -1, self.inp.shape[-1]), self.inp)

    def dot(self, q: torch.Tensor) -> torch.Tensor:
        """``<per-sample gradient, q>`` for ``q`` ``(out_dim, in_dim)``: ``(B,)``, without materialising."""
        if self.out is not None:
            return torch.einsum("bto,bto->b", self.out, self.inp @ q.t())
        return torch.einsum("bti,bti->b", q[self.ids], self.inp)


def _gram_out(a: Factor, b: Factor) -> torch.Tensor:
    """``(Ba, Bb, Ta, Tb)`` dot products of the out sides."""
    if a.out is not None and b.out is not None:
        return torch.einsum("xso,yto->xyst", a.out, b.out)
    if a.ids is not None and b.ids is not None:
        return (a.ids[:, None, :, None] == b.ids[None, :, None, :]).to(a.inp.dtype)
    dense, sparse, swap = (a, b, False) if a.out is not None else (b, a, True)
    g = dense.out[:, :, sparse.ids]  # (Bd, Td, Bs, Ts)
    g = g.permute(0, 2, 1, 3)
    return g.permute(1, 0, 3, 2) if swap else g


def _gram_out_self(f: Factor) -> torch.Tensor:
    """``(B, T, T)`` out-side dot products within each sample."""
    if f.out is not None:
        return torch.einsum("bso,bto->bst", f.out, f.out)
    return (f.ids[:, :, None] == f.ids[:, None, :]).to(f.inp.dtype)


def factored_gram(fa: dict[str, list[Factor]], fb: dict[str, list[Factor]]) -> torch.Tensor:
    """Exact ``(Ba, Bb)`` dot products between the per-sample gradients of two batches from their factors:
    ``sum_params sum_{t,t'} (x_t . x'_t') (g_t . g'_t')``, no per-sample gradient materialised."""
    total = None
    for name, la in fa.items():
        for a in la:
            for b in fb[name]:
                gi = torch.einsum("xsi,yti->xyst", a.inp, b.inp)
                term = (gi * _gram_out(a, b)).sum((2, 3))
                total = term if total is None else total + term
    return total


def materialise(factors: dict[str, list[Factor]]) -> torch.Tensor:
    """Flattened per-sample gradients ``(B, D)`` over the parameter groups in order (small models only)."""
    return torch.cat([sum(f.materialise() for f in fs).flatten(1) for fs in factors.values()], dim=1)


# --------------------------------------------------------------------------------------- featurizer


@dataclass
class _Group:
    name: str
    weight: nn.Parameter
    out_dim: int
    in_dim: int
    p_out: torch.Tensor | None = None  # (k_out, out) Gaussian, or None with a count sketch
    p_in: torch.Tensor | None = None  # (k_in, in) Gaussian
    k_out: int = 0
    k_in: int = 0
    blocks: int = 1  # independent Kronecker blocks (r): variance falls like 1/r, not 1/k
    bucket: torch.Tensor | None = None  # (out,) count-sketch bucket of each vocabulary row
    sign: torch.Tensor | None = None  # (out,) its +-1 sign

    @property
    def dim(self) -> int:
        return self.blocks * self.k_out * self.k_in if self.p_in is not None else self.out_dim * self.in_dim

    def outer(self, out: torch.Tensor, inp: torch.Tensor) -> torch.Tensor:
        """Projected sides ``(B, T, r*k_out)``, ``(B, T, r*k_in)`` -> per-sample features ``(B, dim)``."""
        b, t = out.shape[:2]
        r = self.blocks
        return torch.einsum("btro,btri->broi", out.reshape(b, t, r, -1), inp.reshape(b, t, r, -1)).reshape(b, -1)

    def proj_out(self, x: torch.Tensor) -> torch.Tensor:
        """The out side ``(..., out)`` projected to ``(..., k_out)``."""
        if self.bucket is None:
            return x @ self.p_out.t()
        y = x.new_zeros(*x.shape[:-1], self.k_out)
        return y.index_add_(-1, self.bucket, x * self.sign.to(x.dtype))

    def proj_ids(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """One-hot rows at ``ids`` ``(B, T)`` projected: ``(B, T, k_out)``."""
        if self.bucket is None:
            return self.p_out.t()[ids].to(dtype)
        y = torch.zeros(*ids.shape, self.k_out, dtype=dtype, device=ids.device)
        return y.scatter_(-1, self.bucket[ids][..., None], self.sign[ids][..., None].to(dtype))

    def proj_full(self, q: torch.Tensor) -> torch.Tensor:
        """A full ``(out, in)`` gradient projected: ``P_out q P_in^T``, flattened."""
        q = q.to(self.p_in.dtype)
        r = self.blocks
        if self.bucket is None:
            left = self.p_out.view(r, self.k_out, -1) @ q
        else:
            left = q.new_zeros(self.k_out, q.shape[1]).index_add_(0, self.bucket, q * self.sign[:, None].to(q.dtype))[None]
        return (left @ self.p_in.view(r, self.k_in, -1).transpose(1, 2)).flatten()


def _seed_for(seed: int, name: str) -> int:
    return (zlib.crc32(name.encode()) ^ (seed * 0x9E3779B1)) & 0x7FFFFFFF




BLOCK = 4  # k_out = k_in of each Kronecker block of an ordinary linear layer


def allocate(proj_dim: int, shapes: list[tuple[int, int, bool]], mass: list[float] | None = None
             ) -> list[tuple[int, int, int]]:
    """Per-parameter projection ``(blocks r, k_out, k_in)`` totalling about ``proj_dim`` dimensions.

    A single Kronecker projection ``P_out G P_in^T`` of width k x k has an error that falls like 1/k, not
    1/k^2 (the two sides' errors multiply), so an ordinary linear layer gets ``r`` independent small blocks
    (``BLOCK x BLOCK``, concatenated; variance falls like 1/r). Measured on the micro preset at 8,192 dims:
    one 16x16 block per layer gave Spearman 0.77-0.90 against exact influence, 4x4 blocks 0.95+.
    Vocabulary-sized parameters (embedding / head) keep one block with count-sketched rows (``k_out``
    buckets: their input part is one-hot rows, which a Gaussian projection smears over every bucket) and a
    narrow Gaussian ``k_in = d^(1/4)``.

    Dimensions are shared in proportion to ``mass`` when given (per parameter, RMS per-sample gradient norm x
    mean-gradient norm on a calibration batch: the projection error of a block scales like that product
    over sqrt(dims), so this minimises the summed error variance), else to ``numel^0.75``. Every block
    keeps at least 16 dimensions."""
    sizes = list(mass) if mass is not None else [(o * i) ** 0.75 for o, i, _ in shapes]
    total = sum(sizes) or 1.0
    share = [max(s / total, 16 / proj_dim) for s in sizes]
    out = []
    for (o, i, vocab), f in zip(shapes, share):
        d = max(4, int(proj_dim * f))
        if vocab:
            ki = max(1, min(i, int(round(d ** 0.25))))
            out.append((1, max(1, min(o, d // ki)), ki))
        else:
            ko, ki = min(o, BLOCK), min(i, BLOCK)
            out.append((max(1, d // (ko * ki)), ko, ki))
    return out


class GradientFeaturizer:
    """Per-sample gradient features of ``model`` (our :class:`Transformer` or a HF causal LM).

    ``proj_dim = 0`` keeps gradients exact (use :meth:`dots`, :meth:`factors`); ``proj_dim > 0`` gives
    :meth:`features` of about that many dimensions (per parameter ``k x k`` with
    ``k = floor(sqrt(proj_dim / n_params))``, each side capped at the layer's width), seeded by ``seed``.
    Inputs are token rows ``(B, S+1)`` (inputs ``[:, :-1]``, targets ``[:, 1:]``) or ``inputs, targets``
    with ``IGNORE`` targets for padding.
    """

    def __init__(self, model: nn.Module, selection: ParamSelection | None = None, proj_dim: int = 0,
                 seed: int = 0, calibrate: tuple[torch.Tensor, torch.Tensor] | None = None):
        self.model = model
        self.sel = selection or ParamSelection()
        self.ours = _is_ours(model)
        self.proj_dim = proj_dim
        self.seed = seed
        self.groups: dict[str, _Group] = {}
        self.modules: list[tuple[str, nn.Module, str]] = []  # (module name, module, group name)
        self._select()
        if proj_dim > 0:
            shapes = [(g.out_dim, g.in_dim, g.name in self._vocab_groups) for g in self.groups.values()]
            mass = self._mass(*calibrate) if calibrate is not None else None
            for g, (r, ko, ki) in zip(self.groups.values(), allocate(proj_dim, shapes, mass)):
                gen = torch.Generator().manual_seed(_seed_for(seed, g.name))
                dev, dt = g.weight.device, _acc(g.weight.dtype)
                g.blocks, g.k_out, g.k_in = r, ko, ki
                # entries N(0, 1/(r k)): each block's estimate is unbiased / r, the r blocks sum to the dot product
                g.p_in = (torch.randn(r * ki, g.in_dim, generator=gen) / ki ** 0.5).to(dev, dt)
                if g.name in self._vocab_groups:
                    g.bucket = torch.randint(0, ko, (g.out_dim,), generator=gen).to(dev)
                    g.sign = (torch.randint(0, 2, (g.out_dim,), generator=gen) * 2 - 1).to(dev, torch.int8)
                else:
                    g.p_out = (torch.randn(r * ko, g.out_dim, generator=gen) / (ko * r) ** 0.5).to(dev, dt)
        self.slices: dict[str, slice] = {}
        off = 0
        for name, g in self.groups.items():
            self.slices[name] = slice(off, off + g.dim)
            off += g.dim
        self.dim = off

    # --- which parameters ---------------------------------------------------------------------------
    def _select(self) -> None:
        prefix, blocks = _blocks(self.model)
        first_block = len(blocks) - self.sel.last_k if self.sel.last_k > 0 else 0
        emb = self.model.embed_tokens if self.ours else self.model.get_input_embeddings()
        head = None if self.ours else self.model.get_output_embeddings()
        self.head_weight_name = ""
        chosen: list[tuple[str, nn.Module]] = []
        for name, mod in self.model.named_modules():
            if mod is emb:
                if self.sel.embed_input:
                    chosen.append((name, mod))
            elif mod is head:
                if self.sel.head:
                    chosen.append((name, mod))
            elif isinstance(mod, nn.Linear):
                m = re.match(rf"{re.escape(prefix)}\.(\d+)\.", name)
                if m and int(m.group(1)) >= first_block:
                    chosen.append((name, mod))
        inc = [re.compile(p) for p in self.sel.include]
        exc = [re.compile(p) for p in self.sel.exclude]
        chosen = [(n, m) for n, m in chosen if (not inc or any(p.search(n) for p in inc))
                  and not any(p.search(n) for p in exc)]
        by_weight: dict[int, str] = {}
        names = {id(p): n for n, p in self.model.named_parameters()}
        for name, mod in chosen:
            w = mod.weight
            gname = by_weight.setdefault(id(w), names.get(id(w), name + ".weight"))
            if gname not in self.groups:
                self.groups[gname] = _Group(gname, w, w.shape[0], w.shape[1])
            self.modules.append((name, mod, gname))
        if self.ours and self.sel.head:  # our head is not a module call: the tied (or separate) head weight
            w = self.model.head_weight
            gname = names[id(w)]
            if gname not in self.groups:
                self.groups[gname] = _Group(gname, w, w.shape[0], w.shape[1])
            self.head_weight_name = gname
        # rows indexed by token id (embedding, head): count-sketched, since their input part is one-hot rows
        self._vocab_groups = {g for _, mod, g in self.modules if mod is emb or mod is head}
        if self.head_weight_name:
            self._vocab_groups.add(self.head_weight_name)
        if not self.groups:
            raise ValueError("the parameter selection matches no linear layer, embedding or head")
        # the earliest block whose input must carry a gradient (everything before it is skipped in backward)
        self._grad_from_embed = any(mod is emb for _, mod, _ in self.modules)
        idx = [int(m.group(1)) for n, _, _ in self.modules if (m := re.match(rf"{re.escape(prefix)}\.(\d+)\.", n))]
        self._first_block = blocks[min(idx)] if idx else None
        self._last_norm_input = not idx and not self._grad_from_embed
        # head only on a HF model: its input must carry the gradient instead
        self._grad_at = self._first_block if self._first_block is not None else (
            None if self.ours or self._grad_from_embed else head)

    def _mass(self, inputs: torch.Tensor, targets: torch.Tensor) -> list[float]:
        """Per group: RMS per-sample gradient norm x norm of the batch's mean gradient (exact, from factors)."""
        fac, _ = self.factors(inputs, targets)
        out = []
        for n in self.groups:
            f = fac[n][0]
            sq = (torch.einsum("bsi,bti->bst", f.inp, f.inp) * _gram_out_self(f)).sum((1, 2))
            mean = f.inp.new_zeros(self.groups[n].out_dim, self.groups[n].in_dim)
            if f.out is not None:
                mean += torch.einsum("bto,bti->oi", f.out, f.inp)
            else:
                mean.index_add_(0, f.ids.reshape(-1), f.inp.reshape(-1, f.inp.shape[-1]))
            out.append(float(sq.clamp(min=0).mean().sqrt() * (mean / inputs.shape[0]).norm()))
        return out

    # --- one batched pass ---------------------------------------------------------------------------
    @staticmethod
    def split(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return tokens[:, :-1], tokens[:, 1:]

    def _token_weights(self, targets: torch.Tensor) -> torch.Tensor:
        keep = (targets != IGNORE).float()
        return keep / keep.sum(1, keepdim=True).clamp(min=1)  # per-sample mean CE (Eq. 2's sample loss)

    @contextlib.contextmanager
    def _hooks(self, sink: Callable[[str, Factor], None], project: bool) -> Iterator[None]:
        handles = []
        emb = self.model.embed_tokens if self.ours else self.model.get_input_embeddings()
        frozen = [(p, p.requires_grad) for p in self.model.parameters()]

        def linear_hook(gname: str):
            grp = self.groups[gname]

            def fwd(mod, args, out):
                x = args[0].detach()
                x = x.to(_acc(x.dtype))
                xp = x @ grp.p_in.t() if project else x

                def bwd(g):
                    g = g.detach().to(_acc(g.dtype))
                    sink(gname, Factor(inp=xp, out=grp.proj_out(g) if project else g, out_dim=grp.out_dim))

                if out.requires_grad:
                    out.register_hook(bwd)
            return fwd

        def embed_hook(gname: str):
            grp = self.groups[gname]

            def fwd(mod, args, out):
                ids = args[0]
                out = out.detach().requires_grad_(True)

                def bwd(g):
                    g = g.detach().to(_acc(g.dtype))
                    f = Factor(inp=g @ grp.p_in.t() if project else g, ids=ids, out_dim=grp.out_dim)
                    if project:
                        f = Factor(inp=f.inp, out=grp.proj_ids(ids, f.inp.dtype), out_dim=grp.out_dim)
                    sink(gname, f)

                out.register_hook(bwd)
                return out
            return fwd

        def needs_grad(mod, args, kwargs):
            if args and torch.is_tensor(args[0]) and not args[0].requires_grad:
                return (args[0].detach().requires_grad_(True), *args[1:]), kwargs
            if "hidden_states" in kwargs and not kwargs["hidden_states"].requires_grad:
                return args, {**kwargs, "hidden_states": kwargs["hidden_states"].detach().requires_grad_(True)}
            return None

        try:
            for p, _ in frozen:
                p.requires_grad_(False)
            for _, mod, gname in self.modules:
                hook = embed_hook(gname) if mod is emb else linear_hook(gname)
                handles.append(mod.register_forward_hook(hook))
            if not self._grad_from_embed and self._grad_at is not None:
                handles.append(self._grad_at.register_forward_pre_hook(needs_grad, with_kwargs=True))
            yield
        finally:
            for h in handles:
                h.remove()
            for p, r in frozen:
                p.requires_grad_(r)

    def _run(self, inputs: torch.Tensor, targets: torch.Tensor, sink: Callable[[str, Factor], None],
             project: bool, head_dot: list[torch.Tensor] | None = None,
             head_sum: torch.Tensor | None = None) -> torch.Tensor:
        """One forward + one backward of the summed per-sample losses; factors go to ``sink``. Returns the
        per-sample losses ``(B,)``. ``head_dot``: exact dots of the head part with these full matrices,
        returned through ``sink`` as Factor-free (see :meth:`dots`)."""
        dev = self.groups[next(iter(self.groups))].weight.device
        inputs, targets = inputs.to(dev), targets.to(dev)
        w = self._token_weights(targets)
        with self._hooks(sink, project), torch.enable_grad():
            if self.ours:
                hidden = self.model(inputs, return_hidden=True)
                if self._last_norm_input:
                    hidden = hidden.detach()
                return self._our_head(hidden, targets, w, sink, project, head_dot, head_sum)
            logits = self.model(input_ids=inputs).logits.float()
            ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="none")
            per = (ce.view_as(w) * w).sum(1)
            per.sum().backward()
            return per.detach()

    def _our_head(self, hidden, targets, w, sink, project, head_dot, head_sum=None):
        """The head of our model, chunked (as ``train/objectives.head_loss``): per-token CE, the head
        weight's factors (out side = d loss / d logits, in side = final hidden), and d loss / d hidden.
        ``head_sum``: accumulate the batch's summed head gradient there instead (no factors kept)."""
        b, s, d = hidden.shape
        W = self.model.head_weight.detach()
        dt = _acc(W.dtype)
        h = hidden.detach().reshape(-1, d)
        tgt, wt = targets.reshape(-1), w.reshape(-1)
        safe = tgt.clamp(min=0)
        grp = self.groups.get(self.head_weight_name) if self.head_weight_name else None
        chunk = max(16, _HEAD_CHUNK_ELEMENTS // W.shape[0])
        need_h = hidden.requires_grad
        grad_h = torch.empty_like(h) if need_h else None
        per_tok = torch.empty(h.shape[0], dtype=dt, device=h.device)
        outs = []
        dots = [torch.zeros(h.shape[0], dtype=dt, device=h.device) for _ in (head_dot or [])]
        for i in range(0, h.shape[0], chunk):
            r = slice(i, min(i + chunk, h.shape[0]))
            z = (h[r] @ W.t()).to(dt)
            lse = torch.logsumexp(z, dim=-1)
            per_tok[r] = lse - z.gather(1, safe[r, None]).squeeze(1)
            g = torch.exp(z - lse[:, None])
            g[torch.arange(g.shape[0], device=g.device), safe[r]] -= 1
            g.mul_(wt[r, None])  # zero rows for IGNORE targets
            if grad_h is not None:
                grad_h[r] = (g @ W.to(dt)).to(h.dtype)
            if grp is not None:
                if head_sum is not None:
                    head_sum.addmm_(g.t(), h[r].to(dt))
                elif project:
                    outs.append(grp.proj_out(g))
                elif head_dot is not None:
                    for q, acc in zip(head_dot, dots):
                        acc[r] = (g * (h[r].to(dt) @ q.t())).sum(-1)
                else:
                    outs.append(g)
            del z, g
        if grp is not None and head_sum is None:
            hin = h.to(dt).view(b, s, d)
            if head_dot is not None and not project:
                sink(self.head_weight_name, _HeadDots([a.view(b, s).sum(1) for a in dots]))
            else:
                out = torch.cat(outs).view(b, s, -1)
                sink(self.head_weight_name, Factor(inp=hin @ grp.p_in.t() if project else hin, out=out,
                                                   out_dim=grp.out_dim))
        if need_h:
            hidden.backward(grad_h.view(b, s, d))
        return (per_tok.view(b, s) * w).sum(1).detach()

    # --- public ------------------------------------------------------------------------------------
    def factors(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[dict[str, list[Factor]], torch.Tensor]:
        """Exact factors per parameter group (in group order) and the per-sample losses."""
        got: dict[str, list[Factor]] = {n: [] for n in self.groups}
        loss = self._run(inputs, targets, lambda n, f: got[n].append(f), project=False)
        return {n: [_cat_t(fs)] for n, fs in got.items()}, loss

    def features(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Projected per-sample gradients ``(B, dim)`` and the per-sample losses ``(B,)``."""
        if self.proj_dim <= 0:
            fac, loss = self.factors(inputs, targets)
            return materialise(fac), loss
        b = inputs.shape[0]
        feats = {n: None for n in self.groups}

        def sink(n: str, f: Factor) -> None:
            v = self.groups[n].outer(f.out, f.inp)
            feats[n] = v if feats[n] is None else feats[n] + v

        loss = self._run(inputs, targets, sink, project=True)
        dev = loss.device
        return torch.cat([feats[n] if feats[n] is not None else torch.zeros(b, g.dim, device=dev)
                          for n, g in self.groups.items()], dim=1), loss

    def dots(self, inputs: torch.Tensor, targets: torch.Tensor, queries: list[dict[str, torch.Tensor]]
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact ``<per-sample gradient, Q>`` ``(B, len(queries))`` for full gradients ``Q`` (dicts group ->
        ``(out, in)`` tensor, e.g. from :meth:`mean_gradient`), never materialising per-sample gradients."""
        b = inputs.shape[0]
        acc = torch.zeros(b, len(queries), dtype=torch.float64)

        def sink(n: str, f) -> None:
            if isinstance(f, _HeadDots):
                for j, v in enumerate(f.values):
                    acc[:, j] += v.cpu()
                return
            for j, q in enumerate(queries):
                acc[:, j] += f.dot(q[n].to(f.inp.dtype)).cpu()

        head = [q[self.head_weight_name].to(_acc(q[self.head_weight_name].dtype)) for q in queries] if self.head_weight_name else None
        loss = self._run(inputs, targets, sink, project=False, head_dot=head)
        return acc, loss

    def mean_gradient(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """The full gradient (per group, ``(out, in)``) of the MEAN of per-sample losses over all batches."""
        total = {n: torch.zeros(g.out_dim, g.in_dim, device=g.weight.device, dtype=_acc(g.weight.dtype)) for n, g in self.groups.items()}
        count = 0

        def sink(n: str, f: Factor) -> None:
            if f.out is not None:
                total[n] += torch.einsum("bto,bti->oi", f.out, f.inp)
            else:
                total[n].index_add_(0, f.ids.reshape(-1), f.inp.reshape(-1, f.inp.shape[-1]))

        head = total.get(self.head_weight_name) if self.head_weight_name else None
        for inputs, targets in batches:
            self._run(inputs, targets, sink, project=False, head_sum=head)
            count += inputs.shape[0]
        return {n: t / max(count, 1) for n, t in total.items()}

    def project(self, full: dict[str, torch.Tensor]) -> torch.Tensor:
        """A full gradient (group -> ``(out, in)``) in feature space: ``P_out G P_in^T`` per group."""
        if self.proj_dim <= 0:
            return torch.cat([full[n].flatten() for n in self.groups])
        return torch.cat([g.proj_full(full[n]) for n, g in self.groups.items()])


@dataclass
class _HeadDots:
    values: list[torch.Tensor]


def _cat_t(fs: list[Factor]) -> Factor:
    """Contributions of one parameter (weight sharing, tied head + embedding) as one factor when their kinds
    agree (concatenated along T); otherwise densify the id side."""
    if len(fs) == 1:
        return fs[0]
    if all(f.ids is not None for f in fs):
        return Factor(inp=torch.cat([f.inp for f in fs], 1), ids=torch.cat([f.ids for f in fs], 1),
                      out_dim=fs[0].out_dim)
    outs = [f.out if f.out is not None else F.one_hot(f.ids, f.out_dim).to(f.inp.dtype) for f in fs]
    return Factor(inp=torch.cat([f.inp for f in fs], 1), out=torch.cat(outs, 1), out_dim=fs[0].out_dim)


def pad_rows(rows: list[list[int]], seq_len: int, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists (each ≥ 2 tokens, truncated to ``seq_len + 1``) as right-padded ``inputs, targets``
    ``(B, S)`` with ``IGNORE`` targets on the padding (causal attention never sees it)."""
    rows = [r[: seq_len + 1] for r in rows]
    s = max(len(r) for r in rows) - 1
    inputs = torch.full((len(rows), s), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), s), IGNORE, dtype=torch.long)
    for i, r in enumerate(rows):
        t = torch.as_tensor(r, dtype=torch.long)
        inputs[i, : len(r) - 1] = t[:-1]
        targets[i, : len(r) - 1] = t[1:]
    return inputs, targets


def describe(f: GradientFeaturizer) -> dict[str, Any]:
    return {"groups": {n: [g.out_dim, g.in_dim] for n, g in f.groups.items()}, "dim": f.dim,
            "proj_dim": f.proj_dim, "seed": f.seed}
