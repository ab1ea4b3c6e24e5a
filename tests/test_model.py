"""The model against transformers' LlamaForCausalLM on the same random weights, every layout."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import checkpoint
import model
from ckpt_utils import (VARIANTS, hf_model, meta_params_for, meta_state_dict, rel_err, tokens_for, write_hf,
                        write_meta)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module", params=list(VARIANTS))
def reference(request):
    hf = hf_model(request.param)
    tokens = tokens_for(request.param)
    with torch.no_grad():
        logits = hf(tokens).logits
    return request.param, hf, tokens, logits


def _layout(kind, variant, hf, path):
    sd = meta_state_dict(hf)
    # Llama 2 checkpoints carry rope.freqs, Llama 3 params.json may say vocab_size -1.
    if kind == "meta":
        return write_meta(sd, meta_params_for(variant), path, extra={"rope.freqs": torch.zeros(8)})
    if kind == "meta-mp2":
        emb_dim = 1 if variant == "llama2" else 0
        return write_meta(sd, meta_params_for(variant, vocab_size=-1), path, n_shards=2, embedding_dim=emb_dim)
    if kind == "hf":
        return write_hf(hf, path)
    if kind == "hf-classic-indexed":
        return write_hf(hf, path, max_shard_size="60KB", classic_config=True)
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["meta", "meta-mp2", "hf", "hf-classic-indexed"])
def test_logits_match_transformers(reference, kind, tmp_path):
    variant, hf, tokens, ref = reference
    path = _layout(kind, variant, hf, tmp_path / kind)
    if kind == "hf-classic-indexed":
        assert os.path.exists(os.path.join(path, "model.safetensors.index.json"))
    m = checkpoint.load(path)
    assert m.tied == VARIANTS[variant]["tied"]
    assert m.args.hidden_dim == hf.config.intermediate_size
    with torch.no_grad():
        out = m(tokens)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert rel_err(out, ref) < 1e-5


def test_loss_matches_transformers(reference, tmp_path):
    variant, hf, tokens, _ = reference
    m = checkpoint.load(_layout("meta", variant, hf, tmp_path / "m"))
    targets = tokens.roll(-1, dims=1)
    targets[:, -1] = -100
    targets[0, :5] = -100  # masked prompt tokens
    with torch.no_grad():
        ours = m(tokens, targets)
        logits = hf(tokens).logits
        ref = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
    assert abs(ours.item() - ref.item()) / ref.item() < 1e-5


def test_kv_cache_decoding_equals_full_forward(reference, tmp_path):
    variant, hf, tokens, _ = reference
    m = checkpoint.load(_layout("meta", variant, hf, tmp_path / "m"))
    with torch.no_grad():
        full = m(tokens)
        m.setup_cache(max_batch_size=4, max_seq_len=64)
        # a prompt chunk, then a multi-token chunk after a filled cache, then one token at a time
        steps = [m.decode(tokens[:, :20], 0), m.decode(tokens[:, 20:30], 20)]
        steps += [m.decode(tokens[:, t : t + 1], t) for t in range(30, tokens.shape[1])]
    assert rel_err(torch.cat(steps, dim=1), full) < 1e-5


def test_save_load_round_trip(reference, tmp_path):
    variant, hf, tokens, ref = reference
    m = checkpoint.load(_layout("hf", variant, hf, tmp_path / "hf"))
    checkpoint.save(m, tmp_path / "out")
    params = json.loads((tmp_path / "out" / "params.json").read_text())
    assert "use_scaled_rope" in params or variant == "llama2"
    assert sorted(os.listdir(tmp_path / "out")) == ["consolidated.00.pth", "params.json"]
    m2 = checkpoint.load(tmp_path / "out")
    assert m2.tied == m.tied
    with torch.no_grad():
        assert torch.equal(m2(tokens), m(tokens))
    # Meta's own loader reads this with a plain torch.load
    sd = torch.load(tmp_path / "out" / "consolidated.00.pth", weights_only=True)
    assert "output.weight" in sd and "tok_embeddings.weight" in sd


def _small_model(seed):
    torch.manual_seed(seed)
    m = model.Transformer(model.ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=50, multiple_of=16))
    m.init_weights()
    return m


def test_the_model_keeps_its_rope_table(tmp_path):
    """Nobody outside model.py rebuilds the RoPE table: it follows the model onto the meta device and
    back (to_empty), stays fp32 through .to(dtype), and grows with extend_context."""
    m = _small_model(0)
    fresh = model.rope_table(m.args)
    m.to(torch.bfloat16)  # casts the buffer too; the next forward computes it again in fp32
    with torch.no_grad():
        m(torch.randint(0, 50, (1, 9)))
    assert m.rope.dtype == torch.float32 and torch.equal(m.rope, fresh)
    m.extend_context(m.args.max_seq_len * 2)
    assert m.rope.shape[0] == m.args.max_seq_len and torch.equal(m.rope[: fresh.shape[0]], fresh)
    with torch.device("meta"):
        empty = model.Transformer(m.args)
    empty.to_empty(device="cpu")
    assert torch.equal(empty.rope, model.rope_table(m.args))


def test_a_table_built_on_demand_covers_what_is_asked(tmp_path):
    """A model made on the meta device (as checkpoint.load makes one) computes only the positions its
    calls reach, rounded up to a power of two (at least ROPE_ROWS), not all of Llama 3.1's 131072:
    every row equal to the full table's, and the logits equal to a model holding the full table."""
    args = model.ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=50, multiple_of=16, max_seq_len=131072,
                           use_scaled_rope=True, rope_theta=500000.0)
    full = _small_model(0)
    full.args = args
    full.rope = model.rope_table(args)
    with torch.device("meta"):
        lazy = model.Transformer(args)
    lazy.load_state_dict(full.state_dict(), assign=True)
    tokens = torch.randint(0, 50, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(lazy(tokens), full(tokens), rtol=0, atol=0)
    assert lazy.rope.shape[0] == model.ROPE_ROWS and torch.equal(lazy.rope, full.rope[: model.ROPE_ROWS])
    lazy.setup_cache(1, 5000)  # decoding asks for the cache's length: 5000 -> 8192 rows
    with torch.no_grad():
        lazy.decode(tokens, 0)
    assert lazy.rope.shape[0] == 8192 and torch.equal(lazy.rope, full.rope[:8192])
    lazy.extend_context(131072)
    assert torch.equal(lazy.rope, full.rope)


def test_save_replaces_the_checkpoint_whole(tmp_path):
    """checkpoint.save over a directory: the new weights and params.json arrive together, stale shards and
    trainer state go, files that are not part of a checkpoint (tokenizer, notes) are carried over."""
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "tokenizer.model").write_text("tokenizer")
    (out / "consolidated.01.pth").write_text("a stale model-parallel shard")
    (out / "train_state.pt").write_text("state of other weights")
    (out / "notes").mkdir()
    (out / "notes" / "run.txt").write_text("kept")
    m = _small_model(0)
    checkpoint.save(m, out)
    assert sorted(os.listdir(out)) == ["consolidated.00.pth", "notes", "params.json", "tokenizer.model"]
    assert (out / "tokenizer.model").read_text() == "tokenizer" and (out / "notes" / "run.txt").read_text() == "kept"
    assert os.listdir(tmp_path) == ["ckpt"]  # no .tmp, .new or .old left beside it
    tokens = torch.randint(0, 50, (1, 9))
    with torch.no_grad():
        assert torch.equal(checkpoint.load(out)(tokens), m(tokens))


