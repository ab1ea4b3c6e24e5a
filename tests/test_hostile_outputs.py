"""Every command that writes an output, tried as a careless or hostile user would: files a user
keeps beside the output under the names older versions used for temporaries, outputs that are
(or resolve to, or hold) the command's own inputs, symbolic links planted where a command writes,
and a directory swap killed at its one unsafe instant. Each must end in one line and a non-zero
exit, or succeed, and never change a file of the user's."""

import json
import os
import shutil
import subprocess
import sys

import pytest

import atomic
from test_train import ROOT, TINY, base_ckpt, text_data, train  # noqa: F401  (fixtures)


def run(*args):
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TRITON_INTERPRET": "1"})


def one_line(out, says, exit_code=None):
    """A refusal: non-zero exit (exit_code if given), no traceback, one line that says `says`."""
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert exit_code is None or out.returncode == exit_code, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0], out.stderr[-2000:]


def snapshot(directory):
    """Every file under directory (links not followed) with its bytes."""
    found = {}
    for root, dirs, files in os.walk(directory):
        for name in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            path = os.path.join(root, name)
            found[os.path.relpath(path, directory)] = (os.readlink(path) if os.path.islink(path)
                                                        else open(path, "rb").read())
    return found


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, text_data, base_ckpt):
    out = tmp_path_factory.mktemp("lora")
    train(*TINY, "--data", text_data, "--ckpt_dir", base_ckpt, "--lora_rank", "4", "--max_steps", "1",
          "--out_dir", out)
    return out / "adapter"


@pytest.fixture()
def records(tmp_path):
    path = tmp_path / "mc.jsonl"
    path.write_text(json.dumps({"question": "note", "choices": ["chest", "pain"], "answer": 0}) + "\n")
    return path


def _keepsakes(parent, name):
    """What a user might keep beside an output called name: the names older versions of this
    project gave their temporaries, each holding a file."""
    for sibling in (f"{name}.old", f"{name}.new", f"{name}.tmp", f"{name}.trash", f"{name}.x.trash"):
        os.makedirs(parent / sibling, exist_ok=True)
        (parent / sibling / "mine.txt").write_text("the user's own")


def test_data_prepare_never_touches_siblings_or_its_own_input(tmp_path, text_data):
    _keepsakes(tmp_path, "notes")
    (tmp_path / "notes.old" / "notes.jsonl").write_text(json.dumps({"text": "a note"}) + "\n")
    before = snapshot(tmp_path)
    tok = text_data / "tokenizer.model"
    for extra in ([], ["--overwrite"]):  # the second time replaces the first's shards
        out = run("-m", "data.prepare", "--input", tmp_path / "notes.old" / "notes.jsonl", "--out", tmp_path / "notes",
                  "--tokenizer", tok, *extra)
        assert out.returncode == 0, out.stderr
    after = snapshot(tmp_path)
    assert {k: v for k, v in after.items() if not k.startswith("notes/")} == before


def test_train_never_touches_siblings_of_its_checkpoint(tmp_path, text_data):
    out_dir = tmp_path / "o"
    out_dir.mkdir()
    _keepsakes(out_dir, "model")
    before = snapshot(out_dir)
    train(*TINY, "--data", text_data, "--out_dir", out_dir, "--max_steps", "2", "--save_every", "1")
    after = snapshot(out_dir)
    assert {k: v for k, v in after.items() if k.split(os.sep)[0] in {p.split(os.sep)[0] for p in before}} == before


@pytest.mark.parametrize("case", ["out is data", "out links to data", "run_out is data", "out is run_out",
                                  "out is a checkpoint file"])
def test_eval_outputs_never_replace_inputs(tmp_path, base_ckpt, records, case):
    (tmp_path / "alias.jsonl").symlink_to(records)
    out, run_out = {"out is data": (records, None), "out links to data": (tmp_path / "alias.jsonl", None),
                    "run_out is data": (tmp_path / "r.json", tmp_path / "." / "mc.jsonl"),
                    "out is run_out": (tmp_path / "r.json", tmp_path / "sub" / ".." / "r.json"),
                    "out is a checkpoint file": (base_ckpt / "params.json", None)}[case]
    before = snapshot(tmp_path), snapshot(base_ckpt)
    task = ["--task", "rank", "--run_out", run_out] if run_out else ["--task", "choice"]
    got = run("eval.py", "--ckpt_dir", base_ckpt, *task, "--data", records, "--out", out, "--mlflow", "false")
    one_line(got, "--out" if "run_out" not in case else "--run_out")
    assert (snapshot(tmp_path), snapshot(base_ckpt)) == before


