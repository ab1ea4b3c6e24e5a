"""train.py --head classify with --quantize nf4 (QLoRA) and with --fsdp (FSDP2, 2 CPU ranks on gloo).

QLoRA: the NF4 model's pooled logits against transformers' LlamaForSequenceClassification holding the
weights bitsandbytes dequantizes from the same 4-bit bytes, the adapters folded in; a tiny run learns
the separable task (AUROC on val), its adapter holds the fp32 head, and eval.py --adapter on the NF4
base, lora.load_adapter and the model in memory at the end of training give the same probabilities;
SIGTERM then --resume equals the uninterrupted run.
FSDP: 2 ranks equal one process with 2 micro-steps (the same global batch), the head sharded and
trained like the rest, saved in our checkpoint and in DCP's optimizer state; stop and --resume exact."""

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

import checkpoint
import lora
import model
import tokenizer
from ckpt_utils import rel_err
from test_fsdp import max_gap, torchrun, torchrun_cmd
from test_head_training import HEAD, TINY, auroc, base, labelled, val_scores  # noqa: F401  (fixtures)
from test_train import ROOT, interrupt_after, log, losses, train

bnb = pytest.importorskip("bitsandbytes")


# -- QLoRA ------------------------------------------------------------------------------------------


def _hf_rope(w, heads):
    """Meta's interleaved q/k rows -> transformers' halves (the inverse of ckpt_utils' to_meta_rope)."""
    rows, cols = w.shape
    return w.reshape(heads, rows // heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


HF_PROJ = {"wq": "self_attn.q_proj", "wk": "self_attn.k_proj", "wv": "self_attn.v_proj", "wo": "self_attn.o_proj",
           "w1": "mlp.gate_proj", "w2": "mlp.down_proj", "w3": "mlp.up_proj"}


def test_nf4_pooled_logits_equal_transformers_on_the_dequantized_weights(tmp_path):
    """Tolerance: fp32, relative 1e-5 per row. Both sides use the same 4-bit bytes; transformers holds
    the weights bitsandbytes' own (PyTorch-backend) dequantization gives, plus each adapter's B A
    scale, and pools with its own rule (right, left padding, a row of padding alone)."""
    from test_heads import PAD, hf_classifier, hf_logits, padded_batch
    from test_qlora import _bnb_flat_dequantize, _bnb_state

    hf = hf_classifier("llama3.1", n_labels=3)
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    q = checkpoint.load(tmp_path / "hf", quantize="nf4")
    lora.apply_lora(q, rank=4, alpha=8)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, m in lora.lora_modules(q):
            m.lora_A.copy_(torch.randn(m.lora_A.shape, generator=g) * 0.1)
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)
    assert q.score.weight.dtype == torch.float32 and torch.equal(q.score.weight, hf.score.weight)
    tokens = padded_batch(q.args.vocab_size)
    with torch.no_grad():
        before, _ = hf_logits(hf, tokens)
        for name, m in lora.lora_modules(q):
            layer, proj = name.split(".")[1], name.split(".")[-1]
            nf4 = m.base
            state = {k: getattr(nf4, k) for k in ("packed", "absmax", "absmax_scale", "absmax_offset")}
            shape = (nf4.out_features, nf4.in_features)
            dense = _bnb_flat_dequantize(nf4.packed, _bnb_state(state, shape, torch.float32)).double()
            dense += (m.lora_B.double() @ m.lora_A.double()) * (8 / 4)
            if proj in ("wq", "wk"):
                dense = _hf_rope(dense, q.args.n_heads if proj == "wq" else q.args.n_kv_heads)
            hf.model.layers[int(layer)].get_submodule(HF_PROJ[proj]).weight.copy_(dense.float())
        ours = q.classify(tokens)
    ref, _ = hf_logits(hf, tokens)
    assert q.args.pad_id == PAD and ours.shape == (5, 3)
    gaps = [rel_err(ours[row], ref[row]) for row in range(len(tokens))]
    print(f"\nNF4 + LoRA head vs transformers on the dequantized weights: max row rel err {max(gaps):.1e}; "
          f"vs the unquantized model {rel_err(ours, before):.1e}")
    assert max(gaps) < 1e-5, gaps  # each kind of row on its own
    assert rel_err(ours, before) > 1e-3  # the 4-bit weights and the adapters do change the logits


