"""Sharded training for train.py --fsdp: PyTorch's FSDP2 (torch.distributed.fsdp.fully_shard).

Under DDP every rank holds the whole model, its gradients and its optimizer state. Here each
parameter is cut into `world` row blocks (torch.chunk along dim 0), one per rank, and with it its
gradient and its AdamW moments; a block's weights are all-gathered just before its forward (and
again in backward) and freed after, and gradients are reduce-scattered, each rank keeping its rows.
Nothing here is a sharding scheme of our own: it is fully_shard plus the I/O around it.

Reading guide, top to bottom:
    shard            fully_shard on each TransformerBlock, then on the root (forward and classify,
                     the head's forward); bf16 compute with fp32 gradient reduction on CUDA
    load             the model built on the meta device (no memory), given its head and LoRA
                     adapters (train.py adapt), sharded, then each rank fills only its own rows:
                     from a checkpoint (memory-mapped, so a rank reads only its pages, converted to
                     the training dtype after slicing), or from init_parameter's and apply_lora's
                     draws, replayed one full tensor at a time, so the weights equal an unsharded
                     run's from the same seed (a new head: zeros, _fill_head); with --quantize nf4
                     each projection is quantized whole and each rank keeps its share of the codes
    save             the full weights (a LoRA run: its adapters and head, and the base's fingerprint taken
                     once) gathered to rank 0 one tensor at a time into a plain model on the CPU,
                     written by the ordinary writers (checkpoint.write_meta, lora.write_adapter);
                     the optimizer state sharded with torch.distributed.checkpoint (DCP), each rank
                     writing its own file into the checkpoint being filled
    restore          the optimizer state (DCP reshards it to any number of ranks; its metadata read
                     through an allow-list, so no file runs code), a LoRA adapter
    local_bytes      what this rank holds: parameters and optimizer state

Files: under --fsdp a checkpoint directory is the same as a DDP run's (model/ in Meta layout, or
adapter/) plus optimizer/, DCP's files (one .distcp per rank and a .metadata). Every rank writes
into the temporary directory that rank 0's atomic.write_dir is filling (its path is broadcast), so
on several nodes --out_dir must be on a file system they all see.
"""

import math
import os
import pickle

import torch
import torch.nn as nn
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

import checkpoint
import lora
from checkpoint import CheckpointError
from model import NF4Linear, Transformer, nf4_projections

OPTIMIZER_DIR = "optimizer"  # DCP's files, inside model/ or adapter/


# -----------------------------------------------------------------------------------------------
# Sharding


def shard(model, device, cast=True):
    """fully_shard each block (its weights are gathered together, just in time) and the root (the
    embedding, final norm and output layer). On CUDA the blocks compute in bf16 from fp32 (or bf16)
    sharded weights and gradients are reduced in fp32. Inputs are not cast: the RoPE table each
    block is given stays fp32, as apply_rope expects. cast=False leaves the weights in their own
    dtypes (an NF4 base's 4-bit codes are bytes, not numbers to round to bf16)."""
    on_cuda = torch.device(device).type == "cuda"
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if on_cuda and cast else None,
                                  reduce_dtype=torch.float32 if on_cuda else None, cast_forward_inputs=False)
    for block in model.layers:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    # FSDP gathers the root's weights (embedding, norm, output, a head's score) in hooks around
    # forward; --head calls classify (or tag) instead, which must get the same hooks
    register_fsdp_forward_method(model, "classify")
    register_fsdp_forward_method(model, "tag")
    return model


# -----------------------------------------------------------------------------------------------
# Loading: the model on the meta device, sharded, then each rank's rows filled in