def test_failed_save_leaves_the_old_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "ckpt"
    checkpoint.save(_small_model(0), out)
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}

    def fail(args):
        raise RuntimeError("killed after the weights, before params.json")

    monkeypatch.setattr(checkpoint, "meta_params", fail)
    with pytest.raises(RuntimeError, match="killed"):
        checkpoint.save(_small_model(1), out)
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before
    assert os.listdir(tmp_path) == ["ckpt"]


def test_rope_scaling_changes_frequencies():
    base = model.ModelArgs(dim=256, n_heads=2, rope_theta=500000.0)
    f = model.rope_frequencies(base)
    s8 = model.rope_frequencies(model.ModelArgs(dim=256, n_heads=2, rope_theta=500000.0, use_scaled_rope=True))
    assert torch.equal(f[:10], s8[:10])  # high frequencies untouched
    assert torch.allclose(s8[-1], f[-1] / 8)  # the lowest slowed by the factor


def test_ffn_hidden_dim_arithmetic():
    # Meta's published shapes: Llama 2 7B, Llama 3 8B, Llama 3.2 1B, Llama 3.1 70B
    assert model.ModelArgs(dim=4096, multiple_of=256).hidden_dim == 11008
    assert model.ModelArgs(dim=4096, multiple_of=1024, ffn_dim_multiplier=1.3).hidden_dim == 14336
    assert model.ModelArgs(dim=2048, multiple_of=256, ffn_dim_multiplier=1.5).hidden_dim == 8192
    assert model.ModelArgs(dim=8192, multiple_of=4096, ffn_dim_multiplier=1.3).hidden_dim == 28672


