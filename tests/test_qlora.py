"""QLoRA: the NF4 format against bitsandbytes (a test-only oracle that runs NF4 on the CPU), the
quantized layer and loader, a LoRA step against peft + bitsandbytes' Linear4bit on transformers'
Llama, and the trainer, generate.py and lora.py merge with --quantize nf4.

bitsandbytes 0.50 on the CPU: quantize_4bit runs its PyTorch backend, whose bytes are the format's
reference. It then quantizes the block maxima (double quantization) with its native CPU kernel,
whose nearest-level search is approximate (a few in a thousand land a level or more away); its
PyTorch backend rounds them to the nearest level, and that is what we match exactly, and the native
kernel within a few levels. Its CPU dequantize_4bit blocks each row on its own when a row is not a
multiple of 64 (the flat layout is the format: its PyTorch backend and CUDA use it).
"""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import checkpoint
import lora
import model
from ckpt_utils import (hf_model, meta_params_for, meta_state_dict, randomize_adapters, rel_err, tokens_for,
                        write_hf, write_meta)

bnb = pytest.importorskip("bitsandbytes")
import bitsandbytes.functional as bnbF  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# bitsandbytes' own PyTorch backend, reached past its native CPU kernels.
REFERENCE = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)

# Real Llama shapes (8B's wk and w2 are 1024 x 4096 and 4096 x 14336; these keep their ratios small),
# and awkward ones: sizes that are not multiples of 64 or 256, odd, a single value, a block of zeros.
SHAPES = [(64, 128), (256, 1024), (448, 128), (33, 70), (300, 257), (7,), (1, 5), (1000, 999)]


