"""The fused Triton kernels against their PyTorch twins, on the CPU under Triton's interpreter.

Shapes are small and deliberately awkward (dims that are not powers of two, row counts that are not
multiples of any block, several chunks with a partial last one), since the interpreter is slow.
On a GPU machine, LLAMA_TEST_DEVICE=cuda runs the same checks with the compiled kernels on CUDA
(conftest.py sets TRITON_INTERPRET=1 otherwise, before model is imported). Every kernel is also
compiled ahead of time for sm_80 and sm_90, which needs no GPU.
"""

import importlib.util
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import model
from ckpt_utils import VARIANTS, rel_err

DEVICE = os.environ.get("LLAMA_TEST_DEVICE", "cpu")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")


@pytest.fixture(autouse=True)
def restore_kernels():
    previous = model.set_kernels(None)
    yield
    model.set_kernels(previous)


def run(kind, fn, inputs, dy=None, grad=None):
    """fn(*inputs) on one kernel path: [output, gradient of each input that requires grad]."""
    previous = model.set_kernels(kind)
    try:
        grad = grad or [x.is_floating_point() for x in inputs]
        leaves = [x.detach().to(DEVICE).clone().requires_grad_(g) for x, g in zip(inputs, grad)]
        out = fn(*leaves)
        out.backward(torch.ones_like(out) if dy is None else dy.to(out.device, out.dtype))
        return [out.detach().cpu()] + [x.grad.cpu() for x, g in zip(leaves, grad) if g]
    finally:
        model.set_kernels(previous)


def check(triton_fn, inputs, dtypes, twin_fn=None, grad=None):
    """fp32: Triton equals the PyTorch twin to 1e-5 (output and every gradient).

    bf16: an fp32 run of the twin on the same (rounded) values is the reference. Triton may be at
    most 2x (plus 1e-4) as far from it as the twin's own bf16 run is, or as merely storing the
    reference in bf16 the interpreter's way is (see truncated): rounding, but no further loss."""
    twin_fn = twin_fn or triton_fn
    low = [x.to(d) if x.is_floating_point() else x for x, d in zip(inputs, dtypes)]
    high = [x.float() if x.is_floating_point() else x for x in low]
    shape = run("torch", twin_fn, high, grad=grad)[0].shape
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(9))  # the gradient flowing in
    ref = run("torch", twin_fn, high, dy, grad)
    got = run("triton", triton_fn, low, dy, grad)
    assert len(got) == len(ref)
    if all(d == torch.float32 for d in dtypes):
        for name, g, r in zip(["output", "grad 0", "grad 1"], got, ref):
            assert g.dtype == r.dtype and g.shape == r.shape, name
            assert rel_err(g, r) < 1e-5, (name, rel_err(g, r))
        return
    twin = run("torch", twin_fn, low, dy, grad)
    for name, g, t, r in zip(["output", "grad 0", "grad 1"], got, twin, ref):
        assert g.dtype == t.dtype and g.shape == t.shape, name
        limit = 2 * max(rel_err(t, r), rel_err(truncated(r), r)) + 1e-4
        assert rel_err(g, r) <= limit, (name, rel_err(g, r), rel_err(t, r))


def truncated(x):
    """x stored in bf16 as Triton's interpreter casts: dropping the low 16 bits (round toward zero,
    triton/runtime/interpreter.py cast_impl), about twice the error of torch's (and the GPU's)
    round-to-nearest-even."""
    return (x.float().contiguous().view(torch.int32) & -65536).view(torch.float32)


LOW = [torch.float32, torch.bfloat16]


# -- each kernel against its twin ---------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize("dtypes", [(torch.float32,) * 2, (torch.bfloat16,) * 2, (torch.bfloat16, torch.float32)],
                         ids=["fp32", "bf16", "bf16-x-fp32-weight"])
def test_rms_norm(dtypes):
    g = torch.Generator().manual_seed(0)
    x, w = 3 * torch.randn(2, 37, 100, generator=g), 1 + 0.1 * torch.randn(100, generator=g)
    check(lambda x, w: model.rms_norm(x, w, 1e-5), [x, w], dtypes)
    # the interpreter really ran: kernels were decorated with TRITON_INTERPRET=1 in effect
    if DEVICE == "cpu":
        assert type(model._rms_norm_fwd).__name__ == "InterpretedFunction"


def _rope_table():
    args = model.ModelArgs(dim=72, n_heads=3, rope_theta=500000.0, use_scaled_rope=True, max_seq_len=128)
    return model.rope_table(args)  # head_dim 24, Llama 3.1 scaling