def test_dtype_default_and_override(tmp_path):
    hf = hf_model("llama3.2")
    path = write_hf(hf, tmp_path / "hf")
    assert checkpoint.load(path).tok_embeddings.weight.dtype == torch.float32
    m = checkpoint.load(path, dtype="bf16")
    assert m.layers[0].attention.wq.weight.dtype == torch.bfloat16
    assert m(tokens_for("llama3.2")).dtype == torch.float32
    with pytest.raises(ValueError, match="--dtype"):
        checkpoint.load(path, dtype="fp8")


# -- bad input ------------------------------------------------------------------------------------


def test_missing_directory_and_weights(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="no such checkpoint directory"):
        checkpoint.load(tmp_path / "nope")
    with pytest.raises(checkpoint.CheckpointError, match="neither params.json"):
        checkpoint.load(tmp_path)
    (tmp_path / "params.json").write_text(json.dumps(meta_params_for("llama2")))
    with pytest.raises(checkpoint.CheckpointError, match="no consolidated"):
        checkpoint.load(tmp_path)


def test_model_args_resolve_derived_sizes(tmp_path):
    args = model.ModelArgs(dim=256, n_heads=8)
    assert args.n_kv_heads == 8 and args.head_dim == 32  # n_kv_heads None: as many as n_heads
    with pytest.raises(ValueError, match="n_heads 8, n_kv_heads 3"):
        model.ModelArgs(dim=256, n_heads=8, n_kv_heads=3)
    params = meta_params_for("llama2")
    params["n_heads"] = 5  # does not divide dim 64
    write_meta(meta_state_dict(hf_model("llama2")), params, tmp_path)
    with pytest.raises(checkpoint.CheckpointError, match=r"params.json: dim 64, n_heads 5"):
        checkpoint.load(tmp_path)


def test_params_that_disagree_with_weights(tmp_path):
    hf = hf_model("llama3.1")
    sd = meta_state_dict(hf)
    params = meta_params_for("llama3.1")
    params["n_kv_heads"] = 4  # the weights have 2
    write_meta(sd, params, tmp_path)
    with pytest.raises(checkpoint.CheckpointError, match=r"params.json disagrees with the weights: .*wk"):
        checkpoint.load(tmp_path)


def test_corrupt_weights_file(tmp_path):
    hf = hf_model("llama2")
    write_meta(meta_state_dict(hf), meta_params_for("llama2"), tmp_path)
    path = tmp_path / "consolidated.00.pth"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(checkpoint.CheckpointError, match="consolidated.00.pth: cannot read"):
        checkpoint.load(tmp_path)
    (tmp_path / "params.json").write_text("{not json")
    with pytest.raises(checkpoint.CheckpointError, match="params.json: cannot read"):
        checkpoint.load(tmp_path)


# -- memory ---------------------------------------------------------------------------------------

_PEAK = r"""
import os, sys, torch, checkpoint
def rss_hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) * 1024
before = rss_hwm()
m = checkpoint.load(sys.argv[1], dtype=torch.float32)
print(before, rss_hwm())
"""


