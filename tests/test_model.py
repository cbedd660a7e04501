"""GPT: config checks, GPT-2 size and initialisation, causality, GPT-2 weights, files."""

import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.testing import assert_close
from torch.utils.flop_counter import FlopCounterMode

from llmbook.errors import UserError
from llmbook.model import GPT, GPTConfig, load_model, read_metadata, save_pretrained

SMALL = dict(block_size=16, vocab_size=37, n_layer=2, n_head=2, n_embd=32)


def small_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**SMALL, **overrides})).eval()


# ---- configuration -------------------------------------------------------------------------

def test_config_round_trip_and_presets():
    cfg = GPTConfig(**SMALL, dropout=0.1, bias=False)
    assert GPTConfig.from_dict(cfg.to_dict()) == cfg
    assert GPTConfig.from_dict({"n_layer": 3}) == GPTConfig(n_layer=3)
    assert GPTConfig.gpt2("gpt2") == GPTConfig()
    xl = GPTConfig.gpt2("gpt2-xl")
    assert (xl.n_layer, xl.n_head, xl.n_embd) == (48, 25, 1600)


def test_config_unknown_key_lists_valid_keys():
    with pytest.raises(ValueError, match="unknown GPTConfig key.*n_layers") as e:
        GPTConfig.from_dict({"n_layers": 4, "n_head": 2})
    for key in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd", "dropout", "bias"):
        assert key in str(e.value)


@pytest.mark.parametrize("bad, match", [
    (dict(n_embd=30, n_head=4), "divisible by n_head"),
    (dict(n_layer=0), "n_layer must be a positive int"),
    (dict(vocab_size=-5), "vocab_size must be a positive int"),
    (dict(block_size=8.0), "block_size must be a positive int"),
    (dict(dropout=1.0), "dropout"),
    (dict(dropout=-0.1), "dropout"),
    (dict(bias="yes"), "bias"),
])
def test_config_validation(bad, match):
    with pytest.raises(ValueError, match=match):
        GPTConfig(**bad)


def test_unknown_gpt2_size():
    with pytest.raises(ValueError, match="gpt2-medium"):
        GPTConfig.gpt2("gpt2-small")


# ---- size, initialisation, FLOPs -----------------------------------------------------------

def test_gpt2_small_parameter_count():
    with torch.device("meta"):  # no memory, no time: only shapes
        model = GPT(GPTConfig.gpt2("gpt2"))
    assert model.num_params(non_embedding=False) == 124_439_808
    assert model.num_params() == 124_439_808 - 1024 * 768  # position embeddings left out
    assert model.lm_head.weight is model.transformer.wte.weight


def test_gpt2_initialisation():
    model = small_model(n_layer=8, n_embd=256, n_head=4, vocab_size=512)
    stds = {n: p.std().item() for n, p in model.named_parameters() if n.endswith("weight")}
    assert stds["transformer.h.0.attn.c_proj.weight"] == pytest.approx(0.02 / 4, rel=0.05)
    assert stds["transformer.h.7.mlp.c_proj.weight"] == pytest.approx(0.02 / 4, rel=0.05)
    assert stds["transformer.h.3.mlp.c_fc.weight"] == pytest.approx(0.02, rel=0.05)
    assert stds["transformer.wte.weight"] == pytest.approx(0.02, rel=0.05)
    assert model.transformer.h[0].attn.c_attn.bias.abs().max() == 0


def test_initial_loss_is_uniform_guess():
    """At initialisation the logits are tiny, so the loss is close to ln(vocab_size)."""
    model = small_model(vocab_size=500)
    idx = torch.randint(0, 500, (4, 16))
    logits, loss = model(idx, torch.randint(0, 500, (4, 16)))
    assert logits.shape == (4, 16, 500)
    assert abs(loss.item() - math.log(500)) < 0.1