def load(args, ckpt_dir, device, dtype, adapt, seed, quantize=None):
    """A sharded Transformer. ckpt_dir: a Meta or HF checkpoint to read (args is then taken from
    it), or None to initialise one of shape args as an unsharded run would (init_weights). adapt:
    applied to the model on the meta device before sharding (a classification head, LoRA wrapping),
    so FSDP shards what it adds like the rest; LoRA's A matrices are then drawn as apply_lora draws
    them, and a head that adapt attaches is zeros, as heads.attach_head makes it (a head the
    checkpoint has is read from it). dtype: of the weights read or initialised (LoRA adapters
    stay fp32). seed: the RNG state an unsharded run starts its draws from. quantize="nf4": the
    blocks' projections in NF4, as checkpoint.load(quantize="nf4") holds them, sharded too.
    Transformer.to_empty computes the RoPE table on device."""
    tied = False
    if ckpt_dir:
        args, tensors, tied, config_path = checkpoint.read(ckpt_dir)
    with torch.device("meta"):
        model = Transformer(args).to(dtype)
    if tied:
        model.tie_weights()
    if quantize:
        nf4_projections(model)  # on the meta device: only the shapes
        _nf4_shardable(model, device)
    had_head = model.score is not None
    adapt(model)
    # a new head's parameters (a tag head's bias too), in the order its nn.Linear draws them
    fresh = [f"score.{name}" for name, _ in model.score.named_parameters()] if model.score is not None and not had_head \
        else []
    shard(model, device, cast=not quantize)
    model.to_empty(device=device)
    torch.manual_seed(seed)
    with torch.no_grad():
        if ckpt_dir:
            _fill_from_checkpoint(model, tensors, ckpt_dir, config_path, device, fresh)
        else:
            _fill_from_init(model, device, fresh)
        for name in fresh:
            _fill_head(model.get_parameter(name))
        _fill_lora(model, device)
    return model


def _fill_head(param):
    """A new head's weight (or a tag head's bias): zeros, as heads.attach_head makes it. Its
    nn.Linear first draws the usual init on the CPU, which the zeros replace; on the meta device
    nothing was drawn, so the draw is replayed here: LoRA's A matrices, drawn next, then equal an
    unsharded run's."""
    if param.dim() == 1:  # nn.Linear's bias: uniform, as many draws as elements
        torch.nn.init.uniform_(torch.empty(param.shape, dtype=torch.float32))
    else:
        torch.nn.init.kaiming_uniform_(torch.empty(param.shape, dtype=torch.float32), a=math.sqrt(5))
    param.to_local().zero_()


def _copy_rows(param, full):
    """This rank's rows of `full` (a whole weight, possibly memory-mapped; of a flat tensor, its
    elements) into param's local shard. Only those rows are read, and only they are converted to
    param's dtype."""
    rows = torch.chunk(full, param.device_mesh.size(), dim=0)  # the row blocks fully_shard made
    rank = param.device_mesh.get_local_rank()
    mine = rows[rank] if rank < len(rows) else full[:0]
    local = param.to_local()
    if local.shape != mine.shape:
        raise RuntimeError(f"shard of {tuple(full.shape)} is {tuple(local.shape)} on rank {rank}, "
                           f"expected {tuple(mine.shape)}")
    local.copy_(mine)


def _fill_from_checkpoint(model, tensors, ckpt_dir, config_path, device, fresh=()):
    """Each checkpoint tensor's rows into the shard of its parameter (a LoRA-wrapped projection's
    weight is NAME.base.weight), or quantized into its NF4 layer; checkpoint.load's checks. fresh:
    parameters the checkpoint does not hold (a new head), filled by the caller."""
    params = dict(model.named_parameters())
    nf4 = {f"{name}.weight": m for name, m in model.named_modules() if isinstance(m, NF4Linear)}
    filled = set()
    for name, full in tensors:
        ours = next((n for n in (name, name.replace(".weight", ".base.weight")) if n in params or n in nf4), None)
        if ours is None:
            continue  # stray keys such as rope.freqs or rotary_emb.inv_freq
        shape = (nf4[ours].out_features, nf4[ours].in_features) if ours in nf4 else tuple(params[ours].shape)
        checkpoint.check_shape(config_path, name, full.shape, shape)
        if ours in nf4:
            _fill_nf4(nf4[ours], full, device)
        else:
            _copy_rows(params[ours], full)
        filled.add(ours)
    expected = set(nf4) | {n for n in params if not n.endswith(("lora_A", "lora_B", ".packed", ".absmax"))
                           and n not in fresh}
    checkpoint.check_complete(ckpt_dir, expected, filled)


def _nf4_shardable(model, device):
    """FSDP2 shards parameters, not buffers: an NF4 layer's packed 4-bit codes and 8-bit block maxima,
    nearly all its bytes, become frozen parameters, so each rank keeps 1/world of them (all-gathered
    whole with their block before it dequantizes). Its fp32 scales (4 bytes per 16384 weights) and
    fingerprint sample stay replicated buffers, made real here: NF4Linear's _apply keeps them as they
    are, and to_empty would otherwise find them on the meta device."""
    for layer in [m for m in model.modules() if isinstance(m, NF4Linear)]:
        for name in ("packed", "absmax"):
            layer.register_parameter(name, nn.Parameter(layer._buffers.pop(name), requires_grad=False))
        for name in ("absmax_scale", "absmax_offset", "weight_sample"):
            setattr(layer, name, torch.empty_like(getattr(layer, name), device=device))


