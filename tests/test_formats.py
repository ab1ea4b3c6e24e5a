"""data/prepare.py reading corpora as they come: CSV/TSV, Parquet, gzip and zstd, text files split
by --doc_separator, a single document, --dedup; and llm.c / nano-llama31 shard directories
without meta.json. Every check compares the shards with the tokenizer's own encoding of each
record."""
import csv
import glob
import gzip
import io
import json
import os
import random
import re
import sys
from collections import Counter

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import tokenizer  # noqa: E402
from data import prepare, shards  # noqa: E402
from test_data import LLAMA3, assert_one_line_error, read_split, run_prepare, sentences  # noqa: E402

TOK = tokenizer.load(LLAMA3)
# cells a naive line or comma split gets wrong, and one over csv's default 128 KB field limit
AWKWARD = ['said "stop", then left', "line one\nline two, with a comma\n\n", 'only "quotes"',
           "tab\there", " ".join(["chest pain, no fever."] * 8000)]


def notes(n, seed=0):
    rng = random.Random(seed)
    return [sentences(rng, rng.randint(3, 30)) for _ in range(n)] + AWKWARD


def shard_docs(out):
    """Counter of (ids, mask) per document over both splits, cut at the docs files or at BOS."""
    found = Counter()
    for split in shards.SPLITS:
        tokens, mask, docs = read_split(str(out), split)
        mask = np.ones_like(tokens, dtype=np.uint8) if mask is None else mask
        starts = np.flatnonzero(docs == 1 if docs is not None else tokens == TOK.bos_id).tolist()
        assert starts[0] == 0
        for a, b in zip(starts, starts[1:] + [len(tokens)]):
            found[tuple(tokens[a:b].tolist()), tuple(mask[a:b].tolist())] += 1
    return found


def expected_text(texts):
    return Counter((tuple(TOK.encode(t, bos=True, eos=True)), (1,) * len(TOK.encode(t, bos=True, eos=True)))
                   for t in texts)


def prepared(tmp_path, *args):
    out = tmp_path / "out"
    rc, lines = run_prepare(*args, "--out", out, "--tokenizer", LLAMA3, "--workers", "1", "--val_fraction", "0.3")
    assert rc == 0, lines
    return out, json.loads((out / "meta.json").read_text()), lines


def write_csv(path, rows, delimiter=","):
    buf = io.StringIO(newline="")
    csv.writer(buf, delimiter=delimiter).writerows(rows)
    data = buf.getvalue().encode("utf-8")
    path.write_bytes(gzip.compress(data) if str(path).endswith(".gz") else data)


# ---------------------------------------------------------------------------------------------
# each format: the shards hold exactly the tokenizer's encoding of each record


@pytest.mark.parametrize("name", ["notes.csv", "notes.tsv", "notes.csv.gz"])
def test_csv_text_column(tmp_path, name):
    texts = notes(20)
    delimiter = "\t" if ".tsv" in name else ","
    write_csv(tmp_path / name, [["id", "NOTE_TEXT", "extra"]] + [[i, t, "z,z"] for i, t in enumerate(texts)], delimiter)
    out, meta, _ = prepared(tmp_path, "--input", tmp_path / name, "--text_column", "NOTE_TEXT")
    assert shard_docs(out) == expected_text(texts)
    assert meta["documents"] == len(texts)


def test_csv_columns_as_instruction_records(tmp_path):
    rng = random.Random(1)
    pairs = [(sentences(rng, 8) + "?", sentences(rng, 12)) for _ in range(10)] + [('a "q", with\nlines', 'an "a"')]
    write_csv(tmp_path / "qa.csv", [["question_text", "answer_text"]] + [list(p) for p in pairs])
    out, meta, _ = prepared(tmp_path, "--input", tmp_path / "qa.csv", "--columns",
                            "instruction=question_text,output=answer_text")
    want = Counter()
    for q, a in pairs:
        ids, mask = TOK.encode_dialog_targets([{"role": "user", "content": q}, {"role": "assistant", "content": a}])
        want[tuple(ids), tuple(int(m) for m in mask)] += 1
    assert shard_docs(out) == want
    assert meta["records"]["instruct"] == len(pairs) and meta["has_mask"]