def test_loss_is_cross_entropy_over_all_positions_ignoring_minus_100():
    model = small_model()
    idx, targets = torch.randint(0, 37, (2, 10)), torch.randint(0, 37, (2, 10))
    targets[0, :4] = -100
    logits, loss = model(idx, targets)
    keep = targets != -100
    log_probs = logits.log_softmax(-1)[keep]
    assert_close(loss, -log_probs.gather(1, targets[keep][:, None]).mean())
    assert model(idx)[1] is None


def test_estimate_flops_matches_counted_flops():
    """6N + 12·L·C·T against the FLOPs PyTorch counts in one forward and backward pass."""
    model = small_model(block_size=32, vocab_size=101, n_layer=2, n_head=2, n_embd=64).train()
    idx = torch.randint(0, 101, (2, 32))
    with FlopCounterMode(display=False) as counter:
        model(idx, idx, explicit=True)[1].backward()  # explicit: plain matmuls, all counted
    counted = counter.get_total_flops() / idx.numel()
    assert model.estimate_flops_per_token() == pytest.approx(counted, rel=0.03)


# ---- forward: causality and errors ---------------------------------------------------------

@pytest.mark.parametrize("explicit", [False, True])
def test_model_is_causal(explicit):
    model = small_model()
    idx = torch.randint(0, 37, (1, 16))
    base, _ = model(idx, explicit=explicit)
    for t in (0, 7, 15):
        changed = idx.clone()
        changed[0, t] = (idx[0, t] + 1) % 37
        logits, _ = model(changed, explicit=explicit)
        assert_close(logits[:, :t], base[:, :t])
        assert not torch.allclose(logits[:, t], base[:, t])


def test_explicit_attention_equals_fused_in_model():
    model = small_model()
    idx = torch.randint(0, 37, (3, 16))
    assert_close(model(idx, explicit=True)[0], model(idx)[0])
    assert model.transformer.h[1].attn.last_attn.shape == (3, 2, 16, 16)


def test_input_errors():
    model = small_model()
    with pytest.raises(ValueError, match="prompt is 17 tokens long, longer than the model.s "
                                         "context of 16 tokens; shorten it"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="token id 37 at position \\(1, 2\\)"):
        model(torch.tensor([[1, 2, 3], [4, 5, 37]]))
    with pytest.raises(ValueError, match="token id -1 "):
        model(torch.tensor([[-1, 2, 3]]))
    with pytest.raises(ValueError, match="unsqueeze"):
        model(torch.tensor([1, 2, 3]))
    with pytest.raises(TypeError, match="LongTensor"):
        model(torch.tensor([[1.0, 2.0]]))
    with pytest.raises(ValueError, match="targets must have the shape"):
        model(torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="GPTConfig"):
        GPT(SMALL)


# ---- GPT-2 weights from Hugging Face transformers ------------------------------------------

HF_CONFIGS = [dict(n_layer=2, n_head=2, n_embd=64, vocab_size=101, n_positions=32),
              dict(n_layer=3, n_head=4, n_embd=48, vocab_size=77, n_positions=24)]


def hf_gpt2(seed, **sizes):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(**sizes, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                  bos_token_id=0, eos_token_id=0)
    torch.manual_seed(seed)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # every tensor random (HF starts biases and LayerNorms at 0 and 1),
        for p in hf.parameters():  # large enough that GELU's tanh approximation matters
            p.normal_(0.0, 0.3)
    return hf


def hf_logits(hf, idx):
    with torch.no_grad():
        return hf(idx).logits


@pytest.mark.parametrize("sizes", HF_CONFIGS)
def test_from_hf_gpt2_matches_transformers(sizes):
    hf = hf_gpt2(0, **sizes)
    model = GPT.from_hf_gpt2(hf.state_dict(), n_head=sizes["n_head"]).eval()
    assert model.config == GPTConfig(block_size=sizes["n_positions"],
                                     vocab_size=sizes["vocab_size"], n_layer=sizes["n_layer"],
                                     n_head=sizes["n_head"], n_embd=sizes["n_embd"])
    idx = torch.randint(0, sizes["vocab_size"], (2, sizes["n_positions"]))
    expected = hf_logits(hf, idx)
    with torch.no_grad():
        assert_close(model(idx)[0], expected)
        assert_close(model(idx, explicit=True)[0], expected)


