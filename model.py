"""A Llama (2, 3, 3.1, 3.2) in one file: the architecture in plain PyTorch, then its fused kernels.

Read top to bottom:
  ModelArgs        the hyper-parameters, named as in Meta's params.json; derived sizes resolved once;
                   the head's labels (n_labels 0: none) and kind (head_kind: classify | tag)
  RMSNorm, RoPE    normalisation and rotary position embedding (with Llama 3.1 frequency scaling)
  Linear           a projection without bias (one token's product on a CPU: a matrix-vector kernel;
                   a weight stored narrower than the activations widened as used: linear; fp32 on a
                   CPU by the library cpu_paths measured faster: product);
                   projections: several of one input, one token's in one kernel call on a CPU
  Attention        grouped-query attention; KVCache holds its keys and values while decoding;
                   one_query_attention: a half-precision decoding step's attention on a CPU
  FeedForward      SwiGLU
  Transformer      the stack: forward() trains and scores (logits, or the mean cross-entropy),
                   classify() pools the classification head's logits (score) at each document's
                   last token, padded or packed (left_padding_positions, last_tokens);
                   tag() the tag head's logits at every token (head_layer: score with bias);
                   decode() runs prompt chunks and single tokens against the KV cache (eager: over
                   the slots written so far; last_only: a prompt's last logits; one token at batch 1
                   on a CPU: every plain block in one C call, _cpu_step); it keeps its RoPE
                   table itself (rebuilt where the model lands, to the positions asked for, or when
                   extend_context grows the context); compute_dtype: activations wider than the
                   weights (cpu_paths.py); init_weights for training from scratch
  NF4              QLoRA's 4-bit frozen projections, bitsandbytes' format: nf4_quantize, NF4Linear,
                   nf4_projections (a model's projections swapped for them)
  Fused kernels    Triton twins of rms_norm, apply_rope, swiglu, linear_cross_entropy and
                   nf4_dequantize, switched in at the file's last lines (on CUDA, or when
                   LLAMA_KERNELS=triton); and cpu_mv's and cpu_mv_many's, a C kernel for one
                   token's projections on a CPU (cpu_gemv.py builds it)
"""

import functools
import math
import os
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

import cpu_gemv
import cpu_paths

# -----------------------------------------------------------------------------------------------
# Configuration


HEAD_KINDS = ("classify", "tag")


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
    # A classification head (Transformer.score, classify): 0 labels is none, the plain language model.
    n_labels: int = 0
    multilabel: bool = False  # each label on or off (sigmoid, BCE); else exactly one label (softmax, CE)
    labels: Optional[tuple] = None  # the labels' names in the head's order, where known
    pad_id: Optional[int] = None  # the token that pads rows for the head (classify's default)
    # "classify": one row of logits per document (classify; score without bias, as transformers'
    # LlamaForSequenceClassification); "tag": one per token (tag; score with bias, as its
    # LlamaForTokenClassification)
    head_kind: str = "classify"
    # Derived in __post_init__, not arguments: use dataclasses.replace to change dim, heads or FFN.
    head_dim: int = field(init=False)
    hidden_dim: int = field(init=False)

    def __post_init__(self):
        self.n_kv_heads = self.n_kv_heads or self.n_heads
        for name in ("n_layers", "multiple_of", "max_seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} is {getattr(self, name)}, must be at least 1")
        if not self.norm_eps > 0:
            raise ValueError(f"norm_eps is {self.norm_eps}, must be positive")
        if min(self.dim, self.n_heads, self.n_kv_heads) <= 0 or self.dim % self.n_heads or \
                self.n_heads % self.n_kv_heads:
            raise ValueError(f"dim {self.dim}, n_heads {self.n_heads}, n_kv_heads {self.n_kv_heads}: "
                             "each must be positive and divide the one before")
        self.head_dim = self.dim // self.n_heads
        if self.head_dim % 2:
            raise ValueError(f"dim {self.dim} / n_heads {self.n_heads} is {self.head_dim}: RoPE rotates pairs, "
                             "so it must be even")
        # Meta's arithmetic: 2/3 of 4*dim (SwiGLU has three matrices instead of two, so this keeps
        # the parameter count of a 4*dim MLP), scaled, then rounded up to multiple_of.
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        self.hidden_dim = self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)
        self._check_head()

    def _check_head(self):
        if self.head_kind not in HEAD_KINDS:
            raise ValueError(f"head_kind {self.head_kind!r}: expected one of {', '.join(HEAD_KINDS)}")
        if self.head_kind == "tag" and self.multilabel:
            raise ValueError("a tag head is not multilabel (one tag per token)")
        if self.n_labels < 0 or (self.n_labels == 0 and (self.multilabel or self.labels)):
            raise ValueError(f"n_labels is {self.n_labels}: a head needs at least 1 label "
                             "(multilabel and labels describe a head)")
        if self.labels is not None:
            self.labels = tuple(self.labels)  # params.json gives a list
            if len(self.labels) != self.n_labels or len(set(self.labels)) != len(self.labels):
                raise ValueError(f"labels {list(self.labels)[:8]} must be {self.n_labels} distinct names (n_labels)")


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


