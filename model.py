"""A Llama (2, 3, 3.1, 3.2) in one file: the architecture, its hot paths, and checkpoint I/O.

Read top to bottom:
  ModelArgs        the hyper-parameters, named as in Meta's params.json
  RMSNorm, RoPE    normalisation and rotary position embedding (with Llama 3.1 frequency scaling)
  Attention        grouped-query attention with a preallocated KV cache for decoding
  FeedForward      SwiGLU
  Transformer      the stack, returning logits or the mean cross-entropy
  Fused kernels    Triton twins of rms_norm, apply_rope, swiglu and output layer + cross-entropy
  load / save      Meta (params.json + consolidated.NN.pth) and HF (config.json + safetensors) layouts
"""

import glob
import json
import math
import os
from dataclasses import dataclass, fields
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded; the message names the file."""


# -----------------------------------------------------------------------------------------------
# Configuration


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None  # None: as many as n_heads (Llama 2 7B); 8 for Llama 3 (GQA)
    vocab_size: int = -1  # -1: take it from the weights (some Meta params.json say so)
    multiple_of: int = 256  # the FFN hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0  # 500000 for Llama 3
    use_scaled_rope: bool = False  # Llama 3.1 / 3.2 long-context frequency scaling
    rope_scaling_factor: float = 8.0  # 8 for 3.1, 32 for 3.2 (HF configs say so; Meta's files may not)
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_seq_len: int = 8192
    max_seq_len: int = 4096  # the longest context RoPE tables and the KV cache are built for

    @classmethod
    def from_dict(cls, d: dict) -> "ModelArgs":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})  # unknown keys are tolerated

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def hidden_dim(self) -> int:
        # Meta's arithmetic: 2/3 of 4*dim (SwiGLU has three matrices instead of two, so this keeps
        # the parameter count of a 4*dim MLP), scaled, then rounded up to multiple_of.
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)


# -----------------------------------------------------------------------------------------------
# Building blocks


class RMSNorm(nn.Module):
    """x / rms(x) * weight: LayerNorm without the mean and the bias. Computed in fp32."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


def rms_norm(x, weight, eps):
    if use_triton(x):
        return _RMSNorm.apply(x, weight, eps)
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return xf.type_as(x) * weight  # Meta rounds to the input dtype before the weight multiply


