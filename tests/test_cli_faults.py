"""`llmbook` under bad input and faults, run as a real command: a user error is one line
`llmbook <command>: <message>` and exit 2 (no traceback, no run lost), Ctrl-C is 130, a diverged
run 3, and a killed or interrupted run resumes."""

import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import NamedTuple

import pytest
import torch
from safetensors.torch import save_file

from llmbook.checkpoint import load_checkpoint
from llmbook.config import TrainConfig
from llmbook.env import REPO_ROOT
from llmbook.pretrained import export_checkpoint
from llmbook.train import train

POEM = "白日依山尽，黄河入海流。\n欲穷千里目，更上一层楼。\n\n"
OTHER_POEM = "春眠不觉晓，处处闻啼鸟。\n夜来风雨声，花落知多少。\n\n"  # another vocabulary
BINARY = bytes(range(256)) * 100
MODEL = {"block_size": 16, "n_layer": 1, "n_head": 2, "n_embd": 32}
TRAIN = {"max_steps": 30, "batch_size": 8, "lr": 1e-2, "min_lr": 1e-3, "warmup_steps": 3,
         "eval_every": 30, "eval_batches": 2, "checkpoint_every": 30, "log_every": 10,
         "device": "cpu"}
LONG = {"max_steps": 400, "checkpoint_every": 25, "eval_every": 400, "log_every": 25}  # seconds
TIMEOUT = 120  # seconds for any one command (the machine may be busy)
ENV = {**{k: v for k, v in os.environ.items() if k not in ("LLMBOOK_DEVICE", "LLMBOOK_DEBUG")},
       "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT), "PYTHONIOENCODING": "utf-8"}
BAR = re.compile(r"^train:\s+\d+%\|")  # a tqdm progress-bar fragment on stderr
GUARDED = ("ckpt.pt", "metrics.jsonl")  # a case must leave these bytes as they were


# ----------------------------------------------------------------------------- helpers

def write_config(folder: Path, text: str | bytes = POEM * 60, name: str = "tiny.toml",
                 model: dict | None = None, **train_settings) -> Path:
    """A tiny model's TOML config, with its text file beside it."""
    corpus = folder / f"{Path(name).stem}.txt"
    if isinstance(text, bytes):
        corpus.write_bytes(text)
    else:
        corpus.write_text(text, encoding="utf-8")
    tables = {"model": {**MODEL, **(model or {})}, "data": {"text_file": corpus.name},
              "train": {**TRAIN, **train_settings}}
    lines = []
    for table, values in tables.items():  # JSON scalars are TOML scalars
        lines += [f"[{table}]", *(f"{k} = {json.dumps(v)}" for k, v in values.items()), ""]
    path = folder / name
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def llmbook(argv: list, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmbook", *map(str, argv)], cwd=cwd,
                          env={**ENV, **(env or {})}, stdin=subprocess.DEVNULL,
                          capture_output=True, encoding="utf-8", errors="replace",
                          timeout=TIMEOUT)


def start(argv: list, folder: Path) -> subprocess.Popen:
    """A command in the background, its output in files (a full pipe would stall it)."""
    with open(folder / "stdout.txt", "wb") as out, open(folder / "stderr.txt", "wb") as err:
        return subprocess.Popen([sys.executable, "-m", "llmbook", *map(str, argv)], cwd=folder,
                                env=ENV, stdin=subprocess.DEVNULL, stdout=out, stderr=err)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the run ended (status {proc.returncode}) before {path}"
        assert time.monotonic() < deadline, f"no {path} after {timeout} s"
        time.sleep(0.01)


def one_message(stderr: str) -> str:
    """The one line a failing command wrote on stderr, tqdm's bar fragments aside."""
    assert "Traceback" not in stderr, stderr
    lines = [s.strip() for s in re.split(r"[\r\n]", stderr) if s.strip()]
    lines = [s for s in lines if not BAR.match(s)]
    assert len(lines) == 1, f"expected one line on stderr, got {lines}"
    return lines[0]


def digests(folder: Path) -> dict[str, str]:
    """sha256 of every guarded run file under `folder`."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.name in GUARDED}


def assert_whole_log(metrics: Path, last_step: int) -> None:
    """One row per logged step, in order, none twice, up to `last_step`."""
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines() if line]
    assert steps == sorted(set(steps)) and steps[-1] == last_step, steps


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """One tiny trained run (30 steps) and its exported model, shared by every case."""
    folder = tmp_path_factory.mktemp("tiny")
    config = write_config(folder)
    train(TrainConfig.from_toml(config), folder / "run", progress=False)
    model = export_checkpoint(folder / "run" / "ckpt.pt", folder / "tiny.safetensors")
    return SimpleNamespace(config=config, run=folder / "run", ckpt=folder / "run" / "ckpt.pt",
                           model=model)


# ----------------------------------------------------------------------------- the table

class Ctx:
    """What a case's setup gets: its own folder, and the shared tiny run and model."""

    def __init__(self, folder: Path, tiny: SimpleNamespace):
        self.dir, self.tiny = folder, tiny

    def file(self, name: str, content: str | bytes) -> Path:
        path = self.dir / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
        return path

    def run(self) -> Path:
        """A copy of the tiny run (ckpt.pt, metrics.jsonl, loss.png) in this case's folder."""
        return Path(shutil.copytree(self.tiny.run, self.dir / "run"))

    def config(self, text: str | bytes = POEM * 60, **settings) -> Path:
        return write_config(self.dir, text, **settings)


def gen(*extra: str, prompt: str = "白日") -> Callable[[Ctx], list]:
    """`llmbook generate` on the tiny model with these extra arguments."""
    return lambda c: ["generate", "--checkpoint", c.tiny.model, "--prompt", prompt, *extra]


def gen_file(make: Callable[[Ctx], Path]) -> Callable[[Ctx], list]:
    """`llmbook generate` on the model file that `make` writes."""
    return lambda c: ["generate", "--checkpoint", make(c), "--prompt", "白日"]


def cut_model(c: Ctx) -> Path:
    """The exported model cut in the middle of its tensor data."""
    data = c.tiny.model.read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    return c.file("truncated.safetensors", data[:(header_end + len(data)) // 2])


def flip_model_byte(c: Ctx) -> Path:
    data = bytearray(c.tiny.model.read_bytes())
    data[8 + int.from_bytes(data[:8], "little") + 100] ^= 0xFF  # inside the tensor data
    return c.file("flipped.safetensors", bytes(data))


def plain_safetensors(c: Ctx) -> Path:
    save_file({"weight": torch.zeros(4, 4)}, str(c.dir / "plain.safetensors"))
    return c.dir / "plain.safetensors"


def flip_checkpoint_byte(c: Ctx) -> Path:
    data = bytearray(c.tiny.ckpt.read_bytes())
    state = torch.load(c.tiny.ckpt, weights_only=True)
    at = data.find(state["model"]["transformer.wte.weight"].numpy().tobytes()[:64])
    assert at > 0, "the embedding's bytes are not stored as they are"
    data[at + 10] ^= 0xFF
    return c.file("flipped.pt", bytes(data))


class _CallsCode:
    def __reduce__(self):
        return (os.getcwd, ())  # harmless, but a call: weights_only must refuse it


def code_checkpoint(c: Ctx) -> Path:
    torch.save({"model": _CallsCode(), "sha256": ""}, c.dir / "calls-code.pt")
    return c.dir / "calls-code.pt"


def damage_log(c: Ctx) -> list:
    run = c.run()
    metrics = run / "metrics.jsonl"
    metrics.write_text("not json\n" + metrics.read_text(), encoding="utf-8")
    return ["train", c.tiny.config, "--out", run, "--resume", run / "ckpt.pt"]


class Case(NamedTuple):
    id: str
    argv: list | Callable[[Ctx], list]  # a list, or a setup that writes files and returns one
    env: dict
    status: int
    pattern: str  # re.match-ed against the one line on stderr


NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
CASES = [
    # ---- model files
    Case("model_file_is_text", gen_file(lambda c: c.file("model.safetensors", "just text\n")),
         {}, 2, r"llmbook generate: \S*model\.safetensors is not a safetensors model file, "
         r"or it is truncated"),
    Case("model_file_truncated", gen_file(cut_model), {}, 2,
         r"llmbook generate: \S*truncated\.safetensors is not a safetensors model file, or it "
         r"is truncated"),
    Case("model_file_flipped_byte", gen_file(flip_model_byte), {}, 2,
         r"llmbook generate: \S*flipped\.safetensors is corrupted: its tensors do not match"),
    Case("model_file_without_llmbook_metadata", gen_file(plain_safetensors), {}, 2,
         r"llmbook generate: \S*plain\.safetensors has no tokenizer in its metadata"),
    Case("checkpoint_truncated",
         gen_file(lambda c: c.file("cut.pt", c.tiny.ckpt.read_bytes()[:50_000])), {}, 2,
         r"llmbook generate: \S*cut\.pt is truncated or corrupted"),
    Case("checkpoint_flipped_byte", gen_file(flip_checkpoint_byte), {}, 2,
         r"llmbook generate: \S*flipped\.pt is corrupted: its content does not match the "
         r"checksum"),
    Case("checkpoint_that_calls_code", gen_file(code_checkpoint), {}, 2,
         r"llmbook generate: refused to load \S*calls-code\.pt: besides tensors and plain data "
         r"it asks to call \S*getcwd"),
    # ---- generate
    Case("generate_empty_prompt", gen(prompt=""), {}, 2, r"llmbook generate: the prompt is empty"),
    Case("generate_temperature_nan", gen("--temperature", "nan"), {}, 2,
         r"llmbook generate: argument --temperature: must be a finite number, got nan"),
    Case("generate_temperature_inf", gen("--temperature", "inf"), {}, 2,
         r"llmbook generate: argument --temperature: must be a finite number, got inf"),
    Case("generate_temperature_negative", gen("--temperature", "-1"), {}, 2,
         r"llmbook generate: argument --temperature: must be >= 0 \(0 means greedy\), got -1"),
    Case("generate_top_k_0", gen("--top-k", "0"), {}, 2,
         r"llmbook generate: argument --top-k: must be at least 1, got 0"),
    Case("generate_top_p_0", gen("--top-p", "0"), {}, 2,
         r"llmbook generate: argument --top-p: must be in \(0, 1\], got 0"),
    Case("generate_top_p_1_5", gen("--top-p", "1.5"), {}, 2,
         r"llmbook generate: argument --top-p: must be in \(0, 1\], got 1\.5"),
    Case("generate_max_new_tokens_0", gen("--max-new-tokens", "0"), {}, 2,
         r"llmbook generate: argument --max-new-tokens: must be between 1 and 2000, got 0"),
    Case("generate_max_new_tokens_5000", gen("--max-new-tokens", "5000"), {}, 2,
         r"llmbook generate: argument --max-new-tokens: must be between 1 and 2000, got 5000"),
    Case("generate_prompt_outside_vocabulary", gen(prompt="白日xyz"), {}, 2,
         r"llmbook generate: the prompt has characters the model's vocabulary lacks: "
         r"'x' 'y' 'z'"),
    Case("generate_prompt_longer_than_context", gen(prompt="白日依山尽" * 4), {}, 2,
         r"llmbook generate: the prompt is 20 tokens long, longer than the model's context of "
         r"16 tokens"),
    Case("generate_missing_checkpoint",
         lambda c: ["generate", "--checkpoint", c.dir / "none.pt", "--prompt", "白日"], {}, 2,
         r"llmbook generate: no checkpoint at \S*none\.pt"),
    Case("generate_device_cuda", gen(), {"LLMBOOK_DEVICE": "cuda"}, 2,
         r"llmbook generate: device 'cuda' was asked for, but this machine has no CUDA"),
    Case("generate_device_cuda_99", gen(), {"LLMBOOK_DEVICE": "cuda:99"}, 2,
         r"llmbook generate: device 'cuda:99' was asked for, but this machine has "
         r"(no CUDA|\d+ CUDA device)"),
    Case("generate_device_gpu", gen(), {"LLMBOOK_DEVICE": "gpu"}, 2,
         r"llmbook generate: 'gpu' is not a device name"),
    # ---- train
    Case("train_config_missing", lambda c: ["train", c.dir / "none.toml"], {}, 2,
         r"llmbook train: config file \S*none\.toml does not exist"),
    Case("train_config_not_toml",
         lambda c: ["train", c.file("bad.toml", "[model\nblock_size = ")], {}, 2,
         r"llmbook train: \S*bad\.toml is not valid TOML"),
    Case("train_config_unknown_key", lambda c: ["train", c.config(learning_rate=0.1)], {}, 2,
         r"llmbook train: \S*tiny\.toml \[train\]: unknown key\(s\) \['learning_rate'\]"),
    Case("train_config_wrong_type", lambda c: ["train", c.config(lr="fast")], {}, 2,
         r"llmbook train: \S*tiny\.toml \[train\] lr = 'fast' has the wrong type: expected "
         r"float, got str"),
    Case("train_text_file_not_utf8",
         lambda c: ["train", c.config(BINARY), "--out", c.dir / "out"], {}, 2,
         r"llmbook train: \[data\] text_file \S*tiny\.txt is not UTF-8 text \(byte 128"),
    Case("train_out_under_a_file",
         lambda c: ["train", c.config(), "--out", c.file("blocker", "x") / "run"], {}, 2,
         r"llmbook train: cannot create the run folder \S*blocker.run: Not a directory"),
    Case("train_out_is_a_file", lambda c: ["train", c.config(), "--out", c.file("blocker", "x")],
         {}, 2, r"llmbook train: the run folder \S*blocker is a file; give --out a folder"),
    Case("train_into_a_run", lambda c: ["train", c.tiny.config, "--out", c.run()], {}, 2,
         r"llmbook train: \S*run already holds a run; resume it with --resume \S*ckpt\.pt, "
         r"replace it with --overwrite"),
    Case("train_resume_another_run_into_a_run",
         lambda c: ["train", c.tiny.config, "--out", c.run(), "--resume", c.tiny.ckpt], {}, 2,
         r"llmbook train: \S*run already holds another run than \S*ckpt\.pt's"),
    Case("train_resume_from_a_non_checkpoint",
         lambda c: ["train", c.tiny.config, "--out", c.run(), "--resume",
                    c.file("notes.pt", "not a checkpoint\n")], {}, 2,
         r"llmbook train: refused to load \S*notes\.pt: it is corrupted"),
    Case("train_resume_other_vocabulary",
         lambda c: ["train", c.config(OTHER_POEM * 60), "--out", c.run(), "--resume",
                    c.dir / "run" / "ckpt.pt"], {}, 2,
         r"llmbook train: this data gives another vocabulary than the checkpoint's"),
    Case("train_resume_other_model_shape",
         lambda c: ["train", c.config(model={"n_embd": 64}), "--out", c.run(), "--resume",
                    c.dir / "run" / "ckpt.pt"], {}, 2,
         r"llmbook train: \S*ckpt\.pt: tensor 'transformer\.wte\.weight' has shape \(\d+, 32\) "
         r"but the model built from the config wants \(\d+, 64\)"),
    Case("train_resume_damaged_log", damage_log, {}, 2,
         r"llmbook train: \S*metrics\.jsonl line 1 is not JSON: the log is damaged"),
    Case("train_diverging_lr", lambda c: ["train", c.config(lr=1e6), "--out", c.dir / "out"],
         {}, 3, r"llmbook train: training diverged at step \d+: the (loss|gradient norm) is "
         r"(nan|inf)\..*no checkpoint was written yet"),
    Case("train_device_gpu",
         lambda c: ["train", c.config(device="auto"), "--out", c.dir / "out"],
         {"LLMBOOK_DEVICE": "gpu"}, 2, r"llmbook train: 'gpu' is not a device name"),
    Case("train_overwrite_with_bad_data",
         lambda c: ["train", c.config(BINARY), "--out", c.run(), "--overwrite"], {}, 2,
         r"llmbook train: \[data\] text_file \S*tiny\.txt is not UTF-8 text"),
    # ---- evaluate
    Case("evaluate_n_0", lambda c: ["evaluate", c.tiny.model, "--n", "0"], {}, 2,
         r"llmbook evaluate: argument --n: must be at least 1, got 0"),
    Case("evaluate_forms_ci", lambda c: ["evaluate", c.tiny.model, "--forms", "词"], {}, 2,
         r"llmbook evaluate: --forms \['词'\] are not regular forms; choose from"),
    Case("evaluate_missing_model", lambda c: ["evaluate", c.dir / "none.safetensors"], {}, 2,
         r"llmbook evaluate: no model file at \S*none\.safetensors"),
    Case("evaluate_text_file_model", lambda c: ["evaluate", c.tiny.model], {}, 2,
         r"llmbook evaluate: a model trained on a text file has no poetry splits"),
    # ---- export, book, the command itself
    Case("export_missing_checkpoint",
         lambda c: ["export", c.dir / "none.pt", c.dir / "out.safetensors"], {}, 2,
         r"llmbook export: no checkpoint at \S*none\.pt"),
    Case("export_under_a_file",
         lambda c: ["export", c.tiny.ckpt, c.file("blocker", "x") / "model.safetensors"], {}, 2,
         r"llmbook export: .*blocker"),
    Case("export_not_safetensors", lambda c: ["export", c.tiny.ckpt, c.dir / "model.bin"], {}, 2,
         r"llmbook export: \S*model\.bin: a model file's name must end in \.safetensors"),
    Case("book_unknown_chapter", lambda c: ["book", "--chapters", "99", "--out", c.dir / "book"],
         {}, 2, r"llmbook book: unknown chapter '99': the book has 00"),
    Case("unknown_command", ["frobnicate"], {}, 2,
         r"llmbook: argument command: invalid choice: 'frobnicate'"),
    Case("ascii_terminal_error", lambda c: ["evaluate", c.tiny.model, "--forms", "词"],
         {"PYTHONIOENCODING": "ascii"}, 2,
         r"llmbook evaluate: --forms \['\\u8bcd'\] are not regular forms"),
]
MARKS = {
    "generate_device_cuda": NO_CUDA,
}


class Outcome(NamedTuple):
    status: int
    stderr: str
    before: dict[str, str]
    after: dict[str, str]


def run_case(case: Case, ctx: Ctx) -> Outcome:
    argv = case.argv(ctx) if callable(case.argv) else case.argv
    before = digests(ctx.dir)
    r = llmbook(argv, ctx.dir, case.env)
    return Outcome(r.returncode, r.stderr, before, digests(ctx.dir))


@pytest.fixture(scope="module")
def outcomes(request, tiny, tmp_path_factory) -> dict:
    """Every selected case's command, run a few at a time (each is mostly torch's import)."""
    wanted = {item.callspec.params["case"].id for item in request.session.items
              if getattr(item, "originalname", "") == "test_user_error"}
    todo = [case for case in CASES if case.id in wanted]
    folders = {case.id: tmp_path_factory.mktemp(case.id) for case in todo}
    with ThreadPoolExecutor(max_workers=min(os.cpu_count() or 2, 8)) as pool:
        futures = {case.id: pool.submit(run_case, case, Ctx(folders[case.id], tiny))
                   for case in todo}
    return {name: f.exception() or f.result() for name, f in futures.items()}


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=MARKS.get(c.id, ()))
                                  for c in CASES])
