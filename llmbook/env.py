"""The machine the course runs on: device choice, seeding, and a health check (`llmbook doctor`)."""

from __future__ import annotations

import hashlib
import os
import platform
import random
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = Path(os.environ.get("LLMBOOK_DATA", REPO_ROOT / "data"))
CHAPTERS_DIR = REPO_ROOT / "chapters"


def get_device(prefer: str | None = None) -> torch.device:
    """CUDA if present, then Apple's MPS, then the CPU; `prefer` (or LLMBOOK_DEVICE) overrides."""
    prefer = prefer or os.environ.get("LLMBOOK_DEVICE")
    if prefer:
        return _present(prefer)
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available() and mps.is_built():
        return torch.device("mps")
    return torch.device("cpu")


def _present(name: str) -> torch.device:
    """`name` as a torch.device, if this machine has it (a UserError saying what it has, if not)."""
    from .errors import UserError

    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"{name!r} is not a device name; use 'cpu', 'cuda', 'cuda:1' or 'mps' "
                        "(check LLMBOOK_DEVICE and the config's [train] device)") from None
    if device.type == "cuda" and not (torch.cuda.is_available()
                                      and (device.index or 0) < torch.cuda.device_count()):
        found = (f"{torch.cuda.device_count()} CUDA device(s)" if torch.cuda.is_available()
                 else "no CUDA" + ("" if torch.version.cuda else " (a CPU-only torch build)"))
        raise UserError(f"device {name!r} was asked for, but this machine has {found}; unset "
                        "LLMBOOK_DEVICE or use 'auto'/'cpu'")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None)
                                     and torch.backends.mps.is_available()):
        raise UserError(f"device {name!r} was asked for, but MPS is not available here; unset "
                        "LLMBOOK_DEVICE or use 'auto'/'cpu'")
    return device


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch (all devices); returns a CPU generator seeded the same way."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def matmul_flops(device: torch.device | str = "cpu", n: int = 1024, min_seconds: float = 0.5,
                 threads: int | None = None) -> float:
    """Float32 FLOP/s of an n x n matmul on `device`, the fastest of repeats, with `threads` CPU
    threads (default: as many as torch uses, `torch.get_num_threads()`).

    The one measure of "how fast is this machine" that chapters divide FLOP counts by: other
    programs can only add time, so the fastest repeat is the best estimate of the hardware.
    """
    from torch.utils import benchmark

    device = torch.device(device)
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    out = torch.empty_like(a)
    timer = benchmark.Timer("torch.mm(a, b, out=out)", globals={"torch": torch, "a": a, "b": b,
                                                                 "out": out},
                            num_threads=threads or torch.get_num_threads())  # its default is 1
    seconds = min(timer.blocked_autorange(min_run_time=min_seconds).times)  # synchronizes CUDA
    return 2 * n**3 / seconds


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


_ROW = re.compile(r"^\|\s*`([^`]+)`\s*\|.*\|\s*`?([0-9a-f]{64})`?\s*\|\s*$")


def data_manifest(data_dir: Path | None = None) -> dict[str, str]:
    """File name -> sha256, from the table in data/README.md (the one place they are written)."""
    readme = Path(data_dir or DATA_DIR) / "README.md"
    if not readme.exists():
        return {}
    rows = (_ROW.match(line) for line in readme.read_text(encoding="utf-8").splitlines())
    return {m.group(1): m.group(2) for m in rows if m}


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    fatal: bool = True  # a failed fatal check makes `llmbook doctor` exit non-zero


