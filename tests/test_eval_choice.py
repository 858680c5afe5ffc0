"""Multiple-choice evaluation by log-likelihood: the scoring primitive against a naive full-logits
computation and against itself unbatched, every task's row mapping on a row in the real Hugging Face field
format (field names as in lm-evaluation-harness's task definitions), bad rows, and an end-to-end run with
SmolLM2-135M-Instruct on very easy questions."""

import json

import pytest
import torch

from mobilellm_r1.config import model_preset
from mobilellm_r1.eval.loglik import (continuation_logprobs, resolve_fewshot, run_choice_eval, score_choices,
                                      split_requests)
from mobilellm_r1.eval.tasks.base import TaskDataError
from mobilellm_r1.eval.tasks.choice import CHOICE_TASKS, Exemplars, hellaswag_clean, load_choice_examples
from mobilellm_r1.model.transformer import Transformer


def _smollm2_or_skip():
    from mobilellm_r1.assets import smollm2_gguf

    try:
        smollm2_gguf(fetch=False)
    except FileNotFoundError:
        pytest.skip("SmolLM2 GGUF asset missing")


@pytest.fixture(scope="module")
def tok():
    _smollm2_or_skip()  # the tokenizer comes from the same GGUF
    from mobilellm_r1.tokenizer import load_tokenizer

    return load_tokenizer("smollm2")


@pytest.fixture(scope="module")
def micro(tok):
    torch.manual_seed(0)
    return Transformer(model_preset("micro", vocab_size=tok.vocab_size)).eval()


REQUESTS = [
    ("Question: What color is the sky?\nAnswer:", " blue"),
    ("Question: What color is the sky?\nAnswer:", " a rather deep shade of green, mostly"),
    ("Hi", " there"),
    ("", "Hello world, this has no context"),
    ("The capital of France is ", "Paris"),  # trailing space moves to the continuation
    ("Q: " + "long context " * 40 + "\nAnswer:", " A"),  # same input as the next: one forward row
    ("Q: " + "long context " * 40 + "\nAnswer:", " B"),
    ("x", ""),
]


def _naive(model, tok, requests, max_len=None):
    """Full logits of each sequence alone, log-softmax everywhere, sum at the continuation positions."""
    out = []
    for ctx, cont in split_requests(tok, requests):
        if not cont:
            out.append((0.0, 0, True))
            continue
        full = (ctx + cont)[-((max_len or model.cfg.max_seq_len) + 1):]
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([full[:-1]])).double(), dim=-1)[0]
        n = len(cont)
        pos = range(len(full) - 1 - n, len(full) - 1)
        total = sum(lp[p, t].item() for p, t in zip(pos, cont))
        greedy = all(lp[p].argmax().item() == t for p, t in zip(pos, cont))
        out.append((total, n, greedy))
    return out


def test_batched_equals_unbatched_and_naive(micro, tok):
    one = continuation_logprobs(micro, tok, REQUESTS, batch_size=1)
    many = continuation_logprobs(micro, tok, REQUESTS, batch_size=16)
    ref = _naive(micro, tok, REQUESTS)
    assert len(one) == len(many) == len(REQUESTS)
    for a, b, r in zip(one, many, ref):
        assert abs(a[0] - b[0]) <= 1e-5 and abs(a[0] - r[0]) <= 1e-5
        assert a[1] == b[1] == r[1] and a[2] == b[2] == r[2]
    assert one[-1] == (0.0, 0, True)
    # the continuation's tokens are its own encoding, whatever the context
    assert one[1][1] == len(tok.encode(REQUESTS[1][1]))
    assert one[4][1] == len(tok.encode(" Paris"))
    moved = continuation_logprobs(micro, tok, [("The capital of France is", " Paris")])[0]
    assert moved[0] == pytest.approx(one[4][0], abs=1e-5)