def test_csv_header_names_are_the_fields_by_default(tmp_path):
    texts = notes(5)
    (tmp_path / "in").mkdir()
    write_csv(tmp_path / "in" / "t.csv", [["text"]] + [[t] for t in texts])
    out, _, _ = prepared(tmp_path, "--input", tmp_path / "in")  # a directory of nothing but tables
    assert shard_docs(out) == expected_text(texts)
    # beside notes, a table is a side file unless a column flag asks for tables
    (tmp_path / "in" / "n.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:3]))
    rc, lines = run_prepare("--input", tmp_path / "in", "--out", tmp_path / "o2", "--tokenizer", LLAMA3)
    assert rc == 0 and shard_docs(tmp_path / "o2") == expected_text(texts[:3]), lines
    rc, lines = run_prepare("--input", tmp_path / "in", "--out", tmp_path / "o3", "--tokenizer", LLAMA3,
                            "--text_column", "text")
    assert rc == 0 and shard_docs(tmp_path / "o3") == expected_text(texts + texts[:3]), lines


def test_gzip_and_zstd_jsonl_and_text(tmp_path):
    zstandard = pytest.importorskip("zstandard")
    texts = notes(12, seed=2)
    src = tmp_path / "in"
    src.mkdir()
    lines = "".join(json.dumps({"text": t}) + "\n" for t in texts[:8]).encode()
    (src / "a.jsonl.gz").write_bytes(gzip.compress(lines))
    # two zstd frames back to back, as parallel compressors write them
    tail = "".join(json.dumps({"text": t}) + "\n" for t in texts[8:12]).encode()
    (src / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(tail[:40])
                                      + zstandard.ZstdCompressor().compress(tail[40:]))
    (src / "c.txt.gz").write_bytes(gzip.compress(texts[12].encode()))
    (src / "d.txt.zst").write_bytes(zstandard.ZstdCompressor().compress(texts[13].encode()))
    out, meta, _ = prepared(tmp_path, "--input", src)
    assert shard_docs(out) == expected_text(texts[:14])


def test_parquet_file_and_directory(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    texts = notes(30, seed=3)
    src = tmp_path / "pq"
    src.mkdir()
    half = len(texts) // 2
    for i, part in enumerate((texts[:half], texts[half:])):
        table = pa.table({"id": list(range(len(part))), "body": part})
        pq.write_table(table, src / f"part-{i}.parquet", row_group_size=4)  # several row groups
    out, meta, _ = prepared(tmp_path, "--input", src, "--text_column", "body")
    assert shard_docs(out) == expected_text(texts)

    pairs = [("q1 " + t[:20], "a1 " + t[-20:]) for t in texts[:6]]
    pq.write_table(pa.table({"q": [p[0] for p in pairs], "a": [p[1] for p in pairs]}), tmp_path / "qa.parquet")
    out = tmp_path / "out2"
    rc, lines = run_prepare("--input", tmp_path / "qa.parquet", "--out", out, "--tokenizer", LLAMA3,
                            "--columns", "question=q,answer=a", "--workers", "1", "--val_fraction", "0.3")
    assert rc == 0, lines
    want = Counter()
    for q, a in pairs:
        ids, mask = TOK.encode_dialog_targets([{"role": "user", "content": q}, {"role": "assistant", "content": a}])
        want[tuple(ids), tuple(int(m) for m in mask)] += 1
    assert shard_docs(out) == want


# ---------------------------------------------------------------------------------------------
# one text file of many notes


def test_doc_separator_gives_one_document_per_note(tmp_path):
    texts = notes(15, seed=4)[:15]
    (tmp_path / "notes.txt").write_text("\n\n".join(texts) + "\n\n\n")
    out, meta, _ = prepared(tmp_path, "--input", tmp_path / "notes.txt", "--doc_separator", r"\n\s*\n")
    assert shard_docs(out) == expected_text(texts)
    assert meta["documents"] == len(texts)


def test_a_single_document_splits_by_tokens(tmp_path):
    text = "\n\n".join(notes(15, seed=5)[:15])
    (tmp_path / "notes.txt").write_text(text)
    out, meta, lines = prepared(tmp_path, "--input", tmp_path / "notes.txt")
    train, _, _ = read_split(str(out), "train")
    val, _, _ = read_split(str(out), "val")
    ids = TOK.encode(text, bos=True, eos=True)
    assert train.tolist() + val.tolist() == ids
    assert len(val) == len(ids) - round(len(ids) * 0.7)  # nanoGPT's rule: the last val_fraction
    assert any("one document in the input" in line for line in lines)


@pytest.mark.parametrize("separator", [r"\n\s*\n", r"\n<\|endoftext\|>\n", "ab+", r"(?m)^---$", "z"])
def test_split_documents_matches_re_split_across_chunks(separator, monkeypatch):
    monkeypatch.setattr(prepare, "SEPARATOR_MAX", 64)  # so matches fall across chunk edges often
    rng = random.Random(separator)
    pieces = ["note", "\n", "\n\n", " \n \n", "<|endoftext|>", "ab", "b", "bbb", "---", "z", "x y"]
    pattern = re.compile(separator)
    for _ in range(200):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 80)))
        want = pattern.split(text)
        got = list(prepare.split_documents(io.StringIO(text), pattern, chunk_chars=rng.randint(1, 9)))
        assert got == want, text