def rope_table(args: ModelArgs, device=None, length: Optional[int] = None) -> torch.Tensor:
    """cos and sin of position * frequency, (length, head_dim/2, 2), fp32: positions 0 .. length-1,
    by default all args.max_seq_len of them. A row's values do not depend on the table's length."""
    length = args.max_seq_len if length is None else length
    if (torch.get_default_device() if device is None else torch.device(device)).type == "meta":
        # a model built to receive a checkpoint: the table is computed where the model lands
        return torch.empty(length, args.head_dim // 2, 2, device="meta", dtype=torch.float32)
    freqs = rope_frequencies(args).to(device)
    t = torch.arange(length, device=device, dtype=torch.float32)
    angles = torch.outer(t, freqs)
    return torch.stack([angles.cos(), angles.sin()], dim=-1)


def apply_rope(x, rope):
    """Rotate consecutive pairs (x0, x1) of each head by the position's angle (Meta's layout).

    x: (B, T, n_heads, head_dim); rope: (T, head_dim/2, 2) or (B, T, head_dim/2, 2).
    Meta treats each pair as a complex number and multiplies by e^{i*angle}; this is the same
    arithmetic written with reals, in fp32.
    """
    B, T, H, D = x.shape
    xp = x.float().reshape(B, T, H, D // 2, 2)
    if rope.dim() == 3:
        rope = rope.unsqueeze(0)
    cos, sin = rope[..., 0].unsqueeze(2), rope[..., 1].unsqueeze(2)  # (B or 1, T, 1, D/2)
    x0, x1 = xp[..., 0], xp[..., 1]
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    return out.reshape(B, T, H, D).type_as(x)


def swiglu(a, b):
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


class Linear(nn.Linear):
    """A Llama projection: nn.Linear, without bias but for the tag head's. One token's product on a
    CPU (decoding at batch 1) is a matrix-vector product, bound by reading the weight: cpu_mv, at the
    file's end, runs it. The weight may be stored narrower than the activations (see linear)."""

    def __init__(self, in_features, out_features, bias=False):
        super().__init__(in_features, out_features, bias=bias)

    def forward(self, x):
        if one_cpu_token(x):
            y = cpu_mv(self.weight, x.reshape(-1)).view(*x.shape[:-1], self.out_features)
        else:
            y = linear(x, self.weight)
        return y if self.bias is None else y + self.bias.to(y.dtype)


# A weight widened for a product of several tokens goes this many bytes at a time.
WIDEN_BYTES = 32 << 20


def linear(x, weight):
    """x @ weight.T in x's dtype. A weight stored narrower than the activations (bf16 or fp16 kept as
    the checkpoint stores them, on a CPU that computes in fp32: cpu_paths.py) is widened a block of
    rows at a time as the product uses it, so that no full-precision copy of it is ever made."""
    if weight.dtype == x.dtype:
        return product(x, weight)
    rows = max(1, WIDEN_BYTES // (weight.shape[1] * x.element_size()))
    return torch.cat([product(x, block.to(x.dtype)) for block in weight.split(rows)], dim=-1)


def product(x, weight):
    """x @ weight.T, both of one dtype: F.linear, but for fp32 on a CPU outside autograd, whichever of
    F.linear (MKL) and oneDNN's product cpu_paths measured faster on this CPU (oneDNN's by 1.45x on an
    AMD EPYC, where MKL does not use AVX-512: a prompt's pass is almost all these products)."""
    if (x.dtype == torch.float32 and x.device.type == "cpu" and weight.device.type == "cpu" and x.numel()
            and weight.numel() and not torch.compiler.is_compiling()
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))):
        return cpu_paths.fp32_products()(x, weight)
    return F.linear(x, weight)


def one_cpu_token(x) -> bool:
    """Whether x is one token's activations on a CPU (decoding at batch 1): its products are then
    matrix-vector products, bound by reading the weights, which cpu_mv's kernel runs."""
    return x.device.type == "cpu" and x.numel() == x.shape[-1]


def cpu_mv(weight, x):
    """weight (N, K) @ x (K) in x's dtype: one token's projection on a CPU. The PyTorch twin of
    cpu_gemv.c's kernel, which takes over outside autograd at the file's end."""
    return torch.mv(weight.to(x.dtype), x)


def cpu_mv_many(weights, x):
    """The products of several weights with one x, one after another: cpu_mv's, for projections."""
    return torch.cat([torch.mv(w.to(x.dtype), x) for w in weights])


def projections(x, *layers):
    """layer(x) for each of several projections of one input (a block's wq, wk and wv; its w1 and
    w3). One token on a CPU, plain Linear layers go through one call of cpu_gemv.c, which splits all
    their rows between the threads at once: one parallel region and one call's overhead, not three,
    in a step whose small costs add up to a tenth of its time."""
    if one_cpu_token(x) and all(type(layer) is Linear and layer.bias is None for layer in layers):
        y = cpu_mv_many([layer.weight for layer in layers], x.reshape(-1))
        return y.view(*x.shape[:-1], -1).split([layer.out_features for layer in layers], dim=-1)
    return tuple(layer(x) for layer in layers)


class KVCache(nn.Module):
    """The keys and values of every position decoded so far, (B_max, n_kv_heads, length, head_dim).
    Allocated once at full length and written in place, never grown: every decode step then has the
    same shapes, which lets torch.compile and CUDA graphs capture one. decode() masks unwritten slots."""

    def __init__(self, shape, dtype, device):
        super().__init__()
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, positions, k, v):
        """Store k, v (B, n_kv_heads, T, head_dim) at positions (T,); return the whole cache of these rows."""
        B = k.shape[0]
        self.k[:B].index_copy_(2, positions, k.to(self.k.dtype))
        self.v[:B].index_copy_(2, positions, v.to(self.v.dtype))
        return self.k[:B], self.v[:B]


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = Linear(args.dim, args.n_heads * self.head_dim)
        self.wk = Linear(args.dim, self.n_kv_heads * self.head_dim)
        self.wv = Linear(args.dim, self.n_kv_heads * self.head_dim)
        self.wo = Linear(args.n_heads * self.head_dim, args.dim)
        self.cache = None  # a KVCache while decoding (Transformer.setup_cache)

    def forward(self, x, rope, mask=None, cache_positions=None, keys=None):
        B, T, _ = x.shape
        q, k, v = projections(x, self.wq, self.wk, self.wv)
        q = q.view(B, T, self.n_heads, self.head_dim)
        k, v = k.view(B, T, self.n_kv_heads, self.head_dim), v.view(B, T, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, head_dim)
        if cache_positions is not None:  # decoding: the whole cache behind the mask, or its first `keys` slots
            k, v = self.cache.update(cache_positions, k, v)
            if keys is not None:
                k, v = k[:, :, :keys], v[:, :, :keys]

        # Grouped-query attention: each group of n_heads/n_kv_heads query heads shares one key/value
        # head; SDPA broadcasts them (enable_gqa) instead of us copying k and v.
        gqa = self.n_kv_heads != self.n_heads
        if mask is None and T == 1 and q.device.type == "cpu" and q.dtype != torch.float32:
            out = one_query_attention(q, k, v)
        elif mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=gqa)
        elif isinstance(mask, torch.Tensor):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        else:  # a FlexAttention BlockMask (packed documents on CUDA)
            out = flex_attention(q, k, v, block_mask=mask, enable_gqa=gqa)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


