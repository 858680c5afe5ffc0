"""The CUDA paths: bf16 autocast, ``torch.compile``, FSDP2 on NCCL, KV-cache generation on the GPU.

Skipped without a GPU (CI has none); each path has a CPU twin elsewhere (test_train, test_generate).
Run on a GPU machine with ``python -m pytest -q tests/test_cuda.py``.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO, run_cli
from test_train import losses, recipe, shards  # noqa: F401  (shards is a fixture)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def train(path, out, *extra):
    res = run_cli("train", "--config", path, "--out", out, "--json", *extra)
    return json.loads(res.stdout[res.stdout.index("{"):])


def test_bf16_compiled_training_tracks_fp32_on_cpu(shards, tmp_path):  # noqa: F811
    path = recipe(tmp_path, shards, steps=12, seq_len=64, global_batch_tokens=256)
    cpu = train(path, tmp_path / "cpu", "--device", "cpu", "--dtype", "float32")
    gpu = train(path, tmp_path / "gpu", "--device", "cuda", "--dtype", "bfloat16", "--compile")
    assert gpu["steps"] == 12 and gpu["device"].startswith("cuda")
    a, b = losses(tmp_path / "cpu"), losses(tmp_path / "gpu")
    # same data and init: bf16 autocast moves the first loss by well under 1%, and both runs learn
    assert abs(a[0] - b[0]) / a[0] < 0.01
    assert b[-1] < b[0] - 1.0 and abs(a[-1] - b[-1]) / a[-1] < 0.05
    assert cpu["device"] == "cpu"


def test_fsdp_on_nccl_matches_the_plain_gpu_run(shards, tmp_path):  # noqa: F811
    path = recipe(tmp_path, shards, steps=5)
    plain = train(path, tmp_path / "plain", "--device", "cuda", "--dtype", "float32")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                          "-m", "mobilellm_r1", "train", "--config", str(path), "--out", str(tmp_path / "fsdp"),
                          "--device", "cuda", "--dtype", "float32", "--parallel", "fsdp", "--json"],
                         capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads(res.stdout[res.stdout.index("{"):])
    assert summary["steps"] == 5 and plain["steps"] == 5
    assert max(abs(x - y) for x, y in zip(losses(tmp_path / "fsdp"), losses(tmp_path / "plain"))) < 1e-4


def test_compiled_forward_and_gpu_generation_match_eager_cpu():
    from mobilellm_r1.config import model_preset
    from mobilellm_r1.model.generate import generate
    from mobilellm_r1.model.transformer import Transformer

    torch.manual_seed(0)
    cfg = model_preset("micro")
    cpu = Transformer(cfg).eval()
    gpu = Transformer(cfg).eval().cuda()
    gpu.load_state_dict(cpu.state_dict())
    ids = torch.randint(3, cfg.vocab_size, (2, 48))
    with torch.no_grad():
        ref = cpu(ids)
        eager = gpu(ids.cuda())
        compiled = torch.compile(gpu)(ids.cuda())
    for out in (eager, compiled):
        assert float((out.float().cpu() - ref).abs().max()) < 1e-3
    prompt = [ids[0, :16].tolist()]
    a = generate(cpu, prompt, max_new_tokens=24)
    b = generate(gpu, prompt, max_new_tokens=24)
    assert a.token_ids == b.token_ids
