"""train.py --head tag end to end on tiny models: a synthetic tagging task learnt from JSONL and from
CoNLL (entity F1 on held-out sentences, computed here from the saved checkpoint with seqeval, and equal
to the run's own val_f1), the tag head inside a LoRA adapter
(score.weight and score.bias, head kind "tag"), exact resume after SIGTERM, 2 DDP ranks equal one,
--class_weights balanced from meta.json's tag_counts, --keep_best f1, and one line for a head on
shards of the other kind."""

import contextlib
import json
import random
import shutil
import signal
import subprocess
import sys
import warnings

import pytest
import torch

import checkpoint
import heads
import lora
import model
from data import shards
from test_train import ROOT, TINY, _one_line_error, interrupt_after, log, losses, prepare, train

FILLER = "the patient was given and then reported with no sign of after today".split()
# entities of one to three words: B- on the first, I- on the rest (a tiny causal model learns B from I
# by the word before)
ENTITIES = {"CHEM": ["aspirin", "sodium chloride", "insulin glargine", "heparin"],
            "DIS": ["fever", "renal failure", "acute renal failure", "asthma"]}


def synthetic(n, seed):
    """n sentences of filler words and entities, as (words, tags)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words, tags = [], []
        for _ in range(rng.randint(2, 6)):
            if rng.random() < 0.4:
                kind = rng.choice(sorted(ENTITIES))
                phrase = rng.choice(ENTITIES[kind]).split()
                words += phrase
                tags += [f"B-{kind}"] + [f"I-{kind}"] * (len(phrase) - 1)
            else:
                words.append(rng.choice(FILLER))
                tags.append("O")
        out.append((words, tags))
    return out


def write_jsonl(path, items):
    with open(path, "w") as f:
        for words, tags in items:
            f.write(json.dumps({"tokens": words, "tags": tags}) + "\n")


def write_conll(path, items):
    with open(path, "w") as f:
        f.write("-DOCSTART-\tO\n\n")
        for words, tags in items:
            f.write("".join(f"{w}\t{t}\n" for w, t in zip(words, tags)) + "\n")


@pytest.fixture(scope="module")
def tagged(tmp_path_factory):
    d = tmp_path_factory.mktemp("ner")
    write_jsonl(d / "ner.jsonl", synthetic(240, 0))
    # 400: every word one token (smaller vocabularies spell words out from a shared first piece, whose
    # tag a causal model cannot tell before it sees the rest of the word)
    prepare(d / "ner.jsonl", d / "shards", "--vocab_size", "400", "--val_fraction", "0.25")
    return d / "shards"


@pytest.fixture(scope="module")
def conll(tmp_path_factory, tagged):
    d = tmp_path_factory.mktemp("conll")
    write_conll(d / "ner.conll", synthetic(240, 1))
    prepare(d / "ner.conll", d / "shards", "--tokenizer", tagged / "tokenizer.model", "--val_fraction", "0.25")
    return d / "shards"


@pytest.fixture(scope="module")
def base(tmp_path_factory, tagged):
    path = tmp_path_factory.mktemp("base")
    torch.manual_seed(0)
    m = model.Transformer(model.ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=400,
                                          multiple_of=16, max_seq_len=64))
    m.init_weights()
    checkpoint.save(m, path)
    shutil.copy(tagged / "tokenizer.model", path / "tokenizer.model")
    return path


HEAD = [*[a if a != "32" or TINY[i - 1] != "--seq_len" else "64" for i, a in enumerate(TINY)],
        "--head", "tag", "--batch_size", "4", "--lr", "3e-3"]


def val_tags(m, data):
    """(truth, predicted) tag names of every val sentence's words, each sentence run alone through
    tag(), each word read at the token its tag is on (the .tags sidecar)."""
    loader = shards.TaggedLoader(str(data), "val", 1, 64, padded=True)
    names = loader.labels
    truth, predicted = [], []
    with torch.no_grad():
        for _ in range(loader.n_documents):
            b = loader.next_batch()
            n = int(b.valid[0].sum())
            targets = b.targets[0, :n]
            on = targets != shards.IGNORE_INDEX
            guess = m.tag(b.inputs[:, :n])[0].argmax(-1)
            truth.append([names[i] for i in targets[on].tolist()])
            predicted.append([names[i] for i in guess[on].tolist()])
    return truth, predicted


def seqeval_scores(truth, predicted):
    from seqeval.metrics import accuracy_score, f1_score, precision_score, recall_score
    from seqeval.scheme import IOB2

    return {"f1": f1_score(truth, predicted), "precision": precision_score(truth, predicted),
            "recall": recall_score(truth, predicted), "f1_strict": f1_score(truth, predicted, mode="strict", scheme=IOB2),
            "token_accuracy": accuracy_score(truth, predicted)}


@contextlib.contextmanager
def _quiet():
    """seqeval warns where a score is 0 / 0 (and then gives 0, as tag_metrics does)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.mark.parametrize("source", ["jsonl", "conll"])
