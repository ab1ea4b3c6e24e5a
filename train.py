"""Train a Llama: from scratch, full fine-tune or LoRA, on one process or many (torchrun DDP, or
FSDP2 with --fsdp: fsdp.py).

    python train.py                                   # the demo: a small Llama on ICD-10-CM, CPU, minutes
    python train.py --data shards/notes --dim 512 --n_layers 8 --n_heads 8       # from scratch
    torchrun --nproc_per_node 8 train.py --ckpt_dir ~/llama/Llama3.1-8B --data shards/notes --lora_rank 16

What it writes to --out_dir:
    log.jsonl            one JSON line per optimizer step (rank 0)
    model/               full or from-scratch runs: a Meta checkpoint (generate.py --ckpt_dir OUT/model)
    adapter/             LoRA runs: the adapter (generate.py --ckpt_dir BASE --adapter OUT/adapter)
    best/                --keep_best METRIC: the checkpoint with the best validation value so far
    .lock                held by the running process: one run per --out_dir
Both model/ and adapter/ also hold the tokenizer (tokenizer.model, or tokenizer.json where the run's
tokenizer is one) and train_state.pt (optimizer, step, loader
position, config, how long log.jsonl was), so --resume continues exactly (randomness is seeded per
step from --seed, rank and step, so there is no RNG state to carry).

Reading guide, top to bottom:
    TrainConfig          every flag, its default and its meaning; the demo's settings
    set-up               the out_dir lock, torchrun, the model and the data, the optimizer
    --head               a classification or tag head: the head on the model (adapt), HeadLoss (its loss
                         through DDP), its validation metrics gathered from every rank, --keep_best, --epochs
    one step             train_step: forward/backward over the micro-batches, DDP, token (or document) weighting
    checkpoints          save_checkpoint (one atomic.write_dir call) and restore_checkpoint
    logging              the step line, log.jsonl, mlflow; FLOPs and MFU
    the run              main -> set_up -> loop -> finish
"""

import errno
import fcntl
import inspect
import json
import math
import os
import signal
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import atomic
import checkpoint
import cli
import common
import fsdp
import generate
import heads
import lora
import tagging
import tasks
import tokenizer
from model import PROJECTIONS, ModelArgs, Transformer, nf4_projections
from cli import Check, UsageError, UserError, at_least, interval, non_empty, one_of, positive, torch_device
from data import prepare, shards

ROOT = os.path.dirname(os.path.abspath(__file__))
DEMO_DATA = os.path.join(ROOT, "shards", "icd10cm")
DEMO_OUT = os.path.join(ROOT, "out", "demo")
ADAMW_BETAS = (0.9, 0.95)


class TrainingError(UserError):
    """A run that cannot go on (NaN loss, --out_dir in use by another run); printed as one line."""


# -----------------------------------------------------------------------------------------------
# The configuration: one field per flag

LORA_TARGETS = Check(lambda v: 0 < len({t.strip() for t in v.split(",")}) and
                     {t.strip() for t in v.split(",")} <= set(PROJECTIONS),
                     f"comma-separated names from {', '.join(PROJECTIONS)}")


def flag(default, meaning, check=None):
    """A TrainConfig field that is a command-line flag; `meaning` is its line in --help, `check` the
    range cli enforces before any work (the type comes from the annotation)."""
    return field(default=default, metadata={"help": meaning, "check": check})


