"""Log-likelihood of continuations: the scoring primitive of multiple-choice evaluation (Table 6's
commonsense rows, MMLU).

For each ``(context, continuation)`` pair :func:`continuation_logprobs` returns the sum of the model's
log-probabilities of the continuation's tokens given the context, the number of those tokens, and whether
each of them is the greedy (argmax) token.

Tokenization. The context and the continuation are encoded *separately* and concatenated, so the split
between them always falls on a token boundary and the continuation's tokens are exactly
``tokenizer.encode(continuation)``, whatever the context (the choice lm-evaluation-harness made for its
original implementation; encoding ``context + continuation`` as one string can merge the last context
characters with the first continuation characters). Whitespace belongs to the continuation: the delimiter
between a prompt and its answer is the continuation's leading space (``"Answer:"`` + ``" Paris"``), and
trailing whitespace of a context is moved to the start of its continuation before encoding (as
lm-evaluation-harness does), so ``("Answer: ", "Paris")`` scores the same tokens as ``("Answer:", " Paris")``.
The tokenizer's BOS id is prepended to every context (``bos=False`` turns this off).

Batching. Sequences are right-padded and run through the plain causal forward pass: with a causal mask a
real token never attends to the padding after it, and positions are the same as unpadded, so a batched
result equals the unbatched one up to floating-point reduction order (the tests check 1e-5). Sequences are
sorted longest first (less padding, and an out-of-memory error shows on the first batch), and requests with
the same input tokens share one forward pass (MMLU's four single-token answers " A" .. " D" after the same
prompt cost one sequence, not four). A sequence longer than ``max_len`` (default ``model.cfg.max_seq_len``)
is truncated from the left, keeping the end of the context and the whole continuation.

Memory. The forward pass returns final hidden states; only the rows that predict continuation tokens are
gathered and sent through the output head, in chunks, and the log-softmax is taken in fp32 on those rows
only. A batch never materialises ``(batch, seq, vocab)`` logits (with a 128k vocabulary that is 0.5 MB per
position in fp32).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Sequence

import torch

HEAD_CHUNK_ROWS = 1024  # positions sent through the output head at once (1024 x 128k fp32 = 0.5 GB)


def _encode(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Encode distinct strings once (many choices share a context)."""
    uniq = list(dict.fromkeys(texts))
    if hasattr(tokenizer, "encode_batch"):
        ids = tokenizer.encode_batch(uniq)
    else:
        ids = [tokenizer.encode(t) for t in uniq]
    table = {t: list(i) for t, i in zip(uniq, ids)}
    return [table[t] for t in texts]


def split_requests(tokenizer: Any, requests: Sequence[tuple[str, str]],
                   bos: bool = True) -> list[tuple[list[int], list[int]]]:
    """``(context ids, continuation ids)`` per request, with the whitespace and BOS conventions of the
    module docstring. An empty context is BOS alone."""
    ctxs, conts = [], []
    for ctx, cont in requests:
        n_ws = len(ctx) - len(ctx.rstrip())
        if n_ws:
            ctx, cont = ctx[:-n_ws], ctx[-n_ws:] + cont
        ctxs.append(ctx)
        conts.append(cont)
    ctx_ids = _encode(tokenizer, ctxs)
    cont_ids = _encode(tokenizer, conts)
    prefix = [tokenizer.bos_id] if bos else []
    out = []
    for c, k in zip(ctx_ids, cont_ids):
        c = prefix + c
        if not c:
            raise ValueError("a request with an empty context needs bos=True (nothing to condition on)")
        out.append((c, k))
    return out


