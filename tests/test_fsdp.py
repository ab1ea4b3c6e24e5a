"""train.py --fsdp (FSDP2) on 2 CPU ranks over gloo, against the runs it must equal: one process with 2
micro-steps (the loss curve), the same run under DDP (the checkpoint it writes), an uninterrupted run
(stop and --resume, on 2 ranks and on 1); and each rank's share of the training state, measured."""

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
from ckpt_utils import hf_model, write_hf
from test_train import (ROOT, TINY, _one_line_error, base_ckpt, interrupt_after, log, losses,  # noqa: F401  (fixtures)
                        text_data, train)


def torchrun(*args, nproc=2):
    """train.py under torchrun with nproc ranks (gloo on the CPU)."""
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--standalone",
                          "train.py", *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def torchrun_cmd(*args, nproc=2):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--standalone",
            "train.py", *map(str, args)]


def max_gap(a, b):
    assert len(a) == len(b) and a
    return max(abs(x - y) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def tied_hf_base(tmp_path_factory, text_data):
    """A Llama 3.2-shaped base (tied embedding, GQA, scaled RoPE) in the HF layout: the sharded load
    slices safetensors tensors after un-permuting q/k, and ties the output to the embedding."""
    path = tmp_path_factory.mktemp("hf32")
    write_hf(hf_model("llama3.2"), path)
    shutil.copy(text_data / "tokenizer.model", path / "tokenizer.model")
    return path


@pytest.mark.parametrize("kind", ["scratch", "lora", "full_tied_hf", "qlora"])
def test_fsdp_equals_one_process_and_writes_what_ddp_writes(text_data, base_ckpt, tied_hf_base, tmp_path, kind):
    """The loss curve of 2 FSDP ranks equals one process with 2 micro-steps (|gap| < 1e-4), and the
    checkpoint it writes loads with checkpoint.load (or as an adapter) and equals the 2-rank DDP run's."""
    common = [*TINY, "--data", text_data, "--max_steps", "5", "--eval_every", "5",
              "--lr", "1e-3" if kind == "full_tied_hf" else "3e-3"]
    if kind in ("lora", "qlora"):
        common += ["--ckpt_dir", base_ckpt, "--lora_rank", "4"] + (["--quantize", "nf4"] if kind == "qlora" else [])
    if kind == "full_tied_hf":
        common += ["--ckpt_dir", tied_hf_base]
    train(*common, "--out_dir", tmp_path / "one", "--batch_size", "2", "--grad_accum", "2")
    # from scratch, recomputing each block in backward too (all-gathering its weights again)
    recompute = ["--activation_checkpointing"] if kind == "scratch" else []
    torchrun(*common, "--out_dir", tmp_path / "fsdp", "--batch_size", "2", "--fsdp", *recompute)
    torchrun(*common, "--out_dir", tmp_path / "ddp", "--batch_size", "2")
    one, fsdp, ddp = (losses(tmp_path / run) for run in ("one", "fsdp", "ddp"))
    gap = max_gap(fsdp, one)
    print(f"\n{kind}: FSDP 2 ranks vs 1 process x 2 micro-steps, max |loss gap| {gap:.2e} over {len(one)} steps")
    assert gap < 1e-4
    assert log(tmp_path / "fsdp")[-1]["tokens"] == log(tmp_path / "one")[-1]["tokens"] == 5 * 4 * 32
    assert losses(tmp_path / "fsdp") != [losses(tmp_path / "fsdp")[0]] * 5  # it trained

    if kind in ("lora", "qlora"):  # the adapter applies onto its base (fingerprint checked) and equals DDP's
        a, b = checkpoint.load(base_ckpt), checkpoint.load(base_ckpt)
        lora.load_adapter(a, tmp_path / "fsdp" / "adapter")
        lora.load_adapter(b, tmp_path / "ddp" / "adapter")
        a, b = lora.lora_state_dict(a), lora.lora_state_dict(b)
        assert any(t.abs().sum() > 0 for name, t in a.items() if name.endswith("lora_B"))  # trained
    else:
        a, b = (checkpoint.load(tmp_path / run / "model") for run in ("fsdp", "ddp"))
        assert a.tied == b.tied == (kind == "full_tied_hf")
        a, b = a.state_dict(), b.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=1e-4, atol=1e-6), name
    written = tmp_path / "fsdp" / ("adapter" if "lora" in kind else "model")
    assert sorted(os.listdir(written / "optimizer")) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    if kind == "qlora":
        assert json.loads((written / "adapter.json").read_text())["base_quantize"] == "nf4"