def test_dedup_drops_exact_duplicates(tmp_path):
    texts = notes(10, seed=6)
    rows = [{"text": t} for t in texts + texts[:4] + texts[2:3]]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out, meta, lines = prepared(tmp_path, "--input", tmp_path / "d.jsonl", "--dedup")
    assert shard_docs(out) == expected_text(texts)
    assert meta["duplicates_dropped"] == 5 and meta["documents"] == len(texts)
    assert "5 duplicates dropped" in lines[-1]


# ---------------------------------------------------------------------------------------------
# bad input: one line naming the file (and row), nothing half-written


def nothing_left(tmp_path):
    return not (tmp_path / "out").exists() and not glob.glob(str(tmp_path / "out.*"))


def test_bad_tables_and_archives_are_one_line(tmp_path):
    out = tmp_path / "out"
    common = ("--out", out, "--tokenizer", LLAMA3, "--workers", "1")
    write_csv(tmp_path / "n.csv", [["id", "TEXT"], [1, "fine"], [2, "one", "too many"], [3, "also\nfine"]])
    rc, lines = run_prepare("--input", tmp_path / "n.csv", "--text_column", "TEXT", *common)
    assert_one_line_error(rc, lines, "n.csv: row 2 (line 3)", "3 fields where the header has 2")
    write_csv(tmp_path / "m.csv", [["id", "TEXT"], [1, "two\nlines"], [2, "x"], [3, "y"], [4, "z", "extra"]])
    rc, lines = run_prepare("--input", tmp_path / "m.csv", "--text_column", "TEXT", *common)
    assert_one_line_error(rc, lines, "m.csv: row 4 (line 6)")
    assert rc == 1 and nothing_left(tmp_path)

    rc, lines = run_prepare("--input", tmp_path / "n.csv", "--text_column", "TEXT", "--skip_bad", *common)
    assert rc == 0, lines
    meta = json.loads((out / "meta.json").read_text())
    assert meta["skipped_records"] == 1 and shard_docs(out) == expected_text(["fine", "also\nfine"])
    os.system(f"rm -rf {out}")

    rc, lines = run_prepare("--input", tmp_path / "n.csv", "--text_column", "BODY", *common)
    assert_one_line_error(rc, lines, "n.csv: no column 'BODY' (its columns: id, TEXT)")
    assert nothing_left(tmp_path)

    (tmp_path / "c.jsonl.gz").write_bytes(gzip.compress(b'{"text": "a"}\n' * 1000)[:-30])
    rc, lines = run_prepare("--input", tmp_path / "c.jsonl.gz", *common)
    assert_one_line_error(rc, lines, "c.jsonl.gz: corrupt compressed data")
    assert nothing_left(tmp_path)
    (tmp_path / "c.jsonl.gz").write_bytes(b"not gzip at all")
    rc, lines = run_prepare("--input", tmp_path / "c.jsonl.gz", *common)
    assert_one_line_error(rc, lines, "c.jsonl.gz: corrupt compressed data")
    zstandard = pytest.importorskip("zstandard")
    (tmp_path / "c.csv.zst").write_bytes(zstandard.ZstdCompressor().compress(b"TEXT\nabc\n" * 1000)[:-9])
    rc, lines = run_prepare("--input", tmp_path / "c.csv.zst", *common)
    assert_one_line_error(rc, lines, "c.csv.zst: corrupt compressed data")
    assert nothing_left(tmp_path)

    rc, lines = run_prepare("--input", tmp_path / "n.csv", "--columns", "instruction=id,outptu=TEXT", *common)
    assert_one_line_error(rc, lines, "--columns", "unknown field 'outptu'")
    assert rc == 2
    rc, lines = run_prepare("--input", tmp_path / "c.jsonl.gz", "--text_column", "TEXT", *common)
    assert_one_line_error(rc, lines, "no CSV, TSV or Parquet file")
    rc, lines = run_prepare("--input", tmp_path / "n.csv", "--doc_separator", "\n*", *common)
    assert_one_line_error(rc, lines, "--doc_separator", "empty string")