def rope_frequencies(args: ModelArgs) -> torch.Tensor:
    """The rotation speed of each of the head_dim/2 pairs, with Llama 3.1's scaling if asked.

    Llama 3.1 stretches the context 8x (32x for 3.2) by slowing only the low frequencies:
    wavelengths longer than original_len/low_freq_factor are divided by the factor, those shorter
    than original_len/high_freq_factor are kept, and the band between is interpolated smoothly.
    """
    d = args.head_dim
    # fp32 throughout, as Meta and HF compute it: positions far out amplify any difference here.
    freqs = 1.0 / (args.rope_theta ** (torch.arange(0, d, 2)[: d // 2].float() / d))
    if not args.use_scaled_rope:
        return freqs
    factor, low, high = args.rope_scaling_factor, args.rope_low_freq_factor, args.rope_high_freq_factor
    old_len = args.rope_original_max_seq_len
    wavelen = 2 * math.pi / freqs
    smooth = (old_len / wavelen - low) / (high - low)
    scaled = (1 - smooth) * freqs / factor + smooth * freqs
    scaled = torch.where(wavelen > old_len / low, freqs / factor, scaled)  # low frequencies
    return torch.where(wavelen < old_len / high, freqs, scaled)  # high frequencies


def rope_table(args: ModelArgs, device=None) -> torch.Tensor:
    """cos and sin of position * frequency, (max_seq_len, head_dim/2, 2), fp32."""
    freqs = rope_frequencies(args).to(device)
    t = torch.arange(args.max_seq_len, device=device, dtype=torch.float32)
    angles = torch.outer(t, freqs)
    return torch.stack([angles.cos(), angles.sin()], dim=-1)


def apply_rope(x, rope):
    """Rotate consecutive pairs (x0, x1) of each head by the position's angle (Meta's layout).

    x: (B, T, n_heads, head_dim); rope: (T, head_dim/2, 2) or (B, T, head_dim/2, 2).
    Meta treats each pair as a complex number and multiplies by e^{i*angle}; this is the same
    arithmetic written with reals, in fp32.
    """
    if use_triton(x):
        return _RoPE.apply(x, rope)
    B, T, H, D = x.shape
    xp = x.float().reshape(B, T, H, D // 2, 2)
    if rope.dim() == 3:
        rope = rope.unsqueeze(0)
    cos, sin = rope[..., 0].unsqueeze(2), rope[..., 1].unsqueeze(2)  # (B or 1, T, 1, D/2)
    x0, x1 = xp[..., 0], xp[..., 1]
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    return out.reshape(B, T, H, D).type_as(x)


def swiglu(a, b):
    if use_triton(a):
        return _SwiGLU.apply(a, b)
    return F.silu(a) * b


def document_mask(positions, flex: Optional[bool] = None):
    """Block-causal mask for packed rows: token i sees token j when j <= i in the same document.
    Documents are numbered by counting the position resets (0) along the row.

    On CUDA this is a FlexAttention BlockMask: the attention kernel then skips whole blocks that
    lie outside every document instead of computing and discarding them, and no (T, T) mask exists.
    Elsewhere (or with flex=False) a dense (B, 1, T, T) bool mask for SDPA.
    """
    doc = (positions == 0).cumsum(dim=1)
    B, T = positions.shape
    if flex is None:
        flex = positions.is_cuda and os.environ.get("LLAMA_FLEX_ATTENTION", "1") != "0"
    if flex:
        from torch.nn.attention.flex_attention import create_block_mask

        def same_doc_causal(b, h, q, kv):
            return (doc[b, q] == doc[b, kv]) & (kv <= q)

        return create_block_mask(same_doc_causal, B, None, T, T, device=positions.device)
    causal = torch.ones(T, T, dtype=torch.bool, device=positions.device).tril()
    return ((doc[:, :, None] == doc[:, None, :]) & causal).unsqueeze(1)


_flex_attention = None


def flex_attention(q, k, v, block_mask, enable_gqa):
    """FlexAttention, compiled once on CUDA (uncompiled it runs a slow reference implementation)."""
    global _flex_attention
    if _flex_attention is None:
        from torch.nn.attention.flex_attention import flex_attention as fa

        _flex_attention = torch.compile(fa, dynamic=False) if q.is_cuda else fa
    return _flex_attention(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)
        # The KV cache, (B_max, n_kv_heads, cache_len, head_dim) while decoding (setup_cache).
        self.register_buffer("cache_k", None, persistent=False)
        self.register_buffer("cache_v", None, persistent=False)

    def forward(self, x, rope, cache_pos=None, mask=None):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, head_dim)

        if cache_pos is not None:
            # Decoding: store this chunk's keys and values at their positions, then attend over the
            # whole cache; the mask hides the slots not written yet. Every step then has the same
            # shapes, which is what lets torch.compile / CUDA graphs capture one decode step.
            self.cache_k[:B].index_copy_(2, cache_pos, k.to(self.cache_k.dtype))
            self.cache_v[:B].index_copy_(2, cache_pos, v.to(self.cache_v.dtype))
            k, v = self.cache_k[:B], self.cache_v[:B]

        # Grouped-query attention: each group of n_heads/n_kv_heads query heads shares one key/value
        # head; SDPA broadcasts them (enable_gqa) instead of us copying k and v.
        gqa = self.n_kv_heads != self.n_heads
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=gqa)
        elif not isinstance(mask, torch.Tensor):  # a FlexAttention BlockMask (packed documents)
            out = flex_attention(q, k, v, block_mask=mask, enable_gqa=gqa)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)  # gate
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)  # down
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)  # up

    def forward(self, x):
        return self.w2(swiglu(self.w1(x), self.w3(x)))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.hidden_dim)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, rope, cache_pos=None, mask=None):
        h = x + self.attention(self.attention_norm(x), rope, cache_pos, mask)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        if args.vocab_size <= 0:
            raise ValueError("ModelArgs.vocab_size must be set (load() takes it from the weights)")
        if args.dim % args.n_heads or args.n_heads % args.kv_heads:
            raise ValueError(f"dim {args.dim}, n_heads {args.n_heads}, n_kv_heads {args.kv_heads} do not divide")
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        # Not a state-dict entry: rebuilt from args wherever the model lands.
        self.register_buffer("rope", rope_table(args), persistent=False)
        self.activation_checkpointing = False

    def tie_weights(self):
        """Llama 3.2 1B/3B share the embedding with the output projection."""
        self.output.weight = self.tok_embeddings.weight

    @property
    def tied(self) -> bool:
        return self.output.weight is self.tok_embeddings.weight

    def init_weights(self, std: float = 0.02):
        """Random init for training from scratch: normal(0, std), output projections scaled down
        by sqrt(2 * n_layers) so the residual stream does not grow with depth (GPT-2's rule)."""
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith(("wo.weight", "w2.weight")):
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.args.n_layers))
            else:
                nn.init.normal_(p, 0.0, std)
        self.reset_rope()

    def reset_rope(self):
        self.rope = rope_table(self.args, device=self.tok_embeddings.weight.device)

    # -- decoding cache ---------------------------------------------------------------------------

    def setup_cache(self, max_batch_size: int, max_seq_len: Optional[int] = None):
        """Preallocate the KV cache once, so decoding never reallocates or concatenates."""
        T = max_seq_len or self.args.max_seq_len
        if T > self.args.max_seq_len:
            raise ValueError(f"cache length {T} exceeds max_seq_len {self.args.max_seq_len}")
        w = self.tok_embeddings.weight
        for layer in self.layers:
            a = layer.attention
            shape = (max_batch_size, a.n_kv_heads, T, a.head_dim)
            a.cache_k = torch.zeros(shape, device=w.device, dtype=w.dtype)
            a.cache_v = torch.zeros(shape, device=w.device, dtype=w.dtype)

    def clear_cache(self):
        for layer in self.layers:
            layer.attention.cache_k = layer.attention.cache_v = None

    # -- forward ----------------------------------------------------------------------------------

    def forward(self, tokens, targets=None, start_pos=None, positions=None, reduction: str = "mean"):
        """tokens (B, T) int64 -> logits (B, T, vocab), or the cross-entropy over targets != -100
        (mean, or with reduction="sum" the sum, which the trainer normalises across micro-steps).

        start_pos: None for a plain causal pass (training, scoring); when decoding with the KV cache
        (setup_cache first), the position of tokens[:, 0] (an int, or a tensor so that a compiled
        decode step is not specialised to each position).
        positions: (B, T) position of each token inside its own document, restarting at 0 where a
        document starts (packed training rows); attention then stays inside each document.
        """
        B, T = tokens.shape
        if self.rope.device != tokens.device or self.rope.is_meta:
            self.reset_rope()
        mask, cache_pos = None, None
        if start_pos is not None:
            cache = self.layers[0].attention.cache_k
            if cache is None:
                raise RuntimeError("decoding with start_pos needs setup_cache() first")
            if isinstance(start_pos, int) and start_pos + T > cache.shape[2]:
                raise ValueError(f"positions up to {start_pos + T} exceed the KV cache of {cache.shape[2]}")
            cache_pos = start_pos + torch.arange(T, device=tokens.device)
            rope = self.rope[cache_pos]
            # query at position p sees cache slots 0..p
            mask = torch.arange(cache.shape[2], device=tokens.device)[None, :] <= cache_pos[:, None]
        elif positions is not None:
            rope = self.rope[positions]  # (B, T, head_dim/2, 2): each document starts at angle 0
            mask = document_mask(positions)
        else:
            if T > self.args.max_seq_len:
                raise ValueError(f"sequence of {T} tokens exceeds max_seq_len {self.args.max_seq_len}")
            rope = self.rope[:T]

        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            if self.activation_checkpointing and self.training:
                # keep only each layer's input; recompute its insides during backward
                h = torch.utils.checkpoint.checkpoint(layer, h, rope, cache_pos, mask, use_reentrant=False)
            else:
                h = layer(h, rope, cache_pos, mask)
        h = self.norm(h)
        if targets is None:
            return self.output(h).float()
        if type(self.output) is not nn.Linear:  # wrapped (e.g. by an adapter): more than h @ W.T
            logits = self.output(h).float()
            return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction=reduction)
        # The Triton path never holds the (B*T, vocab) logits at once (see linear_cross_entropy).
        return linear_cross_entropy(h, self.output.weight, targets, reduction=reduction)