@dataclass
class TrainConfig:
    """Everything a run is told: one field per flag of train.py, its default beside its meaning.
    Flags that default to None take their value from other flags (__post_init__); `python train.py`
    alone starts from the DEMO preset instead (main)."""
    # what to train, on what, and where
    ckpt_dir: str = flag(None, "a Meta or HF checkpoint to fine-tune; without it a model is trained from scratch",
                         non_empty)
    data: str = flag(None, "token shards (python -m data.prepare); with neither --data nor --ckpt_dir: the demo",
                     non_empty)
    tokenizer: str = flag(None, "a tokenizer file (tokenizer.model or tokenizer.json) to use instead of the one "
                                "in --ckpt_dir (or, from scratch, the shards' copy)", non_empty)
    out_dir: str = flag(None, "logs and checkpoints (default out/<the data directory's name>; the demo out/demo)",
                        non_empty)
    # LoRA: adapters on a frozen base
    lora_rank: int = flag(0, "> 0 trains LoRA adapters of this rank on the frozen --ckpt_dir", at_least(0))
    lora_alpha: float = flag(None, "LoRA scale numerator (default 2 * lora_rank)", positive)
    lora_dropout: float = flag(0.0, "dropout on the LoRA branch's input", interval("[0, 1)"))
    lora_targets: str = flag(",".join(PROJECTIONS), "comma-separated projections to adapt", LORA_TARGETS)
    rslora: bool = flag(False, "scale LoRA by alpha / sqrt(rank) instead of alpha / rank")
    base_adapter: str = flag(None, "a LoRA adapter (say, a domain adapter trained on notes) merged into --ckpt_dir "
                                   "as it loads: the run trains on base + it; a LoRA run's adapter records the chain",
                             non_empty)
    quantize: str = flag(None, "nf4 holds the frozen base's projections in 4-bit NF4 (QLoRA; needs --lora_rank)",
                         one_of("nf4"))
    # a classification head (heads.py): labels from labelled shards instead of the next token
    head: str = flag(None, "classify trains a classification head on labelled shards (python -m data.prepare with "
                           "labels), pooled at each document's last token; tag a tag head on tagged shards (tokens "
                           "and tags, or CoNLL), one prediction per word", one_of("classify", "tag"))
    class_weights: str = flag(None, "balanced weighs each class n / (K * count) by the train split's label counts "
                                    "(--head; tag: the words of each tag)", one_of("balanced"))
    focal_gamma: float = flag(0.0, "focal loss exponent (--head; 0: plain cross-entropy or BCE)", at_least(0))
    focal_alpha: float = flag(None, "focal loss weight of the positive class (--head, binary or multilabel)",
                              interval("[0, 1]"))
    keep_best: str = flag(None, "also keep OUT_DIR/best, the checkpoint with the best validation METRIC so far "
                                "(--head; --resume still continues the latest): val_loss (lowest), or a metric of the "
                                "head's task (highest; the val_ prefix optional): binary accuracy, f1, auroc, auprc; "
                                "multiclass accuracy, macro_f1, auroc, auroc_ovo; multilabel macro_auroc, "
                                "micro_auroc, macro_f1, micro_f1, precision_at_5; tag f1, precision, recall, "
                                "f1_strict, token_accuracy", non_empty)
    # the batch and the schedule
    max_steps: int = flag(1000, "optimizer steps", positive)
    epochs: int = flag(None, "passes over the training data instead of --max_steps: max_steps becomes "
                             "ceil(epochs * rows of one epoch / global batch)", positive)
    batch_size: int = flag(8, "rows per micro-batch per rank; the global batch is batch_size * grad_accum * ranks",
                           positive)
    seq_len: int = flag(1024, "tokens per row", positive)
    grad_accum: int = flag(1, "micro-steps per optimizer step", positive)
    lr: float = flag(None, "peak learning rate (default 3e-4 from scratch or LoRA, 2e-5 full fine-tune)",
                     positive)
    warmup_steps: int = flag(None, "linear warmup steps (default 5% of max_steps), then cosine", at_least(0))
    min_lr_ratio: float = flag(0.1, "the cosine ends at lr * min_lr_ratio", interval("[0, 1]"))
    weight_decay: float = flag(0.1, "AdamW weight decay, on matrices only", at_least(0))
    grad_clip: float = flag(1.0, "clip the gradient norm to this (0: no clipping)", at_least(0))
    # evaluation, logging, checkpoints
    eval_every: int = flag(100, "validation loss and perplexity (--head: and the task's metrics) every N steps, "
                                "and at the end", positive)
    eval_steps: int = flag(20, "validation batches per rank (--head: every val document, always)", positive)
    sample_prompt: str = flag(None, "also print a short greedy sample from this prompt at each evaluation")
    eval_task: str = flag(None, "also score an eval.py task at each evaluation: choice, classify, rank, generate, "
                          "perplexity (metrics go to log.jsonl and mlflow as eval_*)",
                          cli.one_of(*tasks.NAMES))
    eval_data: str = flag(None, "the records for --eval_task (eval.py's JSONL formats)", non_empty)
    log_every: int = flag(1, "print a step line every N steps; log.jsonl has every step",
                          positive)
    save_every: int = flag(500, "checkpoint every N steps, at the end and on Ctrl-C",
                           positive)
    resume: bool = flag(False, "continue the checkpoint in --out_dir exactly where it stopped")
    resume_with_changes: bool = flag(False, "let --resume continue with changed schedule or LoRA flags or another "
                                            "global batch (each change is logged); --batch_size, --grad_accum "
                                            "and the number of ranks may change freely if their product stays")
    overwrite: bool = flag(False, "start afresh even though --out_dir holds a checkpoint (the demo always does)")
    mlflow: bool = flag(True, "track params, metrics, artifacts ($MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    mlflow_experiment: str = flag("llama", "the mlflow experiment's name", non_empty)
    # how the run computes
    seed: int = flag(1337, "initial weights, data order and dropout all derive from it", at_least(0))
    device: str = flag(None, "default cuda:LOCAL_RANK where CUDA is available, else cpu", torch_device)
    doc_mask: bool = flag(None, "keep attention inside each document (default: on for instruction/chat shards)")
    activation_checkpointing: bool = flag(False, "recompute each layer in backward to save memory")
    compile: bool = flag(False, "torch.compile the model")
    fsdp: bool = flag(False, "shard weights, gradients and optimizer state over the ranks (FSDP2, fsdp.py), for "
                             "models whose training state does not fit one GPU; under torchrun, or one process")
    # the shape of a model trained from scratch (model.ModelArgs)
    dim: int = flag(512, "model width", positive)
    n_layers: int = flag(8, "transformer blocks", positive)
    n_heads: int = flag(8, "attention heads", positive)
    n_kv_heads: int = flag(None, "key/value heads, for grouped-query attention (default n_heads)", positive)
    multiple_of: int = flag(64, "the SwiGLU hidden size is rounded up to a multiple of this", positive)
    ffn_dim_multiplier: float = flag(None, "scales the SwiGLU hidden size (Llama 3: 1.3 or 1.5)", positive)
    norm_eps: float = flag(1e-5, "RMSNorm epsilon", positive)
    rope_theta: float = flag(10000.0, "RoPE base frequency", positive)
    # Not flags: where this process runs (set by setup_distributed) and whether this is the demo.
    rank: int = field(default=0, init=False)
    world: int = field(default=1, init=False)
    demo: bool = field(default=False, init=False)
    default_warmup: bool = field(default=False, init=False)  # warmup_steps follows max_steps (--epochs sets it)

    def __post_init__(self):
        self.demo = self.ckpt_dir is None and self.data is None
        if self.demo:  # the demo's corpus and sizes, except where a flag says otherwise
            self.data, self.overwrite = DEMO_DATA, True
            self.out_dir = DEMO_OUT if self.out_dir is None else self.out_dir
        if self.lr is None:
            self.lr = 2e-5 if self.ckpt_dir and not self.lora_rank else 3e-4
        if self.warmup_steps is None:
            self.warmup_steps, self.default_warmup = max(1, self.max_steps // 20), True
        if self.epochs and "max_steps" in cli.given_flags():
            raise UsageError("--epochs and --max_steps: give one (--epochs sets max_steps from the data)")
        if self.data is None:
            raise UsageError("--data is required with --ckpt_dir (token shards from python -m data.prepare)")
        if self.ckpt_dir and not os.path.isdir(atomic.readable(self.ckpt_dir)):
            raise UserError(f"--ckpt_dir {self.ckpt_dir}: no such checkpoint directory")
        if not self.demo:  # before anything is written: a wrong --data is named as such
            if not os.path.isdir(atomic.readable(self.data)):
                raise UserError(f"--data {self.data}: no such directory (token shards from python -m data.prepare)")
            meta = shards.load_meta(self.data)
        self.check_head_flags(None if self.demo else meta)
        if self.lora_rank and not self.ckpt_dir:
            raise UsageError("--lora_rank needs --ckpt_dir: LoRA adapts a pretrained model")
        if self.quantize and not self.lora_rank:
            raise UsageError("--quantize needs --lora_rank: only a frozen base can be held in NF4")
        if self.base_adapter:
            self.check_base_adapter()
        if self.fsdp and self.eval_task:  # (before its records are looked for: they could not be used)
            raise UsageError("--eval_task cannot run under --fsdp (its ranks score unequal shares of the records, "
                             "a sharded model needs all of them in step); run eval.py on the saved checkpoint")
        tasks.check_training_flags(self.eval_task, self.eval_data)
        self.out_dir = self.out_dir or os.path.join(ROOT, "out", os.path.basename(os.path.normpath(self.data)))
        # what a run writes in --out_dir never replaces what it reads, nor goes through a link
        atomic.check_outputs([("--out_dir", os.path.join(self.out_dir, name)) for name in (self.checkpoint_name, "best", "log.jsonl", ".lock")],
                             {"--ckpt_dir": self.ckpt_dir, "--data": self.data, "--eval_data": self.eval_data,
                              "--tokenizer": self.tokenizer, "--base_adapter": self.base_adapter},
                             checkpoint.INPUT_FILES + shards.SHARD_FILES)

    def check_base_adapter(self):
        """--base_adapter: on a --ckpt_dir, not under --fsdp, an adapter directory (made absolute: the
        adapter this run writes records where it is)."""
        if not self.ckpt_dir:
            raise UsageError("--base_adapter needs --ckpt_dir: the base it is merged into")
        if self.fsdp:
            raise UsageError("--base_adapter: not yet with --fsdp (merge it first: python lora.py merge)")
        self.base_adapter = os.path.abspath(os.path.expanduser(self.base_adapter))
        lora.read_adapter_config(self.base_adapter)  # a wrong path fails before the base is loaded

    def check_head_flags(self, meta):
        """--head and the flags that only it reads; meta: the shards' (None for the demo)."""
        if self.head is None:
            given = [f"--{name}" for name in ("class_weights", "focal_alpha", "keep_best") if getattr(self, name)]
            if given or self.focal_gamma:
                raise UsageError(f"{(given or ['--focal_gamma'])[0]} needs --head classify or --head tag")
            return
        if self.fsdp and self.keep_best:  # every rank must take part in a sharded save; keep_if_best is rank 0's
            raise UsageError("--keep_best: not yet with --fsdp")
        if self.head == "tag" and self.focal_alpha is not None:
            raise UsageError("--focal_alpha weighs a binary or multilabel head's positive class; for tags use "
                             "--class_weights balanced")
        tagged, labelled = bool(meta and meta.get("has_tags")), bool(meta and meta.get("labels"))
        if self.head == "tag" and not tagged:
            raise UserError(f"--head tag: --data {self.data} holds no tags (python -m data.prepare tagged records: "
                            f"JSONL tokens/tags, or CoNLL)" + ("; its labels are for --head classify" if labelled else ""))
        if self.head == "classify" and not labelled:
            raise UserError(f"--head classify: --data {self.data} holds no labels (python -m data.prepare labelled "
                            f"records: JSONL label/labels, or --label_column)" +
                            ("; its tags are for --head tag" if tagged else ""))
        if self.keep_best:
            self.keep_best = best_metric(self.keep_best, *head_labels(self, meta), kind=self.head)

    @property
    def lora_target_names(self):
        return tuple(name.strip() for name in self.lora_targets.split(","))

    @property
    def checkpoint_name(self):
        """What a checkpoint of this run holds, and the name of its directory in out_dir."""
        return "adapter" if self.lora_rank else "model"


# `python train.py` with neither --data nor --ckpt_dir: the demo, whose preset stands in for the
# defaults of the flags not given. Its model is small enough for 2 CPU cores to train in a few
# minutes, big enough to learn the structure of ICD-10-CM entries; it prints about 40 step lines.
DEMO = dict(dim=256, n_layers=4, n_heads=4, n_kv_heads=2, seq_len=256, max_steps=800, lr=2e-3,
            eval_steps=10, save_every=200, log_every=20, sample_prompt="J45 Asthma")


# -----------------------------------------------------------------------------------------------
# Set-up: one run per out_dir, torchrun, the model and the data, the optimizer


@contextmanager
def claim_out_dir(cfg):
    """Rank 0 holds OUT_DIR/.lock for the whole run (the kernel lets go if the process dies), so two
    runs never write the same checkpoint. Under the lock it finishes a checkpoint swap that a crash
    interrupted, and refuses to start afresh over a checkpoint without --resume or --overwrite."""
    os.makedirs(cfg.out_dir, exist_ok=True)
    path = os.path.join(cfg.out_dir, ".lock")
    fd = atomic.open_own(path, os.O_RDWR | os.O_CREAT)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise TrainingError(f"{cfg.out_dir} is in use by another run (PID {holder}); wait for it to "
                                f"finish or choose another --out_dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        atomic.recover(checkpoint_dir(cfg))
        atomic.recover(os.path.join(cfg.out_dir, "best"))
        if not cfg.resume and not cfg.overwrite and has_checkpoint(cfg):
            raise UserError(f"{checkpoint_dir(cfg)} holds a checkpoint: --resume to continue it, "
                             f"--overwrite to start afresh, or another --out_dir")
        yield
    finally:
        os.close(fd)  # closing releases the lock


def setup_distributed(cfg):
    """Where this process runs (common.py): torchrun's rank of world, or 0 of 1; FSDP2 shards over a
    process group, so --fsdp without torchrun gets a group of its own."""
    cfg.rank, cfg.world, cfg.device = common.setup_distributed(cfg.device, group_of_one=cfg.fsdp)


def all_reduce_sum(t, world):
    if world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def prepare_demo_corpus(cfg):
    if not os.path.exists(os.path.join(cfg.data, "meta.json")):
        if cfg.rank == 0:  # one rank writes the corpus, the others wait for it
            print(f"preparing the demo corpus in {cfg.data} ...", file=sys.stderr)
            prepare.main(["--demo", "--out", cfg.data])
        if cfg.world > 1:
            dist.barrier()


def load_model_and_data(cfg, resume_from):
    """(model, tokenizer, shard metadata). Everything a user can get wrong is checked before the
    model is read: shards made with another tokenizer than the checkpoint's, corrupt or truncated
    files, ids beyond the vocabulary."""
    # a full or from-scratch run resumes from its own saved weights: no need to read the base too
    source = resume_from if resume_from and not cfg.lora_rank else cfg.ckpt_dir
    try:  # --tokenizer, the checkpoint's, or the shards' own copy
        tok = tokenizer.load(cfg.tokenizer or source or cfg.data)
    except tokenizer.TokenizerError as e:
        raise UserError(f"--tokenizer: {e}" if cfg.tokenizer else str(e)) from None
    data_meta = shards.validate(cfg.data, vocab_size=tok.n_words, tokenizer=tok)
    torch.manual_seed(cfg.seed)  # the same initial weights (and LoRA A matrices) on every rank
    if cfg.fsdp:  # built on the meta device, sharded, then each rank reads only its rows (fsdp.py)
        dtype = torch.bfloat16 if cfg.lora_rank and cfg.device.startswith("cuda") else torch.float32
        model = fsdp.load(None if source else scratch_args(cfg, data_meta), source, cfg.device, dtype, seed=cfg.seed,
                          adapt=lambda bare: adapt(cfg, bare, data_meta, source), quantize=cfg.quantize)
        model.extend_context(cfg.seq_len)
        if source:
            tokenizer.check_fits(tok, model.args.vocab_size, source)
    elif source:
        # LoRA keeps the frozen base in bf16 on CUDA; full training keeps fp32 master weights.
        dtype = torch.bfloat16 if cfg.lora_rank and cfg.device.startswith("cuda") else torch.float32
        chained = cfg.base_adapter and source == cfg.ckpt_dir  # a full run resumes from weights merged already
        # --base_adapter merges into the full-precision weights: NF4 (--quantize) comes after it
        model = checkpoint.load(source, device=cfg.device, dtype=dtype, quantize=None if chained else cfg.quantize)
        model.extend_context(cfg.seq_len)
        tokenizer.check_fits(tok, model.args.vocab_size, source)
        if chained:
            lora.merge_base_adapter(model, cfg.base_adapter, tok)
            if cfg.quantize:
                nf4_projections(model)
    else:
        model = Transformer(scratch_args(cfg, data_meta)).to(cfg.device)
        torch.manual_seed(cfg.seed)  # init_weights' draws do not depend on how the model was built
        model.init_weights()
    if not cfg.fsdp:
        adapt(cfg, model, data_meta, source)
    model.activation_checkpointing = cfg.activation_checkpointing
    return model, tok, data_meta


def scratch_args(cfg, data_meta):
    """The shape of a model trained from scratch: the ModelArgs flags, the shards' vocabulary."""
    shape = {k: getattr(cfg, k) for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "multiple_of",
                                          "ffn_dim_multiplier", "norm_eps", "rope_theta")}
    return ModelArgs(vocab_size=data_meta["vocab_size"], max_seq_len=cfg.seq_len, **shape)


def adapt(cfg, model, data_meta, source):
    """What the run trains, added to the loaded model: --head's head (fit_head), --lora_rank's
    adapters, the head trained beside them. Under --fsdp on the meta device, before sharding
    (fsdp.load), so that FSDP shards the head and the adapters as it shards the rest."""
    if cfg.head:
        fit_head(cfg, model, data_meta, source)
    add_lora(cfg, model)
    if cfg.head:
        train_head_beside(cfg, model)


def add_lora(cfg, model):
    """--lora_rank's adapters on model (nothing without it)."""
    if cfg.lora_rank:
        lora.apply_lora(model, rank=cfg.lora_rank, alpha=cfg.lora_alpha or 2 * cfg.lora_rank,
                        dropout=cfg.lora_dropout, targets=cfg.lora_target_names,
                        use_rslora=cfg.rslora)


def for_training(cfg, model):
    """What the loop calls: the model, compiled if asked, wrapped in DDP under torchrun (under --fsdp
    model is sharded already)."""
    wrapped = torch.compile(model) if cfg.compile else model
    if cfg.world > 1 and not cfg.fsdp:
        # No buffer sync per step: the only buffer is the RoPE table, the same on every rank (64 MB for
        # Llama 3.1's 131072 positions). torch 2.13 renamed the switch.
        no_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters
                   else {"broadcast_buffers": False})
        wrapped = DDP(wrapped, device_ids=[torch.device(cfg.device).index] if cfg.device.startswith("cuda") else None,
                      **no_sync)
    return wrapped


def make_optimizer(model, lr, weight_decay, betas=ADAMW_BETAS, device="cpu"):
    params = [p for p in model.parameters() if p.requires_grad]
    # Decay matrices only: norms' gains (and any bias) are not regularised towards zero.
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    fused = device.startswith("cuda")
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused)


