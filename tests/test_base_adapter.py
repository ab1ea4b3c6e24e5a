"""The two-step recipe (Clinical LLaMA-LoRA): a domain LoRA trained on plain notes, merged into the
frozen base as it loads (train.py --base_adapter), and a downstream LoRA + head trained on top. Each
result is checked against a model built by hand from the files (every adapter's scale * B A added to
the base weights in plain torch) or against transformers on the HF export; the chain recorded in
adapter.json is checked wherever the result is loaded (eval.py, lora.py, --resume)."""

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import checkpoint
import heads
import lora
import model
import tokenizer
from ckpt_utils import rel_err
from data import shards
from test_head_training import HEAD, base, labelled  # noqa: F401 (fixtures)
from test_train import TINY, _corpus, _one_line_error, interrupt_after, log, losses, prepare, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = [*TINY, "--batch_size", "4", "--eval_every", "100"]  # plain LM loss on notes


@pytest.fixture(scope="module")
def text(tmp_path_factory, labelled):  # noqa: F811
    """Unlabelled notes (plain token shards) with the labelled shards' tokenizer."""
    d = tmp_path_factory.mktemp("text")
    _corpus(d / "notes.jsonl")
    prepare(d / "notes.jsonl", d / "shards", "--tokenizer", labelled / "tokenizer.model")
    return d / "shards"


@pytest.fixture(scope="module")
def domain(tmp_path_factory, text, base):  # noqa: F811
    """Step 1: the domain LoRA, LM loss on the notes."""
    out = tmp_path_factory.mktemp("domain")
    train(*TEXT, "--data", text, "--ckpt_dir", base, "--lora_rank", "4", "--max_steps", "8", "--lr", "1e-2",
          "--out_dir", out)
    return out / "adapter"


@pytest.fixture(scope="module")
def downstream(tmp_path_factory, labelled, base, domain):  # noqa: F811
    """Step 2: a downstream LoRA + head on base + domain."""
    out = tmp_path_factory.mktemp("downstream")
    train(*HEAD, "--data", labelled, "--ckpt_dir", base, "--base_adapter", domain, "--lora_rank", "4",
          "--max_steps", "8", "--lr", "1e-2", "--out_dir", out)
    return out / "adapter"