@pytest.mark.parametrize("layout", ["meta", "hf"])
def test_peak_memory_while_loading(tmp_path, layout):
    """Loading holds one copy of the weights: peak resident memory grows by under 1.3x the file."""
    args = model.ModelArgs(dim=1024, n_layers=6, n_heads=8, n_kv_heads=2, vocab_size=32000, multiple_of=256)
    torch.manual_seed(0)
    with torch.device("meta"):
        m = model.Transformer(args)
    m = m.to_empty(device="cpu")
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.02)
    path = tmp_path / layout
    if layout == "meta":
        checkpoint.save(m, path)
        size = os.path.getsize(path / "consolidated.00.pth")
    else:
        from transformers import LlamaForCausalLM
        from ckpt_utils import hf_config
        hf = LlamaForCausalLM(hf_config(args, tied=False))
        hf.save_pretrained(path, safe_serialization=True)
        size = os.path.getsize(path / "model.safetensors")
        del hf
    del m
    out = subprocess.run([sys.executable, "-c", _PEAK, str(path)], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": ROOT})
    assert out.returncode == 0, out.stderr
    before, peak = map(int, out.stdout.split())
    assert size > 150e6
    assert peak - before < 1.3 * size, f"peak grew {(peak - before) / size:.2f}x the checkpoint"


# -- packed documents -----------------------------------------------------------------------------


@pytest.mark.parametrize("flex", [False, True])
def test_document_masking_equals_each_document_alone(tmp_path, monkeypatch, flex):
    """Packed rows with positions restarting per document give each document exactly the logits
    and loss it gets on its own: attention never crosses a boundary, RoPE restarts at 0."""
    import functools
    import warnings

    m = checkpoint.load(write_hf(hf_model("llama3.1"), tmp_path))
    monkeypatch.setattr(model, "document_mask", functools.partial(model.document_mask, flex=flex))
    g = torch.Generator().manual_seed(5)
    docs = [torch.randint(0, 384, (n,), generator=g) for n in (11, 23, 7)]
    row = torch.cat(docs)[None]
    positions = torch.cat([torch.arange(len(d)) for d in docs])[None]
    targets = torch.cat([torch.cat([d[1:], torch.tensor([-100])]) for d in docs])[None]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # FlexAttention warns that it is not compiled on the CPU
        packed = m(row, positions=positions)
        alone = torch.cat([m(d[None]) for d in docs], dim=1)
        assert rel_err(packed, alone) < 1e-5
        assert not torch.allclose(m(row)[:, 11:], alone[:, 11:], atol=1e-3)  # without: different
        loss = m(row, targets, positions=positions, reduction="sum")
        ref = sum(torch.nn.functional.cross_entropy(m(d[None])[0, :-1], d[1:], reduction="sum") for d in docs)
    assert abs(loss.item() - ref.item()) / ref.item() < 1e-5


@pytest.mark.parametrize("key, value, message", [
    ("dim", "abc", "dim is 'abc', not an integer"),
    ("norm_eps", "1e-5", "norm_eps is '1e-5', not a finite number"),
    ("use_scaled_rope", 1, "use_scaled_rope is 1, not true or false"),
    ("n_layers", 0, "n_layers is 0, must be at least 1"),
    ("n_heads", 0, "must be positive"),
])
def test_params_json_is_checked_field_by_field(tmp_path, key, value, message):
    params = dict(meta_params_for("llama2"), **{key: value})
    path = write_meta(meta_state_dict(hf_model("llama2")), params, tmp_path / "ckpt")
    with pytest.raises(checkpoint.CheckpointError) as e:
        checkpoint.load(path)
    assert str(path / "params.json") in str(e.value) and message in str(e.value) and "\n" not in str(e.value)


def test_torch_files_that_are_not_plain_tensors_are_one_line(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, ("echo never run",))

    torch.save({"x": Payload()}, tmp_path / "evil.pth")
    torch.save({"x": torch.randn(1000)}, tmp_path / "ok.pth")
    (tmp_path / "cut.pth").write_bytes((tmp_path / "ok.pth").read_bytes()[:2000])
    (tmp_path / "empty.pth").write_bytes(b"")
    for name, message in [("evil.pth", "could run code"), ("cut.pth", "cannot read"), ("empty.pth", "cannot read"),
                          ("missing.pth", "missing")]:
        for mmap in (False, True):
            with pytest.raises(checkpoint.CheckpointError) as e:
                checkpoint.torch_load(tmp_path / name, mmap=mmap)
            text = str(e.value)
            assert text.startswith(str(tmp_path / name)) and message in text and "\n" not in text
            assert "weights_only=False" not in text  # never the advice to run the payload


@pytest.mark.parametrize("key, value", [("hidden_size", "abc"), ("num_hidden_layers", None), ("vocab_size", 1.5)])
def test_config_json_sizes_are_checked(tmp_path, key, value):
    path = write_hf(hf_model("llama3.1"), tmp_path / "hf")
    config = json.loads((path / "config.json").read_text())
    config[key] = value
    if value is None:
        del config[key]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(checkpoint.CheckpointError) as e:
        checkpoint.load(path)
    assert str(path / "config.json") in str(e.value) and f"{key} is" in str(e.value) and "\n" not in str(e.value)


# -- memory-mapped loading ------------------------------------------------------------------------


def mapped_file(t: torch.Tensor):
    """The file whose mapping holds t's data (from /proc/self/maps), or None if t lives in plain memory."""
    address = t.data_ptr()
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split()
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if start <= address < end:
                return fields[5] if len(fields) > 5 and fields[5].startswith("/") else None
    return None


def _checkpoint(layout, dtype, path):
    """A llama3.1 checkpoint stored in dtype, and the state dict it holds (our names, Meta's q/k rows)."""
    hf = hf_model("llama3.1").to(dtype)
    if layout == "meta":
        write_meta(meta_state_dict(hf), meta_params_for("llama3.1"), path)
    else:
        write_hf(hf, path)
    return path, meta_state_dict(hf)


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads /proc/self/maps (Linux)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["meta", "hf"])
def test_mapped_load_equals_a_copied_load(tmp_path, layout, dtype):
    """Weights already in the asked dtype stay in the file's mapping (the HF q/k rows, which change
    order, are the only copies), and the logits equal a model given copied tensors."""
    path, sd = _checkpoint(layout, dtype, tmp_path / layout)
    m = checkpoint.load(path, dtype=dtype)
    weights = dict(m.named_parameters())
    copied = {"wq", "wk"} if layout == "hf" else set()
    for name, w in weights.items():
        where = mapped_file(w)
        if name.split(".")[-2] in copied:
            assert where is None, name
        else:
            assert where is not None and where.startswith(str(path)), f"{name} was copied"
    with torch.device("meta"):
        ref = model.Transformer(m.args)
    ref.load_state_dict({k: v.clone() for k, v in sd.items()}, strict=False, assign=True)
    if "output.weight" not in sd:
        ref.tie_weights()
    tokens = tokens_for("llama3.1")
    with torch.no_grad():
        assert torch.equal(m(tokens), ref.eval()(tokens))