def lr_at(step, cfg):
    """Linear warmup to lr, then cosine down to lr * min_lr_ratio at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


# -----------------------------------------------------------------------------------------------
# --head classify|tag: the head on the model, its loss through DDP, its validation (the loss, and the
# task's metrics over every rank's documents or sentences, gathered), --keep_best's metric, --epochs


def fit_head(cfg, model, meta, source):
    """The head for the shards' labels: a fresh one (heads.attach_head: zeros) on a pretrained or
    from-scratch model, or the one a resumed full run (or a head --ckpt_dir) has, if it is for the
    same labels. A LoRA run's head comes back on resume with its adapter (lora.load_adapter)."""
    labels, multilabel = head_labels(cfg, meta)
    if model.args.n_labels == 0:
        heads.attach_head(model, len(labels), multilabel, labels, pad_id=meta["eos_id"], kind=cfg.head)  # the loader's pad_id
    elif (model.args.labels, model.args.multilabel, model.args.head_kind) != (labels, multilabel, cfg.head):
        raise UserError(f"{source}: its {model.args.head_kind} head is for labels {list(model.args.labels or [])[:8]} "
                        f"(multilabel {model.args.multilabel}); --head {cfg.head} on --data {cfg.data} has "
                        f"{list(labels)[:8]} (multilabel {multilabel})")