def sha256(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@torch.no_grad()
def by_hand(base_dir, *adapters):  # noqa: F811
    """The base with each adapter's scale * B A added to its weights in turn (fp32), and the last
    one's head: what base + chain + adapter computes, without lora.py."""
    m = checkpoint.load(base_dir, dtype=torch.float32)
    weights = dict(m.named_parameters())
    for d in adapters:
        cfg, t = json.load(open(d / "adapter.json")), load_file(d / "adapter.safetensors")
        assert not cfg["use_rslora"]
        for name in {k.rpartition(".")[0] for k in t if k.endswith("lora_A")}:
            weights[f"{name}.weight"] += cfg["alpha"] / cfg["rank"] * (t[f"{name}.lora_B"] @ t[f"{name}.lora_A"])
        if "score.weight" in t:
            h = cfg["head"]
            heads.attach_head(m, h["n_labels"], h["multilabel"], h["labels"], h["pad_id"])
            m.score.weight.copy_(t["score.weight"])
    return m.eval()


def run(script, *args):
    return subprocess.run([sys.executable, script, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def one_line(r, *parts):
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and all(p in lines[0] for p in parts), r.stderr[-2000:]


def tokens(labelled, n=3, length=20):  # noqa: F811
    """Token ids without the pad (eos) id, so every pooling rule takes the last one."""
    pad = shards.load_meta(labelled)["eos_id"]
    t = torch.randint(0, 300, (n, length), generator=torch.Generator().manual_seed(0))
    return torch.where(t == pad, (t + 1) % 300, t)


# -- what the downstream adapter records and computes ------------------------------------------------


def test_downstream_records_the_chain_and_the_plain_base(downstream, domain, base):  # noqa: F811
    meta, domain_meta = (json.load(open(d / "adapter.json")) for d in (downstream, domain))
    assert meta["base_adapters"] == [{"path": str(domain), "sha256": sha256(domain / "adapter.safetensors"),
                                      "relative": os.path.relpath(domain, downstream)}]
    assert "base_adapters" not in domain_meta  # an adapter on the plain base records no chain
    plain = lora.base_fingerprint(checkpoint.load(base))
    assert meta["base_fingerprint"] == domain_meta["base_fingerprint"] == plain  # check_base keeps its meaning


def test_eval_classify_equals_base_plus_domain_plus_downstream(downstream, domain, base, tmp_path):  # noqa: F811
    notes = ["patient reports fever and cough since monday", "denies chest pain mild rash",
             "fever nausea headache", "reports mild headache"]
    data = tmp_path / "val.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": "yes" if "fever" in t else "no"}) + "\n" for t in notes))
    r = run("eval.py", "--ckpt_dir", base, "--adapter", downstream, "--task", "classify", "--data", data,
            "--out", tmp_path / "r.json", "--mlflow", "false")
    assert r.returncode == 0, r.stderr
    got = [item["probabilities"] for item in json.load(open(tmp_path / "r.json"))["items"]]
    tok = tokenizer.load(base / "tokenizer.model")
    ids = [torch.tensor([tok.encode(t, bos=True, eos=True)]) for t in notes]
    with torch.no_grad():
        want = [by_hand(base, domain, downstream).classify(x).softmax(-1)[0] for x in ids]
        without_domain = [by_hand(base, downstream).classify(x).softmax(-1)[0] for x in ids]
        in_memory = lora.load_adapter(checkpoint.load(base), downstream).eval()
        assert rel_err(torch.cat([in_memory.classify(x) for x in ids]),
                       torch.cat([by_hand(base, domain, downstream).classify(x) for x in ids])) < 1e-5
    for g, w in zip(got, want):
        assert g == pytest.approx(w.tolist(), abs=1e-6)
    assert max((w - v).abs().max().item() for w, v in zip(want, without_domain)) > 1e-3  # the domain matters


def test_changed_or_missing_base_adapter_is_one_line(downstream, domain, base, labelled, tmp_path):  # noqa: F811
    data = tmp_path / "val.jsonl"
    data.write_text(json.dumps({"text": "fever", "label": "yes"}) + "\n")
    weights, original = domain / "adapter.safetensors", (domain / "adapter.safetensors").read_bytes()
    moved = tmp_path / "moved"
    try:
        t = load_file(weights)
        t[next(iter(t))] += 1e-3
        save_file(t, weights, metadata={"adapter_json": json.dumps(json.load(open(domain / "adapter.json")),
                                                                   sort_keys=True)})
        r = run("eval.py", "--ckpt_dir", base, "--adapter", downstream, "--task", "classify", "--data", data,
                "--out", tmp_path / "r.json", "--mlflow", "false")
        one_line(r, str(downstream), str(domain), "has changed", "put the one it was trained on back")
        changed = lora.merge_base_adapter(checkpoint.load(base), domain)  # as train.py --resume merges it
        now = re.escape(f"this model has {domain} (sha256 {sha256(weights)[:12]}")
        with pytest.raises(lora.AdapterError, match=now):
            lora.load_adapter(changed, downstream)
        weights.write_bytes(original)
        shutil.move(domain, moved)
        r = run("lora.py", "export", "--format", "hf", "--ckpt_dir", base, "--adapter", downstream,
                "--out", tmp_path / "hf")
        one_line(r, str(downstream), str(domain), "missing", "put that adapter back there")
        assert not (tmp_path / "hf").exists()
        with pytest.raises(lora.AdapterError, match="missing"):
            lora.load_adapter(checkpoint.load(base), downstream)
    finally:
        if moved.exists():
            shutil.move(moved, domain)
        weights.write_bytes(original)
    lora.load_adapter(checkpoint.load(base), downstream)  # back where it was: loads again


