"""cpu_gemv.c, one token's projections on a CPU: against a float64 reference, row by row, at the
shapes that reach its edges; its decode_blocks (a whole step's blocks) against model.py's loop over
them and a float64 model; in a decoding step against transformers' bf16 model; and the ways it steps
aside (no compiler, autograd, LLAMA_KERNELS=torch, a second OpenMP runtime, a block not plain)."""

import importlib
import math
import os
import tempfile

import pytest
import torch

import checkpoint
import cpu_gemv
import generate
import model
from ckpt_utils import hf_model, meta_params_for, meta_state_dict, rel_err, write_meta

needs_kernel = pytest.mark.skipif(cpu_gemv.mv(torch.zeros(1, 1, dtype=torch.bfloat16),
                                              torch.zeros(1, dtype=torch.bfloat16)) is None,
                                  reason=f"cpu_gemv cannot run here: {cpu_gemv.status()}")


def bf16_ulp(v: torch.Tensor) -> torch.Tensor:
    """The spacing of bf16 numbers at |v| (8 significant bits)."""
    exponent = torch.floor(torch.log2(v.abs().clamp_min(2.0 ** -126)))
    return torch.pow(2.0, exponent - 7)


def assert_rounded_fp32_sum(y, W, x):
    """y is a float32 sum of W x, rounded to x's dtype: within the float32 summation bound of the
    exact value, plus (for bf16) half a bf16 step of where that sum can lie."""
    products = W.double() * x.double()
    exact = products.sum(1)
    K = W.shape[1]
    summation = (K + 1) * 2.0 ** -24 * products.abs().sum(1)  # fp32 sums in any order: |error| <= K u sum|wx|
    allowed = summation + (0.5 * bf16_ulp(exact.abs() + summation) if x.dtype == torch.bfloat16 else 0)
    error = (y.double() - exact).abs()
    assert y.dtype == x.dtype and y.shape == (W.shape[0],)
    assert bool((error <= allowed).all()), f"worst row {int((error / allowed).argmax())}: {error.max():.3g}"


@needs_kernel
@pytest.mark.parametrize("N,K", [(1, 1), (3, 31), (4, 32), (5, 33), (7, 64), (9, 2049), (4097, 128), (64, 8192),
                                 (1000, 999)])
def test_kernel_equals_the_float64_product_rounded(N, K):
    g = torch.Generator().manual_seed(N * 10007 + K)
    W = torch.randn(N, K, generator=g).to(torch.bfloat16)
    x = torch.randn(K, generator=g).to(torch.bfloat16)
    y = cpu_gemv.mv(W, x)
    assert_rounded_fp32_sum(y, W, x)
    # and as close as torch.mv's own bf16 kernel: both sum in fp32, so they differ by a bf16 step at most
    assert bool(((y.double() - torch.mv(W, x).double()).abs() <= bf16_ulp(torch.mv(W.double(), x.double()))).all())