def test_from_hf_gpt2_safetensors_file_and_folder(tmp_path):
    sizes = HF_CONFIGS[1]
    hf = hf_gpt2(1, **sizes)
    idx = torch.randint(0, sizes["vocab_size"], (1, 20))
    expected = hf_logits(hf, idx)
    hf.save_pretrained(tmp_path / "hf")  # model.safetensors + config.json; nothing downloaded
    from_folder = GPT.from_hf_gpt2(tmp_path / "hf")  # n_head read from config.json
    assert from_folder.config.n_head == 4
    # a GPT2Model-style file: no "transformer." prefix, causal-mask buffers present, no lm_head
    sd = {k.removeprefix("transformer."): v.contiguous() for k, v in hf.state_dict().items()
          if k != "lm_head.weight"}
    sd["h.0.attn.bias"] = torch.ones(1, 1, 24, 24).tril()
    save_file(sd, tmp_path / "gpt2.safetensors")
    cfg = GPTConfig(block_size=24, vocab_size=77, n_layer=3, n_head=4, n_embd=48)
    from_file = GPT.from_hf_gpt2(str(tmp_path / "gpt2.safetensors"), config=cfg)
    with torch.no_grad():
        assert_close(from_folder.eval()(idx)[0], expected)
        assert_close(from_file.eval()(idx)[0], expected)


def test_from_hf_gpt2_errors(tmp_path):
    sd = hf_gpt2(0, **HF_CONFIGS[0]).state_dict()
    with pytest.raises(ValueError, match="n_head"):
        GPT.from_hf_gpt2(sd)
    wrong = GPTConfig(block_size=32, vocab_size=101, n_layer=2, n_head=2, n_embd=32)
    with pytest.raises(ValueError, match=r"'transformer\.wte\.weight' has shape \(101, 64\) in "
                                         r"the checkpoint but \(101, 32\) is expected"):
        GPT.from_hf_gpt2(sd, config=wrong)
    missing = {k: v for k, v in sd.items() if k != "transformer.h.1.mlp.c_fc.bias"}
    right = GPTConfig(block_size=32, vocab_size=101, n_layer=2, n_head=2, n_embd=64)
    with pytest.raises(ValueError, match=r"'transformer\.h\.1\.mlp\.c_fc\.bias' is missing"):
        GPT.from_hf_gpt2(missing, config=right)
    with pytest.raises(ValueError, match="does not: transformer.h.2.ln_1.weight"):
        GPT.from_hf_gpt2({**sd, "transformer.h.2.ln_1.weight": torch.ones(64)}, config=right)
    with pytest.raises(ValueError, match="safetensors"):
        GPT.from_hf_gpt2(tmp_path / "nothing.bin")


# ---- save_pretrained / load_model ----------------------------------------------------------

def test_save_and_load_round_trip(tmp_path):
    model = small_model(seed=3, bias=False)
    path = tmp_path / "model.safetensors"
    save_pretrained(model, path)
    assert "lm_head.weight" not in load_file(path)  # the tied matrix is stored once
    loaded = load_model(path)
    assert loaded.config == model.config
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    idx = torch.randint(0, 37, (2, 16))
    assert torch.equal(loaded.eval()(idx)[0], model(idx)[0])


def test_save_load_save_gives_identical_bytes(tmp_path):
    from llmbook.tokenizer import CharTokenizer

    model, tok = small_model(seed=4), CharTokenizer(list("白日依山尽黄河入海流"))
    first = save_pretrained(model, tmp_path / "a.safetensors", tokenizer=tok,
                            metadata={"llmbook_step": "7", "note": "春眠不觉晓"})
    again = save_pretrained(load_model(first), tmp_path / "b.safetensors", tokenizer=tok,
                            metadata={"note": "春眠不觉晓", "llmbook_step": "7"})  # other order
    assert first.read_bytes() == again.read_bytes()
    assert read_metadata(again)["llmbook_tokenizer"] == tok.to_json()
    assert load_file(again).keys() == load_file(first).keys()  # safetensors still reads it


