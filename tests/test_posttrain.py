"""Post-training: chat rendering and masks, SFT data formats, packing, the SFT stage, GRPO, chat CLI."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mobilellm_r1.config import ConfigError, StageConfig, recipe_from_dict
from mobilellm_r1.posttrain.formats import row_messages
from mobilellm_r1.posttrain.sft_data import SFTStats, micro_batch, pack, tokenize_conversations
from mobilellm_r1.tokenizer import load_tokenizer, save_hf_tokenizer
from mobilellm_r1.train.objectives import IGNORE

SRC = str(Path(__file__).resolve().parents[1] / "src")
MATH_SYS = "Please reason step by step, and put your final answer within \\boxed{}."
CONVO = [{"role": "system", "content": MATH_SYS},
         {"role": "user", "content": "What is 6 x 7?\n\n  Show work."},
         {"role": "assistant", "content": "6 x 7 = 42, café.\nThe final answer is $\\boxed{42}$."},
         {"role": "user", "content": "And 2+2?"},
         {"role": "assistant", "content": "\nIt is \\boxed{4}."}]  # leading newline merges with the header
MICRO = {"preset": "micro", "vocab_size": 49152, "bos_id": 0, "eos_ids": [0, 2], "pad_id": 2}


def _env():
    return {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}


@pytest.mark.parametrize("spec", ["llama3", "smollm2"])
def test_assistant_mask_is_exact(spec):
    tok = load_tokenizer(spec)
    ids, mask = tok.render_chat(CONVO)
    # the tokens' bytes are exactly the rendered conversation
    assert b"".join(tok.token_bytes(i) for i in ids).decode() == "".join(
        tok.chat.prefix if k == 0 else "" for k in range(1)) + "".join(
        tok.chat.header.format(role=m["role"]) + m["content"] + tok.chat.footer for m in CONVO)
    # token by token: trained tokens are the assistant spans (content + turn end), nothing else
    trained = [tok.token_bytes(i).decode("utf-8", "replace") for i, m in zip(ids, mask) if m]
    first = CONVO[2]["content"] + tok.chat.footer
    second = CONVO[4]["content"] + tok.chat.footer
    text = "".join(trained)
    if spec == "llama3":  # "\n\n" + "\n" are one token that straddles header and content: trained
        assert text == first + "\n\n" + second
    else:
        assert text == first + second
    untrained = "".join(tok.token_bytes(i).decode("utf-8", "replace") for i, m in zip(ids, mask) if not m)
    assert "What is 6 x 7?" in untrained and MATH_SYS in untrained and "42" not in untrained
    # labels after the shift: -100 exactly where the predicted token is not an assistant token
    rows = pack([(np.array(ids), np.array(mask))], len(ids), tok.pad_id)
    mb = micro_batch(rows, np.array([0]))
    labels = mb.targets[0].tolist()
    for t in range(len(ids) - 1):
        assert labels[t] == (ids[t + 1] if mask[t + 1] else IGNORE)


@pytest.mark.parametrize("spec", ["llama3", "smollm2"])
def test_chat_template_parity_with_hf(spec, tmp_path):
    from transformers import AutoTokenizer

    tok = load_tokenizer(spec)
    save_hf_tokenizer(tok, tmp_path)
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    for msgs in (CONVO, CONVO[1:4], [{"role": "user", "content": "hi"}]):
        for gen in (False, True):
            got = hf.apply_chat_template(msgs, tokenize=True, add_generation_prompt=gen)
            got = got if isinstance(got, list) else got["input_ids"]
            assert got == tok.render_chat(msgs, gen)[0]


def test_hf_export_carries_the_chat_template(tmp_path):
    from transformers import AutoTokenizer

    from mobilellm_r1.config import model_preset
    from mobilellm_r1.model.hf import export_hf
    from mobilellm_r1.model.io import save_model
    from mobilellm_r1.model.transformer import Transformer

    m = Transformer(model_preset("micro", **{k: v for k, v in MICRO.items() if k != "preset"}))
    save_model(tmp_path / "ck", m, tokenizer_spec="smollm2")
    export_hf(tmp_path / "ck", tmp_path / "hf")
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    ids = hf.apply_chat_template(CONVO, tokenize=True, add_generation_prompt=True)
    ids = ids if isinstance(ids, list) else ids["input_ids"]
    assert ids == load_tokenizer("smollm2").apply_chat_template(CONVO)


def test_formats_are_detected_per_row():
    m = row_messages({"problem": "1+1?", "generated_solution": "2 \\boxed{2}"}, "f:1")
    assert [x["role"] for x in m] == ["system", "user", "assistant"] and m[0]["content"] == MATH_SYS
    m = row_messages({"input": "Sum a b", "output": "```python\nprint(sum(map(int,input().split())))\n```"}, "f:2")
    assert "python" in m[0]["content"] and m[2]["role"] == "assistant"
    m = row_messages({"question": "q", "answer": "3 + 4 = <<3+4=7>>7 apples.\n#### 1,007"}, "f:3", "none")
    assert m[1]["content"] == "3 + 4 = 7 apples.\nThe final answer is $\\boxed{1007}$."
    m = row_messages({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, "f:4")
    assert len(m) == 2
    with pytest.raises(ValueError, match=r"f:5: no SFT format matches this row \(fields: prompt, text\)"):
        row_messages({"text": "x", "prompt": "y"}, "f:5")
    with pytest.raises(ValueError, match=r"f:6: messages\[1\]"):
        row_messages({"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}, "f:6")


def _recipe(tmp_path, rows, stage_extra=None, name="s"):
    f = tmp_path / "data.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    stage = {"kind": "sft", "steps": 2, "seq_len": 64, "micro_batch_size": 2, "lr": 1e-3, "datasets": ["d"],
             "system_prompt": "none", **(stage_extra or {})}
    return recipe_from_dict({"run": {"name": "t"}, "model": MICRO,
                             "data": {"tokenizer": "smollm2", "sources": [{"name": "d", "paths": [str(f)]}]},
                             "stages": {name: stage}}, str(tmp_path / "r.toml"))


def _qa(i):
    return {"messages": [{"role": "user", "content": f"What is {i} + {i}?"},
                         {"role": "assistant", "content": f"{i} + {i} = {2 * i}. \\boxed{{{2 * i}}}"}]}


def test_bad_input_is_skipped_and_counted_or_named(tmp_path):
    from mobilellm_r1.posttrain.sft_data import build_sft_batches

    rows = [_qa(i) for i in range(6)] + [
        {"messages": [{"role": "user", "content": "no reply"}]},
        {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "word " * 200}]}]
    rec = _recipe(tmp_path, rows)
    batches, stats = build_sft_batches(rec, rec.stage("s"), "smollm2", tmp_path)
    d = stats.as_dict()
    assert (d["rows_read"], d["conversations"], d["no_assistant"], d["too_long"], d["skipped"]) == (8, 6, 1, 1, 2)
    assert any("data.jsonl:7" in e for e in d["examples"]) and any("data.jsonl:8" in e for e in d["examples"])
    bad = _recipe(tmp_path, rows[:3] + [{"prompt": "p"}])
    with pytest.raises(ConfigError, match=r"data.jsonl:4: no SFT format"):
        build_sft_batches(bad, bad.stage("s"), "smollm2", tmp_path)


def test_plain_text_rows_train_on_every_token(tmp_path):
    """A row with only ``text`` (pre-training text mixed into SFT) is bos + text + eos without the chat
    template, every token after bos trained; an empty one is skipped and counted; conversations beside
    it keep their assistant-only mask."""
    from mobilellm_r1.posttrain.formats import is_text_row
    from mobilellm_r1.posttrain.sft_data import build_sft_batches

    tok = load_tokenizer("smollm2")
    rows = [_qa(1), {"id": "drill/0", "text": "3 + 4 = 7\n9 - 2 = 7"}, {"text": "  "}]
    rec = _recipe(tmp_path, rows, {"packing": False})
    batches, stats = build_sft_batches(rec, rec.stage("s"), "smollm2", tmp_path)
    d = stats.as_dict()
    assert (d["conversations"], d["no_assistant"]) == (2, 1)
    rows_ = batches.rows
    want = tok.encode("3 + 4 = 7\n9 - 2 = 7", bos=True, eos=True)
    r = next(i for i in range(len(rows_.tokens)) if rows_.tokens[i][: len(want)].tolist() == want)
    assert rows_.mask[r][: len(want)].tolist() == [False] + [True] * (len(want) - 1)
    assert not rows_.mask[r][len(want):].any()
    q = 1 - r  # the conversation: its prompt is not trained
    assert 0 < rows_.mask[q].sum() < rows_.lengths[q] - 1
    assert not is_text_row({"text": "x", "prompt": "y"}) and is_text_row({"text": "x", "id": 3})


def test_packed_training_equals_unpacked(tmp_path):
    """Same model, same conversations, fp32: the loss (and the step it takes) match to 1e-5."""
    from mobilellm_r1.config import model_preset
    from mobilellm_r1.model.transformer import Transformer
    from mobilellm_r1.train.loop import StageModel, make_optimizer

    tok = load_tokenizer("smollm2")
    convs = [(f"x:{i}", row_messages(_qa(i * 37), "x")) for i in range(7)]
    docs = tokenize_conversations(convs, tok, 129, SFTStats())
    packed, unpacked = pack(docs, 129, tok.pad_id, True), pack(docs, 129, tok.pad_id, False)
    assert len(packed.tokens) < len(unpacked.tokens) == 7
    stage = StageConfig(kind="sft", weight_decay=0.0, lr=1e-3)
    torch.manual_seed(0)
    base = Transformer(model_preset("micro", **{k: v for k, v in MICRO.items() if k != "preset"}))

    def run(rows):
        model = StageModel(copy.deepcopy(base), stage)
        opt = make_optimizer(model, stage, torch.device("cpu"))
        losses = []
        for _ in range(2):
            mbs = [micro_batch(rows, np.arange(i, min(i + 2, len(rows.tokens)))) for i in range(0, len(rows.tokens), 2)]
            kept = sum(int((m.targets != IGNORE).sum()) for m in mbs)
            total = 0.0
            for m in mbs:
                out = model(m.inputs, m.targets, m.doc_ids)
                (out[0] / kept).backward()
                total += float(out[0].detach()) / kept
            losses.append(total)
            opt.step()
            opt.zero_grad()
        return losses

    lp, lu = run(packed), run(unpacked)
    assert abs(lp[0] - lu[0]) <= 1e-5 and abs(lp[1] - lu[1]) <= 1e-5
    assert lp[1] < lp[0]


@pytest.mark.slow  # ~30 s idle, 90 s on a loaded 2-core machine
def test_sft_cli_trains_and_reports(tmp_path):
    rec_rows = [_qa(i) for i in range(20)] + [{"messages": [{"role": "user", "content": "hi"}]}]
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rec_rows))
    toml = tmp_path / "r.toml"
    toml.write_text(f"""