def one_query_attention(q, k, v):
    """A decoding step's attention, one query position (B, n_heads, 1, head_dim) over keys and values
    (B, n_kv_heads, L, head_dim), by hand: scores and weights in fp32, as SDPA keeps them. On a CPU,
    PyTorch's fused kernel takes 6x as long as this for one bf16 query (0.52 ms against 0.08 ms per
    layer at 300 positions; BENCHMARKS.md, "CPU inference")."""
    B, H, _, D = q.shape
    n_kv = k.shape[1]
    q = q.view(B, n_kv, H // n_kv, D).float()  # each key/value head with its group of query heads
    scores = q @ k.float().transpose(-1, -2) * D ** -0.5  # (B, n_kv, group, L)
    return (scores.softmax(-1) @ v.float()).to(v.dtype).view(B, H, 1, D)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = Linear(dim, hidden_dim)  # gate
        self.w2 = Linear(hidden_dim, dim)  # down
        self.w3 = Linear(dim, hidden_dim)  # up

    def forward(self, x):
        return self.w2(swiglu(*projections(x, self.w1, self.w3)))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.hidden_dim)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, rope, mask=None, cache_positions=None, keys=None):
        h = x + self.attention(self.attention_norm(x), rope, mask, cache_positions, keys)
        return h + self.feed_forward(self.ffn_norm(h))


def plain_block_tensors(block: TransformerBlock):
    """A plain block's tensors in cpu_gemv.BLOCK_TENSORS' order (its norms' and projections' weights, its
    KV cache), for a decoding step in C; None for a block that is not plain: a LoRA or NF4 projection,
    a bias, a norm of another kind, a hook on any of its modules. Read through the modules' own
    dictionaries: nn.Module's attribute lookup costs a microsecond a name, 0.4 ms a step for a 1B model."""
    modules = block._modules
    a, f = modules["attention"]._modules, modules["feed_forward"]._modules
    norms, linears = (modules["attention_norm"], modules["ffn_norm"]), (a["wq"], a["wk"], a["wv"], a["wo"], f["w1"],
                                                                       f["w2"], f["w3"])
    if (any(type(n) is not RMSNorm for n in norms) or any(type(m) is not Linear or m._parameters["bias"] is not None
                                                            for m in linears)
            or any(m._forward_hooks or m._forward_pre_hooks for m in (block, modules["attention"],
                                                                      modules["feed_forward"], *norms, *linears))):
        return None
    cache = a["cache"]._buffers  # setup_cache's KVCache, a submodule
    wq, wk, wv, wo, w1, w2, w3 = (m._parameters["weight"] for m in linears)
    return (norms[0]._parameters["weight"], wq, wk, wv, wo, norms[1]._parameters["weight"], w1, w2, w3, cache["k"],
            cache["v"])


def linear_cross_entropy(h, weight, targets, ignore_index: int = -100, reduction: str = "mean",
                         chunk_size: Optional[int] = None):
    """cross_entropy(h @ weight.T, targets) for h (..., dim), weight (vocab, dim), targets (...).

    "mean" averages over targets != ignore_index and is 0, with zero gradients, when there are none
    (not NaN as F.cross_entropy gives); "sum" adds them up. This twin makes all the logits at once;
    the fused kernel (end of file) makes chunk_size rows at a time, so it never holds them all.
    """
    _check_reduction(reduction)
    h, targets = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
    loss = F.cross_entropy(linear(h, weight).float(), targets, ignore_index=ignore_index, reduction="sum")
    return loss if reduction == "sum" else loss / (targets != ignore_index).sum().clamp(min=1)


def left_padding_positions(tokens, pad_id):
    """positions (B, T) for forward that keep a row's leading padding out of its document: each pad
    before the row's first other token is a one-token document of its own (position 0), and the
    document counts 0, 1, ... from that first token on (what follows it, padding included, is
    causally behind it). None, the plain causal mask, where no row starts with pad_id."""
    if pad_id is None or not bool((tokens[:, 0] == pad_id).any()):
        return None
    leading = (tokens != pad_id).int().cummax(dim=1).values == 0  # pads before the first other token
    T = tokens.shape[1]
    index = torch.arange(T, device=tokens.device).expand_as(tokens)
    return torch.where(leading, 0, index - leading.sum(dim=1, keepdim=True))