@pytest.mark.parametrize("layout", ["meta", "hf"])
def test_changing_the_loaded_model_never_writes_the_checkpoint(tmp_path, layout):
    import hashlib

    path, sd = _checkpoint(layout, torch.float32, tmp_path / layout)
    digest = lambda: {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in path.iterdir()}  # noqa: E731
    before = digest()
    m = checkpoint.load(path, dtype=torch.float32)
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(-3).add_(1)
    assert digest() == before
    again = checkpoint.load(path, dtype=torch.float32)
    assert torch.equal(again.layers[1].feed_forward.w2.weight, sd["layers.1.feed_forward.w2.weight"])


B16, F16, F32 = torch.bfloat16, torch.float16, torch.float32


@pytest.mark.parametrize("caps, faster, kernel, stored, weights, compute", [
    ({"avx512_bf16": True}, True, True, B16, B16, B16),   # AVX-512 BF16 that measures fast: bf16 throughout
    ({"avx512_bf16": True}, False, True, B16, B16, F32),  # the instructions, but a slow product: fp32 compute
    ({"amx_bf16": True}, True, True, B16, B16, B16),
    ({"bf16": True}, True, True, B16, B16, B16),          # Arm's BF16 extension
    ({"avx2": True}, True, True, B16, B16, F32),          # AVX2: bf16 emulated, never measured; weights kept
    ({"avx2": True}, True, False, B16, F32, F32),         # ... and widened at load where the C kernel cannot run
    ({}, True, True, B16, B16, F32),
    ({"avx512_bf16": True}, True, True, F16, F16, F32),   # bf16 instructions do not compute fp16
    ({"avx512_fp16": True}, True, True, F16, F16, F32),   # nor do AVX-512 FP16's, for PyTorch's products
    ({"amx_fp16": True}, True, True, F16, F16, F16),
    ({"fp16_arith": True}, False, True, F16, F16, F32),
    ({"avx512_bf16": True, "avx512_fp16": True}, True, True, F32, F32, F32),  # fp32 stays fp32
])
def test_cpu_default_keeps_the_stored_weights_and_computes_where_the_cpu_is_fast(
        tmp_path, monkeypatch, caps, faster, kernel, stored, weights, compute):
    import cpu_gemv
    import cpu_paths

    measured = []
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: caps)
    monkeypatch.setattr(cpu_paths, "_measured_faster", lambda dtype: measured.append(dtype) or faster)
    monkeypatch.setattr(cpu_gemv, "available", lambda: kernel)
    path, sd = _checkpoint("hf", stored, tmp_path / "hf")
    m = checkpoint.load(path)
    assert {p.dtype for p in m.parameters()} == {weights}
    assert (m.compute_dtype or weights) == compute
    has = stored != F32 and any(caps.get(name) for name in cpu_paths.INSTRUCTIONS[stored])
    assert measured == ([stored] if has else [])  # measured only where the instructions exist
    tokens = torch.tensor([[1, 5, 9, 2, 7]])
    with torch.no_grad():  # whatever the plan, the model computes what the weights it holds give
        want = checkpoint.load(path, dtype=compute)
        want.load_state_dict({k: v.to(compute) for k, v in m.state_dict().items()})
        m.setup_cache(1, 8)
        want.setup_cache(1, 8)
        tol = 1e-5 if compute == F32 else 2e-2
        for start, end in ((0, 3), (3, 4), (4, 5)):  # the prompt's pass, then one token at a time (cpu_gemv.c)
            got, ref = (x.decode(tokens[:, start:end], start) for x in (m, want))
            assert got.dtype == torch.float32 and m.layers[0].attention.cache.k.dtype == compute
            torch.testing.assert_close(got, ref, rtol=tol, atol=tol * ref.abs().max().item())
    assert checkpoint.load(path, dtype="fp32").tok_embeddings.weight.dtype == torch.float32  # --dtype decides
    loaded = checkpoint.load(path, dtype="fp32")
    assert loaded.compute_dtype is None
    from checkpoint import resolve_dtype
    assert resolve_dtype(None, "cuda", stored=torch.float32) == (B16, B16)  # CUDA's default is unchanged


