"""Fault injection into train.py's checkpoint saves, run as a script by tests/test_train_faults.py.

    python tests/faults.py kill_each_step OUT_BASE TRAIN_FLAGS...
        For N = 1, 2, ...: train.py with TRAIN_FLAGS --out_dir OUT_BASE/N, SIGKILLed just before the
        Nth file-system step of its checkpoint saves; then the same command with --resume. Prints one
        JSON line per N, and stops after the first N that the run finishes without reaching.
    python tests/faults.py disk_full SAVE TRAIN_FLAGS...
        train.py with TRAIN_FLAGS, the disk full (ENOSPC) at the first file its SAVE-th save writes.
    python tests/faults.py log_full STEP TRAIN_FLAGS...
        train.py with TRAIN_FLAGS, log.jsonl's appends after the STEP-th written to /dev/full (ENOSPC).

A file-system step is a call, made inside atomic.write_dir, that creates, renames or removes a
file or directory (fsync is not one: a killed process loses nothing the kernel already has).

Each train.py run of kill_each_step is a fork of this process, which imported train.py once and
never computes (forking once torch has started its thread pool is unsafe): a kill point costs the
run, not the two seconds of imports.
"""

import errno
import json
import os
import shutil
import signal
import sys
import traceback

import torch
import torch._dynamo  # noqa: F401  (AdamW imports it on first use: once here, not in every fork)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import atomic  # noqa: E402
import cli  # noqa: E402
import lora  # noqa: E402, F401  (imported by LoRA runs)
import train  # noqa: E402

STEPS = {os: ("rename", "replace", "remove", "unlink", "rmdir", "mkdir", "makedirs"),
         shutil: ("rmtree", "copy", "copyfile", "copy2"), torch: ("save",), atomic: ("_exchange",)}
WRITES = ("save", "copy", "copyfile", "copy2")


class SaveSteps:
    """Calls on_step(self, name, paths) before each file-system step inside atomic.write_dir;
    self.n counts the steps, self.save the saves (both from 1). A step that calls others (makedirs
    calls mkdir, rmtree unlink) is one step."""

    def __init__(self, on_step):
        self.on_step, self.n, self.save, self.inside = on_step, 0, 0, False

    def install(self):
        for module, names in STEPS.items():
            for name in names:
                setattr(module, name, self._counted(name, getattr(module, name)))
        write_dir = atomic.write_dir

        def counted_write_dir(*args, **kwargs):
            if self.inside:  # a write_dir within a save is part of that save
                return write_dir(*args, **kwargs)
            self.save += 1
            self.inside = True
            try:
                return write_dir(*args, **kwargs)
            finally:
                self.inside = False

        atomic.write_dir = counted_write_dir

    def _counted(self, name, fn):
        def step(*args, **kwargs):
            if not self.inside:
                return fn(*args, **kwargs)
            self.n += 1
            self.on_step(self, name, [a for a in args if isinstance(a, (str, os.PathLike))])
            self.inside = False  # the calls this step makes are part of it
            try:
                return fn(*args, **kwargs)
            finally:
                self.inside = True
        return step


def run_train(argv, log_path, steps=None):
    """Fork; the child runs train.py with argv (stdout and stderr to log_path), its saves watched by
    steps. Returns the child's wait status."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return os.waitpid(pid, 0)[1]
    code = 1
    try:
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        if steps:
            steps.install()
        cli.run(train.main, prog="train.py", argv=argv)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def kill_each_step(out_base, flags):
    os.makedirs(out_base, exist_ok=True)
    n = 0
    while True:
        n += 1
        out = os.path.join(out_base, str(n))

        def kill_at_n(steps, name, paths, out=out, n=n):
            if steps.n == n:
                shown = " -> ".join(os.path.relpath(str(p), out) for p in paths)
                with open(out + ".step", "w") as f:
                    json.dump({"save": steps.save, "step": f"{name} {shown}"}, f)
                os.kill(os.getpid(), signal.SIGKILL)

        status = run_train([*flags, "--out_dir", out], out + ".crash.log", SaveSteps(kill_at_n))
        if not os.WIFSIGNALED(status):  # the run ended before step n: every step has been tried
            print(json.dumps({"n": n, "finished": True, "rc": os.waitstatus_to_exitcode(status), "out": out}))
            return
        with open(out + ".step") as f:
            killed = json.load(f)
        status = run_train([*flags, "--out_dir", out, "--resume"], out + ".resume.log")
        with open(out + ".resume.log") as f:
            resume_log = f.read()
        print(json.dumps({"n": n, "finished": False, **killed, "out": out,
                          "resume_rc": os.waitstatus_to_exitcode(status), "resume_log": resume_log[-3000:]}),
              flush=True)


def disk_full(save, flags):
    def fail_first_write(steps, name, paths):
        if steps.save == save and name in WRITES:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(paths[-1]))

    SaveSteps(fail_first_write).install()
    cli.run(train.main, prog="train.py", argv=flags)


def log_full(step, flags):
    open_own, appended = atomic.open_own, []

    def full_after(path, *args, **kwargs):
        if str(path).endswith("log.jsonl"):
            appended.append(path)
            if len(appended) > step:
                return os.open("/dev/full", os.O_WRONLY)
        return open_own(path, *args, **kwargs)

    atomic.open_own = full_after
    cli.run(train.main, prog="train.py", argv=flags)


if __name__ == "__main__":
    command, argument, flags = sys.argv[1], sys.argv[2], sys.argv[3:]
    if command == "kill_each_step":
        kill_each_step(argument, flags)
    elif command == "log_full":
        log_full(int(argument), flags)
    else:
        disk_full(int(argument), flags)
