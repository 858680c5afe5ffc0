"""SFT data for the one training loop: conversations → assistant-masked token rows → micro-batches.

Each conversation is rendered with the tokenizer's chat format (:meth:`Tokenizer.render_chat`), which also
marks the assistant tokens; the loss is taken on those only (targets are ``IGNORE`` everywhere else).
A conversation with no assistant turn, or longer than a row, is skipped and counted, never truncated
(a cut-off reasoning trace would teach the model to stop mid-thought).

A row that is a plain document (only a ``text`` field, as pre-training sources are) is trained on every
token, without the chat template: pre-training text mixed into SFT, e.g. the arith drill's equations,
which supervise ~30 results in the tokens a worked problem spends on one to three.

Packing (``packing = true``, the default): conversations, in a seeded shuffled order, are laid end to end
into rows of ``seq_len + 1`` tokens, each into the first of the last 64 rows with room for it (else a
new row); what is left of a row is padding (its own document id, no loss). Every token carries its
conversation's document id, so the model restarts positions and blocks attention at each boundary
(``Transformer.forward(doc_ids=...)``): a packed row trains exactly as its conversations would one by one
(tested to 1e-5). Without packing each row holds one conversation, right-padded.

An epoch is one pass over the rows in a per-epoch shuffled order; data-parallel rank ``r`` of ``w`` takes
every ``w``-th micro-batch. The iterator's state (epoch, position) is checkpointed, so a resumed stage
continues with the same batches.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from ..assets import shared_data_dir
from ..config import ConfigError, Recipe, StageConfig
from ..train.objectives import next_token_targets
from .formats import SFTFormatError, is_text_row, row_messages


@dataclass
class SFTStats:
    rows_read: int = 0
    conversations: int = 0  # kept
    no_assistant: int = 0
    too_long: int = 0
    tokens: int = 0  # tokens of kept conversations
    assistant_tokens: int = 0
    per_dataset: dict[str, int] = field(default_factory=dict)  # kept conversations per dataset
    missing_optional: list[str] = field(default_factory=list)
    examples: list[str] = field(default_factory=list)  # where the first few skipped rows are

    def skip(self, kind: str, where: str) -> None:
        setattr(self, kind, getattr(self, kind) + 1)
        if len(self.examples) < 5:
            self.examples.append(f"{kind} at {where}")

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__, skipped=self.no_assistant + self.too_long)


# --------------------------------------------------------------------------------------------- inputs


def dataset_inputs(recipe: Recipe, name: str, run_dir: Path) -> list[str]:
    """Files (or an ``hf:`` spec) of the recipe source ``name``: its ``paths`` — relative ones looked up in
    the corpus folder, the run folder, the recipe's folder and ``../shared/data`` — else ``hf``, else
    ``<corpus>/<name>.jsonl``. Raises ``FileNotFoundError`` naming every place looked."""
    src = recipe.data.source(name)
    corpus = Path(recipe.data.corpus_dir) if recipe.data.corpus_dir else None
    if corpus is not None and not corpus.is_absolute():
        corpus = run_dir / corpus
    roots = [r for r in (corpus, run_dir, Path(recipe.path).parent if recipe.path else None, shared_data_dir()) if r]
    paths = list(src.paths)
    if not paths and src.hf:
        return ["hf:" + src.hf + (f":{src.hf_config}" if src.hf_config else "") + f"@{src.hf_split or 'train'}"]
    if not paths:
        paths = [f"{name}.jsonl"]
    out = []
    for p in paths:
        if p.startswith("hf:") or Path(p).is_absolute():
            out.append(p)
            continue
        cands = [r / p for r in roots]
        hit = next((c for c in cands if c.exists()), None)
        if hit is None:
            raise FileNotFoundError(f"SFT dataset {name!r}: {p} not found (looked in {', '.join(map(str, roots))})")
        out.append(str(hit))
    return out


def iter_rows(path: str) -> Iterator[tuple[str, Any]]:
    """``(where, row)`` of a JSONL / Parquet file, a folder of them, or an ``hf:`` spec."""
    if path.startswith("hf:"):
        from ..data.sources import hf_rows

        for n, row in enumerate(hf_rows(path)):
            yield f"{path}:{n}", row
        return
    from ..data.sources import list_files
    from ..eval.tasks.base import read_rows

    for f in list_files(path):
        for n, row in read_rows(f):
            yield f"{f}:{n}", row


def load_conversations(recipe: Recipe, stage: StageConfig, run_dir: Path,
                       stats: SFTStats) -> list[tuple[str, list[dict] | str]]:
    """``(where, messages)`` of every row of the stage's datasets (at most ``max_samples`` per dataset);
    a plain document's ``text`` stands in for the messages."""
    if not stage.datasets and not stage.optional_datasets:
        raise ConfigError("an SFT stage needs `datasets` (names of [[data.sources]])")
    out = []
    for name in list(stage.datasets) + list(stage.optional_datasets):
        try:
            inputs = dataset_inputs(recipe, name, run_dir)
        except FileNotFoundError:
            if name in stage.optional_datasets:
                stats.missing_optional.append(name)
                continue
            raise
        n = 0
        for path in inputs:
            for where, row in iter_rows(path):
                stats.rows_read += 1
                try:
                    msgs = row["text"] if is_text_row(row) else row_messages(row, where, stage.system_prompt)
                    out.append((where, msgs))
                except SFTFormatError as e:
                    raise ConfigError(str(e)) from None
                n += 1
                if stage.max_samples and n >= stage.max_samples:
                    break
            if stage.max_samples and n >= stage.max_samples:
                break
        stats.per_dataset[name] = n
    return out