def last_tokens(starts, real=None):
    """The flat index (into B*T) of each document's last real token, documents in row-major order.
    starts (B, T) bool: where documents start (each row's first token among them); real (B, T) bool:
    the tokens that are not padding (None: all). A document without one gives its first token."""
    flat_starts = starts.flatten()
    doc = flat_starts.cumsum(0) - 1  # each token's document
    index = torch.arange(doc.numel(), device=doc.device)
    first = index[flat_starts]
    candidate = index if real is None else torch.where(real.flatten(), index, -1)
    last = torch.full_like(first, -1).scatter_reduce(0, doc, candidate, reduce="amax")
    return torch.where(last < 0, first, last)


def head_layer(args: ModelArgs):
    """The head's `score` (None without one): a classification head is a projection without bias
    (transformers' LlamaForSequenceClassification), a tag head one with a bias (its
    LlamaForTokenClassification)."""
    if not args.n_labels:
        return None
    return Linear(args.dim, args.n_labels, bias=args.head_kind == "tag")


def _check_reduction(reduction):
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction {reduction!r}: expected 'mean' or 'sum'")


ROPE_ROWS = 4096  # the fewest positions a RoPE table rebuilt on demand covers (Transformer._rope)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        if args.vocab_size <= 0:
            raise ValueError("ModelArgs.vocab_size must be set (load() takes it from the weights)")
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = Linear(args.dim, args.vocab_size)
        # The head, from the same normalised hidden state as output (classify, tag)
        self.score = head_layer(args)
        # Not a state-dict entry: rebuilt from args wherever the model lands.
        self.register_buffer("rope", rope_table(args), persistent=False)
        self.activation_checkpointing = False
        # The activations' dtype where it differs from the weights' (bf16 weights computed in fp32 on
        # a CPU: checkpoint.load sets it from cpu_paths.plan); None: the weights' own.
        self.compute_dtype = None
        self._cpu_plan = None  # (where its tensors lay, cpu_gemv.block_plan of them): _cpu_step's

    def tie_weights(self):
        """Llama 3.2 1B/3B share the embedding with the output projection."""
        self.output.weight = self.tok_embeddings.weight

    @property
    def tied(self) -> bool:
        return self.output.weight is self.tok_embeddings.weight

    def init_weights(self, std: float = 0.02):
        """Random init for training from scratch, each parameter by init_parameter's rule."""
        for name, p in self.named_parameters():
            self.init_parameter(name, p, std)

    def init_parameter(self, name: str, p: torch.Tensor, std: float = 0.02):
        """The parameter called name (or a tensor of its shape standing in for it: fsdp.py fills one
        full tensor at a time) drawn from scratch: normal(0, std), output projections scaled down by
        sqrt(2 * n_layers) so the residual stream does not grow with depth (GPT-2's rule); norms one."""
        if name.endswith("norm.weight"):
            nn.init.ones_(p)
        elif name.endswith(("wo.weight", "w2.weight")):
            nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.args.n_layers))
        else:
            nn.init.normal_(p, 0.0, std)

    def extend_context(self, max_seq_len: int):
        """Make room for sequences of max_seq_len tokens (a run training longer than the checkpoint's
        context): args.max_seq_len grows to it, and the RoPE table with it."""
        self.args.max_seq_len = max(self.args.max_seq_len, max_seq_len)
        self._rope(self.tok_embeddings.weight.device, self.args.max_seq_len)

    def to_empty(self, *, device, recurse: bool = True):
        """nn.Module.to_empty, then the RoPE table computed on device: it is no weight that a
        checkpoint or init_weights fills in, and to_empty leaves it uninitialised."""
        super().to_empty(device=device, recurse=recurse)
        self.rope = rope_table(self.args, device=self.tok_embeddings.weight.device)
        return self

    def forward(self, tokens, targets=None, positions=None, reduction: str = "mean"):
        """Training and scoring: tokens (B, T) int64 -> float logits (B, T, vocab), or with targets
        the cross-entropy over targets != -100 (mean, or "sum", which the trainer normalises itself).
        positions: (B, T) position of each token inside its own document, restarting at 0 where a
        document starts (packed training rows); attention then stays inside each document."""
        h = self.hidden(tokens, positions)
        if targets is None:
            return self.output(h).float()
        # output is a plain nn.Linear (LoRA wraps only the blocks' projections), so the loss can take
        # its weight and, on the fused path, never hold the (B*T, vocab) logits at once.
        return linear_cross_entropy(h, self.output.weight, targets, reduction=reduction)

    def hidden(self, tokens, positions=None):
        """The trunk that forward and classify share: tokens (B, T) -> the final normalised hidden
        states (B, T, dim), under the document mask where positions are given (see forward)."""
        T = tokens.shape[1]
        if positions is None:
            if T > self.args.max_seq_len:
                raise ValueError(f"sequence of {T} tokens exceeds max_seq_len {self.args.max_seq_len}")
            rope, mask = self._rope(tokens.device, T)[:T], None
        else:
            rope = self._rope(tokens.device, T)[positions]  # (B, T, head_dim/2, 2): each document from 0
            mask = document_mask(positions)
        return self._blocks(tokens, rope, mask)

    def classify(self, tokens, positions=None, pad_id=None):
        """The head's float logits, one row per document: (n_docs, n_labels).

        Each document is pooled at its last token that is not pad_id (default args.pad_id; None:
        its last token), transformers' rule, so right and left padding alike; a document of padding
        alone is pooled at its first token, as transformers pools a row of padding.
        positions None: each row is one document (n_docs = B); leading padding is kept out of the
        document's attention and positions, so a left-padded row scores as the document run alone.
        positions (B, T) as forward takes them: packed rows, a document starting wherever a position
        is 0 (and at each row's start); logits come row by row, left to right in each row. Padding
        after a row's last document continues its positions, so it is no document of its own."""
        if self.score is None:
            raise ValueError("classify needs a head: this model has n_labels 0")
        if self.args.head_kind != "classify":
            raise ValueError("classify needs a classification head: this model's is a tag head (tag())")
        pad_id = self.args.pad_id if pad_id is None else pad_id
        starts = torch.zeros_like(tokens, dtype=torch.bool) if positions is None else positions == 0
        starts[:, 0] = True
        attend = positions if positions is not None else left_padding_positions(tokens, pad_id)
        h = self.hidden(tokens, attend)
        last = last_tokens(starts, None if pad_id is None else tokens != pad_id)
        return self.score(h.flatten(0, 1)[last]).float()

    def tag(self, tokens, positions=None):
        """The tag head's float logits for every token: (B, T, n_labels), from each position's final
        hidden state (transformers' LlamaForTokenClassification). positions as forward takes them
        (packed rows, each document attending only to itself); None: each row one causal sequence,
        so a right-padded row's real tokens score as the sentence run alone."""
        if self.score is None or self.args.head_kind != "tag":
            raise ValueError(f"tag needs a tag head: this model has {self.args.n_labels} labels, head_kind "
                             f"{self.args.head_kind!r}")
        return self.score(self.hidden(tokens, positions)).float()

    def decode(self, tokens, start_pos, last_only=False):
        """Decoding with the KV cache (setup_cache first): tokens (B, T) at positions start_pos ..
        start_pos+T-1 (a prompt chunk, then one token at a time) -> float logits (B, T, vocab).
        start_pos: an int, or a 0-d tensor so that a compiled step is not specialised to each one.
        last_only: the logits of the last position alone, (B, 1, vocab): a prompt's pass needs no
        others, and the output layer over every position is a fifth of a 1B model's work."""
        cache = self.layers[0].attention.cache
        if cache is None:
            raise RuntimeError("decode() needs setup_cache() first")
        T, length = tokens.shape[1], cache.k.shape[2]
        if isinstance(start_pos, int) and start_pos + T > length:
            raise ValueError(f"positions up to {start_pos + T} exceed the KV cache of {length}")
        positions = start_pos + torch.arange(T, device=tokens.device)
        if isinstance(start_pos, int):  # eager: attend over the slots written so far, not the whole cache
            keys = start_pos + T  # (a mask over every slot cost more than the attention of a one-token step)
            mask = None if start_pos == 0 or T == 1 else torch.arange(keys, device=tokens.device) <= positions[:, None]
        else:  # a compiled step: one shape for every position, the unwritten slots behind the mask
            keys, mask = None, torch.arange(length, device=tokens.device)[None, :] <= positions[:, None]
        h = self._blocks(tokens, self._rope(tokens.device, length)[positions], mask, positions, keys)
        return self.output(h[:, -1:] if last_only else h).float()

    def _blocks(self, tokens, rope, mask, cache_positions=None, keys=None):
        """Embedding, every block, final norm: the hidden states before the output layer."""
        h = self.tok_embeddings(tokens)
        if self.compute_dtype is not None:
            h = h.to(self.compute_dtype)
        if keys is not None and h.shape[:2] == (1, 1) and h.device.type == "cpu":
            stepped = self._cpu_step(h, rope, keys - 1)  # one token, eager: cpu_gemv.c runs every block
            if stepped is not None:
                return self.norm(stepped)
        for layer in self.layers:
            if self.activation_checkpointing and self.training:
                # keep only each layer's input; recompute its insides during backward
                h = torch.utils.checkpoint.checkpoint(layer, h, rope, mask, cache_positions, use_reentrant=False)
            else:
                h = layer(h, rope, mask, cache_positions, keys)
        return self.norm(h)

    def _cpu_step(self, h, rope, pos: int):
        """The blocks of a one-token decoding step at batch 1 on a CPU, in one call of cpu_gemv.c's
        decode_blocks: _blocks' loop with the same arithmetic, rounded where it rounds, without its
        eighty-odd small PyTorch operations per block around the products (7-11 ms of a 1B model's
        65 ms step on a CPU). None where it does not run: a block that is not plain (LoRA, NF4, a
        bias, a hook), autograd, LLAMA_KERNELS=torch, dtypes or layouts the kernel does not take."""
        if _KERNELS == "torch" or nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
            return None
        tensors = []
        for layer in self.layers:
            block = plain_block_tensors(layer)
            if block is None:
                return None
            tensors += block
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            return None
        # Checked once for these tensors as they lie: a step only compares where and how they lie now (a
        # cache made again for another length can land at the old one's address).
        where = tuple((t.data_ptr(), t.dtype, t.shape, t.stride()) for t in tensors)
        plan = self._cpu_plan
        if plan is None or plan[0] != where:
            eps = {layer.attention_norm.eps for layer in self.layers} | {layer.ffn_norm.eps for layer in self.layers}
            plan = self._cpu_plan = (where, cpu_gemv.block_plan(tensors, self.args.n_heads, self.args.n_kv_heads,
                                                                 eps.pop()) if len(eps) == 1 else None)
        x = h.reshape(-1).clone()
        done = plan[1] is not None and cpu_gemv.decode_blocks(plan[1], x, rope.reshape(-1, 2), pos) is not None
        return x.view_as(h) if done else None

    def _rope(self, device, length: int):
        """The RoPE table of at least `length` positions, rebuilt on the weights' device where it no
        longer fits: built on the meta device (a model made to receive a checkpoint), left on another
        device, cast by .to(dtype) (it stays fp32), or too short. A rebuilt table covers the next power
        of two (at least ROPE_ROWS), not all of args.max_seq_len: Llama 3.1's 131072 positions take
        50 ms to compute on a CPU, a tenth of loading a 1B model and scoring its first prompt."""
        rope = self.rope
        if (rope.is_meta or rope.device != device or rope.dtype != torch.float32 or rope.shape[0] < length):
            rows = min(max(ROPE_ROWS, 1 << (max(length, 1) - 1).bit_length()), max(self.args.max_seq_len, length))
            self.rope = rope_table(self.args, device=self.tok_embeddings.weight.device, length=rows)
        return self.rope

    def setup_cache(self, max_batch_size: int, max_seq_len: Optional[int] = None):
        """Preallocate every layer's KV cache once, so decoding never reallocates or concatenates."""
        length = max_seq_len or self.args.max_seq_len
        if length > self.args.max_seq_len:
            raise ValueError(f"cache length {length} exceeds max_seq_len {self.args.max_seq_len}")
        shape, w = (max_batch_size, self.args.n_kv_heads, length, self.args.head_dim), self.tok_embeddings.weight
        for layer in self.layers:
            layer.attention.cache = KVCache(shape, self.compute_dtype or w.dtype, w.device)

    def clear_cache(self):
        for layer in self.layers:
            layer.attention.cache = None