@needs_triton
@pytest.mark.parametrize("dtype", LOW, ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout", ["table", "positions", "strided"])
def test_rope(dtype, layout):
    g = torch.Generator().manual_seed(1)
    table = _rope_table().to(DEVICE)
    if layout == "table":  # a window of positions, as when decoding after a cache
        x, fn = torch.randn(2, 37, 3, 24, generator=g), lambda x: model.apply_rope(x, table[5:42])
    elif layout == "positions":  # packed rows: each token's own position
        rope = table[torch.randint(0, 128, (2, 37), generator=g).to(DEVICE)]
        x, fn = torch.randn(2, 37, 3, 24, generator=g), lambda x: model.apply_rope(x, rope)
    else:  # a transposed view in, and a transposed gradient back, as attention gives
        x = torch.randn(2, 3, 37, 24, generator=g)
        fn = lambda x: model.apply_rope(x.transpose(1, 2), table[:37]).transpose(1, 2)  # noqa: E731
    check(fn, [x], [dtype])


@needs_triton
@pytest.mark.parametrize("dtype", LOW, ids=["fp32", "bf16"])
def test_swiglu(dtype):
    g = torch.Generator().manual_seed(2)
    a, b = 3 * torch.randn(2, 37, 100, generator=g), torch.randn(2, 37, 100, generator=g)
    check(model.swiglu, [a, b], [dtype, dtype])


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("shape", [(96, 200), (7,), (3, 1000)], ids=["96x200", "7", "3x1000"])
def test_nf4_dequantize(dtype, shape):
    """Exactly the PyTorch twin's values: one fp32 product per weight, rounded once (odd counts, a
    partial last block of 64 and a partial last program included)."""
    g = torch.Generator().manual_seed(4)
    q = model.nf4_quantize(0.05 * torch.randn(shape, generator=g))
    packed = q["packed"].to(DEVICE)
    absmax = model.nf4_absmax(*(q[k].to(DEVICE) for k in ("absmax", "absmax_scale", "absmax_offset")))
    twin = model.nf4_dequantize.__wrapped__(packed, absmax, shape, dtype)
    previous = model.set_kernels("triton")
    try:
        kernel = model.nf4_dequantize(packed, absmax, shape, dtype)
    finally:
        model.set_kernels(previous)
    assert kernel.dtype == dtype and torch.equal(kernel, twin)


def _ce_inputs(seed=3, V=1000):
    g = torch.Generator().manual_seed(seed)
    h, w = torch.randn(2, 37, 72, generator=g), 0.3 * torch.randn(V, 72, generator=g)
    targets = torch.randint(0, V, (2, 37), generator=g)
    targets[0, :9] = -100  # prompt tokens
    targets[1, -1] = -100
    return h, w, targets.to(DEVICE)


def _twin_ce(targets, reduction):
    return lambda h, w: F.cross_entropy(F.linear(h, w).float().flatten(0, 1), targets.flatten(),
                                        ignore_index=-100, reduction=reduction)


@needs_triton
@pytest.mark.parametrize("dtype", LOW, ids=["fp32", "bf16"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_linear_cross_entropy(dtype, reduction, monkeypatch):
    # 74 rows in chunks of 16 (the last one 10 rows); 1000 vocabulary columns in sweeps of 256
    # (the last one 232 wide).
    monkeypatch.setattr(model, "_CE_BLOCK", 256)
    h, w, targets = _ce_inputs()
    fused = lambda h, w: model.linear_cross_entropy(h, w, targets, reduction=reduction, chunk_size=16)  # noqa: E731
    check(fused, [h, w], [dtype, dtype], twin_fn=_twin_ce(targets, reduction))


@needs_triton
def test_linear_cross_entropy_frozen_and_no_grad():
    h, w, targets = _ce_inputs(V=300)
    fused = lambda h, w: model.linear_cross_entropy(h, w, targets, chunk_size=20)  # noqa: E731
    twin = _twin_ce(targets, "mean")
    for grad in ([True, False], [False, True]):  # LoRA freezes the weight; a frozen input
        got, ref = run("triton", fused, [h, w], grad=grad), run("torch", twin, [h, w], grad=grad)
        assert len(got) == 2 and all(rel_err(g, r) < 1e-5 for g, r in zip(got, ref))
    model.set_kernels("triton")
    with torch.no_grad():  # evaluation: the kernel writes no gradient
        h, w = h.to(DEVICE), w.to(DEVICE)
        assert rel_err(fused(h, w), twin(h, w)) < 1e-5


@pytest.mark.parametrize("kind", ["torch", pytest.param("triton", marks=needs_triton)])
def test_all_targets_ignored(kind):
    """A batch with no targets (a micro-step of prompt tokens only): mean is 0, not NaN, with zero
    gradients; sum is 0."""
    h, w, _ = _ce_inputs(V=300)
    targets = torch.full((2, 37), -100, device=DEVICE)
    for reduction in ("mean", "sum"):
        fn = lambda h, w: model.linear_cross_entropy(h, w, targets, reduction=reduction, chunk_size=32)  # noqa: E731
        loss, dh, dw = run(kind, fn, [h, w])
        assert loss.item() == 0.0
        assert torch.all(dh == 0) and torch.all(dw == 0)


@pytest.mark.parametrize("kind", ["torch", pytest.param("triton", marks=needs_triton)])
def test_sum_is_mean_times_targets(kind):
    h, w, targets = _ce_inputs(V=300)
    h, w = h.to(DEVICE), w.to(DEVICE)
    model.set_kernels(kind)
    n = (targets != -100).sum()
    mean = model.linear_cross_entropy(h, w, targets)
    total = model.linear_cross_entropy(h, w, targets, reduction="sum")
    assert rel_err(total, mean * n) < 1e-6
    assert rel_err(mean, F.cross_entropy(F.linear(h, w).flatten(0, 1), targets.flatten())) < 1e-6


# -- the whole model -----------------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize("variant,packed", [("llama3.1", False), ("llama3.2", True)])
def test_model_loss_and_every_gradient(variant, packed):
    """Transformer(tokens, targets): the loss and every parameter's gradient agree between
    LLAMA_KERNELS=torch and triton (llama3.2 adds the tied output and packed-row positions)."""
    torch.manual_seed(0)
    m = model.Transformer(VARIANTS[variant]["args"]).to(DEVICE)
    if VARIANTS[variant]["tied"]:
        m.tie_weights()
    m.init_weights(std=0.08)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))  # not all ones, so a wrong weight gradient shows
    g = torch.Generator().manual_seed(4)
    tokens = torch.randint(0, m.args.vocab_size, (2, 37), generator=g)
    targets = torch.roll(tokens, -1, dims=1)
    targets[:, -1], targets[0, :6] = -100, -100
    kwargs = {}
    if packed:  # two documents in row 0: positions restart at 0
        kwargs["positions"] = torch.cat([torch.arange(20), torch.arange(17)]).repeat(2, 1)
        kwargs["positions"][1] = torch.arange(37)
    tokens, targets = tokens.to(DEVICE), targets.to(DEVICE)
    kwargs = {k: v.to(DEVICE) for k, v in kwargs.items()}

    results = {}
    for kind in ("torch", "triton"):
        model.set_kernels(kind)
        m.zero_grad()
        loss = m(tokens, targets, **kwargs)
        loss.backward()
        results[kind] = loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}
    (loss_t, grads_t), (loss_k, grads_k) = results["torch"], results["triton"]
    assert rel_err(loss_k, loss_t) < 1e-5
    assert grads_t.keys() == grads_k.keys()
    for name in grads_t:
        assert rel_err(grads_k[name], grads_t[name]) < 1e-5, (name, rel_err(grads_k[name], grads_t[name]))
    with torch.no_grad():  # logits (inference) through the same kernels
        logits_k = m(tokens, **kwargs)
        model.set_kernels("torch")
        assert rel_err(logits_k, m(tokens, **kwargs)) < 1e-5