# The probabilities of the model in memory when training ends (train.py's own steps, then classify
# on each record's tokens as eval.py encodes them), into a JSON file.
IN_MEMORY = """
import json, sys, torch
import train
cfg = train.TrainConfig(**json.loads(sys.argv[1]))
train.setup_distributed(cfg)
with train.claim_out_dir(cfg):
    run = train.set_up(cfg)
    with train.StopOnSignal() as stop:
        step, last_saved = train.loop(cfg, run, stop)
    train.finish(cfg, run, step, last_saved, stop.requested)
run.model.eval()
probs = []
with torch.no_grad():
    for line in open(sys.argv[2]):
        ids = run.tokenizer.encode(json.loads(line)["text"], bos=True, eos=True)
        probs.append(run.model.classify(torch.tensor([ids])).softmax(-1)[0].tolist())
json.dump(probs, open(sys.argv[3], "w"))
"""


def _records(labelled, path, n=40):
    """The first n notes of the fixture's CSV as eval.py's classify records."""
    import csv

    with open(labelled.parent / "notes.csv") as f:
        rows = list(csv.DictReader(f))[:n]
    path.write_text("".join(json.dumps({"text": r["note"], "label": r["fever"]}) + "\n" for r in rows))
    return path


QLORA = [*HEAD, "--lora_rank", "4", "--quantize", "nf4", "--lr", "1e-2", "--save_every", "1000"]