def _fill_nf4(layer, full, device):
    """A projection quantized whole, as checkpoint.load(quantize="nf4") does (NF4Linear from the stored
    dtype), this rank keeping its share of the codes and block maxima and all of the scales."""
    quantized = NF4Linear(full.to(device))
    _copy_rows(layer.packed, quantized.packed)
    _copy_rows(layer.absmax, quantized.absmax)
    for name in ("absmax_scale", "absmax_offset", "weight_sample"):
        setattr(layer, name, getattr(quantized, name))


def _fill_from_init(model, device, fresh=()):
    """Transformer.init_weights over whole tensors one at a time (in its order, each by its
    init_parameter rule), each rank keeping its rows of each: the weights an unsharded run draws
    from the same RNG state, without any rank holding the whole model. fresh: parameters an
    unsharded run attaches after init_weights (a head), left to the caller."""
    for name, param in model.named_parameters():
        if name in fresh:
            continue
        full = torch.empty(param.shape, dtype=param.dtype, device=device)
        model.init_parameter(name, full)
        _copy_rows(param, full)


def _fill_lora(model, device):
    """LoRA's A drawn as LoRALinear.__init__ draws it (nn.Linear's kaiming init, module by module in
    apply_lora's order), whole, each rank keeping its rows; B zero. On the meta device apply_lora
    drew nothing, so the RNG stands where an unsharded run's apply_lora started."""
    for _, module in lora.lora_modules(model):
        full = torch.empty(module.lora_A.shape, dtype=torch.float32, device=device)
        torch.nn.init.kaiming_uniform_(full, a=math.sqrt(5))
        _copy_rows(module.lora_A, full)
        module.lora_B.to_local().zero_()


# -----------------------------------------------------------------------------------------------
# Saving: full weights through rank 0, the optimizer state sharded


def full_model(model):
    """Every rank takes part; rank 0 gets a plain Transformer on the CPU holding the full weights,
    gathered one tensor at a time, so no GPU ever holds the whole model; the other ranks get None.
    A LoRA run gathers only its adapters (and a head's score, trained beside them): the frozen base
    stays on the meta device, and its fingerprint (for the adapter's record) is computed once,
    gathering one tensor at a time, and kept. What train.py's checkpoint writers take, with
    adapter_fingerprint(model)."""
    # The root's weights (embedding, norm, output, score) stay gathered after a forward without
    # backward (a validation pass): back to the shards that full_tensor gathers
    model.reshard()
    if getattr(model, "lora_config", None):
        adapter_fingerprint(model)
        state = {name: p.full_tensor().cpu() for name, p in model.named_parameters()
                 if name.endswith((".lora_A", ".lora_B")) or name in ("score.weight", "score.bias")}
    else:
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        return None
    tied, quantized = model.tied, {n: m for n, m in model.named_modules() if isinstance(m, NF4Linear)}
    with torch.device("meta"):
        plain = Transformer(model.args)
    if quantized:
        nf4_projections(plain)
    if getattr(model, "lora_config", None):
        lora.apply_lora(plain, **model.lora_config)
    plain.load_state_dict(state, assign=True, strict=not getattr(model, "lora_config", None))
    for name, layer in quantized.items():  # not in the state dict, but what an adapter's fingerprint takes
        plain.get_submodule(name).weight_sample = layer.weight_sample.cpu()
    if tied:
        plain.tie_weights()
    return plain  # its RoPE table is computed on first use


def adapter_fingerprint(model) -> str:
    """lora.base_fingerprint of a sharded LoRA model: every rank calls it the first time (a
    collective, one tensor at a time); the base is frozen, so later calls return the kept value."""
    if "_base_fingerprint" not in model.__dict__:
        model.__dict__["_base_fingerprint"] = lora.base_fingerprint(model)
    return model.__dict__["_base_fingerprint"]


def save_optimizer(model, optimizer, fresh_dir=None):
    """The optimizer's tensors (moments, step counts), each rank its own shard, into
    FRESH_DIR/optimizer with DCP. Rank 0 passes the directory its atomic.write_dir is filling and
    tells the others (who pass nothing): they all write into that one directory before rank 0
    renames it, which DCP's closing collective ensures. The param groups' hyperparameters are not
    saved: train.py rebuilds them from the flags a resume must keep, and DCP would store them as
    pickles, which load_optimizer never reads."""
    where = [fresh_dir]
    dist.broadcast_object_list(where, src=0)
    if not optimizer.state:  # saved before the first step (all ranks alike): nothing to keep, and
        return  # get_optimizer_state_dict would make a state with a zero-lr step, which would count
    state = get_optimizer_state_dict(model, optimizer)
    dcp.save({"optimizer": {"state": state["state"]}}, checkpoint_id=os.path.join(where[0], OPTIMIZER_DIR))


