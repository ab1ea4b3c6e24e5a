"""One token's projections on a CPU by a kernel of our own (cpu_gemv.c), built on first use; and a whole
one-token decoding step's blocks by the same library.

Read top to bottom:
  mv(W, x)     y = W x for a contiguous W (N, K) in bf16, fp16 or fp32 (as stored) and x (K) in bf16
               or fp32 (the activations), on torch's threads; y in x's dtype; None where the kernel
               cannot run, and model.Linear then calls torch.mv
  mv_many(Ws, x)  the products of several weights with one x, one after another in one y, in one
               parallel region (model.projections: a block's wq, wk, wv; its w1, w3)
  block_plan, decode_blocks  a one-token decoding step's blocks in one call (model.Transformer._cpu_step):
               their tensors checked once, then norms, RoPE, the KV cache, one query's attention and
               SwiGLU in C around the same products
  available()  whether it runs (cpu_paths keeps narrow weights as stored only where it does)
  status()     what the process runs, in words: the kernel, or torch.mv and why
  _build()     cpu_gemv.c compiled with the system's C compiler (CC, else cc, gcc or clang) and
               -march=native, once per source, compiler and CPU, into ~/.cache/llama-trainer
               (XDG_CACHE_HOME; the temporary directory where that is read-only), written
               atomically so that ranks starting together never load a half-written library

Why: decoding at batch 1 is bound by reading the weights, and torch.mv's kernels read them slower
than this one does (BENCHMARKS.md, bench.py decode and cpu); nor can torch.mv read a bf16 or fp16
weight into fp32 activations without first copying the weight to fp32. LLAMA_KERNELS=torch turns it off, as it
turns off the Triton kernels.

The kernel's OpenMP threads must be torch's own: a second OpenMP runtime would keep a second set of
threads spinning beside torch's. The library is linked against libgomp.so.1, which on Linux resolves
to the libgomp torch has already loaded; if loading it brings another OpenMP runtime into the
process, the kernel is not used. (Other libraries' private copies, such as the one sentencepiece's
wheel carries, are theirs alone and do not matter.)
"""

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading

import torch

import atomic

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_gemv.c")
# -march=native: the host's vectors; -ffp-contract=off: a*b + c stays a product and a sum, as PyTorch computes it
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-fPIC", "-shared"]

_lock = threading.Lock()
_kernel = None  # the loaded gemv_many, once built
_blocks = None  # the loaded decode_blocks
_why_not = None  # why it cannot run, once that is known


WEIGHT_TYPES = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}  # cpu_gemv.c's W_BF16, W_F16, W_F32
X_TYPES = (torch.bfloat16, torch.float32)


def mv(W: torch.Tensor, x: torch.Tensor):
    """W (N, K) @ x (K) -> (N,) in x's dtype, on the CPU, or None where the kernel cannot run."""
    return mv_many((W,), x)


def mv_many(weights, x: torch.Tensor):
    """torch.cat([W @ x for W in weights]) in x's dtype, on the CPU, or None where the kernel cannot
    run: every W (N_i, K) contiguous, of one dtype, x (K) contiguous."""
    first = weights[0]
    if (first.dtype not in WEIGHT_TYPES or x.dtype not in X_TYPES or x.device.type != "cpu" or not x.is_contiguous()
            or any(W.dtype != first.dtype or W.device.type != "cpu" or W.dim() != 2 or W.shape[1] != x.shape[0]
                   or not W.is_contiguous() for W in weights)):
        return None
    kernel = _load()
    if kernel is None:
        return None
    count, rows = len(weights), [W.shape[0] for W in weights]
    y, bf16 = torch.empty(sum(rows), dtype=x.dtype), int(x.dtype == torch.bfloat16)
    pointers, sizes = (ctypes.c_void_p * count)(*[W.data_ptr() for W in weights]), (ctypes.c_int64 * count)(*rows)
    if kernel(count, pointers, sizes, WEIGHT_TYPES[first.dtype], x.data_ptr(), bf16, y.data_ptr(), bf16, x.shape[0],
              torch.get_num_threads()) != 0:
        raise MemoryError(f"cpu_gemv: no memory for {sum(rows)} floats")
    return y


