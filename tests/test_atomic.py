"""atomic.py: a kill at any file-system step of a directory write leaves the old or the new copy
readable (by a reader that calls readable, with and without an atomic exchange), nothing that is
not ours is ever adopted, renamed or deleted, and no link is written through."""

import os
import shutil
import signal

import pytest

import atomic

STEPS = {os: ("mkdir", "rename", "replace", "remove", "rmdir", "open"), shutil: ("rmtree",),
         atomic: ("_exchange",)}


def _fill(version):
    def write(d):
        for i in range(3):
            with open(os.path.join(d, f"part{i}.txt"), "w") as f:
                f.write(f"{version}:{i}")
        os.mkdir(os.path.join(d, "sub"))
        with open(os.path.join(d, "sub", "x"), "w") as f:
            f.write(version)
    return write


def _version(path):
    """The version a directory holds, or raise if it is not one whole copy."""
    names = sorted(n for n in os.listdir(path) if not n.startswith(".atomic-"))  # a marker: see below
    assert names == ["part0.txt", "part1.txt", "part2.txt", "sub"], names
    versions = {open(os.path.join(path, f"part{i}.txt")).read().split(":")[0] for i in range(3)}
    versions.add(open(os.path.join(path, "sub", "x")).read())
    assert len(versions) == 1, versions
    return versions.pop()


def _user_files(parent):
    """Siblings a user may keep beside an output, named as earlier versions of atomic.py named theirs."""
    for name in ("out.old", "out.new", "out.tmp", "out.trash", "out.x.trash", ".out.0123456789abcdef.old"):
        os.makedirs(os.path.join(parent, name))
        with open(os.path.join(parent, name, "keep.txt"), "w") as f:
            f.write("the user's")
    return sorted(os.listdir(parent))


def _killed_at(n, path, write, exchange):
    """Fork; the child runs write_dir(path, write) and dies (SIGKILL) before its n-th file-system
    step. Returns True if the child finished before reaching step n."""
    pid = os.fork()
    if pid:
        _, status = os.waitpid(pid, 0)
        return not os.WIFSIGNALED(status)
    count = [0]

    def counted(fn):
        def step(*args, **kwargs):
            count[0] += 1
            if count[0] == n:
                os.kill(os.getpid(), signal.SIGKILL)
            return fn(*args, **kwargs)
        return step

    import builtins
    try:
        if not exchange:
            atomic._renameat2 = None
        for module, names in STEPS.items():
            for name in names:
                setattr(module, name, counted(getattr(module, name)))
        builtins.open = counted(builtins.open)
        atomic.write_dir(path, write)
    finally:
        os._exit(0)


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "rename"])
@pytest.mark.parametrize("first", [True, False], ids=["new", "replace"])
def test_a_kill_at_any_step_leaves_the_old_or_the_new_copy(tmp_path, exchange, first):
    n, seen = 0, set()
    while True:
        n += 1
        parent = tmp_path / str(n)
        parent.mkdir()
        before = _user_files(parent)
        out = str(parent / "out")
        if not first:
            atomic.write_dir(out, _fill("old"))
        finished = _killed_at(n, out, _fill("new"), exchange)
        path = atomic.readable(out)  # what every reader calls
        got = _version(path) if os.path.exists(path) else None
        assert got in ({"new", None} if first else {"new", "old"}), (n, got)
        seen.add(got)
        atomic.recover(out)  # and the next write: nothing of ours is left beside it
        assert sorted(os.listdir(parent)) == sorted(before + ["out"] * (got is not None)), n
        assert not [f for f in os.listdir(out) if f.startswith(".atomic")] if got else True  # the marker gone
        for name in before:
            assert open(os.path.join(parent, name, "keep.txt")).read() == "the user's"
        if finished:
            break
    assert seen == ({"new", None} if first else {"new", "old"}) and n > 10


def test_siblings_named_like_ours_are_never_touched(tmp_path):
    before = _user_files(tmp_path)
    (tmp_path / ".out.0123456789abcdef.new").mkdir()  # our name, but no marker: not ours
    (tmp_path / ".out.0123456789abcdef.new" / "keep.txt").write_text("the user's")
    atomic.write_dir(tmp_path / "out", _fill("a"))
    atomic.write_dir(tmp_path / "out", _fill("b"))
    assert _version(tmp_path / "out") == "b"
    assert sorted(os.listdir(tmp_path)) == sorted(before + [".out.0123456789abcdef.new", "out"])
    assert (tmp_path / ".out.0123456789abcdef.new" / "keep.txt").read_text() == "the user's"


def test_a_write_that_fails_leaves_the_old_copy_and_nothing_else(tmp_path):
    atomic.write_dir(tmp_path / "out", _fill("old"))

    def failing(d):
        _fill("new")(d)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        atomic.write_dir(tmp_path / "out", failing)
    assert _version(tmp_path / "out") == "old" and os.listdir(tmp_path) == ["out"]


def test_links_are_never_written_through(tmp_path):
    target = tmp_path / "users.txt"
    target.write_text("precious")
    (tmp_path / "target_dir").mkdir()
    (tmp_path / "out").symlink_to(tmp_path / "target_dir")
    (tmp_path / "f.json").symlink_to(target)
    with pytest.raises(atomic.OutputError, match="symbolic link"):
        atomic.write_dir(tmp_path / "out", _fill("x"))
    with pytest.raises(atomic.OutputError, match="symbolic link"):
        atomic.write_file(tmp_path / "f.json", lambda p: open(p, "w").write("x"))
    with pytest.raises(atomic.OutputError, match="symbolic link"):
        atomic.open_own(str(tmp_path / "f.json"), os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    assert target.read_text() == "precious" and os.listdir(tmp_path / "target_dir") == []


def test_outputs_that_resolve_to_inputs_are_refused(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("{}\n")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "params.json").write_text("{}")
    (tmp_path / "alias.jsonl").symlink_to(data)
    (tmp_path / "ckpt_link").symlink_to(ckpt)
    inputs = {"--data": str(data), "--ckpt_dir": str(ckpt)}
    refused = [({"--out": str(data)}, "would overwrite --data"),
               ({"--out": str(tmp_path / "alias.jsonl")}, "symbolic link"),
               ({"--out": str(tmp_path / "ckpt_link" / "params.json")}, "a file of --ckpt_dir"),
               ({"--out": str(tmp_path)}, "would overwrite"),  # a directory replaced whole holds them
               ({"--out": str(tmp_path / "r.json"), "--run_out": str(tmp_path / "x" / ".." / "r.json")}, "same place")]
    for outputs, says in refused:
        with pytest.raises(atomic.OutputError, match=says):
            atomic.check_outputs(outputs, inputs, input_files=("params.json", "*.pth"))
    atomic.check_outputs({"--out": str(ckpt / "results.json")}, inputs, input_files=("params.json",))