# -- compiled ahead of time for the GPU -----------------------------------------------------------

# Each kernel as a bf16 training step on a GPU launches it, at Llama 3 8B's sizes: the types of its
# arguments (in order, constexprs left out), its constexprs and its warps. triton.compile with a
# GPUTarget needs no GPU (triton ships ptxas): it proves each kernel builds for the real hardware,
# which the interpreter above cannot.
GPU_LAUNCHES = {
    "_rms_norm_fwd": ("*bf16 *fp32 *fp32 *fp32 i32 fp32", dict(BLOCK=4096), model._warps(4096)),
    "_rms_norm_bwd": ("*fp32 *bf16 *fp32 *fp32 *bf16 *fp32 i32 i32 i32", dict(BLOCK=4096), model._warps(4096)),
    "_rope": ("*bf16 *fp32 *bf16 i32 i32 i32 i32 i32 i32 i32 fp32", dict(BLOCK_H=32, BLOCK_P=64), 4),
    "_swiglu_fwd": ("*bf16 *bf16 *bf16 i32", dict(BLOCK=1024), 4),
    "_swiglu_bwd": ("*bf16 *bf16 *bf16 *bf16 *bf16 i32", dict(BLOCK=1024), 4),
    "_cross_entropy": ("*bf16 i32 *i64 *fp32 *fp32 i32 i32", dict(WRITE_GRAD=True, BLOCK=8192), model._warps(8192)),
    "_nf4_dequantize": ("*u8 *fp32 *fp32 *bf16 i32", dict(BLOCK=model._NF4_ELEMENTS), 4),
}


