"""Labelled shards: data.prepare on labelled records (JSONL, CSV with --label_column and
--label_separator), the .labels sidecar and meta.json's vocabulary, --max_len / --truncate, and
LabelledLoader's batches (packed and padded, the same global batch for any world size, resume)."""
import csv
import json
import os
import random
import re
import shutil
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import tokenizer  # noqa: E402
from data import prepare, shards  # noqa: E402
from data.shards import LabelledLoader, ShardError  # noqa: E402
from test_data import LLAMA3, assert_one_line_error, read_split, run_prepare  # noqa: E402

WORDS = "fever rash cough chest pain dyspnea troponin ECG follow up discharge plan".split()


def note(rng, lo=3, hi=30):
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def write_jsonl(path, records):
    with open(path, "w") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")
    return path


def in_process(*args):
    """data.prepare's main in this process (fast: no interpreter start); returns meta.json."""
    out = args[args.index("--out") + 1]
    prepare.main(["--tokenizer", LLAMA3, "--workers", "1", "--val_fraction", "0.25", *map(str, args)])
    return json.load(open(os.path.join(out, "meta.json")))


def split_documents(data_dir, split):
    """[(tokens, label names)] of a labelled split, read straight from the files (not the loader)."""
    meta = shards.load_meta(data_dir)
    tokens, _, _ = read_split(data_dir, split)
    starts, offsets, ids = shards.split_labels(data_dir, meta, split)
    ends = list(starts[1:]) + [len(tokens)]
    return [(tuple(tokens[a:b].tolist()), tuple(meta["labels"][i] for i in ids[offsets[k]:offsets[k + 1]]))
            for k, (a, b) in enumerate(zip(starts, ends))]


def expected(records, tok, field="label", max_len=None, truncate="start"):
    """{tokens: label names} that the records should become."""
    out = {}
    for rec in records:
        ids = tok.encode(rec["text"], bos=True, eos=True)
        if max_len and len(ids) > max_len:
            keep = max_len - 2
            ids = [ids[0]] + (ids[1:1 + keep] if truncate == "start" else ids[-1 - keep:-1]) + [ids[-1]]
        value = rec[field]
        names = [str(v) for v in value] if isinstance(value, list) else [str(value)]
        out[tuple(ids)] = tuple(sorted(set(names)))
    return out


@pytest.fixture(scope="module")
def tok():
    return tokenizer.load(LLAMA3)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """A single-label dataset of 60 notes, labels strings and an integer."""
    d = tmp_path_factory.mktemp("single")
    rng = random.Random(0)
    records = [{"text": note(rng), "label": rng.choice(["yes", "no", 7])} for _ in range(60)]
    write_jsonl(d / "in.jsonl", records)
    return d / "out", records, in_process("--input", d / "in.jsonl", "--out", d / "out")


@pytest.fixture(scope="module")
def multi(tmp_path_factory):
    d = tmp_path_factory.mktemp("multi")
    rng = random.Random(1)
    codes = ["401.9", "428.0", "250.00", "584.9", "38.93"]
    records = [{"text": note(rng), "labels": rng.sample(codes, rng.randint(0, 3))} for _ in range(60)]
    write_jsonl(d / "in.jsonl", records)
    return d / "out", records, in_process("--input", d / "in.jsonl", "--out", d / "out")


def sorted_names(doc_names):
    return tuple(sorted(doc_names))


# ---------------------------------------------------------------------------------------------
# prepare


def test_jsonl_single_label_round_trip(single, tok):
    out, records, meta = single
    assert meta["has_labels"] and meta["multilabel"] is False
    assert meta["labels"] == ["7", "no", "yes"]  # sorted as strings; the integer 7 is the label "7"
    got = split_documents(out, "train") + split_documents(out, "val")
    assert {ids: names for ids, names in got} == expected(records, tok)
    assert len(got) == len(records)
    for split in ("train", "val"):  # each label's count per split, in vocabulary order
        counted = [sum(names == (label,) for _, names in split_documents(out, split)) for label in meta["labels"]]
        assert meta["label_counts"][split] == counted
    assert shards.validate(out)["labels"] == meta["labels"]