# The tensors of each block that decode_blocks reads, in cpu_gemv.c's order (P_ATTENTION_NORM .. P_CACHE_V)
BLOCK_TENSORS = ("attention_norm", "wq", "wk", "wv", "wo", "ffn_norm", "w1", "w2", "w3", "cache_k", "cache_v")


def block_plan(tensors, n_heads: int, n_kv_heads: int, eps: float):
    """What decode_blocks needs, checked once: tensors, BLOCK_TENSORS' 11 per block one block after
    another (the projections' weights (out, in), the norms' (dim), the KV cache's whole k and v (rows,
    n_kv_heads, length, head_dim)). A plain tuple (no pointer kept beyond the call that checks it), or
    None where the kernel cannot take them: activations (the cache's dtype) neither bf16 nor fp32,
    projections of mixed or other dtypes, a norm's weight wider than bf16 activations (PyTorch would
    widen them), anything not contiguous or not on the CPU."""
    count = len(BLOCK_TENSORS)
    norm, first, cache = tensors[0], tensors[1], tensors[9]
    if (len(tensors) % count or cache.dim() != 4 or cache.dtype not in X_TYPES or first.dtype not in WEIGHT_TYPES
            or norm.dtype not in WEIGHT_TYPES or (cache.dtype == torch.bfloat16 and norm.dtype != torch.bfloat16)):
        return None
    dim, (_, _, length, head_dim), hidden = norm.shape[0], cache.shape, tensors[6].shape[0]
    if head_dim % 4:  # the kernel's attention sums four columns at a time (every Llama's is 64 or 128)
        return None
    shapes = ((dim,), (n_heads * head_dim, dim), (n_kv_heads * head_dim, dim), (n_kv_heads * head_dim, dim),
              (dim, n_heads * head_dim), (dim,), (hidden, dim), (dim, hidden), (hidden, dim))
    dtypes = (norm.dtype,) + (first.dtype,) * 4 + (norm.dtype,) + (first.dtype,) * 3
    for i, t in enumerate(tensors):
        shape, dtype = (shapes[i % count], dtypes[i % count]) if i % count < 9 else (cache.shape[1:], cache.dtype)
        if t.dtype != dtype or tuple(t.shape[-len(shape):]) != shape or t.device.type != "cpu" or not t.is_contiguous():
            return None
    return (tuple(t.data_ptr() for t in tensors), WEIGHT_TYPES[first.dtype], WEIGHT_TYPES[norm.dtype], cache.dtype,
            length, dim, n_heads, n_kv_heads, head_dim, hidden, float(eps))