def test_greedy_flag_and_truncation(micro, tok):
    # a continuation made of the model's own argmax token is greedy
    ctx = "Question: What color is the sky?\nAnswer:"
    ids = [tok.bos_id] + tok.encode(ctx)
    with torch.no_grad():
        top = micro(torch.tensor([ids]))[0, -1].argmax().item()
    cont = tok.decode([top])
    if tok.encode(cont) != [top]:
        pytest.skip("argmax token does not round-trip through decode/encode")
    (lp, n, greedy), = continuation_logprobs(micro, tok, [(ctx, cont)])
    assert n == 1 and greedy
    # left truncation keeps the continuation and the end of the context, like the naive computation
    got = continuation_logprobs(micro, tok, REQUESTS, batch_size=4, max_len=12)
    ref = _naive(micro, tok, REQUESTS, max_len=12)
    for a, r in zip(got, ref):
        assert abs(a[0] - r[0]) <= 1e-5 and a[1:] == r[1:]
    with pytest.raises(ValueError, match="more than max_len"):
        continuation_logprobs(micro, tok, [("a", " b c d e f g h")], max_len=3)


def test_acc_norm_divides_by_characters():
    assert score_choices([-4.0, -6.0], [2, 6]) == (0, 1)  # -2/char vs -1/char
    assert score_choices([-1.0, -1.0], [3, 3]) == (0, 0)  # a tie goes to the first


# ------------------------------------------------------------------------------ tasks: row -> prompt
# One row per task in the Hugging Face datasets' own field format (names and value types as in
# allenai/ai2_arc, super_glue/boolq + google/boolq, piqa, social_i_qa, Rowan/hellaswag, allenai/openbookqa,
# allenai/winogrande, cais/mmlu; checked against lm-evaluation-harness's task yaml / utils files).

ARC_ROW = {"id": "Mercury_7175875", "question": "An astronomer observes that a planet rotates faster after a "
           "meteorite impact. Which is the most likely effect of this increase in rotation?",
           "choices": {"text": ["Planetary density will decrease.", "Planetary years will become longer.",
                                "Planetary days will become shorter.", "Planetary gravity will become stronger."],
                       "label": ["A", "B", "C", "D"]}, "answerKey": "C"}


def test_arc_and_obqa():
    ctx, choices, gold = CHOICE_TASKS["arc_challenge"].build(ARC_ROW)
    assert ctx == f"Question: {ARC_ROW['question']}\nAnswer:" and gold == 2
    assert choices == ARC_ROW["choices"]["text"]
    digits = {**ARC_ROW, "choices": {"text": ["a", "b", "c", "d"], "label": ["1", "2", "3", "4"]}, "answerKey": "4"}
    assert CHOICE_TASKS["arc_easy"].build(digits)[2] == 3
    ctxs, conts, g = CHOICE_TASKS["arc_easy"].item(ARC_ROW)
    assert ctxs == [ctx] * 4 and conts[2] == " Planetary days will become shorter." and g == 2
    obqa = {"id": "7-980", "question_stem": "The sun is responsible for",
            "choices": {"text": ["puppies learning new tricks", "children growing up and getting old",
                                 "flowers wilting in a vase", "plants sprouting, blooming and wilting"],
                        "label": ["A", "B", "C", "D"]}, "answerKey": "D"}
    assert CHOICE_TASKS["obqa"].build(obqa) == ("The sun is responsible for", obqa["choices"]["text"], 3)


