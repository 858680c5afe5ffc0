"""The training loop: exact resume (also after a real kill), 2-rank DDP parity, distillation (online and
cached), held-out loss, and the errors a user can hit. Real text (the Python standard library), the real
SmolLM2 tokenizer, the real model at the ``micro`` preset."""

import json
import math
import os
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, run_cli
from mobilellm_r1.config import load_recipe
from mobilellm_r1.data.shards import TokenizeOptions, tokenize_sources
from mobilellm_r1.train.loop import TrainOptions, train_stage

MODEL = """
[model]
preset = "micro"
vocab_size = 49152
bos_id = 1
eos_ids = [2]
pad_id = 2
"""


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    groups = {"code": sorted(stdlib.glob("[a-k]*.py"))[:30], "mail": sorted(stdlib.glob("email/*.py"))[:12],
              "tiny": sorted(stdlib.glob("json/*.py"))[:3]}
    inputs = {}
    for name, files in groups.items():
        p = root / f"{name}.jsonl"
        cut = 300 if name == "tiny" else None  # ~250 tokens: a full-vocabulary KD cache of it is ~70 MB
        p.write_text("".join(json.dumps({"text": f.read_text()[:cut]}) + "\n" for f in files))
        inputs[name] = [str(p)]
    tokenize_sources(inputs, root / "shards", TokenizeOptions(tokenizer="smollm2", workers=2, progress=False))
    return root / "shards"


def recipe(tmp: Path, shards: Path, stage: str = "", **over) -> Path:
    st = dict(kind="pretrain", steps=6, seq_len=32, micro_batch_size=4, global_batch_tokens=256, lr=3e-3,
              warmup_steps=2, save_every=0, log_every=1, eval_batches=2)
    st.update(over)
    body = "\n".join(f"{k} = {json.dumps(v)}" for k, v in st.items() if not isinstance(v, dict))
    tables = "".join(f"\n[stages.pre.{k}]\n" + "\n".join(f"{a} = {json.dumps(b)}" for a, b in v.items())
                     for k, v in st.items() if isinstance(v, dict))
    text = f"""[run]
name = "t"
seed = 1
{MODEL}
[data]
tokenizer = "smollm2"
shards_dir = "{shards}"
heldout_fraction = 0.05
[[data.sources]]
name = "code"
[[data.sources]]
name = "mail"
[stages.pre]
{body}
[stages.pre.mixture]
code = 0.7
mail = 0.3
{tables}
{stage}"""
    path = tmp / "recipe.toml"
    path.write_text(text)
    return path


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt / "model.safetensors"))


def run(path: Path, out: Path, **kw) -> dict:
    return train_stage(load_recipe(path), "pre", TrainOptions(out=str(out), progress=False, **kw))


def test_resume_is_bit_exact_and_heldout_loss_drops(shards, tmp_path):
    path = recipe(tmp_path, shards, steps=12, save_every=3, eval_every=6)
    straight = run(path, tmp_path / "a")
    assert straight["steps"] == 12 and len(straight["losses"]) == 12
    # a tiny model on real text: the held-out loss falls by more than 1 nat in 12 steps
    assert straight["heldout_loss_final"] < straight["heldout_loss_initial"] - 1.0
    half = run(path, tmp_path / "b", max_steps=6)
    assert half["steps"] == 6 and half["losses"] == straight["losses"][:6]
    rest = run(path, tmp_path / "b", max_steps=12, resume=True)
    assert rest["resumed_from"] == 6 and rest["losses"] == straight["losses"][6:]
    assert losses(tmp_path / "b") == losses(tmp_path / "a")
    wa, wb = weights(tmp_path / "a" / "final"), weights(tmp_path / "b" / "final")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    # keep_checkpoints = 2 (default): older step directories are pruned
    assert sorted(p.name for p in (tmp_path / "a" / "checkpoints").iterdir()) == ["step_00000009", "step_00000012"]
    # the final directory is a model checkpoint the rest of the CLI reads
    res = run_cli("generate", tmp_path / "a" / "final", "--prompt", "def f(x):", "--max-new-tokens", "4", "--json")
    assert len(json.loads(res.stdout)["token_ids"]) == 4