# -----------------------------------------------------------------------------------------------
# NF4: the frozen projections of a QLoRA run in 4 bits (Dettmers et al. 2023), in bitsandbytes' format
#
# A weight is cut, flat, into blocks of 64; each block is divided by its absolute maximum and every
# value replaced by the nearest of the 16 NormalFloat levels (quantiles of a normal distribution, which
# is how trained weights are spread), two 4-bit indices per byte, the first in the high half. The block
# maxima are quantized too ("double quantization"): their mean is subtracted, then blocks of 256 of
# them are scaled by their own absolute maximum and mapped to an 8-bit code. About 4.13 bits a weight.
# The bytes are those of bitsandbytes' quantize_4bit(w, quant_type="nf4", blocksize=64,
# compress_statistics=True), rounding included, and either side dequantizes the other's to the same
# values. (The 8-bit codes of the block maxima are those of its exact PyTorch backend; its native CPU
# kernel searches the code approximately and lands a few in a thousand a level or so away.)

NF4_BLOCK, ABSMAX_BLOCK = 64, 256

# The 16 NF4 levels, as bitsandbytes lists them (its get_4bit_type("nf4")).
NF4_LEVELS = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
              -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
              0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
              0.7229568362236023, 1.0)


def dynamic_levels() -> torch.Tensor:
    """The 256 levels of bitsandbytes' signed 8-bit dynamic code (Dettmers 2015), used for the block
    maxima: in each decade 10^-6 .. 10^0, 2^i magnitudes spread evenly over its upper nine tenths
    (midpoints of a linspace), both signs; plus 0 and 1."""
    levels = [0.0, 1.0]
    for i in range(7):
        edges = torch.linspace(0.1, 1, 2 ** i + 1)
        magnitudes = (edges[:-1] + edges[1:]) / 2.0 * 10.0 ** (i - 6)
        levels += magnitudes.tolist() + (-magnitudes).tolist()
    return torch.tensor(sorted(levels))