@torch.inference_mode()
def continuation_logprobs(model, tokenizer, requests: list[tuple[str, str]], batch_size: int = 16,
                          max_len: int | None = None, *, bos: bool = True,
                          progress: bool = False) -> list[tuple[float, int, bool]]:
    """``(sum of log p(continuation tokens | context), number of continuation tokens, all greedy)`` for
    every ``(context, continuation)`` in ``requests``, in order. An empty continuation gives
    ``(0.0, 0, True)``. See the module docstring for tokenization, batching and truncation."""
    max_len = int(max_len or model.cfg.max_seq_len)
    pairs = split_requests(tokenizer, requests, bos=bos)
    results: list[tuple[float, int, bool] | None] = [None] * len(pairs)
    # One forward "row" per distinct input; each request reads the last len(cont) positions of its row.
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (ctx, cont) in enumerate(pairs):
        if not cont:
            results[i] = (0.0, 0, True)
            continue
        if len(cont) > max_len:
            raise ValueError(f"request {i}: the continuation has {len(cont)} tokens, more than max_len={max_len}")
        full = (ctx + cont)[-(max_len + 1):]
        groups.setdefault(tuple(full[:-1]), []).append(i)
    rows = sorted(groups.items(), key=lambda kv: -len(kv[0]))

    dev = model.embed_tokens.weight.device
    vocab = model.cfg.vocab_size
    pad = model.cfg.pad_id if 0 <= model.cfg.pad_id < vocab else 0
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(rows), desc="loglik", unit="seq")
    for b0 in range(0, len(rows), batch_size):
        batch = rows[b0:b0 + batch_size]
        width = len(batch[0][0])  # longest first
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        for r, (inp, _) in enumerate(batch):
            ids[r, :len(inp)] = torch.tensor(inp, dtype=torch.long)
        hidden = model(ids.to(dev), return_hidden=True)  # (B, width, dim), right padding: plain causal
        # Rows of `hidden` that predict continuation tokens: the last n_tail positions of each input;
        # then one (row, target token) pair per continuation token of every request.
        sel_b, sel_t, pair_row, pair_tgt, owners = [], [], [], [], []
        for r, (inp, members) in enumerate(batch):
            n_tail = max(len(pairs[i][1]) for i in members)
            start = len(sel_b)
            sel_b += [r] * n_tail
            sel_t += range(len(inp) - n_tail, len(inp))
            for i in members:
                cont = pairs[i][1]
                pair_row += range(start + n_tail - len(cont), start + n_tail)
                pair_tgt += cont
                owners.append((i, len(cont)))
        h = hidden[torch.tensor(sel_b, device=dev), torch.tensor(sel_t, device=dev)]  # (N, dim)
        del hidden
        p_row = torch.tensor(pair_row, device=dev)
        p_tgt = torch.tensor(pair_tgt, device=dev)
        tok_lp = torch.empty(len(pair_row), dtype=torch.float32, device=dev)
        tok_greedy = torch.empty(len(pair_row), dtype=torch.bool, device=dev)
        for c0 in range(0, h.shape[0], HEAD_CHUNK_ROWS):
            logits = model.logits(h[c0:c0 + HEAD_CHUNK_ROWS]).float()  # (n, vocab) fp32, these rows only
            lse = torch.logsumexp(logits, dim=-1)
            top = logits.argmax(dim=-1)
            sel = ((p_row >= c0) & (p_row < c0 + logits.shape[0])).nonzero().squeeze(1)
            local = p_row[sel] - c0
            tok_lp[sel] = (logits[local, p_tgt[sel]] - lse[local])
            tok_greedy[sel] = top[local] == p_tgt[sel]
            del logits
        tok_lp_l, tok_greedy_l = tok_lp.tolist(), tok_greedy.tolist()
        k = 0
        for i, n in owners:
            results[i] = (float(sum(tok_lp_l[k:k + n])), n, all(tok_greedy_l[k:k + n]))
            k += n
        if bar is not None:
            bar.update(len(batch))
    if bar is not None:
        bar.close()
    return results  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------- runner

def _mean_ci(values: list[bool]) -> tuple[float, list[float]]:
    """Mean and 95% normal-approximation interval (1.96 standard errors, sample variance), as the
    generation runner reports."""
    n = len(values)
    if not n:
        return 0.0, [0.0, 0.0]
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    half = 1.96 * math.sqrt(var / n)
    return mean, [max(0.0, mean - half), min(1.0, mean + half)]


def score_choices(logprobs: list[float], choice_chars: list[int]) -> tuple[int, int]:
    """``(pred, pred_norm)``: argmax of the summed log-probability, and of the log-probability per
    character of the choice text (the first index wins a tie)."""
    pred = max(range(len(logprobs)), key=lambda j: (logprobs[j], -j))
    normed = [lp / max(1, c) for lp, c in zip(logprobs, choice_chars)]
    pred_norm = max(range(len(normed)), key=lambda j: (normed[j], -j))
    return pred, pred_norm


def resolve_choice_data(task, data: str) -> str:
    from .runner import SHARED_BENCHMARKS
    from .tasks.base import TaskDataError

    if data:
        return data
    if task.default_data and (SHARED_BENCHMARKS / task.default_data).is_file():
        return str(SHARED_BENCHMARKS / task.default_data)
    if task.hub:
        return task.hub
    raise TaskDataError(f"task {task.name}: no data given (--data PATH)")


def resolve_fewshot(task, data: str, fewshot: int | None, fewshot_data: str) -> tuple[int, str]:
    """``(number of exemplars, where they come from)``. ``fewshot=None`` takes the task's default when
    exemplar data is available (given, or the hub's few-shot split when ``data`` is a hub id), else 0."""
    from .tasks.base import TaskDataError

    source = fewshot_data
    if not source and data.startswith("hf:") and task.fewshot_hub:
        source = data.partition("@")[0] + "@" + task.fewshot_hub.partition("@")[2]
    if fewshot is None:
        k = task.fewshot if source else 0
    else:
        k = int(fewshot)
        if k < 0:
            raise ValueError(f"fewshot must be >= 0, got {k}")
        if k and not source:
            raise TaskDataError(f"task {task.name}: {k}-shot needs exemplars: give fewshot_data (--fewshot-data)")
    return k, (source if k else "")


