"""Chat with a checkpoint: the conversation is rendered with the tokenizer's chat template and the reply
is streamed token by token as it is generated (KV-cache decoding, :func:`model.generate.generate`)."""

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
        from ..tokenizer import load_tokenizer
        from ..train.distributed import pick_device
        from ..train.loop import load_model_spec

        self.opts = opts
        dev = pick_device(opts.device)
        self.model, meta = load_model_spec(model_spec, device=dev)
        self.model.eval()
        self.tok = load_tokenizer(meta.get("tokenizer") or "llama3")
        if self.tok.chat is None:
            from ..cli import UserError

            raise UserError(f"tokenizer {self.tok.name!r} has no chat format")
        cfg = self.model.cfg
        self.stop = sorted({i for i in list(self.tok.eos_ids) + list(cfg.eos_ids) if 0 <= i < cfg.vocab_size})
        self.messages: list[dict] = [{"role": "system", "content": opts.system}] if opts.system else []

    def reply(self, user: str, out: TextIO | None = None) -> dict[str, Any]:
        """Answer ``user`` (appended to the conversation), writing text to ``out`` as it is generated."""
        from ..model.engine import EngineConfig, Request
        from ..model.engine import run as run_engine

        self.messages.append({"role": "user", "content": user})
        prompt = self.tok.apply_chat_template(self.messages, add_generation_prompt=True)
        budget = self.model.cfg.max_seq_len - len(prompt)
        if budget <= 0:
            raise ValueError(f"the conversation ({len(prompt)} tokens) fills the model's context")
        stream = StreamDecoder(self.tok.decode, set(self.stop))

        def on_token(_req: int, _sample: int, t: int) -> None:
            piece = stream.push(t)
            if piece and out is not None:
                out.write(piece)
                out.flush()

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
