"""Exporting the forward pass: the torch.export program and the ONNX file under onnxruntime give
the eager logits at lengths other than the example's (the sequence axis is dynamic), exporting
leaves the model and its eager checks as they were, and bad input is a clear error."""

import sys

import pytest
import torch
from torch.testing import assert_close

from llmbook.errors import UserError
from llmbook.export import export_onnx, export_program, onnx_logits
from llmbook.model import GPT, GPTConfig

VOCAB, BLOCK = 29, 16


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = GPT(GPTConfig(block_size=BLOCK, vocab_size=VOCAB, n_layer=2, n_head=2, n_embd=32))
    with torch.no_grad():  # larger weights than the init: logits that differ across positions
        for p in m.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.3)
    return m.eval()


@pytest.fixture(scope="module")
def onnx_file(model, tmp_path_factory):
    return export_onnx(model, tmp_path_factory.mktemp("onnx") / "gpt.onnx",
                       torch.randint(VOCAB, (1, 5)))


def ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


def test_the_program_gives_the_eager_logits_at_other_lengths(model):
    program = export_program(model, ids(5))
    for n in (1, 3, BLOCK):  # none of them the example's length
        idx = ids(n, seed=n)
        assert_close(program.module()(idx), model(idx)[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(AssertionError, match=f"<= {BLOCK}"):  # torch.export's own guard
        program.module()(ids(BLOCK + 1))


def test_exporting_runs_in_eval_mode_and_gives_the_mode_back():
    torch.manual_seed(1)
    m = GPT(GPTConfig(block_size=BLOCK, vocab_size=VOCAB, n_layer=1, n_head=2, n_embd=16,
                      dropout=0.5)).train()
    program = export_program(m, ids(4))
    assert m.training
    idx = ids(7)
    expected = m.eval()(idx)[0]
    assert_close(program.module()(idx), expected)  # no dropout in the program


def test_eager_checks_still_work_after_exporting(model):
    export_program(model, ids(3))
    with pytest.raises(UserError, match="outside the vocabulary"):
        model(torch.tensor([[0, VOCAB]]))


def test_onnx_gives_the_eager_logits_at_two_lengths(model, onnx_file):
    assert [p.name for p in onnx_file.parent.iterdir()] == ["gpt.onnx"]  # no temp file left
    for n in (1, BLOCK):  # neither of them the example's length
        idx = ids(n, seed=n)
        assert_close(onnx_logits(onnx_file, idx), model(idx)[0], rtol=1e-4, atol=1e-4)


BAD_EXAMPLES = [
    (torch.zeros(1, 4), "got torch.float32"),
    (torch.zeros(4, dtype=torch.long), r"got torch.int64 \(4,\)"),
    (torch.zeros(2, 4, dtype=torch.long), r"\(2, 4\)"),
    (torch.zeros(1, 0, dtype=torch.long), r"\(1, 0\)"),
    (torch.zeros(1, BLOCK + 1, dtype=torch.long), f"T <= {BLOCK}"),
    (torch.tensor([[1, VOCAB]]), "outside the vocabulary"),
    (torch.tensor([[-1, 2]]), "outside the vocabulary"),
    ([[1, 2]], "got list"),
]


@pytest.mark.parametrize("example, message", BAD_EXAMPLES)
def test_bad_examples_are_clear_errors(model, example, message, tmp_path):
    with pytest.raises(UserError, match=message):
        export_program(model, example)
    with pytest.raises(UserError, match=message):
        export_onnx(model, tmp_path / "m.onnx", example)
    assert not list(tmp_path.iterdir())


def test_an_example_of_one_token_is_a_clear_error(model):
    with pytest.raises(UserError, match=f"example must be .* with 2 <= T <= {BLOCK}"):
        export_program(model, ids(1))  # traced with one token, the length would be fixed


@pytest.mark.parametrize("idx, message", BAD_EXAMPLES)
def test_bad_ids_for_the_onnx_file_are_clear_errors(onnx_file, idx, message):
    with pytest.raises(UserError, match=message):
        onnx_logits(onnx_file, idx)


def test_bad_models_and_devices_are_clear_errors(model, tmp_path):
    with pytest.raises(UserError, match="exports an llmbook GPT, got Linear"):
        export_program(torch.nn.Linear(2, 2), ids(3))
    with pytest.raises(UserError, match="example is on meta but the model is on cpu"):
        export_program(model, ids(3).to("meta"))


def test_bad_paths_are_clear_errors(model, onnx_file, tmp_path):
    with pytest.raises(UserError, match="does not exist; create it"):
        export_onnx(model, tmp_path / "missing" / "m.onnx", ids(3))
    with pytest.raises(UserError, match="is a folder"):
        export_onnx(model, tmp_path, ids(3))
    with pytest.raises(UserError, match="no ONNX file at"):
        onnx_logits(tmp_path / "missing.onnx", ids(3))
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not an onnx model")
    with pytest.raises(UserError, match="not an ONNX model onnxruntime can load"):
        onnx_logits(garbage, ids(3))


def test_a_model_too_big_for_one_onnx_file_is_a_clear_error(model, tmp_path, monkeypatch):
    monkeypatch.setattr("llmbook.export.ONNX_MAX_BYTES", 1000)  # the tiny model is ~100 kB
    with pytest.raises(UserError, match="1,000 bytes or more, past what one ONNX file holds"):
        export_onnx(model, tmp_path / "m.onnx", ids(3))
    assert not list(tmp_path.iterdir())


def test_an_onnx_file_not_written_by_llmbook_is_a_clear_error(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.INT64, [1, None])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x],
                              [helper.make_tensor_value_info("y", TensorProto.INT64, [1, None])])
    path = tmp_path / "other.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    with pytest.raises(UserError, match="not written by llmbook.export.export_onnx"):
        onnx_logits(path, ids(3))


@pytest.mark.parametrize("missing", ["onnx", "onnxscript"])
def test_exporting_without_onnx_names_the_pip_command(model, tmp_path, monkeypatch, missing):
    monkeypatch.setitem(sys.modules, missing, None)  # `import missing` now raises ImportError
    with pytest.raises(UserError, match=f"needs {missing}: pip install onnx onnxscript onnxrun"):
        export_onnx(model, tmp_path / "m.onnx", ids(3))


def test_running_without_onnxruntime_names_the_pip_command(onnx_file, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(UserError, match="needs onnxruntime: pip install onnx onnxscript onnxrun"):
        onnx_logits(onnx_file, ids(3))
