"""Train a Llama: from scratch, full fine-tune or LoRA, on one process or many (torchrun DDP).

    python train.py                                   # the demo: a small Llama on ICD-10-CM, CPU, minutes
    python train.py --data shards/notes --dim 512 --n_layers 8 --n_heads 8       # from scratch
    torchrun --nproc_per_node 8 train.py --ckpt_dir ~/llama/Llama3.1-8B --data shards/notes --lora_rank 16

What it writes to --out_dir:
    log.jsonl            one JSON line per optimizer step (rank 0)
    model/               full or from-scratch runs: a Meta checkpoint (generate.py --ckpt_dir OUT/model)
    adapter/             LoRA runs: the adapter (generate.py --ckpt_dir BASE --adapter OUT/adapter)
Both also hold train_state.pt (optimizer, step, loader position, config), so --resume continues exactly
(randomness is seeded per step from --seed, rank and step, so there is no RNG state to carry).
"""

import inspect
import json
import math
import os
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from types import SimpleNamespace

import torch
import torch.distributed as dist

import model as llama
import tokenizer as llama_tokenizer
from cli import UsageError, run
from data import shards

ROOT = os.path.dirname(os.path.abspath(__file__))
DEMO_DATA = os.path.join(ROOT, "shards", "icd10cm")
DEMO_OUT = os.path.join(ROOT, "out", "demo")
# The demo model: small enough for 2 CPU cores to train in a few minutes, big enough to learn the
# structure of ICD-10-CM entries.
DEMO = dict(dim=256, n_layers=4, n_heads=4, n_kv_heads=2, seq_len=256, batch_size=8, max_steps=800,
            lr=2e-3, eval_every=100, eval_steps=10, save_every=200, sample_prompt="J45 Asthma")
# bf16 dense peak of the GPUs we know, for MFU; other devices print no MFU.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "4090": 165e12}


class TrainingError(RuntimeError):
    """A run that must stop (NaN loss, shards that do not fit the model); printed as one line."""


# -----------------------------------------------------------------------------------------------
# Distributed set-up: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; a plain `python` run is rank 0 of 1.


def setup_distributed(device):
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return rank, world, device


def all_reduce_sum(t, world):
    if world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


# -----------------------------------------------------------------------------------------------
# Schedule, optimizer, checkpoints