def test_fsdp_stop_and_resume_on_two_ranks_and_on_one(base_ckpt, text_data, tmp_path):
    """SIGTERM to torchrun (as a scheduler sends it) after k steps, then --resume: the losses of the
    uninterrupted run, exactly on 2 ranks; on 1 rank with 2 micro-steps from the same 2-rank
    checkpoint (DCP reshards the optimizer state), the same within 1e-4."""
    common = [*TINY, "--data", text_data, "--ckpt_dir", base_ckpt, "--lora_rank", "4", "--max_steps", "150",
              "--eval_every", "50", "--save_every", "1000", "--batch_size", "2", "--lr", "3e-3", "--fsdp"]
    torchrun(*common, "--out_dir", tmp_path / "straight")
    status, err = interrupt_after(torchrun_cmd(*common, "--out_dir", tmp_path / "cut"), tmp_path / "cut", 10,
                                  signal.SIGTERM)
    assert status != 0 and "continue with --resume" in err, err[-3000:]
    stopped = len(losses(tmp_path / "cut"))
    state = torch.load(tmp_path / "cut" / "adapter" / "train_state.pt", weights_only=True)
    assert state["step"] == stopped and 10 <= stopped < 150
    shutil.copytree(tmp_path / "cut", tmp_path / "cut1")

    torchrun(*common, "--out_dir", tmp_path / "cut", "--resume")
    assert losses(tmp_path / "cut") == losses(tmp_path / "straight")

    one = train(*common, "--out_dir", tmp_path / "cut1", "--resume", "--grad_accum", "2")  # the same global batch
    assert "1 rank(s)" in one.stderr and "resuming with changes" not in one.stderr
    straight, resumed = losses(tmp_path / "straight"), losses(tmp_path / "cut1")
    assert resumed[:stopped] == straight[:stopped]
    gap = max_gap(resumed[stopped:], straight[stopped:])
    print(f"\nresumed on 1 rank from a 2-rank checkpoint at step {stopped}: max |loss gap| {gap:.2e}")
    assert gap < 1e-4


# What one rank holds, after one optimizer step of a run set up exactly as train.py sets it up,
# into a file per rank (two ranks printing at once could mix their lines).
PROBE = """
import json, os, sys
import fsdp, train
cfg = train.TrainConfig(**json.loads(sys.argv[1]))
train.setup_distributed(cfg)
run = train.set_up(cfg)
train.train_step(cfg, run.wrapped, run.train_loader, run.autocast)
run.optimizer.step()
params, states = fsdp.local_bytes(run.model, run.optimizer)
with open(os.path.join(sys.argv[2], f"rank{cfg.rank}.json"), "w") as f:
    json.dump({"rank": cfg.rank, "params": params, "optimizer": states}, f)
"""


