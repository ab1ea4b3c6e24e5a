"""train.py when things go wrong: a kill at every file-system step of a checkpoint save, a full disk,
a second run on the same --out_dir, a NaN before any checkpoint. Black-box: run the command, check
its exit status, its one line, and the files on disk (tests/faults.py injects the faults)."""

import fcntl
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from test_train import ROOT, TINY, _one_line_error, base_ckpt, interrupt_after, log, text_data, train  # noqa: F401  (fixtures)

FAST = [*TINY, "--max_steps", "2", "--save_every", "1", "--batch_size", "2"]


def faults(*args):
    return subprocess.run([sys.executable, "tests/faults.py", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)


def _without_timing(records):
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in records]


def _one_line(out, message):
    """Exit 1 with one line (returned) that says message, and no traceback."""
    _one_line_error(out, message)
    assert out.returncode == 1, out.stderr[-2000:]
    return next(line for line in out.stderr.splitlines() if line.startswith("train.py:"))


@pytest.mark.parametrize("lora", [False, True], ids=["scratch", "lora"])
def test_a_kill_at_any_step_of_a_save_leaves_a_checkpoint_that_resumes(text_data, base_ckpt, tmp_path, lora):
    """Two steps, a checkpoint after each: the first save has no checkpoint to replace, the second
    replaces the first. The run is SIGKILLed at each file-system step of both saves in turn; then
    --resume continues from the newest checkpoint whose save reached `rename .DIR.TOKEN.tmp ->
    .DIR.TOKEN.new` (write_dir's point of no return), and ends exactly as a run that was never killed."""
    flags = [*FAST, "--data", text_data]
    if lora:
        flags += ["--ckpt_dir", base_ckpt, "--lora_rank", "4"]
    kind = "adapter" if lora else "model"
    out = faults("kill_each_step", tmp_path, *flags)
    assert out.returncode == 0, out.stderr[-3000:]
    *killed, finished = [json.loads(line) for line in out.stdout.splitlines()]
    assert finished["finished"] and finished["rc"] == 0
    straight = log(finished["out"])
    assert [r["step"] for r in straight] == [1, 2]
    assert {r["save"] for r in killed} == {1, 2} and len(killed) >= 16
    committed = {1: False, 2: False}  # has the save passed its point of no return?
    for r in killed:
        where = f"killed before step {r['n']} ({r['step']}) of save {r['save']}"
        expected = r["save"] if committed[r["save"]] else r["save"] - 1
        if expected == 0:
            assert r["resume_rc"] == 1 and "--resume: no checkpoint" in r["resume_log"], where
            assert not os.path.exists(os.path.join(r["out"], kind)), where
        else:
            assert r["resume_rc"] == 0, (where, r["resume_log"])
            assert f"resuming from {os.path.join(r['out'], kind)} at step {expected}\n" in r["resume_log"], where
            # log.jsonl trimmed to the checkpoint, then the same steps as the run never killed
            assert _without_timing(log(r["out"])) == _without_timing(straight), where
            assert sorted(os.listdir(r["out"])) == sorted([".lock", kind, "log.jsonl"]), where
            state = torch.load(os.path.join(r["out"], kind, "train_state.pt"), weights_only=True)
            assert state["step"] == 2, where
        committed[r["save"]] |= re.fullmatch(rf"rename \.{kind}\.(\w+)\.tmp -> \.{kind}\.\1\.new", r["step"]) is not None


@pytest.mark.parametrize("save", [1, 2])
def test_a_full_disk_during_a_save_says_so_and_keeps_the_last_checkpoint(text_data, tmp_path, save):
    out_dir = tmp_path / "o"
    flags = [*FAST, "--data", text_data, "--out_dir", out_dir]
    line = _one_line(faults("disk_full", save, *flags), "disk full while writing")
    ckpt = out_dir / "model"
    if save == 1:
        assert "nothing was written" in line and not ckpt.exists()
    else:  # the first save's checkpoint is intact, and named as the one to go on from
        assert f"{ckpt} is unchanged (still the latest good copy)" in line
        assert torch.load(ckpt / "train_state.pt", weights_only=True)["step"] == 1
        resumed = train(*flags, "--resume")
        assert "at step 1" in resumed.stderr
        assert [r["step"] for r in log(out_dir)] == [1, 2]
    assert sorted(p.name for p in out_dir.iterdir() if p.name.startswith("model")) == (["model"] if save == 2 else [])


def _snapshot(directory):
    return {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns) for p in directory.rglob("*")}