def test_boolq_piqa_siqa():
    passage = "Persian language -- Persian, also known by its endonym Farsi, is one of the Western Iranian languages."
    sg = {"question": "do iran and afghanistan speak the same language", "passage": passage, "idx": 0, "label": 1}
    want = (f"{passage}\nQuestion: do iran and afghanistan speak the same language?\nAnswer:", ["no", "yes"], 1)
    assert CHOICE_TASKS["boolq"].build(sg) == want
    google = {"question": sg["question"], "answer": False, "passage": passage}  # google/boolq
    assert CHOICE_TASKS["boolq"].build(google)[2] == 0
    piqa = {"goal": "When boiling butter, when it's ready, you can", "sol1": "Pour it onto a plate",
            "sol2": "Pour it into a jar", "label": 1}
    assert CHOICE_TASKS["piqa"].build(piqa) == ("Question: When boiling butter, when it's ready, you can\nAnswer:",
                                                ["Pour it onto a plate", "Pour it into a jar"], 1)
    siqa = {"context": "Tracy didn't go home that evening and resisted Riley's attacks.",
            "question": "What does Tracy need to do before this?", "answerA": "make a new plan",
            "answerB": "Go home and see Riley", "answerC": "Find somewhere to go", "label": "3"}
    assert CHOICE_TASKS["siqa"].build(siqa) == (
        "Q: Tracy didn't go home that evening and resisted Riley's attacks. What does Tracy need to do before "
        "this?\nA:", ["make a new plan", "Go home and see Riley", "Find somewhere to go"], 2)


def test_hellaswag_preprocessing():
    row = {"ind": 24, "activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
           "ctx": "A man is sitting on a roof. he",
           "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                       "is holding a rubik's cube.", "starts pulling up roofing on a roof."],
           "source_id": "activitynet~v_-JhWjGDPHMY", "split": "val", "split_type": "indomain", "label": "3"}
    assert CHOICE_TASKS["hellaswag"].build(row) == (
        "Roof shingle removal: A man is sitting on a roof. He", row["endings"], 3)
    wiki = {"ind": 4, "activity_label": "Personal Care and Style",
            "ctx_a": "[header] How to increase the length of your eyelashes [title] Apply castor oil.",
            "ctx_b": "[step] Castor Oil is", "endings": ["a natural oil. [substeps] Rub it in.", "b", "c", "d"],
            "label": "0"}
    ctx, choices, gold = CHOICE_TASKS["hellaswag"].build(wiki)
    assert ctx == ("Personal Care and Style: How to increase the length of your eyelashes. Apply castor oil. "
                   "castor oil is")  # capitalize() lower-cases the rest, as the harness does
    assert choices[0] == "a natural oil. Rub it in." and gold == 0
    assert hellaswag_clean("  a [title] b  ") == "a. b"


def test_winogrande_partial_scoring():
    row = {"sentence": "Sarah was a much better surgeon than Maria so _ always got the harder cases.",
           "option1": "Sarah", "option2": "Maria", "answer": "1"}
    ctxs, choices, gold = CHOICE_TASKS["winogrande"].build(row)
    assert ctxs == ["Sarah was a much better surgeon than Maria so Sarah",
                    "Sarah was a much better surgeon than Maria so Maria"]
    assert choices == ["always got the harder cases."] * 2 and gold == 0
    c, conts, _ = CHOICE_TASKS["winogrande"].item(row)
    assert c == ctxs and conts == [" always got the harder cases."] * 2


