"""A classification head leaving the trainer, checked in the tools that read it (issue 24, item 7):
the PEFT export (SEQ_CLS, the head under modules_to_save) in peft onto transformers'
LlamaForSequenceClassification, the merged HF export and a full fine-tune's HF save in
AutoModelForSequenceClassification (binary, multiclass, multilabel), `lora.py merge` back in our
loader, and the GGUF export, which leaves the head out. Logits are compared in fp32 on right- and
left-padded rows."""

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import checkpoint
import gguf_export
import heads
import lora
import model
from ckpt_utils import randomize_adapters, rel_err
from test_export import small_tok, tok3  # noqa: F401 (fixtures: Llama 3's BPE cut to 3000 ranks)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADS = {"binary": (2, False, ("lived", "died")), "multiclass": (3, False, ("<3d", "3-7d", ">7d")),
         "multilabel": (4, True, ("401.9", "428.0", "584.9", "V45.81"))}
PROBLEM = {False: "single_label_classification", True: "multi_label_classification"}


def make_head_adapter(root, tok, kind):
    """A Meta base (no head) with tok's file beside it, and a LoRA adapter with a head for HEADS[kind]
    trained on it, every adapter and the head random (non-zero). Returns the paths and the model
    (the base with the adapter and head on it, eval mode)."""
    n_labels, multilabel, labels = HEADS[kind]
    torch.manual_seed(0)
    m = model.Transformer(model.ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tok.n_words,
                                          multiple_of=32, rope_theta=500000.0, max_seq_len=64))
    m.init_weights(std=0.08)
    checkpoint.save(m, root / "base")
    (root / "base" / "tokenizer.model").write_bytes(open(tok.path, "rb").read())
    heads.attach_head(m, n_labels, multilabel, labels, pad_id=tok.eos_id)
    lora.apply_lora(m, rank=4, alpha=8)
    randomize_adapters(m, seed=1, scale=0.2)
    with torch.no_grad():
        m.score.weight.normal_(0, 0.5)
    lora.save_adapter(m, root / "adapter", tokenizer_sha256=tok.sha256)
    return {"ckpt": root / "base", "adapter": root / "adapter", "model": m.eval(), "pad": tok.eos_id}


@pytest.fixture(scope="module", params=list(HEADS))
def head_base(request, tmp_path_factory, small_tok):  # noqa: F811
    return make_head_adapter(tmp_path_factory.mktemp(request.param), small_tok, request.param) | {"kind": request.param}


