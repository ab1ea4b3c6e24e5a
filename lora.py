"""LoRA by hand: low-rank adapters on the Llama's linear layers, merged, saved, and exported for peft.

LoRA (Hu et al. 2021) freezes a pretrained weight W and learns a low-rank change to it:
    y = W x + (alpha / r) * B A x        A: (r, in), B: (out, r), r << in, out
B starts at zero, so training starts from exactly the base model; only A and B (a fraction of a
percent of the weights) get gradients and optimizer state. Afterwards B A can be folded into W.

Read top to bottom:
  LoRALinear          one wrapped nn.Linear: forward, merge, unmerge
  apply_lora          wrap the targeted layers of a Transformer, freeze everything else
  merge_lora          fold every adapter in and put plain nn.Linear back (for checkpoint.save); an adapter
                      trained on an NF4 base merges into the full-precision base (nf4_gap measures how far
                      that base is from the NF4 one it learned on)
  save/load_adapter   adapter.safetensors + adapter.json (read_tensors), checked against the base model
                      (check_base) and copied in (copy_adapter; fsdp.py's sharded resume uses both too)
  base adapters       the two-step recipe: an adapter trained on base + other adapters (train.py
                      --base_adapter: merge_base_adapter) records that chain (chain_of: adapter.json
                      base_adapters, each a path and its sha256); load_adapter merges it first (read_chain
                      finds each link unchanged, check_foldable, fold_chain). PEFT cannot stack: export
                      --format peft refuses a chain, --format hf merges it whole
  export_peft         the same adapter in peft's names, for transformers' LlamaForCausalLM; with a head a
                      SEQ_CLS adapter (score in modules_to_save) for LlamaForSequenceClassification, or
                      with a tag head a TOKEN_CLS one (score and its bias) for LlamaForTokenClassification,
                      whose config keys go into head_config.json (write_peft_head, peft_head_recipe)
  save_hf             a merged HF checkpoint (config.json + model.safetensors)
  Command             `python lora.py merge|export ...` (run by cli); --format gguf is gguf_export.py's
The file layouts themselves (HF and GGUF names, the q/k RoPE permutation, which files make a
checkpoint, writing a directory whole) are checkpoint.py's.
"""

import dataclasses
import hashlib
import json
import math
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import atomic
import checkpoint
import gguf_export
import heads
import jsonfile
import tokenizer
from checkpoint import CHECKPOINT_MARKERS, CheckpointError
from cli import UsageError, UserError, non_empty, one_of, run
from model import HEAD_KINDS, PROJECTIONS, NF4Linear, fingerprint_sample