def test_load_model_errors(tmp_path):
    model = small_model()
    tensors = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    lying = {**model.config.to_dict(), "n_embd": 64}  # metadata says 64, tensors are 32 wide
    save_file(tensors, tmp_path / "bad.safetensors",
              metadata={"llmbook_config": json.dumps(lying)})
    with pytest.raises(ValueError, match=r"'transformer\.h\.0\.attn\.c_attn\.bias'.* has "
                                         r"shape \(96,\) but its config .* needs \(192,\)"):
        load_model(tmp_path / "bad.safetensors")
    save_file(tensors, tmp_path / "plain.safetensors")
    with pytest.raises(ValueError, match="not written by save_pretrained"):
        load_model(tmp_path / "plain.safetensors")
    with pytest.raises(UserError, match="no model file at"):
        load_model(tmp_path / "missing.safetensors")
    with pytest.raises(TypeError, match="llmbook GPT"):
        save_pretrained(nn.Linear(2, 2), tmp_path / "x.safetensors")


def test_the_loss_ignores_unk_targets():
    from llmbook.data import SlidingWindowDataset

    model = small_model(seed=5)
    unk = 3
    ids = torch.randint(0, 37, (200,))
    ids[::7] = unk
    x, y = SlidingWindowDataset(ids, 16, stride=1, ignore_id=unk).sample(
        8, torch.Generator().manual_seed(0))
    masked = y == -100
    assert masked.any() and not (y == unk).any()
    logits, loss = model(x, y)
    logits.retain_grad()
    loss.backward()
    # an <unk> target adds nothing to the loss and pulls on no logit: its logits are free
    assert torch.all(logits.grad[masked] == 0) and logits.grad[~masked].abs().sum() > 0
    expected = F.cross_entropy(logits[~masked], y[~masked])
    assert_close(loss, expected)
    unmasked = y.masked_fill(masked, unk)
    assert not torch.allclose(model(x, unmasked)[1], loss)  # so the test can fail


def test_forward_runs_on_the_meta_device():
    with torch.device("meta"):
        model = GPT(GPTConfig(block_size=8, vocab_size=11, n_layer=1, n_head=2, n_embd=8))
        logits, _ = model(torch.zeros(2, 8, dtype=torch.long))
    assert logits.shape == (2, 8, 11) and logits.is_meta


def test_padded_vocab_gives_logits_of_the_real_vocab_and_trains_the_same_rows():
    """vocab_multiple pads the embedding (whole GPU tiles) but no logit or target is a pad row."""
    cfg = dict(block_size=8, vocab_size=37, n_layer=1, n_head=2, n_embd=16)
    torch.manual_seed(0)
    plain = GPT(GPTConfig(**cfg))
    padded = GPT(GPTConfig(**cfg, vocab_multiple=64))
    assert padded.lm_head.weight.shape == (64, 16)
    with torch.no_grad():  # the same weights in the real rows, anything in the padding
        for name, p in padded.named_parameters():
            src = plain.get_parameter(name)
            p[tuple(slice(0, n) for n in src.shape)].copy_(src)
    idx = torch.randint(0, 37, (2, 8))
    logits, loss = padded(idx, idx)
    assert logits.shape == (2, 8, 37)
    torch.testing.assert_close(logits, plain(idx)[0])
    torch.testing.assert_close(loss, plain(idx, idx)[1])


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=8, vocab_size=20, n_layer=2, n_head=2, n_embd=16))
    idx = torch.randint(0, 20, (2, 8))
    grads = []
    for on in (False, True):
        model.checkpointing = on
        model.zero_grad()
        model(idx, idx)[1].backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)