def test_user_error(case: Case, outcomes: dict):
    out = outcomes[case.id]
    if isinstance(out, BaseException):
        raise out
    assert "Traceback" not in out.stderr, out.stderr
    assert out.status == case.status, out.stderr
    line = one_message(out.stderr)
    assert re.match(case.pattern, line), f"{line!r} does not match {case.pattern!r}"
    assert out.after == out.before, "the command changed or removed a run's files"


def test_the_table_is_big_enough():
    assert len(CASES) >= 30 and len({c.id for c in CASES}) == len(CASES)


# ----------------------------------------------------------------------------- faults

def test_a_killed_run_resumes_and_its_stale_temp_file_goes(tmp_path):
    config, out = write_config(tmp_path, **LONG), tmp_path / "run"
    proc = start(["train", config, "--out", out], tmp_path)
    wait_for(out / "ckpt.pt", proc)
    proc.kill()
    proc.wait(TIMEOUT)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    stale = out / f".ckpt.pt.{proc.pid}.tmp"  # what a write killed midway leaves
    stale.write_bytes(b"half a checkpoint")
    r = llmbook(["train", config, "--out", out, "--resume", out / "ckpt.pt"], tmp_path)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert not stale.exists()
    assert load_checkpoint(out / "ckpt.pt")["step"] == LONG["max_steps"]
    assert_whole_log(out / "metrics.jsonl", LONG["max_steps"])