def test_jsonl_multilabel_round_trip(multi, tok):
    out, records, meta = multi
    assert meta["multilabel"] is True and meta["labels"] == sorted({c for r in records for c in r["labels"]})
    got = split_documents(out, "train") + split_documents(out, "val")
    assert {ids: sorted_names(names) for ids, names in got} == expected(records, tok, "labels")
    assert any(names == () for _, names in got)  # an empty list is an empty label set


def test_csv_label_column_and_separator(tmp_path, tok):
    rows = [("note %d: " % i + note(random.Random(i)), codes) for i, codes in
            enumerate(["401.9;428.0", "", "250.00", " 428.0 ; 401.9 ", "401.9", "", "584.9;250.00", "428.0"])]
    with open(tmp_path / "notes.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "note", "icd9"])
        for i, (text, codes) in enumerate(rows):
            w.writerow([i, text, codes])
    meta = in_process("--input", tmp_path / "notes.csv", "--out", tmp_path / "out", "--text_column", "note",
                      "--label_column", "icd9", "--label_separator", ";")
    assert meta["multilabel"] and meta["labels"] == ["250.00", "401.9", "428.0", "584.9"]
    got = {ids: sorted_names(names) for ids, names in split_documents(tmp_path / "out", "train")
           + split_documents(tmp_path / "out", "val")}
    want = {tuple(tok.encode(text, bos=True, eos=True)): tuple(sorted(c.strip() for c in codes.split(";") if c.strip()))
            for text, codes in rows}
    assert got == want
    assert sum(names == () for names in got.values()) == 2  # empty cells: empty label sets


def test_labels_flag_fixes_the_order(tmp_path):
    write_jsonl(tmp_path / "in.jsonl", [{"text": f"note {i}", "label": ["low", "high", "mid"][i % 3]} for i in range(12)])
    meta = in_process("--input", tmp_path / "in.jsonl", "--out", tmp_path / "out", "--labels", "mid,low,high,never")
    assert meta["labels"] == ["mid", "low", "high", "never"]
    assert [sum(c) for c in zip(*meta["label_counts"].values())] == [4, 4, 4, 0]
    docs = split_documents(tmp_path / "out", "train") + split_documents(tmp_path / "out", "val")
    assert all(names[0] in ("low", "high", "mid") for _, names in docs)


@pytest.mark.parametrize("truncate", ["start", "end"])
def test_max_len_cuts_and_counts(tmp_path, tok, truncate):
    rng = random.Random(5)
    records = [{"text": note(rng, 2, 40), "label": "a" if i % 2 else "b"} for i in range(30)]
    write_jsonl(tmp_path / "in.jsonl", records)
    meta = in_process("--input", tmp_path / "in.jsonl", "--out", tmp_path / "out", "--max_len", 10,
                      "--truncate", truncate)
    got = split_documents(tmp_path / "out", "train") + split_documents(tmp_path / "out", "val")
    assert {ids: names for ids, names in got} == expected(records, tok, max_len=10, truncate=truncate)
    too_long = sum(len(tok.encode(r["text"], bos=True, eos=True)) > 10 for r in records)
    assert 0 < too_long < len(records) and meta["truncated_documents"] == too_long
    assert meta["max_len"] == 10 and meta["truncate"] == truncate
    assert all(len(ids) <= 10 and ids[0] == tok.bos_id and ids[-1] == tok.eos_id for ids, _ in got)


def test_summary_line_counts_cut_documents(tmp_path):
    write_jsonl(tmp_path / "in.jsonl", [{"text": "word " * (5 + 20 * (i % 2)), "label": i % 2} for i in range(6)])
    rc, lines = run_prepare("--input", tmp_path / "in.jsonl", "--out", tmp_path / "out", "--tokenizer", LLAMA3,
                            "--max_len", 12, "--val_fraction", 0.3)
    assert rc == 0, lines
    assert "3 documents cut to --max_len 12 (keeping their start)" in lines[-1], lines[-1]
    assert "2 labels (one per document)" in lines[-1]


# ---------------------------------------------------------------------------------------------
# bad input: one line naming the file and line, or the flag; nothing written


@pytest.mark.parametrize("records, says", [
    ([{"text": "a", "label": "yes"}, {"text": "b", "label": "maybe"}], "in.jsonl:2: label 'maybe' is not one of --labels yes,no"),
    ([{"text": "a", "label": "yes"}, {"text": "", "label": "no"}], "in.jsonl:2: field 'text' is empty"),
    ([{"text": "a", "label": "yes"}, {"label": "no"}], "in.jsonl:2: no 'text'"),
    ([{"text": "a", "label": "yes"}, {"text": "b", "labels": ["yes"]}], "in.jsonl:2: a list of labels in a single-label"),
    ([{"text": "a", "label": "yes"}, {"text": "b", "label": ["yes", "no"]}], "in.jsonl:2: a list of labels in a single-label"),
    ([{"text": "a", "label": "yes"}, {"text": "b"}], "in.jsonl:2: neither 'label' and 'labels'"),
    ([{"text": "a", "label": "yes"}, {"text": "b", "label": True}], "in.jsonl:2: label True"),
    ([{"text": "a", "labels": ["no"]}, {"text": "b", "label": "no"}], "in.jsonl:2: one label in a multilabel"),
], ids=["unknown", "empty-text", "no-text", "list-in-single", "list-value-in-single", "no-label", "bool", "one-in-multi"])
def test_bad_labelled_records_are_refused_naming_file_and_line(tmp_path, records, says):
    write_jsonl(tmp_path / "in.jsonl", records + [{"text": "c", "label": "no"}])
    rc, lines = run_prepare("--input", tmp_path / "in.jsonl", "--out", tmp_path / "out", "--tokenizer", LLAMA3,
                            *(["--labels", "yes,no"] if "--labels" in says else []))
    assert_one_line_error(rc, lines, says)
    assert not (tmp_path / "out").exists()


def test_skip_bad_passes_over_bad_labelled_records(tmp_path):
    write_jsonl(tmp_path / "in.jsonl", [{"text": "a", "label": "yes"}, {"text": "b", "label": "maybe"},
                                        {"text": "", "label": "no"}, {"text": "c", "label": "no"},
                                        {"text": "d", "label": "yes"}])
    meta = in_process("--input", tmp_path / "in.jsonl", "--out", tmp_path / "out", "--labels", "yes,no", "--skip_bad")
    assert meta["skipped_records"] == 2 and meta["documents"] == 3
    assert sum(map(sum, meta["label_counts"].values())) == 3


@pytest.mark.parametrize("flags, says", [
    (["--truncate", "end"], "--truncate end: needs --max_len"),
    (["--max_len", "2"], "--max_len"),
    (["--truncate", "middle", "--max_len", "9"], "--truncate"),
    (["--labels", "a,,b"], "--labels a,,b"),
    (["--labels", "a,a"], "--labels a,a"),
    (["--label_column", "codes"], "in.csv: row 1 (line 2): no label field 'codes' (--label_column)"),
    (["--label_column", "codes", "--text_column", "text"], "in.csv: no column 'codes'"),
])
def test_bad_label_flags_are_refused(tmp_path, flags, says):
    with open(tmp_path / "in.csv", "w") as f:
        f.write("text,label\nfever,a\nrash,b\n")
    rc, lines = run_prepare("--input", tmp_path / "in.csv", "--out", tmp_path / "out", "--tokenizer", LLAMA3, *flags)
    assert_one_line_error(rc, lines, says)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# the sidecar and the validator


def test_unlabelled_shards_have_no_label_files_and_no_label_keys(tmp_path):
    write_jsonl(tmp_path / "in.jsonl", [{"text": f"note {i} fever"} for i in range(10)])
    meta = in_process("--input", tmp_path / "in.jsonl", "--out", tmp_path / "out")
    assert not any(name.endswith(".labels") for name in os.listdir(tmp_path / "out"))
    assert "has_labels" not in meta and "labels" not in meta
    with pytest.raises(ShardError, match="no labels"):
        LabelledLoader(str(tmp_path / "out"), "train", 2, 64)
    shards.DataLoader(str(tmp_path / "out"), "train", 2, 8).next_batch()


def test_labelled_shards_still_train_a_language_model(single):
    out, _, _ = single
    batch = shards.DataLoader(str(out), "train", 2, 16).next_batch()
    assert batch.inputs.shape == (2, 16)


def test_validate_refuses_a_damaged_label_file(single, tmp_path):
    out, _, _ = single
    damages = {"count": (shards.HEADER_INTS + 1, 5, "bad label count"), "id": (shards.HEADER_INTS + 2, 3, "outside the 3 labels"),
               "magic": (0, shards.MAGIC_DOCS, "header says")}  # a docs file's magic: one byte per entry, so the size is off
    for damage, (at, value, says) in damages.items():
        shutil.copytree(out, tmp_path / damage)
        path = tmp_path / damage / "train_000000.labels"
        raw = bytearray(path.read_bytes())
        raw[4 * at:4 * at + 4] = np.int32(value).tobytes()
        path.write_bytes(bytes(raw))
        with pytest.raises(ShardError, match=re.escape(str(path)) + ".*" + says):
            shards.validate(str(tmp_path / damage))
    meta_path = tmp_path / "count" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["labels"] = ["a", "a", "b"]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ShardError, match="distinct"):
        shards.load_meta(str(tmp_path / "count"))


