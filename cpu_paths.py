"""How a checkpoint runs on this CPU: the dtype its weights stay in and the dtype it computes in,
decided once per process for checkpoint.load's default (no --dtype).

The weights stay as the checkpoint stores them (bf16, fp16 or fp32), used where they lie in the
file's mapping with no copy at load, wherever a fast path reads them. Each phase then takes its own:
  decode    one token's products read every weight once and are bound by memory: cpu_gemv.c reads
            bf16, fp16 and fp32 weights alike (half the bytes of fp32 for the first two), into bf16
            or fp32 activations (model.cpu_mv)
  prefill   a prompt's products are bound by arithmetic: F.linear in the compute dtype, a weight
            stored narrower than that widened a block of rows at a time as it is used (model.linear);
            in fp32, oneDNN's product instead where it is measured faster (fp32_products)
The compute dtype (the activations', the KV cache's) is the stored one where this CPU multiplies it
fast, else fp32. A capability list says where it cannot (no AVX-512 BF16 or AMX: PyTorch then
emulates bf16, and its bf16 matrix product on an AVX2 CPU ran 6x slower than its fp32 one), but not
that it can: where the instructions exist, a short measurement (a prompt-sized product each way,
about 20 ms, once per process) decides. Where the C kernel cannot be built, a narrow weight is widened at load
instead, as torch.mv cannot read it into wider activations.

Read top to bottom: plan (what checkpoint.load asks), native (capabilities, then the measurement),
fp32_products (which library multiplies a prompt's fp32 matrices), describe (the plan in words, for
generate.py's and bench.py's lines).
"""

import functools
import time

import torch

import cpu_gemv

HALF = (torch.bfloat16, torch.float16)
# The instructions without which PyTorch has no fast matrix product in that dtype (torch.cpu names).
INSTRUCTIONS = {torch.bfloat16: ("avx512_bf16", "amx_bf16", "bf16", "sve_bf16"),
                torch.float16: ("amx_fp16", "fp16_arith")}
MARGIN = 1.25  # the half dtype must be this much faster to be chosen: timing noise never flips a close call
FP32_MARGIN = 1.1  # oneDNN's fp32 product must be this much faster than F.linear's to be used


def plan(stored: torch.dtype):
    """(the dtype the weights stay in, the dtype to compute in) for weights stored in `stored`."""
    if stored not in HALF:
        return torch.float32, torch.float32
    if native(stored):
        return stored, stored
    if cpu_gemv.available():
        return stored, torch.float32  # widened as used: decode reads half the bytes
    return torch.float32, torch.float32  # widened once, at load


def native(dtype: torch.dtype) -> bool:
    """Whether this CPU multiplies dtype matrices faster than fp32 ones: it has the instructions,
    and a measured product says so."""
    caps = torch.cpu.get_capabilities()
    if not any(caps.get(name) for name in INSTRUCTIONS.get(dtype, ())):
        return False
    return _measured_faster(dtype)


@functools.lru_cache(maxsize=None)
def _measured_faster(dtype: torch.dtype) -> bool:
    """A prompt-sized product, (64, 1024) @ (1024, 1024), in dtype against the same in fp32 with the
    weight widened first (the other path's cost): the best of three each, after a warm-up. About
    20 ms (measured), paid by every process that loads a half-precision checkpoint on such a CPU; the margins
    it decides between are wide (bf16 2.8x faster than fp32 on AVX-512 BF16 here, 2.3x slower with
    PyTorch held to AVX2), so a small product is enough."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(64, 1024, generator=g), torch.randn(1024, 1024, generator=g).to(dtype)
    half = x.to(dtype)
    return seconds(lambda: torch.nn.functional.linear(x, w.float())) > MARGIN * seconds(
        lambda: torch.nn.functional.linear(half, w))


def onednn_linear(x, weight):
    """x @ weight.T by oneDNN's matrix product, the weight read as it lies (no packed copy): the op
    PyTorch's own compiler calls for a CPU's linear layers."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")


@functools.lru_cache(maxsize=None)
def fp32_products():
    """What multiplies several tokens' fp32 activations by an fp32 weight on this CPU: onednn_linear
    where a short measurement finds it faster than F.linear by FP32_MARGIN, else F.linear (MKL's sgemm
    in this torch). On AMD CPUs MKL takes a path without AVX-512; on an AMD EPYC with 2 threads its
    products ran at 141-163 GFLOP/s over a 1B layer's seven, oneDNN's at 205-215 (BENCHMARKS.md,
    "CPU inference against llama.cpp"). On an Intel CPU the two may tie, and either is right. The
    measurement, about 30 ms once per process: (128, 1024) @ (1024, 1024) each way, the best of
    three, after oneDNN's result is checked against F.linear's (fp32 accuracy: it also warms both);
    where the op is missing or fails, F.linear."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(128, 1024, generator=g), torch.randn(1024, 1024, generator=g)
    try:
        if not torch.backends.mkldnn.is_available():
            return torch.nn.functional.linear
        want, got = torch.nn.functional.linear(x, w), onednn_linear(x, w)
        if ((got - want).norm() / want.norm()).item() > 1e-5:
            return torch.nn.functional.linear
    except (AttributeError, RuntimeError, NotImplementedError):
        return torch.nn.functional.linear
    faster = seconds(lambda: torch.nn.functional.linear(x, w)) > FP32_MARGIN * seconds(lambda: onednn_linear(x, w))
    return onednn_linear if faster else torch.nn.functional.linear


def seconds(fn, runs=3):
    fn()
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def describe(weights: torch.dtype, compute: torch.dtype) -> str:
    """'bf16 weights as stored, computing in fp32; one token's products by cpu_gemv.c', or so."""
    name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
    kept = f"{name.get(weights, weights)} weights" + (f", computing in {name.get(compute, compute)}"
                                                      if compute != weights else "")
    return f"{kept}; one token's products by {cpu_gemv.status()}"