@needs_kernel
@pytest.mark.parametrize("weights", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("activations", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("N,K", [(1, 1), (5, 33), (9, 2049), (1000, 999)])
def test_every_stored_dtype_into_bf16_or_fp32_activations(weights, activations, N, K):
    """A weight as the checkpoint stores it, widened exactly as it is read: W x summed in fp32 and
    given in the activations' dtype, as torch.mv gives it from a widened copy of W."""
    g = torch.Generator().manual_seed(N + K)
    W = torch.randn(N, K, generator=g).to(weights)
    x = torch.randn(K, generator=g).to(activations)
    y = cpu_gemv.mv(W, x)
    assert_rounded_fp32_sum(y, W, x)
    if activations == torch.float32:  # equal to torch's fp32 product up to the order of the sums
        torch.testing.assert_close(y, torch.mv(W.float(), x), rtol=1e-5, atol=1e-5 * math.sqrt(K))


@needs_kernel
def test_every_fp16_value_is_widened_exactly():
    """All 65,536 fp16 bit patterns, subnormals, infinities and NaNs included, one per row of W."""
    W = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.float16).view(-1, 1)
    y, want = cpu_gemv.mv(W, torch.ones(1)), W[:, 0].float()
    assert torch.equal(y.isnan(), want.isnan()) and torch.equal(y[~want.isnan()], want[~want.isnan()])


@needs_kernel
def test_kernel_on_views_threads_and_special_values():
    g = torch.Generator().manual_seed(0)
    big = torch.randn(300, 70, generator=g).to(torch.bfloat16)
    W, x = big[10:110], big[200, :]  # contiguous views at an offset into a larger storage
    for threads in (1, 2, 3):
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            assert_rounded_fp32_sum(cpu_gemv.mv(W, x), W, x)
        finally:
            torch.set_num_threads(previous)
    W = W.clone()
    W[3, 5], W[7, 0], W[8, 1], W[8, 2] = float("nan"), float("inf"), float("inf"), float("-inf")
    y = cpu_gemv.mv(W, x.abs() + 1)
    assert torch.isnan(y[3]) and torch.isinf(y[7]) and torch.isnan(y[8])  # inf - inf is NaN, as in fp32
    rest = [i for i in range(W.shape[0]) if i not in (3, 7, 8)]
    assert torch.isfinite(y[rest]).all()
    # exact ties round to even, as torch's bf16 rounding does: 1 + 2^-8 -> 1, 1 + 3 * 2^-8 -> 1 + 2^-6
    W = torch.tensor([[1.0, 2.0 ** -8], [1.0, 3 * 2.0 ** -8]], dtype=torch.bfloat16)
    y = cpu_gemv.mv(W, torch.tensor([1.0, 1.0], dtype=torch.bfloat16))
    assert y.tolist() == [1.0, 1.0 + 2.0 ** -6]
    assert cpu_gemv.mv(big.t(), x) is None  # not row-major: the caller's torch.mv takes it


@needs_kernel
@pytest.mark.parametrize("weights", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("activations", [torch.bfloat16, torch.float32])
def test_several_weights_in_one_call_equal_one_at_a_time(weights, activations):
    """mv_many: the rows of every weight, split between the threads as one band, each row's sum as mv
    computes it alone (bit for bit); a weight of another dtype or shape sends the caller to the twin."""
    g = torch.Generator().manual_seed(3)
    Ws = [torch.randn(N, 67, generator=g).to(weights) for N in (5, 1, 33, 12)]
    x = torch.randn(67, generator=g).to(activations)
    for threads in (1, 2, 3):
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            y = cpu_gemv.mv_many(Ws, x)
        finally:
            torch.set_num_threads(previous)
        assert torch.equal(y, torch.cat([cpu_gemv.mv(W, x) for W in Ws]))
    assert_rounded_fp32_sum(y, torch.cat(Ws), x)
    assert cpu_gemv.mv_many([Ws[0], Ws[1].double()], x) is None
    assert cpu_gemv.mv_many([Ws[0], torch.randn(3, 66).to(weights)], x) is None


@needs_kernel
def test_projections_share_one_call_only_for_plain_layers(monkeypatch):
    """model.projections: one token on a CPU, plain Linear layers in one kernel call, each output equal
    to the layer's own; a layer of another kind (LoRA's) or a prompt of several tokens, one at a time."""
    import lora

    torch.manual_seed(0)
    layers = [model.Linear(48, n).to(torch.bfloat16) for n in (32, 8, 8)]
    x = torch.randn(1, 1, 48, dtype=torch.bfloat16)
    calls = []
    real = cpu_gemv.mv_many
    monkeypatch.setattr(cpu_gemv, "mv_many", lambda Ws, x: calls.append(len(Ws)) or real(Ws, x))
    with torch.no_grad():
        together = model.projections(x, *layers)
        assert calls == [3]
        for y, layer in zip(together, layers):
            assert y.shape == (1, 1, layer.out_features) and torch.equal(y, layer(x))
        calls.clear()
        model.projections(torch.randn(1, 4, 48, dtype=torch.bfloat16), *layers)
        assert calls == []
        adapted = lora.LoRALinear(layers[0], rank=2, alpha=4.0)
        model.projections(x, adapted, *layers[1:])
        assert calls == [1, 1, 1]  # each layer alone (the adapter's base through the kernel)


@pytest.fixture(scope="module")
def bf16_pair(tmp_path_factory):
    """transformers' model and ours, both in bf16, from one bf16 checkpoint."""
    hf = hf_model("llama3.1", seed=5).to(torch.bfloat16)
    hf.generation_config.eos_token_id = None
    path = write_meta(meta_state_dict(hf), meta_params_for("llama3.1"), tmp_path_factory.mktemp("bf16"))
    return hf, checkpoint.load(path, dtype=torch.bfloat16)


@needs_kernel
def test_bf16_decoding_runs_the_kernel_and_matches_transformers(bf16_pair, monkeypatch):
    hf, m = bf16_pair
    calls, weights = [], []
    real = cpu_gemv.mv_many
    monkeypatch.setattr(cpu_gemv, "mv_many", lambda Ws, x: calls.append(len(Ws)) or weights.extend(Ws) or real(Ws, x))
    blocks, real_blocks = [], cpu_gemv.decode_blocks
    monkeypatch.setattr(cpu_gemv, "decode_blocks",
                        lambda plan, *a: blocks.append(len(plan[0]) // len(cpu_gemv.BLOCK_TENSORS)) or real_blocks(plan, *a))
    prompt = [5, 17, 99, 3, 250, 42, 7]
    with torch.no_grad():
        m.setup_cache(1, 32)
        m.decode(torch.tensor([prompt]), 0)
        calls.clear(), weights.clear()  # the prompt's products are matrix products; its last token's output a mv
        ours = m.decode(torch.tensor([[11]]), len(prompt))[0, -1]
        ref = hf(torch.tensor([prompt + [11]])).logits[0, -1].float()
    # the one-token step's blocks in one decode_blocks call, then the output layer through mv
    assert blocks == [len(m.layers)] and len(weights) == 1 and weights[0] is m.output.weight and calls == [1]
    # both in bf16 from here: the gap is bf16 rounding through the layers, not a wrong product
    assert (ours - ref).abs().max() <= 0.02 * ref.abs().max()
    tokens = generate.generate(m, [prompt], max_new_tokens=12, temperature=0)[0]
    with torch.no_grad():
        want = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=12, pad_token_id=0)[0, len(prompt):]
    assert tokens == want.tolist()


def _decoding_model(weights, n_kv_heads, seed=0):
    """A small random model in `weights` with norms far from 1 (their rounding then shows)."""
    torch.manual_seed(seed)
    m = model.Transformer(model.ModelArgs(dim=128, n_layers=3, n_heads=4, n_kv_heads=n_kv_heads, vocab_size=300,
                                          multiple_of=32, max_seq_len=64))
    m.init_weights(std=0.05)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(1.0, 0.3)
    return m.to(weights).eval()


def _steps(m, tokens, prompt=5):
    """Logits of a prompt's pass, then of one-token steps to the end, and the caches after them."""
    m.setup_cache(1, 64)
    with torch.inference_mode():
        logits = [m.decode(tokens[:, :prompt], 0)[:, -1]]
        logits += [m.decode(tokens[:, t:t + 1], t)[:, -1] for t in range(prompt, tokens.shape[1])]
    caches = [torch.cat([layer.attention.cache.k, layer.attention.cache.v]) for layer in m.layers]
    return torch.cat(logits).double(), torch.stack(caches).double()


@needs_kernel
@pytest.mark.parametrize("weights,compute", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                             (torch.bfloat16, torch.float32), (torch.float16, torch.float32)])
@pytest.mark.parametrize("n_kv_heads", [4, 2])
def test_a_decoding_step_in_one_call_equals_the_blocks_one_by_one(weights, compute, n_kv_heads, monkeypatch):
    """decode_blocks (every block of a one-token step in C) against model.py's own loop over the blocks
    (the same products, PyTorch around them): fp32 to fp32 accuracy, and also against the same model in
    float64; bf16 activations equal but for a rounding here and there (sums in another order), on 1 and
    2 threads, grouped-query and not, the KV cache's contents included."""
    m = _decoding_model(weights, n_kv_heads)
    m.compute_dtype = None if compute == weights else compute  # bf16 weights, fp32 activations: cpu_paths' AVX2 plan
    tokens = torch.randint(0, 300, (1, 24), generator=torch.Generator().manual_seed(1))
    called, real = [], cpu_gemv.decode_blocks
    monkeypatch.setattr(cpu_gemv, "decode_blocks", lambda *a: called.append(1) or real(*a))
    previous = torch.get_num_threads()
    try:
        runs = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            runs.append(_steps(m, tokens))
    finally:
        torch.set_num_threads(previous)
    assert len(called) == 2 * 19
    with monkeypatch.context() as patch:
        patch.setattr(model.Transformer, "_cpu_step", lambda self, h, rope, pos: None)
        loop = _steps(m, tokens)
    for (logits, caches), (want_logits, want_caches) in zip(runs, [loop, loop]):
        if compute == torch.float32:
            assert rel_err(logits, want_logits) < 1e-5 and rel_err(caches, want_caches) < 1e-5
        else:  # bf16 steps: most values bit for bit, the rest within a few bf16 roundings
            assert (logits == want_logits).float().mean() > 0.9 and (caches == want_caches).float().mean() > 0.95
            assert (logits - want_logits).abs().max() <= 0.03 * want_logits.abs().max()
    if compute == torch.float32:
        wide = _decoding_model(torch.float64, n_kv_heads)
        wide.load_state_dict({k: v.double() for k, v in m.state_dict().items()})
        assert rel_err(runs[0][0], _steps(wide, tokens)[0]) < 1e-5


@needs_kernel
def test_a_decoding_step_goes_block_by_block_where_the_kernel_cannot_take_it(monkeypatch):
    """The PyTorch loop, and the same logits, for a LoRA block, a hook, autograd on trainable weights,
    two rows, fp16 activations and LLAMA_KERNELS=torch; the kernel for a plain model."""
    import lora

    tokens = torch.randint(0, 300, (1, 10), generator=torch.Generator().manual_seed(2))
    called, real = [], cpu_gemv.decode_blocks

    def kernel(*args):
        done = real(*args)
        if done is not None:
            called.append(1)
        return done

    monkeypatch.setattr(cpu_gemv, "decode_blocks", kernel)

    def by_blocks(m, rows=tokens):
        """(logits through decode, logits with _cpu_step turned off); whether the kernel ran."""
        called.clear()
        m.setup_cache(rows.shape[0], 16)
        with torch.no_grad():
            m.decode(rows[:, :4], 0)
            got = m.decode(rows[:, 4:5], 4)
        ran = bool(called)
        with monkeypatch.context() as patch:
            patch.setattr(model.Transformer, "_cpu_step", lambda self, h, rope, pos: None)
            m.setup_cache(rows.shape[0], 16)
            with torch.no_grad():
                m.decode(rows[:, :4], 0)
                want = m.decode(rows[:, 4:5], 4)
        return torch.equal(got, want), ran

    m = _decoding_model(torch.float32, 2)
    assert by_blocks(m)[1]  # plain: the kernel runs
    adapted = _decoding_model(torch.float32, 2)
    adapted.layers[1].feed_forward.w2 = lora.LoRALinear(adapted.layers[1].feed_forward.w2, rank=2, alpha=4.0)
    assert by_blocks(adapted) == (True, False)
    hooked = _decoding_model(torch.float32, 2)
    seen = []
    hooked.layers[2].attention.register_forward_hook(lambda mod, args, out: seen.append(out.shape))
    assert by_blocks(hooked) == (True, False) and seen
    assert by_blocks(_decoding_model(torch.float32, 2), tokens.repeat(2, 1)) == (True, False)
    assert by_blocks(_decoding_model(torch.float16, 2)) == (True, False)
    torch.manual_seed(0)  # a head_dim of 6: the kernel's attention takes multiples of 4
    odd = model.Transformer(model.ModelArgs(dim=24, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300,
                                            multiple_of=8, max_seq_len=64))
    odd.init_weights()
    assert by_blocks(odd.eval()) == (True, False)
    trainable = _decoding_model(torch.float32, 2).train()
    called.clear()
    trainable.setup_cache(1, 16)
    trainable.decode(tokens[:, :1], 0).sum().backward()  # autograd: no kernel, and a gradient
    assert not called and trainable.layers[0].attention.wq.weight.grad is not None
    previous = model.set_kernels("torch")
    try:
        assert by_blocks(_decoding_model(torch.float32, 2)) == (True, False)
    finally:
        model.set_kernels(previous)


@needs_kernel
def test_the_steps_exp_is_within_two_units_in_the_last_place():
    """exp_f32 (softmax's and SiLU's e^x in decode_blocks) over every 97th fp32 in [-87, 88] and the
    edges: within 2 ulp of float64's e^x rounded; 0 far below, infinity far above, NaN kept."""
    import ctypes

    library = ctypes.CDLL(cpu_gemv._build())
    library.exp_many.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    low, high = (torch.tensor([v], dtype=torch.float32).view(torch.int32).item() for v in (-87.0, 88.0))
    positive = torch.arange(0, high, 97, dtype=torch.int32).view(torch.float32)
    negative = torch.arange(0, low + (1 << 31), 97, dtype=torch.int32).view(torch.float32).neg()
    x = torch.cat([negative, positive, torch.tensor([-1e4, -88.0, 89.0, 1e4, float("nan"), 0.0, -0.0])])
    y = torch.empty_like(x)
    library.exp_many(x.data_ptr(), y.data_ptr(), x.numel())
    exact = x.double().exp()
    inside = (x >= -87.0) & (x <= 88.0)
    ulp = (exact[inside].float().nextafter(torch.tensor(float("inf"))) - exact[inside].float()).double()
    assert ((y[inside].double() - exact[inside]).abs() <= 2 * ulp).all()
    assert y[-7:-3].tolist() == [0.0, 0.0, float("inf"), float("inf")] and math.isnan(y[-3]) and y[-2:].tolist() == [1, 1]


@needs_kernel
def test_a_decoding_step_follows_weights_that_moved(monkeypatch):
    """The checked plan is of tensors as they lay: weights replaced by others (load_state_dict with
    assign) or moved (.to) are read where they are now, never where they were, and a cache of another
    length at the old one's address is read in its own layout."""
    tokens = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(4))
    m, other = _decoding_model(torch.float32, 2, seed=0), _decoding_model(torch.float32, 2, seed=1)
    first = _steps(m, tokens)[0]
    m.load_state_dict({k: v.clone() for k, v in other.state_dict().items()}, assign=True)
    with monkeypatch.context() as patch:
        patch.setattr(model.Transformer, "_cpu_step", lambda self, h, rope, pos: None)
        want = _steps(other, tokens)[0]
    assert rel_err(_steps(m, tokens)[0], want) < 1e-5 and rel_err(first, want) > 0.1
    m.to(torch.bfloat16)
    assert rel_err(_steps(m, tokens)[0], want) < 0.05
    # a cache of another length at the same address: each layer's k and v, cut to 16 slots in place
    m = _decoding_model(torch.float32, 2, seed=0)
    short = []
    for patched in (False, True):
        with monkeypatch.context() as patch:
            if patched:
                patch.setattr(model.Transformer, "_cpu_step", lambda self, h, rope, pos: None)
            m.setup_cache(1, 64)
            with torch.inference_mode():
                m.decode(tokens[:, :3], 0)
                m.decode(tokens[:, 3:4], 3)  # the plan made for a cache of 64 slots
                for layer in m.layers:
                    cache = layer.attention.cache
                    for name in ("k", "v"):
                        full = getattr(cache, name)
                        kept, cut = full[:, :, :16].clone(), full[:, :, :16].numel()
                        setattr(cache, name, full.flatten()[:cut].view(1, 2, 16, -1))
                        getattr(cache, name).copy_(kept)
                        full.flatten()[cut:] = float("nan")  # where the old layout's second head lay
                short.append(torch.cat([m.decode(tokens[:, t:t + 1], t)[:, -1] for t in range(4, 12)]))
    assert rel_err(short[0], short[1]) < 1e-5


def test_twin_runs_where_the_kernel_steps_aside(monkeypatch):
    def no(W, x):
        raise AssertionError("cpu_gemv.mv called")

    monkeypatch.setattr(cpu_gemv, "mv", no)
    layer = model.Linear(48, 16).to(torch.bfloat16)
    x = torch.randn(1, 1, 48, dtype=torch.bfloat16)
    expected = torch.mv(layer.weight.detach(), x.reshape(-1)).view(1, 1, 16)
    y = layer(x)  # the weight needs a gradient: the kernel has no backward
    assert torch.equal(y.detach(), expected)
    y.float().sum().backward()
    assert layer.weight.grad is not None
    previous = model.set_kernels("torch")
    try:
        with torch.no_grad():
            assert torch.equal(layer(x), expected)
        assert model.cpu_mv_kernel() == "torch.mv (LLAMA_KERNELS=torch)"
    finally:
        model.set_kernels(previous)
    previous = model.set_kernels("torch")
    try:  # the twin reads a weight narrower than the activations by widening it first
        with torch.no_grad():
            assert torch.equal(layer(x.float()), torch.mv(layer.weight.float(), x.reshape(-1).float()).view(1, 1, 16))
    finally:
        model.set_kernels(previous)


def test_no_compiler_means_torch_mv(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu_gemv, "_kernel", None)
    monkeypatch.setattr(cpu_gemv, "_why_not", None)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # no library built before
    monkeypatch.setenv("CC", "false")  # a "compiler" that fails
    W, x = torch.ones(3, 4, dtype=torch.bfloat16), torch.ones(4, dtype=torch.bfloat16)
    assert cpu_gemv.mv(W, x) is None
    assert cpu_gemv.status().startswith("torch.mv (false could not build cpu_gemv.c")
    with torch.no_grad():
        assert model.Linear(4, 3).to(torch.bfloat16)(x[None]).shape == (1, 3)  # decoding still runs
    assert not list(tmp_path.rglob("*.so")) and not list(tmp_path.rglob("*tmp*"))  # nothing half-built left


@needs_kernel
def test_a_read_only_cache_builds_in_the_temporary_directory(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu_gemv, "_kernel", None)
    monkeypatch.setattr(cpu_gemv, "_why_not", None)
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "a-file" / "cache"))  # cannot be a directory
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    W, x = torch.randn(9, 40).to(torch.bfloat16), torch.randn(40).to(torch.bfloat16)
    assert_rounded_fp32_sum(cpu_gemv.mv(W, x), W, x)
    built = list((tmp_path / "tmp").rglob("cpu_gemv-*.so"))
    assert len(built) == 1 and built[0].parent.name.startswith("llama-trainer-")