def test_resume_after_a_real_kill(shards, tmp_path):
    path = recipe(tmp_path, shards, steps=10, save_every=1)
    straight = run(path, tmp_path / "a")
    cmd = [sys.executable, "-m", "mobilellm_r1", "train", "--config", str(path), "--out", str(tmp_path / "b"),
           "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    ck = tmp_path / "b" / "checkpoints"
    while time.time() < deadline and proc.poll() is None:
        if ck.is_dir() and any(p.name >= "step_00000003" for p in ck.iterdir()):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait()
    done = [p.name for p in ck.iterdir() if p.name.startswith("step_")]
    assert done, proc.stderr.read().decode()
    res = run_cli("train", "--config", path, "--out", tmp_path / "b", "--resume", "--json")
    assert json.loads(res.stdout)["steps"] == 10
    assert losses(tmp_path / "b") == straight["losses"]
    wa, wb = weights(tmp_path / "a" / "final"), weights(tmp_path / "b" / "final")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_rank_gloo_run_matches_one_process(shards, tmp_path, parallel):
    one = recipe(tmp_path, shards, steps=5, micro_batch_size=4, global_batch_tokens=256)
    single = run(one, tmp_path / "one")
    two_dir = tmp_path / "two"
    two_dir.mkdir()
    two = recipe(two_dir, shards, steps=5, micro_batch_size=2, global_batch_tokens=256)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}

    def torchrun(*extra):
        res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                              "-m", "mobilellm_r1", "train", "--config", str(two), "--out", str(tmp_path / parallel),
                              "--parallel", parallel, "--json", *extra],
                             capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
        return json.loads(res.stdout[res.stdout.index("{"):])

    if parallel == "fsdp":  # sharded state is gathered into the same checkpoint format, and resumes
        first = torchrun("--max-steps", "3")
        assert first["steps"] == 3
        summary = torchrun("--resume")
        assert summary["resumed_from"] == 3
    else:
        summary = torchrun()
    assert summary["world_size"] == 2 and summary["accum"] == 2
    assert max(abs(a - b) for a, b in zip(losses(tmp_path / parallel), single["losses"])) <= 1e-5
    wa, wb = weights(tmp_path / "one" / "final"), weights(tmp_path / parallel / "final")
    assert wa.keys() == wb.keys() and max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-4


def _init_teacher(tmp_path: Path, shards: Path) -> Path:
    """The micro student's own initial weights, saved as a checkpoint to serve as the teacher."""
    path = recipe(tmp_path, shards, steps=1)
    run(path, tmp_path / "init", max_steps=1)
    # the step-0 weights: re-create them exactly as build_student does
    from mobilellm_r1.model.io import save_model
    from mobilellm_r1.model.transformer import Transformer

    torch.manual_seed(1)
    m = Transformer(load_recipe(path).model)
    return save_model(tmp_path / "teacher", m, tokenizer_spec="smollm2")


def test_online_kd_with_the_student_as_teacher_has_zero_kd_loss(shards, tmp_path):
    teacher = _init_teacher(tmp_path, shards)
    path = recipe(tmp_path, shards, steps=2, kd={"teacher": str(teacher), "alpha": 0.5, "temperature": 2.0})
    res = run(path, tmp_path / "kd")
    rows = [json.loads(x) for x in (tmp_path / "kd" / "metrics.jsonl").read_text().splitlines()]
    step1 = next(r for r in rows if r.get("step") == 1 and "kd" in r)
    assert abs(step1["kd"]) < 1e-6 and step1["loss"] == pytest.approx(0.5 * step1["ce"], rel=1e-5)
    step2 = next(r for r in rows if r.get("step") == 2 and "kd" in r)
    assert step2["kd"] > 1e-6  # the student moved away from its frozen initial copy
    assert res["steps"] == 2


def test_full_vocabulary_cache_equals_online_kd(shards, tmp_path):
    teacher = _init_teacher(tmp_path, shards)
    kd = {"teacher": str(teacher), "alpha": 0.6, "temperature": 1.0}
    small = dict(steps=2, micro_batch_size=2, global_batch_tokens=64, seq_len=32)
    # only the small source, so the full-vocabulary cache stays small (tokens x 49,152 x 6 bytes)
    text = recipe(tmp_path, shards, kd=kd, **small).read_text()
    text = text.replace('[[data.sources]]\nname = "mail"', '[[data.sources]]\nname = "mail"\n[[data.sources]]\nname = "tiny"')
    text = text.replace("code = 0.7\nmail = 0.3", "tiny = 1.0")
    on_path = tmp_path / "online.toml"
    on_path.write_text(text)
    online = run(on_path, tmp_path / "online")
    res = run_cli("distill", "cache", "--teacher", teacher, "--shards", shards, "--top-k", "49152", "--seq-len", "32",
                  "--sources", "tiny", "--logp-dtype", "float32", "--out", tmp_path / "cache", "--json")
    meta = json.loads(res.stdout)
    assert meta["top_k"] == 49152 and meta["tokens"] > 0
    cached_text = text.replace('alpha = 0.6', f'alpha = 0.6\ntop_k = 49152\ncache = "{tmp_path / "cache"}"')
    c_path = tmp_path / "cached.toml"
    c_path.write_text(cached_text)
    cached = run(c_path, tmp_path / "cached")
    assert max(abs(a - b) for a, b in zip(online["losses"], cached["losses"])) < 1e-5