@functools.lru_cache(maxsize=None)
def _levels(name: str, device: torch.device) -> torch.Tensor:
    """A code's levels (sorted) on a device, made once."""
    return (torch.tensor(NF4_LEVELS) if name == "nf4" else dynamic_levels()).to(device)


def _quantize_blocks(flat: torch.Tensor, block: int, code: str):
    """(indices uint8, absmax fp32 per block): each block of fp32 `flat` scaled by its absolute maximum
    and rounded to the nearest level, a tie going down. Rounded as bitsandbytes' PyTorch backend does:
    full blocks multiply by the reciprocal of their maximum, a short last block divides by it (and
    keeps it, like the divisor, clear of zero)."""
    n = flat.numel()
    blocks = F.pad(flat, (0, -n % block)).view(-1, block)  # zeros never raise a block's maximum
    absmax = blocks.abs().amax(dim=1)
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38))[:, None]).flatten()[:n]
    if n % block:
        absmax[-1] = absmax[-1].clamp(min=1e-38)
        scaled[n - n % block:] = flat[n - n % block:] / absmax[-1]
    levels = _levels(code, flat.device)
    return torch.bucketize(scaled.clamp(-1, 1), (levels[:-1] + levels[1:]) / 2).to(torch.uint8), absmax


def nf4_quantize(weight: torch.Tensor) -> dict:
    """A weight (any float dtype, any shape) in NF4: {"packed": uint8 (n+1)//2, "absmax": uint8 per
    block of 64, "absmax_scale": fp32 per 256 blocks, "absmax_offset": fp32 scalar}, bitsandbytes'
    packed weight, quant_state.absmax, quant_state.state2.absmax and quant_state.offset."""
    indices, absmax = _quantize_blocks(weight.detach().reshape(-1).float(), NF4_BLOCK, "nf4")
    if indices.numel() % 2:  # an odd count is padded with the index of 0.0, as bitsandbytes does
        indices = torch.cat((indices, indices.new_full((1,), NF4_LEVELS.index(0.0))))
    packed = (indices[0::2] << 4) | indices[1::2]
    offset = absmax.mean()
    absmax_indices, absmax_scale = _quantize_blocks(absmax - offset, ABSMAX_BLOCK, "dynamic")
    return {"packed": packed, "absmax": absmax_indices, "absmax_scale": absmax_scale, "absmax_offset": offset}


