import json

import pytest

from mobilellm_r1.tokenizer import hf_json_tokenizer, load_tokenizer, train_bpe


@pytest.fixture(scope="module")
def llama3():
    return load_tokenizer("llama3")


@pytest.fixture(scope="module")
def smollm2():
    return load_tokenizer("smollm2")


def test_llama3_known_ids(llama3):
    assert llama3.vocab_size == 128256
    assert llama3.encode("Hello world", bos=True) == [128000, 9906, 1917]
    assert (llama3.bos_id, llama3.eos_id, llama3.pad_id) == (128000, 128001, 127999)
    assert llama3.eos_ids == [128001, 128008, 128009]
    assert llama3.token_to_id("<|eot_id|>") == 128009
    assert llama3.token_dtype == "uint32"


def test_llama3_round_trip_and_special_text_is_plain_text(llama3):
    text = "Ünïcödé ✓ 12345 \n\n\tdef f(x):\n    return x**2  # <|eot_id|>"
    ids = llama3.encode(text)
    assert llama3.decode(ids) == text
    assert 128009 not in ids  # special markup in data is text, never a control token
    assert llama3.encode_batch([text, "a"]) == [ids, llama3.encode("a")]


def test_llama3_chat_layout_and_mask(llama3):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"}]
    ids, mask = llama3.render_chat(msgs)
    assert ids[0] == 128000 and ids[-1] == 128009
    text = llama3.decode(ids)
    assert text == ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
                    "<|start_header_id|>user<|end_header_id|>\n\n2+2?<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n4<|eot_id|>")
    trained = [i for i, m in zip(ids, mask) if m]
    assert llama3.decode(trained) == "4<|eot_id|>"
    prompt = llama3.apply_chat_template(msgs[:2], add_generation_prompt=True)
    assert llama3.decode(prompt).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    with pytest.raises(ValueError, match="message 0"):
        llama3.render_chat([{"content": "no role"}])


def test_smollm2_gguf_matches_transformers_conversion(smollm2):
    """Our GGUF reader must tokenize exactly like transformers' own GGUF tokenizer conversion."""
    from transformers import AutoTokenizer

    from mobilellm_r1.assets import smollm2_gguf

    path = smollm2_gguf()
    ref = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    texts = ["Hello world 12345 don't  stop\n\n  x", "The integral ∫₀¹ x² dx = 1/3.",
             "def f(a, b):\n    return a + b  # sum\n", "Œuvre, naïve café — 3.14159"]
    for t in texts:
        assert smollm2.encode(t) == ref.encode(t, add_special_tokens=False), t
        assert smollm2.decode(smollm2.encode(t)) == t
    assert smollm2.vocab_size == 49152 and smollm2.token_dtype == "uint16"
    assert smollm2.token_to_id("<|endoftext|>") == smollm2.bos_id == 0
    assert smollm2.token_to_id("<|im_end|>") in smollm2.eos_ids
    ids, mask = smollm2.render_chat([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])
    assert smollm2.decode(ids) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n"
    assert smollm2.decode([i for i, m in zip(ids, mask) if m]) == "yo<|im_end|>\n"


def test_trained_bpe_and_tokenizer_json_dir(tmp_path):
    texts = ["the quick brown fox jumps over the lazy dog %d times" % i for i in range(300)]
    tok = train_bpe(texts, tmp_path / "bpe", vocab_size=400, name="toy")
    assert tok.vocab_size <= 400 and tok.name == "toy"
    s = "the lazy fox jumps 42 times"
    assert tok.decode(tok.encode(s)) == s
    again = load_tokenizer(str(tmp_path / "bpe"))
    assert again.encode(s) == tok.encode(s) and again.eos_ids == tok.eos_ids
    # A plain HF tokenizer.json with a tokenizer_config.json naming its special tokens.
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "tokenizer.json").write_text((tmp_path / "bpe" / "tokenizer.json").read_text())
    (plain / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "bos_token": "<|endoftext|>"}))
    hf = hf_json_tokenizer(plain)
    assert hf.eos_id == tok.token_to_id("<|im_end|>") and hf.bos_id == tok.token_to_id("<|endoftext|>")


def test_unknown_tokenizer_spec_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="unknown tokenizer"):
        load_tokenizer(str(tmp_path / "missing"))


def test_smollm2_cut_to_its_first_ids_is_a_tokenizer_of_its_own(smollm2):
    """``smollm2:N`` = SmolLM2's BPE stopped at N ids: every id it emits is < N and means the same token as
    in the full tokenizer, any text round-trips, and common text costs only a few more tokens."""
    cut = load_tokenizer("smollm2:8192")
    assert cut.vocab_size == 8192 and (cut.bos_id, cut.eos_ids, cut.pad_id) == (smollm2.bos_id, smollm2.eos_ids, smollm2.pad_id)
    texts = ["Tom has 11 tickets. He finds 15 more tickets.\n11 + 15 = 26", "Œuvre, naïve café — ∫₀¹ x² dx",
             "def f(a, b):\n    return a + b  # sum\n", "<|im_end|> is text here"]
    for t in texts:
        ids = cut.encode(t)
        assert max(ids) < 8192 and cut.decode(ids) == t
        assert smollm2.decode(ids) == t  # the full tokenizer reads the cut one's ids as the same tokens
        assert len(ids) >= len(smollm2.encode(t))
    # tokens below the cut that the full tokenizer uses come out identical
    assert cut.encode("the answer is") == smollm2.encode("the answer is")
    ids, mask = cut.render_chat([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])
    assert smollm2.decode(ids) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n"
    assert cut.decode([i for i, m in zip(ids, mask) if m]) == "yo<|im_end|>\n"
    with pytest.raises(ValueError, match="more than 256"):
        load_tokenizer("smollm2:100")
