"""Chat with a checkpoint or an exported ``.pte``: the conversation is rendered with the tokenizer's chat
template and the reply is streamed token by token as it is generated (the generation engine on a torch
model; :meth:`~mobilellm_r1.deploy.export.PteRunner.generate` on a ``.pte``, no torch model involved)."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Callable, TextIO



@dataclass
class ChatOptions:
    system: str = ""
    max_new_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 0.95
    seed: int = 0
    device: str = "auto"
    tokenizer: str = ""  # "" = the model's own (a .pte: its source checkpoint's)


class StreamDecoder:
    """Turns a growing list of token ids into newly completed text, holding back a partial UTF-8
    character until the token that completes it arrives."""

    def __init__(self, decode: Callable[[list[int]], str], skip: set[int]):
        self.decode, self.skip, self.ids, self.shown = decode, skip, [], 0

    def push(self, token: int) -> str:
        if token in self.skip:
            return ""
        self.ids.append(token)
        text = self.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        new, self.shown = text[self.shown:], len(text)
        return new


class ChatSession:
    def __init__(self, model_spec: str, opts: ChatOptions):
        from ..cli import UserError
        from ..tokenizer import load_tokenizer
        from ..train.distributed import pick_device
        from ..train.loop import load_model_spec

        self.opts = opts
        self.pte = None
        if str(model_spec).endswith(".pte"):
            from ..deploy.export import PteRunner, pte_tokenizer

            self.model = None
            self.pte = PteRunner(model_spec)
            try:
                spec = opts.tokenizer or pte_tokenizer(model_spec)
            except ValueError as e:
                raise UserError(str(e)) from None
            self.max_len, vocab, eos = self.pte.max_context, int(self.pte.meta["model"]["vocab_size"]), self.pte.eos_ids
        else:
            self.model, meta = load_model_spec(model_spec, device=pick_device(opts.device))
            self.model.eval()
            spec = opts.tokenizer or meta.get("tokenizer") or "llama3"
            self.max_len, vocab, eos = self.model.cfg.max_seq_len, self.model.cfg.vocab_size, self.model.cfg.eos_ids
        self.tok = load_tokenizer(spec)
        if self.tok.chat is None:
            raise UserError(f"tokenizer {self.tok.name!r} has no chat format")
        self.stop = sorted({i for i in list(self.tok.eos_ids) + list(eos) if 0 <= i < vocab})
        self.messages: list[dict] = [{"role": "system", "content": opts.system}] if opts.system else []

    def reply(self, user: str, out: TextIO | None = None) -> dict[str, Any]:
        """Answer ``user`` (appended to the conversation), writing text to ``out`` as it is generated."""
        from ..model.engine import EngineConfig, Request
        from ..model.engine import run as run_engine

        self.messages.append({"role": "user", "content": user})
        prompt = self.tok.apply_chat_template(self.messages, add_generation_prompt=True)
        budget = self.max_len - len(prompt)
        if budget <= 0:
            raise ValueError(f"the conversation ({len(prompt)} tokens) fills the model's context")
        stream = StreamDecoder(self.tok.decode, set(self.stop))

        def on_token(_req: int, _sample: int, t: int) -> None:
            piece = stream.push(t)
            if piece and out is not None:
                out.write(piece)
                out.flush()

        if self.pte is not None:
            return self._reply_pte(prompt, min(self.opts.max_new_tokens, budget), on_token)

        res = run_engine(self.model, [Request(prompt, min(self.opts.max_new_tokens, budget))],
                         EngineConfig(slots=1, temperature=self.opts.temperature, top_p=self.opts.top_p,
                                      seed=self.opts.seed, stop_token_ids=self.stop,
                                      max_len=len(prompt) + min(self.opts.max_new_tokens, budget)),
                         on_token=on_token)
        reply = res.completions[0][0]
        ids = reply.token_ids
        text = self.tok.decode([t for t in ids if t not in self.stop])
        self.messages.append({"role": "assistant", "content": text})
        return {"reply": text, "new_tokens": len(ids), "finish_reason": reply.finish_reason,
                "prompt_tokens": len(prompt), **res.timing_s, "total_s": res.seconds,
                "tokens_per_s": res.tokens_per_s}

    def _reply_pte(self, prompt: list[int], budget: int, on_token) -> dict[str, Any]:
        import time

        t0, first = time.perf_counter(), []

        def stream(t: int) -> None:
            if not first:
                first.append(time.perf_counter() - t0)
            on_token(0, 0, t)

        ids = self.pte.generate(prompt, budget, stop_ids=self.stop, temperature=self.opts.temperature,
                                top_p=self.opts.top_p, seed=self.opts.seed, on_token=stream)
        total = time.perf_counter() - t0
        text = self.tok.decode([t for t in ids if t not in self.stop])
        self.messages.append({"role": "assistant", "content": text})
        why = "stop_token" if ids and ids[-1] in self.stop else "length"
        decode_s = total - (first[0] if first else 0.0)
        return {"reply": text, "new_tokens": len(ids), "finish_reason": why, "prompt_tokens": len(prompt),
                "ttft_s": first[0] if first else None, "total_s": total,
                "tokens_per_s": (len(ids) - 1) / decode_s if len(ids) > 1 and decode_s > 0 else 0.0}


def interactive(session: ChatSession, inp: TextIO = sys.stdin, out: TextIO = sys.stdout) -> None:
    out.write("chat: an empty line or Ctrl-D ends; /reset starts a new conversation\n")
    while True:
        out.write("\n> ")
        out.flush()
        line = inp.readline()
        if not line or not line.strip():
            break
        if line.strip() == "/reset":
            session.messages = session.messages[:1] if session.opts.system else []
            continue
        session.reply(line.rstrip("\n"), out)
        out.write("\n")
