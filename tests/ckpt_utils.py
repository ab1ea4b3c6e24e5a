"""Tiny random Llama checkpoints, made with transformers as the reference, written in every layout
checkpoint.load reads: HF (safetensors, single or indexed; classic or transformers-5 config) and Meta
(params.json + consolidated.NN.pth, any number of model-parallel shards)."""

import json
import os

import torch

from model import ModelArgs

# Llama 2 (MHA, theta 1e4, untied), Llama 3.1 (GQA, theta 5e5, scaled RoPE x8, ffn multiplier),
# Llama 3.2 (GQA, scaled RoPE x32, tied embeddings): shapes tiny, features real.
VARIANTS = {
    "llama2": dict(args=ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=300, multiple_of=32,
                                  max_seq_len=128), tied=False),
    "llama3.1": dict(args=ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=384,
                                    multiple_of=32, ffn_dim_multiplier=1.3, rope_theta=500000.0,
                                    use_scaled_rope=True, max_seq_len=128), tied=False),
    "llama3.2": dict(args=ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=1, vocab_size=384,
                                    multiple_of=32, ffn_dim_multiplier=1.5, rope_theta=500000.0,
                                    use_scaled_rope=True, rope_scaling_factor=32.0, max_seq_len=128),
                     tied=True),
}


def hf_config(args: ModelArgs, tied: bool):
    from transformers import LlamaConfig

    rope = {"rope_type": "default", "rope_theta": args.rope_theta}
    if args.use_scaled_rope:
        rope = {"rope_type": "llama3", "rope_theta": args.rope_theta, "factor": args.rope_scaling_factor,
                "low_freq_factor": args.rope_low_freq_factor, "high_freq_factor": args.rope_high_freq_factor,
                "original_max_position_embeddings": args.rope_original_max_seq_len}
    return LlamaConfig(hidden_size=args.dim, intermediate_size=args.hidden_dim, num_hidden_layers=args.n_layers,
                       num_attention_heads=args.n_heads, num_key_value_heads=args.n_kv_heads,
                       vocab_size=args.vocab_size, rms_norm_eps=args.norm_eps, rope_parameters=rope,
                       max_position_embeddings=max(args.max_seq_len, args.rope_original_max_seq_len + 1),
                       tie_word_embeddings=tied, attn_implementation="eager")


def hf_model(variant: str, seed: int = 0):
    """A transformers LlamaForCausalLM with random (non-trivial) weights, fp32, eval mode."""
    from transformers import LlamaForCausalLM

    v = VARIANTS[variant]
    torch.manual_seed(seed)
    m = LlamaForCausalLM(hf_config(v["args"], v["tied"])).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))  # not all ones, so a missed norm shows
            else:
                p.normal_(0, 0.08)
    return m