def decode_blocks(plan, x: torch.Tensor, rope: torch.Tensor, pos: int):
    """One token's hidden state x (dim) through every block of a decoding step at position pos, in
    place, by the tensors block_plan checked (still alive, unmoved: the caller makes sure); rope the
    position's (head_dim/2, 2) fp32 cos and sin. The token's key and value go into slot pos of each
    cache's first row, and attention runs over slots 0..pos. Returns x, or None where the kernel
    cannot run (not built, x not of the cache's dtype, pos outside the cache)."""
    pointers, w_type, norm_type, dtype, length, dim, n_heads, n_kv_heads, head_dim, hidden, eps = plan
    if (x.dtype != dtype or x.shape != (dim,) or not x.is_contiguous() or x.device.type != "cpu"
            or rope.dtype != torch.float32 or rope.shape != (head_dim // 2, 2) or not rope.is_contiguous()
            or not 0 <= pos < length or _load() is None or _blocks is None):
        return None
    status = _blocks(len(pointers) // len(BLOCK_TENSORS), (ctypes.c_void_p * len(pointers))(*pointers), w_type,
                     norm_type, int(dtype == torch.bfloat16), x.data_ptr(), rope.data_ptr(), pos, length, dim, n_heads,
                     n_kv_heads, head_dim, hidden, eps, head_dim ** -0.5, torch.get_num_threads())
    if status != 0:
        raise MemoryError(f"cpu_gemv: decode_blocks found no memory for its scratch ({status})")
    return x


def available() -> bool:
    """Whether mv runs the kernel (built, and not turned off by LLAMA_KERNELS=torch)."""
    return (os.environ.get("LLAMA_KERNELS") or "").strip().lower() != "torch" and _load() is not None


def status() -> str:
    if (os.environ.get("LLAMA_KERNELS") or "").strip().lower() == "torch":
        return "torch.mv (LLAMA_KERNELS=torch)"  # model.cpu_mv never calls the kernel then
    _load()
    return "cpu_gemv.c" if _kernel is not None else f"torch.mv ({_why_not})"


def _load():
    global _kernel, _blocks, _why_not
    if _kernel is not None or _why_not is not None:
        return _kernel
    with _lock:
        if _kernel is None and _why_not is None:
            try:
                path, before = _build(), _loaded_openmp()
                library = ctypes.CDLL(path)
                brought = _loaded_openmp() - before
                if brought:
                    raise OSError(f"its OpenMP runtime would not be torch's ({', '.join(sorted(brought))})")
                kernel = library.gemv_many
                kernel.restype = ctypes.c_int
                kernel.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p,
                                   ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int]
                blocks = library.decode_blocks
                blocks.restype = ctypes.c_int
                blocks.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                   ctypes.c_void_p, ctypes.c_void_p] + [ctypes.c_int64] * 7 + [
                                   ctypes.c_float, ctypes.c_float, ctypes.c_int]
                _kernel, _blocks = kernel, blocks
            except (OSError, subprocess.SubprocessError) as e:
                _why_not = str(e)
    return _kernel


def _cache_dir() -> str:
    """~/.cache/llama-trainer (XDG_CACHE_HOME), or the temporary directory where that cannot be made."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    directory = os.path.join(root, "llama-trainer")
    try:
        os.makedirs(directory, exist_ok=True)
        if os.access(directory, os.W_OK):
            return directory
    except OSError:
        pass
    return os.path.join(tempfile.gettempdir(), f"llama-trainer-{getattr(os, 'getuid', lambda: 0)()}")


def _cpu_id() -> str:
    """What -march=native depends on: the CPU's model and features (a shared home directory on a
    cluster of mixed machines gets one library per kind of CPU)."""
    try:
        with open("/proc/cpuinfo") as f:
            return "".join(sorted({line for line in f if line.startswith(("model name", "flags", "Features"))}))
    except OSError:
        return f"{platform.machine()} {platform.processor()}"


def _build() -> str:
    """The path of the built library, compiling it if this source, compiler and CPU have none yet."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        raise OSError("no C compiler: set CC, or install gcc")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    with open(SOURCE, "rb") as f:
        source = f.read()
    key = hashlib.sha256(b"\0".join(s if isinstance(s, bytes) else s.encode() for s in
                                    (source, version, " ".join(FLAGS), _cpu_id(), sys.platform))).hexdigest()
    path = os.path.join(_cache_dir(), f"cpu_gemv-{key[:16]}.so")
    if not os.path.exists(path):
        def compile_to(tmp):
            done = subprocess.run([cc, *FLAGS, SOURCE, "-o", tmp], capture_output=True, text=True, timeout=600)
            if done.returncode != 0:
                said = (done.stderr.strip().splitlines() or ["no message"])[-1]
                raise OSError(f"{cc} could not build {os.path.basename(SOURCE)}: {said}")
        atomic.write_file(path, compile_to)
    return path


def _loaded_openmp() -> set:
    """The OpenMP runtimes this process has loaded (Linux; elsewhere an empty set, and trusted)."""
    try:
        with open("/proc/self/maps") as f:
            return openmp_runtimes(f.read())
    except OSError:
        return set()


def openmp_runtimes(maps: str) -> set:
    """The OpenMP libraries named in a /proc/PID/maps text: GNU's, Intel's and LLVM's."""
    paths = {line.split()[-1] for line in maps.splitlines() if len(line.split()) >= 6}
    return {p for p in paths if os.path.basename(p).startswith(("libgomp", "libiomp", "libomp"))}
