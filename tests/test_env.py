"""llmbook.env: device choice, seeding, and doctor's data check."""

import random
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from llmbook.env import DATA_DIR, check_data, data_manifest, get_device, seed_everything, sha256


def test_device_prefers_cuda_then_mps_then_cpu(monkeypatch):
    monkeypatch.delenv("LLMBOOK_DEVICE", raising=False)
    expected = (
        "cuda"
        if torch.cuda.is_available()
        else ("mps" if torch.backends.mps.is_available() else "cpu")
    )
    assert get_device().type == expected
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert get_device().type == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert get_device().type == "cuda"


def test_device_override(monkeypatch):
    monkeypatch.setenv("LLMBOOK_DEVICE", "meta")
    assert get_device().type == "meta"
    assert get_device("cpu").type == "cpu"


def test_a_device_that_is_not_there_is_a_clear_error(monkeypatch):
    from llmbook.errors import UserError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    for name, said in (("cuda", "this machine has no CUDA"), ("cuda:3", "no CUDA"),
                       ("mps", "MPS is not available"), ("gpu", "not a device name")):
        monkeypatch.setenv("LLMBOOK_DEVICE", name)
        with pytest.raises(UserError, match=said):
            get_device()


def _draws(gen):
    return random.random(), float(np.random.rand()), torch.rand(3), torch.rand(3, generator=gen)


def test_seed_everything_reproduces_every_generator():
    a = _draws(seed_everything(123))
    b = _draws(seed_everything(123))
    c = _draws(seed_everything(124))
    assert a[:2] == b[:2] and a[:2] != c[:2]
    assert torch.equal(a[2], b[2]) and torch.equal(a[3], b[3])
    assert not torch.equal(a[2], c[2])


def test_manifest_lists_every_data_file_with_a_checksum():
    manifest = data_manifest()
    assert "gpt2.tiktoken" in manifest
    on_disk = {
        p.name
        for p in DATA_DIR.iterdir()
        if p.is_file() and p.name != "README.md" and not p.name.endswith(".py")
    }
    assert on_disk <= set(manifest), (
        f"data files missing from data/README.md: {on_disk - set(manifest)}"
    )


@pytest.fixture
def data_copy(tmp_path):
    shutil.copy(DATA_DIR / "README.md", tmp_path / "README.md")
    shutil.copy(DATA_DIR / "gpt2.tiktoken", tmp_path / "gpt2.tiktoken")
    return tmp_path


def test_checksums_pass_on_the_committed_data():
    failed = [c for c in check_data() if not c.ok]
    assert not failed, failed


def test_doctor_catches_a_modified_file(data_copy):
    by_name = {c.name: c for c in check_data(data_copy)}
    assert by_name["data/gpt2.tiktoken"].ok
    with open(data_copy / "gpt2.tiktoken", "ab") as f:
        f.write(b"\n")
    bad = {c.name: c for c in check_data(data_copy)}["data/gpt2.tiktoken"]
    assert not bad.ok and "sha256" in bad.detail and "git checkout" in bad.fix
    assert sha256(data_copy / "gpt2.tiktoken") != data_manifest()["gpt2.tiktoken"]


def _doctor(data_dir):
    env = {"LLMBOOK_DATA": str(data_dir), "PATH": "/usr/bin:/bin"}
    return subprocess.run(
        [sys.executable, "-m", "llmbook", "doctor", "--no-compile"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def test_doctor_cli_exits_zero_when_all_is_well():
    r = _doctor(DATA_DIR)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "All set" in r.stdout


def test_doctor_cli_names_a_missing_file_and_the_fix(data_copy):
    (data_copy / "gpt2.tiktoken").unlink()
    r = _doctor(data_copy)
    assert r.returncode == 1
    assert "data/gpt2.tiktoken" in r.stderr and "missing" in r.stderr
    assert "git checkout -- data/gpt2.tiktoken" in r.stdout
    assert "Traceback" not in r.stdout + r.stderr


def test_matmul_flops_agrees_with_a_hand_timing():
    import time

    from llmbook.env import matmul_flops

    a, b = torch.randn(256, 256), torch.randn(256, 256)
    ratios = []
    for _ in range(3):  # a shared machine can stall one of the two timings: three tries
        rate = matmul_flops("cpu", n=256, min_seconds=0.05)
        assert 0 < rate < float("inf")
        best = float("inf")
        for _ in range(20):
            t0 = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t0)
        ratios.append(rate / (2 * 256**3 / best))
        if 0.1 < ratios[-1] < 10:  # the same order of magnitude as the hand timing
            return
    raise AssertionError(f"matmul_flops / hand-timed rate = {ratios}, never within 10x")
