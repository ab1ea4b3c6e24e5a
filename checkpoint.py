"""Checkpoint I/O: the two layouts a Llama comes in, read and written.

Read top to bottom:
  CheckpointError          what every loader here raises: one line naming the file
  replace_checkpoint       atomic.write_dir for checkpoints: tokenizer and other files carried over;
                           which files make a checkpoint (CHECKPOINT_FILES, CHECKPOINT_MARKERS, INPUT_FILES)
  load                     either layout into a Transformer, one tensor at a time, the files
                           memory-mapped (read, for fsdp.py too); the default dtypes of weights
                           and compute (resolve_dtype; cpu_paths.py on a CPU); the config's values checked as read
                           (model_args), its sizes against the weights' shapes and the RoPE table
                           against the machine's memory before anything is built (check_sizes,
                           check_context), each weight as it lands (check_shape, check_complete: the
                           same for fsdp.py's sharded load); every JSON file read through jsonfile.py's bounds
  Meta layout              params.json + consolidated.NN.pth: read_meta (model-parallel shards
                           joined), write_meta, save; a head's keys (n_labels, multilabel, labels,
                           pad_id; head_kind for a tag head) only where the model has one
  Names                    the one table of tensor names: ours, HF's, GGUF's (hf_name / our_name,
                           gguf_name: None for the head, which GGUF has no tensor for; hf_modules)
  HF layout                config.json + *.safetensors: the q/k RoPE permutation both ways, read_hf
                           (map_safetensors; hf_head_args: a head wherever score.weight is stored, a
                           tag head where score.bias is), write_hf (hf_head_config:
                           LlamaForSequenceClassification's or LlamaForTokenClassification's keys), save_hf
"""

import contextlib
import dataclasses
import fnmatch
import glob
import json
import math
import mmap
import os
import pickle
import shutil
from typing import Optional

import torch
from safetensors.torch import save_file