# -----------------------------------------------------------------------------------------------
# Fused Triton kernels
#
# The hot paths above are chains of small PyTorch ops, each reading and writing whole tensors in GPU
# memory. All of them are memory-bound, so doing a chain in one pass over the data is the speed-up,
# and saving fewer intermediates for backward is the memory saving. Each kernel has its backward as
# a torch.autograd.Function, and its PyTorch twin above is the reference it is tested against.
#   rms_norm     square, mean, rsqrt, scale, cast and weight multiply: one read of x, one write.
#                Backward keeps only x and 1/rms per row; each program sums its band of rows' weight
#                gradient in registers, and torch adds the few partial sums.
#   apply_rope   the fp32 copy, pair split, four products and stack: one read, one write, with cos and
#                sin loaded once per position for all heads. Backward is the rotation by -angle.
#   swiglu       silu(a) * b without a silu(a) tensor; backward recomputes the sigmoid, cheaper than
#                storing it.
#   linear_cross_entropy  Llama 3's vocabulary is 128256 wide: 8k tokens of fp32 logits and their
#                gradient are 8 GB. Rows go in chunks: a matmul makes one chunk of logits, a kernel
#                turns it in place into d(loss)/d(logits) (logsumexp, loss, softmax - onehot), and the
#                two backward matmuls use it at once, so one chunk (~256 MB) is all that ever exists.
#                Gradients are ready after forward; backward only scales them.
# Not fused: the residual add before each norm. It would save one elementwise pass per norm but needs
# a two-output norm and a different block forward, at a cost to the reading.
#
# LLAMA_KERNELS=triton|torch forces a path (set_kernels() in code); unset, Triton runs on CUDA tensors
# and PyTorch elsewhere. On the CPU, Triton runs in its interpreter when TRITON_INTERPRET=1 (slow: the
# tests use it). Forcing Triton where it cannot run raises KernelError, never a silent fallback.
# triton is imported and each kernel compiled on first use, so `import model` needs no triton and
# TRITON_INTERPRET counts if it is set any time before the first launch.

_KERNELS = (os.environ.get("LLAMA_KERNELS") or "").strip().lower() or None


class KernelError(RuntimeError):
    """LLAMA_KERNELS=triton where Triton cannot run."""


def set_kernels(name: Optional[str]) -> Optional[str]:
    """Pick "triton", "torch" or None (the default: Triton on CUDA tensors); returns the previous."""
    global _KERNELS
    if name not in (None, "triton", "torch"):
        raise ValueError(f"kernels {name!r}: expected 'triton', 'torch' or None")
    previous, _KERNELS = _KERNELS, name
    return previous


