"""Sharded training for train.py --fsdp: PyTorch's FSDP2 (torch.distributed.fsdp.fully_shard).

Under DDP every rank holds the whole model, its gradients and its optimizer state. Here each
parameter is cut into `world` row blocks (torch.chunk along dim 0), one per rank, and with it its
gradient and its AdamW moments; a block's weights are all-gathered just before its forward (and
again in backward) and freed after, and gradients are reduce-scattered, each rank keeping its rows.
Nothing here is a sharding scheme of our own: it is fully_shard plus the I/O around it.

Reading guide, top to bottom:
    shard            fully_shard on each TransformerBlock, then on the root; bf16 compute with fp32
                     gradient reduction on CUDA
    load             the model built on the meta device (no memory), LoRA-wrapped, sharded, then each
                     rank fills only its own rows: from a checkpoint (memory-mapped, so a rank reads
                     only its pages, converted to the training dtype after slicing), or from
                     init_weights' and apply_lora's draws, replayed one full tensor at a time, so
                     the weights equal an unsharded run's from the same seed
    save             the full weights gathered to rank 0 one tensor at a time into a plain model on
                     the CPU, written by the ordinary writers (checkpoint.write_meta,
                     lora.write_adapter); the optimizer state sharded with torch.distributed.checkpoint
                     (DCP), each rank writing its own file into the checkpoint being filled
    restore          the optimizer state (DCP reshards it to any number of ranks), a LoRA adapter
    local_bytes      what this rank holds: parameters and optimizer state

Files: under --fsdp a checkpoint directory is the same as a DDP run's (model/ in Meta layout, or
adapter/) plus optimizer/, DCP's files (one .distcp per rank and a .metadata). Every rank writes
into the temporary directory that rank 0's atomic.write_dir is filling (its path is broadcast), so
on several nodes --out_dir must be on a file system they all see.
"""

import math
import os

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

import checkpoint
import lora
from model import CheckpointError, Transformer

OPTIMIZER_DIR = "optimizer"  # DCP's files, inside model/ or adapter/


# -----------------------------------------------------------------------------------------------
# Sharding


def shard(model, device):
    """fully_shard each block (its weights are gathered together, just in time) and the root (the
    embedding, final norm and output layer). On CUDA the blocks compute in bf16 from fp32 (or bf16)
    sharded weights and gradients are reduced in fp32. Inputs are not cast: the RoPE table each
    block is given stays fp32, as apply_rope expects."""
    on_cuda = torch.device(device).type == "cuda"
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if on_cuda else None,
                                  reduce_dtype=torch.float32 if on_cuda else None, cast_forward_inputs=False)
    for block in model.layers:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


# -----------------------------------------------------------------------------------------------
# Loading: the model on the meta device, sharded, then each rank's rows filled in


def load(args, ckpt_dir, device, dtype, adapt, seed):
    """A sharded Transformer. ckpt_dir: a Meta or HF checkpoint to read (args is then taken from
    it), or None to initialise one of shape args as an unsharded run would (init_weights). adapt:
    applied to the model on the meta device before sharding (LoRA wrapping); LoRA's A matrices are
    then drawn as apply_lora draws them. dtype: of the weights read or initialised (LoRA adapters
    stay fp32). seed: the RNG state an unsharded run starts its draws from."""
    tied = False
    if ckpt_dir:
        args, tensors, tied, config_path = checkpoint.read(ckpt_dir)
    with torch.device("meta"):
        model = Transformer(args).to(dtype)
    if tied:
        model.tie_weights()
    adapt(model)
    shard(model, device)
    model.to_empty(device=device)
    params = dict(model.named_parameters())
    torch.manual_seed(seed)
    with torch.no_grad():
        if ckpt_dir:
            _fill_from_checkpoint(params, tensors, ckpt_dir, config_path, tied)
        else:
            _fill_from_init(model, device)
        _fill_lora(model, device)
    model.reset_rope()
    return model


def _copy_rows(param, full):
    """This rank's rows of `full` (a whole weight, possibly memory-mapped) into param's local shard.
    Only those rows are read, and only they are converted to param's dtype."""
    rows = torch.chunk(full, param.device_mesh.size(), dim=0)  # the row blocks fully_shard made
    rank = param.device_mesh.get_local_rank()
    mine = rows[rank] if rank < len(rows) else full[:0]
    local = param.to_local()
    if local.shape != mine.shape:
        raise RuntimeError(f"shard of {tuple(full.shape)} is {tuple(local.shape)} on rank {rank}, "
                           f"expected {tuple(mine.shape)}")
    local.copy_(mine)