@pytest.mark.parametrize("kind", ["scratch", "qlora"])
def test_each_rank_holds_half_of_the_training_state(text_data, base_ckpt, tmp_path, kind):
    """Parameters and AdamW state from the tensors each rank holds; with QLoRA the parameters are
    mostly the NF4 base's 4-bit codes (its few fp32 scales are buffers, replicated, not counted)."""
    flags = dict(data=str(text_data), out_dir=str(tmp_path / "o"), seq_len=32, batch_size=2, mlflow=False, fsdp=True)
    if kind == "scratch":
        flags.update(dim=64, n_layers=2, n_heads=4, multiple_of=32)
    else:
        flags.update(ckpt_dir=str(base_ckpt), lora_rank=4, quantize="nf4")
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    env = {**os.environ, "PYTHONPATH": ROOT}

    def ranks(launcher, out_dir):
        out_dir.mkdir()
        out = subprocess.run([*launcher, str(probe), json.dumps(flags), str(out_dir)], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        return [json.loads(path.read_text()) for path in sorted(out_dir.glob("rank*.json"))]

    (whole,) = ranks([sys.executable], tmp_path / "one")
    two = ranks([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone"],
                tmp_path / "two")
    print(f"\n{kind + ':':10}{'parameters':>14}{'optimizer':>14}   (bytes)")
    print(f"{'1 rank':10}{whole['params']:>14,}{whole['optimizer']:>14,}")
    for r in two:
        print(f"{'rank ' + str(r['rank']) + '/2':10}{r['params']:>14,}{r['optimizer']:>14,}")
    assert len(two) == 2
    if kind == "scratch":
        assert whole["optimizer"] >= 2 * whole["params"]  # AdamW: two moments a weight
    for what in ("params", "optimizer"):
        assert sum(r[what] for r in two) >= whole[what]  # nothing lost
        for r in two:
            assert abs(r[what] / whole[what] - 0.5) < 0.02, (what, r)


GATHER_PROBE = """
import json, os, sys
import fsdp, train
cfg = train.TrainConfig(**json.loads(sys.argv[1]))
train.setup_distributed(cfg)
run = train.set_up(cfg)
plain = fsdp.full_model(run.model)  # every rank takes part
fingerprint = fsdp.adapter_fingerprint(run.model)  # kept from full_model's call: no second gather
if cfg.rank == 0:
    held = {name: str(t.device) for name, t in plain.state_dict().items()}
    with open(sys.argv[2], "w") as f:
        json.dump({"held": held, "fingerprint": fingerprint}, f)
"""


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_a_lora_save_gathers_only_the_adapters(text_data, base_ckpt, tmp_path, quantize):
    """fsdp.full_model of a LoRA run: rank 0 gets the adapters and nothing of the frozen base (which
    for a 70B model would be 141 GB in one process), and the base's fingerprint equals the one an
    unsharded model of the same base gives, so load_adapter accepts the adapter on that base."""
    flags = dict(data=str(text_data), out_dir=str(tmp_path / "o"), seq_len=32, batch_size=2, mlflow=False, fsdp=True,
                 ckpt_dir=str(base_ckpt), lora_rank=4, quantize=quantize)
    probe = tmp_path / "probe.py"
    probe.write_text(GATHER_PROBE)
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                          str(probe), json.dumps(flags), str(tmp_path / "rank0.json")], cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads((tmp_path / "rank0.json").read_text())
    adapters = {n: d for n, d in got["held"].items() if n.endswith(("lora_A", "lora_B"))}
    assert adapters and set(adapters.values()) == {"cpu"}
    assert {d for n, d in got["held"].items() if n not in adapters} == {"meta"}  # no base weight on rank 0
    base = checkpoint.load(base_ckpt, quantize=quantize)
    lora.apply_lora(base, rank=4, alpha=8)
    assert got["fingerprint"] == lora.base_fingerprint(base)


def test_what_fsdp_cannot_do_is_refused_in_one_line(text_data, tmp_path):
    common = [*TINY, "--data", text_data, "--max_steps", "2", "--eval_every", "2", "--out_dir", tmp_path]
    _one_line_error(train(*common, "--fsdp", "--eval_task", "choice", "--eval_data", tmp_path / "x.jsonl",
                          check=False), "--eval_task cannot run under --fsdp")
    train(*common)  # a checkpoint without --fsdp: its optimizer state is whole, in train_state.pt
    _one_line_error(train(*common, "--fsdp", "--resume", check=False), "saved by a run without --fsdp")


def test_fsdp_resume_refuses_an_adapter_whose_base_changed(text_data, base_ckpt, tmp_path):
    """As lora.load_adapter does: the base files under --ckpt_dir replaced between the save and the
    --resume (same shapes, other weights) stop the run in one line, before any step."""
    base = tmp_path / "base"
    shutil.copytree(base_ckpt, base)
    common = [*TINY, "--data", text_data, "--ckpt_dir", base, "--lora_rank", "4", "--eval_every", "2",
              "--batch_size", "2", "--out_dir", tmp_path / "o", "--fsdp"]
    train(*common, "--max_steps", "2")
    weights = torch.load(base / "consolidated.00.pth", weights_only=True)
    weights["layers.0.feed_forward.w2.weight"] += 0.01  # another fine-tune of the same shape
    torch.save(weights, base / "consolidated.00.pth")
    _one_line_error(train(*common, "--max_steps", "2", "--resume", check=False), "adapter was trained on another base")