# -----------------------------------------------------------------------------------------------
# Restoring: the optimizer state on any number of ranks, a LoRA run's adapter


def load_optimizer(model, optimizer, ckpt_dir):
    """The optimizer state save_optimizer wrote, resharded by DCP to this run's ranks (or, on a model
    that is not sharded, whole); none if it was saved before the first step. get_optimizer_state_dict
    first gives the empty optimizer its state tensors (one step with zero gradients and lr 0), which
    dcp.load then fills in place, the step counts included."""
    where = os.path.join(ckpt_dir, OPTIMIZER_DIR)
    if not os.path.isdir(where):
        return
    state = get_optimizer_state_dict(model, optimizer)
    reader = _SafeReader(where)
    try:  # the metadata checked here first: DCP would print its own tracebacks
        reader.read_metadata()
        # only tensors are asked for, which DCP reads with torch.load(weights_only=True)
        dcp.load({"optimizer": {"state": state["state"]}}, storage_reader=reader)
    except (pickle.UnpicklingError, dcp.api.CheckpointException, OSError, RuntimeError, ValueError,
            KeyError, AttributeError, EOFError) as e:
        raise CheckpointError(f"{where}: cannot read the optimizer state ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from None
    set_optimizer_state_dict(model, optimizer, state)


# What DCP's .metadata may name: its own plain records, torch's dtypes, Size and layouts, and a path.
# Anything else (a payload's os.system, say) is refused before it is called.
_DCP_METADATA = {("torch.distributed.checkpoint.metadata", name) for name in (
    "Metadata", "MetadataIndex", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
    "TensorProperties", "StorageMeta", "_MEM_FORMAT_ENCODING")} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
    ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "WindowsPath")}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _DCP_METADATA or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of DCP's metadata")


class _SafeReader(dcp.FileSystemReader):
    """DCP's reader, but its .metadata (a pickle) read by the allow-list above: a checkpoint never
    runs code, the optimizer state's files included."""

    def read_metadata(self, *args, **kwargs):
        with open(os.path.join(self.path, ".metadata"), "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        if not isinstance(metadata, dcp.metadata.Metadata):
            raise pickle.UnpicklingError("not DCP metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp.metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def load_adapter(model, ckpt_dir):
    """A LoRA run's own saved adapter (lora.write_adapter's adapter.safetensors) into the shards of
    its A and B matrices (and a head's score): each rank copies its rows. First, as
    lora.load_adapter does, the base it was trained on is checked against this one (shapes and
    weights' fingerprint), and its head against the run's (the data's labels)."""
    fingerprint = adapter_fingerprint(model)  # every rank, before any of them can refuse
    cfg = lora.read_adapter_config(ckpt_dir)
    lora.check_base(ckpt_dir, cfg, model, fingerprint=fingerprint,
                    remedy=lora.RESUME_REMEDY)  # only train.py --resume loads a sharded adapter
    if cfg.get("head") and model.score is None:
        kind = cfg["head"].get("kind", "classify")
        raise lora.AdapterError(f"{ckpt_dir}: the adapter holds a {kind} head; --resume it with --head {kind}")
    if cfg.get("head"):  # the model's head (train.py fit_head: the data's labels) must be the adapter's
        lora.fit_head(model, cfg["head"], ckpt_dir)
    weights = os.path.join(ckpt_dir, "adapter.safetensors")
    try:
        tensors = load_file(weights)  # the adapter is small: every rank reads it whole
    except Exception as e:
        raise lora.AdapterError(f"{weights}: cannot read ({type(e).__name__}: {e})") from None
    lora.copy_adapter(model, tensors, weights, copy=_copy_rows)


def local_bytes(model, optimizer):
    """(parameter bytes, optimizer-state bytes) this rank holds: under FSDP about 1/world of each."""
    def local(t):
        return t.to_local() if hasattr(t, "to_local") else t

    params = sum(local(p).numel() * p.element_size() for p in model.parameters())
    states = sum(local(t).numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                 if torch.is_tensor(t))
    return params, states