MMLU_ROWS = [
    {"question": "Find the degree for the given field extension Q(sqrt(2), sqrt(3), sqrt(18)) over Q.",
     "subject": "abstract_algebra", "choices": ["0", "4", "2", "6"], "answer": 1},
    {"question": "Statement 1 | Every element of a group generates a cyclic subgroup of the group. ",
     "subject": "abstract_algebra", "choices": ["True, True", "False, False", "True, False", "False, True"],
     "answer": 2},
    {"question": "What is the embryological origin of the hyoid bone?", "subject": "anatomy",
     "choices": ["The first pharyngeal arch", "The first and second pharyngeal arches",
                 "The second pharyngeal arch", "The second and third pharyngeal arches"], "answer": 3},
]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_mmlu_prompt_and_fewshot(tmp_path):
    t = CHOICE_TASKS["mmlu"]
    ctx, choices, gold = t.build(MMLU_ROWS[0])
    assert ctx == ("Find the degree for the given field extension Q(sqrt(2), sqrt(3), sqrt(18)) over Q.\n"
                   "A. 0\nB. 4\nC. 2\nD. 6\nAnswer:")
    assert choices == ["A", "B", "C", "D"] and gold == 1
    assert t.item(MMLU_ROWS[0])[1] == [" A", " B", " C", " D"]
    test = _jsonl(tmp_path / "test.jsonl", MMLU_ROWS[:1])
    dev = _jsonl(tmp_path / "dev.jsonl", MMLU_ROWS[1:])  # one abstract_algebra exemplar, one anatomy
    ex = load_choice_examples(t, test)[0]
    assert resolve_fewshot(t, test, None, "") == (0, "")  # no dev data: 0-shot
    assert resolve_fewshot(t, test, None, dev) == (5, dev)
    assert resolve_fewshot(t, "hf:cais/mmlu:anatomy@test", None, "") == (5, "hf:cais/mmlu:anatomy@dev")
    with pytest.raises(TaskDataError, match="needs exemplars"):
        resolve_fewshot(CHOICE_TASKS["piqa"], test, 3, "")
    zero = Exemplars(t, "", 0).prefix(ex)
    assert zero == "The following are multiple choice questions (with answers) about abstract algebra.\n\n"
    one = Exemplars(t, dev, 1).prefix(ex)  # the same subject's exemplar only, answered, then a blank line
    assert one == zero + ("Statement 1 | Every element of a group generates a cyclic subgroup of the group.\n"
                          "A. True, True\nB. False, False\nC. True, False\nD. False, True\nAnswer: C\n\n")
    with pytest.raises(TaskDataError, match="1 few-shot rows with subject='abstract_algebra', 5 needed"):
        Exemplars(t, dev, 5).prefix(ex)


# ----------------------------------------------------------------------------------------- bad rows


def test_missing_field_names_file_line_and_field(tmp_path):
    rows = [ARC_ROW, {k: v for k, v in ARC_ROW.items() if k != "answerKey"}]
    path = _jsonl(tmp_path / "arc.jsonl", rows)
    with pytest.raises(TaskDataError, match=r"arc\.jsonl:2: missing field 'answerKey'"):
        load_choice_examples(CHOICE_TASKS["arc_easy"], path)
    with pytest.raises(TaskDataError, match=r"arc\.jsonl:2: missing field 'answerKey'"):
        run_choice_eval("smollm2", "arc_easy", path, out=str(tmp_path / "out"), progress=False)
    bad_key = _jsonl(tmp_path / "bad.jsonl", [{**ARC_ROW, "answerKey": "E"}])
    with pytest.raises(TaskDataError, match=r"bad\.jsonl:1: answerKey 'E' is not one of the choice labels"):
        load_choice_examples(CHOICE_TASKS["arc_easy"], bad_key)
    nolabel = _jsonl(tmp_path / "boolq.jsonl", [{"question": "q", "passage": "p"}])
    with pytest.raises(TaskDataError, match=r"boolq\.jsonl:1: missing field 'label' \(or 'answer'\)"):
        load_choice_examples(CHOICE_TASKS["boolq"], nolabel)
    with pytest.raises(TaskDataError, match="unknown multiple-choice task"):
        run_choice_eval("smollm2", "nope", path)


# ------------------------------------------------------------------------------------ real model