def lora_py(*argv):
    r = subprocess.run([sys.executable, "lora.py", *map(str, argv)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r


def export(b, out, *flags):
    return lora_py("export", "--ckpt_dir", b["ckpt"], "--adapter", b["adapter"], "--out", out, *flags)


def padded(pad, vocab):
    """Rows: full, right-padded, left-padded, a single token then padding; no real token is pad."""
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, vocab - 1, (4, 10), generator=g)
    tokens[tokens >= pad] += 1
    tokens[1, 6:] = pad
    tokens[2, :4] = pad
    tokens[3, 1:] = pad
    return tokens


def theirs(hf, tokens, pad):
    """transformers' logits with the attention mask, positions counted from each row's first token
    (left padding shifts none), as a generation-style caller passes them."""
    mask = (tokens != pad).long()
    with torch.no_grad():
        return hf(tokens, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits


def ours(m, tokens):
    with torch.no_grad():
        return m.classify(tokens)


def check_head_config(config, b):
    n_labels, multilabel, labels = HEADS[b["kind"]]
    assert (config.num_labels, config.problem_type, config.pad_token_id) == (n_labels, PROBLEM[multilabel], b["pad"])
    assert config.id2label == dict(enumerate(labels)) and config.label2id == {name: i for i, name in enumerate(labels)}


def test_peft_export_loads_as_a_seq_cls_adapter(head_base, tmp_path, monkeypatch):
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForSequenceClassification, LlamaForSequenceClassification

    b = head_base
    hf_base = tmp_path / "hf_base"  # the base in transformers' layout, no head: as a hub base is
    checkpoint.save_hf(checkpoint.load(b["ckpt"]), hf_base)
    r = export(b, tmp_path / "peft", "--format", "peft", "--base", hf_base)
    out = tmp_path / "peft"
    assert r.stderr == f"lora.py: a SEQ_CLS adapter; load it with {lora.peft_head_recipe(hf_base, out)}\n"
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["task_type"], config["modules_to_save"]) == ("SEQ_CLS", ["score"])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert config["base_model_name_or_path"] == str(hf_base)
    scope = {"AutoConfig": AutoConfig, "AutoModelForSequenceClassification": AutoModelForSequenceClassification,
             "PeftModel": PeftModel, "json": json}
    exec(lora.peft_head_recipe(hf_base, out), scope)  # the line the export printed, as a user runs it
    peft_model = scope["model"].float().eval()
    assert isinstance(peft_model.base_model.model, LlamaForSequenceClassification)
    check_head_config(peft_model.config, b)
    tokens = padded(b["pad"], b["model"].args.vocab_size)
    assert rel_err(theirs(peft_model, tokens, b["pad"]), ours(b["model"], tokens)) < 1e-5
    # peft's own save of what it loaded: the same tensor names, the head among them, and the same values
    peft_model.save_pretrained(tmp_path / "resaved")
    again, written = (load_file(d / "adapter_model.safetensors") for d in (tmp_path / "resaved", out))
    assert set(again) == set(written) and "base_model.model.score.weight" in written
    assert all(torch.equal(again[k], written[k]) for k in written)
    assert torch.equal(written["base_model.model.score.weight"], b["model"].score.weight)


def test_hf_export_and_full_save_load_as_sequence_classifiers(head_base, tmp_path):
    from transformers import AutoModelForSequenceClassification, LlamaForSequenceClassification

    b = head_base
    export(b, tmp_path / "merged", "--format", "hf")
    full = lora.merge_lora(copy.deepcopy(b["model"]))  # the adapter folded in: a full fine-tune's weights
    checkpoint.save_hf(full, tmp_path / "full")  # a full fine-tune's head checkpoint: no adapter
    tokens = padded(b["pad"], b["model"].args.vocab_size)
    for directory, reference in ((tmp_path / "merged", b["model"]), (tmp_path / "full", full)):
        hf = AutoModelForSequenceClassification.from_pretrained(directory, dtype=torch.float32).eval()
        assert type(hf) is LlamaForSequenceClassification
        check_head_config(hf.config, b)
        assert rel_err(theirs(hf, tokens, b["pad"]), ours(reference, tokens)) < 1e-5


def test_merge_keeps_the_head(head_base, tmp_path):
    b = head_base
    lora_py("merge", "--ckpt_dir", b["ckpt"], "--adapter", b["adapter"], "--out", tmp_path / "merged")
    merged = checkpoint.load(tmp_path / "merged").eval()
    assert heads.head_config(merged.args) == heads.head_config(b["model"].args)
    tokens = padded(b["pad"], b["model"].args.vocab_size)
    assert rel_err(ours(merged, tokens), ours(b["model"], tokens)) < 1e-5


def test_gguf_export_leaves_the_head_out(small_tok, tmp_path):  # noqa: F811
    import gguf

    b = make_head_adapter(tmp_path, small_tok, "multiclass")
    r = export(b, tmp_path / "g", "--format", "gguf", "--gguf_type", "f32")
    assert [line for line in r.stderr.splitlines() if "head" in line] == \
        ["gguf_export: the classification head (score.weight, 3 labels) is not in the GGUF, which holds the "
         "language model only (llama.cpp has no such head)"]
    reader = gguf.GGUFReader(str(tmp_path / "g" / "model.gguf"))
    names = {t.name for t in reader.tensors}
    lm = {k: v for k, v in lora.merged_state_dict(b["model"]).items() if k != "score.weight"}
    assert names == {gguf_export.gguf_name(k) for k in lm} and not any("cls" in n or "score" in n for n in names)
    assert checkpoint.gguf_name("score.weight") is None and checkpoint.hf_name("score.weight") == "score.weight"
    tensors = {t.name: t for t in reader.tensors}
    want = lm["layers.1.attention.wv.weight"].float().numpy()
    got = tensors["blk.1.attn_v.weight"].data.reshape(want.shape)
    assert (got == want).all()  # f32: the merged language model as it is
