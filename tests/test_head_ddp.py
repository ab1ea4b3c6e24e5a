"""train.py --head across ranks and micro-batches: the class-weighted loss of a step is the weighted
mean over its whole global batch (F.cross_entropy's on all of it at once), 2 DDP ranks equal one
process, each evaluation's task metrics (gathered from every rank) equal scikit-learn's on one
process, and --keep_best METRIC keeps the best of a metric, across a resume too."""

import json
import random
import shutil
import signal
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import checkpoint
import heads
import lora
import model
import train
from data import shards
from test_train import ROOT, TINY, _one_line_error, interrupt_after, log, losses, prepare
from test_train import train as run_train

WORDS = "patient denies chest pain cough reports mild headache since monday rash nausea".split()
# three classes, 6 : 3 : 1, each told by one word, so weights matter and a tiny model learns it
CLASSES = ["home"] * 6 + ["ward"] * 3 + ["icu"]
HEAD = [*[a if a != "32" or TINY[i - 1] != "--seq_len" else "96" for i, a in enumerate(TINY)],
        "--head", "classify", "--lr", "3e-3"]


@pytest.fixture(scope="module")
def multiclass(tmp_path_factory):
    """Notes whose label (home, ward or icu, imbalanced 6:3:1) is the one word of that name in them."""
    d = tmp_path_factory.mktemp("los")
    rng = random.Random(1)
    with open(d / "notes.jsonl", "w") as f:
        for i in range(200):
            label = CLASSES[i % len(CLASSES)]
            words = [rng.choice(WORDS) for _ in range(rng.randint(4, 12))]
            words.insert(rng.randint(0, len(words)), label)
            f.write(json.dumps({"text": " ".join(words), "label": label}) + "\n")
    prepare(d / "notes.jsonl", d / "shards", "--vocab_size", "300", "--val_fraction", "0.25")
    return d / "shards"


@pytest.fixture(scope="module")
def multilabel(tmp_path_factory, multiclass):
    """Notes carrying any of four codes, each told by its own word; one code never occurs in val."""
    d = tmp_path_factory.mktemp("codes")
    rng = random.Random(2)
    with open(d / "notes.jsonl", "w") as f:
        for i in range(160):
            codes = [c for c in ("pain", "cough", "rash") if rng.random() < 0.4] + (["nausea"] if i == 0 else [])
            words = [rng.choice(WORDS[4:9]) for _ in range(rng.randint(4, 10))] + codes
            rng.shuffle(words)
            f.write(json.dumps({"text": " ".join(words), "labels": codes}) + "\n")
    prepare(d / "notes.jsonl", d / "shards", "--tokenizer", multiclass / "tokenizer.model", "--val_fraction", "0.25")
    return d / "shards"


@pytest.fixture(scope="module")
def base(tmp_path_factory, multiclass):
    """A tiny 'pretrained' model (no head) over the shards' vocabulary."""
    path = tmp_path_factory.mktemp("base")
    torch.manual_seed(0)
    m = model.Transformer(model.ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300,
                                          multiple_of=16, max_seq_len=96))
    m.init_weights()
    checkpoint.save(m, path)
    shutil.copy(multiclass / "tokenizer.model", path / "tokenizer.model")
    return path


def test_metric_names_are_the_ones_classification_metrics_gives():
    probs = torch.rand(6, 3).softmax(-1).tolist()
    for n_labels, multilabel, answers in [(2, False, [0, 1, 0, 1, 1, 0]), (3, False, [0, 1, 2, 0, 1, 2]),
                                          (3, True, [[0], [1, 2], [], [2], [0, 1], [1]])]:
        got = heads.classification_metrics([p[:n_labels] for p in probs], answers, multilabel, list(range(n_labels)))
        assert tuple(name for name in got if name != "n") == heads.metric_names(n_labels, multilabel)


@pytest.mark.parametrize("multilabel,weighted,gamma,alpha", [(False, True, 0.0, None), (False, True, 2.0, 0.25),
                                                              (False, False, 1.0, 0.7), (True, True, 2.0, 0.25),
                                                              (True, False, 0.0, None)])