def _fill_from_checkpoint(params, tensors, ckpt_dir, config_path, tied):
    """Each checkpoint tensor's rows into the shard of its parameter (a LoRA-wrapped projection's
    weight is NAME.base.weight); the same checks as checkpoint.load."""
    filled = set()
    for name, full in tensors:
        ours = name if name in params else name.replace(".weight", ".base.weight")
        if ours not in params:
            continue  # stray keys such as rope.freqs or rotary_emb.inv_freq
        if full.shape != params[ours].shape:
            raise CheckpointError(f"{config_path} disagrees with the weights: {name} is {tuple(full.shape)} "
                                  f"in the checkpoint but {tuple(params[ours].shape)} by the config")
        _copy_rows(params[ours], full)
        filled.add(ours)
    missing = sorted(n for n, p in params.items() if n not in filled and not n.endswith(("lora_A", "lora_B")))
    if missing:
        raise CheckpointError(f"{ckpt_dir}: weights missing from the checkpoint: {', '.join(missing[:4])}"
                              + (" ..." if len(missing) > 4 else ""))


def _fill_from_init(model, device):
    """Transformer.init_weights, run over whole tensors one at a time (in its order, with its
    rules), each rank keeping its rows of each: the weights an unsharded run draws from the same
    RNG state, without any rank holding the whole model."""
    class OneTensorAtATime:
        args = model.args

        def named_parameters(self):
            for name, param in model.named_parameters():
                full = torch.empty(param.shape, dtype=param.dtype, device=device)
                yield name, full  # init_weights fills it, then asks for the next one
                _copy_rows(param, full)

        def reset_rope(self):
            pass

    Transformer.init_weights(OneTensorAtATime())


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
    """Every rank takes part; rank 0 gets a plain Transformer on the CPU holding the full weights
    (and LoRA adapters), gathered one tensor at a time, so no GPU ever holds the whole model; the
    other ranks get None. What train.py's checkpoint writers take."""
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        return None
    tied = model.tied
    with torch.device("meta"):
        plain = Transformer(model.args)
    if getattr(model, "lora_config", None):
        lora.apply_lora(plain, **model.lora_config)
    plain.load_state_dict(state, assign=True)
    if tied:
        plain.tie_weights()
    plain.reset_rope()
    return plain


def save_optimizer(model, optimizer, fresh_dir=None):
    """The optimizer state, each rank its own shard, into FRESH_DIR/optimizer with DCP. Rank 0 passes
    the directory its atomic.write_dir is filling and tells the others (who pass nothing): they all
    write into that one directory before rank 0 renames it, which DCP's closing collective ensures."""
    where = [fresh_dir]
    dist.broadcast_object_list(where, src=0)
    if not optimizer.state:  # saved before the first step (all ranks alike): nothing to keep, and
        return  # get_optimizer_state_dict would make a state with a zero-lr step, which would count
    state = get_optimizer_state_dict(model, optimizer)
    dcp.save({"optimizer": state}, checkpoint_id=os.path.join(where[0], OPTIMIZER_DIR))


# -----------------------------------------------------------------------------------------------
# Restoring: the optimizer state on any number of ranks, a LoRA run's adapter


def load_optimizer(model, optimizer, ckpt_dir):
    """The optimizer state save_optimizer wrote, resharded by DCP to this run's ranks (or, on a model
    that is not sharded, whole); none if it was saved before the first step. get_optimizer_state_dict
    first gives the empty optimizer its state tensors (one step with zero gradients and lr 0), which
    dcp.load then fills in place, the step counts included."""
    if not os.path.isdir(os.path.join(ckpt_dir, OPTIMIZER_DIR)):
        return
    state = get_optimizer_state_dict(model, optimizer)
    dcp.load({"optimizer": state}, checkpoint_id=os.path.join(ckpt_dir, OPTIMIZER_DIR))
    set_optimizer_state_dict(model, optimizer, state)


def load_adapter(model, ckpt_dir):
    """A LoRA run's own saved adapter (lora.write_adapter's adapter.safetensors) into the shards of
    its A and B matrices: each rank copies its rows."""
    from safetensors.torch import load_file

    weights = os.path.join(ckpt_dir, "adapter.safetensors")
    try:
        tensors = load_file(weights)  # the adapter is small: every rank reads it whole
    except Exception as e:
        raise lora.AdapterError(f"{weights}: cannot read ({type(e).__name__}: {e})") from None
    params = dict(model.named_parameters())
    if set(tensors) != set(lora.lora_state_dict(model)):
        raise lora.AdapterError(f"{weights}: tensors do not match the model's adapters")
    with torch.no_grad():
        for name, t in tensors.items():
            if t.shape != params[name].shape:
                raise lora.AdapterError(f"{weights}: {name} is {tuple(t.shape)}, the model expects "
                                        f"{tuple(params[name].shape)}")
            _copy_rows(params[name], t)


def local_bytes(model, optimizer):
    """(parameter bytes, optimizer-state bytes) this rank holds: under FSDP about 1/world of each."""
    def local(t):
        return t.to_local() if hasattr(t, "to_local") else t

    params = sum(local(p).numel() * p.element_size() for p in model.parameters())
    states = sum(local(t).numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                 if torch.is_tensor(t))
    return params, states