def test_learns_a_synthetic_tagging_task_and_logs_seqevals_metrics(tagged, conll, tmp_path, source):
    data = tagged if source == "jsonl" else conll
    out = train(*HEAD, "--data", data, "--out_dir", tmp_path, "--epochs", "4", "--eval_every", "1000",
                "--keep_best", "f1", "--class_weights", "balanced")
    records = log(tmp_path)
    assert "val_f1" in records[-1], out.stderr[-2000:]
    m = checkpoint.load(tmp_path / "model").eval()
    assert m.args.head_kind == "tag" and m.args.labels == tuple(shards.load_meta(data)["tags"])
    truth, predicted = val_tags(m, data)
    with _quiet():
        scores = seqeval_scores(truth, predicted)
    print(f"\n{source}: held-out entity F1 {scores['f1']:.3f}, strict {scores['f1_strict']:.3f}")
    assert scores["f1"] > 0.8, scores  # chance (a random tag per word) is well under 0.1
    rows = len(shards.TaggedLoader(str(data), "train", 4, 64, seed=1337).epoch_rows(0))
    assert len(records) == -(-4 * rows // 4)  # --epochs 4
    assert records[-1]["val_n"] == len(truth)
    assert {k: records[-1][f"val_{k}"] for k in heads.TAG_METRICS} == pytest.approx(scores, abs=1e-9)
    best = torch.load(tmp_path / "best" / "train_state.pt", weights_only=False)["best"]
    assert best == max(r["val_f1"] for r in records if "val_f1" in r)
    assert f" f1 {records[-1]['val_f1']:.3f}" in out.stdout  # the step line shows the metrics


def test_lora_adapter_holds_the_tag_head_and_reloads_with_the_same_logits(tagged, base, tmp_path):
    train(*HEAD, "--data", tagged, "--out_dir", tmp_path, "--ckpt_dir", base, "--lora_rank", "4",
          "--max_steps", "6", "--eval_every", "3")
    meta = json.load(open(tmp_path / "adapter" / "adapter.json"))
    tags = shards.load_meta(tagged)["tags"]
    assert meta["head"] == {"n_labels": len(tags), "multilabel": False, "labels": tags, "kind": "tag",
                            "pad_id": shards.load_meta(tagged)["eos_id"]}
    reloaded = lora.load_adapter(checkpoint.load(base), tmp_path / "adapter").eval()
    assert reloaded.args.head_kind == "tag"
    assert reloaded.score.weight.abs().sum() > 0 and reloaded.score.bias.abs().sum() > 0  # both trained
    tokens = shards.TaggedLoader(str(tagged), "val", 2, 64, padded=True).next_batch().inputs
    again = lora.load_adapter(checkpoint.load(base), tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.equal(reloaded.tag(tokens), again.tag(tokens))
    assert lora.base_fingerprint(reloaded) == meta["base_fingerprint"]  # the head is not the base


@pytest.mark.parametrize("use_lora", [False, True])
def test_interrupted_then_resumed_equals_uninterrupted(tagged, base, tmp_path, use_lora):
    common = [*HEAD, "--data", tagged, "--max_steps", "40", "--save_every", "1000", "--eval_every", "10",
              "--focal_gamma", "2"]
    if use_lora:
        common += ["--ckpt_dir", base, "--lora_rank", "4", "--lora_dropout", "0.1"]
    train(*common, "--out_dir", tmp_path / "straight")
    status, err = interrupt_after([*common, "--out_dir", tmp_path / "cut"], tmp_path / "cut", 5, signal.SIGTERM)
    assert status == 130, err
    train(*common, "--out_dir", tmp_path / "cut", "--resume")
    assert losses(tmp_path / "cut") == losses(tmp_path / "straight")
    keys = ("val_loss", "val_f1", "val_token_accuracy")
    assert [[r.get(k) for k in keys] for r in log(tmp_path / "cut")] == \
        [[r.get(k) for k in keys] for r in log(tmp_path / "straight")]


def test_two_ranks_equal_one_rank(tagged, base, tmp_path):
    unbatched = [a for i, a in enumerate(HEAD) if "--batch_size" not in HEAD[max(i - 1, 0):i + 1]]
    common = [*unbatched, "--data", tagged, "--ckpt_dir", base, "--lora_rank", "4", "--max_steps", "6",
              "--eval_every", "3", "--class_weights", "balanced"]
    train(*common, "--out_dir", tmp_path / "one", "--batch_size", "4")
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                          "train.py", *map(str, common), "--out_dir", tmp_path / "two", "--batch_size", "2"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    one, two_log = log(tmp_path / "one"), log(tmp_path / "two")
    assert [r["loss"] for r in one] == pytest.approx([r["loss"] for r in two_log], rel=1e-5)
    evaluated = [(a, b) for a, b in zip(one, two_log) if "val_loss" in a]
    assert [a["step"] for a, _ in evaluated] == [3, 6]
    n_val = shards.TaggedLoader(str(tagged), "val", 1, 64).n_documents
    for a, b in evaluated:
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-5)
        assert a["val_n"] == b["val_n"] == n_val  # every sentence once, from both ranks
        metrics = {f"val_{k}" for k in heads.TAG_METRICS}
        assert {k: b[k] for k in metrics} == pytest.approx({k: a[k] for k in metrics}, abs=1e-9)


def test_balanced_weights_come_from_the_train_tag_counts(tagged, tmp_path):
    """balanced_class_weights of meta.json's train tag_counts; HeadLoss's weighted mean over a batch's
    tagged words equals F.cross_entropy's (weight=, ignore_index=-100) on the same batch, and with
    --focal_gamma heads.tag_loss's."""
    import train as train_module

    meta = shards.load_meta(tagged)
    counts = meta["tag_counts"]["train"]
    weights = heads.balanced_class_weights(counts)
    assert weights.tolist() == pytest.approx([sum(counts) / (len(counts) * c) for c in counts])
    torch.manual_seed(0)
    m = model.Transformer(model.ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=400,
                                          multiple_of=16, max_seq_len=64))
    heads.attach_head(m, len(meta["tags"]), False, meta["tags"], kind="tag")
    torch.nn.init.normal_(m.score.weight)
    batch = shards.TaggedLoader(str(tagged), "train", 4, 64, seed=0).next_batch()
    loss = train_module.HeadLoss(m, False, weights, tag=True)
    got = loss(batch.inputs, batch.positions, batch.valid, batch.targets) / loss.normaliser(batch.targets)
    want = torch.nn.functional.cross_entropy(m.tag(batch.inputs, batch.positions).flatten(0, 1),
                                             batch.targets.flatten(), weight=weights, ignore_index=-100)
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    focal = train_module.HeadLoss(m, False, weights, focal_gamma=2.0, tag=True)  # --focal_gamma: heads.tag_loss's
    got = focal(batch.inputs, batch.positions, batch.valid, batch.targets) / focal.normaliser(batch.targets)
    want = heads.tag_loss(m.tag(batch.inputs, batch.positions), batch.targets, weights, focal_gamma=2.0)
    assert got.item() == pytest.approx(want.item(), rel=1e-6) and got.item() < loss(
        batch.inputs, batch.positions, batch.valid, batch.targets).item() / loss.normaliser(batch.targets)


