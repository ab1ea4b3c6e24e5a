"""eval.py --task tag and tag.py on a checkpoint with a tag head: each word's predicted tag is
transformers' LlamaForTokenClassification's argmax at the word's first sub-word as transformers'
run_ner aligns words (PreTrainedTokenizerFast on the Llama 3 tokenizer.json), long sentences split
between words and never dropped; the entity metrics equal seqeval's (hand-checked sequences and
random ones); two torchrun ranks write the same results as one; bad records are one line naming
FILE:LINE; tag.py's entity offsets slice the original text; report.py compares two tag results."""

import json
import os
import random
import shutil
import warnings

import pytest
import torch

import report
import tagging
import tasks
import tokenizer
from cli import UsageError
from data.records import RecordError
from test_data import LLAMA3
from test_eval import assert_same_results
from test_head_eval import run_eval, write_jsonl
from test_tags import BOS, EOS, LLAMA3_JSON, TAGS, hf_tagger, run_ner_alignment, sentences

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def hf_tok():
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=LLAMA3_JSON)


def seqeval_scores(truth, predicted, **kw):
    from seqeval.metrics import f1_score, precision_score, recall_score

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # seqeval warns on zero divisions (it then scores 0, as we do)
        return (precision_score(truth, predicted, **kw), recall_score(truth, predicted, **kw),
                f1_score(truth, predicted, **kw))


# -- metrics against seqeval ------------------------------------------------------------------------