def test_openmp_runtimes_are_read_from_the_maps():
    maps = ("7f00-7f01 r-xp 0 0 0 /venv/torch/lib/libgomp.so.1\n"
            "7f01-7f02 r--p 0 0 0 /venv/torch/lib/libgomp.so.1\n"
            "7f02-7f03 r-xp 0 0 0 /venv/sentencepiece.libs/libgomp-6a29c32d.so.1.0.0\n"
            "7f03-7f04 r-xp 0 0 0 /opt/intel/lib/libiomp5.so\n"
            "7f04-7f05 r-xp 0 0 0 /usr/lib/libc.so.6\n"
            "7f05-7f06 rw-p 0 0 0\n")
    assert cpu_gemv.openmp_runtimes(maps) == {"/venv/torch/lib/libgomp.so.1", "/opt/intel/lib/libiomp5.so",
                                              "/venv/sentencepiece.libs/libgomp-6a29c32d.so.1.0.0"}


def test_a_runtime_other_than_torchs_is_refused(monkeypatch):
    monkeypatch.setattr(cpu_gemv, "_kernel", None)
    monkeypatch.setattr(cpu_gemv, "_why_not", None)
    seen = iter([set(), {"/usr/lib/libgomp.so.1"}])  # before, then after loading
    monkeypatch.setattr(cpu_gemv, "_loaded_openmp", lambda: next(seen))
    assert cpu_gemv.mv(torch.ones(2, 2, dtype=torch.bfloat16), torch.ones(2, dtype=torch.bfloat16)) is None
    assert "would not be torch's (/usr/lib/libgomp.so.1)" in cpu_gemv.status()


@needs_kernel
def test_the_kernel_joins_torchs_openmp_runtime():
    importlib.import_module("sentencepiece")  # its wheel carries a private libgomp: not a reason to refuse

    with open("/proc/self/maps") as f:
        runtimes = cpu_gemv.openmp_runtimes(f.read())
    torch_dir = os.path.dirname(torch.__file__)
    assert cpu_gemv.status() == "cpu_gemv.c"
    assert [p for p in runtimes if p.startswith(torch_dir)], runtimes  # torch's own is among them


def test_bf16_ulp_helper():
    assert bf16_ulp(torch.tensor([1.0, 1.5, 2.0, 0.75])).tolist() == [2 ** -7, 2 ** -7, 2 ** -6, 2 ** -8]
    assert math.isclose(float(bf16_ulp(torch.tensor(3.0e-3))), 2.0 ** (math.floor(math.log2(3e-3)) - 7))