import jsonfile
from atomic import readable, write_dir
import cpu_paths
from model import PROJECTIONS, ModelArgs, NF4Linear, Transformer, nf4_projections


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded; the message names the file."""


# -----------------------------------------------------------------------------------------------
# Replacing a checkpoint directory

# The files a checkpoint consists of, in any layout this project reads or writes, and the trainer's
# state for those weights. Writing a checkpoint over a directory replaces all of them (a stale
# consolidated.01.pth or train_state.pt must not survive beside new weights); anything else there,
# such as tokenizer files or notes, is carried over.
CHECKPOINT_FILES = ("params.json", "consolidated.*.pth", "config.json", "*.safetensors", "*.safetensors.index.json",
                    "adapter.json", "adapter_config.json", "head_config.json", "train_state.pt", "generation_config.json",
                    "*.gguf")
# What a command's output may never replace inside a checkpoint it reads (atomic.check_outputs).
INPUT_FILES = CHECKPOINT_FILES + ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "*.safetensors",
                                  "*.distcp", ".metadata")
# The file that marks a directory as a checkpoint of each layout this project writes: Meta, HF (read()
# tells these two apart by them), an adapter, a peft adapter, a GGUF file. lora.py's --overwrite
# replaces only a directory holding one.
META_MARKER, HF_MARKER = "params.json", "config.json"
CHECKPOINT_MARKERS = (META_MARKER, HF_MARKER, "adapter.json", "adapter_config.json", "model.gguf")


def replace_checkpoint(out_dir, write):
    """write(fresh_dir) writes a checkpoint; it then replaces out_dir as a whole (write_dir), with
    every entry of the old out_dir that is not a checkpoint file carried over. Returns out_dir."""
    out_dir = os.path.normpath(os.path.expanduser(str(out_dir)))

    def fill(fresh):
        if os.path.isdir(out_dir):  # settled by write_dir: the newest complete copy
            for name in os.listdir(out_dir):
                if not any(fnmatch.fnmatch(name, pattern) for pattern in CHECKPOINT_FILES):
                    _carry(os.path.join(out_dir, name), os.path.join(fresh, name))
        write(fresh)

    return write_dir(out_dir, fill)


def _carry(src, dst):
    """Hard-link src (a file, or each file of a directory) at dst; copy where linking fails (another
    file system). Symbolic links stay links."""
    if os.path.islink(src):
        os.symlink(os.readlink(src), dst)
    elif os.path.isdir(src):
        shutil.copytree(src, dst, symlinks=True, copy_function=_link_or_copy)
    else:
        _link_or_copy(src, dst)


def _link_or_copy(src, dst):
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


def _read_json(path):
    """A checkpoint's JSON file (an object), parsed with jsonfile's bounds: CheckpointError naming it."""
    return jsonfile.load(path, CheckpointError, bad="cannot read")


# -----------------------------------------------------------------------------------------------
# Reading either layout into a Transformer

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
           "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


def resolve_dtype(dtype, device, stored: Optional[torch.dtype] = None):
    """(the dtype the weights are held in, the dtype to compute in): dtype for both if given (a torch
    dtype or a name like 'bf16'), else the default.

    The default is bf16 on CUDA. On a CPU it is cpu_paths.plan's: the weights as stored wherever a
    fast path reads them (decoding reads every weight once per token, so a bf16 weight decodes twice
    as fast as its fp32 copy, and a weight used where it lies in the file costs nothing to load),
    computed in the stored dtype where the CPU multiplies it fast, else in fp32.
    """
    if dtype is None:
        if torch.device(device).type == "cuda":
            return torch.bfloat16, torch.bfloat16
        return cpu_paths.plan(stored or torch.float32)
    if isinstance(dtype, torch.dtype):
        return dtype, dtype
    if str(dtype) not in _DTYPES:
        raise ValueError(f"--dtype {dtype!r}: expected one of {', '.join(_DTYPES)}")
    return _DTYPES[str(dtype)], _DTYPES[str(dtype)]


def load(ckpt_dir, device="cpu", dtype=None, quantize: Optional[str] = None,
         max_seq_len: Optional[int] = None) -> Transformer:
    """A Transformer from a Meta (params.json + consolidated.NN.pth) or HF (config.json +
    safetensors) checkpoint directory. dtype: None is bf16 on CUDA; on a CPU the weights stay in the
    checkpoint's own dtype and the model computes in it, or in fp32 where this CPU multiplies that
    faster (model.compute_dtype; see resolve_dtype); or a torch dtype, or a name ("bf16"), for both;
    quantize: None, or "nf4" to hold the projections (PROJECTIONS) in NF4,
    quantized as they are read, the model computing in dtype; max_seq_len: the context to build for,
    default the checkpoint's.

    The model is built on the meta device (no memory) and each weight is assigned as it is read,
    so at no point do two full copies of the weights exist. The files are mapped, not read: a weight
    already in the asked dtype stays in the page cache, shared with every process that maps the file.
    With quantize="nf4" each projection is quantized as soon as it is read (from its stored dtype, as
    bitsandbytes would) and only its NF4 form kept: the full-precision model never sits in memory,
    only one tensor of it at a time. The RoPE table is computed on first use, where the model is.
    """
    if quantize not in (None, "nf4"):
        raise ValueError(f"quantize {quantize!r}: expected None or 'nf4'")
    ckpt_dir = os.path.expanduser(str(ckpt_dir))
    args, tensors, tied, config_path = read(ckpt_dir)
    compute = None
    if max_seq_len:
        args.max_seq_len = max_seq_len
        check_context(args, "max_seq_len")

    with torch.device("meta"), _no_random_init():
        model = Transformer(args)
    if tied:
        model.tie_weights()
    expected = {k: v for k, v in model.state_dict().items() if not (tied and k == "output.weight")}
    state, quantized = {}, {}
    for name, t in tensors:
        if name not in expected:
            continue  # stray keys such as rope.freqs or rotary_emb.inv_freq
        if compute is None:  # the first weight says how they are stored
            dtype, compute = resolve_dtype(dtype, device, stored=t.dtype)
        check_shape(config_path, name, t.shape, expected[name].shape)
        if quantize and name.split(".")[-2] in PROJECTIONS:
            quantized[name] = NF4Linear(t.to(device))  # the NF4 layer that replaces this weight's nn.Linear
        else:
            # A tensor already in the right dtype on the CPU is used where it lies, in the file's
            # private mapping: nothing is copied, and pages are read as the model first touches them.
            state[name] = t.to(device=device, dtype=dtype)
    check_complete(ckpt_dir, expected, set(state) | set(quantized))
    if quantize:
        nf4_projections(model, quantized)
    model.load_state_dict(state, strict=False, assign=True)
    if tied:
        model.tie_weights()
    model.compute_dtype = compute if compute != dtype else None
    return model.eval()


def check_shape(config_path, name, shape, expected):
    """A checkpoint's weight (name, its shape) against the shape the config gives it."""
    if tuple(shape) != tuple(expected):
        raise CheckpointError(f"{config_path} disagrees with the weights: {name} is {tuple(shape)} "
                              f"in the checkpoint but {tuple(expected)} by the config")


def check_complete(ckpt_dir, expected, found):
    """Every weight name in expected was found in the checkpoint."""
    missing = sorted(set(expected) - set(found))
    if missing:
        raise CheckpointError(f"{ckpt_dir}: weights missing from the checkpoint: {', '.join(missing[:4])}"
                              + (" ..." if len(missing) > 4 else ""))