def test_a_second_run_on_the_same_out_dir_stops_at_once(text_data, tmp_path):
    out_dir = tmp_path / "o"
    flags = [*TINY, "--data", text_data, "--out_dir", out_dir, "--batch_size", "2", "--save_every", "5"]
    first = subprocess.Popen([sys.executable, "train.py", *map(str, flags), "--max_steps", "100000"], cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and first.poll() is None and not (out_dir / "model").exists():
            time.sleep(0.05)
        first.send_signal(signal.SIGSTOP)  # holds the lock, writes nothing while we look
        assert first.poll() is None, first.stderr.read()
        before = _snapshot(out_dir)
        second = train(*flags, "--max_steps", "2", "--overwrite", check=False)
        _one_line(second, f"{out_dir} is in use by another run (PID {first.pid})")
        assert _snapshot(out_dir) == before
    finally:
        first.kill()  # kill -9: the kernel releases the lock
        first.wait()
    third = train(*flags, "--max_steps", "2", "--overwrite")
    assert [r["step"] for r in log(out_dir)] == [1, 2], third.stderr


def test_the_lock_is_held_by_whoever_holds_it(text_data, tmp_path):
    """Another process's lock (here this test's) is refused the same way, naming the PID it wrote."""
    out_dir = tmp_path / "o"
    out_dir.mkdir()
    with open(out_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        out = train(*TINY, "--data", text_data, "--out_dir", out_dir, "--max_steps", "1", check=False)
    _one_line(out, f"is in use by another run (PID {os.getpid()})")
    assert sorted(p.name for p in out_dir.iterdir()) == [".lock"]


def test_nan_before_any_checkpoint_says_none_was_saved(text_data, tmp_path):
    out = train(*TINY, "--data", text_data, "--out_dir", tmp_path, "--max_steps", "20", "--save_every", "100",
                "--lr", "1e30", "--warmup_steps", "0", check=False)
    line = _one_line(out, "stopped without saving")
    assert "no checkpoint was saved" in line and "last good checkpoint" not in line
    assert not (tmp_path / "model").exists()


def test_kill_9_then_resume_trims_the_log_to_the_checkpoint(text_data, tmp_path):
    """The steps logged after the last checkpoint are run again, not repeated in log.jsonl."""
    flags = [*TINY, "--data", text_data, "--out_dir", tmp_path, "--batch_size", "2", "--save_every", "7",
             "--max_steps", "60"]
    status, _ = interrupt_after(flags, tmp_path, 10, signal.SIGKILL)
    assert status == -signal.SIGKILL
    logged = len(log(tmp_path))
    resumed = train(*flags, "--resume")
    saved = int(resumed.stderr.split(" at step ")[1].split()[0])
    assert 7 <= saved <= logged < 60
    assert [r["step"] for r in log(tmp_path)] == list(range(1, 61))


def test_a_real_3mb_disk_fills_during_the_second_save(text_data, small_disk):
    # about 1.7 MB a checkpoint (weights and AdamW's two moments): one fits, a second beside it does not
    out_dir = small_disk / "o"
    flags = ["--dim", "64", "--n_layers", "2", "--n_heads", "4", "--multiple_of", "16", "--seq_len", "32",
             "--mlflow", "false", "--eval_steps", "1", "--batch_size", "2", "--data", text_data,
             "--out_dir", out_dir, "--save_every", "1"]
    line = _one_line(train(*flags, "--max_steps", "2", check=False), "disk full while writing")
    assert f"{out_dir / 'model'} is unchanged (still the latest good copy)" in line
    assert sorted(os.listdir(out_dir)) == [".lock", "log.jsonl", "model"]  # no half-written copy left
    state = torch.load(out_dir / "model" / "train_state.pt", weights_only=True)
    assert state["step"] == 1
    out = train(*flags, "--max_steps", "1", "--resume")  # resumable: it loads and has nothing left to do
    assert "resuming from" in out.stderr and "at step 1" in out.stderr


def test_a_damaged_or_hostile_train_state_is_one_line(text_data, tmp_path):
    flags = [*FAST, "--data", text_data, "--out_dir", tmp_path / "o"]
    train(*flags)
    state = tmp_path / "o" / "model" / "train_state.pt"
    good = state.read_bytes()

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'ran'}",))

    for damage, message in [(lambda: state.write_bytes(good[: len(good) // 2]), "cannot read"),
                            (lambda: state.write_bytes(b""), "cannot read"),
                            (lambda: torch.save({"step": Payload()}, state), "could run code")]:
        damage()
        line = _one_line(train(*flags, "--resume", check=False), message)
        assert line.startswith(f"train.py: {state}: ") and "weights_only" not in line
    assert not (tmp_path / "ran").exists()


@pytest.mark.parametrize("what", ["missing", "a file", "not shards"])
def test_a_wrong_data_flag_is_named_as_such(tmp_path, what):
    data = {"missing": tmp_path / "nope", "a file": os.path.join(ROOT, "README.md"), "not shards": tmp_path}[what]
    out = train(*TINY, "--data", data, "--out_dir", tmp_path / "o", check=False)
    line = _one_line(out, str(data))
    assert ("made by data.prepare" if what == "not shards" else "no such directory") in line
    assert "tokenizer" not in line and not (tmp_path / "o").exists()


class _Payload:
    """Unpickled, it runs a command: what a crafted checkpoint file would carry."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_payload_planted_in_any_file_a_resume_reads_never_runs(text_data, tmp_path):
    """An --fsdp run (one rank) keeps its optimizer in DCP's files, whose .metadata is a pickle and
    whose items are torch.save streams. Each file of the checkpoint in turn is replaced by a pickle
    that would run a command (a torch.save of it where torch reads the file, a bare pickle
    elsewhere); --resume must refuse it in one line or read past it, and never run it."""
    flags = [*TINY, "--save_every", "1", "--batch_size", "2", "--data", text_data, "--fsdp"]
    train(*flags, "--max_steps", "2", "--out_dir", tmp_path / "good")
    files = sorted(p.relative_to(tmp_path / "good") for p in (tmp_path / "good" / "model").rglob("*") if p.is_file())
    assert {"model/optimizer/.metadata", "model/train_state.pt", "model/consolidated.00.pth"} <= set(map(str, files))
    refused = 0
    for n, name in enumerate(files):
        out_dir, marker = tmp_path / str(n), tmp_path / f"ran{n}"
        shutil.copytree(tmp_path / "good", out_dir)
        if name.suffix in (".pt", ".pth", ".distcp"):
            torch.save({"state": _Payload(marker)}, out_dir / name)
        else:
            (out_dir / name).write_bytes(pickle.dumps(_Payload(marker)))
        out = train(*flags, "--max_steps", "3", "--out_dir", out_dir, "--resume", "--resume_with_changes",
                    check=False)
        assert not marker.exists(), name
        assert "Traceback" not in out.stderr, (name, out.stderr[-2000:])
        if out.returncode:  # refused: the last line names the checkpoint (the first says what changed)
            assert out.returncode == 1 and out.stderr.splitlines()[-1].startswith(f"train.py: {out_dir / 'model'}"), \
                (name, out.stderr[-2000:])
        refused += out.returncode == 1
    assert refused >= 3


@pytest.mark.parametrize("rank,when", [(0, "start"), (1, "start"), (0, "mid"), (1, "mid"), (0, "save")])
def test_one_rank_failing_stops_every_rank_within_seconds(text_data, tmp_path, rank, when):
    """A rank that fails (at start-up, mid-run while the other waits in backward's all-reduce, or
    rank 0 saving while under --fsdp the other waits for the checkpoint's path) ends the run on
    every rank within 30 s, not at the process group's timeout, with its error printed once and no
    traceback from the others."""
    flags = [*TINY, "--data", text_data, "--out_dir", tmp_path / "o", "--max_steps", "50"]
    flags += ["--fsdp", "--save_every", "2"] if when == "save" else ["--save_every", "100"]
    start = time.time()
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                          "tests/rank_fault.py", str(rank), when, *map(str, flags)], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    took = time.time() - start
    assert out.returncode != 0 and took < 30, (took, out.stderr[-3000:])
    errors = [line for line in out.stderr.splitlines() if line.startswith("train.py:")]
    said = {"start": "at start-up", "mid": "mid-run", "save": "saving"}[when]
    assert errors == [f"train.py: injected failure on rank {rank} {said}"], out.stderr[-3000:]
    ours = out.stderr.split("torch/distributed/elastic")[0]  # what follows is torchrun's own report
    assert "Traceback" not in ours and "rank0]:" not in ours and "rank1]:" not in ours, out.stderr[-3000:]


def test_a_rank_waiting_in_a_collective_leaves_once_another_has_failed(tmp_path):
    """common.watch on its own, where the transport cannot tell (NCCL, another node): rank 1
    marks itself failed but stays alive (its sockets open), rank 0 waits in a barrier whose timeout
    is 30 minutes; the watcher ends rank 0 within seconds."""
    script = tmp_path / "waits.py"
    script.write_text(f"""import os, sys, time
sys.path.insert(0, {ROOT!r})
import torch.distributed as dist
import common
dist.init_process_group("gloo")
common.watch()
if dist.get_rank() == 1:
    common.failed()
    time.sleep(120)
else:
    dist.barrier()
""")
    start = time.time()
    waiting = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                                str(script)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        err = waiting.communicate(timeout=60)[1]
    finally:
        waiting.kill()
    assert waiting.returncode != 0 and time.time() - start < 30, err[-2000:]
    assert "local_rank: 0" in err and "exitcode  : 1" in err, err[-2000:]


def test_a_finished_rank_that_cannot_leave_says_where_it_hangs_and_exits(tmp_path):
    """A rank whose body has finished but whose leaving hangs (seen, rarely, in gloo's teardown) is
    ended by common.ranks' watchdog after LEAVE_S, with every thread's stack printed, instead of
    holding the job up for ever; with status 0, since all it had to do is done."""
    script = tmp_path / "stuck.py"
    script.write_text(f"""import sys, time
sys.path.insert(0, {ROOT!r})
import common
common.LEAVE_S = 3
rank, world, _ = common.setup_distributed("cpu")
def hang_in_teardown():
    time.sleep(300)
common.teardown = hang_in_teardown
with common.ranks(world):
    open(f"{{sys.argv[1]}}/body done {{rank}}", "w").close()  # a file each: the ranks share one stdout
""")
    start = time.time()
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                          str(script), str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and time.time() - start < 60, out.stderr[-2000:]
    assert (tmp_path / "body done 0").exists() and (tmp_path / "body done 1").exists()
    said = "finished and saved, but leaving the process group has hung for 3 s; ending this rank."
    assert out.stderr.count(said) == 2 and "in hang_in_teardown" in out.stderr, out.stderr[-2000:]