def check_data(data_dir: Path | None = None) -> list[Check]:
    """One check per file listed in data/README.md: present and matching its sha256."""
    data_dir = Path(data_dir or DATA_DIR)
    manifest = data_manifest(data_dir)
    if not manifest:
        return [
            Check(
                "data/README.md",
                False,
                f"no file table in {data_dir / 'README.md'}",
                "restore data/README.md from git: `git checkout -- data/README.md`",
            )
        ]
    checks = []
    for name, digest in manifest.items():
        path = data_dir / name
        if not path.exists():
            checks.append(
                Check(
                    f"data/{name}",
                    False,
                    "missing",
                    f"restore it with `git checkout -- data/{name}` (see data/README.md "
                    "for the script that makes it)",
                )
            )
        elif (actual := sha256(path)) != digest:
            checks.append(
                Check(
                    f"data/{name}",
                    False,
                    f"sha256 {actual[:12]}... != {digest[:12]}...",
                    f"data/{name} was modified or is corrupt: `git checkout -- data/{name}`",
                )
            )
        else:
            checks.append(Check(f"data/{name}", True, f"sha256 ok ({path.stat().st_size:,} bytes)"))
    return checks


def _compile_works(timeout: float = 180.0) -> tuple[bool, str]:
    """Compile a tiny function in a fresh interpreter (torch.compile needs a C compiler on CPU)."""
    code = (
        "import torch\nf = torch.compile(lambda x: torch.sin(x) * 2)\n"
        "x = torch.randn(8)\nassert torch.allclose(f(x), torch.sin(x) * 2)\n"
    )
    try:
        r = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return False, f"timed out after {timeout:.0f}s"
    if r.returncode == 0:
        return True, "a compiled function ran and matched eager mode"
    last = (r.stderr.strip().splitlines() or ["unknown error"])[-1]
    return False, last[:160]


def _kernel_python() -> str | None:
    """The interpreter Jupyter's default 'python3' kernel starts, if Jupyter is installed."""
    try:
        from jupyter_client.kernelspec import KernelSpecManager

        spec = KernelSpecManager().get_kernel_spec("python3")
    except Exception:
        return None
    exe = spec.argv[0]
    return sys.executable if exe in ("python", "python3", "{python}") else exe


def doctor(check_compile: bool = True, data_dir: Path | None = None) -> list[Check]:
    """Everything the course needs from this machine, as a list of checks."""
    checks = [
        Check(
            "python",
            sys.version_info >= (3, 10),
            platform.python_version(),
            "install Python 3.10 or newer (the course is tested on 3.11)",
        ),
        Check(
            "torch",
            tuple(int(p) for p in re.findall(r"\d+", torch.__version__)[:2]) >= (2, 4),
            torch.__version__,
            "pip install 'torch>=2.4' (the course is tested with 2.13)",
        ),
    ]
    device = get_device()
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(0)
        checks.append(
            Check(
                "device",
                True,
                f"cuda: {props.name}, {props.total_memory / 2**30:.1f} GiB,"
                f" CUDA {torch.version.cuda}",
            )
        )
        checks.append(
            Check(
                "bf16",
                torch.cuda.is_bf16_supported(),
                "supported" if torch.cuda.is_bf16_supported() else "not supported",
                "use float16 autocast with a GradScaler instead",
                fatal=False,
            )
        )
    else:
        cuda = torch.version.cuda
        checks.append(
            Check(
                "device",
                True,
                f"{device.type} ({os.cpu_count()} cores)"
                + ("" if cuda else "; this torch build has no CUDA"),
            )
        )
        checks.append(
            Check(
                "bf16",
                False,
                f"no fast bf16 on {device.type}; the course uses float32",
                "nothing to fix: chapters keep float32 on CPU",
                fatal=False,
            )
        )
    if check_compile:
        ok, detail = _compile_works()
        checks.append(
            Check(
                "torch.compile",
                ok,
                detail,
                "install a C compiler (gcc) or run chapters with COMPILE=False",
                fatal=False,
            )
        )
    kernel = _kernel_python()
    if kernel is None:
        checks.append(
            Check(
                "jupyter kernel",
                False,
                "Jupyter is not installed",
                "pip install -e '.[dev]' (installs jupyterlab and ipykernel)",
                fatal=False,
            )
        )
    else:
        same = Path(os.path.abspath(kernel)).parent == Path(os.path.abspath(sys.executable)).parent
        checks.append(
            Check(
                "jupyter kernel",
                same,
                kernel,
                f"{sys.executable} -m ipykernel install --user --name python3",
                fatal=False,
            )
        )
    checks.extend(check_data(data_dir))
    return checks