def test_parquet_without_the_column_is_one_line(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"body": ["a", "b"], "n": [1, 2]}), tmp_path / "x.parquet")
    rc, lines = run_prepare("--input", tmp_path / "x.parquet", "--out", tmp_path / "out", "--tokenizer", LLAMA3,
                            "--text_column", "text")
    assert_one_line_error(rc, lines, "x.parquet: no column 'text' (its columns: body, n)")
    assert nothing_left(tmp_path)
    (tmp_path / "y.parquet").write_bytes(b"PAR1 broken")
    rc, lines = run_prepare("--input", tmp_path / "y.parquet", "--out", tmp_path / "out", "--tokenizer", LLAMA3,
                            "--text_column", "text")
    assert_one_line_error(rc, lines, "y.parquet: not a readable Parquet file")
    assert nothing_left(tmp_path)


# ---------------------------------------------------------------------------------------------
# llm.c / nano-llama31 shard directories, without meta.json


def write_llmc_shard(path, tokens, magic, version, dtype):
    """llm.c's writer, from its documented layout: 256 int32 (magic, version, count, 0...), then tokens."""
    header = np.zeros(256, dtype="<i4")
    header[0], header[1], header[2] = magic, version, len(tokens)
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(np.asarray(tokens, dtype=dtype).tobytes())


def as_llmc(prepared_dir, llmc_dir, name="corpus", pieces=3):
    """The prepared dataset's token streams rewritten as llm.c files (train cut in `pieces` shards),
    with the tokenizer beside them (nano-llama31 users copy theirs there) and no meta.json."""
    llmc_dir.mkdir()
    train, _, _ = read_split(str(prepared_dir), "train")
    val, _, _ = read_split(str(prepared_dir), "val")
    for k, part in enumerate(np.array_split(train, pieces)):
        write_llmc_shard(llmc_dir / f"{name}_train_{k:06d}.bin", part, 20240520, 1, "<u2")
    write_llmc_shard(llmc_dir / f"{name}_val_000000.bin", val, 20240520, 1, "<u2")
    (llmc_dir / "tokenizer.model").write_bytes((prepared_dir / "tokenizer.model").read_bytes())
    return train, val


@pytest.fixture(scope="module")
def small_vocab_shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("llmc")
    words = "patient denies chest pain fever cough reports mild headache since monday".split()
    texts = [f"Note {i}: " + " ".join(words[(i * 7 + j * 3) % len(words)] for j in range(20 + i % 30))
             for i in range(120)]
    (d / "notes.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    rc, lines = run_prepare("--input", d / "notes.jsonl", "--out", d / "ours", "--vocab_size", "300",
                            "--val_fraction", "0.1", "--workers", "1")
    assert rc == 0, lines
    return d / "ours"