def test_fp32_products_take_the_faster_library_and_keep_fp32_accuracy(monkeypatch):
    """cpu_paths.fp32_products: oneDNN's product where it measures faster and agrees with F.linear,
    F.linear where it is slower, missing, failing or wrong; model.product uses the choice for fp32 on
    a CPU outside autograd, and its result agrees with float64 whichever is chosen."""
    import cpu_paths

    def chosen(**patches):
        with monkeypatch.context() as patch:
            for name, value in patches.items():
                patch.setattr(*value) if isinstance(value, tuple) else patch.setattr(cpu_paths, name, value)
            cpu_paths.fp32_products.cache_clear()
            try:
                return cpu_paths.fp32_products()
            finally:
                cpu_paths.fp32_products.cache_clear()

    F_linear, onednn = torch.nn.functional.linear, cpu_paths.onednn_linear
    timings = iter([])
    fast_onednn = lambda fn, runs=3: next(timings)  # noqa: E731 - F.linear's time first, then oneDNN's
    timings = iter([2.0, 1.0])
    assert chosen(seconds=fast_onednn) is onednn
    timings = iter([1.05, 1.0])  # within the margin: the default stays
    assert chosen(seconds=fast_onednn) is F_linear
    timings = iter([2.0, 1.0])
    assert chosen(seconds=fast_onednn, mkldnn=(torch.backends.mkldnn, "is_available", lambda: False)) is F_linear

    def broken(x, w):
        raise RuntimeError("no such op")

    assert chosen(onednn_linear=broken) is F_linear
    assert chosen(onednn_linear=lambda x, w: F_linear(x, w) * 1.001) is F_linear  # a wrong answer is never used

    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(3, 37, 96, generator=g), torch.randn(80, 96, generator=g)
    exact = F_linear(x.double(), w.double())
    for library in (onednn, F_linear):
        monkeypatch.setattr(cpu_paths, "fp32_products", lambda: library)
        with torch.no_grad():
            assert rel_err(model.product(x, w), exact) < 1e-6
    used = []
    monkeypatch.setattr(cpu_paths, "fp32_products", lambda: lambda a, b: used.append(1) or onednn(a, b))
    layer = model.Linear(96, 80)
    with torch.no_grad():
        layer(x)
    assert used == [1]
    layer(x).sum().backward()  # autograd: F.linear, and a gradient
    assert used == [1] and layer.weight.grad is not None
    with torch.no_grad():
        layer.to(torch.bfloat16)(x.bfloat16())
    assert used == [1]  # bf16 products are F.linear's (oneDNN's own, through PyTorch)


