"""A tag head leaving the trainer, checked in the tools that read it (issue 25, item 5): the PEFT
export (TOKEN_CLS, score's weight and bias under modules_to_save) in peft onto transformers'
LlamaForTokenClassification, the merged HF export and a full fine-tune's HF save in
AutoModelForTokenClassification (id2label/label2id set), `lora.py merge` back in our loader, and the
GGUF export, which leaves the head out. Logits are compared in fp32 at every real token of full and
right-padded rows."""

import copy
import json

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
from test_head_export import export, lora_py

TAGS = ("B-CHEM", "B-DIS", "I-CHEM", "I-DIS", "O")


@pytest.fixture(scope="module")
def tag_base(tmp_path_factory, small_tok):  # noqa: F811
    """A Meta base (no head) with the tokenizer beside it, and a LoRA adapter with a tag head trained
    on it, the adapters, the head's weight and its bias random (non-zero)."""
    root = tmp_path_factory.mktemp("tag")
    torch.manual_seed(0)
    m = model.Transformer(model.ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=small_tok.n_words,
                                          multiple_of=32, rope_theta=500000.0, max_seq_len=64))
    m.init_weights(std=0.08)
    checkpoint.save(m, root / "base")
    (root / "base" / "tokenizer.model").write_bytes(open(small_tok.path, "rb").read())
    heads.attach_head(m, len(TAGS), False, TAGS, pad_id=small_tok.eos_id, kind="tag")
    lora.apply_lora(m, rank=4, alpha=8)
    randomize_adapters(m, seed=1, scale=0.2)
    with torch.no_grad():
        m.score.weight.normal_(0, 0.5)
        m.score.bias.normal_(0, 0.5)
    lora.save_adapter(m, root / "adapter", tokenizer_sha256=small_tok.sha256)
    return {"ckpt": root / "base", "adapter": root / "adapter", "model": m.eval(), "pad": small_tok.eos_id}


def rows(pad, vocab):
    """(tokens, mask): a full row and two right-padded ones; no real token is pad."""
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, vocab - 1, (3, 10), generator=g)
    tokens[tokens >= pad] += 1
    tokens[1, 6:] = pad
    tokens[2, 1:] = pad
    return tokens, tokens != pad


def compare(hf, m, tokens, mask):
    """rel err of transformers' logits against ours at every real token."""
    with torch.no_grad():
        theirs = hf(tokens, attention_mask=mask.long()).logits
        ours = m.tag(tokens)
    return rel_err(theirs[mask], ours[mask])


def check_head_config(config, b):
    assert (config.num_labels, config.pad_token_id) == (len(TAGS), b["pad"])
    assert config.id2label == dict(enumerate(TAGS)) and config.label2id == {name: i for i, name in enumerate(TAGS)}


def test_adapter_records_the_tag_head(tag_base):
    meta = json.load(open(tag_base["adapter"] / "adapter.json"))
    assert meta["head"] == {"n_labels": 5, "multilabel": False, "labels": list(TAGS), "pad_id": tag_base["pad"],
                            "kind": "tag"}
    tensors = load_file(tag_base["adapter"] / "adapter.safetensors")
    assert torch.equal(tensors["score.bias"], tag_base["model"].score.bias)
    reloaded = lora.load_adapter(checkpoint.load(tag_base["ckpt"]), tag_base["adapter"]).eval()
    tokens, mask = rows(tag_base["pad"], reloaded.args.vocab_size)
    with torch.no_grad():
        assert torch.equal(reloaded.tag(tokens), tag_base["model"].tag(tokens))
    classify = checkpoint.load(tag_base["ckpt"])
    heads.attach_head(classify, 5, False, TAGS, pad_id=tag_base["pad"])  # the same labels, the other kind
    with pytest.raises(lora.AdapterError, match="adapter's tag head is for labels"):
        lora.load_adapter(classify, tag_base["adapter"])
    with pytest.raises(lora.AdapterError, match="head: kind 'ner' is not one of classify, tag"):
        lora.check_head_config({**meta["head"], "kind": "ner"}, "adapter.json: head")