def head_labels(cfg, meta):
    """(labels, multilabel) of --head's task: the shards' labels, or their tags (one per word)."""
    if cfg.head == "tag":
        return tuple(meta["tags"]), False
    return tuple(meta["labels"]), bool(meta["multilabel"])


def best_metric(name, labels, multilabel, kind="classify"):
    """--keep_best's log.jsonl key ("val_loss", "val_auroc", ...) for name, with or without val_,
    if the head's task (head_labels: binary, multiclass or multilabel; kind "tag": tags) has that metric."""
    names = [m for m in heads.metric_names(len(labels), multilabel, kind=kind) if m != "labels_skipped"]  # a count
    bare = name[len("val_"):] if name.startswith("val_") else name
    if bare not in ["loss", *names]:
        task = "tag" if kind == "tag" else "multilabel" if multilabel else "binary" if len(labels) == 2 else "multiclass"
        raise UsageError(f"--keep_best {name}: not a validation metric of this {task} head (--data's labels); "
                         f"choose val_loss or one of {', '.join(names)}")
    return "val_" + bare


def train_head_beside(cfg, model):
    """The head trains in full, beside LoRA's adapters (peft's modules_to_save) or the whole model.
    An untied LM output projection gets no gradient from the head's loss: it is frozen, since DDP
    refuses a trainable parameter that the loss does not reach (and the LM head stays as it was)."""
    for p in model.score.parameters():  # a tag head's bias too
        p.requires_grad_(True)
    if not model.tied:
        model.output.weight.requires_grad_(False)


class HeadLoss(torch.nn.Module):
    """--head's training forward: the pooled logits of a LabelledLoader batch and their loss,
    summed over its documents (heads.loss_sum; train_step divides by the global batch's
    heads.loss_normaliser, so the step's loss is the mean over the whole global batch, class
    weights included, for any number of ranks and micro-steps). A tag head (tag=True): the
    logits of a TaggedLoader batch's every token, the loss summed over the tokens that carry a
    tag (tagged: the others' targets are IGNORE_INDEX), as heads.tag_loss. DDP syncs the
    gradients of what its module's forward computes, so the loss must be this module's forward
    (DDP(HeadLoss(model))), not model.classify called beside the wrapper. Under --fsdp the model is
    sharded already (classify has FSDP's hooks, fsdp.shard) and HeadLoss is not wrapped: it passes
    train_step's gradient-sync switch on to the model."""

    def __init__(self, model, multilabel, class_weights=None, focal_gamma=0.0, focal_alpha=None, tag=False):
        super().__init__()
        self.model, self.multilabel, self.class_weights, self.tag = model, multilabel, class_weights, tag
        self.focal_gamma, self.focal_alpha = focal_gamma, focal_alpha
        if hasattr(model, "set_requires_gradient_sync"):  # --fsdp: train_step's switch reaches the model
            self.set_requires_gradient_sync = model.set_requires_gradient_sync

    def logits(self, inputs, positions, valid):
        """(n_docs, n_labels): classify pools each packed document, and also the padding that ends
        a row (the loader makes it a document of its own, positions from 0): dropped here. A tag
        head: (B, T, n_labels), every token's (positions keep packed sentences apart)."""
        if self.tag:
            return self.model.tag(inputs, positions)
        starts = positions == 0
        starts[:, 0] = True
        return self.model.classify(inputs, positions)[valid[starts]]

    def loss_sum(self, logits, labels):
        return heads.loss_sum(logits, labels, self.multilabel, self.class_weights, self.focal_gamma, self.focal_alpha)

    def normaliser(self, labels):
        """What this batch adds to the divisor of the global batch's loss (heads.loss_normaliser)."""
        if self.tag:
            labels = labels[labels != shards.IGNORE_INDEX]
        return float(heads.loss_normaliser(labels, self.multilabel, self.class_weights, self.focal_alpha))

    def forward(self, inputs, positions, valid, labels):
        logits = self.logits(inputs, positions, valid)
        if self.tag:
            logits, labels = tagged(logits, labels)
        return self.loss_sum(logits, labels)


def tagged(logits, targets):
    """(logits (n, K), targets (n,)) of the tokens that carry a tag."""
    keep = targets != shards.IGNORE_INDEX
    return logits[keep], targets[keep]


def head_targets(cfg, batch):
    """What a --head batch's loss is against: a LabelBatch's labels, a TagBatch's per-token targets."""
    return batch.targets if cfg.head == "tag" else batch.labels


def head_loss_module(cfg, model, train_loader):
    weights = None
    if cfg.class_weights == "balanced":  # from meta.json's train label counts (tags: words of each tag)
        meta = shards.load_meta(cfg.data)
        counts = meta["tag_counts" if cfg.head == "tag" else "label_counts"]["train"]
        weights = heads.balanced_class_weights(counts, train_loader.n_documents, model.args.multilabel).to(cfg.device)
    return HeadLoss(model, model.args.multilabel, weights, cfg.focal_gamma, cfg.focal_alpha, tag=cfg.head == "tag")


@torch.no_grad()
def evaluate_head(cfg, head_loss, loader, autocast):
    """One pass over the val split's documents, all ranks together: (val_loss, metrics). val_loss is
    the mean loss over all of them, as training's (heads.loss_sum / loss_normaliser; a tag head's
    over their tagged words); metrics {"val_<name>": value} the task's (val_metrics), on rank 0 ({}
    on the others)."""
    head_loss.eval()
    logits, labels, documents = (tag_val_logits if head_loss.tag else val_logits)(cfg, head_loss, loader, autocast)
    totals = torch.tensor([head_loss.loss_sum(logits, labels).item(), head_loss.normaliser(labels)],
                          dtype=torch.float64, device=cfg.device)
    all_reduce_sum(totals, cfg.world)
    metrics = val_metrics(cfg, head_loss.model.args, logits, labels, documents)
    head_loss.train()
    return ((totals[0] / totals[1]).item() if totals[1] > 0 else None), metrics


def val_logits(cfg, head_loss, loader, autocast):
    """This rank's share of one pass over the val split (LabelledLoader's recipe): the (logits,
    labels, document indices) of its documents in epoch 0 (the last batch may run into epoch 1:
    those are not counted twice)."""
    loader.reset()
    parts = []
    for _ in range(math.ceil(len(loader.epoch_rows(0)) / (loader.batch_size * loader.world_size))):
        b = loader.next_batch()
        first = b.epochs == 0
        with autocast:
            logits = head_loss.logits(b.inputs.to(cfg.device), b.positions.to(cfg.device), b.valid.to(cfg.device))
        parts.append((logits.float()[first.to(cfg.device)], b.labels[first].to(cfg.device),
                      b.documents[first].to(cfg.device)))
    return [torch.cat(column) for column in zip(*parts)]


def tag_val_logits(cfg, head_loss, loader, autocast):
    """val_logits for a tag head, one row per tagged token: (logits, tag ids, keys) of this rank's
    tagged tokens in epoch 0's sentences, key = document * seq_len + position in it (the order of
    the sentences and of their words, which val_metrics sorts by). A word is the token its tag is on
    (its first sub-word; with --label_all_subwords shards, each sub-word counts as a word)."""
    loader.reset()
    parts = []
    for _ in range(math.ceil(len(loader.epoch_rows(0)) / (loader.batch_size * loader.world_size))):
        b = loader.next_batch()
        with autocast:
            logits = head_loss.logits(b.inputs.to(cfg.device), b.positions.to(cfg.device), b.valid.to(cfg.device))
        # each token's document: the batch lists them row by row, left to right; a row's starts count them
        starts = (b.positions == 0) & b.valid
        per_row = torch.bincount(b.rows, minlength=len(b.inputs))
        slot = (per_row.cumsum(0) - per_row)[:, None] + starts.long().cumsum(1) - 1
        keep = (b.targets != shards.IGNORE_INDEX) & b.valid
        keep &= b.epochs[slot.clamp(min=0)] == 0
        keys = b.documents[slot[keep]] * loader.seq_len + b.positions[keep]
        parts.append((logits.float()[keep.to(cfg.device)], b.targets[keep].to(cfg.device), keys.to(cfg.device)))
    return [torch.cat(column) for column in zip(*parts)]