def test_loss_sums_and_normalisers_of_parts_add_up_to_the_loss_of_the_whole(multilabel, weighted, gamma, alpha):
    """Split a batch anyhow: sum(loss_sum) / sum(loss_normaliser) over the parts is the batch's
    classification_loss (for class-weighted cross-entropy: F.cross_entropy's weighted mean)."""
    torch.manual_seed(0)
    logits = torch.randn(10, 2) * 2
    labels = (torch.rand(10, 2) < 0.3).float() if multilabel else torch.tensor([0, 0, 0, 0, 0, 0, 0, 1, 1, 0])
    counts = labels.sum(0) if multilabel else torch.bincount(labels, minlength=2)
    w = heads.balanced_class_weights(counts, len(labels), multilabel) if weighted else None
    whole = heads.classification_loss(logits, labels, multilabel, w, gamma, alpha)
    parts = [(0, 1), (1, 4), (4, 10)]
    total = sum(heads.loss_sum(logits[a:b], labels[a:b], multilabel, w, gamma, alpha) for a, b in parts)
    normaliser = sum(heads.loss_normaliser(labels[a:b], multilabel, w, alpha) for a, b in parts)
    assert torch.allclose(total / normaliser, whole, rtol=1e-6)
    if weighted and not multilabel and alpha is None and not gamma:
        assert torch.allclose(whole, F.cross_entropy(logits, labels, weight=w), rtol=1e-6)
        mean_of_means = sum(heads.classification_loss(logits[a:b], labels[a:b], False, w) * (b - a) for a, b in parts) / 10
        assert not torch.allclose(mean_of_means, whole, rtol=1e-3)  # what a per-batch mean would give


def _head_model(data, seed=0):
    torch.manual_seed(seed)
    m = model.Transformer(model.ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300,
                                          multiple_of=16, max_seq_len=96))
    m.init_weights()
    meta = shards.load_meta(str(data))
    heads.attach_head(m, len(meta["labels"]), meta["multilabel"], meta["labels"], pad_id=meta["eos_id"])
    torch.nn.init.normal_(m.score.weight, std=0.5)  # not the uniform start: every document's loss differs
    return m


def _grads(m):
    return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("batch_size,grad_accum", [(8, 1), (2, 4), (1, 8)])
def test_class_weighted_loss_is_the_weighted_mean_over_the_global_batch(multiclass, batch_size, grad_accum):
    """train_step's loss and gradients are F.cross_entropy(weight=balanced) over the 8 rows of the
    step taken at once, however they are split into micro-batches (each micro-batch's own weighted
    mean, averaged, would not be: its classes and so its weight sum differ)."""
    m = _head_model(multiclass)
    counts = shards.load_meta(str(multiclass))["label_counts"]["train"]
    weights = heads.balanced_class_weights(counts)
    assert weights.max() / weights.min() > 3  # imbalanced: the weights matter
    whole = shards.LabelledLoader(str(multiclass), "train", 8, 96, seed=3).next_batch()
    loss_module = train.HeadLoss(m, False, weights)
    want = F.cross_entropy(loss_module.logits(whole.inputs, whole.positions, whole.valid), whole.labels, weight=weights)
    want.backward()
    expected = _grads(m)
    m.zero_grad(set_to_none=True)

    cfg = SimpleNamespace(grad_accum=grad_accum, device="cpu", world=1, head="classify", doc_mask=True)
    loader = shards.LabelledLoader(str(multiclass), "train", batch_size, 96, seed=3)
    loss, n_docs = train.train_step(cfg, loss_module, loader, torch.autocast("cpu", enabled=False))
    assert n_docs == len(whole.labels) and len(set(whole.labels.tolist())) > 1
    assert loss == pytest.approx(want.item(), rel=1e-6)
    for name, grad in _grads(m).items():
        assert torch.allclose(grad, expected[name], rtol=1e-5, atol=1e-7), name