# -------------------------------------------------------------------------------------------- tokens


def tokenize_conversations(convs: list[tuple[str, list[dict] | str]], tok, max_tokens: int,
                           stats: SFTStats) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(ids, assistant mask)`` per usable conversation (a plain document: bos + text + eos, every token
    after bos trained); the others are skipped and counted."""
    docs = []
    for where, msgs in convs:
        if isinstance(msgs, str):
            if not msgs.strip():
                stats.skip("no_assistant", where)
                continue
            ids = tok.encode(msgs, bos=True, eos=True)
            mask = [False] + [True] * (len(ids) - 1)
        elif not any(m["role"] == "assistant" and m["content"].strip() for m in msgs):
            stats.skip("no_assistant", where)
            continue
        else:
            ids, mask = tok.render_chat(msgs)
        if len(ids) > max_tokens:
            stats.skip("too_long", where)
            continue
        docs.append((np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=bool)))
        stats.conversations += 1
        stats.tokens += len(ids)
        stats.assistant_tokens += int(np.sum(mask))
    return docs


_FIT_WINDOW = 64


@dataclass
class Rows:
    tokens: np.ndarray  # (R, L) int64
    mask: np.ndarray  # (R, L) bool: trained tokens
    doc_ids: np.ndarray | None  # (R, L) int64 when packed
    lengths: np.ndarray  # (R,) real tokens per row


def pack(docs: list[tuple[np.ndarray, np.ndarray]], row_len: int, pad_id: int, packing: bool = True) -> Rows:
    """Lay conversations into rows of ``row_len`` tokens (see the module docstring)."""
    groups: list[list[int]] = []
    free: list[int] = []  # room left per row
    for i, (ids, _) in enumerate(docs):
        n = len(ids)
        # first fit among the most recent rows (bounded scan: linear time on millions of conversations)
        j = next((j for j in range(max(0, len(free) - _FIT_WINDOW), len(free)) if free[j] >= n), None) \
            if packing else None
        if j is None:
            groups.append([])
            free.append(row_len)
            j = len(groups) - 1
        groups[j].append(i)
        free[j] -= n
    r = len(groups)
    tokens = np.full((r, row_len), pad_id, dtype=np.int64)
    mask = np.zeros((r, row_len), dtype=bool)
    doc = np.zeros((r, row_len), dtype=np.int64)
    lengths = np.zeros(r, dtype=np.int64)
    for j, g in enumerate(groups):
        pos = 0
        for k, i in enumerate(g):
            ids, m = docs[i]
            tokens[j, pos:pos + len(ids)] = ids
            mask[j, pos:pos + len(ids)] = m
            doc[j, pos:pos + len(ids)] = k
            pos += len(ids)
        doc[j, pos:] = len(g)  # padding: a document of its own, never a target
        lengths[j] = pos
    return Rows(tokens, mask, doc if packing else None, lengths)


class SFTBatches:
    """Micro-batches (the loop's ``MicroBatch``) over packed rows, epoch after epoch."""

    def __init__(self, rows: Rows, micro_batch: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        if len(rows.tokens) < micro_batch * world_size:
            raise ConfigError(f"SFT data fills {len(rows.tokens)} rows, fewer than one global micro-batch "
                              f"({micro_batch} x {world_size} ranks)")
        self.rows, self.micro_batch, self.seed = rows, micro_batch, seed
        self.rank, self.world = rank, world_size
        self.per_epoch = len(rows.tokens) // (micro_batch * world_size)  # micro-batches per rank per epoch
        self.epoch, self.pos = 0, 0
        self._order = self._perm(0)

    @property
    def rows_per_epoch(self) -> int:
        return len(self.rows.tokens)

    def _perm(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.rows.tokens))

    def __iter__(self) -> "SFTBatches":
        return self

    def __next__(self):
        if self.pos >= self.per_epoch:
            self.epoch, self.pos = self.epoch + 1, 0
            self._order = self._perm(self.epoch)
        start = (self.pos * self.world + self.rank) * self.micro_batch
        idx = self._order[start:start + self.micro_batch]
        self.pos += 1
        return micro_batch(self.rows, idx)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._order = self._perm(self.epoch)


def micro_batch(rows: Rows, idx):
    """The loop's ``MicroBatch`` for rows ``idx``: unpacked rows are cut to their longest real length."""
    from ..train.loop import MicroBatch

    width = rows.tokens.shape[1] if rows.doc_ids is not None else max(2, int(rows.lengths[idx].max()))
    tokens = torch.from_numpy(rows.tokens[idx, :width])
    mask = torch.from_numpy(rows.mask[idx, :width])
    doc = torch.from_numpy(rows.doc_ids[idx, :width]) if rows.doc_ids is not None else None
    inputs, targets = next_token_targets(tokens, doc, loss_mask=mask)
    return MicroBatch(inputs, targets, doc[:, :-1] if doc is not None else None,
                      rows=[f"sft@{int(i)}" for i in idx])  # packed row numbers, for a non-finite loss's error


def build_sft_batches(recipe: Recipe, stage: StageConfig, tokenizer: str, run_dir: Path, rank: int = 0,
                      world_size: int = 1) -> tuple[SFTBatches, SFTStats]:
    """The stage's SFT micro-batches for this rank, and what was read, kept and skipped."""
    from ..tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer)
    if tok.chat is None:
        raise ConfigError(f"tokenizer {tokenizer!r} has no chat format: SFT needs one")
    stats = SFTStats()
    convs = load_conversations(recipe, stage, run_dir, stats)
    order = np.random.default_rng(recipe.run.seed).permutation(len(convs))
    docs = tokenize_conversations([convs[i] for i in order], tok, stage.seq_len + 1, stats)
    if not docs:
        raise ConfigError(f"no usable SFT conversation in {', '.join(stage.datasets)} "
                          f"({stats.no_assistant} without an assistant turn, {stats.too_long} longer than "
                          f"{stage.seq_len + 1} tokens)")
    rows = pack(docs, stage.seq_len + 1, tok.pad_id, stage.packing)
    return SFTBatches(rows, stage.micro_batch_size, recipe.run.seed, rank, world_size), stats