def read(ckpt_dir):
    """Either layout, detected: (args, an iterator of (name, full tensor) in our names, one at a time
    and memory-mapped where the files allow, tied, the config file's path). load() and fsdp.py's
    sharded load (which keeps only each rank's rows of every tensor) both read through it."""
    ckpt_dir = readable(ckpt_dir)  # a swap a crash interrupted is finished first
    if not os.path.isdir(ckpt_dir):
        raise CheckpointError(f"{ckpt_dir}: no such checkpoint directory")
    if os.path.exists(os.path.join(ckpt_dir, META_MARKER)):
        return read_meta(ckpt_dir)
    if os.path.exists(os.path.join(ckpt_dir, HF_MARKER)):
        return read_hf(ckpt_dir)
    raise CheckpointError(f"{ckpt_dir}: neither params.json (Meta) nor config.json (HF) found")


@contextlib.contextmanager
def _no_random_init():
    """Skip nn.Linear's and nn.Embedding's random init while building a model whose weights the
    checkpoint replaces. On the meta device it computes nothing, but it runs through torch._refs,
    whose first use imports torch._dynamo: over a second of every generate.py or eval.py start."""
    names = ("normal_", "uniform_", "kaiming_uniform_")
    saved = {name: getattr(torch.nn.init, name) for name in names}
    for name in names:
        setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, init in saved.items():
            setattr(torch.nn.init, name, init)