[run]
name = "t"
[model]
preset = "micro"
vocab_size = 49152
bos_id = 0
eos_ids = [0, 2]
pad_id = 2
[data]
tokenizer = "smollm2"
[[data.sources]]
name = "d"
paths = ["{f}"]
[stages.sft_x]
kind = "sft"
epochs = 2
seq_len = 64
micro_batch_size = 2
lr = 1e-3
warmup_ratio = 0.1
rope_theta_scale = 8.0
datasets = ["d"]
optional_datasets = ["missing"]
[[data.sources]]
name = "missing"
paths = ["nowhere/x.jsonl"]
""")
    r = subprocess.run([sys.executable, "-m", "mobilellm_r1", "sft", "--config", str(toml), "--out",
                        str(tmp_path / "out" / "sft_x"), "--json"], capture_output=True, text=True, env=_env(),
                       timeout=300)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    d = res["sft_data"]
    assert d["conversations"] == 20 and d["no_assistant"] == 1 and d["missing_optional"] == ["missing"]
    assert res["steps"] == res["steps_total"] == -(-2 * d["rows"] // 2)  # 2 epochs of rows, 2 rows a step
    cfg = json.loads((tmp_path / "out" / "sft_x" / "final" / "config.json").read_text())
    assert cfg["model"]["rope_theta"] == 8 * 1_000_000.0
    r = subprocess.run([sys.executable, "-m", "mobilellm_r1", "chat", str(tmp_path / "out" / "sft_x" / "final"),
                        "--prompt", "What is 3 + 3?", "--max-new-tokens", "12", "--json"],
                       capture_output=True, text=True, env=_env(), timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert 1 <= out["new_tokens"] <= 12 and isinstance(out["reply"], str)
    bad = subprocess.run([sys.executable, "-m", "mobilellm_r1", "sft", "--config", str(toml), "--stage", "nope"],
                         capture_output=True, text=True, env=_env(), timeout=120)
    assert bad.returncode == 2 and "no stage 'nope'" in bad.stderr


def test_chat_one_shot_subprocess(tmp_path):
    from mobilellm_r1.config import model_preset
    from mobilellm_r1.model.io import save_model
    from mobilellm_r1.model.transformer import Transformer

    torch.manual_seed(0)
    save_model(tmp_path / "ck", Transformer(model_preset("micro", **{k: v for k, v in MICRO.items() if k != "preset"})),
               tokenizer_spec="smollm2")
    r = subprocess.run([sys.executable, "-m", "mobilellm_r1", "chat", str(tmp_path / "ck"), "--prompt", "Hello?",
                        "--max-new-tokens", "6", "--json"], capture_output=True, text=True, env=_env(), timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["new_tokens"] == 6 and out["finish_reason"] == "length" and out["prompt_tokens"] > 3
    r = subprocess.run([sys.executable, "-m", "mobilellm_r1", "chat", str(tmp_path / "ck"), "--prompt", "Hi",
                        "--max-new-tokens", "4"], capture_output=True, text=True, env=_env(), timeout=300)
    assert r.returncode == 0 and r.stdout.strip()  # streamed text


def test_group_advantages_and_clipped_loss():
    from mobilellm_r1.posttrain.grpo import group_advantages, grpo_loss

    a = group_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]]))
    assert torch.allclose(a[0], torch.tensor([1.0, -1.0, -1.0, 1.0]), atol=1e-3) and torch.all(a[1] == 0)
    lp = [torch.tensor([0.0, 0.0], requires_grad=True)]
    old = [torch.tensor([-1.0, 0.0])]  # ratio e on token 0: clipped at 1.2 for a positive advantage
    loss, info = grpo_loss(lp, old, torch.tensor([1.0]), clip_eps=0.2)
    assert loss.item() == pytest.approx(-(1.2 + 1.0) / 2) and info["clip_frac"] == 0.5
    loss.backward()
    assert lp[0].grad[0] == 0 and lp[0].grad[1] == pytest.approx(-0.5)
    # token-level normalisation (DAPO): completions of 1 and 3 tokens, each token's term / all 4 tokens
    lp = [torch.zeros(1, requires_grad=True), torch.zeros(3, requires_grad=True)]
    loss, _ = grpo_loss(lp, [x.detach() for x in lp], torch.tensor([1.0, -1.0]), clip_eps=0.2, n_tokens=4)
    assert loss.item() == pytest.approx((-1 + 3) / 4)
    loss, _ = grpo_loss(lp, [x.detach() for x in lp], torch.tensor([1.0, -1.0]), clip_eps=0.2)
    assert loss.item() == pytest.approx(0.0)  # sequence-level: -1/2 + 1/2


def test_grpo_stratify_needs_the_field(tmp_path):
    from mobilellm_r1.config import ConfigError
    from mobilellm_r1.posttrain.grpo import load_prompts
    from mobilellm_r1.tokenizer import load_tokenizer

    rec = _toy_grpo_recipe(tmp_path, "ours", grpo={"stratify": "level"})
    tok = load_tokenizer(rec.data.tokenizer)
    with pytest.raises(ConfigError, match="no field 'level'.*stratify"):
        load_prompts(rec, "grpo", tok, rec.stage("grpo").grpo, tmp_path)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Pick {i}."}], "answer": "7",
                                           "level": 1 + i % 2}) + "\n" for i in range(5)))
    ps = load_prompts(rec, "grpo", tok, rec.stage("grpo").grpo, tmp_path)
    assert ps.strata == ["1", "2", "1", "2", "1"] and ps.stats["strata"] == {"1": 3, "2": 2}


def test_grpo_stratified_prompt_order():
    """``stratify``: every window of a step's size holds each stratum in proportion (give or take one), the
    order is still a permutation, and it differs per epoch; without strata it is the plain permutation."""
    from collections import Counter

    from mobilellm_r1.posttrain.grpo import prompt_order

    strata = ["1"] * 500 + ["2"] * 300 + ["3"] * 200
    for epoch in range(3):
        order = prompt_order(len(strata), np.random.default_rng([0, epoch]), strata)
        assert sorted(order.tolist()) == list(range(1000))
        for w in (8, 10, 64):
            for k in range(0, 1000 - w, w):
                c = Counter(strata[i] for i in order[k:k + w])
                assert all(abs(c[s] - w * n / 1000) <= 1 for s, n in (("1", 500), ("2", 300), ("3", 200))), (w, k, c)
    a, b = (prompt_order(1000, np.random.default_rng([0, e]), strata) for e in (0, 1))
    assert (a != b).any()
    assert prompt_order(7, np.random.default_rng(3)).tolist() == np.random.default_rng(3).permutation(7).tolist()
    # a random draw of 8 would miss stratum "3" entirely in ~17% of steps
    plain = np.random.default_rng(1).permutation(1000)
    assert sum(Counter(strata[i] for i in plain[k:k + 8])["3"] == 0 for k in range(0, 992, 8)) > 10


def test_grpo_dynamic_sampling_drops_agreeing_groups(tmp_path):
    """DAPO dynamic sampling on the toy task (token-level loss on): at a reward of ~0.1 many groups of 8 are
    all 0, near the end many are all 1; those are dropped and more prompts drawn (up to 3 rounds), so some
    steps sample more than once and no step trains on more than ``prompts_per_step`` groups; the reward (over
    every rollout drawn) still rises as in the plain test."""
    from mobilellm_r1.posttrain.grpo import GRPOOptions, train_grpo
    from mobilellm_r1.train.loop import TrainOptions, train_stage

    rec = _toy_grpo_recipe(tmp_path, "ours", grpo={"dynamic_sampling": True, "max_sample_rounds": 3,
                                                   "loss_norm": "token"})
    train_stage(rec, "sft", TrainOptions(out=str(tmp_path / "sft"), progress=False))
    res = train_grpo(rec, "grpo", GRPOOptions(out=str(tmp_path / "grpo"), progress=False))
    steps = [json.loads(x) for x in (tmp_path / "grpo" / "metrics.jsonl").read_text().splitlines()
             if '"reward_mean"' in x]
    assert len(steps) == 30
    assert all(s["groups_trained"] <= 8 and 1 <= s["sample_rounds"] <= 3 for s in steps)
    assert any(s["sample_rounds"] > 1 for s in steps) and any(s["zero_var_groups"] > 0 for s in steps)
    r = res["reward_mean"]
    assert np.mean(r[-5:]) > np.mean(r[:5]) + 0.4, r


def _toy_grpo_recipe(tmp_path, engine, grpo=None):
    """The toy digit task of the fast GRPO test: a 300-id BPE, SFT data answering uniformly, prompts."""
    from mobilellm_r1.tokenizer import train_bpe

    tok = train_bpe([f"Pick a digit. \\boxed{{{i % 10}}} The answer is {i}." for i in range(200)],
                    tmp_path / "bpe", vocab_size=300, name="toy")
    sft = tmp_path / "digits.jsonl"
    sft.write_text("".join(json.dumps({"messages": [{"role": "user", "content": "Pick a digit."},
                                                    {"role": "assistant", "content": f"\\boxed{{{i % 10}}}"}]}) + "\n"
                           for i in range(100)))
    prompts = tmp_path / "prompts.jsonl"
    long_prompt = {"messages": [{"role": "user", "content": "Pick a digit. " * 40}], "answer": "7"}
    prompts.write_text("".join(json.dumps(r) + "\n" for r in (
        {"messages": [{"role": "user", "content": "Pick a digit."}], "answer": "7"}, long_prompt)))
    model = {"preset": "micro", "dim": 64, "n_layers": 2, "ffn_dim": 192, "vocab_size": tok.vocab_size,
             "bos_id": tok.bos_id, "eos_ids": tok.eos_ids, "pad_id": tok.pad_id}
    return recipe_from_dict({
        "run": {"name": "toy", "seed": 0}, "model": model,
        "data": {"tokenizer": str(tmp_path / "bpe"), "sources": [{"name": "digits", "paths": [str(sft)]},
                                                                 {"name": "prompts", "paths": [str(prompts)]}]},
        "stages": {"sft": {"kind": "sft", "steps": 80, "seq_len": 64, "micro_batch_size": 16, "lr": 3e-3,
                           "warmup_steps": 2, "weight_decay": 0.0, "datasets": ["digits"], "system_prompt": "none"},
                   "grpo": {"kind": "grpo", "steps": 30, "seq_len": 64, "lr": 1e-3, "micro_batch_size": 64,
                            "init_from": "sft", "schedule": "constant", "weight_decay": 0.0, "datasets": ["prompts"],
                            "grpo": {"prompts_per_step": 8, "group_size": 8, "max_new_tokens": 10,
                                     "max_prompt_tokens": 32, "engine": engine, **(grpo or {})}}}}, "toy")


@pytest.mark.parametrize("engine", ["ours", "vllm"])
def test_grpo_raises_reward_on_a_toy_task_fast(tmp_path, engine):
    """The default-suite version of the reward-rise check: a 300-id BPE trained here (real HF tokenizers,
    ChatML chat format) keeps the output head tiny, so SFT + 30 GRPO steps take ~15 s on one thread.
    After SFT the model answers \\boxed{d} with d roughly uniform; our math grader against gold 7 gives a
    reward of ~0.1, and GRPO must lift the mean of the last 5 steps well above the first 5 (seeded:
    run seed 0 measured 0.125 -> 0.89; seeds 1 and 2 of the same set-up 0.11 -> 0.93 and 0.13 -> 0.83).
    With ``engine = "vllm"`` (only where the extra is installed) the rollouts come from vLLM, the policy's
    weights pushed into it every step: the reward must rise the same way."""
    from mobilellm_r1.model.vllm_backend import vllm_available
    from mobilellm_r1.posttrain.grpo import GRPOOptions, train_grpo

    if engine == "vllm" and not vllm_available():
        pytest.skip("vLLM is not installed (optional extra)")
    from mobilellm_r1.train.loop import TrainOptions, train_stage

    rec = _toy_grpo_recipe(tmp_path, engine)
    train_stage(rec, "sft", TrainOptions(out=str(tmp_path / "sft"), progress=False))
    res = train_grpo(rec, "grpo", GRPOOptions(out=str(tmp_path / "grpo"), progress=False))
    r = res["reward_mean"]
    assert len(r) == 30 and np.mean(r[:5]) < 0.3 and np.mean(r[-5:]) > np.mean(r[:5]) + 0.4, r
    assert res["prompt_data"] == {"rows": 2, "prompts": 1, "too_long": 1}  # over max_prompt_tokens: counted
    # the final policy on the first three steps' prompts and seeds: the paired measure of what GRPO changed
    assert len(res["reward_replay"]) == 3 and np.mean(res["reward_replay"]) > np.mean(r[:3]) + 0.4, res


def test_grpo_replay_pairs_the_first_steps(tmp_path):
    """``replay_steps``: with lr 0 the final policy is the initial one, so sampling the first steps' prompts
    again with their engine seeds must give exactly the rewards of those steps; an interrupted run keeps the
    steps it has to replay, and its per-step history, in its checkpoint: resumed, it reports the whole run."""
    from mobilellm_r1.posttrain.grpo import GRPOOptions, train_grpo
    from mobilellm_r1.train.loop import TrainOptions, train_stage

    rec = _toy_grpo_recipe(tmp_path, "ours")
    rec.stages["grpo"].lr, rec.stages["grpo"].steps = 0.0, 4
    train_stage(rec, "sft", TrainOptions(out=str(tmp_path / "sft"), progress=False))
    first = train_grpo(rec, "grpo", GRPOOptions(out=str(tmp_path / "g1"), max_steps=2, progress=False))
    assert first["reward_replay"] == first["reward_mean"][:2]  # stopped after 2
    res = train_grpo(rec, "grpo", GRPOOptions(out=str(tmp_path / "g1"), resume=True, progress=False))
    whole = train_grpo(rec, "grpo", GRPOOptions(out=str(tmp_path / "g2"), progress=False))
    assert len(whole["reward_mean"]) == 4 and len(set(whole["reward_mean"])) > 1, whole  # steps differ
    assert whole["reward_replay"] == whole["reward_mean"][:3]
    assert res["reward_replay"] == whole["reward_replay"]
    # the per-step history before the resume comes from the checkpoint: the summary is the uninterrupted run's
    for key in ("reward_mean", "completion_len_mean", "truncated"):
        assert res[key] == whole[key], key


@pytest.mark.slow  # ~60 s idle, 200 s on a loaded 2-core machine; the real 49k-id SmolLM2 tokenizer
def test_grpo_raises_reward_on_a_toy_task(tmp_path):
    """Fixed-digit task: after a short SFT the model answers \\boxed{d} with d roughly uniform; the reward
    (our math grader against gold 7) is ~0.1 and GRPO must raise it."""
    from mobilellm_r1.posttrain.grpo import GRPOOptions, train_grpo
    from mobilellm_r1.train.loop import TrainOptions, train_stage

    sft = tmp_path / "digits.jsonl"
    sft.write_text("".join(json.dumps({"messages": [{"role": "user", "content": "Pick a digit."},
                                                    {"role": "assistant", "content": f"\\boxed{{{i % 10}}}"}]}) + "\n"
                           for i in range(100)))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"messages": [{"role": "user", "content": "Pick a digit."}], "answer": "7"}) + "\n")
    rec = recipe_from_dict({
        "run": {"name": "toy"}, "model": MICRO,
        "data": {"tokenizer": "smollm2", "sources": [{"name": "digits", "paths": [str(sft)]},
                                                     {"name": "prompts", "paths": [str(prompts)]}]},
        "stages": {"sft": {"kind": "sft", "steps": 30, "seq_len": 64, "micro_batch_size": 16, "lr": 3e-3,
                           "warmup_steps": 2, "weight_decay": 0.0, "datasets": ["digits"], "system_prompt": "none"},
                   "grpo": {"kind": "grpo", "steps": 12, "seq_len": 64, "lr": 3e-3, "micro_batch_size": 32,
                            "init_from": "sft", "schedule": "constant", "weight_decay": 0.0, "datasets": ["prompts"],
                            "grpo": {"prompts_per_step": 4, "group_size": 8, "max_new_tokens": 10,
                                     "max_prompt_tokens": 32}}}}, "toy")
    train_stage(rec, "sft", TrainOptions(out=str(tmp_path / "sft"), progress=False))
    res = train_grpo(rec, "grpo", GRPOOptions(out=str(tmp_path / "grpo"), progress=False))
    r = res["reward_mean"]
    assert np.mean(r[:4]) < 0.35 and np.mean(r[-4:]) > np.mean(r[:4]) + 0.25, r
    logged = [json.loads(x) for x in (tmp_path / "grpo" / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in logged if "reward_mean" in x]
    assert len(steps) == 12 and all("completion_len_mean" in x for x in steps)


def test_scorecard_grpo_entry_pairs_the_replay():
    """The scorecard's GRPO entry: first/last three steps as the contract says, and the replayed first k
    steps' mean beside those same k steps' own mean (not the first three's when k differs)."""
    from mobilellm_r1.stages import grpo_card

    r = [0.1, 0.2, 0.3, 0.2, 0.5, 0.4]
    card = grpo_card("grpo", {"reward_mean": r, "truncated": [0.0] * 6, "reward_replay": [0.4, 0.6]})
    assert card["reward_first"] == pytest.approx(0.2) and card["reward_last"] == pytest.approx(1.1 / 3)
    assert card["replay"] == {"steps": 2, "during": pytest.approx(0.15), "final": pytest.approx(0.5)}
    assert card["steps"] == 6
    assert "replay" not in grpo_card("grpo", {"reward_mean": r})  # a stage run before replay_steps existed
    assert grpo_card("grpo", {"reward_mean": []}) is None