# ---------------------------------------------------------------------------------------------
# the loader


def loader_documents(loader, n_batches):
    """[(document index, its tokens, its label tensor row)] of n batches, checking each batch's layout."""
    seen = []
    for _ in range(n_batches):
        b = loader.next_batch()
        assert b.inputs.shape == b.positions.shape == b.valid.shape == (loader.batch_size, loader.seq_len)
        assert b.rows.shape == b.last.shape == b.documents.shape == b.epochs.shape == (len(b.labels),)
        for k, (row, last, doc) in enumerate(zip(b.rows.tolist(), b.last.tolist(), b.documents.tolist())):
            n = int(loader.doc_lengths[doc])
            first = 0 if k == 0 or row != b.rows[k - 1] else b.last[k - 1].item() + 1
            assert last == first + n - 1
            assert b.positions[row, first:last + 1].tolist() == list(range(n))
            assert b.valid[row, first:last + 1].all()
            seen.append((doc, tuple(b.inputs[row, first:last + 1].tolist()), b.labels[k]))
        for row in range(loader.batch_size):  # the padding after a row's last document is its own run
            pad = ~b.valid[row]
            assert (b.inputs[row][pad] == loader.pad_id).all()
            if pad.any():
                assert b.positions[row][pad].tolist() == list(range(int(pad.sum())))
    return seen