def test_hand_checked_sequences_equal_seqeval():
    from seqeval.metrics import classification_report, f1_score
    from seqeval.scheme import IOB2

    truth = [["B-DIS", "I-DIS", "O", "B-CHEM", "B-CHEM", "I-CHEM"],  # two CHEM entities back to back
             ["O", "B-DIS", "O", "B-GENE"],  # GENE is never predicted
             ["B-CHEM", "IGN", "O", "O"]]  # an ignored word
    predicted = [["B-DIS", "I-DIS", "O", "B-CHEM", "I-CHEM", "I-CHEM"],  # nested start merged into one
                 ["O", "I-DIS", "O", "O"],  # a lone I-: default mode reads DIS 1..1, strict mode no entity
                 ["B-CHEM", "B-DIS", "I-CHEM", "O"]]  # I-CHEM after O once the IGN word is dropped
    m = tagging.tag_metrics(truth, predicted, ignored={"IGN"})
    kept_t = [truth[0], truth[1], ["B-CHEM", "O", "O"]]
    kept_p = [predicted[0], predicted[1], ["B-CHEM", "I-CHEM", "O"]]
    # default mode: truth DIS(0,0-1) CHEM(0,3) CHEM(0,4-5) DIS(1,1) GENE(1,3) CHEM(2,0) = 6;
    # predicted DIS(0,0-1) CHEM(0,3-5) DIS(1,1) CHEM(2,0-1) = 4; right: DIS(0,0-1), DIS(1,1) = 2
    assert (m["precision"], m["recall"]) == (pytest.approx(2 / 4), pytest.approx(2 / 6))
    assert m["f1"] == pytest.approx(2 * 0.5 * (1 / 3) / (0.5 + 1 / 3))
    assert (m["precision"], m["recall"], m["f1"]) == pytest.approx(seqeval_scores(kept_t, kept_p))
    # strict IOB2: predicted DIS(0,0-1) CHEM(0,3-5) CHEM(2,0-1) (the lone I-DIS is none): 1 right of 3, of 6
    assert m["f1_strict"] == pytest.approx(2 * (1 / 3) * (1 / 6) / (1 / 3 + 1 / 6))
    assert m["f1_strict"] == pytest.approx(seqeval_scores(kept_t, kept_p, mode="strict", scheme=IOB2)[2])
    # per type: CHEM 0 right (p 0/2, r 0/3), DIS 2 of 2 of 2, GENE never predicted: 0, support 1
    assert m["per_type"] == {"CHEM": {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 3},
                             "DIS": {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 2},
                             "GENE": {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = classification_report(kept_t, kept_p, output_dict=True)
        assert m["macro_f1"] == pytest.approx(f1_score(kept_t, kept_p, average="macro")) and m["macro_f1"] == \
            pytest.approx(1 / 3)
    for name, row in m["per_type"].items():
        assert (row["precision"], row["recall"], row["f1"], row["support"]) == pytest.approx(
            (ref[name]["precision"], ref[name]["recall"], ref[name]["f1-score"], ref[name]["support"]))
    # words: 6 + 4 + 3 scored (the IGN word not), wrong: 0:[4], 1:[1, 3], 2:[2] -> 9 of 13
    assert m["token_accuracy"] == pytest.approx(9 / 13)
    # invalid transitions over the whole predictions: I-DIS after O (sentence 1), I-CHEM after B-DIS
    assert m["invalid_transitions"] == 2 and m["n"] == 3


def test_random_sequences_equal_seqeval():
    from seqeval.metrics import f1_score
    from seqeval.metrics.sequence_labeling import get_entities
    from seqeval.scheme import IOB2

    rng = random.Random(0)
    names = ["O", "B-A", "I-A", "B-B", "I-B", "I-C", "E-A", "S-B"]
    for _ in range(500):
        seq = [rng.choice(names) for _ in range(rng.randint(0, 9))]
        assert tagging.entities(seq) == get_entities(seq), seq
    for _ in range(200):
        truth = [[rng.choice(names[:6]) for _ in range(rng.randint(1, 7))] for _ in range(4)]
        predicted = [[rng.choice(names[:6]) for _ in s] for s in truth]
        m = tagging.tag_metrics(truth, predicted)
        assert (m["precision"], m["recall"], m["f1"]) == pytest.approx(seqeval_scores(truth, predicted), abs=1e-12)
        assert m["f1_strict"] == pytest.approx(seqeval_scores(truth, predicted, mode="strict", scheme=IOB2)[2],
                                               abs=1e-12)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert m["macro_f1"] == pytest.approx(f1_score(truth, predicted, average="macro"), abs=1e-12)
    assert tagging.tag_metrics([["B-A", "E-A"]], [["B-A", "E-A"]])["f1_strict"] is None  # no IOB2 reading


# -- eval.py --task tag against transformers -------------------------------------------------------


def hf_checkpoint(path):
    """LlamaForTokenClassification (random weights) saved with its labels, the Llama 3 tokenizer beside it."""
    hf = hf_tagger()
    hf.config.id2label, hf.config.label2id = dict(enumerate(TAGS)), {t: i for i, t in enumerate(TAGS)}
    hf.save_pretrained(path, safe_serialization=True)
    shutil.copy(LLAMA3, path / "tokenizer.model")
    return hf


@torch.no_grad()
def hf_predictions(hf, hf_tok, words, max_len):
    """Each word's argmax label at its first sub-word, by run_ner's alignment (word_ids), the sentence
    cut greedily between words into pieces of at most max_len tokens (BOS and EOS each), each piece
    through transformers alone."""
    ids, _, word_ids = run_ner_alignment(hf_tok, words, ["O"] * len(words), TAGS)
    starts = [k + 1 for k, w in enumerate(word_ids) if k == 0 or w != word_ids[k - 1]]  # in ids (BOS first)
    pieces, begin = [], 1
    for start, end in zip(starts, starts[1:] + [len(ids) - 1]):
        if end - begin > max_len - 2:
            pieces.append((begin, start))
            begin = start
    pieces.append((begin, len(ids) - 1))
    out = []
    for a, b in pieces:
        logits = hf(torch.tensor([[BOS] + ids[a:b] + [EOS]])).logits[0]
        out += [TAGS[int(logits[1 + s - a].argmax())] for s in starts if a <= s < b]
    assert len(out) == len(words)
    return out


def test_eval_predicts_transformers_argmax_at_run_ners_first_subwords(tmp_path, hf_tok):
    ckpt = tmp_path / "hf"
    hf = hf_checkpoint(ckpt)
    records = sentences(7, seed=3)
    records.append({"tokens": (("acetaminophen troponin électrocardiogramme 体温 " * 5).split()),
                    "tags": ["B-CHEM", "I-CHEM", "O", "IGN"] * 5})  # over --max_len 16: split, not dropped
    records[1]["tags"] = [TAGS.index(t) if t != "IGN" else "IGN" for t in records[1]["tags"]]  # integer tags
    data, out = write_jsonl(tmp_path / "test.jsonl", records), tmp_path / "r.json"
    r = run_eval("--ckpt_dir", ckpt, "--task", "tag", "--data", data, "--out", out, "--max_len", "16",
                 "--batch_size", "3")
    assert r.returncode == 0, r.stderr
    got = json.loads(out.read_text())
    assert got["task"] == "tag" and got["labels"] == TAGS and len(got["items"]) == len(records)
    truth, predicted = [], []
    for item, rec in zip(got["items"], records):
        names = [TAGS[t] if isinstance(t, int) else t for t in rec["tags"]]
        assert (item["words"], item["tags"]) == (rec["tokens"], names)
        assert item["predicted"] == hf_predictions(hf, hf_tok, rec["tokens"], 16)
        truth.append(names)
        predicted.append(item["predicted"])
    assert len(tokenizer.load(LLAMA3).encode(" ".join(records[-1]["tokens"]), False, False)) > 16
    assert len({t for p in predicted for t in p}) >= 3  # the random head predicts several tags
    kept = [[(t, p) for t, p in zip(ts, ps) if t != "IGN"] for ts, ps in zip(truth, predicted)]
    kept_t, kept_p = [[t for t, _ in s] for s in kept], [[p for _, p in s] for s in kept]
    from seqeval.scheme import IOB2

    m = got["metrics"]
    assert (m["precision"], m["recall"], m["f1"]) == pytest.approx(seqeval_scores(kept_t, kept_p), abs=1e-12)
    assert m["f1_strict"] == pytest.approx(seqeval_scores(kept_t, kept_p, mode="strict", scheme=IOB2)[2], abs=1e-12)
    assert m["token_accuracy"] == pytest.approx(sum(t == p for s in kept for t, p in s) / sum(map(len, kept)))
    assert m == tagging.tag_metrics(truth, predicted, {"IGN"})
    assert "f1_strict" in r.stdout and "support" in r.stdout  # the summary and its per-type table
    # two ranks, each tagging every other sentence: the same results file
    r = run_eval("--ckpt_dir", ckpt, "--task", "tag", "--data", data, "--out", tmp_path / "two.json",
                 "--max_len", "16", "--batch_size", "3", torchrun=True)
    assert r.returncode == 0, r.stderr
    two = json.loads((tmp_path / "two.json").read_text())
    got.pop("command"), two.pop("command")
    assert_same_results(got, two)


def test_eval_pieces_are_data_prepares_documents(tmp_path):
    """The documents data.prepare --max_len 16 writes (split sentences too) are the pieces eval reads,
    and each word's tag sits in the shards at the position where eval reads its prediction."""
    import collections

    import model
    import numpy as np
    from data import shards
    from test_labels import in_process

    records = sentences(40, seed=5)
    write_jsonl(tmp_path / "ner.jsonl", records)
    in_process("--input", tmp_path / "ner.jsonl", "--out", tmp_path / "shards", "--max_len", 16)
    on_file = collections.Counter()
    for split in shards.SPLITS:
        tokens, tags = shards.split_tags(tmp_path / "shards", shards.load_meta(tmp_path / "shards"), split)
        tokens, tags = np.concatenate(tokens).astype(np.int64), np.concatenate(tags)
        starts = list(np.flatnonzero(tokens == BOS)) + [len(tokens)]
        on_file.update((tuple(tokens[a:b].tolist()), tuple(tags[a:b].tolist())) for a, b in zip(starts, starts[1:]))
    tiny = model.Transformer(model.ModelArgs(dim=32, n_layers=1, n_heads=4, vocab_size=128256, max_seq_len=64))
    job = tasks.Tag(tasks.Options(labels=None, max_len=16), TAGS)
    units = job.units(str(tmp_path / "ner.jsonl"), tokenizer.load(LLAMA3), tiny)
    read = collections.Counter()
    for u in units:
        for ids, firsts in u["pieces"]:
            tags = [-100] * len(ids)
            for position, word in firsts:
                tags[position] = TAGS.index(u["tags"][word]) if u["tags"][word] != "IGN" else -100
            read[(tuple(ids), tuple(tags))] += 1
    assert sum(read.values()) > len(units) and read == on_file


def test_conll_and_bad_records_are_one_line(tmp_path):
    import model

    job = tasks.Tag(tasks.Options(labels=None), TAGS)
    tok = tokenizer.load(LLAMA3)
    tiny = model.Transformer(model.ModelArgs(dim=32, n_layers=1, n_heads=4, vocab_size=128256, max_seq_len=32))
    good = {"tokens": ["fever"], "tags": ["O"]}
    cases = [({"tokens": ["a", "b"], "tags": ["O"]}, "2 tokens but 1 tags"),
             ({"tokens": ["a"], "tags": ["B-GENE"]}, "tag 'B-GENE' is not one of the head's labels B-CHEM,B-DIS"),
             ({"tokens": ["a"], "tags": [7]}, "tag 7 is no index into the head's 5 labels"),
             ({"tokens": [], "tags": []}, "empty sentence"),
             ({"text": "a"}, "field 'tokens' is missing")]
    for bad, says in cases:
        data = write_jsonl(tmp_path / "bad.jsonl", [good, bad])
        with pytest.raises(RecordError, match=f"^{data}:2: {says}"):
            job.units(str(data), tok, tiny)
    conll = tmp_path / "t.conll"
    conll.write_text("-DOCSTART-\tO\n\nAspirin\tB-CHEM\nhelps\tO\n\nfever\tB-DIS\nnow O\nbad\n")
    with pytest.raises(RecordError, match=f"^{conll}:8: not word<TAB>tag"):
        job.units(str(conll), tok, tiny)
    conll.write_text("-DOCSTART-\tO\n\nAspirin\tB-CHEM\nhelps\tO\n\nfever\tB-DIS\nnow O\n")
    units = job.units(str(conll), tok, tiny)
    assert [(u["where"], u["words"], u["tags"]) for u in units] == [
        (f"{conll}:3", ["Aspirin", "helps"], ["B-CHEM", "O"]), (f"{conll}:6", ["fever", "now"], ["B-DIS", "O"])]
    with pytest.raises(UsageError, match="--task tag needs a checkpoint with a tag head"):
        tasks.Tag(tasks.Options(labels=None)).for_model(tiny)


def test_eval_refuses_in_one_line_and_logs_to_mlflow(tmp_path):
    import test_eval
    import test_head_eval

    plain = test_head_eval.head_checkpoint(tmp_path / "cls", ["lived", "died"], False)
    data = write_jsonl(tmp_path / "t.jsonl", [{"tokens": ["fever"], "tags": ["O"]}])
    r = run_eval("--ckpt_dir", plain, "--task", "tag", "--data", data, "--out", tmp_path / "r.json")
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "eval.py: --task tag needs a checkpoint with a tag head (train.py --head tag); this one has a "
        "classification head (--task classify)"], r.stderr
    ckpt = tmp_path / "hf"
    hf_checkpoint(ckpt)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"tokens": ["fever"], "tags": ["O"]}, {"tokens": ["x"], "tags": ["Q"]}])
    r = run_eval("--ckpt_dir", ckpt, "--task", "tag", "--data", bad, "--out", tmp_path / "r.json")
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and f"{bad}:2: tag 'Q'" in r.stderr, r.stderr
    r = run_eval("--ckpt_dir", ckpt, "--task", "classify", "--data", data, "--out", tmp_path / "r.json")
    assert r.returncode == 2 and "a tag head" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"  # the numbers logged (the per-type table and a None are not)
    r = test_eval.run_eval("--ckpt_dir", ckpt, "--task", "tag", "--data", data, "--out", tmp_path / "m.json",
                           env={"MLFLOW_TRACKING_URI": uri})
    assert r.returncode == 0 and "warning" not in r.stderr and "Traceback" not in r.stderr, r.stderr
    import mlflow

    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    run, = client.search_runs([client.get_experiment_by_name("llama").experiment_id])
    assert {"eval_f1", "eval_precision", "eval_recall", "eval_token_accuracy", "eval_macro_f1"} <= set(run.data.metrics)
    for flags, says in [(["--labels", "a,b"], "--labels does not apply to --task tag"),
                        (["--text_column", "x"], "--text_column only applies to --task classify")]:
        r = run_eval("--ckpt_dir", ckpt, "--task", "tag", "--data", data, *flags)
        assert r.returncode == 2 and says in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "r.json").exists() and (tmp_path / "m.json").exists()