def test_adapters_moved_together_still_find_each_other(downstream, domain, base, tmp_path):  # noqa: F811
    """out/ copied to another machine: the chain is found at the same place relative to the adapter
    trained on it (adapter.json base_adapters[].relative), checked by its sha256 as before."""
    common = os.path.commonpath([domain, downstream])
    copied = {d: tmp_path / "copy" / os.path.relpath(d, common) for d in (domain, downstream)}
    for d, there in copied.items():
        shutil.copytree(d, there)
    want = lora.load_adapter(checkpoint.load(base), downstream)
    hidden = tmp_path / "hidden"
    shutil.move(domain, hidden)  # the recorded absolute path no longer exists
    try:
        got = lora.load_adapter(checkpoint.load(base), copied[downstream])
        assert got.base_adapters[0]["path"] == str(copied[domain])  # recorded where it was found
        tokens = torch.tensor([[1, 5, 9, 2]])
        with torch.no_grad():
            assert torch.equal(got.classify(tokens), want.classify(tokens))
        (copied[domain] / "adapter.safetensors").write_bytes(b"")  # found there, but not the same file
        with pytest.raises(lora.AdapterError, match="missing|changed"):
            lora.load_adapter(checkpoint.load(base), copied[downstream])
    finally:
        shutil.move(hidden, domain)


# -- exports -----------------------------------------------------------------------------------------


def test_export_hf_of_a_chain_equals_in_memory_and_peft_is_refused(downstream, domain, base, labelled,  # noqa: F811
                                                                    tmp_path):
    from transformers import AutoModelForSequenceClassification

    r = run("lora.py", "export", "--format", "hf", "--ckpt_dir", base, "--adapter", downstream,
            "--out", tmp_path / "hf")
    assert r.returncode == 0, r.stderr
    x = tokens(labelled)
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        want = by_hand(base, domain, downstream).classify(x)
        assert rel_err(hf(x).logits, want) < 1e-5
        assert rel_err(lora.load_adapter(checkpoint.load(base), downstream).eval().classify(x), want) < 1e-5
    r = run("lora.py", "merge", "--ckpt_dir", base, "--adapter", downstream, "--out", tmp_path / "merged")
    assert r.returncode == 0, r.stderr
    with torch.no_grad():
        assert rel_err(checkpoint.load(tmp_path / "merged").classify(x), want) < 1e-5
    r = run("lora.py", "export", "--format", "peft", "--ckpt_dir", base, "--adapter", downstream,
            "--out", tmp_path / "peft")
    one_line(r, "--format peft", str(domain), "--format hf")
    assert not (tmp_path / "peft").exists()


# -- chains, resume, NF4, full fine-tunes --------------------------------------------------------------


def test_a_chain_of_two_loads_in_order(text, base, domain, labelled, tmp_path):  # noqa: F811
    """An adapter trained on base + domain can itself be a base adapter: the chain grows."""
    train(*TEXT, "--data", text, "--ckpt_dir", base, "--base_adapter", domain, "--lora_rank", "2",
          "--max_steps", "4", "--lr", "1e-2", "--out_dir", tmp_path / "second")
    second = tmp_path / "second" / "adapter"
    train(*TEXT, "--data", text, "--ckpt_dir", base, "--base_adapter", second, "--lora_rank", "4",
          "--max_steps", "4", "--lr", "1e-2", "--out_dir", tmp_path / "third")
    third = tmp_path / "third" / "adapter"
    assert [link["path"] for link in json.load(open(third / "adapter.json"))["base_adapters"]] == \
        [str(domain), str(second)]
    x = tokens(labelled)
    with torch.no_grad():
        got = lora.load_adapter(checkpoint.load(base), third).eval()(x)
        assert rel_err(got, by_hand(base, domain, second, third)(x)) < 1e-5
        assert rel_err(got, by_hand(base, second, third)(x)) > 1e-4  # every link counts


