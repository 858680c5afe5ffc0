"""Smoke tests of the benchmark scripts: they run end to end at a tiny size and report what they promise."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO


def test_train_throughput_runs_and_both_sides_start_from_the_same_loss():
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")
    res = subprocess.run([sys.executable, str(REPO / "benchmarks" / "train_throughput.py"), "--steps", "3",
                          "--seq-len", "64", "--micro-batch", "2", "--preset", "micro", "--json"],
                         capture_output=True, text=True, cwd=REPO, timeout=600,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    keys = {"ours_tokens_per_s", "hf_tokens_per_s", "ratio", "ours_mfu", "hf_mfu", "ours_peak_rss_mb",
            "hf_peak_rss_mb", "first_loss_ours", "first_loss_hf", "config"}
    assert keys <= out.keys()
    assert out["ours_tokens_per_s"] > 0 and out["hf_tokens_per_s"] > 0
    assert out["ratio"] == pytest.approx(out["ours_tokens_per_s"] / out["hf_tokens_per_s"], rel=1e-2)
    assert out["ours_peak_rss_mb"] > 0 and out["hf_peak_rss_mb"] > 0 and 0 < out["ours_mfu"] and 0 < out["hf_mfu"]
    # same initial weights, same sequences, same targets: the same loss before any update
    assert abs(out["first_loss_ours"] - out["first_loss_hf"]) < 1e-4
    assert len(out["losses_ours"]) == len(out["losses_hf"]) == 3
    cfg = out["config"]
    assert (cfg["preset"], cfg["seq_len"], cfg["micro_batch"], cfg["steps"]) == ("micro", 64, 2, 3)


@pytest.mark.slow
def test_influence_benchmark_reports_both_ratios_and_fidelity():
    res = subprocess.run([sys.executable, str(REPO / "benchmarks" / "influence.py"), "--preset", "micro", "--seq-len", "32",
                          "--samples", "4", "--batch", "2", "--probes", "2", "--check-proj-dim", "1024",
                          "--naive-proj-params", "65536", "--json"],
                         capture_output=True, text=True, cwd=REPO, timeout=600,
                         env={**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(REPO / "src")})
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout)
    assert {"speedup_vs_naive", "vs_train_step", "spearman_vs_exact", "spearman_projected"} <= out.keys()
    d = out["details"]
    assert out["speedup_vs_naive"] == pytest.approx(d["ours_samples_per_s"] / d["naive_samples_per_s"])
    assert out["vs_train_step"] == pytest.approx(d["ours_samples_per_s"] / d["train_samples_per_s"])
    assert out["spearman_vs_exact"] == pytest.approx(1.0)  # ours exact ranks exactly like the naive loop
    assert d["naive_projection_timed_params"] == 65536 and d["caps"] == 3
    assert d["breakdown_s_per_batch"]["fwd_head"] > 0 and 0 < d["flops"]["head_share_of_forward"] < 1


def test_cpu_precision_benchmark_reports_ratios():
    res = subprocess.run([sys.executable, str(REPO / "benchmarks" / "cpu_precision.py"), "--preset", "micro",
                          "--micro-batch", "2", "--seq-len", "64", "--steps", "2", "--json"],
                         capture_output=True, text=True, cwd=REPO, timeout=600,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout)
    assert set(out["step_s"]) == {"pretrain_fp32", "pretrain_bf16", "sft_fp32", "sft_bf16"}
    assert all(v > 0 for v in out["step_s"].values())
    assert out["bf16_over_fp32"]["sft"] == pytest.approx(out["step_s"]["sft_fp32"] / out["step_s"]["sft_bf16"])
    assert out["fast_dtype_uses_bf16"] == (out["bf16_matmul_speedup"] >= 1.3)


@pytest.mark.parametrize("workload", ["longtail", "samples"])
def test_generate_benchmark_engine_workloads(workload):
    res = subprocess.run([sys.executable, str(REPO / "benchmarks" / "generate.py"), "--workload", workload,
                          "--preset", "micro", "--vocab-size", "512", "--requests", "12", "--slots", "4",
                          "--new-tokens", "48", "--n", "8", "--prompt-tokens", "16", "--stop-share", "0.05",
                          "--repeats", "1", "--json"],
                         capture_output=True, text=True, cwd=REPO, timeout=600,
                         env={**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(REPO / "src")})
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["ratio_vs_static"] > 0 and out["tokens_per_s"] > 0
    assert out["cache_positions"]["engine"] <= out["cache_positions"]["static"]
    if workload == "longtail":
        assert out["identical_greedy_tokens"] is True
        assert out["completion_lengths"]["max"] >= 10 * out["completion_lengths"]["min"]
        assert out["decode_steps"]["engine"] < out["decode_steps"]["static"]  # refilled slots: fewer steps
        assert out["step_ratio"] == pytest.approx(out["decode_steps"]["static"] / out["decode_steps"]["engine"], abs=1e-3)
    else:
        assert out["prefills"] == {"static": 8, "engine": 1}