@pytest.mark.parametrize("padded", [False, True])
def test_loader_reproduces_every_document_and_its_labels(single, multi, padded):
    for out, field in ((single[0], "label"), (multi[0], "labels")):
        want = {ids: names for ids, names in split_documents(out, "val")}
        loader = LabelledLoader(str(out), "val", 4, 96, padded=padded)
        rows = len(loader.epoch_rows(0))
        seen = loader_documents(loader, -(-rows // 4))[: loader.n_documents]
        loader.seq -= 4  # the last batch again: what ran into epoch 1 is marked so
        assert loader.next_batch().epochs.tolist()[-1] == (1 if rows % 4 else 0)
        assert sorted(doc for doc, _, _ in seen) == list(range(loader.n_documents))  # val: each once, in order
        for _, ids, label in seen:
            if loader.multilabel:
                names = tuple(loader.labels[i] for i in label.nonzero().flatten().tolist())
                assert label.dtype.is_floating_point and set(label.unique().tolist()) <= {0.0, 1.0}
            else:
                names = (loader.labels[int(label)],)
            assert sorted_names(want[ids]) == sorted_names(names)
        if padded:
            assert rows == loader.n_documents
        else:
            assert rows < loader.n_documents / 2  # several short notes to a row


def test_loader_train_epoch_covers_every_document_once_and_reshuffles(single):
    out = str(single[0])
    loader = LabelledLoader(out, "train", 3, 128, seed=1)
    rows = [list(r) for r in loader.epoch_rows(0)]
    assert sorted(d for r in rows for d in r) == list(range(loader.n_documents))
    assert all(sum(loader.doc_lengths[d] for d in r) <= 128 for r in rows)
    assert [list(r) for r in loader.epoch_rows(1)] != rows
    assert [list(r) for r in LabelledLoader(out, "train", 3, 128, seed=1).epoch_rows(0)] == rows


def test_loader_same_global_batch_for_one_or_two_ranks_and_resume(single):
    out = str(single[0])
    one = LabelledLoader(out, "train", 4, 64, seed=3)
    two = [LabelledLoader(out, "train", 2, 64, seed=3, rank=r, world_size=2) for r in range(2)]
    for _ in range(12):  # past the end of an epoch
        whole = one.next_batch()
        parts = [loader.next_batch() for loader in two]
        assert sorted(whole.documents.tolist()) == sorted(d for p in parts for d in p.documents.tolist())
        # row i of rank r is row i*2 + r of the single loader
        for r, part in enumerate(parts):
            assert (part.inputs == whole.inputs[r::2]).all() and (part.positions == whole.positions[r::2]).all()
    state = one.state_dict()
    expected = [one.next_batch() for _ in range(3)]
    resumed = LabelledLoader(out, "train", 2, 64, seed=3, rank=1, world_size=2)
    resumed.load_state_dict(state)
    for whole in expected:
        b = resumed.next_batch()
        assert (b.inputs == whole.inputs[1::2]).all() and (b.labels == whole.labels[whole.rows % 2 == 1]).all()
    with pytest.raises(ShardError, match="cannot resume: saved seed=3"):
        LabelledLoader(out, "train", 2, 64, seed=4).load_state_dict(state)


def test_loader_refuses_documents_longer_than_a_row(single, tmp_path):
    out = str(single[0])
    longest = int(max(LabelledLoader(out, s, 1, 512).doc_lengths.max() for s in ("train", "val")))
    with pytest.raises(ShardError, match=f"more than seq_len {longest - 1}; prepare with --max_len"):
        LabelledLoader(out, "train" if longest == LabelledLoader(out, "train", 1, 512).doc_lengths.max() else "val",
                       1, longest - 1)
    write_jsonl(tmp_path / "in.jsonl", [{"text": f"note {i}", "label": "x"} for i in range(6)])
    in_process("--input", tmp_path / "in.jsonl", "--out", tmp_path / "out", "--max_len", 64)
    with pytest.raises(ShardError, match="--max_len 64 tokens, more than seq_len 32"):
        LabelledLoader(str(tmp_path / "out"), "train", 1, 32)


def test_documents_across_shard_boundaries_keep_their_labels(tmp_path, tok):
    rng = random.Random(9)
    records = [{"text": note(rng), "labels": rng.sample(["a", "b", "c"], rng.randint(0, 2))} for _ in range(40)]
    write_jsonl(tmp_path / "in.jsonl", records)
    in_process("--input", tmp_path / "in.jsonl", "--out", tmp_path / "out", "--shard_tokens", 37)
    out = tmp_path / "out"
    assert len([n for n in os.listdir(out) if n.startswith("train_") and n.endswith(".labels")]) > 3
    got = split_documents(out, "train") + split_documents(out, "val")
    assert {ids: sorted_names(names) for ids, names in got} == expected(records, tok, "labels")
    shards.validate(str(out))
    loader = LabelledLoader(str(out), "train", 2, 80, shuffle=False)
    seen = loader_documents(loader, -(-len(loader.epoch_rows(0)) // 2))[: loader.n_documents]
    assert [ids for _, ids, _ in seen] == [ids for ids, _ in split_documents(out, "train")]