def test_ctrl_c_saves_and_names_the_resume_command(tmp_path):
    config, out = write_config(tmp_path, **LONG), tmp_path / "run"
    proc = start(["train", config, "--out", out], tmp_path)
    wait_for(out / "ckpt.pt", proc)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(TIMEOUT) == 130, (tmp_path / "stderr.txt").read_text()
    line = one_message((tmp_path / "stderr.txt").read_text(encoding="utf-8"))
    found = re.fullmatch(r"llmbook train: interrupted at step (\d+); checkpoint (\S+) written; "
                         r"resume with: (llmbook train .+)", line)
    assert found, line
    step = int(found[1])
    assert LONG["checkpoint_every"] <= step < LONG["max_steps"]
    assert load_checkpoint(found[2])["step"] == step
    r = llmbook(shlex.split(found[3])[1:], tmp_path)  # the command it names, as it is
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert load_checkpoint(out / "ckpt.pt")["step"] == LONG["max_steps"]
    assert_whole_log(out / "metrics.jsonl", LONG["max_steps"])


def test_a_torn_last_log_line_is_dropped_on_resume(tiny, tmp_path):
    run = Path(shutil.copytree(tiny.run, tmp_path / "run"))
    metrics = run / "metrics.jsonl"
    whole = metrics.read_bytes()
    with open(metrics, "a", encoding="utf-8") as f:
        f.write('{"step": 9')
    r = llmbook(["train", tiny.config, "--out", run, "--resume", run / "ckpt.pt"], tmp_path)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert "dropped the torn last line" in r.stderr
    assert metrics.read_bytes() == whole


def test_generate_on_an_ascii_terminal_escapes(tiny, tmp_path):
    r = llmbook(["generate", "--checkpoint", tiny.model, "--prompt", "白日", "--seed", "1",
                 "--max-new-tokens", "10"], tmp_path, {"PYTHONIOENCODING": "ascii"})
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert r.stdout.startswith("\\u767d\\u65e5"), r.stdout