def _single_process_metrics(out_dir, data, base_dir):
    """The task's metrics of the saved checkpoint over the val split on one process, each document
    run alone (not packed), by heads.classification_metrics (scikit-learn)."""
    m = (lora.load_adapter(checkpoint.load(base_dir), out_dir / "adapter") if base_dir
         else checkpoint.load(out_dir / "model")).eval()
    loader = shards.LabelledLoader(str(data), "val", 1, 96, padded=True)
    probs, answers = [], []
    with torch.no_grad():
        for _ in range(loader.n_documents):
            b = loader.next_batch()
            probs.append(heads.probabilities(m.classify(b.inputs[:, :int(b.last[0]) + 1]), loader.multilabel)[0])
            answers.append(b.labels[0].nonzero().flatten().tolist() if loader.multilabel else int(b.labels[0]))
    return heads.classification_metrics(torch.stack(probs).numpy(), answers, loader.multilabel, loader.labels)


def _val_metrics(record):
    return {k: v for k, v in record.items() if k.startswith("val_") and k != "val_loss"}


@pytest.mark.parametrize("task", ["multiclass", "multilabel"])
def test_two_ranks_equal_one_rank_and_their_gathered_metrics_equal_one_process(multiclass, multilabel, base,
                                                                                 tmp_path, task):
    data = multiclass if task == "multiclass" else multilabel
    common = [*HEAD, "--data", data, "--ckpt_dir", base, "--lora_rank", "4", "--max_steps", "8",
              "--eval_every", "4", "--class_weights", "balanced"]
    run_train(*common, "--out_dir", tmp_path / "one", "--batch_size", "4")
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                          "train.py", *map(str, common), "--out_dir", tmp_path / "two", "--batch_size", "2"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    one, two_log = log(tmp_path / "one"), log(tmp_path / "two")
    assert [r["loss"] for r in one] == pytest.approx([r["loss"] for r in two_log], rel=1e-5)
    evaluated = [(a, b) for a, b in zip(one, two_log) if "val_loss" in a]
    assert [a["step"] for a, _ in evaluated] == [4, 8] and all("val_loss" in b for _, b in evaluated)
    n_val = shards.LabelledLoader(str(data), "val", 1, 96).n_documents
    names = heads.metric_names(len(shards.load_meta(str(data))["labels"]), task == "multilabel")
    for a, b in evaluated:
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-5)
        assert set(_val_metrics(a)) == {f"val_{n}" for n in (*names, "n")}
        assert a["val_n"] == b["val_n"] == n_val  # every document once, from both ranks
        assert _val_metrics(b) == pytest.approx(_val_metrics(a), abs=1e-6)
    if task == "multilabel":
        assert one[-1]["val_labels_skipped"] == 1  # nausea: in train only
    alone = _single_process_metrics(tmp_path / "two", data, base)
    assert {f"val_{k}": v for k, v in alone.items()} == pytest.approx(_val_metrics(two_log[-1]), abs=1e-6)
    last_line = [line for line in two.stdout.splitlines() if line.startswith("step 8/8")][0]
    assert f" {names[0]} " in last_line and f" {names[2]} " in last_line  # the eval line shows them


def _best(out_dir):
    return torch.load(out_dir / "best" / "train_state.pt", weights_only=False)


def test_keep_best_metric_keeps_the_highest_and_refuses_a_metric_the_task_lacks(multiclass, tmp_path):
    run_train(*HEAD, "--data", multiclass, "--out_dir", tmp_path, "--batch_size", "4", "--max_steps", "16",
              "--eval_every", "2", "--keep_best", "macro_f1")
    records = [r for r in log(tmp_path) if "val_macro_f1" in r]
    values = [r["val_macro_f1"] for r in records]
    assert len(set(values)) > 1  # the choice is not trivial
    top = max(values)
    state = _best(tmp_path)
    assert (state["best_metric"], state["best"], state["step"], state["best_step"]) == \
        ("val_macro_f1", top, records[values.index(top)]["step"], records[values.index(top)]["step"])
    latest = torch.load(tmp_path / "model" / "train_state.pt", weights_only=False)
    assert latest["step"] == 16 and latest["best"] == top
    for flag, says in [("val_micro_f1", "--keep_best val_micro_f1: not a validation metric of this multiclass head"),
                       ("labels_skipped", "--keep_best labels_skipped: not a validation metric")]:
        _one_line_error(run_train(*HEAD, "--data", multiclass, "--out_dir", tmp_path / "x", "--keep_best", flag,
                                  check=False), says)
    assert not (tmp_path / "x").exists()  # refused before any work