def test_resume_with_a_chain_equals_uninterrupted(labelled, base, domain, text, tmp_path):  # noqa: F811
    common = [*HEAD, "--data", labelled, "--ckpt_dir", base, "--base_adapter", domain, "--lora_rank", "4",
              "--max_steps", "20", "--save_every", "1000"]
    train(*common, "--out_dir", tmp_path / "straight")
    status, err = interrupt_after([*common, "--out_dir", tmp_path / "cut"], tmp_path / "cut", 5, signal.SIGTERM)
    assert status == 130, err
    i = common.index("--base_adapter")
    without = common[:i] + common[i + 2:]
    _one_line_error(train(*without, "--out_dir", tmp_path / "cut", "--resume", "--resume_with_changes", check=False),
                    "--base_adapter (none) differs")
    train(*common, "--out_dir", tmp_path / "cut", "--resume")
    assert losses(tmp_path / "cut") == losses(tmp_path / "straight")
    assert [r.get("val_loss") for r in log(tmp_path / "cut")] == [r.get("val_loss") for r in log(tmp_path / "straight")]


def first_loss_by_hand(m, data):
    """The loss of the first training batch (TEXT: batch 4 x 32, seed 1337) on model m."""
    x, y, _ = shards.DataLoader(str(data), "train", 4, 32, seed=1337).next_batch()
    with torch.no_grad():
        return m(x, y).item()


def test_qlora_merges_before_quantizing(text, base, domain, tmp_path):  # noqa: F811
    train(*TEXT, "--data", text, "--ckpt_dir", base, "--base_adapter", domain, "--lora_rank", "4", "--quantize",
          "nf4", "--max_steps", "1", "--out_dir", tmp_path)
    want = first_loss_by_hand(model.nf4_projections(by_hand(base, domain)), text)  # NF4(base + domain)
    assert log(tmp_path)[0]["loss"] == pytest.approx(want, abs=2e-6)
    assert abs(first_loss_by_hand(checkpoint.load(base, quantize="nf4"), text) - want) > 1e-4
    meta = json.load(open(tmp_path / "adapter" / "adapter.json"))
    assert meta["base_quantize"] == "nf4" and meta["base_adapters"][0]["path"] == str(domain)
    assert meta["base_fingerprint"] == lora.base_fingerprint(checkpoint.load(base))
    sample = ["--ckpt_dir", base, "--adapter", tmp_path / "adapter", "--prompt", "fever", "--max_new_tokens", "2"]
    one_line(run("generate.py", *sample, "--quantize", "nf4"), str(domain), "without --quantize")  # NF4 takes no merge
    r = run("generate.py", *sample)  # full precision: the chain merged, then the adapter (as lora.py merge does)
    assert r.returncode == 0, r.stderr


def test_full_fine_tune_starts_from_base_plus_domain(text, base, domain, tmp_path):  # noqa: F811
    train(*TEXT, "--data", text, "--ckpt_dir", base, "--base_adapter", domain, "--max_steps", "1", "--lr", "1e-9",
          "--out_dir", tmp_path)
    assert log(tmp_path)[0]["loss"] == pytest.approx(first_loss_by_hand(by_hand(base, domain), text), abs=2e-6)
    saved = checkpoint.load(tmp_path / "model")  # the merged model itself: no chain to record
    assert rel_err(saved.layers[0].attention.wq.weight, by_hand(base, domain).layers[0].attention.wq.weight) < 1e-6


def test_bad_base_adapters_are_one_line(text, base, domain, downstream, tmp_path):  # noqa: F811
    common = [*TEXT, "--data", text, "--out_dir", tmp_path / "o", "--max_steps", "1"]
    _one_line_error(train(*common, "--base_adapter", domain, check=False), "--base_adapter needs --ckpt_dir")
    _one_line_error(train(*common, "--ckpt_dir", base, "--base_adapter", domain, "--fsdp", check=False),
                    "not yet with --fsdp")
    _one_line_error(train(*common, "--ckpt_dir", base, "--base_adapter", tmp_path / "nowhere", "--lora_rank", "4",
                          check=False), str(tmp_path / "nowhere"))
    _one_line_error(train(*common, "--ckpt_dir", base, "--base_adapter", downstream, "--lora_rank", "4", check=False),
                    "cannot be a base adapter")
    assert not (tmp_path / "o" / "adapter").exists()
