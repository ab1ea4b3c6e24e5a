"""Hostile JSON, every reader (issue 21): a file or record nested 100,000 deep, of the wrong top-level
type, with a field of the wrong type or missing, or with a size no machine holds, stops the command
with exit status 1 and one line naming the file (and the key), no traceback, and nothing of the
user's changed; the Python API raises the module's own error class. The commands run in this
process through cli.run, as their scripts run them (fast); test_scripts_end_in_one_line runs the
scripts themselves on the deepest files."""

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys

import pytest
import torch

import checkpoint
import cli
import eval as evaluation
import generate
import lora
import model
import tokenizer
from data import prepare, shards

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEEP = 100_000


def deep_list(n=DEEP):
    return "[" * n + "]" * n


def deep_object(n=DEEP):
    return '{"a": ' * n + "1" + "}" * n


# -- a tiny user's world: shards with their own sentencepiece vocabulary, a model over it in both
# layouts (HF also indexed), an adapter, data records ----------------------------------------------


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    root = tmp_path_factory.mktemp("pristine")
    words = "patient reports chest pain and shortness of breath denies fever plan follow up".split()
    lines = [" ".join(words[(i * 7 + j) % len(words)] for j in range(12)) for i in range(300)]
    (root / "corpus.jsonl").write_text("".join(json.dumps({"text": line}) + "\n" for line in lines))
    prepare.main(["--input", str(root / "corpus.jsonl"), "--out", str(root / "shards"), "--vocab_size", "300",
                  "--workers", "1", "--val_fraction", "0.2"])
    tok = tokenizer.load(root / "shards")
    torch.manual_seed(0)
    m = model.Transformer(model.ModelArgs(dim=16, n_layers=1, n_heads=2, vocab_size=tok.n_words, multiple_of=16,
                                          max_seq_len=32))
    m.init_weights()
    checkpoint.save(m, root / "meta")
    checkpoint.save_hf(m, root / "hf")
    shutil.copytree(root / "hf", root / "hfi")
    names = checkpoint.map_safetensors(root / "hf" / "model.safetensors")[1]
    (root / "hfi" / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {name: "model.safetensors" for name in names}}))
    for d in ("meta", "hf", "hfi"):
        shutil.copy(root / "shards" / "tokenizer.model", root / d / "tokenizer.model")
    lora.apply_lora(m, 2, 4)
    lora.save_adapter(m, root / "adapter")
    (root / "tok").mkdir()
    (root / "data.jsonl").write_text(json.dumps({"prompt": "chest", "reference": "pain"}) + "\n")
    (root / "prompts.jsonl").write_text(json.dumps({"id": 1, "prompt": "chest"}) + "\n")
    return root


@pytest.fixture
def world(pristine, tmp_path):
    shutil.copytree(pristine, tmp_path / "w")
    return tmp_path / "w"


def snapshot(root):
    """{path: sha256} of every file under root: what the user has."""
    out = {}
    for d, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(d, name), "rb") as f:
                out[os.path.join(d, name)] = hashlib.sha256(f.read()).hexdigest()
    return out


# -- each command, as its script runs it, and the Python API each reader has ---------------------------

GEN = ["generate.py", generate.main, generate.CHECKS]
EVAL = ["eval.py", evaluation.main, evaluation.CHECKS]


def command(entry, w):
    """(prog, main, checks, argv) of the command that reads entry's file."""
    ckpt = {"hf": "hf", "index": "hfi", "safetensors": "hf"}.get(entry, "meta")
    gen = ["--ckpt_dir", w / ckpt, "--prompt", "chest", "--max_new_tokens", "1"]
    evaluate = ["--ckpt_dir", w / "meta", "--out", w / "results.json", "--mlflow", "false"]
    argv = {"adapter": gen + ["--adapter", w / "adapter"], "adapter_meta": gen + ["--adapter", w / "adapter"],
            "tokenizer": gen + ["--tokenizer", w / "tok" / "tokenizer.json"],
            "prompts": gen[:2] + ["--prompts_file", w / "prompts.jsonl", "--max_new_tokens", "1"],
            "eval": evaluate + ["--task", "generate", "--data", w / "data.jsonl"],
            "shards": evaluate + ["--task", "perplexity", "--data", w / "shards"],
            "prepare": ["--input", w / "corpus.jsonl", "--out", w / "out", "--tokenizer", w / "shards", "--workers", "1"],
            "prepare_array": ["--input", w / "corpus.json", "--out", w / "out", "--tokenizer", w / "shards",
                              "--workers", "1"]}.get(entry, gen)
    if entry in ("eval", "shards"):
        return (*EVAL, argv)
    if entry.startswith("prepare"):
        return "python -m data.prepare", prepare.cli_prepare, prepare.CHECKS, argv
    return (*GEN, argv)


