"""train.py --head classify end to end on tiny models: a separable task learnt from a CSV (accuracy
and AUROC on held-out notes from the saved checkpoint), the head inside a LoRA adapter (reloaded
with the same logits), exact resume, --epochs, --keep_best, class weights and focal flags, and one
line for --head on unlabelled shards."""

import csv
import json
import os
import random
import shutil
import signal

import pytest
import torch

import checkpoint
import lora
import model
from data import shards
from test_train import TINY, _one_line_error, interrupt_after, log, losses, prepare, train

WORDS = "patient denies chest pain cough reports mild headache since monday rash nausea".split()


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """A CSV of notes, label yes where the note mentions fever: learnable from one token."""
    d = tmp_path_factory.mktemp("notes")
    rng = random.Random(0)
    with open(d / "notes.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["note", "fever"])
        for i in range(240):
            words = [rng.choice(WORDS) for _ in range(rng.randint(4, 12))]
            if i % 2:
                words.insert(rng.randint(0, len(words)), "fever")
            w.writerow([" ".join(words), "yes" if i % 2 else "no"])
    prepare(d / "notes.csv", d / "shards", "--text_column", "note", "--label_column", "fever", "--vocab_size", "300",
            "--val_fraction", "0.2")
    return d / "shards"


@pytest.fixture(scope="module")
def base(tmp_path_factory, labelled):
    """A tiny 'pretrained' model (no head) over the labelled shards' vocabulary."""
    path = tmp_path_factory.mktemp("base")
    torch.manual_seed(0)
    m = model.Transformer(model.ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300,
                                          multiple_of=16, max_seq_len=64))
    m.init_weights()
    checkpoint.save(m, path)
    shutil.copy(labelled / "tokenizer.model", path / "tokenizer.model")
    return path


TINY = [a if a != "32" or TINY[i - 1] != "--seq_len" else "96" for i, a in enumerate(TINY)]  # whole notes
HEAD = [*TINY, "--head", "classify", "--batch_size", "4", "--eval_every", "10"]


def val_scores(m, data):
    """(P(yes), is yes) of every val document, each run alone through classify."""
    loader = shards.LabelledLoader(str(data), "val", 1, 96, padded=True)
    yes = loader.labels.index("yes")
    probs, truth = [], []
    with torch.no_grad():
        for _ in range(loader.n_documents):
            b = loader.next_batch()
            row = b.inputs[:, :int(b.last[0]) + 1]
            probs.append(torch.softmax(m.classify(row), -1)[0, yes].item())
            truth.append(int(b.labels[0]) == yes)
    return probs, truth


def auroc(probs, truth):
    pos = [p for p, t in zip(probs, truth) if t]
    neg = [p for p, t in zip(probs, truth) if not t]
    return sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))


def test_from_scratch_learns_a_separable_task_from_a_csv(labelled, tmp_path):
    out = train(*HEAD, "--data", labelled, "--out_dir", tmp_path, "--epochs", "3", "--lr", "3e-3",
                "--keep_best", "val_loss")
    records = log(tmp_path)
    assert records[-1]["step"] == records[-1]["step"] and "val_loss" in records[-1], out.stderr
    assert records[-1]["val_loss"] < records[0]["loss"]
    m = checkpoint.load(tmp_path / "model")
    assert m.args.labels == ("no", "yes") and not m.args.multilabel
    probs, truth = val_scores(m.eval(), labelled)
    assert auroc(probs, truth) > 0.9
    assert sum((p > 0.5) == t for p, t in zip(probs, truth)) / len(truth) > 0.8
    best = min(r["val_loss"] for r in records if "val_loss" in r)
    assert torch.load(tmp_path / "best" / "train_state.pt", weights_only=False)["best"] == best
    # the last evaluation's metrics: the saved model's, AUROC as counted by hand over every val note
    assert records[-1]["val_n"] == len(truth)
    assert records[-1]["val_auroc"] == pytest.approx(auroc(probs, truth), abs=1e-6)
    assert records[-1]["val_accuracy"] == pytest.approx(sum((p > 0.5) == t for p, t in zip(probs, truth)) / len(truth))