def val_metrics(cfg, args, logits, labels, documents):
    """heads.classification_metrics of every rank's documents, gathered to every rank, computed once
    on rank 0 in document order (so any number of ranks gives the very same input), as
    {"val_<name>": value} (None where undefined: an AUROC of one class; all None for non-finite
    logits, which scikit-learn would refuse); {} on the other ranks. args: the model's ModelArgs."""
    documents, logits, labels = (all_gather_rows(t, cfg.world) for t in (documents, logits.double(), labels))
    if cfg.rank != 0:
        return {}
    if args.head_kind == "tag":
        return tag_val_metrics(cfg, args, logits, labels, documents)
    order = documents.argsort()
    probs, labels = heads.probabilities(logits[order], args.multilabel).cpu(), labels[order].cpu()
    if not torch.isfinite(probs).all():
        return {f"val_{name}": None for name in heads.metric_names(args.n_labels, args.multilabel)}
    answers = [row.nonzero().flatten().tolist() for row in labels] if args.multilabel else labels.tolist()
    metrics = heads.classification_metrics(probs.numpy(), answers, args.multilabel,
                                           list(args.labels or range(args.n_labels)))
    return {f"val_{name}": value for name, value in metrics.items()}


def tag_val_metrics(cfg, args, logits, targets, keys):
    """tagging.tag_metrics of every sentence's words (tag_val_logits' rows, gathered): each word's
    predicted tag is the argmax at the token that carries its tag; val_n counts the sentences with a
    tagged word; all None for non-finite logits."""
    if not torch.isfinite(logits).all():
        return {f"val_{name}": None for name in heads.TAG_METRICS}
    order = keys.argsort()
    keys, predicted, targets = keys[order].cpu(), logits[order].argmax(-1).cpu(), targets[order].cpu()
    sentences = torch.unique_consecutive(keys // cfg.seq_len, return_counts=True)[1].tolist()
    names = list(args.labels or range(args.n_labels))
    truth = [[names[i] for i in part.tolist()] for part in targets.split(sentences)]
    guess = [[names[i] for i in part.tolist()] for part in predicted.split(sentences)]
    metrics = tagging.tag_metrics(truth, guess)
    return {f"val_{name}": metrics[name] for name in (*heads.TAG_METRICS, "n")}


def all_gather_rows(t, world):
    """Every rank's t (n_r, ...) concatenated in rank order, n_r differing between ranks: each is
    padded to the longest for the collective (gloo and NCCL gather equal shapes), then cut back."""
    if world == 1:
        return t
    count = torch.tensor([len(t)], device=t.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    padded = t.new_zeros((max(int(n) for n in counts), *t.shape[1:]))
    padded[:len(t)] = t
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([part[:int(n)] for part, n in zip(parts, counts)])


def apply_epochs(cfg):
    """--epochs N: max_steps from the rows of one epoch (LabelledLoader: its first epoch's packed
    rows; token shards: their windows) and the global batch; warmup follows unless given."""
    if cfg.head:
        Loader = shards.TaggedLoader if cfg.head == "tag" else shards.LabelledLoader
        rows = len(Loader(cfg.data, "train", cfg.batch_size, cfg.seq_len, seed=cfg.seed).epoch_rows(0))
    else:
        rows = shards.DataLoader(cfg.data, "train", cfg.batch_size, cfg.seq_len).n_windows
    cfg.max_steps = max(1, math.ceil(cfg.epochs * rows / (cfg.batch_size * cfg.grad_accum * cfg.world)))
    if cfg.default_warmup:
        cfg.warmup_steps = max(1, cfg.max_steps // 20)


# -----------------------------------------------------------------------------------------------
# One optimizer step's forward and backward; evaluation


def train_step(cfg, model, loader, autocast, stop_requested=False):
    """Forward and backward over cfg.grad_accum micro-batches; returns (mean loss, target tokens) of
    the global batch, gradients left in .grad, already normalised. Returns (None, None), the loader
    rewound, if any rank was asked to stop: all ranks then stop at the same step. Reads grad_accum,
    device, world and doc_mask from cfg."""
    position = loader.state_dict()
    batches = [loader.next_batch() for _ in range(cfg.grad_accum)]
    # Normalise by the target tokens (--head: heads.loss_normaliser, the documents or their class
    # weights) of the whole step on all ranks, so masked batches with different counts weigh every
    # token equally (a mean of per-batch means would not), and a class-weighted loss is the weighted
    # mean over the global batch. The same all-reduce tells every rank whether one of them got Ctrl-C.
    counts = [step_counts(cfg, model, b) for b in batches]
    totals = torch.tensor([*map(sum, zip(*counts)), float(stop_requested)], dtype=torch.float64)
    normaliser, n_targets, n_stopping = all_reduce_sum(totals.to(cfg.device), cfg.world).tolist()
    if n_stopping:
        loader.load_state_dict(position)  # these sequences were not trained on: resume starts here
        return None, None
    loss_sum = torch.zeros((), device=cfg.device, dtype=torch.float64)
    for i, batch in enumerate(batches):
        # DDP all-reduces on every backward unless told not to: only the last micro-step syncs.
        # An FSDP2 model (--fsdp) reduce-scatters likewise (averaging over ranks too), told by a switch.
        last, fsdp_model = i == cfg.grad_accum - 1, hasattr(model, "set_requires_gradient_sync")
        if fsdp_model:
            model.set_requires_gradient_sync(last)
        sync = nullcontext() if cfg.world == 1 or last or fsdp_model else model.no_sync()
        with sync:
            with autocast:
                loss = micro_loss(cfg, model, batch)
            # DDP averages gradients over ranks; scaling by world turns that into a sum.
            (loss * (cfg.world / divisor(normaliser))).backward()
        loss_sum += loss.detach().double()
    return all_reduce_sum(loss_sum, cfg.world).item() / divisor(normaliser), n_targets


def divisor(normaliser):
    """A global batch without targets (or whose class weights sum to 0) has loss 0, not 0 / 0."""
    return normaliser if normaliser > 0 else 1


def step_counts(cfg, model, batch):
    """(what the loss of this micro-batch is divided by, its target tokens or --head documents)."""
    if cfg.head:  # model: HeadLoss, maybe in DDP (.module) or compiled (which forwards the attribute)
        labels = head_targets(cfg, batch)
        n = int((labels != shards.IGNORE_INDEX).sum()) if cfg.head == "tag" else len(labels)  # tagged words
        return getattr(model, "module", model).normaliser(labels), n
    n = int((batch.targets != -100).sum())
    return n, n


def micro_loss(cfg, model, batch):
    """The summed loss of one micro-batch: over its target tokens, or (--head) its documents."""
    if cfg.head:  # model: HeadLoss, maybe in DDP
        return model(*(t.to(cfg.device) for t in (batch.inputs, batch.positions, batch.valid, head_targets(cfg, batch))))
    x, y, pos = (t.to(cfg.device) for t in batch)
    return model(x, y, positions=pos if cfg.doc_mask else None, reduction="sum")


@torch.no_grad()
def evaluate(model, loader, steps, world, autocast, doc_mask):
    """Mean validation loss over `steps` batches, weighted by target tokens across all ranks; None
    where those batches hold no target token (instruction data whose prompts fill them), which is no
    loss at all rather than a perfect one."""
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
    return (total[0] / total[1]).item() if total[1] > 0 else None


def sample(model, tok, prompt, max_new_tokens=48, chat=False):
    """A greedy completion of prompt (with chat: of a user message in the tokenizer's chat layout),
    as one line."""
    prompt_ids = generate.encode_prompts(tok, [prompt], chat, None)[0]
    if len(prompt_ids) >= model.args.max_seq_len:  # a progress note must not stop the run
        return f"(--sample_prompt is {len(prompt_ids)} tokens, the context {model.args.max_seq_len}: no sample)"
    ids = generate.generate(model, [prompt_ids], max_new_tokens, temperature=0, stop_ids=tok.stop_ids)[0]
    model.train()
    shown = f"[user] {prompt} [assistant] " if chat else prompt
    return (shown + generate.completion_text(tok, prompt_ids, ids)).replace("\n", " / ")


def check_finite(cfg, step, **values):
    """Stop a diverged run before it overwrites the last good checkpoint."""
    for name, value in values.items():
        if value is False or (not isinstance(value, bool) and not math.isfinite(value)):
            what = f"{name} is {value}" if not isinstance(value, bool) else f"{name} are not finite"
            kept = (f"the last good checkpoint is in {checkpoint_dir(cfg)}" if has_checkpoint(cfg)
                    else "no checkpoint was saved")
            raise TrainingError(f"{what} at step {step}; stopped without saving: {kept} (try a lower --lr)")


# -----------------------------------------------------------------------------------------------
# Checkpoints: OUT_DIR/model or OUT_DIR/adapter, replaced as a whole by atomic.write_dir


def checkpoint_dir(cfg):
    return os.path.join(cfg.out_dir, cfg.checkpoint_name)


# The flags a resumed run must keep: they fix the schedule (lr_at), the length of each sequence and
# what is trained, so changing one would not continue the run the checkpoint began. Which sequences
# make each step depends only on the global batch (shards.DataLoader), so --batch_size, --grad_accum
# and the number of ranks may change as long as their product does not (check_resume_changes).
RESUME_FIXED = ("head", "class_weights", "focal_gamma", "focal_alpha", "max_steps", "lr", "warmup_steps", "min_lr_ratio", "seq_len", "lora_rank", "lora_alpha",
                "lora_dropout", "lora_targets", "rslora")


def global_batch(config):
    """(rows per optimizer step, how they come about) of a run's config (a dict, as saved)."""
    world, batch, accum = config.get("world", 1), config["batch_size"], config["grad_accum"]
    return world * batch * accum, f"{world} rank(s) x --batch_size {batch} x --grad_accum {accum}"


def check_resume_changes(cfg, path):
    """Refuse (one line naming them) flags in RESUME_FIXED that differ from the checkpoint's run, or
    a global batch that differs, unless --resume_with_changes, which logs them instead (never another
    --base_adapter: the base the run trains on). A checkpoint
    already at or past --max_steps trains nothing more, so nothing it would continue can change."""
    state = checkpoint.torch_load(os.path.join(path, "train_state.pt"), mmap=True)
    saved = state.get("config", {})
    if saved.get("base_adapter") != cfg.base_adapter:  # what the run trains on: fixed, whatever else may change
        now, then = cfg.base_adapter or "(none)", saved.get("base_adapter") or "(none)"
        raise UserError(f"--resume: --base_adapter {now} differs from the checkpoint's run in {path} "
                        f"(--base_adapter {then}), which trained on the base with that merged in; "
                        f"pass the same --base_adapter")
    if state.get("step", 0) >= cfg.max_steps:
        return
    changed = [f"--{name} {getattr(cfg, name)} (was {saved[name]})" for name in RESUME_FIXED
               if name in saved and saved[name] != getattr(cfg, name)]
    if "batch_size" in saved and "grad_accum" in saved:
        (old, old_how), (new, new_how) = global_batch(saved), global_batch(asdict(cfg))
        if old != new:
            changed.append(f"the global batch {new} rows = {new_how} (was {old} = {old_how})")
    if not changed:
        return
    listed = ", ".join(changed)
    if not cfg.resume_with_changes:
        raise UserError(f"--resume: {listed} differ from the checkpoint's run in {path}, so it would not "
                        f"continue exactly; restore them, or pass --resume_with_changes")
    if cfg.rank == 0:
        print(f"train.py: resuming with changes: {listed}", file=sys.stderr)


def has_checkpoint(cfg):
    # write_dir only ever gives a complete directory this name; train_state.pt marks it as ours
    return os.path.isfile(os.path.join(checkpoint_dir(cfg), "train_state.pt"))


def save_checkpoint(cfg, run, step):
    """The one way a run saves, whatever its mode (full or LoRA; one process, DDP or FSDP): check
    the trained weights are finite, write the weights (or adapter), the tokenizer and train_state.pt
    as one directory (a kill at any moment leaves the previous checkpoint or this one, never a mix),
    and say so. Every rank calls it: under --fsdp every rank takes part (the weights are gathered to
    rank 0, each rank writes its optimizer shard, fsdp.py); otherwise rank 0 writes alone. Returns
    the checkpoint's path on rank 0, None on the others."""
    trained = [p for p in run.model.parameters() if p.requires_grad]
    check_finite(cfg, step, weights=all(bool(torch.isfinite(p).all()) for p in trained))
    whole = run.model
    if cfg.fsdp:
        whole = fsdp.full_model(run.model)  # rank 0: the whole model (a LoRA run: its adapters) on the CPU
        if cfg.rank != 0:
            fsdp.save_optimizer(run.model, run.optimizer)  # into rank 0's directory
            return None
    elif cfg.rank != 0:
        return None
    path = atomic.write_dir(checkpoint_dir(cfg), lambda tmp_dir: write_checkpoint(cfg, run, step, whole, tmp_dir))
    print(f"saved {path} at step {step}", file=sys.stderr)
    return path


def keep_if_best(cfg, run, step, record):
    """--keep_best: OUT_DIR/best gets this step's checkpoint where its validation value is the best
    so far (lowest for val_loss, highest for a metric; ties keep the earlier). An undefined (None)
    or NaN value is never best. Written like the latest (atomic.write_dir), by rank 0 (the only
    rank with the metrics); its train_state.pt records best_metric, best and best_step."""
    value = record.get(cfg.keep_best)
    if value is None or not math.isfinite(value) or (run.best is not None and not better(cfg, value, run.best)):
        if step == cfg.max_steps and run.best is None and cfg.rank == 0:  # said, so nobody looks for it
            print(f"train.py: warning: --keep_best {cfg.keep_best} was undefined at every evaluation (a val split "
                  f"with one class?): no {os.path.join(cfg.out_dir, 'best')} written", file=sys.stderr)
        return
    run.best, run.best_step = value, step
    if cfg.rank == 0:
        path = atomic.write_dir(os.path.join(cfg.out_dir, "best"),
                                lambda tmp_dir: write_checkpoint(cfg, run, step, run.model, tmp_dir))
        print(f"saved {path} at step {step}: best {cfg.keep_best} {value}", file=sys.stderr)


def better(cfg, value, best):
    return value < best if cfg.keep_best == "val_loss" else value > best


def best_so_far(cfg, state):
    """(best, best_step) of --keep_best from a resumed train_state (saved before best_metric was
    recorded: val_loss, then the only choice); (None, None) when --keep_best names another metric
    now, whose best starts afresh."""
    if not cfg.keep_best or state.get("best") is None:
        return None, None
    if state.get("best_metric", "val_loss") != cfg.keep_best:
        if cfg.rank == 0:
            print(f"train.py: --keep_best {cfg.keep_best}: the checkpoint kept the best "
                  f"{state.get('best_metric', 'val_loss')}; OUT_DIR/best follows {cfg.keep_best} from now on",
                  file=sys.stderr)
        return None, None
    return state["best"], state.get("best_step")


def write_checkpoint(cfg, run, step, whole, tmp_dir):
    """Fill tmp_dir (atomic.write_dir renames it into place) on rank 0; whole: the model on one rank."""
    if cfg.fsdp:
        fsdp.save_optimizer(run.model, run.optimizer, tmp_dir)
    if cfg.lora_rank:
        fingerprint = fsdp.adapter_fingerprint(run.model) if cfg.fsdp else None  # kept by full_model
        lora.write_adapter(whole, tmp_dir, tokenizer_sha256=run.tokenizer.sha256, fingerprint=fingerprint,
                           tokenizer_fingerprint=run.tokenizer.fingerprint)
    else:
        checkpoint.write_meta(whole, tmp_dir)
    tokenizer.copy_into(run.tokenizer, tmp_dir)  # tokenizer.model, or a tokenizer.json as such
    state = {"step": step, "optimizer": None if cfg.fsdp else run.optimizer.state_dict(),  # --fsdp: in DCP's files
             "loader": run.train_loader.state_dict(), "config": run.config, "log_bytes": run.logger.size(),
             "mlflow_run_id": run.logger.run_id, "best": run.best, "best_step": run.best_step,
             "best_metric": cfg.keep_best}
    torch.save(state, os.path.join(tmp_dir, "train_state.pt"))


def restore_checkpoint(cfg, path, model, optimizer, train_loader):
    """Restore optimizer and loader position (and a LoRA run's adapter; a full run's weights were
    loaded from the checkpoint already); returns train_state. There is no RNG state to restore:
    each step seeds from (seed, rank, step), which the config and the step determine."""
    state = checkpoint.torch_load(os.path.join(path, "train_state.pt"), map_location=cfg.device)
    optimizer_in_dcp = state["optimizer"] is None  # saved by an --fsdp run: the optimizer is in DCP's files
    if cfg.fsdp and not optimizer_in_dcp:
        raise UserError(f"{path} was saved by a run without --fsdp: --resume it without --fsdp")
    if cfg.lora_rank:
        if cfg.fsdp:
            fsdp.load_adapter(model, path)
        else:
            lora.load_adapter(model, path, remedy=lora.RESUME_REMEDY)
    if optimizer_in_dcp:  # resharded to this run's ranks; whole, without --fsdp
        fsdp.load_optimizer(model, optimizer, path)
    else:
        optimizer.load_state_dict(state["optimizer"])
    train_loader.load_state_dict(state["loader"])
    return state


# -----------------------------------------------------------------------------------------------
# Logging: the step line, log.jsonl, mlflow (rank 0 only); FLOPs and MFU


class Logger:
    """Rank 0's record of the run: a line on stdout, a JSON line in log.jsonl, mlflow metrics."""

    def __init__(self, cfg, config, enabled, keep_log_bytes=None, model_args=None, run_id=None):
        """A fresh run starts log.jsonl anew; a resumed one keeps its first keep_log_bytes bytes,
        the steps up to the checkpoint (those after it will be run again), and continues mlflow run
        run_id (the one train_state.pt recorded). model_args: the model that trains, whose shape
        mlflow records (not the from-scratch flags a fine-tune ignores)."""
        self.enabled, self.tracker, self.run_id = enabled, None, run_id
        self.path = os.path.join(cfg.out_dir, "log.jsonl")
        if not enabled:
            return
        if not cfg.resume and os.path.lexists(self.path):
            os.remove(self.path)  # a link is removed, its target untouched
        elif keep_log_bytes is not None and self.size() > keep_log_bytes:
            fd = atomic.open_own(self.path, os.O_WRONLY)
            os.ftruncate(fd, keep_log_bytes)
            os.close(fd)
        if cfg.mlflow:
            self.tracker = common.start_mlflow(cfg.mlflow_experiment, os.path.basename(os.path.abspath(cfg.out_dir)),
                                               mlflow_params(config, model_args), run_id)
            self.run_id = self.tracker.run_id if self.tracker else run_id

    def step(self, record, line=None):
        """Append record to log.jsonl (and mlflow); print line, if any."""
        if not self.enabled:
            return
        if line:
            print(line, flush=True)
        try:
            with os.fdopen(atomic.open_own(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT), "w") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
            raise atomic.DiskFullError(f"disk full while appending step {record['step']} to {self.path}; the last "
                                       f"checkpoint is intact (--resume continues it). Free some space on "
                                       f"{os.path.dirname(os.path.abspath(self.path))} and try again") from None
        if self.tracker:
            metrics = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
            self.tracker.log_metrics(metrics, step=record["step"])

    def size(self):
        return os.path.getsize(self.path) if os.path.exists(self.path) else 0

    def artifact(self, path):
        if self.tracker:
            self.tracker.artifact(path)

    def close(self):
        """End the mlflow run with what is ending the process: FINISHED, KILLED (Ctrl-C, SIGTERM:
        --resume will continue the same run) or FAILED (a NaN stop, any error). Called from a
        finally block, where sys.exc_info() is the exception leaving it."""
        if self.tracker:
            error = sys.exc_info()[1]
            interrupted = isinstance(error, KeyboardInterrupt) or (isinstance(error, SystemExit) and error.code == 130)
            status = "FINISHED" if error is None or (isinstance(error, SystemExit) and not error.code) else \
                "KILLED" if interrupted else "FAILED"
            self.tracker.end_run(status=status)
            self.tracker = None


# ModelArgs' fields that are also flags: they shape a model trained from scratch only.
MODEL_FLAGS = ("dim", "n_layers", "n_heads", "n_kv_heads", "multiple_of", "ffn_dim_multiplier", "norm_eps",
               "rope_theta")


def mlflow_params(config, model_args):
    """The run's flags, with the model's shape taken from the model that trains."""
    params = dict(config)
    if model_args is not None:
        for name in MODEL_FLAGS:
            params.pop(name, None)
        params.update(asdict(model_args))  # with the derived head_dim and hidden_dim
    return params


# -----------------------------------------------------------------------------------------------
# The run: main -> set_up -> loop -> finish


@dataclass
class Run:
    """What set-up builds and the loop uses."""
    model: torch.nn.Module  # the model itself: what is saved
    wrapped: torch.nn.Module  # what the loop calls: the model, compiled and/or wrapped in DDP
    tokenizer: object
    optimizer: torch.optim.Optimizer
    train_loader: shards.DataLoader
    val_loader: shards.DataLoader
    autocast: object
    logger: Logger
    config: dict  # what mlflow and train_state.pt record
    start_step: int
    flops_per_token: float
    peak_flops: float  # of this GPU, for MFU; None where unknown
    task_eval: object = None  # tasks.TrainingEval of --eval_task, None without
    head_loss: HeadLoss = None  # --head: the loss module (unwrapped), for validation
    best: float = None  # --keep_best: the best validation value so far (saved in train_state.pt)
    best_step: int = None  # and the step that reached it


class StopOnSignal:
    """Ctrl-C (or a scheduler's SIGTERM) sets .requested: the run finishes the step in flight, saves
    and exits."""

    def __enter__(self):
        self.requested = False
        self.previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, *_):
        self.requested = True

    def __exit__(self, *_):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def main(**flags):
    if flags.get("ckpt_dir") is None and flags.get("data") is None:
        flags = {**DEMO, **flags}  # the demo: its preset, under the flags given
    cfg = TrainConfig(**flags)
    setup_distributed(cfg)
    with common.ranks(cfg.world):  # one rank's error stops them all within seconds
        # Rank 0 claims --out_dir before anything else (the others wait for it at the barrier), so a
        # refused run touches nothing and no rank reads a checkpoint that claiming may still settle.
        with claim_out_dir(cfg) if cfg.rank == 0 else nullcontext():
            if cfg.world > 1:
                dist.barrier()
            if cfg.demo:
                prepare_demo_corpus(cfg)
            run = set_up(cfg)
            try:
                with StopOnSignal() as stop:
                    step, last_saved = loop(cfg, run, stop)
                finish(cfg, run, step, last_saved, stop.requested)
            finally:
                run.logger.close()


# The command line is TrainConfig: cli.run reads the flags, their types and defaults from main's
# signature and --help their meanings from its docstring, so main takes the dataclass's (and is
# called with the flags given, by name).
main.__signature__ = inspect.signature(TrainConfig)
main.__doc__ = ("Train a Llama. python train.py alone runs the ICD-10-CM demo, whose preset replaces the "
                "defaults of the flags not given: " + " ".join(f"--{k} {v!r}" if isinstance(v, str) else f"--{k} {v}"
                                                              for k, v in DEMO.items()) +
                ".\n\nArgs:\n" + "\n".join(f"    {f.name}: {f.metadata['help']}" for f in fields(TrainConfig) if f.init))


def set_up(cfg):
    master = cfg.rank == 0
    resume_from = checkpoint_dir(cfg) if cfg.resume and has_checkpoint(cfg) else None
    if cfg.resume and not resume_from:
        raise UserError(f"--resume: no checkpoint in {checkpoint_dir(cfg)}")
    if cfg.epochs:  # before the resume check, which compares max_steps
        apply_epochs(cfg)
    if resume_from:
        check_resume_changes(cfg, resume_from)
    model, tok, data_meta = load_model_and_data(cfg, resume_from)
    task_eval = None  # --eval_task's records, read here: a bad one stops the run before its first step
    if cfg.eval_task is not None:
        task_eval = tasks.TrainingEval(cfg.eval_task, cfg.eval_data, model, tok, cfg.batch_size, cfg.seq_len,
                                       cfg.rank, cfg.world)
    if cfg.doc_mask is None:
        cfg.doc_mask = bool(data_meta.get("has_mask"))  # instruction / chat data
    # --head: whole documents (sentences), packed
    Loader = {"classify": shards.LabelledLoader, "tag": shards.TaggedLoader}.get(cfg.head, shards.DataLoader)
    train_loader = Loader(cfg.data, "train", cfg.batch_size, cfg.seq_len, cfg.rank, cfg.world, seed=cfg.seed)
    val_loader = Loader(cfg.data, "val", cfg.batch_size, cfg.seq_len, cfg.rank, cfg.world)
    head_loss = head_loss_module(cfg, model, train_loader) if cfg.head else None
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay, device=cfg.device)
    state = restore_checkpoint(cfg, resume_from, model, optimizer, train_loader) if resume_from else {}
    if resume_from and master:
        print(f"resuming from {resume_from} at step {state['step']}", file=sys.stderr)

    config = dict(asdict(cfg), tokenizer_sha256=tok.sha256)
    best_state = best_so_far(cfg, state)  # --keep_best's value and step so far
    on_cuda = cfg.device.startswith("cuda")
    flops = common.flops_per_token(model.args, cfg.seq_len, cfg.lora_rank, cfg.lora_target_names)
    run = Run(model=model, wrapped=for_training(cfg, head_loss or model), tokenizer=tok, optimizer=optimizer,
              train_loader=train_loader, val_loader=val_loader, config=config, start_step=state.get("step", 0),
              autocast=torch.autocast("cuda", dtype=torch.bfloat16) if on_cuda else nullcontext(),
              logger=Logger(cfg, config, master, keep_log_bytes=state.get("log_bytes"), model_args=model.args,
                            run_id=state.get("mlflow_run_id")), flops_per_token=flops,
              peak_flops=common.peak_flops(cfg.device)[1], task_eval=task_eval, head_loss=head_loss,
              best=best_state[0], best_step=best_state[1])
    if master:
        n_params = sum(p.numel() for p in model.parameters())
        n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        what = "LoRA" if cfg.lora_rank else "full fine-tune" if cfg.ckpt_dir else "from scratch"
        print(f"{what}: {n_params / 1e6:.1f}M parameters, {n_trainable / 1e6:.2f}M trained; {cfg.world} rank(s) "
              f"on {cfg.device}; global batch {cfg.batch_size * cfg.grad_accum * cfg.world} x {cfg.seq_len} "
              f"tokens; doc_mask {cfg.doc_mask}; writing {cfg.out_dir}", file=sys.stderr)
    return run


def loop(cfg, run, stop):
    """Optimizer steps from run.start_step to max_steps; returns (step reached, step last saved)."""
    step = last_saved = run.start_step
    trainable = [p for p in run.model.parameters() if p.requires_grad]
    run.model.train()
    t_start = time.time()
    while step < cfg.max_steps:
        t0 = time.time()
        lr = lr_at(step, cfg)
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        # Dropout draws from a generator seeded by (seed, rank, step): a resumed run, on any
        # number of ranks, draws exactly what an uninterrupted one would.
        torch.manual_seed(hash((cfg.seed, cfg.rank, step)) & 0xFFFF_FFFF)
        loss, n_targets = train_step(cfg, run.wrapped, run.train_loader, run.autocast, stop.requested)
        if loss is None:  # some rank got the signal; all stop here
            stop.requested = True
            break
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        check_finite(cfg, step + 1, loss=loss, grad_norm=grad_norm.item())
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
        step += 1

        if cfg.device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.time() - t0
        record = {"step": step, "loss": round(loss, 6), "lr": lr, "tokens": step * step_tokens(cfg),
                  "target_tokens": int(n_targets), "grad_norm": round(grad_norm.item(), 4),
                  "tokens_per_s": round(step_tokens(cfg) / seconds, 1)}
        if run.peak_flops:
            record["mfu"] = round(run.flops_per_token * record["tokens_per_s"] / cfg.world / run.peak_flops, 4)
        evaluated = step % cfg.eval_every == 0 or step == cfg.max_steps
        if evaluated and cfg.head:  # val_loss, and on rank 0 the task's metrics (val_auroc, ...)
            val, metrics = evaluate_head(cfg, run.head_loss, run.val_loader, run.autocast)
            record.update(val_loss=None if val is None else round(val, 6), **metrics)
        elif evaluated:
            val = evaluate(run.wrapped, run.val_loader, cfg.eval_steps, cfg.world, run.autocast, cfg.doc_mask)
            record.update(val_loss=None if val is None else round(val, 6),  # None: JSON null, not sent to mlflow
                          val_ppl=None if val is None else round(math.exp(min(val, 50)), 3))
            if run.task_eval is not None:  # --eval_task: eval.py's metrics
                record.update(run.task_eval(run.model))
        eta = (time.time() - t_start) / (step - run.start_step) * (cfg.max_steps - step)
        shown = evaluated or step % cfg.log_every == 0 or step == run.start_step + 1
        run.logger.step(record, step_line(cfg, run, record, eta) if shown else None)
        if evaluated and cfg.keep_best:
            keep_if_best(cfg, run, step, record)
        if step % cfg.save_every == 0 and step < cfg.max_steps:
            save_checkpoint(cfg, run, step)
            last_saved = step
    return step, last_saved


def step_tokens(cfg):
    return cfg.batch_size * cfg.seq_len * cfg.grad_accum * cfg.world


def step_line(cfg, run, record, eta):
    line = (f"step {record['step']}/{cfg.max_steps} | loss {record['loss']:.4f} | lr {record['lr']:.2e} | "
            f"grad {record['grad_norm']:.3f} | {record['tokens_per_s']:,.0f} tok/s")
    if "mfu" in record:
        line += f" | MFU {100 * record['mfu']:.1f}%"
    line += f" | ETA {common.format_eta(eta)}"
    if "val_loss" in record:
        ppl = f" ppl {record['val_ppl']:.2f}" if record.get("val_ppl") is not None else ""  # none under --head
        line += (f" | val {record['val_loss']:.4f}{ppl}" if record["val_loss"] is not None
                 else " | val - (no target tokens in the validation batches: raise --eval_steps or --seq_len)")
        line += metrics_text(record)
        if cfg.sample_prompt and cfg.rank == 0 and cfg.fsdp:  # decoding would need every rank in step
            line += "\n  sample: (none under --fsdp: generate.py samples the saved checkpoint)"
        elif cfg.sample_prompt and cfg.rank == 0:
            # instruction / chat shards (masked targets) train the chat layout: sample in it too
            chat = bool(shards.load_meta(cfg.data).get("has_mask"))
            line += "\n  sample: " + sample(run.model, run.tokenizer, cfg.sample_prompt, chat=chat)
    return line


def metrics_text(record):
    """--head's validation metrics for the step line, compactly: " auroc 0.912 f1 0.800 ...", - where
    undefined ("" without a head)."""
    shown = {k[len("val_"):]: v for k, v in record.items() if k.startswith("val_") and k not in
             ("val_loss", "val_ppl", "val_n")}
    return "".join(f" {name} " + ("-" if v is None else f"{v}" if isinstance(v, int) else f"{v:.3f}")
                   for name, v in shown.items())


def finish(cfg, run, step, last_saved, interrupted):
    """Save what the last periodic checkpoint missed, then leave together."""
    if step > last_saved or step == 0:
        path = save_checkpoint(cfg, run, step)
        if cfg.rank == 0:
            run.logger.artifact(os.path.join(cfg.out_dir, "log.jsonl"))
            if cfg.lora_rank:
                run.logger.artifact(path)
    if cfg.world > 1:
        dist.barrier()  # rank 0 may still be saving: leave together, not while a peer is mid-collective
    if interrupted:
        if cfg.rank == 0:
            print(f"train.py: interrupted at step {step}; continue with --resume", file=sys.stderr)
        sys.exit(130)


# Each flag's range, declared beside it in TrainConfig; cli checks them before any work.
CHECKS = {f.name: f.metadata["check"] for f in fields(TrainConfig) if f.init and f.metadata["check"]}

if __name__ == "__main__":
    cli.run(main, prog="train.py", checks=CHECKS)