def test_a_head_on_shards_of_the_other_kind_is_one_line(tagged, tmp_path):
    labelled = tmp_path / "labelled"
    with open(tmp_path / "notes.jsonl", "w") as f:
        for i in range(40):
            f.write(json.dumps({"text": f"note {i} fever" if i % 2 else f"note {i}", "label": str(i % 2)}) + "\n")
    prepare(tmp_path / "notes.jsonl", labelled, "--tokenizer", tagged / "tokenizer.model")
    _one_line_error(train(*HEAD, "--data", labelled, "--out_dir", tmp_path / "o", check=False),
                    f"--data {labelled} holds no tags")
    classify = [a if a != "tag" else "classify" for a in HEAD]
    _one_line_error(train(*classify, "--data", tagged, "--out_dir", tmp_path / "o", check=False),
                    "holds no labels (python -m data.prepare labelled records: JSONL label/labels, or "
                    "--label_column); its tags are for --head tag")
    _one_line_error(train(*HEAD, "--data", tagged, "--keep_best", "auroc", check=False),
                    "--keep_best auroc: not a validation metric of this tag head")
    _one_line_error(train(*HEAD, "--data", tagged, "--focal_alpha", "0.5", check=False), "--focal_alpha")


@pytest.mark.parametrize("kind", ["full", "qlora"])
def test_fsdp_equals_one_process(tagged, base, tmp_path, kind):
    """2 FSDP ranks (gloo) x batch 2 against 1 process x batch 2 x 2 micro-steps: the same sentences
    per step, so losses, validation losses and metrics agree to fp32 rounding, and the saved head too
    (a full run's model, or a QLoRA run's adapter: score's weight and bias)."""
    from test_fsdp import max_gap, torchrun

    unbatched = [a for i, a in enumerate(HEAD) if "--batch_size" not in HEAD[max(i - 1, 0):i + 1]]
    common = [*unbatched, "--data", tagged, "--ckpt_dir", base, "--max_steps", "6", "--eval_every", "3"]
    if kind == "qlora":
        common += ["--lora_rank", "4", "--quantize", "nf4"]
    train(*common, "--out_dir", tmp_path / "one", "--batch_size", "2", "--grad_accum", "2")
    torchrun(*common, "--out_dir", tmp_path / "fsdp", "--batch_size", "2", "--fsdp")
    one, two = log(tmp_path / "one"), log(tmp_path / "fsdp")
    assert max_gap([r["loss"] for r in two], [r["loss"] for r in one]) < 1e-5
    evaluated = [(a, b) for a, b in zip(one, two) if "val_loss" in a]
    assert [a["step"] for a, _ in evaluated] == [3, 6]
    for a, b in evaluated:
        assert b["val_loss"] == pytest.approx(a["val_loss"], abs=1e-5)
        assert b["val_n"] == a["val_n"] and b["val_token_accuracy"] == pytest.approx(a["val_token_accuracy"])
    name = "model" if kind == "full" else "adapter"
    if kind == "full":
        a, b = (checkpoint.load(tmp_path / run / name).state_dict() for run in ("one", "fsdp"))
    else:
        a, b = (lora.lora_state_dict(lora.load_adapter(checkpoint.load(base, quantize="nf4"), tmp_path / run / name))
                for run in ("one", "fsdp"))
    assert a.keys() == b.keys() and b["score.bias"].abs().sum() > 0
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=1e-4, atol=1e-6), key