def api(entry, w):
    """The Python call that reads entry's file, and the error class it must raise (None: no API)."""
    calls = {"meta": (lambda: checkpoint.load(w / "meta"), checkpoint.CheckpointError),
             "hf": (lambda: checkpoint.load(w / "hf"), checkpoint.CheckpointError),
             "index": (lambda: checkpoint.load(w / "hfi"), checkpoint.CheckpointError),
             "safetensors": (lambda: checkpoint.load(w / "hf"), checkpoint.CheckpointError),
             "adapter": (lambda: lora.load_adapter(checkpoint.load(w / "meta"), w / "adapter"), lora.AdapterError),
             "adapter_meta": (lambda: lora.load_adapter(checkpoint.load(w / "meta"), w / "adapter"), lora.AdapterError),
             "tokenizer": (lambda: tokenizer.load(w / "tok" / "tokenizer.json"), tokenizer.TokenizerError),
             "shards": (lambda: shards.load_meta(w / "shards"), shards.ShardError)}
    return calls.get(entry, (None, None))


# -- the damage: (entry, file, how, words the line must hold besides the file's name) --------------


def edit(**changes):
    """A damage that sets keys of a JSON object file (a value of DELETE removes the key)."""
    def apply(path):
        obj = json.loads(path.read_text())
        for key, value in changes.items():
            target, _, leaf = key.rpartition("/")
            inner = obj
            for part in filter(None, target.split("/")):
                inner = inner[part]
            if value is DELETE:
                del inner[leaf]
            else:
                inner[leaf] = value
        path.write_text(json.dumps(obj))
    return apply


DELETE = object()


def text(content):
    return lambda path: path.write_text(content)


def safetensors_header(header):
    """A damage that replaces a .safetensors file's JSON header (the tensors' bytes stay)."""
    def apply(path):
        data = path.read_bytes()
        n = struct.unpack("<Q", data[:8])[0]
        raw = header.encode()
        path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])
    return apply


def adapter_metadata(value):
    def apply(path):
        from safetensors.torch import load_file, save_file

        save_file(load_file(path), path, metadata={"adapter_json": value})
    return apply


def jsonl_line(line):
    """A damage that makes line 2 of a JSONL file this text."""
    def apply(path):
        first = path.read_text().splitlines()[0]
        path.write_text(first + "\n" + line + "\n")
    return apply


def make_array(content):
    return lambda path: path.with_name("corpus.json").write_text(content)