def lr_at(step, max_steps, lr, warmup, min_lr_ratio):
    """Linear warmup to lr, then cosine down to lr * min_lr_ratio at max_steps."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model, lr, weight_decay, betas, device):
    params = [p for p in model.parameters() if p.requires_grad]
    # Decay matrices only: norms' gains (and any bias) are not regularised towards zero.
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    fused = device.startswith("cuda")
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused)


def swap_in(tmp_dir, final_dir):
    """Replace final_dir by tmp_dir so that a kill at any moment leaves one complete checkpoint:
    final -> final.old, tmp -> final, drop final.old. find_checkpoint looks at .old too."""
    old = final_dir + ".old"
    if os.path.exists(old):
        shutil.rmtree(old)
    if os.path.exists(final_dir):
        os.rename(final_dir, old)
    os.rename(tmp_dir, final_dir)
    if os.path.exists(old):
        shutil.rmtree(old)


def find_checkpoint(out_dir, kind):
    for name in (kind, kind + ".old"):
        path = os.path.join(out_dir, name)
        if os.path.exists(os.path.join(path, "train_state.pt")):
            return path
    return None


def save_checkpoint(out_dir, kind, raw_model, optimizer, step, loader, config, tokenizer_path):
    final = os.path.join(out_dir, kind)
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    if kind == "adapter":
        import lora

        lora.save_adapter(raw_model, tmp, tokenizer_sha256=config.get("tokenizer_sha256"))
    else:
        llama.save(raw_model, tmp)
    shutil.copy(tokenizer_path, os.path.join(tmp, "tokenizer.model"))
    torch.save({"step": step, "optimizer": optimizer.state_dict(), "loader": loader.state_dict(),
                "config": config}, os.path.join(tmp, "train_state.pt"))
    swap_in(tmp, final)
    return final


# -----------------------------------------------------------------------------------------------
# Logging: stdout line, log.jsonl, mlflow (rank 0 only)


class Logger:
    def __init__(self, out_dir, enabled, use_mlflow, config, resume):
        self.enabled = enabled
        self.mlflow = None
        if not enabled:
            return
        os.makedirs(out_dir, exist_ok=True)
        self.path = os.path.join(out_dir, "log.jsonl")
        if not resume and os.path.exists(self.path):
            os.remove(self.path)
        if use_mlflow:
            try:
                import mlflow  # slow to import; only when asked for

                if not os.environ.get("MLFLOW_TRACKING_URI"):
                    mlflow.set_tracking_uri("sqlite:///mlflow.db")
                mlflow.set_experiment(config.get("mlflow_experiment") or "llama")
                mlflow.start_run(run_name=os.path.basename(os.path.abspath(out_dir)))
                mlflow.log_params({k: str(v)[:250] for k, v in config.items()})
                self.mlflow = mlflow
            except Exception as e:  # tracking is a convenience: never lose a run over it
                print(f"train.py: mlflow disabled ({type(e).__name__}: {e})", file=sys.stderr)

    def step(self, record, line):
        if not self.enabled:
            return
        print(line, flush=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.mlflow:
            metrics = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
            self.mlflow.log_metrics(metrics, step=record["step"])

    def artifact(self, path):
        if self.mlflow and os.path.exists(path):
            (self.mlflow.log_artifacts if os.path.isdir(path) else self.mlflow.log_artifact)(path)

    def close(self):
        if self.mlflow:
            self.mlflow.end_run()


def format_eta(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


# -----------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate(model, loader, steps, world, autocast, doc_mask):
    """Mean validation loss over `steps` batches, weighted by target tokens across all ranks."""
    model.eval()
    loader.reset()
    total = torch.zeros(2, dtype=torch.float64, device=next(model.parameters()).device)
    for _ in range(steps):
        x, y, pos = (t.to(total.device) for t in loader.next_batch())
        with autocast:
            loss_sum = model(x, y, positions=pos if doc_mask else None, reduction="sum")
        total += torch.stack([loss_sum.double(), (y != -100).sum().double()])
    all_reduce_sum(total, world)
    model.train()
    return (total[0] / total[1].clamp(min=1)).item()


# -----------------------------------------------------------------------------------------------
# The run


def build_model(ckpt_dir, data_meta, arch, seq_len, device, lora_cfg):
    """A checkpoint loaded as is, or a fresh model with the vocabulary of the shards."""
    if ckpt_dir:
        # LoRA keeps the frozen base in bf16 on CUDA; full training keeps fp32 master weights.
        dtype = torch.bfloat16 if lora_cfg and device.startswith("cuda") else torch.float32
        m = llama.load(ckpt_dir, device=device, dtype=dtype)
        m.args.max_seq_len = max(m.args.max_seq_len, seq_len)
        m.reset_rope()
    else:
        args = llama.ModelArgs(vocab_size=data_meta["vocab_size"], max_seq_len=seq_len, **arch)
        m = llama.Transformer(args).to(device)
        m.init_weights()
    if lora_cfg:
        import lora

        lora.apply_lora(m, **lora_cfg)
    return m


def main(ckpt_dir: str = None, data: str = None, out_dir: str = None, lora_rank: int = 0,
         lora_alpha: float = None, lora_dropout: float = 0.0, lora_targets: str = "wq,wk,wv,wo,w1,w2,w3",
         rslora: bool = False, max_steps: int = 1000, batch_size: int = 8, seq_len: int = 1024,
         grad_accum: int = 1, lr: float = None, min_lr_ratio: float = 0.1, warmup_steps: int = None,
         weight_decay: float = 0.1, beta1: float = 0.9, beta2: float = 0.95, grad_clip: float = 1.0,
         eval_every: int = 100, eval_steps: int = 20, sample_prompt: str = None, save_every: int = 500,
         resume: bool = False, seed: int = 1337, doc_mask: bool = None, activation_checkpointing: bool = False,
         compile: bool = False, mlflow: bool = True, mlflow_experiment: str = "llama", device: str = None,
         overwrite: bool = False,
         dim: int = 512, n_layers: int = 8, n_heads: int = 8, n_kv_heads: int = None, multiple_of: int = 64,
         ffn_dim_multiplier: float = None, norm_eps: float = 1e-5, rope_theta: float = 10000.0):
    """Train a Llama.

    Args:
        ckpt_dir: a Meta or HF checkpoint to fine-tune; without it a model is trained from scratch,
            sized by --dim --n_layers --n_heads --n_kv_heads --multiple_of --ffn_dim_multiplier --rope_theta.
        data: a directory of token shards (python -m data.prepare). With neither --data nor
            --ckpt_dir: the ICD-10-CM demo.
        out_dir: where logs and checkpoints go (default out/<name of the data directory>).
        lora_rank: > 0 trains LoRA adapters of this rank on a frozen base (needs --ckpt_dir).
        lora_alpha: LoRA scale numerator (default 2 * rank); rslora divides by sqrt(rank), not rank.
        lora_targets: comma-separated projections to adapt.
        max_steps, batch_size, seq_len, grad_accum: optimizer steps; per-rank micro-batch rows,
            tokens per row, micro-steps per optimizer step. Global batch = batch_size * grad_accum * ranks.
        lr: peak learning rate (default 3e-4 from scratch or for LoRA, 2e-5 for a full fine-tune);
            warmup_steps (default 5% of max_steps) then cosine to lr * min_lr_ratio.
        eval_every, eval_steps: validation loss every N steps over this many batches per rank.
        sample_prompt: if given, also print a short greedy sample at each evaluation.
        save_every: checkpoint every N steps (and always at the end and on Ctrl-C).
        resume: continue from the checkpoint in --out_dir exactly where it stopped.
        overwrite: start afresh even though --out_dir holds a checkpoint (the demo always does).
        doc_mask: keep attention inside each document (default: on for instruction/chat shards).
        activation_checkpointing: recompute each layer in backward to save memory.
        compile: torch.compile the model.
        mlflow: log params, metrics and artifacts (store: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db).
    """
    c = SimpleNamespace(**locals())
    c.demo = ckpt_dir is None and data is None
    if c.demo:  # the demo's data and sizes, except where the user set a flag
        given = {a[2:].split("=")[0].replace("-", "_") for a in sys.argv[1:] if a.startswith("--")}
        vars(c).update({k: v for k, v in DEMO.items() if k not in given})
        c.data, c.out_dir, c.overwrite = DEMO_DATA, out_dir or DEMO_OUT, True
    if c.data is None:
        raise UsageError("--data is required with --ckpt_dir (token shards from python -m data.prepare)")
    if c.lora_rank and not c.ckpt_dir:
        raise UsageError("--lora_rank needs --ckpt_dir: LoRA adapts a pretrained model")
    for name in ("max_steps", "batch_size", "seq_len", "grad_accum", "eval_every", "save_every", "eval_steps"):
        if getattr(c, name) < 1:
            raise UsageError(f"--{name} must be at least 1, got {getattr(c, name)}")
    c.out_dir = c.out_dir or os.path.join(ROOT, "out", os.path.basename(os.path.normpath(c.data)))
    c.kind = "adapter" if c.lora_rank else "model"
    if c.lr is None:
        c.lr = 2e-5 if c.ckpt_dir and not c.lora_rank else 3e-4
    if c.warmup_steps is None:
        c.warmup_steps = max(1, c.max_steps // 20)

    if not c.resume and not c.overwrite and find_checkpoint(c.out_dir, c.kind):
        raise UsageError(f"{os.path.join(c.out_dir, c.kind)} holds a checkpoint: --resume to continue it, "
                         f"--overwrite to start afresh, or another --out_dir")

    c.rank, c.world, c.device = setup_distributed(c.device)
    try:
        if c.demo and not os.path.exists(os.path.join(c.data, "meta.json")):
            if c.rank == 0:  # one rank writes the corpus, the others wait for it
                from data import prepare

                print(f"preparing the demo corpus in {c.data} ...", file=sys.stderr)
                prepare.main(["--demo", "--out", c.data])
            if c.world > 1:
                dist.barrier()
        _train(c)
    finally:
        if c.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _train(c):
    master = c.rank == 0
    config = {k: v for k, v in vars(c).items() if isinstance(v, (int, float, str, bool, type(None)))}
    lora_cfg = None
    if c.lora_rank:
        lora_cfg = dict(rank=c.lora_rank, alpha=c.lora_alpha or 2 * c.lora_rank, dropout=c.lora_dropout,
                        targets=tuple(t.strip() for t in c.lora_targets.split(",")), use_rslora=c.rslora)
    arch = dict(dim=c.dim, n_layers=c.n_layers, n_heads=c.n_heads, n_kv_heads=c.n_kv_heads,
                multiple_of=c.multiple_of, ffn_dim_multiplier=c.ffn_dim_multiplier, norm_eps=c.norm_eps,
                rope_theta=c.rope_theta)
    resume_from = None
    if c.resume:
        resume_from = find_checkpoint(c.out_dir, c.kind)
        if resume_from is None:
            raise UsageError(f"--resume: no checkpoint in {os.path.join(c.out_dir, c.kind)}")
    # a full or from-scratch run resumes from its own saved weights: no need to read the base too
    source = resume_from if c.kind == "model" and resume_from else c.ckpt_dir
    torch.manual_seed(c.seed)  # the same initial weights (and LoRA A matrices) on every rank
    # Everything a user can get wrong is checked before the model is read: shards made with another
    # tokenizer than the checkpoint's, corrupt or truncated files, ids beyond the vocabulary.
    tok = llama_tokenizer.load(source or c.data)  # the checkpoint's, or the shards' own copy
    tok_path = tok.path
    data_meta = shards.validate(c.data, vocab_size=tok.n_words, tokenizer_sha256=tok.sha256)
    raw = build_model(source, data_meta, arch, c.seq_len, c.device, lora_cfg)
    if raw.args.vocab_size < tok.n_words:
        raise UsageError(f"{source}: the model has {raw.args.vocab_size} embeddings, its tokenizer {tok.n_words} ids")
    config["tokenizer_sha256"] = tok.sha256
    if c.doc_mask is None:
        c.doc_mask = bool(data_meta.get("has_mask"))  # instruction / chat data
    config["doc_mask"] = c.doc_mask
    raw.activation_checkpointing = c.activation_checkpointing

    train_loader = shards.DataLoader(c.data, "train", c.batch_size, c.seq_len, c.rank, c.world, seed=c.seed)
    val_loader = shards.DataLoader(c.data, "val", c.batch_size, c.seq_len, c.rank, c.world)
    optimizer = make_optimizer(raw, c.lr, c.weight_decay, (c.beta1, c.beta2), c.device)

    start_step = 0
    if resume_from:
        start_step = resume(c, resume_from, raw, optimizer, train_loader)
        if master:
            print(f"resuming from {resume_from} at step {start_step}", file=sys.stderr)

    model = torch.compile(raw) if c.compile else raw
    if c.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        # No buffer sync per step: the only buffer is the RoPE table, the same on every rank (64 MB for
        # Llama 3.1's 131072 positions). torch 2.13 renamed the switch.
        no_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters
                   else {"broadcast_buffers": False})
        model = DDP(model, device_ids=[torch.device(c.device).index] if c.device.startswith("cuda") else None,
                    **no_sync)
    on_cuda = c.device.startswith("cuda")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if on_cuda else nullcontext()

    n_params = sum(p.numel() for p in raw.parameters())
    n_trainable = sum(p.numel() for p in raw.parameters() if p.requires_grad)
    a = raw.args
    # FLOPs per token: 6N for a full step (2N forward, 4N backward); with frozen weights the weight
    # gradients are skipped, 4N. N counts the weights used in matmuls: the embedding is a lookup
    # (unless tied, when it is also the output). Attention adds 12 * layers * heads * head_dim * seq_len.
    n_matmul = n_params - (0 if raw.tied else raw.tok_embeddings.weight.numel())
    flops_per_token = (4 if c.lora_rank else 6) * n_matmul + 12 * a.n_layers * a.n_heads * a.head_dim * c.seq_len
    peak = next((v for k, v in PEAK_FLOPS.items() if on_cuda and k in torch.cuda.get_device_name(c.device)), None)
    logger = Logger(c.out_dir, master, c.mlflow, config, c.resume)
    if master:
        what = "LoRA" if c.lora_rank else "full fine-tune" if c.ckpt_dir else "from scratch"
        print(f"{what}: {n_params / 1e6:.1f}M parameters, {n_trainable / 1e6:.2f}M trained; {c.world} rank(s) on "
              f"{c.device}; global batch {c.batch_size * c.grad_accum * c.world} x {c.seq_len} tokens; "
              f"doc_mask {c.doc_mask}; writing {c.out_dir}", file=sys.stderr)

    # Ctrl-C (or a scheduler's SIGTERM): finish the step in flight, save, exit.
    interrupted = []
    previous = {sig: signal.signal(sig, lambda *_: interrupted.append(True)) for sig in (signal.SIGINT, signal.SIGTERM)}
    step, last_saved, t_start = start_step, start_step, time.time()
    step_tokens = c.batch_size * c.seq_len * c.grad_accum * c.world
    raw.train()
    try:
        while step < c.max_steps:
            t0 = time.time()
            lr_now = lr_at(step, c.max_steps, c.lr, c.warmup_steps, c.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr_now
            # Dropout draws from a generator seeded by (seed, rank, step): a resumed run, on any
            # number of ranks, draws exactly what an uninterrupted one would.
            torch.manual_seed(hash((c.seed, c.rank, step)) & 0xFFFF_FFFF)
            loss_value, n_targets = train_step(c, model, train_loader, autocast, interrupted)
            if loss_value is None:  # some rank got the signal; all stop here
                interrupted.append(True)
                break
            trainable = [p for p in raw.parameters() if p.requires_grad]
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, c.grad_clip if c.grad_clip > 0 else float("inf"))
            check_finite(c, step + 1, loss=loss_value, grad_norm=grad_norm.item())
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1

            if on_cuda:
                torch.cuda.synchronize()
            tok_s = step_tokens / (time.time() - t0)
            record = {"step": step, "loss": round(loss_value, 6), "lr": lr_now, "tokens": step * step_tokens,
                      "target_tokens": int(n_targets), "grad_norm": round(grad_norm.item(), 4),
                      "tokens_per_s": round(tok_s, 1)}
            line = (f"step {step}/{c.max_steps} | loss {loss_value:.4f} | lr {lr_now:.2e} | "
                    f"grad {grad_norm.item():.3f} | {tok_s:,.0f} tok/s")
            if peak:
                record["mfu"] = round(flops_per_token * tok_s / c.world / peak, 4)
                line += f" | MFU {100 * record['mfu']:.1f}%"
            eta = (time.time() - t_start) / (step - start_step) * (c.max_steps - step)
            line += f" | ETA {format_eta(eta)}"
            if step % c.eval_every == 0 or step == c.max_steps:
                val = evaluate(model, val_loader, c.eval_steps, c.world, autocast, c.doc_mask)
                record.update(val_loss=round(val, 6), val_ppl=round(math.exp(min(val, 50)), 3))
                line += f" | val {val:.4f} ppl {record['val_ppl']:.2f}"
                if c.sample_prompt and master:
                    line += "\n  sample: " + sample(raw, tok, c.sample_prompt)
            logger.step(record, line)
            if step % c.save_every == 0 and step < c.max_steps:
                check_finite(c, step, weights=all(bool(torch.isfinite(p).all()) for p in trainable))
                if master:
                    save_checkpoint(c.out_dir, c.kind, raw, optimizer, step, train_loader, config, tok_path)
                last_saved = step
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if step > last_saved or step == 0:
        check_finite(c, step, weights=all(bool(torch.isfinite(p).all()) for p in raw.parameters()))
    if master and (step > last_saved or step == 0):
        path = save_checkpoint(c.out_dir, c.kind, raw, optimizer, step, train_loader, config, tok_path)
        print(f"saved {path} at step {step}", file=sys.stderr)
        logger.artifact(os.path.join(c.out_dir, "log.jsonl"))
        if c.kind == "adapter":
            logger.artifact(path)
    logger.close()
    if c.world > 1:
        dist.barrier()  # rank 0 may still be saving: leave together, not while a peer is mid-collective
    if interrupted:
        if master:
            print(f"train.py: interrupted at step {step}; continue with --resume", file=sys.stderr)
        sys.exit(130)


def check_finite(c, step, **values):
    """Stop a diverged run before it overwrites the last good checkpoint."""
    for name, value in values.items():
        if value is False or (not isinstance(value, bool) and not math.isfinite(value)):
            what = f"{name} is {value}" if not isinstance(value, bool) else f"{name} are not finite"
            raise TrainingError(f"{what} at step {step}; stopped without saving. The last good checkpoint is in "
                                f"{os.path.join(c.out_dir, c.kind)} (try a lower --lr)")


def train_step(c, model, loader, autocast, interrupted=False):
    """Forward and backward over grad_accum micro-batches; returns (mean loss, target tokens) of the
    global batch, gradients left in .grad, already normalised. Returns (None, None), the loader
    rewound, if any rank has been interrupted: all ranks then stop at the same step."""
    position = loader.state_dict()
    batches = [loader.next_batch() for _ in range(c.grad_accum)]
    # Normalise by the target tokens of the whole step on all ranks, so masked batches with
    # different counts weigh every token equally (a mean of per-batch means would not). The same
    # all-reduce tells every rank whether one of them got Ctrl-C.
    count = sum(int((b.targets != -100).sum()) for b in batches)
    totals = torch.tensor([count, float(bool(interrupted))], dtype=torch.float64)
    n_targets, n_interrupted = all_reduce_sum(totals.to(c.device), c.world).tolist()
    if n_interrupted:
        loader.load_state_dict(position)  # these sequences were not trained on: resume starts here
        return None, None
    loss_sum = torch.zeros((), device=c.device, dtype=torch.float64)
    for i, (x, y, pos) in enumerate(batches):
        x, y, pos = x.to(c.device), y.to(c.device), pos.to(c.device)
        # DDP all-reduces on every backward unless told not to: only the last micro-step syncs.
        sync = nullcontext() if c.world == 1 or i == c.grad_accum - 1 else model.no_sync()
        with sync:
            with autocast:
                loss = model(x, y, positions=pos if c.doc_mask else None, reduction="sum")
            # DDP averages gradients over ranks; scaling by world turns that into a sum.
            (loss * (c.world / max(n_targets, 1))).backward()
        loss_sum += loss.detach().double()
    return all_reduce_sum(loss_sum, c.world).item() / max(n_targets, 1), n_targets


def resume(c, path, raw, optimizer, train_loader):
    """Restore optimizer and loader position (and a LoRA run's adapter; a full run's weights were
    loaded from the checkpoint already); returns the step to continue from. There is no RNG state
    to restore: each step seeds from (seed, rank, step), which the config and the step determine."""
    state = torch.load(os.path.join(path, "train_state.pt"), map_location=c.device, weights_only=True)
    if c.kind == "adapter":
        import lora

        lora.load_adapter(raw, path)
    optimizer.load_state_dict(state["optimizer"])
    train_loader.load_state_dict(state["loader"])
    return state["step"]


def sample(raw, tok, prompt, max_new_tokens=48):
    from generate import completion_text, generate

    prompt_ids = tok.encode(prompt, bos=True, eos=False)
    ids = generate(raw, [prompt_ids], max_new_tokens, temperature=0, stop_ids=tok.stop_ids)[0]
    raw.train()
    return (prompt + completion_text(tok, prompt_ids, ids)).replace("\n", " / ")


if __name__ == "__main__":
    try:
        run(main, prog="train.py")
    except TrainingError as e:
        print(f"train.py: {e}", file=sys.stderr)
        sys.exit(1)
