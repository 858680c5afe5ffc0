"""The mixture sampler: fixed-length training sequences drawn from token shards by source weights.

How a sequence is chosen (all of it a pure function of the seed and a global sequence counter ``g``):

1. **Which source.** Deficit round-robin: sequence ``g`` goes to the source whose realised count lags its
   target ``w_s * (g + 1)`` the most (ties → the earlier source). Realised shares therefore track the
   weights to within one sequence at every prefix, far tighter than i.i.d. draws.
2. **Which chunk of that source.** A source's token stream is cut into ``n_s`` chunks of ``seq_len + 1``
   tokens (stride ``seq_len``, so every token is a target once). The ``k``-th draw from a source takes
   chunk ``perm_e(k mod n_s)`` of epoch ``e = k // n_s``, where ``perm_e`` is a seeded Feistel
   permutation: a fresh shuffle each epoch in O(1) memory, even for billions of chunks.
3. **Which rank.** Data-parallel rank ``r`` of ``W`` takes the sequences with ``g ≡ r (mod W)``; every rank
   walks the same global schedule, so ranks never overlap and need no communication.

The state (``g`` and per-source draw counts) is a few integers: :meth:`MixtureSampler.state_dict` /
:meth:`load_state_dict` resume exactly. ``repeat=False`` stops when any sampled source runs out (the
paper's LOO runs: equal per-source sampling, no repeats); ``exclude`` drops a source (leave-one-out).

Held-out data: with ``heldout_fraction = h`` the last ``ceil(h * n_s)`` chunks of every source are reserved;
``split="train"`` never draws them and ``split="heldout"`` draws only them, so a training run can measure
loss on text it has never seen with the same sampler machinery.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Iterator

import numpy as np

from .shards import ShardSet

_MASK64 = (1 << 64) - 1


_C0, _C1, _C2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def _mix64(x: np.ndarray, key: int) -> np.ndarray:
    """A keyed 64-bit mixing function (splitmix64 finaliser) on uint64 arrays."""
    with np.errstate(over="ignore"):
        z = (x + np.uint64(key)) * np.uint64(_C0)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(_C1)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(_C2)
        return z ^ (z >> np.uint64(31))


def _mix64_int(x: int, key: int) -> int:
    """:func:`_mix64` on one Python int: per-sequence lookups are ~20x faster without numpy scalars."""
    z = ((x + key) * _C0) & _MASK64
    z = ((z ^ (z >> 30)) * _C1) & _MASK64
    z = ((z ^ (z >> 27)) * _C2) & _MASK64
    return z ^ (z >> 31)


def feistel_permute(idx: np.ndarray | int, n: int, key: int, rounds: int = 4) -> np.ndarray | int:
    """A bijection of ``[0, n)`` chosen by ``key``: a balanced Feistel network on the smallest even number
    of bits covering ``n``, with cycle-walking for values that land outside ``[0, n)``. An int in gives an
    int out; an array gives an array (the same values)."""
    if n <= 0:
        raise ValueError("cannot permute an empty range")
    half = max(1, (int(n - 1).bit_length() + 1) // 2)
    lo = (1 << half) - 1
    keys = _round_keys(key, rounds)
    if isinstance(idx, (int, np.integer)):
        x = int(idx)
        if not 0 <= x < n:
            raise IndexError(f"index {x} outside the permuted range [0, {n})")
        if n == 1:
            return x
        while True:  # cycle-walk: re-apply until inside the range (expected < 4 applications)
            left, right = x >> half, x & lo
            for k in keys:
                left, right = right, left ^ (_mix64_int(right, k) & lo)
            x = (left << half) | right
            if x < n:
                return x
    x = np.asarray(idx, dtype=np.uint64).copy()
    if np.any(x >= n):
        raise IndexError("index outside the permuted range")
    if n == 1:
        return x
    lo_mask = np.uint64(lo)

    def once(v: np.ndarray) -> np.ndarray:
        left, right = v >> np.uint64(half), v & lo_mask
        for k in keys:
            left, right = right, left ^ (_mix64(right, k) & lo_mask)
        return (left << np.uint64(half)) | right

    out = once(x)
    todo = out >= n
    while np.any(todo):
        out[todo] = once(out[todo])
        todo = out >= n
    return out


@lru_cache(maxsize=4096)
def _round_keys(key: int, rounds: int) -> tuple[int, ...]:
    return tuple(_seed_key(key, r) for r in range(rounds))


@lru_cache(maxsize=4096)
def _seed_key(*parts: Any) -> int:
    return int.from_bytes(hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest(), "little")


def window_doc_ids(starts: np.ndarray, start: int, length: int, dtype=np.int32) -> np.ndarray:
    """Document number of each token of the stream window ``[start, start + length)`` (0 for the document
    the window opens in), from the sorted document start offsets ``starts``. Only the starts inside the
    window matter: mark them and count."""
    lo, hi = np.searchsorted(starts, [start + 1, start + length])
    marks = np.zeros(length, dtype=dtype)
    marks[starts[lo:hi] - start] = 1
    return np.cumsum(marks, dtype=dtype)


@dataclass
class Batch:
    tokens: np.ndarray  # (B, seq_len + 1) int64: inputs are [:, :-1], targets [:, 1:]
    sources: list[str]
    doc_ids: np.ndarray  # (B, seq_len + 1) int32: document number within the row (for masked attention)
    starts: np.ndarray | None = None  # (B,) int64: offset of each row in its source's token stream


@dataclass
class MixtureSampler:
    shards: ShardSet
    weights: dict[str, float]
    seq_len: int
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    repeat: bool = True
    exclude: list[str] = field(default_factory=list)
    split: str = "all"  # "all" | "train" | "heldout"
    heldout_fraction: float = 0.0
    # --- state --------------------------------------------------------------------------------------
    next_global: int = 0
    counts: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside world size {self.world_size}")
        if self.seq_len < 1:
            raise ValueError("seq_len must be ≥ 1")
        for s in self.exclude:
            if s not in self.weights:
                raise KeyError(f"cannot exclude {s!r}: not in the mixture ({', '.join(self.weights)})")
        w = {s: float(v) for s, v in self.weights.items() if s not in self.exclude and v > 0}
        if not w:
            raise ValueError("the mixture has no source with positive weight")
        total = sum(w.values())
        self.names = list(w)
        self.probs = np.array([w[s] / total for s in self.names])
        self._plist = self.probs.tolist()
        if self.split not in ("all", "train", "heldout"):
            raise ValueError(f"split must be all, train or heldout, not {self.split!r}")
        if not 0.0 <= self.heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction must be in [0, 1), not {self.heldout_fraction}")
        self.n_chunks, self.chunk_offset = {}, {}
        for s in self.names:
            n = (self.shards.n_tokens(s) - 1) // self.seq_len
            held = -int(-self.heldout_fraction * n // 1) if self.split != "all" else 0  # ceil
            n, off = {"all": (n, 0), "train": (n - held, 0), "heldout": (held, n - held)}[self.split]
            if n < 1:
                raise ValueError(f"source {s!r} has {self.shards.n_tokens(s)} tokens: no {self.split} sequence "
                                 f"of {self.seq_len + 1} tokens (heldout_fraction {self.heldout_fraction})")
            self.n_chunks[s], self.chunk_offset[s] = n, off
        self.counts = {s: int(self.counts.get(s, 0)) for s in self.names}
        self._doc_starts: dict[str, np.ndarray] = {}

    @classmethod
    def equal(cls, shards: ShardSet, sources: list[str], seq_len: int, **kw) -> "MixtureSampler":
        """Equal per-source sampling without repeats (paper Eq. 1 LOO runs)."""
        return cls(shards, {s: 1.0 for s in sources}, seq_len, repeat=False, **kw)

    # --- schedule --------------------------------------------------------------------------------------
    def _pick(self, g: int) -> int:
        # Python floats: identical on every rank and faster than numpy for a handful of sources.
        best, best_i = -float("inf"), 0
        for i, (p, s) in enumerate(zip(self._plist, self.names)):
            d = p * (g + 1) - self.counts[s]
            if d > best:
                best, best_i = d, i
        return best_i

    def _chunk(self, source: str, k: int) -> int:
        n = self.n_chunks[source]
        epoch, j = divmod(k, n)
        if epoch and not self.repeat:
            raise StopIteration
        return self.chunk_offset[source] + feistel_permute(j, n, _seed_key(self.seed, source, epoch))

    def _doc_ids(self, source: str, start: int) -> np.ndarray:
        if source not in self._doc_starts:
            self._doc_starts[source] = self.shards.doc_starts(source)
        return window_doc_ids(self._doc_starts[source], start, self.seq_len + 1)

    def __iter__(self) -> Iterator[tuple[np.ndarray, str, np.ndarray]]:
        return self

    def __next__(self) -> tuple[np.ndarray, str, np.ndarray]:
        """The next sequence for this rank: (tokens[seq_len + 1], source, doc_ids[seq_len + 1])."""
        return self.next_row()[:3]

    def next_row(self) -> tuple[np.ndarray, str, np.ndarray, int]:
        """:meth:`__next__` plus the row's start offset in its source's token stream."""
        while True:
            g = self.next_global
            s = self.names[self._pick(g)]
            k = self.counts[s]
            chunk = self._chunk(s, k)  # raises StopIteration when a no-repeat source is exhausted
            self.next_global += 1
            self.counts[s] = k + 1
            if g % self.world_size == self.rank:
                start = chunk * self.seq_len
                toks = self.shards.tokens(s, start, self.seq_len + 1).astype(np.int64)
                return toks, s, self._doc_ids(s, start), start

    def next_batch(self, batch_size: int) -> Batch:
        rows = [self.next_row() for _ in range(batch_size)]
        return Batch(tokens=np.stack([r[0] for r in rows]), sources=[r[1] for r in rows],
                     doc_ids=np.stack([r[2] for r in rows]), starts=np.array([r[3] for r in rows], np.int64))

    # --- state -----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"next_global": self.next_global, "counts": dict(self.counts), "seed": self.seed,
                "seq_len": self.seq_len, "world_size": self.world_size, "split": self.split, "weights": dict(zip(self.names,
                                                                                            self.probs.tolist()))}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("seed", "seq_len", "world_size", "split"):
            have = state.get(key, "all" if key == "split" else None)  # states written before splits existed
            if have != getattr(self, key):
                raise ValueError(f"sampler state has {key}={have!r}, this sampler {getattr(self, key)!r}")
        if sorted(state["counts"]) != sorted(self.names):
            raise ValueError(f"sampler state covers sources {sorted(state['counts'])}, this sampler {sorted(self.names)}")
        self.next_global = int(state["next_global"])
        self.counts = {s: int(state["counts"][s]) for s in self.names}

    def token_shares(self) -> dict[str, float]:
        """Realised share of tokens per source over the global schedule so far."""
        total = sum(self.counts.values())
        return {s: (self.counts[s] / total if total else 0.0) for s in self.names}

    def target_shares(self) -> dict[str, float]:
        return dict(zip(self.names, self.probs.tolist()))