def use_triton(x: torch.Tensor) -> bool:
    """Whether the Triton path runs for this tensor; KernelError if it is forced and cannot."""
    if _KERNELS not in (None, "triton", "torch"):
        raise KernelError(f"LLAMA_KERNELS={_KERNELS}: expected triton or torch")
    if _KERNELS == "torch" or (_KERNELS is None and not x.is_cuda):
        return False
    if _triton() is None:
        if _KERNELS is None:
            return False  # the default, on CUDA without triton installed
        raise KernelError("LLAMA_KERNELS=triton but triton cannot be imported: "
                          "install it or set LLAMA_KERNELS=torch")
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET", "0").lower() not in ("1", "true", "yes", "on"):
        raise KernelError(f"LLAMA_KERNELS=triton on a {x.device.type} tensor: Triton needs CUDA, or "
                          "TRITON_INTERPRET=1 for its (slow) CPU interpreter; or set LLAMA_KERNELS=torch")
    return True


class tl:
    """Stands in for triton.language until triton is imported, so that kernel signatures can say
    `BLOCK: tl.constexpr`, the spelling triton (and its interpreter, which re-reads the source) needs."""
    constexpr = "constexpr"


_triton_module = False  # not imported yet; None when it cannot be


def _triton():
    global _triton_module, tl
    if _triton_module is False:
        try:
            import triton
            import triton.language as tl
            _triton_module = triton
        except ImportError:
            _triton_module = None
    return _triton_module


class _kernel:
    """@_kernel: a Triton kernel, jit-compiled on its first launch, kernel[grid](args...)."""

    def __init__(self, fn):
        self.fn, self.jitted = fn, None

    def __getitem__(self, grid):
        if self.jitted is None:
            self.jitted = _triton().jit(self.fn)
        return self.jitted[grid]