def test_bad_safetensors_files_are_one_line(tmp_path):
    path, _ = _checkpoint("hf", torch.float32, tmp_path / "hf")
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(checkpoint.CheckpointError, match=r"model.safetensors: .*truncated"):
        checkpoint.load(path)
    weights.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00[1,2]")
    with pytest.raises(checkpoint.CheckpointError, match=r"model.safetensors: cannot read .*not a JSON object"):
        checkpoint.load(path)
    weights.write_bytes(b"")
    with pytest.raises(checkpoint.CheckpointError, match=r"model.safetensors: cannot read .*no safetensors header"):
        checkpoint.load(path)


def test_loading_does_not_import_the_compiler(tmp_path):
    """Ops on the meta device run through torch._refs, whose first use imports torch._dynamo: over a
    second of every start of generate.py or eval.py. Building the model to load skips them."""
    path, _ = _checkpoint("hf", torch.bfloat16, tmp_path / "hf")
    code = ("import sys, torch, checkpoint\nm = checkpoint.load(sys.argv[1])\nwith torch.no_grad(): m(torch.arange(1, 9)[None])\n"
            "print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": ROOT})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n_heads,n_kv_heads,length", [(32, 8, 300), (4, 4, 1), (6, 2, 37)])
def test_one_query_attention_equals_sdpa_in_float64(dtype, n_heads, n_kv_heads, length):
    """The decoding step's attention on a CPU (by hand, for bf16 and fp16): the float64 SDPA's result,
    rounded once to the activations' dtype, and as close to it as SDPA's own in that dtype."""
    g = torch.Generator().manual_seed(n_heads + length)
    q, k, v = (torch.randn(2, h, n, 16, generator=g).to(dtype) for h, n in
               ((n_heads, 1), (n_kv_heads, length), (n_kv_heads, length)))
    want = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), enable_gqa=True)
    got = model.one_query_attention(q, k, v)
    assert got.dtype == dtype and got.shape == want.shape
    step = {torch.bfloat16: 2 ** -8, torch.float16: 2 ** -11, torch.float32: 1e-6}[dtype]  # fp32: sums of L terms
    assert (got.double() - want).abs().max() <= step * want.abs().max() + 1e-7