class AdapterError(ValueError):
    """An adapter that cannot be used with this model; the message names the file."""


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank branch: base(x) + scale * B(A(dropout(x))).

    The adapters are stored in fp32 even on a bf16 base: their updates are tiny relative to their
    values, and bf16's 8-bit mantissa would round many of them away. The branch itself runs in the
    activations' dtype (A and B are cast per call, which costs r*(in+out) elements), the way
    autocast would: upcasting x instead would copy and keep for backward an fp32 activation per
    wrapped layer, several GB on a large model. An fp32 model thus computes in exact fp32; a bf16
    one in bf16 with fp32 master adapters and fp32 gradients (the cast's backward upcasts them).
    """

    def __init__(self, base, rank: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False):
        super().__init__()
        self.base = base  # state-dict names: ...wq.base.weight, ...wq.lora_A, ...wq.lora_B
        base.requires_grad_(False)
        self.rank = rank
        # rsLoRA (Kalajdzievski 2023): alpha/sqrt(r) keeps the update's size steady as r grows.
        self.scale = alpha / math.sqrt(rank) if use_rslora else alpha / rank
        dev = base.packed.device if isinstance(base, NF4Linear) else base.weight.device
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=dev, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=dev, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's own default init
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    def forward(self, x):
        out = self.base(x)
        if self.merged:  # B A already lives inside base.weight
            return out
        h = F.linear(F.linear(self.dropout(x), self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype))
        return out + (h * self.scale).to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        """scale * B @ A, the change this adapter makes to base.weight, in fp32."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scale

    @torch.no_grad()
    def merge(self):
        if isinstance(self.base, NF4Linear):
            raise ValueError("an adapter on an NF4 base merges into the full-precision base: load the "
                             "checkpoint without quantize (python lora.py merge does)")
        if not self.merged:
            w = self.base.weight
            # Add in fp32 and round once to the base dtype (bf16 rounds; fp32 is exact to 1 ulp).
            w.copy_((w.float() + self.delta_weight()).to(w.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            w = self.base.weight
            w.copy_((w.float() - self.delta_weight()).to(w.dtype))
            self.merged = False

    def extra_repr(self):
        return f"rank={self.rank}, scale={self.scale:g}, merged={self.merged}"


def _unwrap(model):
    """The Transformer inside DDP (.module) and torch.compile (._orig_mod) wrappers, either order."""
    for attr in ("_orig_mod", "module", "_orig_mod"):
        model = getattr(model, attr, model)
    return model


def lora_modules(model):
    """(name, LoRALinear) pairs, names like 'layers.0.attention.wq'."""
    return [(n, m) for n, m in _unwrap(model).named_modules() if isinstance(m, LoRALinear)]


def apply_lora(model, rank: int, alpha: float, dropout: float = 0.0, targets=PROJECTIONS, use_rslora=False):
    """Freeze every weight of the model and wrap the targeted linear layers with LoRA, in place."""
    model = _unwrap(model)
    targets = [targets] if isinstance(targets, str) else list(targets)
    unknown = [t for t in targets if t not in PROJECTIONS]
    if unknown or not targets:
        raise ValueError(f"LoRA targets {unknown or targets}: expected some of {', '.join(PROJECTIONS)}")
    if not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}")
    if getattr(model, "lora_config", None):
        raise ValueError("this model already has LoRA adapters (merge_lora first to start afresh)")
    for p in model.parameters():
        p.requires_grad_(False)
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in targets and isinstance(child, (nn.Linear, NF4Linear)):
                wrapped = LoRALinear(child, rank, alpha, dropout, use_rslora)
                wrapped.train(child.training)  # a new module is in training mode: no dropout in eval
                setattr(module, child_name, wrapped)
    model.lora_config = {"rank": rank, "alpha": alpha, "dropout": dropout, "targets": targets,
                         "use_rslora": bool(use_rslora)}
    return model


def merge_lora(model):
    """Fold every adapter into its base weight and put the plain nn.Linear back, so checkpoint.save
    writes an ordinary Meta checkpoint. The base weights stay frozen (requires_grad False)."""
    inner = _unwrap(model)
    for name, lora in lora_modules(inner):
        lora.merge()
        parent_name, _, child = name.rpartition(".")
        setattr(inner.get_submodule(parent_name) if parent_name else inner, child, lora.base)
    inner.lora_config = None
    return model


def lora_state_dict(model) -> dict:
    """Only the adapter tensors: {'layers.0.attention.wq.lora_A': (r, in), ...lora_B: (out, r)},
    and a classification head's 'score.weight' (n_labels, dim) where the model has one (a tag head's
    'score.bias' (n_labels,) too): the head is trained in full beside the adapters (peft's
    modules_to_save), so it belongs to the adapter."""
    sd = {}
    for name, lora in lora_modules(model):
        sd[f"{name}.lora_A"] = lora.lora_A.detach()
        sd[f"{name}.lora_B"] = lora.lora_B.detach()
    if getattr(_unwrap(model), "score", None) is not None:
        sd.update({f"score.{name}": p.detach() for name, p in _unwrap(model).score.named_parameters()})
    return sd


def _config(model) -> dict:
    cfg = getattr(_unwrap(model), "lora_config", None)
    if not cfg:
        raise ValueError("this model has no LoRA adapters (apply_lora or load_adapter first)")
    return cfg


def write_adapter(model, out_dir, tokenizer_sha256=None, fingerprint=None, tokenizer_fingerprint=None):
    """out_dir/adapter.safetensors (the A and B tensors) + out_dir/adapter.json (how to apply them,
    and which base model and tokenizer they belong to), into a directory being filled (see
    save_adapter, or atomic.write_dir to put more files beside them). fingerprint: the base's, where
    the model passed holds only its adapters (fsdp.full_model)."""
    quantized = any(isinstance(m.base, NF4Linear) for _, m in lora_modules(model))
    inner = _unwrap(model)
    args, chain = inner.args, getattr(inner, "base_adapters", None)  # chain: merge_base_adapter's, if any
    head = heads.head_config(args) if args.n_labels else None  # "head": how to rebuild score.weight's module
    base = dataclasses.replace(args, n_labels=0, multilabel=False, labels=None, pad_id=None)  # the base has none
    # On a chain the base is still the plain one (the chain says what goes on it), so check_base keeps its meaning.
    fingerprint = fingerprint or getattr(inner, "plain_fingerprint", None) or base_fingerprint(model)
    meta = dict(_config(model), base_params=checkpoint.meta_params(base), **({"head": head} if head else {}),
                **({"base_adapters": with_relative_paths(chain, out_dir)} if chain else {}), base_fingerprint=fingerprint,
                tokenizer_sha256=tokenizer_sha256,
                tokenizer_fingerprint=tokenizer_fingerprint, base_quantize="nf4" if quantized else None)
    tensors = {k: v.contiguous() for k, v in lora_state_dict(model).items()}
    # A copy of the config inside the weights file lets load_adapter notice a pair from two saves.
    header = {"adapter_json": json.dumps(meta, sort_keys=True)}
    save_file(tensors, os.path.join(out_dir, "adapter.safetensors"), metadata=header)
    checkpoint.write_json(os.path.join(out_dir, "adapter.json"), meta)


def base_fingerprint(model) -> str:
    """A short hash of the frozen base weights: a strided sample of every tensor, in bf16 so that the
    dtype the base was loaded in does not change it. An adapter records the base it was trained on,
    and load_adapter refuses another base of the same shape (a different fine-tune, say)."""
    inner = _unwrap(model)
    quantized = {name: m for name, m in inner.named_modules() if isinstance(m, NF4Linear)}
    weights = {name: t for name, t in inner.state_dict().items()
               if not name.endswith(("lora_A", "lora_B", "score.weight", "score.bias"))
               and name.rpartition(".")[0] not in quantized}
    # An NF4 layer kept the sample of the full-precision weight it was quantized from: an adapter
    # trained on it belongs to that base, loaded quantized or not.
    weights.update({f"{name}.weight": m.weight_sample for name, m in quantized.items()})
    digest = hashlib.sha256()
    for name, t in sorted(weights.items()):
        if hasattr(t, "full_tensor"):  # an FSDP shard: every rank gathers the whole tensor, one at a time
            t = t.full_tensor()
        sample = fingerprint_sample(t)
        digest.update(name.replace(".base.", ".").encode())
        digest.update(sample.to("cpu", torch.bfloat16).view(torch.int16).numpy().tobytes())
    return digest.hexdigest()[:16]


def save_adapter(model, path, tokenizer_sha256=None):
    """write_adapter, replacing the checkpoint in path as a whole (checkpoint.replace_checkpoint)."""
    checkpoint.replace_checkpoint(path, lambda fresh: write_adapter(model, fresh, tokenizer_sha256))


def _adapter_dir(path) -> str:
    path = os.path.expanduser(str(path))
    return os.path.dirname(path) if os.path.isfile(path) else atomic.readable(path)  # or .../adapter.json


def read_adapter_config(path) -> dict:
    """adapter.json of an adapter directory, each key load_adapter uses checked (the file is the
    user's: it may say anything): AdapterError naming the file and the key."""
    path = _adapter_dir(path)
    cfg_path = os.path.join(path, "adapter.json")
    if not os.path.isdir(path):
        raise AdapterError(f"{path}: no such adapter directory")
    cfg = jsonfile.load(cfg_path, AdapterError, bad="cannot read")
    missing = [k for k in ("rank", "alpha", "targets", "base_params") if k not in cfg]
    if missing:
        raise AdapterError(f"{cfg_path}: not an adapter config (no {', '.join(missing)})")
    for key, expected, default, positive in [("rank", int, jsonfile.REQUIRED, True),
                                         ("alpha", float, jsonfile.REQUIRED, True),
                                         ("targets", list, jsonfile.REQUIRED, False),
                                         ("base_params", dict, jsonfile.REQUIRED, False),
                                         ("dropout", float, 0.0, False), ("use_rslora", bool, False, False),
                                         ("tokenizer_sha256", str, None, False), ("tokenizer_fingerprint", str, None, False),
                                         ("base_fingerprint", str, None, False),
                                         ("base_quantize", str, None, False), ("head", dict, None, False)]:
        jsonfile.field(cfg, key, expected, cfg_path, AdapterError, default, positive)
    if cfg.get("head") is not None:
        check_head_config(cfg["head"], f"{cfg_path}: head")
    for i, link in enumerate(jsonfile.field(cfg, "base_adapters", list, cfg_path, AdapterError, None) or []):
        where = f"{cfg_path}: base_adapters[{i}]"
        jsonfile.expect(link, dict, where, AdapterError)
        jsonfile.field(link, "path", str, where, AdapterError)
        jsonfile.field(link, "relative", str, where, AdapterError, None)
        if len(jsonfile.field(link, "sha256", str, where, AdapterError)) != 64:
            raise AdapterError(f"{where}: sha256 is not a SHA-256 hex digest")
    if not cfg["targets"] or not all(t in PROJECTIONS for t in cfg["targets"]):
        raise AdapterError(f"{cfg_path}: targets is {cfg['targets']!r}, not a list of {', '.join(PROJECTIONS)}")
    return cfg


def check_head_config(head, where):
    """adapter.json's "head" (heads.head_config): n_labels > 0, multilabel, labels (n_labels names
    or null), pad_id (a token id or null), kind (absent: classify; or tag); AdapterError naming where
    otherwise."""
    n = jsonfile.field(head, "n_labels", int, where, AdapterError, positive=True)
    jsonfile.field(head, "multilabel", bool, where, AdapterError)
    if jsonfile.field(head, "kind", str, where, AdapterError, "classify") not in HEAD_KINDS:
        raise AdapterError(f"{where}: kind {head['kind']!r} is not one of {', '.join(HEAD_KINDS)}")
    labels = jsonfile.field(head, "labels", list, where, AdapterError, None)
    jsonfile.field(head, "pad_id", int, where, AdapterError, None)
    if labels is not None and (len(labels) != n or len(set(map(str, labels))) != n):
        raise AdapterError(f"{where}: labels must be {n} distinct names (n_labels)")


def fit_head(model, head, path):
    """Give model the adapter's head (a fresh one, filled by copy_adapter), or check that the head
    it has is the same one: an adapter trained for other labels is refused, never scored wrongly."""
    kind = head.get("kind", "classify")
    if model.args.n_labels == 0:
        heads.attach_head(model, head["n_labels"], head["multilabel"], head["labels"], head["pad_id"], kind=kind)
    elif {k: v for k, v in heads.head_config(model.args).items() if k != "pad_id"} != \
            {k: v for k, v in head.items() if k != "pad_id"}:
        raise AdapterError(f"{path}: adapter's {kind} head is for labels {head['labels']} (multilabel "
                           f"{head['multilabel']}); this model's {model.args.head_kind} head for "
                           f"{heads.head_config(model.args)['labels']}")


# What a user can do about an adapter trained on another base, said by the command that refuses it.
FORCE_REMEDY = "pass --force to apply it anyway"
RESUME_REMEDY = "--resume it with the --ckpt_dir it was trained on, or start afresh with --overwrite"


def check_base(path, cfg, model, *, tokenizer_sha256=None, tok=None, force=False, fingerprint=None,
               remedy=FORCE_REMEDY):
    """The adapter in path (cfg: its read_adapter_config) only makes sense on the base (and
    tokenizer) it was trained on: compare the shapes that matter with model's, the tokenizer (tok:
    by what it encodes; else tokenizer_sha256: its file) and, unless forced, the base weights'
    fingerprint (fingerprint: the base's, where the caller has it already). remedy: what the
    refusal tells the user to do (the flag their command has). AdapterError if it does not fit."""
    inner = _unwrap(model)
    try:
        saved = checkpoint.model_args(os.path.join(path, "adapter.json"), cfg["base_params"])
    except CheckpointError as e:  # the adapter's file, so the adapter's error
        raise AdapterError(str(e)) from None
    fields = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "hidden_dim")
    differ = [f for f in fields if getattr(saved, f) != getattr(inner.args, f)]
    if differ:
        raise AdapterError(f"{path}: adapter was trained on a base with "
                           f"{', '.join(f'{f} {getattr(saved, f)}' for f in differ)}; this model has "
                           f"{', '.join(f'{f} {getattr(inner.args, f)}' for f in differ)}")
    if tok is not None:
        tokenizer_sha256 = tok.sha256
        same = tokenizer.same_tokenizer(tok, cfg.get("tokenizer_sha256"), cfg.get("tokenizer_fingerprint"))
    else:
        same = tokenizer_sha256 == cfg.get("tokenizer_sha256")
    if tokenizer_sha256 and cfg.get("tokenizer_sha256") and not same:
        raise AdapterError(f"{path}: adapter was trained with tokenizer sha256 {cfg['tokenizer_sha256'][:12]}..., "
                           f"this tokenizer is {tokenizer_sha256[:12]}...")
    trained_on = cfg.get("base_fingerprint")
    if trained_on and not force:
        this = fingerprint or base_fingerprint(inner)
        if trained_on != this:
            raise AdapterError(f"{path}: adapter was trained on another base (weights fingerprint {trained_on}, "
                               f"this base {this}); {remedy}")


def load_adapter(model, path, tokenizer_sha256=None, force=False, tokenizer=None, remedy=FORCE_REMEDY):
    """Apply a saved adapter to model (a base Transformer, or one with the same LoRA config); the
    tokenizer it is used with, if known, is checked (tokenizer: a loaded one, by what it encodes).
    An adapter trained on base + other adapters (adapter.json base_adapters) has them merged into
    the base first, each found unchanged and checked as it would be alone (unless model has that
    chain merged already: train.py --resume). Everything that can be wrong with the files is
    checked before the model is touched; force applies it even to a base other than the one it was
    trained on (same shapes, other weights); remedy: what a refusal of another base tells the user to do."""
    path = _adapter_dir(path)
    cfg, inner = read_adapter_config(path), _unwrap(model)
    links = read_chain(path, cfg, inner)
    plain = getattr(inner, "plain_fingerprint", None) or base_fingerprint(inner)  # before any merge
    for link_path, link_cfg, _ in links:  # each base adapter's own checks, as it would have alone
        check_base(link_path, link_cfg, inner, tokenizer_sha256=tokenizer_sha256, tok=tokenizer, force=force,
                   fingerprint=plain, remedy=remedy)
    check_base(path, cfg, inner, tokenizer_sha256=tokenizer_sha256, tok=tokenizer, force=force, fingerprint=plain,
               remedy=remedy)
    have, keys = getattr(inner, "lora_config", None), ("rank", "alpha", "targets", "use_rslora")
    if have and any(have[k] != cfg.get(k, False) for k in keys):
        raise AdapterError(f"{path}: adapter config {({k: cfg.get(k) for k in keys})} differs from the "
                           f"model's LoRA config {({k: have[k] for k in keys})}")
    weights, tensors = read_tensors(path, cfg)
    if ("score.weight" in tensors) != bool(cfg.get("head")):
        raise AdapterError(f"{weights}: score.weight and adapter.json's head come together, or neither")
    for link_path, link_cfg, link_tensors in links:
        check_foldable(inner, link_tensors, os.path.join(link_path, "adapter.safetensors"), path)

    if links:  # recorded where each link was found, for an adapter trained further (--resume) to record
        fold_chain(inner, links, [{**link, "path": here} for link, (here, _, _) in zip(cfg["base_adapters"], links)],
                   plain)
    if cfg.get("head"):
        fit_head(inner, cfg["head"], path)
    if not have:
        apply_lora(inner, cfg["rank"], cfg["alpha"], cfg.get("dropout", 0.0), cfg["targets"],
                   cfg.get("use_rslora", False))
    copy_adapter(inner, tensors, weights)
    return model


def read_tensors(path, cfg):
    """(file, {name: tensor}) of the adapter in directory path, whose adapter.json is cfg: the copy of
    the config inside the weights file must agree with it (one save, not a pair from two)."""
    weights = os.path.join(path, "adapter.safetensors")
    try:
        with safe_open(weights, framework="pt") as f:
            header = (f.metadata() or {}).get("adapter_json", "{}")
        tensors = load_file(weights)
    except Exception as e:  # missing, truncated, or not safetensors: each library error differs
        raise AdapterError(f"{weights}: cannot read ({type(e).__name__}: {e})") from None
    header = jsonfile.expect(jsonfile.loads(header, f"{weights}: adapter_json", AdapterError), dict,
                             f"{weights}: adapter_json", AdapterError)
    keys = ("rank", "alpha", "targets", "use_rslora", "base_params", "head", "base_adapters")
    if header and any(header.get(k) != cfg.get(k) for k in keys):
        raise AdapterError(f"{weights} and adapter.json beside it come from different saves")
    return weights, tensors


# -- base adapters: the two-step recipe (a domain adapter merged, then a downstream one trained) --------


def file_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def chain_of(path) -> list:
    """What an adapter trained with --base_adapter path records in adapter.json's base_adapters:
    path's own chain, then path itself, in the order they merge; each as {"path": the absolute
    directory, "sha256": of its adapter.safetensors (which holds a copy of its adapter.json)}."""
    path = os.path.abspath(_adapter_dir(path))
    cfg = read_adapter_config(path)
    if cfg.get("head"):
        raise AdapterError(f"{path}: a classification adapter (adapter.json head) cannot be a base adapter: "
                           f"only an LM adapter (trained without --head) merges into the base")
    try:
        sha256 = file_sha256(os.path.join(path, "adapter.safetensors"))
    except OSError as e:
        raise AdapterError(f"{os.path.join(path, 'adapter.safetensors')}: cannot read ({e.strerror})") from None
    return [*(cfg.get("base_adapters") or []), {"path": path, "sha256": sha256}]


def read_chain(path, cfg, model) -> list:
    """[(directory, adapter.json, tensors)] of each base adapter the adapter in path (cfg: its
    adapter.json) was trained on top of, to be merged into model; [] where model has that chain
    merged already. Each must be where it was and unchanged (its sha256), else one line naming
    both adapters and what to do."""
    chain, merged = cfg.get("base_adapters") or [], getattr(model, "base_adapters", None) or []
    if merged:
        if _digests(merged) != _digests(chain):
            raise AdapterError(f"{path}: adapter was trained on the base with {_paths(chain)} merged in; this "
                               f"model has {_paths(merged)} merged in")
        return []
    links = []
    for i, link in enumerate(chain):
        where = f"{path} was trained on the base with {link['path']} merged in (adapter.json base_adapters[{i}])"
        here = link_dir(link, path)
        weights = os.path.join(here, "adapter.safetensors")
        if not os.path.isfile(weights):
            raise AdapterError(f"{where}, which is missing: put that adapter back there, or at "
                               f"{link.get('relative', link['path'])} from {path} (its adapter.safetensors has sha256 "
                               f"{link['sha256'][:12]}...)")
        if file_sha256(weights) != link["sha256"]:
            raise AdapterError(f"{where}, which has changed since ({weights} sha256 now "
                               f"{file_sha256(weights)[:12]}..., then {link['sha256'][:12]}...): put the one it was "
                               f"trained on back there")
        link_cfg = read_adapter_config(here)
        if _digests(link_cfg.get("base_adapters") or []) != _digests(chain[:i]) or link_cfg.get("head"):
            raise AdapterError(f"{where}, whose own adapter.json records another chain before it, or a head")
        links.append((here, link_cfg, read_tensors(here, link_cfg)[1]))
    return links


def link_dir(link, path):
    """Where a base adapter of the adapter in path is: where adapter.json recorded it, or else, when
    the adapters moved together (out/ copied to another machine), at the same place relative to path."""
    if os.path.isfile(os.path.join(link["path"], "adapter.safetensors")) or not link.get("relative"):
        return link["path"]
    moved = os.path.normpath(os.path.join(os.path.abspath(path), link["relative"]))
    return moved if os.path.isfile(os.path.join(moved, "adapter.safetensors")) else link["path"]


def with_relative_paths(chain, out_dir):
    """The chain as an adapter written to out_dir records it: each base adapter's absolute directory,
    sha256 and its path relative to out_dir (a sibling of the finished directory while it is
    written: the same relative path), so the adapters can move together."""
    return [{"path": link["path"], "sha256": link["sha256"],
             "relative": os.path.relpath(link["path"], os.path.abspath(out_dir))} for link in chain]


def _digests(chain):
    return [link["sha256"] for link in chain]


def _paths(chain):
    return " + ".join(f"{link['path']} (sha256 {link['sha256'][:12]}...)" for link in chain) or "nothing"


def merge_base_adapter(model, path, tok=None):
    """train.py --base_adapter path: path's chain, then path itself, folded into model's weights
    (each checked against the plain base and tokenizer tok, as load_adapter checks an adapter), so
    that what trains next trains on base + them. The chain and the plain base's fingerprint stay on
    the model for write_adapter to record. Returns model."""
    inner, chain = _unwrap(model), chain_of(path)
    links = read_chain(path, {"base_adapters": chain}, inner)
    plain = base_fingerprint(inner)
    for link_path, link_cfg, tensors in links:
        check_base(link_path, link_cfg, inner, tok=tok, fingerprint=plain, remedy="pass the --ckpt_dir it was "
                   "trained on")
        check_foldable(inner, tensors, os.path.join(link_path, "adapter.safetensors"), path)
    fold_chain(inner, links, chain, plain)
    return model


def _fold_target(model, name):
    """The nn.Linear whose weight the base adapter's module name changes (inside a LoRALinear too)."""
    layer = dict(model.named_modules()).get(name)
    return layer.base if isinstance(layer, LoRALinear) else layer


def check_foldable(model, tensors, weights, path):
    """Each lora_A/lora_B pair of a base adapter's tensors (read from weights) fits a plain linear
    layer of model; an NF4 one cannot take a merge (path: the adapter trained on top, for the message)."""
    for name in sorted({k.rpartition(".")[0] for k in tensors}):
        layer, a, b = _fold_target(model, name), tensors.get(f"{name}.lora_A"), tensors.get(f"{name}.lora_B")
        if isinstance(layer, NF4Linear):
            raise AdapterError(f"{path}: trained on the base with {os.path.dirname(weights)} merged into its "
                               f"full-precision weights, which an NF4 base cannot take: load it without --quantize")
        if not isinstance(layer, nn.Linear) or a is None or b is None or a.shape[0] != b.shape[1] or \
                (b.shape[0], a.shape[1]) != tuple(layer.weight.shape):
            raise AdapterError(f"{weights}: {name}'s lora_A and lora_B do not fit the model")


@torch.no_grad()
def fold_chain(model, links, chain, plain):
    """Merge each base adapter (links: read_chain's) into model's weights, in order, as LoRALinear.merge
    does (in fp32, rounded once to the weight's dtype); record the chain and the plain base's
    fingerprint on model."""
    for _, cfg, tensors in links:
        scale = cfg["alpha"] / math.sqrt(cfg["rank"]) if cfg.get("use_rslora") else cfg["alpha"] / cfg["rank"]
        for name in sorted({k.rpartition(".")[0] for k in tensors}):
            w = _fold_target(model, name).weight
            delta = (tensors[f"{name}.lora_B"].float() @ tensors[f"{name}.lora_A"].float()) * scale
            w.copy_((w.float() + delta.to(w.device)).to(w.dtype))
    model.base_adapters, model.plain_fingerprint = chain, plain


@torch.no_grad()
def copy_adapter(model, tensors, weights, copy=torch.Tensor.copy_):
    """tensors ({name: tensor} read from the adapter file weights) into model's LoRA parameters,
    after checking that they are the model's adapters, name for name and shape for shape.
    copy(param, tensor) puts one in place (fsdp.py: this rank's rows of it)."""
    params, expected = dict(_unwrap(model).named_parameters()), set(lora_state_dict(model))
    if "score.weight" not in tensors:  # an adapter without a head, on a model with one: the head stays
        expected -= {"score.weight", "score.bias"}
    if set(tensors) != expected:
        odd = sorted(set(tensors) ^ expected)
        raise AdapterError(f"{weights}: tensors do not match the model's adapters ({', '.join(odd[:3])} ...)")
    for name, t in tensors.items():
        if t.shape != params[name].shape:
            raise AdapterError(f"{weights}: {name} is {tuple(t.shape)}, the model expects "
                               f"{tuple(params[name].shape)}")
        copy(params[name], t)


# -- transformers / peft export ----------------------------------------------------------------------


def write_peft(model, out_dir, base_model_name_or_path=None):
    """adapter_config.json + adapter_model.safetensors, into a directory being filled, that
    peft.PeftModel.from_pretrained loads onto transformers' LlamaForCausalLM of the same base, or
    with a head onto its LlamaForSequenceClassification (write_peft_head). The adapter is the same;
    only names and the q/k lora_B rows (the output side, which RoPE sees) change. lora_A reads x,
    whose order agrees."""
    cfg, args = _config(model), _unwrap(model).args
    tensors = {}
    for name, t in lora_state_dict(model).items():
        module, _, which = name.rpartition(".")  # 'layers.0.attention.wq', 'lora_A'
        if module == "score":  # peft saves a modules_to_save module under its own name, not its copy's
            tensors[f"base_model.model.{PEFT_HEAD}.{which}"] = t.float().contiguous()
            continue
        t = checkpoint.permute_qk(name, t, args, checkpoint.meta_to_hf_rope) if which == "lora_B" else t
        tensors[f"base_model.model.{checkpoint.hf_name(module)}.{which}.weight"] = t.contiguous()
    hf_targets = checkpoint.hf_modules(cfg["targets"])  # peft matches the ends of module names
    config = {"peft_type": "LORA", "task_type": PEFT_TASKS[args.head_kind] if args.n_labels else "CAUSAL_LM",
              "r": cfg["rank"],
              "lora_alpha": cfg["alpha"], "lora_dropout": cfg["dropout"], "target_modules": hf_targets,
              "use_rslora": cfg["use_rslora"], "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
              "init_lora_weights": True, "modules_to_save": [PEFT_HEAD] if args.n_labels else None,
              "base_model_name_or_path": base_model_name_or_path}

    save_file(tensors, os.path.join(out_dir, "adapter_model.safetensors"))
    checkpoint.write_json(os.path.join(out_dir, "adapter_config.json"), config)
    if args.n_labels:
        write_peft_head(args, out_dir)


# The head's module in transformers' LlamaForSequenceClassification (checkpoint.TENSOR_NAMES), which a
# SEQ_CLS adapter lists in modules_to_save: peft trains a copy of it in full and saves that copy as
# base_model.model.score.weight, the key it loads back into the copy.
PEFT_HEAD = checkpoint.hf_name("score")
PEFT_HEAD_CONFIG = "head_config.json"
PEFT_TASKS = {"classify": "SEQ_CLS", "tag": "TOKEN_CLS"}  # peft's task_type of each head kind
AUTO_CLASSES = {"classify": "AutoModelForSequenceClassification", "tag": "AutoModelForTokenClassification"}


def write_peft_head(args, out_dir):
    """head_config.json: the config keys (num_labels, problem_type, pad_token_id, id2label and
    label2id) that the base must be built with for the adapter's head. A hub base's config.json has
    none of them (transformers would build 2 labels), and peft keeps no model config. They go in
    through the config's constructor, which turns JSON's string keys of id2label into ints (keyword
    arguments to from_pretrained are set as they are, and would leave them strings):
        config = AutoConfig.from_pretrained(BASE)
        config = type(config).from_dict({**config.to_dict(), **json.load(open("OUT/head_config.json"))})
        model = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(BASE, config=config), OUT)
    (a tag head: AutoModelForTokenClassification)."""
    checkpoint.write_json(os.path.join(out_dir, PEFT_HEAD_CONFIG), checkpoint.hf_head_config(args))


def peft_head_recipe(base, out, kind="classify") -> str:
    """The Python (one line) that loads a SEQ_CLS (kind "tag": TOKEN_CLS) export in out onto base, as
    write_peft_head says."""
    return (f"c = AutoConfig.from_pretrained({str(base)!r}); c = type(c).from_dict({{**c.to_dict(), "
            f"**json.load(open({os.path.join(out, PEFT_HEAD_CONFIG)!r}))}}); model = PeftModel.from_pretrained("
            f"{AUTO_CLASSES[kind]}.from_pretrained({str(base)!r}, config=c), {str(out)!r})")


def export_peft(model, out_dir, base_model_name_or_path=None):
    """write_peft, replacing the checkpoint in out_dir as a whole (checkpoint.replace_checkpoint)."""
    checkpoint.replace_checkpoint(out_dir, lambda fresh: write_peft(model, fresh, base_model_name_or_path))


@torch.no_grad()
def nf4_gap(model) -> tuple:
    """(quantization, adapter): over the adapted weights of a full-precision model, the rms of
    W - NF4(W), what a QLoRA adapter was trained against instead of W, and the rms of the adapter's
    change B A, each relative to the rms of W. One weight is quantized at a time."""
    norm = quantization = change = 0.0
    for _, m in lora_modules(model):
        w = m.base.weight.float()
        norm += w.square().sum().item()
        quantization += (w - NF4Linear(w).dequantize()).square().sum().item()
        change += m.delta_weight().square().sum().item()
    return math.sqrt(quantization / norm), math.sqrt(change / norm)


def merged_state_dict(model) -> dict:
    """The model's weights in Meta names with every adapter folded in, without changing the model."""
    inner = _unwrap(model)
    sd = {k: v.detach() for k, v in inner.state_dict().items() if not k.endswith(("lora_A", "lora_B"))}
    for name, lora in lora_modules(inner):
        w = sd.pop(f"{name}.base.weight")
        sd[f"{name}.weight"] = w if lora.merged else (w.float() + lora.delta_weight().detach()).to(w.dtype)
    return sd


def save_hf(model, out_dir):
    """A merged checkpoint in transformers' layout (config.json + model.safetensors); the model
    itself keeps its adapters unmerged."""
    checkpoint.save_hf(_unwrap(model), out_dir, merged_state_dict(model))


# -- command line --------------------------------------------------------------------------------------


# -----------------------------------------------------------------------------------------------
# Command line: python lora.py merge|export --ckpt_dir DIR --adapter DIR --out DIR [--format peft|hf]

# Each flag's range, checked by cli before any work (the types come from the annotations).
CHECKS = {"ckpt_dir": non_empty, "adapter": non_empty, "out": non_empty, "tokenizer": non_empty,
          "base": non_empty, "format": one_of("peft", "hf", "gguf"),
          "gguf_type": one_of("f32", "f16", "bf16", "q8_0")}


class Command:
    """Merge or export a LoRA adapter.

    Args:
        ckpt_dir: the base model (Meta or HF layout).
        adapter: a directory written by save_adapter (train.py's OUT_DIR/adapter).
        out: the directory to write (a new one, or with --overwrite a checkpoint to replace).
        tokenizer: the model's tokenizer (tokenizer.model or tokenizer.json); default the one in
            --ckpt_dir. HF and GGUF exports carry it, with its chat template; every format checks
            it against the model's embedding (tokenizer.check_fits).
        overwrite: replace the checkpoint already in --out (only a checkpoint: never other files).
        force: apply the adapter even to a base other than the one it was trained on.
    """

    def __init__(self, ckpt_dir: str, adapter: str, out: str, tokenizer: str = None, overwrite: bool = False,
                 force: bool = False):
        self.ckpt_dir, self.adapter = os.path.expanduser(ckpt_dir), os.path.expanduser(adapter)
        self.out, self.overwrite, self.force = os.path.expanduser(out), overwrite, force
        self.tokenizer = tokenizer

    def merge(self):
        """Fold the adapter into the base and write a Meta checkpoint (params.json + consolidated.00.pth)."""
        self._write("meta")

    def export(self, format: str = "peft", base: str = None, gguf_type: str = "f16"):
        """Write the adapter for peft, or a merged HF or GGUF checkpoint.

        Args:
            format: peft (adapter_config.json + adapter_model.safetensors, for transformers + peft;
                an adapter with a head is a SEQ_CLS one (a tag head's: TOKEN_CLS, for
                AutoModelForTokenClassification), the head in modules_to_save, and head_config.json
                holds the config keys the base must be built with: the export prints the Python that
                loads it), hf (the merged model as config.json + model.safetensors +
                generation_config.json, with tokenizer.json and tokenizer_config.json; with a head,
                LlamaForSequenceClassification's config, or LlamaForTokenClassification's) or gguf (the merged model as model.gguf, for
                llama.cpp, tokenizer and chat template inside; the language model only: a head is
                left out).
            base: peft's base_model_name_or_path: the hub name or HF-layout directory of the base
                (default: --ckpt_dir as given, made absolute; transformers reads only the HF layout).
            gguf_type: the GGUF weights' type: f32, f16, bf16 or q8_0 (norms stay f32).
        """
        if base is not None and format != "peft":
            raise UsageError("--base only applies to --format peft")
        chain = read_adapter_config(self.adapter).get("base_adapters") if format == "peft" else None
        if chain:  # peft puts one adapter on the plain base: it has no way to merge others in first
            raise UserError(f"--format peft: {self.adapter} was trained on the base with {_paths(chain)} merged in "
                            f"(adapter.json base_adapters), which a PEFT adapter cannot carry; --format hf writes "
                            f"the base with the whole chain merged")
        self.base = base or os.path.abspath(self.ckpt_dir)
        self._write(format, gguf_type)

    def _load_tokenizer(self, fmt):
        """The tokenizer paired with the model (HF and GGUF exports carry it, a merge copies it under
        its own kind's name); None when the checkpoint has none and no --tokenizer is given (with a
        note where the export would have carried it)."""
        if self.tokenizer is None and tokenizer.find(self.ckpt_dir) is None:
            if fmt in ("hf", "gguf"):
                print(f"lora.py: no tokenizer in {self.ckpt_dir} (pass --tokenizer): the export has no tokenizer "
                      f"files, and config.json no BOS/EOS ids", file=sys.stderr)
            return None
        try:
            return tokenizer.load(self.tokenizer or self.ckpt_dir)
        except tokenizer.TokenizerError as e:
            raise UserError(f"{'--tokenizer' if self.tokenizer else '--ckpt_dir'}: {e}") from None

    def _write(self, fmt, gguf_type="f16"):
        read_adapter_config(self.adapter)  # a wrong adapter path fails before the base is loaded
        self._check_out()
        tok = self._load_tokenizer(fmt)
        if fmt == "gguf" and tok is None:
            raise UserError(f"--format gguf needs the tokenizer: none in --ckpt_dir {self.ckpt_dir}; pass --tokenizer")
        start, say = time.time(), _progress(self.ckpt_dir)
        say(f"loading {self.ckpt_dir} ...")
        m = checkpoint.load(self.ckpt_dir, dtype=checkpoint.stored_dtype(self.ckpt_dir) if fmt != "peft" else None)
        say(f"loaded {sum(p.numel() for p in m.parameters()) / 1e9:.2f}B parameters in {time.time() - start:.1f}s; "
            f"{'writing the adapter' if fmt == 'peft' else 'merging the adapter and writing'} ({fmt}) to {self.out} ...")
        if tok is not None:  # every format: what leaves here is used with this tokenizer (llama.cpp refuses a misfit)
            tokenizer.check_fits(tok, m.args.vocab_size, self.ckpt_dir)
        load_adapter(m, self.adapter, force=self.force)
        if fmt != "peft" and read_adapter_config(self.adapter).get("base_quantize") == "nf4":
            # Deployed on the full-precision base, the adapter meets W where it was trained on NF4(W).
            quantization, change = nf4_gap(m)
            print(f"lora.py: the adapter was trained on an NF4 base and is merged into the full-precision "
                  f"one: the base weights differ from what it learned on by {100 * quantization:.2f}% "
                  f"(rms, relative), while the adapter changes them by {100 * change:.2f}%", file=sys.stderr)
        def fill(fresh):
            if fmt == "peft":
                write_peft(m, fresh, self.base)
                if m.args.n_labels:
                    kind = m.args.head_kind
                    print(f"lora.py: a {PEFT_TASKS[kind]} adapter; load it with "
                          f"{peft_head_recipe(self.base, self.out, kind)}", file=sys.stderr)
                return
            if fmt == "gguf":
                gguf_export.write_gguf(_unwrap(m), merged_state_dict(m), tok, os.path.join(fresh, "model.gguf"),
                                       gguf_type)
                return
            if fmt == "hf":
                checkpoint.write_hf(_unwrap(m), fresh, merged_state_dict(m), tok)
                if tok is not None:
                    tokenizer.write_hf_files(tok, fresh)
                    return
            else:
                checkpoint.write_meta(merge_lora(m), fresh)
            if tok is not None:  # the base's (wherever it keeps it) or --tokenizer, under its own kind's name
                tokenizer.copy_into(tok, fresh)

        checkpoint.replace_checkpoint(self.out, fill)
        size = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(self.out) for f in files)
        say(f"wrote {self.out} ({size / 2**30:.2f} GiB) in {time.time() - start:.1f}s")

    def _check_out(self):
        """--out may be new, or with --overwrite a checkpoint; never the base, the adapter, a directory
        holding either, or a directory of other files."""
        atomic.check_outputs({"--out": self.out}, {"--ckpt_dir": self.ckpt_dir, "--adapter": self.adapter,
                                                   "--tokenizer": self.tokenizer})
        if os.path.exists(self.out) and not os.path.isdir(self.out):
            raise UserError(f"--out {self.out}: exists and is not a directory")
        if not os.path.isdir(self.out) or not os.listdir(self.out):
            return
        if not self.overwrite:
            raise UserError(f"--out {self.out}: exists and is not empty; pass --overwrite to replace the "
                            f"checkpoint in it, or choose another --out")
        if not any(os.path.exists(os.path.join(self.out, name)) for name in CHECKPOINT_MARKERS):
            raise UserError(f"--out {self.out}: holds no checkpoint ({', '.join(CHECKPOINT_MARKERS)}); "
                            f"--overwrite only replaces checkpoints")


# Bases this large take long enough to load and write (tens of seconds and up) that silence would look
# like a hang; smaller ones finish before a progress line would help, and an error stays one line.
PROGRESS_BYTES = 1 << 30


def _progress(ckpt_dir):
    """A function that prints a progress line on stderr, or does nothing for a small base."""
    weights = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(ckpt_dir) for f in files
                  if f.endswith((".pth", ".safetensors")))
    if weights < PROGRESS_BYTES:
        return lambda message: None
    return lambda message: print(f"lora.py: {message}", file=sys.stderr, flush=True)


def main(argv=None):
    run(Command, prog="lora.py", argv=argv, checks=CHECKS)


if __name__ == "__main__":
    main()