# -- tag.py: raw text ---------------------------------------------------------------------------------


def test_tag_py_entities_slice_the_text_and_match_eval(tmp_path, hf_tok):
    import subprocess
    import sys

    ckpt = tmp_path / "hf"
    hf = hf_checkpoint(ckpt)
    texts = ["Pt  started\tacetaminophen ( Tylenol )  for fever ;  troponin 123.5 ng/mL", "   ",
             "électrocardiogramme normal , 体温 37.2°C , no myocardial infarction " * 3]
    (tmp_path / "notes.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
    cmd = [sys.executable, "tag.py", "--ckpt_dir", str(ckpt), "--max_len", "16"]
    r = subprocess.run(cmd + ["--input", str(tmp_path / "notes.txt"), "--out", str(tmp_path / "e.jsonl")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = [json.loads(line) for line in (tmp_path / "e.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [x["line"] for x in lines] == [f"{tmp_path / 'notes.txt'}:1", f"{tmp_path / 'notes.txt'}:3"]
    found = 0
    for text, line in zip([texts[0], texts[2]], lines):
        words = text.split()
        tags = hf_predictions(hf, hf_tok, words, 16)
        want = [(t, words[a:b + 1]) for t, a, b in tagging.entities(tags)]
        assert [(e["type"], e["text"].split()) for e in line["entities"]] == want
        for e in line["entities"]:
            assert text[e["start"]:e["end"]] == e["text"] and e["text"] == e["text"].strip()
        found += len(want)
    assert found >= 3
    r = subprocess.run(cmd + ["--text", texts[0]], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and json.loads(r.stdout) == {"entities": lines[0]["entities"]}, r.stderr
    r = subprocess.run(cmd + ["--text", "x", "--input", str(tmp_path / "notes.txt")], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "--text TEXT or --input" in r.stderr


def test_spans_of_text_words():
    text = " Aspirin\t(ASA)  eased  chest pain\n"
    words = tagging.text_words(text)
    assert [w for w, _, _ in words] == text.split() and all(text[a:b] == w for w, a, b in words)
    spans = tagging.spans(text, words, ["B-CHEM", "I-CHEM", "O", "I-DIS", "I-DIS"])  # a lone I- starts one
    assert spans == [{"start": 1, "end": 14, "type": "CHEM", "text": "Aspirin\t(ASA)"},
                     {"start": 23, "end": 33, "type": "DIS", "text": "chest pain"}]


# -- report.py on two tag results ----------------------------------------------------------------------


def test_report_compares_two_tag_results(tmp_path):
    rng = random.Random(0)
    items = []
    for k, rec in enumerate(sentences(30, seed=1)):
        items.append({"line": f"d.jsonl:{k + 1}", "words": rec["tokens"], "tags": rec["tags"]})
    job = tasks.Tag(tasks.Options(labels=None), TAGS)
    paths = []
    for side, noise in enumerate((0.6, 0.2)):
        side_items = [{**i, "predicted": [t if t in TAGS and rng.random() > noise else rng.choice(TAGS)
                                          for t in i["tags"]]} for i in items]
        results = {"task": "tag", "labels": TAGS, "metrics": job.metrics(side_items), "items": side_items,
                   "command": "eval.py ...", "data": {"path": "d.jsonl", "sha256": "ab" * 32},
                   "checkpoint": {"dir": "ckpt", "adapter": None, "weights_fingerprint": f"fp{side}"}}
        paths.append(tmp_path / f"side{side}.json")
        paths[-1].write_text(json.dumps(results))
    report.build([str(p) for p in paths], str(tmp_path / "rep"), resamples=50)
    got = json.loads((tmp_path / "rep" / "report.json").read_text())["metrics"]
    base, tuned = (json.loads(p.read_text())["metrics"] for p in paths)
    for name in ("f1", "precision", "recall", "f1_strict", "macro_f1", "token_accuracy", "invalid_transitions"):
        assert got[name]["delta"] == pytest.approx(tuned[name] - base[name]) and got[name]["ci"] is not None, name
    assert got["f1"]["delta"] > 0 and (tmp_path / "rep" / "f1_per_type.png").exists()
    other = json.loads(paths[1].read_text())
    other["labels"] = TAGS[::-1]
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match="tag heads with other labels"):
        report.build([str(paths[0]), str(tmp_path / "other.json")], str(tmp_path / "rep2"), resamples=5)


def test_training_eval_scores_the_tag_head(tmp_path):
    """train.py --eval_task tag: the head's labels, the same metrics as eval.py's task."""
    import heads
    import model

    m = model.Transformer(model.ModelArgs(dim=32, n_layers=1, n_heads=4, vocab_size=128256, max_seq_len=32))
    m.init_weights(std=0.3)
    heads.attach_head(m, len(TAGS), False, TAGS, pad_id=0, kind="tag")
    data = write_jsonl(tmp_path / "val.jsonl", sentences(6, seed=2))
    tok = tokenizer.load(LLAMA3)
    logged = tasks.TrainingEval("tag", str(data), m, tok, 4, None, 0, 1)(m)
    job = tasks.Tag(tasks.Options(labels=None), TAGS)
    metrics, _ = tasks.evaluate(job, m, tok, job.units(str(data), tok, m), show_progress=False)
    assert logged == {f"eval_{k}": v for k, v in metrics.items() if isinstance(v, (int, float)) and k != "n"}
    assert {"eval_f1", "eval_token_accuracy"} <= set(logged)


def test_columns_name_other_fields_in_jsonl_and_parquet(tmp_path):
    """HF token-classification layout: {"words", "ner_tags": [ints]} as JSONL and as Parquet."""
    import pyarrow
    import pyarrow.parquet

    import eval as evaluation
    import model

    rows = [{"id": 0, "words": ["Aspirin", "eased", "angina"], "ner_tags": [0, 4, 1]},
            {"id": 1, "words": ["no", "fever"], "ner_tags": [4, 1]}]
    jsonl = write_jsonl(tmp_path / "hf.jsonl", rows)
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), tmp_path / "hf.parquet")
    opts = evaluation.task_options("tag", columns="tokens=words,tags=ner_tags")
    assert opts.columns == [("tokens", "words"), ("tags", "ner_tags")] and opts.labels is None
    tiny = model.Transformer(model.ModelArgs(dim=32, n_layers=1, n_heads=4, vocab_size=128256, max_seq_len=32))
    want = [(["Aspirin", "eased", "angina"], ["B-CHEM", "O", "B-DIS"]), (["no", "fever"], ["O", "B-DIS"])]
    for data in (jsonl, tmp_path / "hf.parquet"):
        units = tasks.Tag(opts, TAGS).units(str(data), tokenizer.load(LLAMA3), tiny)
        assert [(u["words"], u["tags"]) for u in units] == want, data
    assert evaluation.task_options("tag", columns="tokens=words").columns == [("tokens", "words"), ("tags", "tags")]
    for task, columns, says in [("classify", "tokens=words", "--columns only applies to --task tag"),
                                ("tag", "text=words", "field 'text' is not a tagged record's"),
                                ("tag", "words", "expected field=column")]:
        with pytest.raises(UsageError, match=says):
            evaluation.task_options(task, columns=columns)
    with pytest.raises(UsageError, match="--ignore_tags only applies to --task tag"):
        evaluation.task_options("classify", ignore_tags="IGN")


def test_tag_py_reads_texts_lines_and_jsonl(tmp_path):
    import tag

    (tmp_path / "n.txt").write_text("first note\n\n  \nsecond\tnote\r\n", encoding="utf-8")
    assert tag.texts_of(None, str(tmp_path / "n.txt")) == [(f"{tmp_path / 'n.txt'}:1", "first note"),
                                                           (f"{tmp_path / 'n.txt'}:4", "second\tnote")]
    data = write_jsonl(tmp_path / "n.jsonl", [{"text": "a b"}, {"note": "c"}])
    with pytest.raises(RecordError, match=f"^{data}:2: .*'text'"):
        tag.texts_of(None, str(data))
    assert tag.texts_of(None, str(write_jsonl(tmp_path / "ok.jsonl", [{"text": "a b"}]))) == [(f"{tmp_path / 'ok.jsonl'}:1", "a b")]
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9\n")
    with pytest.raises(RecordError, match="not UTF-8"):
        tag.texts_of(None, str(tmp_path / "bad.txt"))
    with pytest.raises(UsageError, match="--text TEXT or --input FILE"):
        tag.texts_of(None, None)