def nf4_absmax(absmax, absmax_scale, absmax_offset) -> torch.Tensor:
    """The fp32 block maxima back from their 8-bit code: level * scale of its 256-block + offset."""
    scale = absmax_scale.repeat_interleave(ABSMAX_BLOCK)[: absmax.numel()]
    return _levels("dynamic", absmax.device)[absmax.long()] * scale + absmax_offset


def nf4_dequantize(packed, absmax, shape, dtype) -> torch.Tensor:
    """The weight of `shape` in `dtype` from its packed indices and fp32 block maxima (nf4_absmax):
    level * block maximum, in fp32, rounded once to dtype."""
    n = math.prod(shape)
    indices = torch.stack((packed >> 4, packed & 15), dim=1).flatten()[:n]
    scale = absmax.repeat_interleave(NF4_BLOCK)[:n]
    return (_levels("nf4", packed.device)[indices.long()] * scale).to(dtype).view(shape)


def fingerprint_sample(t: torch.Tensor) -> torch.Tensor:
    """Up to 1024 evenly strided values of a weight: what lora.base_fingerprint hashes, kept by
    NF4Linear from its full-precision weight so an adapter knows its base whether quantized or not."""
    return t.detach().flatten()[:: max(1, t.numel() // 1024)][:1024].clone()


class NF4Linear(nn.Module):
    """A frozen bias-free linear layer held in NF4. Each call dequantizes the weight to the input's
    dtype for one matmul and lets it go; backward dequantizes it again rather than keep it, so a
    layer never holds more than its 4-bit form between calls."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        for name, t in nf4_quantize(weight).items():
            self.register_buffer(name, t)
        self.register_buffer("weight_sample", fingerprint_sample(weight), persistent=False)

    def _apply(self, fn, recurse=True):
        """model.to(dtype) must not round the fp32 block scales (and the fingerprint sample): they
        follow the module's device, never its dtype."""
        exact = {name: getattr(self, name) for name in ("absmax_scale", "absmax_offset", "weight_sample")}
        super()._apply(fn, recurse)
        for name, t in exact.items():
            setattr(self, name, t.to(getattr(self, name).device))
        return self

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        absmax = nf4_absmax(self.absmax, self.absmax_scale, self.absmax_offset)
        return nf4_dequantize(self.packed, absmax, (self.out_features, self.in_features), dtype)

    def forward(self, x):
        return _NF4Matmul.apply(x, self)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, nf4"


class _NF4Matmul(torch.autograd.Function):
    """x @ W.T with W dequantized on the way in and again on the way back; nothing saved."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        return F.linear(x, layer.dequantize(x.dtype))

    @staticmethod
    def backward(ctx, dy):
        return dy @ ctx.layer.dequantize(dy.dtype), None


PROJECTIONS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")  # each block's projections: NF4's, LoRA's targets


def nf4_projections(model: Transformer, quantized: Optional[dict] = None) -> Transformer:
    """Each block's projections (PROJECTIONS) swapped in place from nn.Linear to NF4Linear: the
    layer in quantized under its weight's name ('layers.0.attention.wq.weight') where given (made as
    a checkpoint was read), else one quantized from the nn.Linear's own weight (on the meta device
    that computes nothing: only the shapes). Returns model."""
    for name, module in list(model.named_modules()):
        parent, _, child = name.rpartition(".")
        if child in PROJECTIONS and isinstance(module, nn.Linear):
            layer = quantized.pop(f"{name}.weight") if quantized is not None else NF4Linear(module.weight.detach())
            setattr(model.get_submodule(parent), child, layer)
    return model


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
#   nf4_dequantize  a QLoRA projection's weight from its 4-bit indices, one pass: index, level and
#                multiply per element, written once in the compute dtype. (The 8-bit block maxima
#                before it are 1/64 of the work and stay in PyTorch.)
# Not fused: the residual add before each norm. It would save one elementwise pass per norm but needs
# a two-output norm and a different block forward, at a cost to the reading.
#
# LLAMA_KERNELS=triton|torch forces a path (set_kernels() in code); unset, Triton runs on CUDA tensors
# and PyTorch elsewhere. On the CPU, Triton runs in its interpreter when TRITON_INTERPRET=1 (slow: the
# tests use it); triton reads that variable as each @triton.jit below runs, so it must be set before
# `import model`. Forcing Triton where it cannot run raises KernelError, never a silent fallback.
# The section switches itself in at its last lines: the names the architecture calls (rms_norm,
# apply_rope, swiglu, linear_cross_entropy) are rebound to dispatchers that pick the kernel or the twin.

try:
    import triton
    import triton.language as tl
    _TRITON_MISSING = None
except ImportError as e:  # e.g. macOS, which has no triton wheel: the PyTorch twins run alone
    from types import SimpleNamespace

    _TRITON_MISSING = e
    triton, tl = SimpleNamespace(jit=lambda fn: fn), SimpleNamespace(constexpr=None)  # kernels stay unlaunched

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
    if _TRITON_MISSING is not None:
        if _KERNELS is None:
            return False  # the default, on CUDA without triton installed
        raise KernelError(f"LLAMA_KERNELS=triton but triton cannot be imported ({_TRITON_MISSING}): "
                          "install it or set LLAMA_KERNELS=torch")
    if not x.is_cuda and not _INTERPRETED:
        raise KernelError(f"LLAMA_KERNELS=triton on a {x.device.type} tensor: Triton needs CUDA, or "
                          "TRITON_INTERPRET=1 (set before `import model`) for its slow CPU interpreter; "
                          "or set LLAMA_KERNELS=torch")
    return True


def _pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def _warps(block: int) -> int:
    return min(16, max(4, block // 512))  # a handful of a row's elements per thread


def _programs(device) -> int:
    """Programs that each walk a band of rows: a few per SM, so every SM stays busy."""
    return 4 * torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


@triton.jit
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


@triton.jit
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


@triton.jit
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


@triton.jit
def _swiglu_fwd(A, B, Y, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    a = tl.load(A + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + offs, (a * tl.sigmoid(a) * b).to(Y.dtype.element_ty), mask=mask)


@triton.jit
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


@triton.jit
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


def _fused_linear_cross_entropy(h, weight, targets, ignore_index: int = -100, reduction: str = "mean",
                                chunk_size: Optional[int] = None):
    """linear_cross_entropy's fused path; chunk_size rows of logits at a time (default: about
    _CE_CHUNK_BYTES of them)."""
    _check_reduction(reduction)
    h, targets = h.reshape(-1, h.shape[-1]), targets.reshape(-1).contiguous()
    return _LinearCrossEntropy.apply(h, weight, targets, ignore_index, reduction, chunk_size)


_NF4_ELEMENTS = 1024  # weights per program of the NF4 dequantization


@triton.jit
def _nf4_dequantize(PACKED, ABSMAX, LEVELS, OUT, n, BLOCK: tl.constexpr):
    """OUT[i] = LEVELS[nibble i of PACKED] * ABSMAX[i // 64]: the high nibble of a byte first."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = i < n
    byte = tl.load(PACKED + i // 2, mask=inside, other=0).to(tl.int32)
    index = tl.where(i % 2 == 0, byte >> 4, byte & 15)
    level = tl.load(LEVELS + index, mask=inside, other=0.0)
    absmax = tl.load(ABSMAX + i // 64, mask=inside, other=0.0)
    value = level * absmax
    if OUT.dtype.element_ty == tl.bfloat16:
        # Round to nearest even by hand, as torch and the GPU's cvt.rn do: the interpreter's cast truncates.
        bits = value.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        value = bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    tl.store(OUT + i, value.to(OUT.dtype.element_ty), mask=inside)


def _nf4_dequantize_kernel(packed, absmax, shape, dtype):
    n = math.prod(shape)
    out = torch.empty(shape, dtype=dtype, device=packed.device)
    _nf4_dequantize[(triton.cdiv(n, _NF4_ELEMENTS),)](packed, absmax, _levels("nf4", packed.device), out, n,
                                                     BLOCK=_NF4_ELEMENTS)
    return out


# -----------------------------------------------------------------------------------------------
# The one point where the kernels switch in: every call the architecture makes to these five names
# now asks use_triton(x) which path runs, and cpu_mv asks whether the C kernel can take it. The twins
# stay reachable as name.__wrapped__.

# What each @triton.jit above decided from TRITON_INTERPRET at import: the interpreter or the compiler.
_INTERPRETED = type(_swiglu_fwd).__name__ == "InterpretedFunction"


def _kernel_or_twin(twin, kernel):
    @functools.wraps(twin)
    def dispatch(x, *args, **kwargs):
        return (kernel if use_triton(x) else twin)(x, *args, **kwargs)
    return dispatch


rms_norm = _kernel_or_twin(rms_norm, _RMSNorm.apply)
apply_rope = _kernel_or_twin(apply_rope, _RoPE.apply)
swiglu = _kernel_or_twin(swiglu, _SwiGLU.apply)
linear_cross_entropy = _kernel_or_twin(linear_cross_entropy, _fused_linear_cross_entropy)
nf4_dequantize = _kernel_or_twin(nf4_dequantize, _nf4_dequantize_kernel)


def _cpu_kernel_or_twin(twin, kernel, weights_of):
    """cpu_gemv.c's kernel outside autograd (it has no backward), unless LLAMA_KERNELS=torch; the twin
    otherwise, and where the kernel cannot be built (cpu_gemv.status() says why)."""
    @functools.wraps(twin)
    def dispatch(weight, x):
        if _KERNELS != "torch" and not (torch.is_grad_enabled() and (
                x.requires_grad or any(w.requires_grad for w in weights_of(weight)))):
            y = kernel(weight, x)
            if y is not None:
                return y
        return twin(weight, x)
    return dispatch


cpu_mv = _cpu_kernel_or_twin(cpu_mv, lambda w, x: cpu_gemv.mv(w, x), lambda w: (w,))
cpu_mv_many = _cpu_kernel_or_twin(cpu_mv_many, lambda ws, x: cpu_gemv.mv_many(ws, x), lambda ws: ws)


def cpu_mv_kernel() -> str:
    """What runs one token's product on a CPU, in words."""
    return "torch.mv (LLAMA_KERNELS=torch)" if _KERNELS == "torch" else cpu_gemv.status()