def test_qlora_head_learns_saves_and_scores_the_same_everywhere(labelled, base, tmp_path):
    flags = {"data": str(labelled), "ckpt_dir": str(base), "out_dir": str(tmp_path / "run"), "dim": 32,
             "n_layers": 2, "n_heads": 4, "seq_len": 96, "mlflow": False, "head": "classify", "batch_size": 4,
             "eval_every": 10, "lora_rank": 4, "quantize": "nf4", "lr": 1e-2, "max_steps": 60, "save_every": 1000}
    records = _records(labelled, tmp_path / "notes.jsonl")
    probe = tmp_path / "probe.py"
    probe.write_text(IN_MEMORY)
    out = subprocess.run([sys.executable, str(probe), json.dumps(flags), str(records), str(tmp_path / "mem.json")],
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    adapter = tmp_path / "run" / "adapter"
    meta = json.loads((adapter / "adapter.json").read_text())
    assert meta["base_quantize"] == "nf4" and meta["head"]["labels"] == ["no", "yes"]
    from safetensors.torch import load_file
    assert load_file(adapter / "adapter.safetensors")["score.weight"].dtype == torch.float32  # the fp32 master

    reloaded = lora.load_adapter(checkpoint.load(base, quantize="nf4"), adapter).eval()
    assert isinstance(reloaded.layers[0].attention.wq.base, model.NF4Linear)
    probs, truth = val_scores(reloaded, labelled)
    print(f"\nQLoRA head, 60 steps: val AUROC {auroc(probs, truth):.3f}")
    assert auroc(probs, truth) > 0.85

    r = subprocess.run([sys.executable, "eval.py", "--ckpt_dir", str(base), "--adapter", str(adapter), "--quantize",
                        "nf4", "--task", "classify", "--data", str(records), "--out", str(tmp_path / "r.json"),
                        "--mlflow", "false"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    scored = [item["probabilities"] for item in json.loads((tmp_path / "r.json").read_text())["items"]]
    in_memory = json.loads((tmp_path / "mem.json").read_text())
    tok = tokenizer.load(str(adapter))
    with torch.no_grad():
        loaded = [reloaded.classify(torch.tensor([tok.encode(json.loads(line)["text"], bos=True, eos=True)]))
                  .softmax(-1)[0].tolist() for line in open(records)]
    assert len(scored) == len(in_memory) == len(loaded) == 40
    for a, b, c in zip(scored, in_memory, loaded):
        assert a == pytest.approx(b, abs=1e-6) and c == pytest.approx(b, abs=1e-6)
    assert max(abs(p[1] - 0.5) for p in in_memory) > 0.1  # trained: not the zero head's one half


def test_qlora_head_resumes_exactly(labelled, base, tmp_path):
    common = [*QLORA, "--data", labelled, "--ckpt_dir", base, "--max_steps", "30", "--lora_dropout", "0.1"]
    train(*common, "--out_dir", tmp_path / "straight")
    status, err = interrupt_after([*common, "--out_dir", tmp_path / "cut"], tmp_path / "cut", 5, signal.SIGTERM)
    assert status == 130, err
    assert 5 <= torch.load(tmp_path / "cut" / "adapter" / "train_state.pt", weights_only=False)["step"] < 30
    train(*common, "--out_dir", tmp_path / "cut", "--resume")
    assert losses(tmp_path / "cut") == losses(tmp_path / "straight")
    assert [r.get("val_loss") for r in log(tmp_path / "cut")] == [r.get("val_loss") for r in log(tmp_path / "straight")]


# -- FSDP -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["full", "lora", "qlora"])
def test_fsdp_head_equals_one_process(labelled, base, tmp_path, kind):
    """2 FSDP ranks x batch 2 against 1 process x batch 2 x 2 micro-steps: the same documents per
    step, so losses and validation losses agree to fp32 rounding (|gap| < 1e-5), and the saved head
    (and adapters) too."""
    common = [*TINY, "--head", "classify", "--data", labelled, "--ckpt_dir", base, "--max_steps", "6",
              "--eval_every", "3", "--lr", "3e-3"]
    if kind != "full":
        common += ["--lora_rank", "4"] + (["--quantize", "nf4"] if kind == "qlora" else [])
    train(*common, "--out_dir", tmp_path / "one", "--batch_size", "2", "--grad_accum", "2")
    torchrun(*common, "--out_dir", tmp_path / "fsdp", "--batch_size", "2", "--fsdp")
    one, two = log(tmp_path / "one"), log(tmp_path / "fsdp")
    gap = max_gap([r["loss"] for r in two], [r["loss"] for r in one])
    val_gap = max_gap([r["val_loss"] for r in two if "val_loss" in r], [r["val_loss"] for r in one if "val_loss" in r])
    print(f"\n{kind} head: FSDP 2 ranks vs 1 process x 2 micro-steps, max |loss gap| {gap:.2e}, val {val_gap:.2e}")
    assert gap < 1e-5 and val_gap < 1e-5
    assert len({r["loss"] for r in one}) > 1

    name = "model" if kind == "full" else "adapter"
    if kind == "full":
        a, b = (checkpoint.load(tmp_path / run / name) for run in ("one", "fsdp"))
        assert b.args.labels == ("no", "yes")
        a, b = a.state_dict(), b.state_dict()
    else:
        a, b = (lora.lora_state_dict(lora.load_adapter(checkpoint.load(base), tmp_path / run / name))
                for run in ("one", "fsdp"))
    assert a.keys() == b.keys() and "score.weight" in b and b["score.weight"].abs().sum() > 0
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=1e-4, atol=1e-6), key
    assert sorted(os.listdir(tmp_path / "fsdp" / name / "optimizer")) == [".metadata", "__0_0.distcp", "__1_0.distcp"]


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_fsdp_head_stops_and_resumes_exactly(labelled, base, tmp_path, kind):
    """SIGTERM to torchrun, then --resume on 2 ranks: the uninterrupted run's losses, exactly (the
    head's weights from our checkpoint, its AdamW moments from DCP's files); on 1 rank with 2
    micro-steps, the same global batch, within fp32 rounding."""
    common = [*TINY, "--head", "classify", "--data", labelled, "--ckpt_dir", base, "--max_steps", "40",
              "--eval_every", "10", "--save_every", "1000", "--batch_size", "2", "--lr", "3e-3", "--fsdp"]
    if kind == "lora":
        common += ["--lora_rank", "4"]
    torchrun(*common, "--out_dir", tmp_path / "straight")
    status, err = interrupt_after(torchrun_cmd(*common, "--out_dir", tmp_path / "cut"), tmp_path / "cut", 4,
                                  signal.SIGTERM)
    assert status != 0 and "continue with --resume" in err, err[-3000:]
    name = "model" if kind == "full" else "adapter"
    stopped = torch.load(tmp_path / "cut" / name / "train_state.pt", weights_only=False)["step"]
    assert 4 <= stopped < 40
    shutil.copytree(tmp_path / "cut", tmp_path / "cut1")
    torchrun(*common, "--out_dir", tmp_path / "cut", "--resume")
    assert losses(tmp_path / "cut") == losses(tmp_path / "straight")
    assert [r.get("val_loss") for r in log(tmp_path / "cut")] == [r.get("val_loss") for r in log(tmp_path / "straight")]
    # on 1 rank with 2 micro-steps (FSDP's gradient sync switched through HeadLoss), DCP resharding
    train(*common, "--out_dir", tmp_path / "cut1", "--resume", "--grad_accum", "2")
    straight, resumed = losses(tmp_path / "straight"), losses(tmp_path / "cut1")
    assert resumed[:stopped] == straight[:stopped] and max_gap(resumed[stopped:], straight[stopped:]) < 1e-5


# What set-up gives one rank under --fsdp --head: the head's weight a DTensor sharded by rows like
# the rest, trained (in the optimizer), the LM output frozen; into a file per rank.
SHARDED = """
import json, os, sys
import train
cfg = train.TrainConfig(**json.loads(sys.argv[1]))
train.setup_distributed(cfg)
run = train.set_up(cfg)
w = run.model.score.weight
in_optimizer = any(p is w for group in run.optimizer.param_groups for p in group["params"])
with open(os.path.join(sys.argv[2], f"rank{cfg.rank}.json"), "w") as f:
    json.dump({"type": type(w).__name__, "placements": [[type(p).__name__, getattr(p, "dim", None)] for p in w.placements],
               "local": list(w.to_local().shape), "global": list(w.shape), "trained": w.requires_grad and in_optimizer,
               "output_frozen": not run.model.output.weight.requires_grad}, f)
"""


def test_fsdp_shards_the_head_like_the_rest(labelled, base, tmp_path):
    flags = dict(data=str(labelled), ckpt_dir=str(base), out_dir=str(tmp_path / "o"), seq_len=96, batch_size=2,
                 mlflow=False, fsdp=True, head="classify", lora_rank=4)
    probe = tmp_path / "probe.py"
    probe.write_text(SHARDED)
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                          str(probe), json.dumps(flags), str(tmp_path)], cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r in ranks:  # 2 labels x dim 32: one row per rank
        assert r == {"type": "DTensor", "placements": [["Shard", 0]], "local": [1, 32], "global": [2, 32],
                     "trained": True, "output_frozen": True}, r


def test_fsdp_resume_on_data_with_other_labels_is_one_line(labelled, base, tmp_path):
    """A head checkpoint resumed on shards whose labels differ: refused in one line, full and LoRA
    (--fsdp on one process reads the adapter through fsdp.load_adapter)."""
    from test_head_training import prepare
    from test_train import _one_line_error

    import csv
    with open(labelled.parent / "notes.csv") as f, open(tmp_path / "flipped.csv", "w", newline="") as g:
        csv.writer(g).writerows([row[0], {"yes": "no", "no": "yes"}.get(row[1], row[1])] for row in csv.reader(f))
    prepare(tmp_path / "flipped.csv", tmp_path / "flipped", "--text_column", "note", "--label_column", "fever",
            "--tokenizer", labelled / "tokenizer.model", "--labels", "yes,no", "--val_fraction", "0.2")
    for extra in ([], ["--lora_rank", "4"]):
        common = [*TINY, "--head", "classify", "--ckpt_dir", base, "--max_steps", "1", "--batch_size", "2", "--fsdp",
                  *extra]
        out_dir = tmp_path / ("lora" if extra else "full")
        train(*common, "--data", labelled, "--out_dir", out_dir)
        _one_line_error(train(*common, "--data", tmp_path / "flipped", "--out_dir", out_dir, "--resume", check=False),
                        "['no', 'yes']")