# In a process of its own, without TRITON_INTERPRET: triton makes its own library functions (tl.sum,
# ...) interpreted too when that is set at its import, and those cannot be compiled.
_COMPILE = r"""
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import model
results = {"kernels": sorted(n for n, v in vars(model).items() if isinstance(v, triton.runtime.jit.JITFunction))}
for name, (types, constexprs, warps) in json.loads(sys.argv[1]).items():
    kernel = getattr(model, name)
    arguments = [a for a in kernel.arg_names if a not in constexprs]
    signature = dict(zip(arguments, types.split()), **{c: "constexpr" for c in constexprs})
    for arch in (80, 90):
        try:
            assert len(arguments) == len(types.split()), f"arguments {arguments}, types {types}"
            source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
            asm = triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps}).asm
            results[f"{name} sm_{arch}"] = {"elf": asm["cubin"][:4] == b"\x7fELF",
                                            "target": f".target sm_{arch}" in asm["ptx"]}
        except Exception as e:
            results[f"{name} sm_{arch}"] = {"error": f"{type(e).__name__}: {e}"}
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def compiled_for_gpu(tmp_path_factory):
    """Every kernel compiled for sm_80 and sm_90, into a fresh cache (compiled now, not found)."""
    import json

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path_factory.mktemp("triton_cache")), TRITON_DEFAULT_FP_FUSION="1")
    p = subprocess.run([sys.executable, "-c", _COMPILE, json.dumps(GPU_LAUNCHES)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


@needs_triton
def test_every_kernel_is_compiled_for_the_gpu(compiled_for_gpu):
    assert compiled_for_gpu["kernels"] == sorted(GPU_LAUNCHES)


@needs_triton
@pytest.mark.parametrize("arch", [80, 90], ids=["sm_80", "sm_90"])
@pytest.mark.parametrize("name", list(GPU_LAUNCHES))
def test_kernel_compiles_for_the_gpu(compiled_for_gpu, name, arch):
    assert compiled_for_gpu[f"{name} sm_{arch}"] == {"elf": True, "target": True}  # a cubin for this arch


# -- choosing the path ---------------------------------------------------------------------------


def test_choice():
    x = torch.ones(3)
    assert model.set_kernels(None) is None
    assert not model.use_triton(x)  # default: PyTorch off CUDA
    model.set_kernels("torch")
    assert not model.use_triton(x)
    with pytest.raises(ValueError, match="expected"):
        model.set_kernels("cuda")


def _python(code, **env_changes):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "LLAMA_KERNELS")}
    env.update(env_changes)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)


def test_forced_triton_on_cpu_without_interpreter_is_an_error():
    p = _python("import torch, model; model.rms_norm(torch.ones(2, 8), torch.ones(8), 1e-5)", LLAMA_KERNELS="triton")
    assert p.returncode != 0
    assert "KernelError: LLAMA_KERNELS=triton on a cpu tensor" in p.stderr and "TRITON_INTERPRET=1" in p.stderr
    p = _python("import torch, model; print(model.rms_norm(torch.ones(2, 8), torch.ones(8), 0.0).sum().item())")
    assert p.returncode == 0 and p.stdout.strip() == "16.0", p.stderr  # unset: PyTorch on the CPU


def test_bad_env_value_is_an_error():
    p = _python("import torch, model; model.swiglu(torch.ones(2), torch.ones(2))", LLAMA_KERNELS="cuda")
    assert p.returncode != 0 and "LLAMA_KERNELS=cuda: expected triton or torch" in p.stderr


def test_import_without_triton():
    """`import model` works without triton (the PyTorch twins run); forcing it then says why it cannot."""
    code = ("import sys; sys.modules['triton'] = None\n"  # makes `import triton` fail
            "import torch, model\n"
            "assert 'triton' not in [m.split('.')[0] for m in sys.modules if sys.modules[m] is not None]\n"
            "print(model.rms_norm(torch.ones(2, 8), torch.ones(8), 0.0).sum().item())\n"
            "model.set_kernels('triton'); model.rms_norm(torch.ones(2, 8), torch.ones(8), 1e-5)\n")
    p = _python(code, TRITON_INTERPRET="1")
    assert p.stdout.strip() == "16.0", p.stderr
    assert p.returncode != 0 and "KernelError: LLAMA_KERNELS=triton but triton cannot be imported" in p.stderr