CASES = [
    # Meta params.json
    ("meta", "meta/params.json", text(deep_list()), ["nested deeper than 64"]),
    ("meta", "meta/params.json", text("[1, 2]"), ["object expected"]),
    ("meta", "meta/params.json", edit(n_heads="abc"), ["n_heads", "'abc'"]),
    ("meta", "meta/params.json", edit(dim=DELETE), ["dim", "missing"]),
    ("meta", "meta/params.json", edit(max_seq_len=10**13), ["max_seq_len", "memory"]),
    ("meta", "meta/params.json", edit(n_layers=10**6), ["n_layers"]),
    ("meta", "meta/params.json", edit(dim=2**20), ["dim"]),
    ("meta", "meta/params.json", edit(vocab_size=10**12), ["vocab_size"]),
    ("meta", "meta/params.json", edit(multiple_of=10**12), ["multiple_of"]),
    ("meta", "meta/params.json", edit(rope_theta=[1]), ["rope_theta"]),
    ("meta", "meta/params.json", edit(n_heads=16, n_kv_heads=16), ["n_heads 16", "even"]),
    # HF config.json
    ("hf", "hf/config.json", text(deep_object()), ["nested deeper than 64"]),
    ("hf", "hf/config.json", text('"llama"'), ["object expected"]),
    ("hf", "hf/config.json", edit(hidden_size="16"), ["hidden_size"]),
    ("hf", "hf/config.json", edit(num_attention_heads=DELETE), ["num_attention_heads", "missing"]),
    ("hf", "hf/config.json", edit(max_position_embeddings=10**13), ["max_position_embeddings", "memory"]),
    ("hf", "hf/config.json", edit(num_hidden_layers=10**6), ["num_hidden_layers"]),
    ("hf", "hf/config.json", edit(intermediate_size=10**12), ["intermediate_size"]),
    ("hf", "hf/config.json", edit(vocab_size=10**12), ["vocab_size"]),
    ("hf", "hf/config.json", edit(num_key_value_heads=[2]), ["num_key_value_heads"]),
    ("hf", "hf/config.json", edit(rope_scaling="llama3"), ["rope_scaling"]),
    ("hf", "hf/config.json", edit(rope_scaling={"rope_type": "llama3"}), ["factor"]),
    ("hf", "hf/config.json", edit(model_type=["llama"]), ["model_type"]),
    # the safetensors index and header
    ("index", "hfi/model.safetensors.index.json", text(deep_list()), ["nested deeper than 64"]),
    ("index", "hfi/model.safetensors.index.json", text("[]"), ["object expected"]),
    ("index", "hfi/model.safetensors.index.json", edit(weight_map=["model.safetensors"]), ["weight_map"]),
    ("index", "hfi/model.safetensors.index.json", edit(weight_map=DELETE), ["weight_map", "missing"]),
    ("index", "hfi/model.safetensors.index.json", edit(weight_map={"x": "../../x.safetensors"}), ["weight_map"]),
    ("safetensors", "hf/model.safetensors", safetensors_header(deep_list(5000)), ["nested deeper than 64"]),
    ("safetensors", "hf/model.safetensors", safetensors_header('{"model.norm.weight": [1]}'), ["model.norm.weight"]),
    # the adapter
    ("adapter", "adapter/adapter.json", text(deep_object()), ["nested deeper than 64"]),
    ("adapter", "adapter/adapter.json", text("[]"), ["object expected"]),
    ("adapter", "adapter/adapter.json", edit(rank="2"), ["rank"]),
    ("adapter", "adapter/adapter.json", edit(alpha=None), ["alpha"]),
    ("adapter", "adapter/adapter.json", edit(targets="wq"), ["targets"]),
    ("adapter", "adapter/adapter.json", edit(base_params=DELETE), ["base_params"]),
    ("adapter", "adapter/adapter.json", edit(base_params=[16]), ["base_params"]),
    ("adapter", "adapter/adapter.json", edit(**{"base_params/dim": "16"}), ["dim"]),
    ("adapter_meta", "adapter/adapter.safetensors", adapter_metadata(deep_list()), ["nested deeper than 64"]),
    ("adapter_meta", "adapter/adapter.safetensors", adapter_metadata("[1]"), ["adapter_json"]),
    # tokenizer.json
    ("tokenizer", "tok/tokenizer.json", text(deep_object()), ["nested deeper than 64"]),
    ("tokenizer", "tok/tokenizer.json", text('{"model": [1]}'), ["model"]),
    ("tokenizer", "tok/tokenizer.json", text('{"model": {"type": "BPE", "vocab": {"a": "0"}}}'), ["vocab"]),
    ("tokenizer", "tok/tokenizer.json", text('{"model": {"type": "BPE", "vocab": {"a": 0}}, "added_tokens": [1]}'),
     ["added_tokens"]),
    ("tokenizer", "tok/tokenizer.json", text('{"model": {"type": "BPE", "vocab": {"a": 0}, "merges": [1]}}'),
     ["merges"]),
    # shards' meta.json
    ("shards", "shards/meta.json", text(deep_list()), ["nested deeper than 64"]),
    ("shards", "shards/meta.json", text("[1]"), ["object expected"]),
    ("shards", "shards/meta.json", edit(vocab_size="300"), ["vocab_size"]),
    ("shards", "shards/meta.json", edit(splits=DELETE), ["splits"]),
    ("shards", "shards/meta.json", edit(splits=["train"]), ["splits"]),
    ("shards", "shards/meta.json", edit(**{"splits/val/shards": 3}), ["shards"]),
    # data records
    ("eval", "data.jsonl", jsonl_line(deep_list()), [":2:", "nested deeper than 64"]),
    ("eval", "data.jsonl", jsonl_line("[1]"), [":2:", "object"]),
    ("prompts", "prompts.jsonl", jsonl_line(deep_object()), [":2:", "nested deeper than 64"]),
    ("prompts", "prompts.jsonl", jsonl_line('"chest"'), [":2:", "object"]),
    ("prepare", "corpus.jsonl", jsonl_line(deep_list()), [":2:", "nested deeper than 64"]),
    ("prepare", "corpus.jsonl", jsonl_line("[1]"), [":2:", "object"]),
    ("prepare_array", "corpus.json", make_array("[" + deep_list() + "]"), ["nested deeper than 64"]),
    ("prepare_array", "corpus.json", make_array('[{"text": "chest pain"}, 7]'), ["record 1", "object"]),
]