def test_user_errors_are_clear_and_lose_nothing(shards, tmp_path):
    path = recipe(tmp_path, shards, steps=2)
    # a teacher with another tokenizer fails before training, naming both
    res = run_cli("model", "init", "--preset", "micro", "--out", tmp_path / "llama_teacher", "--json")
    assert res.returncode == 0
    bad = recipe(tmp_path, shards, steps=2, kd={"teacher": str(tmp_path / "llama_teacher"), "alpha": 1.0})
    r = run_cli("train", "--config", bad, "--out", tmp_path / "x", check=False)
    assert r.returncode == 2 and "llama3" in r.stderr and "smollm2" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "x" / "checkpoints").exists()
    # an unknown stage names the stages that exist
    r = run_cli("train", "--config", path, "--stage", "nope", "--out", tmp_path / "y", check=False)
    assert r.returncode == 2 and "no stage 'nope'; stages: pre" in r.stderr
    # a finished run refuses to be overwritten without --resume
    path = recipe(tmp_path, shards, steps=2)
    run(path, tmp_path / "z")
    r = run_cli("train", "--config", path, "--out", tmp_path / "z", check=False)
    assert r.returncode == 2 and "--resume" in r.stderr
    # a corrupt checkpoint fails on resume with its name, and nothing on disk changes
    step = tmp_path / "z" / "checkpoints" / "step_00000002"
    wfile = step / "model.safetensors"
    wfile.write_bytes(wfile.read_bytes()[:1000])
    before = {p: p.read_bytes() for p in step.iterdir()}
    r = run_cli("train", "--config", path, "--out", tmp_path / "z", "--resume", "--max-steps", "4", check=False)
    assert r.returncode == 2 and "corrupt checkpoint" in r.stderr and "step_00000002" in r.stderr
    assert {p: p.read_bytes() for p in step.iterdir()} == before


def test_fast_dtype_follows_the_measured_cpu(shards, tmp_path):
    """`--dtype fast` is bf16 autocast exactly where this CPU's bf16 matmuls measure >= 1.3x fp32 (AVX-512
    BF16 / AMX hosts), fp32 elsewhere; `auto` stays fp32 on a CPU; either way the stage trains."""
    from mobilellm_r1.train.metrics import FAST_BF16_RATIO, cpu_bf16_speedup, use_bf16_autocast

    cpu = torch.device("cpu")
    assert not use_bf16_autocast("auto", cpu) and not use_bf16_autocast("float32", cpu)
    assert use_bf16_autocast("bfloat16", cpu)
    fast = cpu_bf16_speedup() >= FAST_BF16_RATIO
    assert use_bf16_autocast("fast", cpu) == fast
    with pytest.raises(ValueError, match="unknown training dtype 'half'"):
        use_bf16_autocast("half", cpu)
    res = run(recipe(tmp_path, shards), tmp_path / "a", dtype="fast")
    assert res["autocast"] == ("bfloat16" if fast else None) and all(map(math.isfinite, res["losses"]))
    assert res["losses"][-1] < res["losses"][0]


def test_online_kd_into_a_student_on_the_teachers_cut_vocabulary(tmp_path):
    """A student on ``smollm2:4096`` distils from a full-vocabulary teacher: the teacher reads the same ids
    and its distribution is restricted to the student's ids. A teacher whose first 4096 head rows are the
    student's own initial weights (the other 45k rows random) gives KD = 0 at the first step."""
    from mobilellm_r1.model.io import save_model
    from mobilellm_r1.model.transformer import Transformer

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    src = tmp_path / "code.jsonl"
    src.write_text("".join(json.dumps({"text": f.read_text()}) + "\n" for f in sorted(stdlib.glob("json/*.py"))))
    tokenize_sources({"code": [str(src)]}, tmp_path / "shards",
                     TokenizeOptions(tokenizer="smollm2:4096", workers=1, progress=False))
    text = recipe(tmp_path, tmp_path / "shards", steps=2, micro_batch_size=2, global_batch_tokens=64).read_text()
    text = text.replace('tokenizer = "smollm2"', 'tokenizer = "smollm2:4096"').replace("vocab_size = 49152", "vocab_size = 4096")
    text = text.replace('[[data.sources]]\nname = "mail"\n', "").replace("code = 0.7\nmail = 0.3", "code = 1.0")
    torch.manual_seed(1)
    student = Transformer(load_recipe(_write(tmp_path / "plain.toml", text)).model)
    big = Transformer(load_recipe(_write(tmp_path / "big.toml", text.replace("vocab_size = 4096", "vocab_size = 49152"))).model)
    big.load_state_dict({k: torch.cat([v, big.state_dict()[k][v.shape[0]:]]) if v.shape != big.state_dict()[k].shape
                         else v for k, v in student.state_dict().items()})
    teacher = save_model(tmp_path / "teacher", big, tokenizer_spec="smollm2")
    path = _write(tmp_path / "kd.toml", text.replace("[stages.pre.mixture]", f'[stages.pre.kd]\nteacher = "{teacher}"\n'
                                                     "alpha = 0.5\n[stages.pre.mixture]"))
    run(path, tmp_path / "kd")
    rows = [json.loads(x) for x in (tmp_path / "kd" / "metrics.jsonl").read_text().splitlines()]
    kd = [r["kd"] for r in rows if "kd" in r and r.get("step") in (1, 2)]
    assert abs(kd[0]) < 1e-5 and kd[1] > 1e-6


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