def test_fsdp_lora_stops_and_resumes_exactly(tagged, base, tmp_path):
    """SIGTERM to torchrun, then --resume on 2 FSDP ranks: the uninterrupted run's losses and
    validation, exactly (the adapter's head, weight and bias, read back into the shards)."""
    from test_fsdp import torchrun, torchrun_cmd

    unbatched = [a for i, a in enumerate(HEAD) if "--batch_size" not in HEAD[max(i - 1, 0):i + 1]]
    common = [*unbatched, "--data", tagged, "--ckpt_dir", base, "--max_steps", "30", "--eval_every", "10",
              "--save_every", "1000", "--batch_size", "2", "--fsdp", "--lora_rank", "4"]
    torchrun(*common, "--out_dir", tmp_path / "straight")
    status, err = interrupt_after(torchrun_cmd(*common, "--out_dir", tmp_path / "cut"), tmp_path / "cut", 4,
                                  signal.SIGTERM)
    assert status != 0 and "continue with --resume" in err, err[-3000:]
    torchrun(*common, "--out_dir", tmp_path / "cut", "--resume")
    assert losses(tmp_path / "cut") == losses(tmp_path / "straight")
    keys = ("val_loss", "val_f1", "val_token_accuracy")
    assert [[r.get(k) for k in keys] for r in log(tmp_path / "cut")] == \
        [[r.get(k) for k in keys] for r in log(tmp_path / "straight")]
