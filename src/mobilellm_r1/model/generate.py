"""Batched generation with a pre-allocated KV cache.

Prompts of different lengths are left-padded into one batch; the padding is masked out of attention and
positions count real tokens only, so a padded row produces the same tokens as the same prompt alone.
Decoding: greedy (``temperature == 0``), or temperature with optional nucleus (top-p) sampling from a
seeded ``torch.Generator``. A row stops at a stop token id, at a stop string (given a ``decode`` function),
or after ``max_new_tokens``; the batch stops when every row has.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from .transformer import Transformer


@dataclass
class GenerationResult:
    token_ids: list[list[int]]  # new tokens per row (prompt excluded; a final stop token included)
    finish_reasons: list[str]  # "stop_token" | "stop_string" | "length" per row
    prompt_tokens: int  # real (unpadded) prompt tokens over all rows
    new_tokens: int  # generated tokens over all rows
    prefill_s: float
    decode_s: float
    stop_strings: list[str | None] = field(default_factory=list)  # the stop string a row matched

    @property
    def total_s(self) -> float:
        return self.prefill_s + self.decode_s

    @property
    def tokens_per_s(self) -> float:
        """New tokens per second of the whole call (prefill included)."""
        return self.new_tokens / self.total_s if self.total_s > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens per second of the decode loop (tokens after each row's first, which prefill produced)."""
        n = self.new_tokens - len(self.token_ids)
        return n / self.decode_s if self.decode_s > 0 and n > 0 else 0.0

    def timing(self) -> dict[str, float]:
        return {"prefill_s": self.prefill_s, "decode_s": self.decode_s, "total_s": self.total_s,
                "tokens_per_s": self.tokens_per_s, "decode_tokens_per_s": self.decode_tokens_per_s}


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token per row from ``logits`` ``(B, V)``: argmax when ``temperature <= 0``, otherwise a sample
    from ``softmax(logits / temperature)`` restricted to the smallest set of tokens whose probability
    reaches ``top_p``."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # Drop a token when the tokens ranked above it already reach top_p (the top token always stays).
        drop = (sorted_p.cumsum(dim=-1) - sorted_p) >= top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        pick = torch.multinomial(sorted_p, 1, generator=generator)
        return order.gather(-1, pick).squeeze(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _stop_window(stop_strings: Sequence[str]) -> int:
    # Every token decodes to at least one byte, and a character is at most 4 bytes: a stop string lies
    # within the last 4*len+1 tokens (one more for a token that straddles its start).
    return max(4 * len(s) + 1 for s in stop_strings) if stop_strings else 0


@torch.inference_mode()
def generate(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int = 128,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    stop_token_ids: Sequence[int] | None = None,
    stop_strings: Sequence[str] | None = None,
    decode: Callable[[list[int]], str] | None = None,
    pad_id: int = 0,
    on_token: Callable[[int, int], None] | None = None,
) -> GenerationResult:
    """Generate up to ``max_new_tokens`` tokens after each prompt (lists of token ids).

    ``stop_token_ids`` defaults to the model's ``eos_ids`` (pass ``[]`` to run to the length limit);
    ``stop_strings`` need ``decode`` (token ids → text), checked on each row's generated text.
    ``seed`` builds a ``torch.Generator`` (or pass ``generator``); sampling draws from it in batch order.
    ``on_token(row, token)`` is called as each token is produced (streaming output).
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if stop_strings and decode is None:
        raise ValueError("stop_strings need a decode function")
    cfg = model.cfg
    device = model.embed_tokens.weight.device
    b = len(prompts)
    lengths = [len(p) for p in prompts]
    width = max(lengths)
    total = width + max_new_tokens
    if total > cfg.max_seq_len:
        raise ValueError(f"prompt ({width}) + max_new_tokens ({max_new_tokens}) exceeds max_seq_len {cfg.max_seq_len}")
    for p in prompts:
        bad = [t for t in p if not 0 <= t < cfg.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the model's vocabulary ({cfg.vocab_size})")
    stop_ids = set(cfg.eos_ids if stop_token_ids is None else stop_token_ids)
    stop_strings = [s for s in (stop_strings or []) if s]
    window = _stop_window(stop_strings)
    if generator is None and seed is not None and temperature > 0:
        generator = torch.Generator(device=device).manual_seed(seed)

    ids = torch.full((b, width), pad_id, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
    ids = ids.to(device)
    padded = any(n != width for n in lengths)
    mask = (torch.arange(width)[None, :] >= torch.tensor([width - n for n in lengths])[:, None]).to(device)

    out: list[list[int]] = [[] for _ in range(b)]
    reasons: list[str] = ["length"] * b
    matched: list[str | None] = [None] * b
    done = [False] * b
    if max_new_tokens <= 0:
        return GenerationResult(out, reasons, sum(lengths), 0, 0.0, 0.0, matched)

    t0 = time.perf_counter()
    cache = model.new_cache(b, total)
    logits = model(ids, cache=cache, attention_mask=mask if padded else None, last_only=True)[:, -1]
    positions = torch.tensor(lengths, device=device)[:, None] if padded else None
    nxt = sample_next(logits, temperature, top_p, generator)
    t1 = time.perf_counter()
    for step in range(max_new_tokens):
        tokens = nxt.tolist()  # the one host sync per step
        for i, t in enumerate(tokens):
            if done[i]:
                continue
            out[i].append(t)
            if on_token is not None:
                on_token(i, t)
            if t in stop_ids:
                done[i], reasons[i] = True, "stop_token"
            elif stop_strings:
                text = decode(out[i][-window:])
                hit = next((s for s in stop_strings if s in text), None)
                if hit is not None:
                    done[i], reasons[i], matched[i] = True, "stop_string", hit
        if all(done) or step == max_new_tokens - 1:
            break
        logits = model(nxt[:, None], cache=cache, position_ids=positions)[:, -1]
        if positions is not None:
            positions = positions + 1
        nxt = sample_next(logits, temperature, top_p, generator)
    t2 = time.perf_counter()
    return GenerationResult(out, reasons, sum(lengths), sum(len(o) for o in out), t1 - t0, t2 - t1, matched)