def case_id(case):
    entry, path, damage, words = case
    return f"{entry}-{path.rsplit('/', 1)[-1]}-{words[0]}"


@pytest.mark.parametrize("entry, path, damage, words", CASES, ids=[case_id(c) for c in CASES])
def test_hostile_file_is_one_line(world, capsys, entry, path, damage, words):
    target = world / path
    damage(target)
    if entry == "prepare_array":
        target = world / "corpus.json"
    call, error = api(entry, world)
    if call is not None:
        with pytest.raises(error) as e:
            call()
        message = str(e.value)
        assert str(target) in message and "\n" not in message and all(w in message for w in words), message

    before = snapshot(world)
    prog, main, checks, argv = command(entry, world)
    with pytest.raises(SystemExit) as e:
        cli.run(main, prog=prog, argv=argv, checks=checks)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 1, err
    lines = [line for line in err if not line.startswith("prepare: ")]  # prepare's progress notes
    assert len(lines) == 1 and lines[0].startswith(prog + ": "), err
    assert str(target) in lines[0] and all(w in lines[0] for w in words), lines[0]
    assert snapshot(world) == before  # nothing written, nothing of the user's changed


def test_skip_bad_skips_a_deep_record(world, capsys):
    """--skip_bad counts a too-deep record as a bad one and goes on."""
    jsonl_line(deep_list())(world / "corpus.jsonl")
    with open(world / "corpus.jsonl", "a") as f:
        f.write(json.dumps({"text": "patient reports chest pain"}) + "\n")
    prepare.main(["--input", str(world / "corpus.jsonl"), "--out", str(world / "out"), "--tokenizer",
                  str(world / "shards"), "--workers", "1", "--skip_bad"])
    assert json.loads((world / "out" / "meta.json").read_text())["skipped_records"] == 1
    assert "skipping " + str(world / "corpus.jsonl") + ":2: nested deeper than 64" in capsys.readouterr().err


def test_max_seq_len_flag_beyond_memory_is_one_line(world, capsys):
    """--max_seq_len makes the same RoPE table as the config's context: the same bound."""
    with pytest.raises(SystemExit) as e:
        cli.run(generate.main, prog="generate.py", checks=generate.CHECKS,
                argv=["--ckpt_dir", world / "meta", "--prompt", "chest", "--max_seq_len", str(10**13)])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 1 and len(err) == 1 and "max_seq_len" in err[0] and "memory" in err[0], err


@pytest.mark.parametrize("script, entry, path, damage", [
    (["generate.py"], "meta", "meta/params.json", text(deep_list())),
    (["eval.py"], "eval", "data.jsonl", jsonl_line(deep_list())),
    (["-m", "data.prepare"], "prepare", "corpus.jsonl", jsonl_line(deep_object())),
    (["generate.py"], "hf", "hf/config.json", edit(max_position_embeddings=10**13)),
])
def test_scripts_end_in_one_line(world, script, entry, path, damage):
    damage(world / path)
    before = snapshot(world)
    _, _, _, argv = command(entry, world)
    out = subprocess.run([sys.executable, *script, *map(str, argv)], capture_output=True, text=True, cwd=ROOT,
                         timeout=120)
    lines = [line for line in out.stderr.strip().splitlines() if not line.startswith("prepare: ")]
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert len(lines) == 1 and str(world / path) in lines[0], out.stderr
    assert snapshot(world) == before