def _weight(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.02
    w.view(-1)[:70] = 0  # a whole block of zeros, and part of the next
    return w.to(dtype)


def _bnb_state(q, shape, dtype):
    """bitsandbytes' QuantState holding our tensors, to let it dequantize our bytes."""
    from bitsandbytes.functional import QuantState

    nested = QuantState(absmax=q["absmax_scale"], code=bnbF.create_dynamic_map(), blocksize=256, dtype=torch.float32)
    return QuantState(absmax=q["absmax"], shape=torch.Size(shape), dtype=dtype, blocksize=64,
                      code=bnbF.get_4bit_type("nf4", device="cpu"), quant_type="nf4",
                      offset=q["absmax_offset"], state2=nested)


def _bnb_flat_dequantize(packed, state):
    """bitsandbytes' dequantization in the flat layout (its PyTorch backend), from its quant state."""
    absmax = bnbF.dequantize_blockwise(state.absmax, state.state2) + state.offset
    return torch.ops.bitsandbytes.dequantize_4bit.default.redispatch(
        REFERENCE, packed, absmax, 64, "nf4", state.shape, state.dtype)


def test_levels_are_bitsandbytes():
    assert torch.equal(torch.tensor(model.NF4_LEVELS), bnbF.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(model.dynamic_levels(), bnbF.create_dynamic_map())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_quantize_matches_bitsandbytes(shape, dtype):
    w = _weight(shape, dtype)
    packed, state = bnbF.quantize_4bit(w, quant_type="nf4", blocksize=64, compress_statistics=True)
    ours = model.nf4_quantize(w)
    assert torch.equal(ours["packed"], packed.flatten())  # the 4-bit bytes
    assert torch.equal(ours["absmax_offset"], state.offset)
    # the 8-bit block maxima: exactly bitsandbytes' PyTorch backend's, from the same fp32 maxima
    _, absmax = torch.ops.bitsandbytes.quantize_4bit.default(w, 64, "nf4", torch.uint8)
    ref_indices, ref_scale = torch.ops.bitsandbytes.quantize_blockwise.default.redispatch(
        REFERENCE, absmax - state.offset, bnbF.create_dynamic_map(), 256)
    assert torch.equal(ours["absmax"], ref_indices) and torch.equal(ours["absmax_scale"], ref_scale)
    # ... and its native CPU kernel's, but for its approximate search, within a few levels
    assert torch.equal(ours["absmax_scale"][: absmax.numel() // 256], state.state2.absmax[: absmax.numel() // 256])
    ours_absmax = model.nf4_absmax(ours["absmax"], ours["absmax_scale"], ours["absmax_offset"])
    their_absmax = bnbF.dequantize_blockwise(state.absmax, state.state2) + state.offset
    scale = ours["absmax_scale"].repeat_interleave(256)[: absmax.numel()]
    assert ((ours_absmax - their_absmax).abs() <= 0.06 * scale).all()  # four levels at the top of the code
    assert (ours["absmax"] != state.absmax).sum() <= 1 + 0.01 * absmax.numel()  # 1: a lone 0/0 block
    # each side dequantizes the other's bytes to the same values (flat layout)
    theirs = _bnb_flat_dequantize(packed, _bnb_state(ours, shape, dtype))
    assert torch.equal(model.nf4_dequantize(ours["packed"], ours_absmax, shape, dtype), theirs)
    assert torch.equal(model.nf4_absmax(state.absmax, state.state2.absmax, state.offset), their_absmax)
    assert torch.equal(model.nf4_dequantize(packed.flatten(), their_absmax, shape, dtype),
                       _bnb_flat_dequantize(packed, state))
    if len(shape) == 2 and shape[1] % 64 == 0:  # where its CPU dequantize_4bit uses the flat layout
        assert torch.equal(model.nf4_dequantize(packed.flatten(), their_absmax, shape, dtype),
                           bnbF.dequantize_4bit(packed, state, quant_type="nf4"))
    # and the weight comes back to NF4's precision: the nearest level, within half a step of 1/7
    back = model.nf4_dequantize(ours["packed"], ours_absmax, shape, torch.float32)
    assert rel_err(back, w.float()) < 0.12


def test_nf4_linear_forward_and_backward_keep_no_weight():
    torch.manual_seed(0)
    w = torch.randn(96, 200) * 0.05
    layer = model.NF4Linear(w)
    x = torch.randn(3, 5, 200).requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    assert not any(t.numel() >= w.numel() for t in saved)  # no dequantized weight kept for backward
    dy = torch.randn_like(y)
    y.backward(dy)
    dense = layer.dequantize()
    assert torch.equal(dense, model.nf4_dequantize.__wrapped__(
        layer.packed, model.nf4_absmax(layer.absmax, layer.absmax_scale, layer.absmax_offset), (96, 200),
        torch.float32))
    ref = x.detach().double() @ dense.double().T
    assert rel_err(y, ref) < 1e-6 and rel_err(x.grad, dy.double() @ dense.double()) < 1e-6
    assert layer.dequantize(torch.bfloat16).dtype == torch.bfloat16
    layer.to(torch.bfloat16)  # as model.to(dtype) does: the fp32 scales must survive it
    assert layer.absmax_scale.dtype == torch.float32 and torch.equal(layer.dequantize(), dense)


# -- loading ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """variant -> Meta checkpoint dir from the transformers reference model (seed 0), and an HF one."""
    root = tmp_path_factory.mktemp("ckpt")
    out = {v: write_meta(meta_state_dict(hf_model(v)), meta_params_for(v), root / v) for v in ("llama2", "llama3.2")}
    out["hf"] = write_hf(hf_model("llama3.1"), root / "hf")
    return out


@pytest.mark.parametrize("variant", ["llama2", "llama3.2", "hf"])
def test_load_quantized(ckpts, variant):
    full, q = checkpoint.load(ckpts[variant]), checkpoint.load(ckpts[variant], quantize="nf4")
    dense = dict(full.named_parameters())
    nf4_bytes = bf16_bytes = 0
    for name, module in q.named_modules():
        if name.rpartition(".")[2] in model.PROJECTIONS:
            assert isinstance(module, model.NF4Linear), name
            expected = model.nf4_quantize(dense[f"{name}.weight"])
            assert all(torch.equal(getattr(module, k), t) for k, t in expected.items()), name
            nf4_bytes += sum(b.numel() * b.element_size() for b in module.buffers() if b is not module.weight_sample)
            bf16_bytes += 2 * module.in_features * module.out_features
    assert nf4_bytes <= 0.3 * bf16_bytes
    for name, p in q.named_parameters():  # embedding, norms and output stay full precision, unchanged
        assert p.dtype == torch.float32 and torch.equal(p, dense[name]), name
    assert lora.base_fingerprint(q) == lora.base_fingerprint(full)  # an adapter fits either
    tokens = tokens_for("llama3.1" if variant == "hf" else variant)
    with torch.no_grad():
        assert 1e-3 < rel_err(q(tokens), full(tokens)) < 0.5  # quantized, and still the same model
    bf16 = checkpoint.load(ckpts[variant], dtype=torch.bfloat16, quantize="nf4")
    assert bf16.tok_embeddings.weight.dtype == torch.bfloat16  # computes in bf16, from the same bytes
    assert torch.equal(bf16.layers[0].attention.wq.packed, q.layers[0].attention.wq.packed)
    with torch.no_grad():
        assert rel_err(bf16(tokens), q(tokens)) < 3e-2
    with pytest.raises(ValueError, match="quantize"):
        checkpoint.load(ckpts[variant], quantize="int3")


def test_loading_holds_one_full_precision_weight_at_a_time(ckpts, monkeypatch):
    """The HF layout is read from a mapping of the file: a projection is quantized from a view into
    the page cache, which costs no memory of the process's own, and the only full-precision copies
    are the q/k rows it stores permuted. Each copy is gone before the next projection is quantized,
    so loading peaks near the NF4 model plus one tensor."""
    import weakref

    copies, views, quantize = [], [], model.nf4_quantize

    def watched(weight):
        assert not [r for r in copies if r() is not None], "an earlier full-precision copy is still held"
        if weight.untyped_storage().nbytes() > weight.nbytes:  # a view into the mapped file
            views.append(weight)
        else:
            copies.append(weakref.ref(weight))
        return quantize(weight)

    monkeypatch.setattr(model, "nf4_quantize", watched)
    checkpoint.load(ckpts["hf"], quantize="nf4")
    assert len(copies) == 2 * 2 and len(views) == 5 * 2  # wq and wk copied in each of 2 layers


# -- a LoRA step against peft + bitsandbytes -------------------------------------------------------


def _with_linear4bit(hf):
    """transformers' Llama with every projection a bitsandbytes Linear4bit (NF4, double quantized),
    quantized by bitsandbytes from the same weights; the block maxima by its PyTorch backend, whose
    rounding is exact (see the module's docstring), so that both sides hold the same bytes."""
    for module in list(hf.modules()):
        for name, child in list(module.named_children()):
            if name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
                w = child.weight.data.clone()
                layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=False,
                                          compute_dtype=torch.float32, compress_statistics=True, quant_type="nf4")
                layer.weight = bnb.nn.Params4bit(w, requires_grad=False, blocksize=64, compress_statistics=True,
                                                 quant_type="nf4")._quantize("cpu")
                state = layer.weight.quant_state
                _, absmax = torch.ops.bitsandbytes.quantize_4bit.default(w, 64, "nf4", torch.uint8)
                state.absmax, state.state2.absmax = torch.ops.bitsandbytes.quantize_blockwise.default.redispatch(
                    REFERENCE, absmax - state.offset, state.state2.code, 256)
                setattr(module, name, layer)
    return hf


@pytest.mark.parametrize("variant", ["llama2", "llama3.2"])
def test_lora_step_matches_peft_on_bitsandbytes(ckpts, variant, tmp_path):
    """Tolerance, relative, in fp32: loss 1e-6, adapter gradients 1e-5. Both sides hold the same NF4
    bytes (bitsandbytes' block maxima from its exact backend) and dequantize them to the same fp32
    values, but for wq/wk, whose block maxima are averaged in another order (RoPE permutes their
    rows: ~1e-7); the rest is fp32 summation order in attention (eager against SDPA), norms and
    matmuls. Measured: loss 1.6e-7, gradients <= 1.3e-6. A wrong level, block or scale moves them by
    1e-2 or more, as the unquantized base asserted at the end does."""
    from peft import PeftModel

    q = checkpoint.load(ckpts[variant], quantize="nf4")
    randomize_adapters(lora.apply_lora(q, rank=4, alpha=8), seed=0)
    lora.export_peft(q, tmp_path / "peft")
    ref = PeftModel.from_pretrained(_with_linear4bit(hf_model(variant)), tmp_path / "peft", is_trainable=True)
    tokens = tokens_for(variant)
    inputs, targets = tokens[:, :-1], tokens[:, 1:].flatten()
    loss = F.cross_entropy(q(inputs).flatten(0, 1), targets)
    ref_loss = F.cross_entropy(ref(inputs).logits.flatten(0, 1), targets)
    loss.backward()
    ref_loss.backward()
    assert abs(loss.item() - ref_loss.item()) <= 1e-6 * ref_loss.item()
    for name, m in lora.lora_modules(q):
        theirs = ref.base_model.model.get_submodule(checkpoint.hf_name(name))
        grad_b = checkpoint.permute_qk(f"{name}.lora_B", theirs.lora_B["default"].weight.grad, q.args,
                                       checkpoint.hf_to_meta_rope)
        assert rel_err(m.lora_A.grad, theirs.lora_A["default"].weight.grad) < 1e-5, name
        assert rel_err(m.lora_B.grad, grad_b) < 1e-5, name
    full = lora.apply_lora(checkpoint.load(ckpts[variant]), rank=4, alpha=8)
    with torch.no_grad():
        for (_, a), (_, b) in zip(lora.lora_modules(full), lora.lora_modules(q)):
            a.lora_A.copy_(b.lora_A)
            a.lora_B.copy_(b.lora_B)
        assert abs(F.cross_entropy(full(inputs).flatten(0, 1), targets).item() - ref_loss.item()) > 1e-3


def test_merge_refuses_an_nf4_base(ckpts):
    q = lora.apply_lora(checkpoint.load(ckpts["llama2"], quantize="nf4"), rank=2, alpha=4)
    with pytest.raises(ValueError, match="full-precision"):
        lora.merge_lora(q)


# -- the trainer, generate.py and lora.py merge with --quantize nf4 --------------------------------

from test_train import TINY, base_ckpt, interrupt_after, losses, text_data, train  # noqa: E402,F401  (fixtures too)


def test_train_qlora_lowers_the_loss_and_resumes_exactly(base_ckpt, text_data, tmp_path):  # noqa: F811
    common = [*TINY, "--ckpt_dir", base_ckpt, "--data", text_data, "--lora_rank", "4", "--quantize", "nf4",
              "--max_steps", "60", "--eval_every", "60", "--save_every", "1000", "--batch_size", "2",
              "--lr", "1e-2"]
    out = train(*common, "--out_dir", tmp_path / "straight")
    assert "LoRA" in out.stderr
    straight = losses(tmp_path / "straight")
    assert sum(straight[-10:]) < sum(straight[:10])
    adapter = json.loads((tmp_path / "straight" / "adapter" / "adapter.json").read_text())
    assert adapter["base_quantize"] == "nf4"
    assert adapter["base_fingerprint"] == lora.base_fingerprint(checkpoint.load(base_ckpt))
    # generate.py samples with the adapter beside the NF4 base, as it was trained
    gen = subprocess.run([sys.executable, "generate.py", "--ckpt_dir", str(base_ckpt), "--adapter",
                          str(tmp_path / "straight" / "adapter"), "--quantize", "nf4", "--prompt", "patient",
                          "--temperature", "0", "--max_new_tokens", "4"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert gen.returncode == 0 and gen.stdout.strip(), gen.stderr

    status, err = interrupt_after([*common, "--out_dir", tmp_path / "cut"], tmp_path / "cut", 5, signal.SIGTERM)
    assert status == 130, err
    train(*common, "--out_dir", tmp_path / "cut", "--resume")
    assert losses(tmp_path / "cut") == straight


def test_quantize_needs_lora(base_ckpt, text_data, tmp_path):  # noqa: F811
    out = train("--ckpt_dir", base_ckpt, "--data", text_data, "--out_dir", tmp_path, "--quantize", "nf4",
                "--mlflow", "false", check=False)
    assert out.returncode == 2 and "--quantize needs --lora_rank" in out.stderr and "Traceback" not in out.stderr


def test_merge_and_generate_from_a_qlora_adapter(ckpts, tmp_path):
    q = lora.apply_lora(checkpoint.load(ckpts["llama2"], quantize="nf4"), rank=4, alpha=8)
    with torch.no_grad():
        for _, m in lora.lora_modules(q):
            m.lora_B.normal_(0, 0.05)
    lora.save_adapter(q, tmp_path / "adapter")
    out = subprocess.run([sys.executable, "lora.py", "merge", "--ckpt_dir", str(ckpts["llama2"]), "--adapter",
                          str(tmp_path / "adapter"), "--out", str(tmp_path / "merged")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    full = lora.apply_lora(checkpoint.load(ckpts["llama2"]), rank=4, alpha=8)
    lora.load_adapter(full, tmp_path / "adapter")  # the same base fingerprint: no --force needed
    quantization, change = lora.nf4_gap(full)
    assert f"differ from what it learned on by {100 * quantization:.2f}%" in out.stderr
    assert f"the adapter changes them by {100 * change:.2f}%" in out.stderr
    assert 0.01 < quantization < 0.2 and change > 0
    merged, tokens = checkpoint.load(tmp_path / "merged"), tokens_for("llama2")
    with torch.no_grad():
        assert rel_err(merged(tokens), full(tokens)) < 1e-5  # merged into the full-precision base