def run_choice_eval(model_spec: str, task: str, data: str, limit: int = 0, batch_size: int = 16,
                    fewshot: int | None = None, fewshot_data: str = "", out: str = "", device: str = "auto",
                    progress: bool = True) -> dict[str, Any]:
    """Evaluate ``model_spec`` on the multiple-choice ``task`` (a key of ``CHOICE_TASKS``) by log-likelihood.

    ``data``: a JSONL/Parquet file or ``hf:NAME[:CONFIG][@SPLIT]`` ("" = the task's file in
    ../shared/data/benchmarks, else its hub id). ``fewshot``: exemplars per question (None = the task's
    default: MMLU 5 when a dev file/split is at hand, else 0), taken from ``fewshot_data``.
    Writes ``OUT/samples.jsonl`` (one record per question, appended as scored; a re-run with the same
    folder reuses the records already there) and ``OUT/summary.json``; returns the summary: ``task``,
    ``acc``, ``acc_norm`` (per-character normalised, see :mod:`.tasks.choice`), ``n``, ``ci95``,
    ``ci95_norm``, ``samples_per_s``, ``out`` and the run's settings.
    """
    from ..tokenizer import load_tokenizer
    from ..train.distributed import pick_device
    from ..train.loop import load_model_spec
    from .tasks.base import TaskDataError
    from .tasks.choice import CHOICE_TASKS, Exemplars, load_choice_examples

    if task not in CHOICE_TASKS:
        raise TaskDataError(f"unknown multiple-choice task {task!r}; tasks: {', '.join(sorted(CHOICE_TASKS))}")
    t = CHOICE_TASKS[task]
    data = resolve_choice_data(t, data)
    examples = load_choice_examples(t, data, limit)
    k, fs_source = resolve_fewshot(t, data, fewshot, fewshot_data)
    shots = Exemplars(t, fs_source, k)
    prefixes = {ex.id: shots.prefix(ex) for ex in examples}  # fails early on missing exemplars

    out_dir = Path(out or Path("runs") / "eval" / t.name)
    out_dir.mkdir(parents=True, exist_ok=True)
    samples_path = out_dir / "samples.jsonl"
    done: dict[str, dict] = {}
    if samples_path.is_file():
        for line in samples_path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                done[r["id"]] = r

    def reusable(ex) -> bool:
        r = done.get(ex.id)
        return (r is not None and r.get("gold") == ex.gold and r.get("fewshot") == k
                and len(r.get("logprobs", [])) == len(ex.continuations))

    todo = [ex for ex in examples if not reusable(ex)]
    dev = pick_device(device)
    if todo:
        model, meta = load_model_spec(model_spec, device=dev)
        model.eval()
        tok = load_tokenizer(meta.get("tokenizer") or "llama3")
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), desc=f"eval {t.name}", unit="q")
    chunk = max(64, 8 * batch_size)  # questions scored between appends to samples.jsonl
    t0 = time.perf_counter()
    n_requests = 0
    with samples_path.open("a") as sink:
        for c0 in range(0, len(todo), chunk):
            part = todo[c0:c0 + chunk]
            reqs = [(prefixes[ex.id] + ctx, cont) for ex in part for ctx, cont in zip(ex.contexts, ex.continuations)]
            res = continuation_logprobs(model, tok, reqs, batch_size=batch_size)
            n_requests += len(reqs)
            j = 0
            for ex in part:
                m = len(ex.continuations)
                got = res[j:j + m]
                j += m
                lps = [r[0] for r in got]
                chars = [len(c) - len(t.delimiter) for c in ex.continuations]
                pred, pred_norm = score_choices(lps, chars)
                rec = {"id": ex.id, "gold": ex.gold, "logprobs": lps, "n_tokens": [r[1] for r in got],
                       "chars": chars, "greedy": [r[2] for r in got], "pred": pred, "pred_norm": pred_norm,
                       "correct": pred == ex.gold, "correct_norm": pred_norm == ex.gold, "fewshot": k}
                sink.write(json.dumps(rec) + "\n")
                done[ex.id] = rec
            sink.flush()
            if bar is not None:
                bar.update(len(part))
    if bar is not None:
        bar.close()
    secs = time.perf_counter() - t0
    recs = [done[ex.id] for ex in examples]
    acc, ci = _mean_ci([bool(r["correct"]) for r in recs])
    acc_norm, ci_norm = _mean_ci([bool(r["correct_norm"]) for r in recs])
    summary = {"task": t.name, "model": model_spec, "data": data, "fewshot": k, "fewshot_data": fs_source,
               "acc": acc, "acc_norm": acc_norm, "n": len(recs), "ci95": ci, "ci95_norm": ci_norm,
               "norm": "logprob / characters of the choice (lm-eval acc_norm)",
               "scored": len(todo), "requests": n_requests, "seconds": secs,
               "samples_per_s": len(todo) / secs if todo and secs > 0 else None,
               "device": str(dev), "out": str(out_dir)}
    tmp = out_dir / ".summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2))
    tmp.replace(out_dir / "summary.json")
    return summary