def test_keep_best_never_takes_an_undefined_value():
    run = SimpleNamespace(best=None, best_step=None)
    cfg = SimpleNamespace(keep_best="val_auroc", rank=1, max_steps=100)  # rank 1: nothing is written
    for step, value in [(1, None), (2, float("nan")), (3, 0.6), (4, float("nan")), (5, 0.6), (6, 0.7), (7, None)]:
        train.keep_if_best(cfg, run, step, {"val_auroc": value})
    assert (run.best, run.best_step) == (0.7, 6)
    cfg.keep_best, run.best = "val_loss", None
    for step, value in [(1, 0.5), (2, float("nan")), (3, 0.4), (4, 0.45)]:
        train.keep_if_best(cfg, run, step, {"val_loss": value})
    assert (run.best, run.best_step) == (0.4, 3)


def test_keep_best_says_when_it_kept_nothing(capsys, tmp_path):
    """A metric undefined at every evaluation (one class in the val split): the last one says that
    no best/ was written, so nobody scores a checkpoint that is not there."""
    run = SimpleNamespace(best=None, best_step=None)
    cfg = SimpleNamespace(keep_best="val_auroc", rank=0, max_steps=4, out_dir=str(tmp_path))
    for step in (2, 4):
        train.keep_if_best(cfg, run, step, {"val_auroc": None})
    err = capsys.readouterr().err
    assert err.count("warning: --keep_best val_auroc was undefined at every evaluation") == 1
    assert str(tmp_path / "best") in err and not (tmp_path / "best").exists()


def test_resume_keeps_the_best_so_far(multiclass, tmp_path):
    common = [*HEAD, "--data", multiclass, "--batch_size", "4", "--max_steps", "16", "--eval_every", "2",
              "--save_every", "1000", "--keep_best", "val_auroc"]
    run_train(*common, "--out_dir", tmp_path / "straight")
    status, err = interrupt_after([*common, "--out_dir", tmp_path / "cut"], tmp_path / "cut", 7, signal.SIGTERM)
    assert status == 130, err
    cut = torch.load(tmp_path / "cut" / "model" / "train_state.pt", weights_only=False)
    assert cut["best"] is not None and cut["best_metric"] == "val_auroc" and cut["step"] < 16
    # a copy whose best so far nothing can beat (an AUROC of 2): resumed, it must never replace best/
    shutil.copytree(tmp_path / "cut", tmp_path / "doctored")
    shutil.rmtree(tmp_path / "doctored" / "best")
    torch.save({**cut, "best": 2.0, "best_step": -1}, tmp_path / "doctored" / "model" / "train_state.pt")

    run_train(*common, "--out_dir", tmp_path / "cut", "--resume")
    assert losses(tmp_path / "cut") == losses(tmp_path / "straight")
    straight, resumed = _best(tmp_path / "straight"), _best(tmp_path / "cut")
    assert (resumed["best"], resumed["best_step"], resumed["step"]) == \
        (straight["best"], straight["best_step"], straight["step"])
    run_train(*common, "--out_dir", tmp_path / "doctored", "--resume")
    assert not (tmp_path / "doctored" / "best").exists()
    final = torch.load(tmp_path / "doctored" / "model" / "train_state.pt", weights_only=False)
    assert (final["step"], final["best"], final["best_step"]) == (16, 2.0, -1)