def _pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def _warps(block: int) -> int:
    return min(16, max(4, block // 512))  # a handful of a row's elements per thread


def _programs(device) -> int:
    """Programs that each walk a band of rows: a few per SM, so every SM stays busy."""
    return 4 * torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


@_kernel
def _rms_norm_fwd(X, W, Y, RSTD, N, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # one row per program; int64 so row * N cannot overflow
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(X + row * N + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / N + eps)
    tl.store(RSTD + row, rstd)
    xhat = (x * rstd).to(X.dtype.element_ty)  # rounded to the input dtype before the weight, as Meta does
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * N + cols, (xhat.to(tl.float32) * w).to(Y.dtype.element_ty), mask=mask)


@_kernel
def _rms_norm_bwd(DY, X, W, RSTD, DX, DW, M, N, rows_per_program, BLOCK: tl.constexpr):
    # Each program walks a band of rows (the last one's tail masked off), summing its share of the
    # weight gradient in registers.
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    w = tl.load(W + cols, mask=cols < N, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK,), dtype=tl.float32)
    for i in range(0, rows_per_program):
        row = pid.to(tl.int64) * rows_per_program + i
        mask = cols < tl.where(row < M, N, 0)
        x = tl.load(X + row * N + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * N + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row, mask=row < M, other=0.0)
        xhat = x * rstd
        dw += dy * xhat.to(X.dtype.element_ty).to(tl.float32)
        # y = xhat * w, xhat = x * mean(x^2)^-1/2  =>  dx = rstd * (g - xhat * mean(g * xhat)), g = dy * w
        g = dy * w
        dx = rstd * (g - xhat * (tl.sum(g * xhat, axis=0) / N))
        tl.store(DX + row * N + cols, dx.to(DX.dtype.element_ty), mask=mask)
    tl.store(DW + pid * N + cols, dw, mask=cols < N)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        (M, N), block = x2.shape, _pow2(x2.shape[1])
        y = torch.empty(M, N, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
        rstd = torch.empty(M, dtype=torch.float32, device=x.device)
        _rms_norm_fwd[(M,)](x2, weight, y, rstd, N, eps, BLOCK=block, num_warps=_warps(block))
        ctx.save_for_backward(x2, weight, rstd)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        (M, N), block = x2.shape, _pow2(x2.shape[1])
        rows = -(-M // _programs(x2.device))
        programs = -(-M // rows)
        dx = torch.empty_like(x2)
        dw = torch.empty(programs, N, dtype=torch.float32, device=x2.device)  # one partial sum per program
        _rms_norm_bwd[(programs,)](dy.reshape(M, N).contiguous(), x2, weight, rstd, dx, dw, M, N, rows,
                                   BLOCK=block, num_warps=_warps(block))
        return dx.view(dy.shape), dw.sum(0).to(weight.dtype), None


@_kernel
def _rope(X, ROPE, Y, T, H, P, rope_rows, stride_b, stride_t, stride_h, sign,
          BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr):
    # One (batch, position) per program, all its heads at once: cos and sin are loaded once.
    # Pair p is columns (2p, 2p+1). sign=-1 rotates by -angle: the backward pass.
    row = tl.program_id(0)
    b, t = row // T, row % T
    p = tl.arange(0, BLOCK_P)
    cs = ROPE + (row % rope_rows).to(tl.int64) * 2 * P + 2 * p  # rope_rows: T, or B*T per-row positions
    cos = tl.load(cs, mask=p < P, other=0.0).to(tl.float32)[None, :]
    sin = sign * tl.load(cs + 1, mask=p < P, other=0.0).to(tl.float32)[None, :]
    h = tl.arange(0, BLOCK_H)[:, None]
    p = p[None, :]
    mask = (h < H) & (p < P)
    x = X + b.to(tl.int64) * stride_b + t.to(tl.int64) * stride_t + h * stride_h + 2 * p
    x0 = tl.load(x, mask=mask, other=0.0).to(tl.float32)
    x1 = tl.load(x + 1, mask=mask, other=0.0).to(tl.float32)
    y = Y + row.to(tl.int64) * H * 2 * P + h * 2 * P + 2 * p
    tl.store(y, (x0 * cos - x1 * sin).to(Y.dtype.element_ty), mask=mask)
    tl.store(y + 1, (x0 * sin + x1 * cos).to(Y.dtype.element_ty), mask=mask)


def _rope_launch(x, rope, sign):
    B, T, H, D = x.shape
    if rope.shape[-3:] != (T, D // 2, 2) or (rope.dim() == 4 and rope.shape[0] not in (1, B)):
        raise ValueError(f"rope table {tuple(rope.shape)} does not fit x {tuple(x.shape)}")
    x = x if x.stride(-1) == 1 else x.contiguous()  # other strides are the kernel's arguments
    rope = rope.contiguous()
    y = torch.empty(B, T, H, D, dtype=x.dtype, device=x.device)
    _rope[(B * T,)](x, rope, y, T, H, D // 2, rope.numel() // D, x.stride(0), x.stride(1), x.stride(2),
                    sign, BLOCK_H=_pow2(H), BLOCK_P=_pow2(D // 2))
    return y


class _RoPE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, rope):
        ctx.save_for_backward(rope)
        return _rope_launch(x, rope, 1.0)

    @staticmethod
    def backward(ctx, dy):
        return _rope_launch(dy, ctx.saved_tensors[0], -1.0), None


@_kernel
def _swiglu_fwd(A, B, Y, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    a = tl.load(A + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + offs, (a * tl.sigmoid(a) * b).to(Y.dtype.element_ty), mask=mask)


@_kernel
def _swiglu_bwd(DY, A, B, DA, DB, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    a = tl.load(A + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(a)  # recomputed: cheaper than a saved silu(a)
    tl.store(DA + offs, (dy * b * s * (1 + a * (1 - s))).to(DA.dtype.element_ty), mask=mask)  # silu'(a)
    tl.store(DB + offs, (dy * a * s).to(DB.dtype.element_ty), mask=mask)


class _SwiGLU(torch.autograd.Function):
    BLOCK = 1024

    @staticmethod
    def forward(ctx, a, b):
        if a.shape != b.shape:
            raise ValueError(f"swiglu: a {tuple(a.shape)} and b {tuple(b.shape)} differ")
        a, b = a.contiguous(), b.contiguous()
        y = torch.empty(a.shape, dtype=torch.promote_types(a.dtype, b.dtype), device=a.device)
        grid = (-(-a.numel() // _SwiGLU.BLOCK),)
        _swiglu_fwd[grid](a, b, y, a.numel(), BLOCK=_SwiGLU.BLOCK)
        ctx.save_for_backward(a, b)
        return y

    @staticmethod
    def backward(ctx, dy):
        a, b = ctx.saved_tensors
        da, db = torch.empty_like(a), torch.empty_like(b)
        grid = (-(-a.numel() // _SwiGLU.BLOCK),)
        _swiglu_bwd[grid](dy.contiguous(), a, b, da, db, a.numel(), BLOCK=_SwiGLU.BLOCK)
        return da, db


_CE_CHUNK_BYTES = 256 * 2**20  # one chunk of logits: ~1000 rows of Llama 3's 128256-wide vocab in bf16
_CE_BLOCK = 8192  # vocabulary columns per step of the kernel's sweeps


@_kernel
def _cross_entropy(LOGITS, stride, TARGETS, LOSS, SCALE, V, ignore_index,
                   WRITE_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    # One row per program, two sweeps over the vocabulary: an online logsumexp (a running max and a
    # sum rescaled whenever the max grows, so exp never overflows), then d(loss)/d(logits) =
    # (softmax - onehot) * scale written over the logits, in fp32 until the store.
    row = tl.program_id(0).to(tl.int64)
    logits = LOGITS + row * stride
    target = tl.load(TARGETS + row)
    cols = tl.arange(0, BLOCK)
    if target == ignore_index:  # no loss and no gradient from this row
        tl.store(LOSS + row, 0.0)
        if WRITE_GRAD:
            for start in range(0, V, BLOCK):
                tl.store(logits + start + cols, 0.0, mask=start + cols < V)
        return
    m = float("-inf")
    d = 0.0
    x_target = 0.0
    for start in range(0, V, BLOCK):
        c = start + cols
        x = tl.load(logits + c, mask=c < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
        x_target += tl.sum(tl.where(c == target, x, 0.0), axis=0)  # no indexed load: never out of bounds
    lse = m + tl.log(d)
    tl.store(LOSS + row, lse - x_target)
    if WRITE_GRAD:
        scale = tl.load(SCALE)
        for start in range(0, V, BLOCK):
            c = start + cols
            x = tl.load(logits + c, mask=c < V, other=0.0).to(tl.float32)
            grad = (tl.exp(x - lse) - tl.where(c == target, 1.0, 0.0)) * scale
            tl.store(logits + c, grad.to(LOGITS.dtype.element_ty), mask=c < V)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, ignore_index, reduction, chunk_size):
        (N, _), V = h.shape, weight.shape[0]
        need_dh, need_dw = ctx.needs_input_grad[:2]  # LoRA freezes the weight; eval needs neither
        dh = torch.empty(h.shape, dtype=h.dtype, device=h.device) if need_dh else None
        # fp32: summed over chunks in bf16 it would round once per chunk
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if need_dw else None
        losses = torch.empty(N, dtype=torch.float32, device=h.device)
        n_targets = (targets != ignore_index).sum()
        # On the device, so no sync: 1/n for mean (1 when n is 0: all-zero gradients and loss 0), 1 for sum.
        scale = (1.0 / n_targets.clamp(min=1) if reduction == "mean" else torch.ones((), device=h.device)).view(1)
        chunk = chunk_size or max(1, _CE_CHUNK_BYTES // (V * h.element_size()))
        block = min(_pow2(V), _CE_BLOCK)
        for s in range(0, N, chunk):
            hc = h[s : s + chunk]
            logits = hc @ weight.t()  # h's dtype, as F.linear gives (the matmul accumulates in fp32)
            _cross_entropy[(hc.shape[0],)](logits, logits.stride(0), targets[s : s + chunk],
                                           losses[s : s + chunk], scale, V, ignore_index,
                                           WRITE_GRAD=need_dh or need_dw, BLOCK=block, num_warps=_warps(block))
            # logits now holds d(loss)/d(logits) for these rows
            if need_dh:
                torch.mm(logits, weight, out=dh[s : s + chunk])
            if need_dw:
                dw += logits.t() @ hc
        ctx.save_for_backward(dh, dw)
        ctx.weight_dtype = weight.dtype
        return losses.sum() * scale[0]

    @staticmethod
    def backward(ctx, grad_loss):
        dh, dw = ctx.saved_tensors
        # grad_loss stays fp32 here: torch multiplies a bf16 tensor by an fp32 scalar in fp32
        dh = None if dh is None else dh * grad_loss
        dw = None if dw is None else (dw * grad_loss).to(ctx.weight_dtype)
        return dh, dw, None, None, None, None


def linear_cross_entropy(h, weight, targets, ignore_index: int = -100, reduction: str = "mean",
                         chunk_size: Optional[int] = None):
    """cross_entropy(h @ weight.T, targets) for h (..., dim), weight (vocab, dim), targets (...).

    "mean" averages over targets != ignore_index and is 0, with zero gradients, when there are none
    (not NaN as F.cross_entropy gives); "sum" adds them up. The Triton path makes the logits
    chunk_size rows at a time (default: about _CE_CHUNK_BYTES of them), never all at once.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction {reduction!r}: expected 'mean' or 'sum'")
    h, targets = h.reshape(-1, h.shape[-1]), targets.reshape(-1).contiguous()
    if use_triton(h):
        return _LinearCrossEntropy.apply(h, weight, targets, ignore_index, reduction, chunk_size)
    loss = F.cross_entropy(F.linear(h, weight).float(), targets, ignore_index=ignore_index, reduction="sum")
    return loss if reduction == "sum" else loss / (targets != ignore_index).sum().clamp(min=1)


# -----------------------------------------------------------------------------------------------
# Checkpoints: Meta layout (params.json + consolidated.NN.pth) and HF layout (config.json + safetensors)

# Meta's model-parallel split: column-parallel weights are cut along their output rows (dim 0),
# row-parallel ones along their input columns (dim 1); norms are replicated on every shard.
_JOIN_DIM = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1}

_HF_NAMES = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3",
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
}

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
           "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


def resolve_dtype(dtype, device) -> torch.dtype:
    """None -> bf16 on CUDA, fp32 elsewhere; accepts torch dtypes or names like 'bf16'."""
    if dtype is None:
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if str(dtype) not in _DTYPES:
        raise ValueError(f"--dtype {dtype!r}: expected one of {', '.join(_DTYPES)}")
    return _DTYPES[str(dtype)]


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read ({e})") from None


def _meta_checkpoint(ckpt_dir):
    args = ModelArgs.from_dict(_read_json(os.path.join(ckpt_dir, "params.json")))
    paths = sorted(glob.glob(os.path.join(ckpt_dir, "consolidated.*.pth")))
    if not paths:
        raise CheckpointError(f"{ckpt_dir}: params.json but no consolidated.NN.pth weights")
    shards = []
    for p in paths:
        try:  # mmap: the weights stay in the page cache, not copied into our heap
            shards.append(torch.load(p, map_location="cpu", mmap=True, weights_only=True))
        except Exception as e:  # a truncated or foreign file: torch raises many kinds
            raise CheckpointError(f"{p}: cannot read ({type(e).__name__}: {e})") from None
    tied = "output.weight" not in shards[0] or (
        shards[0]["output.weight"].untyped_storage().data_ptr()
        == shards[0]["tok_embeddings.weight"].untyped_storage().data_ptr())

    def tensors():
        for name, first in shards[0].items():
            if name == "output.weight" and tied:
                continue
            parts = [s[name] for s in shards]
            kind = name.split(".")[-2]
            if len(parts) == 1 or name.endswith("norm.weight"):
                yield name, first
            elif name == "tok_embeddings.weight":
                # Llama 2 splits the embedding along dim (ParallelEmbedding), Llama 3 along the
                # vocabulary (VocabParallelEmbedding): the shard's width tells which.
                yield name, torch.cat(parts, dim=0 if first.shape[1] == args.dim else 1)
            elif kind in _JOIN_DIM:
                yield name, torch.cat(parts, dim=_JOIN_DIM[kind])
            else:
                yield name, first  # unknown keys (e.g. rope.freqs) are dropped by the caller

    if args.vocab_size <= 0:
        emb = shards[0]["tok_embeddings.weight"]
        args.vocab_size = emb.shape[0] * (len(shards) if emb.shape[1] == args.dim else 1)
    return args, tensors(), tied, os.path.join(ckpt_dir, "params.json")


def _hf_args(config: dict, path: str) -> ModelArgs:
    if config.get("model_type", "llama") != "llama":
        raise CheckpointError(f"{path}: model_type {config.get('model_type')!r} is not llama")
    if config.get("attention_bias") or config.get("mlp_bias"):
        raise CheckpointError(f"{path}: attention_bias / mlp_bias are not part of Llama")
    dim, n_heads = config["hidden_size"], config["num_attention_heads"]
    if config.get("head_dim") not in (None, dim // n_heads):
        raise CheckpointError(f"{path}: head_dim {config['head_dim']} != hidden_size / heads")
    # transformers < 5 keeps rope_theta at the top and rope_scaling beside it; transformers 5 puts
    # both into rope_parameters.
    rope = config.get("rope_scaling") or config.get("rope_parameters") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise CheckpointError(f"{path}: rope type {rope_type!r} is not supported (default, llama3)")
    args = ModelArgs(
        dim=dim, n_layers=config["num_hidden_layers"], n_heads=n_heads,
        n_kv_heads=config.get("num_key_value_heads", n_heads), vocab_size=config["vocab_size"],
        norm_eps=config.get("rms_norm_eps", 1e-5),
        rope_theta=config.get("rope_theta", rope.get("rope_theta", 10000.0)),
        max_seq_len=config.get("max_position_embeddings", 4096))
    if rope_type == "llama3":
        args.use_scaled_rope = True
        args.rope_scaling_factor = rope["factor"]
        args.rope_low_freq_factor = rope.get("low_freq_factor", 1.0)
        args.rope_high_freq_factor = rope.get("high_freq_factor", 4.0)
        args.rope_original_max_seq_len = rope.get("original_max_position_embeddings", 8192)
    # HF states the FFN width outright; express it in Meta's terms so params.json stays readable by
    # Meta's code: with multiple_of = width, the round-up lands exactly on it.
    hidden, base = config["intermediate_size"], int(2 * 4 * dim / 3)
    args.multiple_of = hidden
    args.ffn_dim_multiplier = None if base <= hidden else hidden / base
    assert args.hidden_dim == hidden
    return args


def _hf_checkpoint(ckpt_dir):
    from safetensors import safe_open  # only the HF layout needs it

    config_path = os.path.join(ckpt_dir, "config.json")
    args = _hf_args(_read_json(config_path), config_path)
    index = os.path.join(ckpt_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        files = sorted(set(_read_json(index)["weight_map"].values()))
        paths = [os.path.join(ckpt_dir, f) for f in files]
    else:
        paths = sorted(glob.glob(os.path.join(ckpt_dir, "*.safetensors")))
    if not paths:
        raise CheckpointError(f"{ckpt_dir}: config.json but no *.safetensors weights")
    handles = []
    for p in paths:
        try:
            handles.append((p, safe_open(p, framework="pt", device="cpu")))
        except Exception as e:
            raise CheckpointError(f"{p}: cannot read ({type(e).__name__}: {e})") from None
    names = {k for _, h in handles for k in h.keys()}
    tied = "lm_head.weight" not in names

    def unpermute(w, n_heads):
        # HF stores q/k rows per head as [all first halves, all second halves] so its RoPE can
        # rotate halves; Meta's RoPE rotates adjacent pairs. Interleave the halves back.
        rows, cols = w.shape
        return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)

    def tensors():
        for p, h in handles:
            for hf_name in h.keys():
                name = hf_name
                for old, new in _HF_NAMES.items():
                    name = name.replace(old, new)
                name = name.replace("model.layers.", "layers.")
                t = h.get_tensor(hf_name)
                if name.endswith("attention.wq.weight"):
                    t = unpermute(t, args.n_heads)
                elif name.endswith("attention.wk.weight"):
                    t = unpermute(t, args.kv_heads)
                yield name, t

    return args, tensors(), tied, config_path


def load(ckpt_dir, device="cpu", dtype=None, max_seq_len: Optional[int] = None) -> Transformer:
    """Load a Meta- or HF-layout checkpoint directory into a Transformer, one tensor at a time.

    The model is built on the meta device (no memory) and each weight is assigned as it is read,
    so at no point do two full copies of the weights exist.
    """
    ckpt_dir = os.path.expanduser(str(ckpt_dir))
    if not os.path.isdir(ckpt_dir):
        raise CheckpointError(f"{ckpt_dir}: no such checkpoint directory")
    if os.path.exists(os.path.join(ckpt_dir, "params.json")):
        args, tensors, tied, config_path = _meta_checkpoint(ckpt_dir)
    elif os.path.exists(os.path.join(ckpt_dir, "config.json")):
        args, tensors, tied, config_path = _hf_checkpoint(ckpt_dir)
    else:
        raise CheckpointError(f"{ckpt_dir}: neither params.json (Meta) nor config.json (HF) found")
    if max_seq_len:
        args.max_seq_len = max_seq_len
    elif not os.path.exists(os.path.join(ckpt_dir, "config.json")) and "max_seq_len" not in _read_json(config_path):
        # Meta's params.json leaves the context to the caller: Llama 2 was trained at 4096,
        # Llama 3 at 8192, 3.1 and 3.2 extend it to 131072.
        args.max_seq_len = 131072 if args.use_scaled_rope else 8192 if args.vocab_size >= 128000 else 4096
    dtype = resolve_dtype(dtype, device)

    with torch.device("meta"):
        model = Transformer(args)
    if tied:
        model.tie_weights()
    expected = dict(model.state_dict())
    if tied:
        expected.pop("output.weight")
    state = {}
    for name, t in tensors:
        if name not in expected:
            continue  # stray keys such as rope.freqs or rotary_emb.inv_freq
        if t.shape != expected[name].shape:
            raise CheckpointError(f"{config_path} disagrees with the weights: {name} is {tuple(t.shape)} "
                                  f"in the checkpoint but {tuple(expected[name].shape)} by the config")
        state[name] = t.to(device=device, dtype=dtype)
    missing = sorted(set(expected) - set(state))
    if missing:
        raise CheckpointError(f"{ckpt_dir}: weights missing from the checkpoint: {', '.join(missing[:4])}"
                              + (" ..." if len(missing) > 4 else ""))
    model.load_state_dict(state, strict=False, assign=True)
    if tied:
        model.tie_weights()
    model.reset_rope()
    return model.eval()


def meta_params(args: ModelArgs) -> dict:
    """params.json as Meta writes it: Llama 2 keys always, Llama 3 keys only where they apply, so
    both generations of Meta's code read it back."""
    p = {"dim": args.dim, "n_layers": args.n_layers, "n_heads": args.n_heads, "n_kv_heads": args.kv_heads,
         "vocab_size": args.vocab_size, "multiple_of": args.multiple_of,
         "ffn_dim_multiplier": args.ffn_dim_multiplier, "norm_eps": args.norm_eps,
         "max_seq_len": args.max_seq_len}
    if args.rope_theta != 10000.0:
        p["rope_theta"] = args.rope_theta
    if args.use_scaled_rope:
        p["use_scaled_rope"] = True
        defaults = ModelArgs()
        for k in ("rope_scaling_factor", "rope_low_freq_factor", "rope_high_freq_factor",
                  "rope_original_max_seq_len"):
            if getattr(args, k) != getattr(defaults, k):
                p[k] = getattr(args, k)
    return p


def save(model: Transformer, out_dir) -> None:
    """Write the Meta layout (params.json + consolidated.00.pth), atomically: a kill mid-write leaves
    the previous checkpoint, never a torn one. A tied output is stored as the same tensor, which
    torch.save keeps as one storage and load() recognises."""
    out_dir = os.path.expanduser(str(out_dir))
    os.makedirs(out_dir, exist_ok=True)
    weights = os.path.join(out_dir, "consolidated.00.pth")
    torch.save({k: v.detach() for k, v in model.state_dict().items()}, weights + ".tmp")
    with open(os.path.join(out_dir, "params.json.tmp"), "w") as f:
        json.dump(meta_params(model.args), f, indent=2)
    os.replace(weights + ".tmp", weights)
    os.replace(os.path.join(out_dir, "params.json.tmp"), os.path.join(out_dir, "params.json"))
    for stale in glob.glob(os.path.join(out_dir, "consolidated.*.pth")):
        if stale != weights:  # left by an earlier, sharded checkpoint in the same place
            os.remove(stale)