@pytest.mark.parametrize("command", ["merge", "export"])
def test_lora_outputs_never_replace_inputs(tmp_path, base_ckpt, adapter, command):
    (tmp_path / "base_link").symlink_to(base_ckpt)
    before = snapshot(base_ckpt), snapshot(adapter)
    for out in (base_ckpt, tmp_path / "base_link", adapter, adapter.parent, base_ckpt / "tokenizer.model"):
        got = run("lora.py", command, "--ckpt_dir", base_ckpt, "--adapter", adapter, "--out", out, "--overwrite")
        one_line(got, "--out")
    assert (snapshot(base_ckpt), snapshot(adapter)) == before


def test_train_out_dir_never_replaces_its_inputs(tmp_path, text_data, base_ckpt):
    """A full fine-tune writes OUT_DIR/model: an --out_dir whose model/ is the base (or holds the
    data) is refused before any work."""
    ckpt = tmp_path / "run" / "model"
    shutil.copytree(base_ckpt, ckpt)
    before = snapshot(tmp_path)
    got = train(*TINY, "--data", text_data, "--ckpt_dir", ckpt, "--out_dir", tmp_path / "run", "--max_steps", "1",
                "--overwrite", check=False)
    one_line(got, "would overwrite --ckpt_dir")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("name", [".lock", "log.jsonl", "model"])
def test_links_planted_in_an_out_dir_are_never_written_through(tmp_path, text_data, name):
    users = tmp_path / "users"
    users.mkdir()
    (users / "thesis.txt").write_text("years of work")
    out_dir = tmp_path / "o"
    out_dir.mkdir()
    (out_dir / name).symlink_to(users if name == "model" else users / "thesis.txt")
    got = train(*TINY, "--data", text_data, "--out_dir", out_dir, "--max_steps", "1", "--overwrite", check=False)
    one_line(got, "symbolic link")
    assert snapshot(users) == {"thesis.txt": b"years of work"}


def _interrupted_swap(path):
    """path as a kill leaves it on a file system without an atomic exchange, between its two
    renames: the old copy renamed aside, the complete new one not yet in place."""
    token = "0123456789abcdef"
    shutil.copytree(path, path.parent / f".{path.name}.{token}.new")
    (path.parent / f".{path.name}.{token}.new" / f".atomic-{token}").write_text("host 1\n")
    os.rename(path, path.parent / f".{path.name}.{token}.old")


def test_readers_recover_a_swap_killed_between_its_renames(tmp_path, text_data, base_ckpt, records):
    data, ckpt = tmp_path / "shards", tmp_path / "ckpt"
    shutil.copytree(text_data, data)
    shutil.copytree(base_ckpt, ckpt)
    _interrupted_swap(data)
    _interrupted_swap(ckpt)
    got = run("eval.py", "--ckpt_dir", ckpt, "--task", "choice", "--data", records, "--out", tmp_path / "r.json",
              "--mlflow", "false")
    assert got.returncode == 0, got.stderr
    train(*TINY, "--data", data, "--out_dir", tmp_path / "o", "--max_steps", "1")
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "mc.jsonl", "o", "r.json", "shards"]
    assert snapshot(data) == snapshot(text_data) and snapshot(ckpt) == snapshot(base_ckpt)
    assert atomic.readable(ckpt) == str(ckpt)


def test_a_run_keeps_the_tokenizer_it_started_with(tmp_path, text_data):
    """The shards' tokenizer.model replaced while a run reads them: the run's later checkpoints
    still carry the tokenizer it loaded, not the new file."""
    import signal
    import time

    import torch

    data, out_dir = tmp_path / "shards", tmp_path / "o"
    shutil.copytree(text_data, data)
    started_with = (data / "tokenizer.model").read_bytes()
    run_ = subprocess.Popen([sys.executable, "train.py", *TINY, "--data", data, "--out_dir", out_dir, "--save_every",
                             "1", "--max_steps", "100000"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    state = out_dir / "model" / "train_state.pt"

    def saved_step():
        try:
            return torch.load(state, weights_only=True)["step"]
        except (OSError, RuntimeError, EOFError):
            return 0

    try:
        deadline = time.time() + 120
        while time.time() < deadline and run_.poll() is None and not saved_step():
            time.sleep(0.05)
        run_.send_signal(signal.SIGSTOP)
        (data / "tokenizer.model").write_bytes(b"another corpus's tokenizer")
        step = saved_step()
        run_.send_signal(signal.SIGCONT)
        while time.time() < deadline and run_.poll() is None and saved_step() <= step + 1:
            time.sleep(0.05)
        assert saved_step() > step + 1, run_.stderr.read() if run_.poll() is not None else "too slow"
    finally:
        run_.kill()
        run_.wait()
    assert (out_dir / "model" / "tokenizer.model").read_bytes() == started_with