EASY = [
    ("What color is the sky on a clear day?", ["blue", "green", "purple", "black"]),
    ("How many legs does a dog have?", ["four", "two", "six", "ten"]),
    ("Which animal says \"moo\"?", ["a cow", "a cat", "a snake", "a fish"]),
    ("What do bees make?", ["honey", "milk", "glass", "steel"]),
    ("What is frozen water called?", ["ice", "sand", "smoke", "wood"]),
    ("Which season is the coldest?", ["winter", "summer", "spring", "autumn"]),
    ("What do we use to see?", ["eyes", "ears", "feet", "elbows"]),
    ("What is the opposite of hot?", ["cold", "fast", "loud", "tall"]),
    ("Where do fish live?", ["in water", "in trees", "in the desert", "in the sky"]),
    ("What does a thermometer measure?", ["temperature", "weight", "distance", "time"]),
    ("Which planet do people live on?", ["Earth", "Mars", "Jupiter", "Neptune"]),
    ("What gives plants the energy to make food?", ["sunlight", "darkness", "plastic", "noise"]),
]  # the right answer is listed first here; the rows rotate the choices so gold is A, B, C, D in turn


def _easy_rows():
    rows = []
    for i, (q, ch) in enumerate(EASY):
        r = i % 4
        rows.append({"id": f"easy-{i}", "question": q, "choices": {"text": ch[r:] + ch[:r], "label": list("ABCD")},
                     "answerKey": "ABCD"[(-r) % 4]})
    return rows


def test_smollm2_easy_questions_well_above_chance(tmp_path):
    _smollm2_or_skip()
    data = _jsonl(tmp_path / "easy.jsonl", _easy_rows())
    out = tmp_path / "out"
    res = run_choice_eval("smollm2", "arc_easy", data, batch_size=8, out=str(out), device="cpu", progress=False)
    # measured: acc 11/12 = 0.917, acc_norm 0.917 (chance 0.25)
    assert res["n"] == 12 and res["acc"] >= 0.75 and res["acc_norm"] >= 0.6
    assert res["ci95"][0] <= res["acc"] <= res["ci95"][1] and res["samples_per_s"] > 0
    recs = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert [r["id"] for r in recs] == [f"easy-{i}" for i in range(12)]
    for r in recs:
        assert len(r["logprobs"]) == 4 and r["correct"] == (r["pred"] == r["gold"])
        assert r["pred"] == max(range(4), key=lambda j: r["logprobs"][j])
    assert sum(r["correct"] for r in recs) / 12 == res["acc"]
    assert json.loads((out / "summary.json").read_text())["acc"] == res["acc"]
    again = run_choice_eval("smollm2", "arc_easy", data, out=str(out), progress=False)  # all on disk
    assert again["scored"] == 0 and again["acc"] == res["acc"]


def test_repeated_ids_stay_distinct(tmp_path):
    path = _jsonl(tmp_path / "dup.jsonl", [ARC_ROW, ARC_ROW])
    assert [e.id for e in load_choice_examples(CHOICE_TASKS["arc_easy"], path)] == [ARC_ROW["id"], ARC_ROW["id"] + "#1"]


def test_eval_cli_routes_choice_tasks(tmp_path):
    """`mobilellm-r1 eval --task arc_easy` scores by log-likelihood and reports acc / acc_norm."""
    from conftest import run_cli_json
    from mobilellm_r1.assets import smollm2_gguf

    try:
        smollm2_gguf(fetch=False)
    except FileNotFoundError:
        pytest.skip("SmolLM2 GGUF asset missing")
    rows = [{"id": "q1", "question": "What do plants need to make food from sunlight?",
             "choices": {"text": ["sand", "sunlight and water", "plastic", "metal"], "label": ["A", "B", "C", "D"]},
             "answerKey": "B"},
            {"id": "q2", "question": "Which animal is known for barking?",
             "choices": {"text": ["cat", "fish", "dog", "bird"], "label": ["A", "B", "C", "D"]}, "answerKey": "C"}]
    path = tmp_path / "arc.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = run_cli_json("eval", "--model", "smollm2", "--task", "arc_easy", "--data", path, "--out", tmp_path / "o")
    assert res["n"] == 2 and 0.0 <= res["acc"] <= 1.0 and "acc_norm" in res
    assert (tmp_path / "o" / "samples.jsonl").is_file()