def meta_state_dict(hf) -> dict:
    """transformers' state dict -> Meta names, q/k rows back in Meta's interleaved RoPE layout."""
    c = hf.config
    n_heads, n_kv = c.num_attention_heads, c.num_key_value_heads

    def to_meta_rope(w, heads):
        rows, cols = w.shape
        return w.view(heads, 2, rows // heads // 2, cols).transpose(1, 2).reshape(rows, cols).clone()

    sd = {"tok_embeddings.weight": hf.model.embed_tokens.weight.detach().clone(),
          "norm.weight": hf.model.norm.weight.detach().clone()}
    if not c.tie_word_embeddings:
        sd["output.weight"] = hf.lm_head.weight.detach().clone()
    for i, layer in enumerate(hf.model.layers):
        a, mlp = layer.self_attn, layer.mlp
        sd[f"layers.{i}.attention.wq.weight"] = to_meta_rope(a.q_proj.weight.detach(), n_heads)
        sd[f"layers.{i}.attention.wk.weight"] = to_meta_rope(a.k_proj.weight.detach(), n_kv)
        sd[f"layers.{i}.attention.wv.weight"] = a.v_proj.weight.detach().clone()
        sd[f"layers.{i}.attention.wo.weight"] = a.o_proj.weight.detach().clone()
        sd[f"layers.{i}.feed_forward.w1.weight"] = mlp.gate_proj.weight.detach().clone()
        sd[f"layers.{i}.feed_forward.w2.weight"] = mlp.down_proj.weight.detach().clone()
        sd[f"layers.{i}.feed_forward.w3.weight"] = mlp.up_proj.weight.detach().clone()
        sd[f"layers.{i}.attention_norm.weight"] = layer.input_layernorm.weight.detach().clone()
        sd[f"layers.{i}.ffn_norm.weight"] = layer.post_attention_layernorm.weight.detach().clone()
    return sd


def write_meta(sd: dict, params: dict, out_dir, n_shards: int = 1, embedding_dim: int = 0, extra=None):
    """Write a Meta-layout checkpoint split for n_shards-way model parallelism, the way Meta's
    checkpoints are: column-parallel weights on dim 0, row-parallel on dim 1, norms replicated,
    the embedding on embedding_dim (1 for Llama 2, 0 for Llama 3)."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "params.json"), "w") as f:
        json.dump(params, f)
    shards = [dict(extra or {}) for _ in range(n_shards)]
    for name, t in sd.items():
        kind = name.split(".")[-2]
        if name.endswith("norm.weight"):
            pieces = [t] * n_shards
        elif name == "tok_embeddings.weight":
            pieces = t.chunk(n_shards, dim=embedding_dim)
        else:
            pieces = t.chunk(n_shards, dim=1 if kind in ("wo", "w2") else 0)
        for s, piece in zip(shards, pieces):
            s[name] = piece.clone()
    for i, s in enumerate(shards):
        torch.save(s, os.path.join(out_dir, f"consolidated.{i:02d}.pth"))
    return out_dir


def meta_params_for(variant: str, vocab_size=None) -> dict:
    a = VARIANTS[variant]["args"]
    p = {"dim": a.dim, "n_layers": a.n_layers, "n_heads": a.n_heads, "multiple_of": a.multiple_of,
         "norm_eps": a.norm_eps, "vocab_size": a.vocab_size if vocab_size is None else vocab_size,
         "ffn_dim_multiplier": a.ffn_dim_multiplier, "some_future_key": "ignored"}
    if a.n_kv_heads != a.n_heads:  # Llama 2's params.json has no n_kv_heads
        p["n_kv_heads"] = a.n_kv_heads
    if a.rope_theta != 10000.0:
        p["rope_theta"] = a.rope_theta
    if a.use_scaled_rope:
        p["use_scaled_rope"] = True
        if a.rope_scaling_factor != 8.0:
            p["rope_scaling_factor"] = a.rope_scaling_factor
    return p


def write_hf(hf, out_dir, max_shard_size=None, classic_config=False):
    """save_pretrained (safetensors); max_shard_size splits it with an index; classic_config rewrites
    config.json the transformers-4 way (rope_theta on top, rope_scaling beside it)."""
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    hf.save_pretrained(out_dir, safe_serialization=True, **kwargs)
    if classic_config:
        path = os.path.join(out_dir, "config.json")
        with open(path) as f:
            cfg = json.load(f)
        rope = cfg.pop("rope_parameters")
        cfg["rope_theta"] = rope.pop("rope_theta")
        cfg["rope_scaling"] = rope if rope["rope_type"] != "default" else None
        with open(path, "w") as f:
            json.dump(cfg, f)
    return out_dir


def rel_err(a, b) -> float:
    """||a - b|| / ||b||, in fp64 so the measure itself adds no rounding."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def tokens_for(variant: str, B: int = 2, T: int = 37, seed: int = 1) -> torch.Tensor:
    """A reproducible (B, T) batch of token ids within the variant's vocabulary."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VARIANTS[variant]["args"].vocab_size, (B, T), generator=g)


def randomize_adapters(m, seed=0, scale=0.1):
    """B is zero after apply_lora, which would make every comparison trivially pass: random A and B."""
    import lora

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, mod in lora.lora_modules(m):
            mod.lora_A.copy_(torch.randn(mod.lora_A.shape, generator=g) * scale)
            mod.lora_B.copy_(torch.randn(mod.lora_B.shape, generator=g) * scale)
    return m