def torch_load(path, map_location="cpu", mmap=False):
    """torch.load of tensors and plain data only (weights_only: a checkpoint never runs code), its
    failures as one CheckpointError line naming the file."""
    try:
        return torch.load(path, map_location=map_location, mmap=mmap, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except pickle.UnpicklingError:
        raise CheckpointError(f"{path}: holds Python objects, not just tensors; refused, since loading "
                              f"it could run code") from None
    except Exception as e:  # truncated, or not a torch.save file: torch raises many kinds
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
        raise CheckpointError(f"{path}: cannot read (truncated, or not a torch.save file: {reason})") from None


def model_args(path, values: dict) -> ModelArgs:
    """ModelArgs from a params.json-like dict read from path, each value checked against its field's
    type (a config file may say anything): CheckpointError naming the file and the field."""
    known = {f.name: f.type for f in dataclasses.fields(ModelArgs) if f.init}
    checked = {k: _checked(path, k, v, known[k]) for k, v in values.items() if k in known}
    try:
        return ModelArgs(**checked)
    except (TypeError, ValueError) as e:  # e.g. heads that do not divide dim
        raise CheckpointError(f"{path}: {e}") from None


def _checked(path, name, value, expected):
    """value as a field of type expected (int, float, bool, Optional of one, or Optional[tuple]: a list
    of strings, the head's labels) holds it (jsonfile.expect: JSON's true is no number, an int is a
    fine float); CheckpointError naming the field otherwise."""
    optional = expected in (Optional[int], Optional[float], Optional[tuple])
    expected = {Optional[int]: int, Optional[float]: float, Optional[tuple]: list}.get(expected, expected)
    if value is None and optional:
        return None
    value = jsonfile.expect(value, expected, f"{path}: {name}", CheckpointError)
    if expected is list:
        for item in value:
            jsonfile.expect(item, str, f"{path}: {name} item", CheckpointError)
    return value


def check_sizes(path, args: ModelArgs, shapes: dict, keys: dict):
    """args' sizes against the weights' full shapes ({our name: shape}), before a model or a RoPE
    table is built from them: a config file may say a million layers or a vocabulary of 10^12, and
    the model would be built (or its table allocated) before load() compares weight by weight.
    keys: the file's name for each of our fields, for the message. CheckpointError naming both."""
    layers = {int(name.split(".")[1]) for name in shapes if name.startswith("layers.")}
    found = {"n_layers": max(layers) + 1 if layers else 0}
    for field, name in (("dim", "norm.weight"), ("vocab_size", "tok_embeddings.weight"),
                        ("hidden_dim", "layers.0.feed_forward.w1.weight")):
        if name in shapes:
            found[field] = shapes[name][0]
    for field, size in found.items():
        if getattr(args, field) != size:
            raise CheckpointError(f"{path}: {keys.get(field, field)} is {getattr(args, field)}, but the weights "
                                  f"say {size}")
    check_context(args, f"{path}: {keys.get('max_seq_len', 'max_seq_len')}")


def check_context(args: ModelArgs, where):
    """The RoPE table of args.max_seq_len positions (head_dim fp32 values each, model.rope_table) must
    fit this machine's memory; where: the file and key (or flag) that asked for it."""
    need, have = args.max_seq_len * args.head_dim * 4, _physical_memory()
    if need > have:
        raise CheckpointError(f"{where} is {args.max_seq_len}: its RoPE table would take {need / 2**30:,.0f} GiB, "
                              f"more than this machine's memory ({have / 2**30:,.0f} GiB)")


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # a system without these names: a generous bound
        return 2**40


# -----------------------------------------------------------------------------------------------
# Meta layout: params.json + consolidated.NN.pth, one file per model-parallel rank

# Meta's model-parallel split: column-parallel weights are cut along their output rows (dim 0),
# row-parallel ones (wo, w2) along their input columns (dim 1); norms are replicated on every shard.
_JOIN_DIM = {name: 1 if name in ("wo", "w2") else 0 for name in PROJECTIONS + ("output",)}


def read_meta(ckpt_dir):
    """(args, an iterator of (name, tensor) with the shards joined, tied, the params.json path)."""
    params_path = os.path.join(ckpt_dir, META_MARKER)
    params = _read_json(params_path)
    for key in ("dim", "n_layers", "n_heads"):  # every params.json Meta writes has them; no default fits
        jsonfile.field(params, key, int, params_path, CheckpointError)
    paths = sorted(glob.glob(os.path.join(ckpt_dir, "consolidated.*.pth")))
    if not paths:
        raise CheckpointError(f"{ckpt_dir}: params.json but no consolidated.NN.pth weights")
    shards = []
    for p in paths:
        shards.append(torch_load(p, mmap=True))  # mmap: the weights stay in the page cache, not our heap
    first = shards[0]
    if "score.weight" in first and "n_labels" not in params:  # as in read_hf, the weight says there is a head
        params = {**params, "n_labels": first["score.weight"].shape[0]}
    if "score.bias" in first and "head_kind" not in params:  # and its bias that it is a tag head
        params = {**params, "head_kind": "tag"}
    args = model_args(params_path, params)
    if "tok_embeddings.weight" not in first:
        raise CheckpointError(f"{paths[0]}: no tok_embeddings.weight in it (not a Llama checkpoint)")
    tied = "output.weight" not in first or first["output.weight"].data_ptr() == first["tok_embeddings.weight"].data_ptr()
    # Llama 2 splits the embedding along dim (ParallelEmbedding), Llama 3 along the vocabulary
    # (VocabParallelEmbedding): the shard's width tells which.
    embedding_dim = 0 if first["tok_embeddings.weight"].shape[1] == args.dim else 1
    if args.vocab_size <= 0:
        args.vocab_size = first["tok_embeddings.weight"].shape[0] * (len(shards) if embedding_dim == 0 else 1)
    if "max_seq_len" not in params:
        args.max_seq_len = published_context(args)  # Meta's params.json leaves it to the caller
    shapes = {name: _joined_shape(name, t, len(shards), embedding_dim) for name, t in first.items()}
    check_sizes(params_path, args, shapes, {"hidden_dim": "multiple_of / ffn_dim_multiplier (the FFN width)"})

    def tensors():
        for name, t in first.items():
            if name == "output.weight" and tied:
                continue
            module = name.split(".")[-2]
            if len(shards) == 1 or name.endswith("norm.weight"):
                yield name, t
            elif name == "tok_embeddings.weight":
                yield name, torch.cat([s[name] for s in shards], dim=embedding_dim)
            elif module in _JOIN_DIM:
                yield name, torch.cat([s[name] for s in shards], dim=_JOIN_DIM[module])
            else:
                yield name, t  # unknown keys (e.g. rope.freqs) are dropped by load

    return args, tensors(), tied, params_path


def _joined_shape(name, t, n_shards, embedding_dim):
    """The shape of a weight once its n_shards model-parallel pieces (t: the first) are joined."""
    shape, module = list(t.shape), name.split(".")[-2] if "." in name else name
    dim = embedding_dim if name == "tok_embeddings.weight" else _JOIN_DIM.get(module)
    if dim is not None and dim < len(shape):
        shape[dim] *= n_shards
    return tuple(shape)


def published_context(args: ModelArgs) -> int:
    """The context a Llama was released for: Llama 2 was trained at 4096, Llama 3 at 8192, and 3.1 and
    3.2 extend it to 131072 (their scaled RoPE)."""
    return 131072 if args.use_scaled_rope else 8192 if args.vocab_size >= 128000 else 4096


def meta_params(args: ModelArgs) -> dict:
    """params.json as Meta writes it: Llama 2 keys always, Llama 3 keys only where they apply, so
    both generations of Meta's code read it back."""
    p = {"dim": args.dim, "n_layers": args.n_layers, "n_heads": args.n_heads, "n_kv_heads": args.n_kv_heads,
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
    if args.n_labels:  # a classification head; without one params.json stays exactly Meta's
        p.update(n_labels=args.n_labels, multilabel=args.multilabel, pad_id=args.pad_id,
                 labels=None if args.labels is None else list(args.labels))
        if args.head_kind != "classify":  # a classification head's params.json stays as it was
            p["head_kind"] = args.head_kind
    return p


def write_meta(model, out_dir):
    """params.json + consolidated.00.pth of model into out_dir, a directory being filled (see save,
    or write_dir to put more files beside them). A tied output is stored as the same tensor, which
    torch.save keeps as one storage and read_meta recognises."""
    # torch.save writes each tensor's whole storage: a weight that is a view into a mapped
    # .safetensors file is copied out first, or the file would hold that whole file again.
    copies, state = {}, {}
    for name, t in model.state_dict().items():
        t = t.detach()
        if t.untyped_storage().nbytes() != t.nbytes:
            t = copies.setdefault(t.data_ptr(), t.clone())  # a tied output shares the embedding's copy
        state[name] = t
    torch.save(state, os.path.join(out_dir, "consolidated.00.pth"))
    write_json(os.path.join(out_dir, "params.json"), meta_params(model.args))


def save(model, out_dir):
    """Write model in Meta's layout (params.json + consolidated.00.pth), which load() and Meta's own
    code read. out_dir is replaced as a whole (tokenizer and other files that are not part of a
    checkpoint carried over, see replace_checkpoint): a kill at any moment leaves the old checkpoint
    or the new one."""
    return replace_checkpoint(out_dir, lambda fresh: write_meta(model, fresh))


# -----------------------------------------------------------------------------------------------
# Names: each of our modules as transformers (HF) and llama.cpp (GGUF) call it, one row each: our
# name, HF's, GGUF's. Inside a block the names follow "layers.N." (HF: "model.layers.N.", GGUF:
# "blk.N."); the first four are top-level (score: the classification head, transformers'
# LlamaForSequenceClassification's name; GGUF has none, "-": llama.cpp's cls tensor is a reranker's
# output, which our head is not). peft names its adapters after HF's.

TENSOR_NAMES = tuple(tuple(row.split()) for row in """
    tok_embeddings      model.embed_tokens          token_embd
    norm                model.norm                  output_norm
    output              lm_head                     output
    score               score                       -
    attention.wq        self_attn.q_proj            attn_q
    attention.wk        self_attn.k_proj            attn_k
    attention.wv        self_attn.v_proj            attn_v
    attention.wo        self_attn.o_proj            attn_output
    feed_forward.w1     mlp.gate_proj               ffn_gate
    feed_forward.w2     mlp.down_proj               ffn_down
    feed_forward.w3     mlp.up_proj                 ffn_up
    attention_norm      input_layernorm             attn_norm
    ffn_norm            post_attention_layernorm    ffn_norm
""".strip().splitlines())
HF_NAMES = {ours: hf for ours, hf, _ in TENSOR_NAMES}
GGUF_NAMES = {ours: gguf for ours, _, gguf in TENSOR_NAMES}
_FROM_HF = {theirs: ours for ours, theirs in HF_NAMES.items()}


def hf_name(name: str) -> str:
    """'layers.3.attention.wq.weight' -> 'model.layers.3.self_attn.q_proj.weight' (module paths too)."""
    return _rename(name, HF_NAMES, "layers.", "model.layers.")


def our_name(name: str) -> str:
    """hf_name backwards; names it does not know (e.g. rotary_emb.inv_freq) pass through."""
    return _rename(name, _FROM_HF, "model.layers.", "layers.")


def gguf_name(name: str) -> Optional[str]:
    """'layers.3.attention.wq.weight' -> 'blk.3.attn_q.weight'; 'tok_embeddings.weight' -> 'token_embd.weight';
    None for a tensor GGUF has no name for (the classification head's)."""
    renamed = _rename(name, GGUF_NAMES, "layers.", "blk.")
    return None if renamed.partition(".")[0] == "-" else renamed


def hf_modules(projections) -> list:
    """The ends of HF's module names for some of our projections (PROJECTIONS), sorted: what peft's
    target_modules matches ("q_proj", "gate_proj", ...)."""
    return sorted(hf.rpartition(".")[2] for ours, hf, _ in TENSOR_NAMES if ours.rpartition(".")[2] in projections)


def _rename(name, table, layers_from, layers_to):
    prefix = ""
    if name.startswith(layers_from):
        index, _, name = name[len(layers_from):].partition(".")
        prefix = f"{layers_to}{index}."
    for old, new in table.items():
        if name == old or name.startswith(old + "."):
            return prefix + new + name[len(old):]
    return prefix + name


# -----------------------------------------------------------------------------------------------
# HF layout: config.json + *.safetensors, as transformers' LlamaForCausalLM saves it

# Meta's RoPE rotates adjacent pairs of each q/k head's rows, (x0 x1)(x2 x3)...; HF's rotates halves,
# so it stores each head's rows as all first elements of the pairs, then all second ones.
def meta_to_hf_rope(w, n_heads):
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def hf_to_meta_rope(w, n_heads):
    rows, cols = w.shape
    return w.reshape(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def permute_qk(name, w, args: ModelArgs, permute):
    """permute (one of the two above) applied to the rows of a q/k weight (or of a q/k lora_B, whose
    rows are the same outputs), named in our names; anything else is returned as is."""
    if ".attention.wq." in name:
        return permute(w, args.n_heads)
    if ".attention.wk." in name:
        return permute(w, args.n_kv_heads)
    return w


# Our ModelArgs fields -> config.json's keys (for messages about the file)
HF_KEYS = {"dim": "hidden_size", "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads",
           "n_kv_heads": "num_key_value_heads", "vocab_size": "vocab_size", "hidden_dim": "intermediate_size",
           "max_seq_len": "max_position_embeddings"}


def hf_args(config: dict, path: str) -> ModelArgs:
    """ModelArgs from a transformers LlamaConfig (config.json), each key checked as it is read."""
    def get(key, expected, default=jsonfile.REQUIRED, obj=config, where=path):
        return jsonfile.field(obj, key, expected, where, CheckpointError, default, positive=expected in (int, float))

    if get("model_type", str, "llama") != "llama":
        raise CheckpointError(f"{path}: model_type {config.get('model_type')!r} is not llama")
    if get("attention_bias", bool, False) or get("mlp_bias", bool, False):
        raise CheckpointError(f"{path}: attention_bias / mlp_bias are not part of Llama")
    dim, n_heads = get("hidden_size", int), get("num_attention_heads", int)
    if get("head_dim", int, None) not in (None, dim // n_heads):
        raise CheckpointError(f"{path}: head_dim {config['head_dim']} != hidden_size / heads")
    # transformers < 5 keeps rope_theta at the top and rope_scaling beside it; transformers 5 puts
    # both into rope_parameters.
    rope_key = "rope_scaling" if config.get("rope_scaling") is not None else "rope_parameters"
    rope, rope_at = get(rope_key, dict, {}), f"{path}: {rope_key}"
    rope_type = get("rope_type", str, get("type", str, "default", rope, rope_at), rope, rope_at)
    if rope_type not in ("default", "llama3"):
        raise CheckpointError(f"{path}: rope type {rope_type!r} is not supported (default, llama3)")
    # HF states the FFN width outright; express it in Meta's terms so params.json stays readable by
    # Meta's code: with multiple_of = width, the round-up lands exactly on it.
    hidden, base = get("intermediate_size", int), int(2 * 4 * dim / 3)
    values = dict(dim=dim, n_layers=get("num_hidden_layers", int), n_heads=n_heads,
                  n_kv_heads=get("num_key_value_heads", int, n_heads), vocab_size=get("vocab_size", int),
                  multiple_of=hidden, ffn_dim_multiplier=None if base <= hidden else hidden / base,
                  norm_eps=get("rms_norm_eps", float, 1e-5),
                  rope_theta=get("rope_theta", float, None) or get("rope_theta", float, 10000.0, rope, rope_at),
                  max_seq_len=get("max_position_embeddings", int, 4096))
    if rope_type == "llama3":
        values.update(use_scaled_rope=True, rope_scaling_factor=get("factor", float, obj=rope, where=rope_at),
                      rope_low_freq_factor=get("low_freq_factor", float, 1.0, rope, rope_at),
                      rope_high_freq_factor=get("high_freq_factor", float, 4.0, rope, rope_at),
                      rope_original_max_seq_len=get("original_max_position_embeddings", int, 8192, rope, rope_at))
    args = model_args(path, values)
    assert args.hidden_dim == hidden
    return args


def hf_head_args(args: ModelArgs, config: dict, path: str, n_labels: int, tag: bool = False) -> ModelArgs:
    """args with the head that config.json describes and whose weight (score.weight) has n_labels
    rows. The weight, not num_labels, says whether there is a head: transformers writes id2label for
    every model; and its bias (tag) that it is a tag head (LlamaForTokenClassification's score has
    one, LlamaForSequenceClassification's none). Names of transformers' making (LABEL_0, ...) are no
    known labels."""
    def get(key, expected):
        return jsonfile.field(config, key, expected, path, CheckpointError, None)

    problem = get("problem_type", str)
    if problem not in (None, "single_label_classification", "multi_label_classification"):
        raise CheckpointError(f"{path}: problem_type {problem!r}: expected single_label_classification "
                              "or multi_label_classification")
    id2label = get("id2label", dict) or {}
    if id2label and sorted(id2label) != sorted(str(i) for i in range(n_labels)):
        raise CheckpointError(f"{path}: id2label names {len(id2label)} labels, but score.weight has {n_labels}")
    labels = [id2label[str(i)] for i in range(n_labels)] if id2label else None
    if labels == [f"LABEL_{i}" for i in range(n_labels)]:
        labels = None
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(ModelArgs) if f.init}
    if tag and problem == "multi_label_classification":
        raise CheckpointError(f"{path}: a tag head (score.bias) with problem_type {problem}")
    values.update(n_labels=n_labels, multilabel=problem == "multi_label_classification",
                  labels=labels, pad_id=get("pad_token_id", int), head_kind="tag" if tag else "classify")
    return model_args(path, values)


def hf_config(args: ModelArgs, tied: bool, dtype: torch.dtype, tok=None) -> dict:
    """config.json for transformers' LlamaForCausalLM (the classic layout, which transformers 5 reads too).
    tok: the model's tokenizer, whose BOS/EOS ids it records (without them transformers assumes
    Llama 2's 1 and 2, wrong for Llama 3)."""
    rope_scaling = None
    if args.use_scaled_rope:
        rope_scaling = {"rope_type": "llama3", "factor": args.rope_scaling_factor,
                        "low_freq_factor": args.rope_low_freq_factor, "high_freq_factor": args.rope_high_freq_factor,
                        "original_max_position_embeddings": args.rope_original_max_seq_len}
    return {"architectures": [HF_ARCHITECTURES[args.head_kind] if args.n_labels else "LlamaForCausalLM"],
            "model_type": "llama", "hidden_act": "silu",
            "hidden_size": args.dim, "intermediate_size": args.hidden_dim, "num_hidden_layers": args.n_layers,
            "num_attention_heads": args.n_heads, "num_key_value_heads": args.n_kv_heads,
            "head_dim": args.head_dim, "vocab_size": args.vocab_size, "rms_norm_eps": args.norm_eps,
            "rope_theta": args.rope_theta, "rope_scaling": rope_scaling,
            "max_position_embeddings": args.max_seq_len, "attention_bias": False, "mlp_bias": False,
            "tie_word_embeddings": tied, "torch_dtype": str(dtype).removeprefix("torch."),
            **({"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id} if tok is not None else {}),
            **hf_head_config(args)}


HF_ARCHITECTURES = {"classify": "LlamaForSequenceClassification", "tag": "LlamaForTokenClassification"}


def hf_head_config(args: ModelArgs) -> dict:
    """config.json's keys for the classification head (none without one), as transformers'
    LlamaForSequenceClassification reads them: it pools at the last token that is not pad_token_id.
    id2label and label2id only where the labels' names are known (transformers makes LABEL_i up)."""
    if not args.n_labels:
        return {}
    config = {"num_labels": args.n_labels, "pad_token_id": args.pad_id}
    if args.head_kind == "classify":  # a tag head's loss is token classification's, no problem_type
        config["problem_type"] = "multi_label_classification" if args.multilabel else "single_label_classification"
    if args.labels is not None:
        config["id2label"] = {str(i): name for i, name in enumerate(args.labels)}
        config["label2id"] = {name: i for i, name in enumerate(args.labels)}
    return config


def hf_generation_config(tok) -> dict:
    """generation_config.json: stop at any of the tokenizer's stop ids (Llama 3.1/3.2 end a turn with
    eot or eom, a document with end_of_text) and sample with Meta's defaults, as generate.py does."""
    stops = sorted(tok.stop_ids)
    return {"bos_token_id": tok.bos_id, "eos_token_id": stops[0] if len(stops) == 1 else stops,
            "do_sample": True, "temperature": 0.6, "top_p": 0.9}


def read_hf(ckpt_dir):
    """(args, an iterator of (name, tensor) in our names and Meta's q/k layout, tied, the config path)."""
    config_path = os.path.join(ckpt_dir, HF_MARKER)
    config = _read_json(config_path)
    args = hf_args(config, config_path)
    index = os.path.join(ckpt_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        paths = [os.path.join(ckpt_dir, f) for f in sorted(set(_index_files(index)))]
    else:
        paths = sorted(glob.glob(os.path.join(ckpt_dir, "*.safetensors")))
    if not paths:
        raise CheckpointError(f"{ckpt_dir}: config.json but no *.safetensors weights")
    files = [map_safetensors(p) for p in paths]
    tied = not any("lm_head.weight" in tensors for _, tensors in files)
    shapes = {our_name(name): tuple(t.shape) for _, stored in files for name, t in stored.items()}
    if "score.weight" in shapes:  # transformers' LlamaForSequenceClassification (or ForTokenClassification), or ours
        args = hf_head_args(args, config, config_path, shapes["score.weight"][0], tag="score.bias" in shapes)
    check_sizes(config_path, args, shapes, HF_KEYS)

    def tensors():
        for mapping, stored in files:
            for name, t in stored.items():
                ours = our_name(name)
                if ".attention.wq." in ours or ".attention.wk." in ours:
                    # the rows are reordered into a copy; the stored order is not needed again
                    t, stored_order = permute_qk(ours, t, args, hf_to_meta_rope), t
                    release(mapping, stored_order)
                yield ours, t

    return args, tensors(), tied, config_path


def _index_files(index):
    """The files model.safetensors.index.json's weight_map names: bare .safetensors names, so the
    index cannot lead the reader out of the checkpoint's directory."""
    files = jsonfile.field(_read_json(index), "weight_map", dict, index, CheckpointError).values()
    for name in files:
        if not isinstance(name, str) or os.path.basename(name) != name or not name.endswith(".safetensors"):
            raise CheckpointError(f"{index}: weight_map names {name!r}, not a .safetensors file beside it")
    return files


# safetensors' element types (the format's names) as torch dtypes
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn,
                       "F8_E5M2": torch.float8_e5m2}


def map_safetensors(path):
    """(mapping, {name: tensor}) of a .safetensors file, each tensor a view into the file's mapping.

    The format is 8 bytes of little-endian header length, a JSON header giving each tensor's dtype,
    shape and byte range, then the bytes. The mapping is private (copy-on-write): the model may
    change its weights, and the file never sees it. safetensors' own get_tensor copies each tensor
    into fresh memory; reading the header ourselves lets the weights stay where the file is.
    """
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            n = int.from_bytes(f.read(8), "little")
            if not 2 <= n <= size - 8:
                raise ValueError("no safetensors header at its start")
            header = jsonfile.loads(f.read(n), "its header", ValueError)
            if not isinstance(header, dict):
                raise ValueError("its header is not a JSON object")
            mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read ({type(e).__name__}: {e})") from None
    data = torch.frombuffer(mapping, dtype=torch.uint8)[8 + n:]
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _SAFETENSORS_DTYPES[info["dtype"]]
            start, end = info["data_offsets"]
            shape = [int(d) for d in info["shape"]]
            if not 0 <= start <= end <= len(data) or end - start != math.prod(shape) * dtype.itemsize:
                raise ValueError(f"bytes {start}..{end} do not fit the file or the shape {shape}")
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: {name}: bad header entry ({type(e).__name__}: {e}); truncated "
                                  f"or not a safetensors file") from None
        raw = data[start:end]
        if (raw.storage_offset() % dtype.itemsize) != 0:
            raw = raw.clone()  # the format does not promise alignment; an unaligned tensor is copied
        tensors[name] = raw.view(dtype).view(shape)
    return mapping, tensors


def release(mapping, view: torch.Tensor):
    """Take view's pages out of this process's memory; they stay in the page cache, and reading view
    again would bring them back. For a stored tensor read once, to be copied into another layout."""
    if not hasattr(mmap, "MADV_DONTNEED"):
        return  # not every system has it; the pages then count until the mapping closes
    offset = view.data_ptr() - view.untyped_storage().data_ptr()  # the storage is the whole mapping
    first = -(-offset // mmap.PAGESIZE) * mmap.PAGESIZE  # whole pages only: the neighbours keep theirs
    last = (offset + view.nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
    if last > first:
        mapping.madvise(mmap.MADV_DONTNEED, first, last - first)


def write_hf(model, out_dir, state_dict=None, tok=None):
    """config.json + model.safetensors of model into out_dir, a directory being filled (see save_hf).
    state_dict: the weights in our names, by default the model's own (lora.save_hf passes merged ones).
    tok: the model's tokenizer: its special ids go into config.json, and generation_config.json
    is written beside it (the tokenizer's own files are tokenizer.write_hf_files')."""
    state_dict = model.state_dict() if state_dict is None else state_dict
    tensors = {}
    for name, t in state_dict.items():
        if name == "output.weight" and model.tied:
            continue  # safetensors stores no aliases; transformers re-ties from tie_word_embeddings
        tensors[hf_name(name)] = permute_qk(name, t.detach(), model.args, meta_to_hf_rope).contiguous()
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    dtype = model.tok_embeddings.weight.dtype
    write_json(os.path.join(out_dir, "config.json"), hf_config(model.args, model.tied, dtype, tok))
    if tok is not None:
        write_json(os.path.join(out_dir, "generation_config.json"), hf_generation_config(tok))


def save_hf(model, out_dir, state_dict=None, tok=None):
    """The HF layout, replacing out_dir's checkpoint as a whole (see replace_checkpoint)."""
    return replace_checkpoint(out_dir, lambda fresh: write_hf(model, fresh, state_dict, tok))


def stored_dtype(ckpt_dir) -> Optional[torch.dtype]:
    """The dtype a checkpoint keeps its weights in, so a copy made from it can keep it (an 8B bf16
    model merged in fp32 would double in size). None if it cannot tell; load() then says why."""
    try:
        pth = sorted(glob.glob(os.path.join(ckpt_dir, "consolidated.*.pth")))
        if pth:
            return torch_load(pth[0], mmap=True)["tok_embeddings.weight"].dtype
        for p in sorted(glob.glob(os.path.join(ckpt_dir, "*.safetensors"))):
            embedding = map_safetensors(p)[1].get("model.embed_tokens.weight")
            if embedding is not None:
                return embedding.dtype
    except Exception:
        return None
    return None