def test_epochs_sets_max_steps_from_the_rows_of_an_epoch(labelled, tmp_path):
    train(*HEAD, "--data", labelled, "--out_dir", tmp_path, "--epochs", "2")
    rows = len(shards.LabelledLoader(str(labelled), "train", 4, 96, seed=1337).epoch_rows(0))
    assert len(log(tmp_path)) == -(-2 * rows // 4)


def test_lora_adapter_holds_the_head_and_reloads_with_the_same_logits(labelled, base, tmp_path):
    train(*HEAD, "--data", labelled, "--out_dir", tmp_path, "--ckpt_dir", base, "--lora_rank", "4",
          "--max_steps", "12")
    meta = json.load(open(tmp_path / "adapter" / "adapter.json"))
    assert meta["head"] == {"n_labels": 2, "multilabel": False, "labels": ["no", "yes"],
                            "pad_id": shards.load_meta(labelled)["eos_id"]}
    assert "n_labels" not in meta["base_params"]
    reloaded = lora.load_adapter(checkpoint.load(base), tmp_path / "adapter").eval()
    assert reloaded.score.weight.abs().sum() > 0  # trained, not the zeros it starts from
    tokens = shards.LabelledLoader(str(labelled), "val", 2, 96, padded=True).next_batch().inputs[:, :64]
    again = lora.load_adapter(checkpoint.load(base), tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.equal(reloaded.classify(tokens), again.classify(tokens))
    headless = lora.apply_lora(checkpoint.load(base), 4, 8.0)  # an adapter without a head: as before
    lora.write_adapter(headless, tmp_path)
    assert "head" not in json.load(open(tmp_path / "adapter.json"))
    assert lora.load_adapter(checkpoint.load(base), tmp_path).score is None


@pytest.mark.parametrize("use_lora", [False, True])
def test_interrupted_then_resumed_equals_uninterrupted(labelled, base, tmp_path, use_lora):
    common = [*HEAD, "--data", labelled, "--max_steps", "60", "--save_every", "1000"]
    if use_lora:
        common += ["--ckpt_dir", base, "--lora_rank", "4", "--lora_dropout", "0.1"]
    train(*common, "--out_dir", tmp_path / "straight")
    status, err = interrupt_after([*common, "--out_dir", tmp_path / "cut"], tmp_path / "cut", 5, signal.SIGTERM)
    assert status == 130, err
    train(*common, "--out_dir", tmp_path / "cut", "--resume")
    assert losses(tmp_path / "cut") == losses(tmp_path / "straight")
    assert [r.get("val_loss") for r in log(tmp_path / "cut")] == [r.get("val_loss") for r in log(tmp_path / "straight")]


def test_class_weights_and_focal_flags_change_the_loss(labelled, tmp_path):
    def first_loss(*flags):
        out_dir = tmp_path / "_".join(f.strip("-") for f in flags) if flags else tmp_path / "plain"
        train(*HEAD, "--data", labelled, "--out_dir", out_dir, "--max_steps", "1", *flags)
        return log(out_dir)[0]["loss"]

    plain = first_loss()
    assert plain == pytest.approx(0.693147, abs=1e-5)  # the zero-initialised head: log 2
    assert first_loss("--focal_gamma", "2") == pytest.approx(plain * 0.25, rel=1e-4)  # (1 - 1/2)^2
    assert first_loss("--focal_gamma", "0", "--focal_alpha", "0.9") != plain
    assert first_loss("--class_weights", "balanced") == pytest.approx(plain, rel=1e-4)  # uniform p: any weights


def test_head_on_unlabelled_shards_and_unfinished_modes_are_one_line(labelled, tmp_path):
    from test_train import _corpus
    _corpus(tmp_path / "notes.jsonl")
    prepare(tmp_path / "notes.jsonl", tmp_path / "text", "--tokenizer", labelled / "tokenizer.model")
    _one_line_error(train(*HEAD, "--data", tmp_path / "text", "--out_dir", tmp_path / "o", check=False),
                    f"--data {tmp_path / 'text'} holds no labels")
    _one_line_error(train(*TINY, "--head", "tag", "--data", labelled, check=False),
                    f"--data {labelled} holds no tags (python -m data.prepare tagged records: JSONL tokens/tags, or "
                    f"CoNLL); its labels are for --head classify")
    _one_line_error(train(*HEAD, "--data", labelled, "--fsdp", "--keep_best", "val_loss", check=False),
                    "--keep_best: not yet with --fsdp")
    _one_line_error(train(*TINY, "--data", labelled, "--class_weights", "balanced", check=False), "needs --head")
    _one_line_error(train(*HEAD, "--data", labelled, "--epochs", "2", "--max_steps", "5", check=False),
                    "--epochs and --max_steps: give one")
