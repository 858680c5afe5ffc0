"""Continuous batching: a fixed number of slots over one KV cache, refilled as rows finish.

Static batching (:func:`mobilellm_r1.model.generate.generate`) runs a batch until its longest row ends, so
with reasoning traces, whose lengths spread over orders of magnitude, most rows idle behind the longest.
Here each slot holds one sample; when a sample ends (stop token, stop string, length) its slot is given to
the next waiting sample before the next decode step, so every step decodes as many live rows as there are
slots while work remains.

- **Memory** is fixed at start: ``slots x max_len`` positions of keys and values per layer application
  (``2 * applications * slots * n_kv_heads * max_len * head_dim`` floats), whatever the workload.
- **Admission** happens between decode steps: a new request's prompt is prefilled on its own into a free
  slot (batch 1, causal), then decoding resumes with every slot. Measured on the 2-core CPU this was
  developed on, prefilling whole prompts between steps beat splitting them into chunks interleaved with
  decode: the prompts of eval and GRPO are short, and a chunk costs a forward pass of its own.
- **n samples of one prompt** prefill it once (``EngineResult.prefills`` counts) and copy its keys and
  values into the other samples' slots; samples that find no free slot wait with a copy of the prompt's
  cache, so it is never prefilled twice.
- **Tail**: once nothing waits, a finished sample's slot is filled by moving the last live row into it, so
  the live rows stay the first ``k`` slots and a decode step runs on a view of those ``k`` cache rows: no
  per-step gather of every layer's keys and values, and rows that ended cost nothing.
- **Per-sample seeds**: every sample draws from its own ``torch.Generator`` (seeded by ``Request.seeds``,
  or from the config's seed, the request's index and the sample's), so a sample's tokens do not depend on
  which slots its neighbours hold or how many slots there are. Greedy decoding gives each prompt the tokens
  it gets alone.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from .generate import _stop_window, sample_next
from .transformer import Transformer


@dataclass
class EngineConfig:
    slots: int = 8
    max_len: int = 0  # positions per slot (prompt + completion); 0 = the model's max_seq_len
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop_token_ids: Sequence[int] | None = None  # None = the model's eos ids; [] = run to the length limit
    stop_strings: Sequence[str] = ()  # need ``decode``
    progress: bool = False
    desc: str = "generate"


@dataclass
class Request:
    prompt: Sequence[int]
    max_new_tokens: int = 128
    n: int = 1
    seeds: Sequence[int] | None = None  # one per sample; default from EngineConfig.seed and the indices


@dataclass
class Completion:
    token_ids: list[int]  # new tokens (a final stop token included, as in generate())
    finish_reason: str  # stop_token | stop_string | length
    stop_string: str | None = None


@dataclass
class EngineResult:
    completions: list[list[Completion]]  # per request, its n samples in order
    prefills: int  # prompts prefilled (one per request)
    prefill_tokens: int
    new_tokens: int
    decode_steps: int
    seconds: float
    slots: int
    timing_s: dict[str, float] = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


def sample_seed(seed: int, request: int, sample: int) -> int:
    return (seed * 1_000_003 + request * 65_537 + sample) % (2**63)


@torch.inference_mode()
def run(model: Transformer, requests: Sequence[Request], cfg: EngineConfig | None = None, *,
        decode: Callable[[list[int]], str] | None = None,
        on_token: Callable[[int, int, int], None] | None = None,
        on_complete: Callable[[int, int, Completion], None] | None = None) -> EngineResult:
    """Generate every request's ``n`` completions. ``on_token(request, sample, token)`` streams tokens;
    ``on_complete(request, sample, completion)`` is called as each sample ends (in finishing order)."""
    cfg = cfg or EngineConfig()
    if not getattr(model, "slot_decode", False):
        return _run_static(model, requests, cfg, decode, on_token, on_complete)
    mcfg = model.cfg
    max_len = cfg.max_len or mcfg.max_seq_len
    if cfg.slots < 1:
        raise ValueError("the engine needs at least one slot")
    stop_strings = [s for s in cfg.stop_strings if s]
    if stop_strings and decode is None:
        raise ValueError("stop_strings need a decode function")
    for i, r in enumerate(requests):
        if len(r.prompt) == 0:
            raise ValueError(f"request {i}: every prompt needs at least one token")
        if r.n < 1 or r.max_new_tokens < 0:
            raise ValueError(f"request {i}: n must be >= 1 and max_new_tokens >= 0")
        if len(r.prompt) + r.max_new_tokens > max_len:
            raise ValueError(f"request {i}: prompt ({len(r.prompt)}) + max_new_tokens ({r.max_new_tokens}) "
                             f"exceeds the slot length {max_len}")
        bad = [t for t in r.prompt if not 0 <= t < mcfg.vocab_size]
        if bad:
            raise ValueError(f"request {i}: token id {bad[0]} is outside the model's vocabulary ({mcfg.vocab_size})")
        if r.seeds is not None and len(r.seeds) != r.n:
            raise ValueError(f"request {i}: {len(r.seeds)} seeds for n = {r.n} samples")
    stop_ids = set(mcfg.eos_ids if cfg.stop_token_ids is None else cfg.stop_token_ids)
    window = _stop_window(stop_strings)
    device = model.embed_tokens.weight.device
    sampling = cfg.temperature > 0

    out: list[list[Completion | None]] = [[None] * r.n for r in requests]
    tokens: dict[tuple[int, int], list[int]] = {}
    gens: dict[tuple[int, int], torch.Generator] = {}
    n_slots = min(cfg.slots, max(1, sum(r.n for r in requests)))
    cache = model.new_cache(n_slots, max_len)
    slot_of: list[tuple[int, int] | None] = [None] * n_slots  # (request, sample) a slot holds
    slot_len = [0] * n_slots  # positions of the slot's cache filled
    slot_next = [0] * n_slots  # the token to feed at the next step
    free = deque(range(n_slots))
    queue = deque(i for i, r in enumerate(requests))
    head: dict = {}  # the partly admitted request at the queue's head: next sample, logits, prompt KV
    stats = {"prefills": 0, "prefill_tokens": 0, "new_tokens": 0, "steps": 0, "prefill_s": 0.0}
    bar = None
    if cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(r.n for r in requests), desc=cfg.desc, unit="sample", dynamic_ncols=True)
    t_start = time.perf_counter()

    def finish(slot: int | None, key: tuple[int, int], reason: str, hit: str | None = None) -> None:
        c = Completion(tokens.pop(key), reason, hit)
        out[key[0]][key[1]] = c
        gens.pop(key, None)
        if slot is not None:
            slot_of[slot] = None
            free.append(slot)
        if on_complete is not None:
            on_complete(key[0], key[1], c)
        if bar is not None:
            bar.update(1)
            el = time.perf_counter() - t_start
            bar.set_postfix(tok_s=f"{stats['new_tokens'] / el:.0f}" if el > 0 else "-")

    def push(slot: int | None, key: tuple[int, int], t: int) -> bool:
        """Append token ``t`` to sample ``key``; True while the sample goes on."""
        seq = tokens[key]
        seq.append(t)
        stats["new_tokens"] += 1
        if on_token is not None:
            on_token(key[0], key[1], t)
        if t in stop_ids:
            finish(slot, key, "stop_token")
            return False
        if stop_strings:
            text = decode(seq[-window:])
            hit = next((s for s in stop_strings if s in text), None)
            if hit is not None:
                finish(slot, key, "stop_string", hit)
                return False
        if len(seq) >= requests[key[0]].max_new_tokens:
            finish(slot, key, "length")
            return False
        return True

    def pick(logits: torch.Tensor, key: tuple[int, int]) -> int:
        if not sampling:
            return int(logits.argmax())
        return int(sample_next(logits[None], cfg.temperature, cfg.top_p, gens[key])[0])

    def admit() -> None:
        while queue and free:
            ri = queue[0]
            req = requests[ri]
            plen = len(req.prompt)
            if not head:
                slot = free[0]
                t0 = time.perf_counter()
                ids = torch.tensor([list(req.prompt)], dtype=torch.long, device=device)
                logits = model(ids, cache=cache.rows(slot, slot + 1), last_only=True)[0, -1]
                stats["prefill_s"] += time.perf_counter() - t0
                stats["prefills"] += 1
                stats["prefill_tokens"] += plen
                head.update(sample=0, logits=logits, src=slot, kv=None)
            while free and head["sample"] < req.n:
                s = head["sample"]
                key = (ri, s)
                head["sample"] += 1
                slot = free.popleft()
                if slot != head["src"]:
                    if head["kv"] is not None:
                        cache.k[:, slot, :, :plen] = head["kv"][0]
                        cache.v[:, slot, :, :plen] = head["kv"][1]
                    else:
                        cache.k[:, slot, :, :plen] = cache.k[:, head["src"], :, :plen]
                        cache.v[:, slot, :, :plen] = cache.v[:, head["src"], :, :plen]
                tokens[key] = []
                if sampling:
                    seed = req.seeds[s] if req.seeds is not None else sample_seed(cfg.seed, ri, s)
                    gens[key] = torch.Generator(device=device).manual_seed(int(seed))
                if req.max_new_tokens == 0:
                    finish(None, key, "length")
                    free.appendleft(slot)
                    continue
                slot_of[slot], slot_len[slot] = key, plen
                if push(slot, key, pick(head["logits"], key)):
                    slot_next[slot] = tokens[key][-1]
            if head["sample"] < req.n:
                if head["kv"] is None:  # its source slot may be reused before the rest are placed
                    src = head["src"]
                    head["kv"] = (cache.k[:, src, :, :plen].clone(), cache.v[:, src, :, :plen].clone())
                return
            queue.popleft()
            head.clear()

    def compact() -> int:
        """Move live rows into the holes below them so that they fill slots ``0..k-1``; returns k.

        Holes stay only once nothing waits (``admit`` refills every free slot while work queues), so this
        runs at the tail of a run, at most once per finished row. Decoding then works on a view of the
        first k cache rows: no per-step gather of every layer's keys and values, and the rows that ended
        cost nothing."""
        live = [i for i in range(n_slots) if slot_of[i] is not None]
        k = len(live)
        holes = [i for i in range(k) if slot_of[i] is None]
        for dst, src in zip(holes, [i for i in live if i >= k]):
            n = slot_len[src]
            cache.k[:, dst, :, :n] = cache.k[:, src, :, :n]
            cache.v[:, dst, :, :n] = cache.v[:, src, :, :n]
            slot_of[dst], slot_len[dst], slot_next[dst] = slot_of[src], n, slot_next[src]
            slot_of[src] = None
        if holes:
            free.clear()
            free.extend(range(k, n_slots))
        return k

    admit()
    while True:
        k = compact()
        if k == 0:
            if not queue:
                break
            admit()
            continue
        ids = torch.tensor([[slot_next[i]] for i in range(k)], dtype=torch.long, device=device)
        pos = torch.tensor(slot_len[:k], dtype=torch.long, device=device)
        view = cache if k == n_slots else cache.rows(0, k)
        logits = model(ids, cache=view, slot_pos=pos)[:, -1]
        stats["steps"] += 1
        greedy = logits.argmax(dim=-1).tolist() if not sampling else None  # one host sync per step
        for slot in range(k):
            key = slot_of[slot]
            slot_len[slot] += 1
            t = greedy[slot] if greedy is not None else pick(logits[slot], key)
            if push(slot, key, t):
                slot_next[slot] = t
        admit()
    if bar is not None:
        bar.close()
    secs = time.perf_counter() - t_start
    return EngineResult([list(c) for c in out], stats["prefills"], stats["prefill_tokens"], stats["new_tokens"],
                        stats["steps"], secs, n_slots,
                        {"prefill_s": stats["prefill_s"], "decode_s": secs - stats["prefill_s"]})


def _run_static(model, requests: Sequence[Request], cfg: EngineConfig, decode, on_token, on_complete) -> EngineResult:
    """Models without slot decoding (transformers models behind ``ForeignCausalLM``, whose cache can only
    be appended to) run as static batches of ``cfg.slots`` samples, each batch seeded by its first sample's
    seed: the same results contract, without refilled slots or per-sample seeds."""
    from .generate import generate

    keys = [(ri, si) for ri, r in enumerate(requests) for si in range(r.n)]
    out: list[list[Completion | None]] = [[None] * r.n for r in requests]
    t0, new, prefill_s = time.perf_counter(), 0, 0.0
    for b0 in range(0, len(keys), max(1, cfg.slots)):
        chunk = keys[b0:b0 + max(1, cfg.slots)]
        limits = [requests[ri].max_new_tokens for ri, _ in chunk]
        first = requests[chunk[0][0]]
        seed = first.seeds[chunk[0][1]] if first.seeds is not None else sample_seed(cfg.seed, *chunk[0])

        got = [0] * len(chunk)

        def stream(row: int, t: int) -> None:
            got[row] += 1
            if on_token is not None and got[row] <= limits[row]:
                on_token(*chunk[row], t)

        res = generate(model, [requests[ri].prompt for ri, _ in chunk], max(limits), temperature=cfg.temperature,
                       top_p=cfg.top_p, seed=seed, stop_token_ids=cfg.stop_token_ids,
                       stop_strings=list(cfg.stop_strings), decode=decode, on_token=stream)
        prefill_s += res.prefill_s
        for (ri, si), ids, why, hit, lim in zip(chunk, res.token_ids, res.finish_reasons, res.stop_strings, limits):
            c = Completion(ids[:lim], "length", None) if len(ids) > lim else Completion(ids, why, hit)
            out[ri][si] = c
            new += len(c.token_ids)
            if on_complete is not None:
                on_complete(ri, si, c)
    secs = time.perf_counter() - t0
    return EngineResult([list(c) for c in out], len(keys), sum(len(requests[ri].prompt) for ri, _ in keys), new,
                        0, secs, cfg.slots, {"prefill_s": prefill_s, "decode_s": secs - prefill_s})