def test_peft_export_loads_as_a_token_cls_adapter(tag_base, tmp_path, monkeypatch):
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForTokenClassification, LlamaForTokenClassification

    b = tag_base
    hf_base = tmp_path / "hf_base"  # the base in transformers' layout, no head: as a hub base is
    checkpoint.save_hf(checkpoint.load(b["ckpt"]), hf_base)
    r = export(b, tmp_path / "peft", "--format", "peft", "--base", hf_base)
    out = tmp_path / "peft"
    assert r.stderr == f"lora.py: a TOKEN_CLS adapter; load it with {lora.peft_head_recipe(hf_base, out, 'tag')}\n"
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["task_type"], config["modules_to_save"]) == ("TOKEN_CLS", ["score"])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    scope = {"AutoConfig": AutoConfig, "AutoModelForTokenClassification": AutoModelForTokenClassification,
             "PeftModel": PeftModel, "json": json}
    exec(lora.peft_head_recipe(hf_base, out, "tag"), scope)  # the line the export printed, as a user runs it
    peft_model = scope["model"].float().eval()
    assert isinstance(peft_model.base_model.model, LlamaForTokenClassification)
    check_head_config(peft_model.config, b)
    tokens, mask = rows(b["pad"], b["model"].args.vocab_size)
    assert compare(peft_model, b["model"], tokens, mask) < 1e-5
    # peft's own save of what it loaded: the same tensor names, the head's weight and bias among them
    peft_model.save_pretrained(tmp_path / "resaved")
    again, written = (load_file(d / "adapter_model.safetensors") for d in (tmp_path / "resaved", out))
    assert set(again) == set(written)
    assert all(torch.equal(again[k], written[k]) for k in written)
    assert torch.equal(written["base_model.model.score.weight"], b["model"].score.weight)
    assert torch.equal(written["base_model.model.score.bias"], b["model"].score.bias)


def test_hf_export_and_full_save_load_as_token_classifiers(tag_base, tmp_path):
    from transformers import AutoModelForTokenClassification, LlamaForTokenClassification

    b = tag_base
    export(b, tmp_path / "merged", "--format", "hf")
    full = lora.merge_lora(copy.deepcopy(b["model"]))  # the adapter folded in: a full fine-tune's weights
    checkpoint.save_hf(full, tmp_path / "full")
    tokens, mask = rows(b["pad"], b["model"].args.vocab_size)
    for directory, reference in ((tmp_path / "merged", b["model"]), (tmp_path / "full", full)):
        hf = AutoModelForTokenClassification.from_pretrained(directory, dtype=torch.float32).eval()
        assert type(hf) is LlamaForTokenClassification
        check_head_config(hf.config, b)
        assert compare(hf, reference, tokens, mask) < 1e-5


def test_merge_keeps_the_tag_head(tag_base, tmp_path):
    b = tag_base
    lora_py("merge", "--ckpt_dir", b["ckpt"], "--adapter", b["adapter"], "--out", tmp_path / "merged")
    merged = checkpoint.load(tmp_path / "merged").eval()
    assert heads.head_config(merged.args) == heads.head_config(b["model"].args)
    assert merged.args.head_kind == "tag"
    tokens, mask = rows(b["pad"], b["model"].args.vocab_size)
    with torch.no_grad():
        assert rel_err(merged.tag(tokens), b["model"].tag(tokens)) < 1e-5


def test_gguf_export_leaves_the_tag_head_out(tag_base, tmp_path):
    import gguf

    export(tag_base, tmp_path / "g", "--format", "gguf", "--gguf_type", "f32")
    names = {t.name for t in gguf.GGUFReader(str(tmp_path / "g" / "model.gguf")).tensors}
    lm = {k for k in lora.merged_state_dict(tag_base["model"]) if not k.startswith("score.")}
    assert names == {gguf_export.gguf_name(k) for k in lm} and not any("cls" in n or "score" in n for n in names)