def test_llmc_shards_read_as_they_are(small_vocab_shards, tmp_path):
    ours, llmc = small_vocab_shards, tmp_path / "llmc"
    train, val = as_llmc(ours, llmc)
    (llmc / "README.txt").write_text("unrelated files are ignored")
    meta = shards.validate(str(llmc), vocab_size=300)
    assert meta["inferred"] and meta["vocab_size"] == 300 and meta["bos_id"] == int(train[0]) == 1
    assert [s["file"] for s in meta["splits"]["train"]["shards"]] == [f"corpus_train_{k:06d}.bin" for k in range(3)]
    assert meta["splits"]["train"]["tokens"] == len(train) and meta["splits"]["val"]["tokens"] == len(val)
    for split in shards.SPLITS:  # the same batches, positions restarting at the same BOS tokens
        a = shards.DataLoader(str(ours), split, 4, 16, seed=3)
        b = shards.DataLoader(str(llmc), split, 4, 16, seed=3)
        for _ in range(5):
            x, y = a.next_batch(), b.next_batch()
            for field in x._fields:
                assert getattr(x, field).equal(getattr(y, field)), (split, field)

    with pytest.raises(shards.ShardError, match="vocabulary must come from a tokenizer"):
        shards.validate(str(llmc))
    with pytest.raises(shards.ShardError, match="uint16 shards"):
        shards.validate(str(llmc), vocab_size=128256)
    with pytest.raises(shards.ShardError, match=r"token id \d+ is beyond the vocabulary size 100"):
        shards.validate(str(llmc), vocab_size=100)
    (llmc / "corpus_val_000000.mask").write_bytes(b"")  # data.prepare's files, with meta.json lost
    with pytest.raises(shards.ShardError, match="meta.json: missing, yet corpus_val_000000.mask is there"):
        shards.load_meta(str(llmc))
    os.remove(llmc / "corpus_val_000000.mask")
    os.remove(llmc / "corpus_val_000000.bin")
    with pytest.raises(shards.ShardError, match="meta.json: missing .*_val_"):
        shards.load_meta(str(llmc))
    # data.prepare --overwrite replaces only its own directories, never llm.c's
    rc, lines = run_prepare("--input", ours / "tokenizer.model", "--out", llmc, "--vocab_size", "300", "--overwrite")
    assert_one_line_error(rc, lines, "not a shard directory made by data.prepare")


def test_nano_llama31_uint32_shards(tmp_path):
    llmc = tmp_path / "tinystories"
    llmc.mkdir()
    texts = notes(6, seed=8)[:6]
    ids = [TOK.encode(t, bos=True, eos=False) for t in texts]  # nano-llama31 starts each story with BOS
    write_llmc_shard(llmc / "tinystories_train_000000.bin", sum(ids[:4], []), 20240801, 7, "<u4")
    write_llmc_shard(llmc / "tinystories_val_000000.bin", sum(ids[4:], []), 20240801, 7, "<u4")
    meta = shards.validate(str(llmc), vocab_size=TOK.n_words, tokenizer_sha256=TOK.sha256)
    assert meta["bos_id"] == TOK.bos_id and meta["dtype"] == "uint32"
    tokens, _, _ = read_split(str(llmc), "train")
    assert tokens.tolist() == sum(ids[:4], [])


def test_train_py_on_llmc_shards_equals_training_on_ours(small_vocab_shards, tmp_path):
    from test_train import TINY, log, train

    llmc = tmp_path / "llmc"
    as_llmc(small_vocab_shards, llmc)
    common = [*TINY, "--max_steps", "3", "--eval_every", "3", "--batch_size", "2", "--lr", "3e-3"]
    train(*common, "--data", small_vocab_shards, "--out_dir", tmp_path / "ours")
    train(*common, "--data", llmc, "--out_dir", tmp_path / "theirs")
    ours, theirs = log(tmp_path / "ours"), log(tmp_path / "theirs")
    assert len(ours) == 3 and [r["loss"] for r in ours] == [r["loss"] for r in theirs]
    assert not (llmc / "meta.json").exists()


def test_bench_prepare_csv_ceiling_and_memory(tmp_path):
    import subprocess

    out = subprocess.run([sys.executable, "bench.py", "prepare", "--warmup", "0", "--iters", "1", "--json",
                          tmp_path / "b.json", "--mb", "0.2", "--csv", "--memory", "--workers", "2"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert [r["metric"] for r in rows] == ["tokens/s", "MB/s", "tokens/s", "peak PSS MiB"]
    assert "CSV" in rows[0]["case"] and rows[2]["vs"].startswith("ceiling: 2 x single-thread")
    assert rows[3]["ours"] > 20  # at least a Python interpreter with the tokenizer loaded
    assert "token counts agree" in out.stdout
