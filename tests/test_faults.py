"""The faults of a real cluster, injected for real (issue 20): damaged shards, a second writer, preemption,
a full disk, a non-finite loss. Real processes, real files, no mocks. After each: one clear line (or a clean
checkpoint), nothing lost, and a resume that reproduces the uninterrupted run where one applies.

A byte-level BPE of 512 ids trained on the Python standard library keeps the model (``micro``) and its
checkpoints small (~10 MB), so the whole file runs in seconds."""

import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, run_cli
from mobilellm_r1.config import ConfigError, load_recipe
from mobilellm_r1.data.shards import ShardIntegrityError, ShardSet, TokenizeOptions, tokenize_sources, verify_shards
from mobilellm_r1.faults import EXIT_PREEMPTED, NonFiniteError, PreemptionWatch
from mobilellm_r1.runlock import RunLockError, run_lock
from mobilellm_r1.tokenizer import train_bpe
from mobilellm_r1.train.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from mobilellm_r1.train.loop import TrainOptions, train_stage

ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    groups = {"code": sorted(stdlib.glob("json/*.py")) + sorted(stdlib.glob("[a-c]*.py"))[:4],
              "mail": sorted(stdlib.glob("email/*.py"))[:4]}
    inputs, texts = {}, []
    for name, files in groups.items():
        docs = [f.read_text() for f in files]
        texts += docs
        (root / f"{name}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
        inputs[name] = [str(root / f"{name}.jsonl")]
    tok = train_bpe(texts, root / "tok", vocab_size=512, name="toy")
    tokenize_sources(inputs, root / "shards", TokenizeOptions(tokenizer=str(root / "tok"), workers=1, progress=False))
    return {"root": root, "tok": tok, "inputs": inputs}


def recipe(tmp: Path, data: dict, name: str = "recipe", kd: dict | None = None, **over) -> Path:
    st = dict(kind="pretrain", steps=6, seq_len=32, micro_batch_size=4, global_batch_tokens=256, lr=3e-3,
              warmup_steps=2, save_every=1, log_every=1, eval_batches=0)
    st.update(over)
    tok = data["tok"]
    body = "\n".join(f"{k} = {json.dumps(v)}" for k, v in st.items())
    kd_table = ("[stages.pre.kd]\n" + "\n".join(f"{k} = {json.dumps(v)}" for k, v in kd.items())) if kd else ""
    path = tmp / f"{name}.toml"
    path.write_text(f"""[run]
name = "faults"
seed = 1
[model]
preset = "micro"
vocab_size = 512
bos_id = {tok.bos_id}
eos_ids = {json.dumps(tok.eos_ids)}
pad_id = {tok.pad_id}
[data]
tokenizer = "{data['root'] / 'tok'}"
shards_dir = "{data['root'] / 'shards'}"
[[data.sources]]
name = "code"
[[data.sources]]
name = "mail"
[stages.pre]
{body}
[stages.pre.mixture]
code = 0.98
mail = 0.02
{kd_table}
""")
    return path


def train(path: Path, out: Path, **kw) -> dict:
    return train_stage(load_recipe(path), "pre", TrainOptions(out=str(out), progress=False, **kw))


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def one_line(stderr: str) -> str:
    lines = [x for x in stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


# ------------------------------------------------------------------------------------------- shards


def test_damaged_shards_fail_at_open_and_verify_names_them(data, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(data["root"] / "shards", shards)
    index = json.loads((shards / "index.json").read_text())
    assert {"bytes", "checksums"} <= set(index["sources"]["code"]["shards"][0])
    assert verify_shards(shards, progress=False)["ok"]
    code, mail = shards / "code" / "00000.bin", shards / "mail" / "00000.bin"
    code.write_bytes(code.read_bytes()[:1001])  # an odd size: numpy alone said "not a multiple of the data-type size"
    flipped = bytearray(mail.read_bytes())
    flipped[len(flipped) // 2] ^= 0x01  # same size: only the checksum sees it
    mail.write_bytes(bytes(flipped))

    # opening checks sizes at once: one error naming the file, both sizes, and the command that rewrites it
    with pytest.raises(ShardIntegrityError) as e:
        ShardSet(shards)
    msg = str(e.value)
    recorded = index["sources"]["code"]["shards"][0]["bytes"]["tokens"]
    assert str(code) in msg and "1,001 bytes" in msg and f"index.json recorded {recorded:,}" in msg
    assert "mobilellm-r1 data tokenize" in msg and data["inputs"]["code"][0] in msg and str(mail) not in msg
    r = run_cli("data", "sample", "--shards", shards, "--count", "2", "--seq-len", "8", check=False)
    assert r.returncode == 2 and str(code) in one_line(r.stderr)

    # `data verify` (the real CLI) also catches the flipped byte: one line per damaged file, status 1
    r = run_cli("data", "verify", shards, "--json", check=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    lines = [x for x in r.stderr.splitlines() if x.startswith("mobilellm-r1 data verify:")]
    assert len(lines) == 2 and str(code) in lines[0] and str(mail) in lines[1] and "checksum differs" in lines[1]
    out = json.loads(r.stdout)
    assert not out["ok"] and {b["source"] for b in out["bad"]} == {"code", "mail"}

    # the printed remedy works: re-tokenizing the two sources gives intact shards again
    tokenize_sources(data["inputs"], shards, TokenizeOptions(tokenizer=str(data["root"] / "tok"), workers=1,
                                                             progress=False))
    assert verify_shards(shards, progress=False)["ok"] and ShardSet(shards).n_tokens("code") > 0

    # an index written before the new fields still opens (sizes from n_tokens only, no checksums)
    for meta in index["sources"].values():
        for sh in meta["shards"]:
            del sh["bytes"], sh["checksums"]
    (shards / "index.json").write_text(json.dumps(index))
    ShardSet(shards)
    res = verify_shards(shards, progress=False)
    assert res["ok"] and res["unchecked"] == res["files"] and res["checksummed"] == 0
    code.write_bytes(code.read_bytes()[:1000])
    with pytest.raises(ShardIntegrityError, match="1,000 bytes"):
        ShardSet(shards)


# --------------------------------------------------------------------------------------- one writer

HOLDER = r"""
import subprocess, sys
from mobilellm_r1.runlock import run_lock
d = sys.argv[1]
with run_lock(d):
    # a process the holder starts (a stage run as a subprocess) writes the same directory without deadlock
    child = "import sys\nfrom mobilellm_r1.runlock import run_lock\n" \
            "with run_lock(sys.argv[1]), run_lock(sys.argv[1] + '/stage'): print('child ok')"
    r = subprocess.run([sys.executable, "-c", child, d], capture_output=True, text=True)
    print(r.stdout.strip() or r.stderr.strip().splitlines()[-1], flush=True)
    print("held", flush=True)
    sys.stdin.read()
"""
TAKE = "import sys\nfrom mobilellm_r1.runlock import run_lock\nwith run_lock(sys.argv[1]): pass"


def test_second_writer_is_refused_until_the_holder_dies(tmp_path):
    run_dir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=ENV)
    assert holder.stdout.readline().strip() == "child ok"
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(RunLockError, match=f"pid {holder.pid} on .*-c"):
        with run_lock(run_dir):
            pass
    with pytest.raises(RunLockError, match=f"{run_dir} is being written by another process \\(pid {holder.pid}"):
        with run_lock(run_dir / "pretrain"):  # a stage folder inside a run directory someone else writes
            pass
    holder.kill()  # SIGKILL: no cleanup runs, the kernel drops the lock
    holder.wait()
    with run_lock(run_dir), run_lock(run_dir), run_lock(run_dir / "pretrain"):  # re-entrant in a process
        r = subprocess.run([sys.executable, "-c", TAKE, str(run_dir)], capture_output=True, text=True, env=ENV)
        assert r.returncode != 0 and f"pid {os.getpid()}" in r.stderr
    r = subprocess.run([sys.executable, "-c", TAKE, str(run_dir)], capture_output=True, text=True, env=ENV)
    assert r.returncode == 0, r.stderr  # released when the outermost holder left


# ---------------------------------------------------------------------------------------- preemption


def test_sigterm_checkpoints_and_resume_is_bit_exact(data, tmp_path):
    path = recipe(tmp_path, data, steps=60, save_every=0)
    straight = train(path, tmp_path / "a")
    out = tmp_path / "b"
    proc = subprocess.Popen([sys.executable, "-m", "mobilellm_r1", "train", "--config", str(path), "--out", str(out),
                             "--quiet"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (out / "metrics.jsonl").is_file() and len((out / "metrics.jsonl").read_text().splitlines()) >= 3:
            break
        time.sleep(0.02)
    # a second writer is refused while it trains, naming its pid
    with pytest.raises(RunLockError, match=f"pid {proc.pid}"):
        train(path, out, resume=True)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, err
    step = int(re.search(r"stopped by SIGTERM after step (\d+)", one_line(err)).group(1))
    assert 3 <= step < 60 and [s for s, _ in list_checkpoints(out)] == [step]
    assert metrics(out)[-1]["step"] == step  # the step it was in was finished, then checkpointed
    rest = train(path, out, resume=True)
    assert rest["resumed_from"] == step and rest["steps"] == 60
    assert [r["loss"] for r in metrics(out) if "loss" in r] == straight["losses"]
    assert same_weights(tmp_path / "a" / "final", out / "final")


def test_preemption_watch_catches_sigusr1_and_restores_the_handler():
    before = signal.getsignal(signal.SIGUSR1)
    with PreemptionWatch() as watch:
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.01)
        assert watch.signame == "SIGUSR1"
    assert signal.getsignal(signal.SIGUSR1) is before


# ----------------------------------------------------------------------------------------- disk full


def _file_size_limit(limit: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails with EFBIG instead of killing
    return apply


WRITE = """import sys
from mobilellm_r1.atomic import write_bytes
from mobilellm_r1.faults import DiskFullError
try:
    write_bytes(sys.argv[1], b"x" * 2_000_000)
except DiskFullError as e:
    print(e)
    sys.exit(3)
"""


def test_full_disk_keeps_the_previous_checkpoint_and_says_how_much_was_needed(data, tmp_path):
    path = recipe(tmp_path, data, steps=4)
    train(path, tmp_path / "a")
    out = tmp_path / "b"
    train(path, out, max_steps=2)
    ck2 = out / "checkpoints" / "step_00000002"
    size = sum(p.stat().st_size for p in ck2.iterdir())
    r = subprocess.run([sys.executable, "-m", "mobilellm_r1", "train", "--config", str(path), "--out", str(out),
                        "--resume", "--quiet"], capture_output=True, text=True, env=ENV,
                       preexec_fn=_file_size_limit(1 << 20))  # 1 MB per file: the weights file does not fit
    line = one_line(r.stderr)
    assert r.returncode == 2 and "checkpoint step 3" in line and "File too large" in line
    needed = int(re.search(r"needs about ([\d,]+) bytes", line).group(1).replace(",", ""))
    assert 0.9 < needed / size < 1.1, (needed, size)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000001", "step_00000002"]  # no temp
    assert load_checkpoint(ck2)["state"]["step"] == 2
    rest = train(path, out, resume=True)  # room again: nothing was lost
    assert rest["resumed_from"] == 2 and same_weights(tmp_path / "a" / "final", out / "final")

    # a manifest (any atomic write): the old file stays, the temporary one goes, the size is named
    target = tmp_path / "m" / "stage.json"
    target.parent.mkdir()
    target.write_text("old\n")
    r = subprocess.run([sys.executable, "-c", WRITE, str(target)], capture_output=True, text=True, env=ENV,
                       preexec_fn=_file_size_limit(1 << 20))
    assert r.returncode == 3 and "needs about 2,000,000 bytes" in r.stdout and str(target.parent) in r.stdout
    assert target.read_text() == "old\n" and [p.name for p in target.parent.iterdir()] == ["stage.json"]


# ------------------------------------------------------------------------------------ non-finite loss


def poisoned_cache(data: dict, tmp: Path) -> Path:
    """A top-k distillation cache (k = 1) whose "mail" rows are NaN: a poisoned batch, through the recipe."""
    shards = ShardSet(data["root"] / "shards")
    cache = tmp / "kd"
    for src in shards.sources:
        n = shards.n_tokens(src)
        (cache / src).mkdir(parents=True)
        np.save(cache / src / "ids.npy", np.zeros((n, 1), np.int32))
        np.save(cache / src / "logp.npy", np.full((n, 1), np.nan if src == "mail" else 0.0, np.float32))
    (cache / "meta.json").write_text(json.dumps({"seq_len": 32, "doc_mask": False,
                                                 "tokenizer": shards.index["tokenizer"], "top_k": 1}))
    return cache


def test_nonfinite_loss_stops_naming_step_and_source_and_resume_uses_the_last_good_checkpoint(data, tmp_path):
    kd = {"alpha": 0.5, "top_k": 1, "cache": str(poisoned_cache(data, tmp_path))}
    out = tmp_path / "run"
    with pytest.raises(NonFiniteError) as e:
        train(recipe(tmp_path, data, steps=12, kd=kd), out)
    msg = str(e.value)
    step = int(re.match(r"step (\d+): loss .* gradient norm nan is not finite", msg).group(1))
    assert "mail x" in msg and re.search(r"mail@\d+", msg) and f"step_{step - 1:08d}" in msg
    good = list_checkpoints(out)
    assert good and good[-1][0] == step - 1  # nothing of the failed step was saved
    assert all(bool(torch.isfinite(w).all()) for w in weights(good[-1][1]).values())

    # skip mode: --resume starts from that last good checkpoint, drops the poisoned steps and counts them
    skip = recipe(tmp_path, data, name="skip", steps=12, kd=kd, nonfinite="skip", nonfinite_max_skips=12)
    res = train(skip, out, resume=True)
    assert res["resumed_from"] == step - 1 and res["steps"] == 12
    rows = [r for r in metrics(out) if "loss" in r]
    skipped = [r["step"] for r in rows if r["grad_norm"] != r["grad_norm"]]  # NaN
    assert skipped[0] == step and 0 < len(skipped) < 12 - step + 1
    assert rows[-1]["nonfinite_skips"] == len(skipped)
    assert json.loads((out / "final" / "trainer_state.json").read_text())["nonfinite_skips"] == len(skipped)
    assert all(bool(torch.isfinite(w).all()) for w in weights(out / "final").values())

    # past nonfinite_max_skips the stage stops as well
    few = recipe(tmp_path, data, name="few", steps=12, kd=kd, nonfinite="skip", nonfinite_max_skips=1)
    with pytest.raises(NonFiniteError, match="1 steps were skipped already"):
        train(few, tmp_path / "few")


def test_nonfinite_policy_is_checked_and_nan_weights_are_never_saved(data, tmp_path):
    with pytest.raises(ConfigError, match="nonfinite = 'ignore' is not one of"):
        load_recipe(recipe(tmp_path, data, nonfinite="ignore"))
    model = {"w": torch.tensor([1.0, float("nan")])}
    cfg = load_recipe(recipe(tmp_path, data)).model
    with pytest.raises(NonFiniteError, match="step 7: the weights are not finite"):
        save_checkpoint(tmp_path / "out", 7, model_state=model, cfg=cfg, tokenizer="t", optim_state={},
                        rng_states=[], trainer_state={}, keep=2)
    assert list_checkpoints(tmp_path / "out") == [] and not (tmp_path / "out").exists()
