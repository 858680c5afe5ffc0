"""Ask-LLM scoring (paper section 5.1.1, Figure 5, steps 2-3): a causal LM reads a sample and is asked
whether it belongs in a probing set; the score is P("1") renormalised over the two answers {"1", "0"} at
the answer position.

The model is hidden behind one small function, :data:`LastLogits` ("logits at the last position for a
batch of token-id lists"), so any model that can produce next-token logits plugs in: our
:class:`~mobilellm_r1.model.transformer.Transformer` (our checkpoints, HF llama4 directories, the SmolLM2
GGUF, all through :func:`~mobilellm_r1.model.gguf.load_any`) via :func:`transformer_last_logits`, or a
foreign HF causal LM once a loader for it exists.

A sample is laid out document-first, question-last (the Ask-LLM layout), inside the tokenizer's chat
template when it has one (instruct models answer there) and as plain text ending in ``Answer:`` otherwise.
Documents longer than the scorer's budget are cut to their first ``max_doc_tokens`` tokens; the sample's
``truncated`` flag records it.

The same machinery rates educational value 0-5 (:data:`EDU_PROMPT`, expected value over the digit
tokens): the labels the offline stand-in of the FineWeb-Edu classifier is trained on (see ``quality.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..tokenizer import Tokenizer

# One function per model: token-id lists (unpadded, any lengths) -> logits (B, vocab) at each list's end.
LastLogits = Callable[[Sequence[Sequence[int]]], torch.Tensor]

# Document first, question last (Ask-LLM's layout); "{text}" is replaced by the (possibly cut) sample.
LAYOUT = "###\n{text}\n###\n\n{question}"

# Step 2: does the sample belong in a reasoning-probing set?
REASONING_PROMPT = (
    "Does the text above contain material that would help a language model learn to reason, such as "
    "step-by-step logic, mathematics, working code, or clearly explained facts? "
    "Answer 1 for yes or 0 for no."
)
# Step 3: one prompt per capability, and "combined" for sources that feed none in particular.
DOMAIN_PROMPTS = {
    "code": ("Is the text above useful for learning to write or understand computer programs (source code, "
             "programming explanations, algorithms)? Answer 1 for yes or 0 for no."),
    "math": ("Is the text above useful for learning mathematics (calculations, proofs, problems with worked "
             "solutions, mathematical definitions)? Answer 1 for yes or 0 for no."),
    "knowledge": ("Is the text above useful for learning factual knowledge about the world (science, history, "
                  "technology, clearly explained)? Answer 1 for yes or 0 for no."),
    "combined": ("Is the text above useful for learning programming, mathematics, or factual knowledge? "
                 "Answer 1 for yes or 0 for no."),
}
# Educational value 0-5, the FineWeb-Edu annotation scale (labels for the stand-in quality scorer).
EDU_PROMPT = (
    "Rate the educational value of the text above for a student, from 0 (none: boilerplate, noise, "
    "advertising) to 5 (excellent: clear, well-structured teaching material). Answer with one digit from 0 to 5."
)


def transformer_last_logits(model: torch.nn.Module, pad_id: int) -> LastLogits:
    """:data:`LastLogits` for our Transformer: left-pad the batch (the mask keeps padding out of attention
    and positions counting real tokens only) and run the head on the final position only, so the vocab-sized
    logits are computed once per sample."""
    device = next(model.parameters()).device

    @torch.inference_mode()
    def fn(batch: Sequence[Sequence[int]]) -> torch.Tensor:
        width = max(len(x) for x in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.bool)
        for i, x in enumerate(batch):
            ids[i, width - len(x):] = torch.as_tensor(list(x), dtype=torch.long)
            mask[i, width - len(x):] = True
        attn = None if bool(mask.all()) else mask.to(device)  # equal lengths: the fast causal path
        out = model(ids.to(device), attention_mask=attn, last_only=True)
        return out[:, -1].float().cpu()

    return fn


@dataclass
class Prompted:
    """A sample laid out for the scorer."""

    ids: list[int]
    n_doc_tokens: int  # the document's full length in tokens, before any cut
    truncated: bool


class PromptBuilder:
    """Token ids of ``LAYOUT`` for one question, with the document cut to ``max_doc_tokens``."""

    def __init__(self, tokenizer: Tokenizer, max_doc_tokens: int, chat: bool | None = None):
        self.tok = tokenizer
        self.max_doc_tokens = max_doc_tokens
        self.chat = tokenizer.chat is not None if chat is None else chat
        if self.chat and tokenizer.chat is None:
            raise ValueError(f"tokenizer {tokenizer.name!r} has no chat format; use chat = false")
        self.lead = "" if self.chat or len(tokenizer.encode(" 1")) != 1 else " "

    def answer_ids(self, answers: Sequence[str]) -> list[int]:
        """One token id per answer string. In the chat layout the answer opens the assistant turn ("1");
        in plain text it follows "Answer:", with its space when the tokenizer has " 1" as one token (Llama-3)
        and after a space already in the prompt when it splits digits from spaces (SmolLM2)."""
        out = []
        for a in answers:
            ids = self.tok.encode(self.lead + a)
            if len(ids) != 1:
                raise ValueError(f"answer {a!r} is not a single token in tokenizer {self.tok.name!r}: {ids}")
            out.append(ids[0])
        if len(set(out)) != len(out):
            raise ValueError(f"answers {list(answers)} map to the same token ids {out}")
        return out

    def overhead(self, question: str) -> int:
        return len(self.build("", question).ids)

    def build(self, text: str, question: str) -> Prompted:
        doc = self.tok.encode(text)
        truncated = len(doc) > self.max_doc_tokens
        if truncated:  # cut in token space, then back to text so the layout tokenises as one piece
            text = self.tok.decode(doc[: self.max_doc_tokens])
        content = LAYOUT.format(text=text, question=question)
        if self.chat:
            ids = self.tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        else:
            ids = self.tok.encode(content + "\nAnswer:" + ("" if self.lead else " "), bos=True)
        return Prompted(ids=ids, n_doc_tokens=len(doc), truncated=truncated)


def answer_probs(last_logits: LastLogits, batch: Sequence[Sequence[int]], answer_ids: Sequence[int]) -> torch.Tensor:
    """(B, len(answer_ids)): the next-token distribution renormalised over the answer tokens."""
    logits = last_logits(batch)
    return torch.softmax(logits[:, list(answer_ids)].double(), dim=-1).float()


class AskLLM:
    """Scores texts with one question. ``kind="yes_no"``: P("1") over {"1","0"} (Ask-LLM);
    ``kind="edu"``: expected digit over {"0",...,"5"} (the 0-5 educational-value scale)."""

    def __init__(self, last_logits: LastLogits, tokenizer: Tokenizer, *, max_doc_tokens: int,
                 context: int, batch_size: int = 8, chat: bool | None = None):
        self.last_logits = last_logits
        self.builder = PromptBuilder(tokenizer, max_doc_tokens, chat)
        self.context = context
        self.batch_size = batch_size

    def _budget(self, question: str) -> None:
        need = self.builder.overhead(question) + self.builder.max_doc_tokens
        if need > self.context:  # keep the cut inside the model's context
            self.builder.max_doc_tokens = max(1, self.context - self.builder.overhead(question) - 8)

    def score(self, texts: Sequence[str], question: str, kind: str = "yes_no") -> list[dict]:
        """One dict per text: ``score``, ``n_tokens`` (document tokens before the cut), ``truncated``."""
        if kind == "yes_no":
            answers, values = ["1", "0"], None
        elif kind == "edu":
            answers, values = [str(d) for d in range(6)], torch.arange(6, dtype=torch.float32)
        else:
            raise ValueError(f"unknown Ask-LLM kind {kind!r}")
        self._budget(question)
        ans = self.builder.answer_ids(answers)
        prompted = [self.builder.build(t, question) for t in texts]
        # Similar lengths together: less padding. Results go back to input order.
        order = sorted(range(len(prompted)), key=lambda i: len(prompted[i].ids))
        scores = [0.0] * len(prompted)
        for s in range(0, len(order), self.batch_size):
            idx = order[s: s + self.batch_size]
            probs = answer_probs(self.last_logits, [prompted[i].ids for i in idx], ans)
            vals = probs[:, 0] if values is None else probs @ values
            for i, v in zip(idx, vals.tolist()):
                scores[i] = float(v)
        return [{"score": scores[i], "n_tokens": p.n_doc_tokens, "truncated": p.truncated}
                for i, p in enumerate(prompted)]
