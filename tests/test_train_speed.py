"""benchmarks/train_speed.py: the CPU comparison runs end to end on a tiny model and writes its
JSON; --gpu without CUDA is one line and exit 2; the GPU ladder turns on one switch per rung."""

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from llmbook.env import REPO_ROOT

SCRIPT = REPO_ROOT / "benchmarks" / "train_speed.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}


def load_script():
    spec = importlib.util.spec_from_file_location("train_speed", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *argv], env=ENV, capture_output=True,
                          text=True, timeout=120, stdin=subprocess.DEVNULL)


def test_cpu_quick_run_writes_positive_numbers(tmp_path):
    out = tmp_path / "speed.json"
    r = run("--cpu", "--quick", "--repeats", "2", "--out", str(out))
    assert r.returncode == 0, r.stderr
    report = json.loads(out.read_text())
    for key in ("date", "torch", "transformers", "hardware", "config", "batch",
                "matmul_flops_per_s", "flops_per_token"):
        assert key in report, key
    assert report["hardware"]["cpu"] and report["hardware"]["cpu_count"] >= 1
    assert report["matmul_flops_per_s"] > 0
    assert set(report["rungs"]) == {"llmbook", "transformers"}
    for rung in report["rungs"].values():
        assert len(rung["times_s"]) == 2 and min(rung["times_s"]) == rung["step_s"] > 0
        tokens = report["batch"] * report["config"]["block_size"]
        assert rung["tokens_per_s"] == pytest.approx(tokens / rung["step_s"])
        assert 0 < rung["fraction_of_matmul"]
    ratio = report["ratios"]["llmbook / transformers"]
    assert ratio["best"] > 0 and len(ratio["pairs"]) == 2 and all(p > 0 for p in ratio["pairs"])
    assert "llmbook / transformers" in r.stdout and "target" in r.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_gpu_without_cuda_is_one_line_and_exit_2(tmp_path):
    r = run("--gpu", "--quick", "--out", str(tmp_path / "gpu.json"))
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and "CUDA" in r.stderr, r.stderr
    assert not (tmp_path / "gpu.json").exists()


def test_ladder_turns_on_one_switch_per_rung():
    ts = load_script()
    rungs = ts.ladder(batches=(32, 16))
    switches = [f.name for f in dataclasses.fields(ts.Rung) if f.name != "name"]
    for before, after in zip(rungs, rungs[1:], strict=False):
        changed = [s for s in switches if getattr(before, s) != getattr(after, s)]
        assert len(changed) == 1, (before, after)
    assert [r.batch for r in rungs[-2:]] == [32, 16]
    assert rungs[-1].compile and rungs[-1].fused_adamw and rungs[-1].precision == "bf16"


def test_gpu_peaks_tell_the_pcie_h100_from_the_sxm():
    ts = load_script()
    assert ts.gpu_peaks("NVIDIA H100 PCIe")["bf16"] < ts.gpu_peaks("NVIDIA H100 80GB HBM3")["bf16"]
    assert ts.gpu_peaks("NVIDIA H200")["bf16"] == pytest.approx(989.4)
    assert ts.gpu_peaks("NVIDIA GeForce GTX 1080") is None
