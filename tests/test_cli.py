"""The shared command line (cli.py): typed and range-checked flags, exit status by exception type,
--help from the docstrings; then every entry point, black-box: a bad command line stops with one line
and exit status 2 before any work (nothing written), and --help lists every flag with its meaning."""

import inspect
import os
import re
import subprocess
import sys

import pytest

import cli
from cli import UsageError, UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- cli.run in-process, on small commands ------------------------------------------------------------


def command(steps: int = 10, lr: float = 3e-4, name: str = "run", out_dir: str = None, seed: int = None,
            resume: bool = False, mlflow: bool = True, top_p: float = 0.9, device: str = None, dtype: str = None):
    """A stand-in entry point.

    Args:
        steps: optimizer steps.
        lr, top_p: two numbers
            documented together.
        name: a run name.
        out_dir: where to write.
        seed: makes it reproducible.
        resume: continue.
        mlflow: log to mlflow.
        device: where to run.
        dtype: bf16, fp16 or fp32.
    """
    command.calls.append(dict(locals()))


CHECKS = {"steps": cli.positive, "top_p": cli.interval("(0, 1]"), "out_dir": cli.non_empty,
          "device": cli.torch_device, "dtype": cli.one_of("bf16", "fp16", "fp32"), "seed": cli.at_least(0)}


def call(argv, fn=command, checks=CHECKS, capsys=None):
    """(exit status, stderr lines, the values the command got or None)."""
    command.calls = []
    try:
        cli.run(fn, prog="prog", argv=argv, checks=checks)
        status = 0
    except SystemExit as e:
        status = e.code
    err = capsys.readouterr().err.splitlines() if capsys else []
    return status, err, command.calls[0] if command.calls else None


def test_values_are_typed_from_the_annotations(capsys):
    status, _, got = call(["--steps", "5", "--lr=1e-3", "--name", "1e5", "--seed", "7", "--resume",
                           "--nomlflow", "--out-dir", "it's \"quoted\"\nand two lines"], capsys=capsys)
    assert status == 0
    assert got["steps"] == 5 and type(got["steps"]) is int
    assert got["lr"] == 1e-3 and type(got["lr"]) is float
    assert got["name"] == "1e5"  # text stays text (fire alone would make it 100000.0)
    assert got["seed"] == 7 and got["resume"] is True and got["mlflow"] is False
    assert got["out_dir"] == "it's \"quoted\"\nand two lines"
    assert call([], capsys=capsys)[2] == {**got, "steps": 10, "lr": 3e-4, "name": "run", "seed": None,
                                           "resume": False, "mlflow": True, "out_dir": None}
    for text, value in [("true", True), ("False", False), ("1", True), ("no", False)]:
        assert call(["--resume", text], capsys=capsys)[2]["resume"] is value


@pytest.mark.parametrize("argv, message", [
    (["--steps", "abc"], "--steps takes an integer, not 'abc'"),
    (["--steps", "1e2"], "--steps takes an integer"),
    (["--steps", "2.5"], "--steps takes an integer"),
    (["--lr", "abc"], "--lr takes a finite number, not 'abc'"),
    (["--lr", "nan"], "--lr takes a finite number"),
    (["--lr", "-inf"], "--lr takes a finite number"),
    (["--seed", "x"], "--seed takes an integer"),  # Optional[int] is typed as int
    (["--resume", "maybe"], "--resume takes true or false, not 'maybe'"),
    (["--steps", "0"], "--steps must be positive, got 0"),
    (["--top_p", "0"], "--top_p must be in (0, 1], got 0.0"),
    (["--top_p", "1.5"], "--top_p must be in (0, 1]"),
    (["--seed", "-1"], "--seed must be at least 0, got -1"),
    (["--out_dir", ""], "--out_dir must be non-empty, got ''"),
    (["--device", "tpu"], "--device must be cpu, cuda, cuda:N or mps, got 'tpu'"),
    (["--dtype", "fp8"], "--dtype must be one of bf16, fp16, fp32, got 'fp8'"),
    (["--step", "3"], "unknown flag --step (did you mean --steps?)"),
    (["--bogus", "3"], "unknown flag --bogus; see prog --help"),
    (["--steps", "3", "--steps", "4"], "--steps is given twice"),
    (["--steps"], "--steps needs a value"),
    (["steps", "3"], "unexpected argument 'steps'"),
    (["-s", "3"], "unexpected argument '-s'"),
])
def test_a_bad_command_line_is_one_line_and_status_2_before_any_work(capsys, argv, message):
    status, err, got = call(argv, capsys=capsys)
    assert status == 2 and got is None
    assert len(err) == 1 and err[0].startswith("prog: ") and message in err[0], err


def test_good_values_pass_the_checks(capsys):
    for argv in (["--device", "cuda:1"], ["--device", "mps"], ["--top_p", "1"], ["--dtype", "bf16"],
                 ["--seed", "0"], ["--steps", "1_000"]):
        assert call(argv, capsys=capsys)[0] == 0, argv


def raising(error):
    def main(flag: str = "x"):
        """Raises.

        Args:
            flag: unused.
        """
        raise error

    return main


class TrainingError(UserError, RuntimeError):
    """How another module's error class joins in: inherit cli.UserError."""


@pytest.mark.parametrize("error, status", [
    (UsageError("--data is required with --ckpt_dir"), 2),
    (UserError("a bad flag in a file: the word 'flag' does not make this a usage error"), 1),
    (TrainingError("loss is NaN"), 1),
    (ValueError("shards come from another tokenizer"), 1),
    (FileNotFoundError(2, "No such file or directory"), 1),
    (OSError(28, "No space left on device"), 1),
    (KeyboardInterrupt(), 130),
])
def test_the_exit_status_follows_the_exception_type(capsys, error, status):
    got, err, _ = call([], fn=raising(error), checks={}, capsys=capsys)
    assert got == status
    assert len(err) == 1 and err[0].startswith("prog: ") and "Traceback" not in err[0]


def test_other_exceptions_and_llama_debug_keep_the_traceback(monkeypatch, capsys):
    with pytest.raises(RuntimeError):  # a bug, not a user's mistake
        call([], fn=raising(RuntimeError("bug")), checks={})
    monkeypatch.setenv("LLAMA_DEBUG", "1")
    with pytest.raises(ValueError, match="shown in full"):
        call([], fn=raising(ValueError("shown in full")), checks={})


def test_help_lists_every_flag_with_its_meaning_and_exits_0(capsys):
    for flag in ("--help", "-h"):
        status, _, got = call(["--steps", "3", flag])
        out = capsys.readouterr().out
        assert status == 0 and got is None
        assert out.startswith("usage: prog") and "A stand-in entry point." in out
        for name in inspect.signature(command).parameters:
            assert re.search(rf"^  --{name}\b", out, re.M), name
        assert "optimizer steps. [default 10; must be positive]" in out
        assert re.search(r"--top_p FLOAT +two numbers documented together\. \[default 0\.9; must be in \(0, 1\]\]", out)
        assert "(undocumented)" not in out


class Tool:
    """A command with subcommands.

    Args:
        out: where every subcommand writes.
        verbose: say more.
    """

    def __init__(self, out: str, verbose: bool = False):
        self.out, self.verbose = out, verbose

    def merge(self, rank: int = 8):
        """Merge something.

        Args:
            rank: a rank.
        """
        command.calls.append({"sub": "merge", "out": self.out, "verbose": self.verbose, "rank": rank,
                              "command_line": cli.command_line(), "given": cli.given_flags()})

    def export(self, rank: str = "peft"):
        """Export something.

        Args:
            rank: the same name as merge's flag, another type and check.
        """
        command.calls.append({"sub": "export", "out": self.out, "rank": rank})


TOOL_CHECKS = {"out": cli.non_empty, "merge.rank": cli.positive, "export.rank": cli.one_of("peft", "hf")}


def test_subcommands_share_the_class_flags(capsys):
    status, _, got = call(["merge", "--rank", "4", "--out", "d i r", "--verbose"], fn=Tool, checks=TOOL_CHECKS,
                          capsys=capsys)
    assert status == 0
    assert got == {"sub": "merge", "out": "d i r", "verbose": True, "rank": 4,
                   "command_line": "prog merge --rank 4 --out 'd i r' --verbose", "given": {"rank", "out", "verbose"}}
    assert call(["export", "--out", "x", "--rank", "hf"], fn=Tool, checks=TOOL_CHECKS)[2]["rank"] == "hf"
    for argv, message in [([], "the subcommand comes first: merge or export"),
                          (["--out", "x", "merge"], "the subcommand comes first"),
                          (["mrege", "--out", "x"], "unknown subcommand 'mrege' (did you mean merge?)"),
                          (["merge"], "missing --out (see prog merge --help)"),
                          (["merge", "--out", "x", "--rank", "0"], "--rank must be positive"),
                          (["export", "--out", "x", "--rank", "onnx"], "--rank must be one of peft, hf"),
                          (["export", "--out", ""], "--out must be non-empty")]:
        status, err, got = call(argv, fn=Tool, checks=TOOL_CHECKS, capsys=capsys)
        assert status == 2 and got is None and len(err) == 1 and message in err[0], (argv, err)


def test_subcommand_help(capsys):
    call(["--help"], fn=Tool, checks=TOOL_CHECKS)
    out = capsys.readouterr().out
    assert "usage: prog merge|export" in out and "Merge something." in out and "Export something." in out
    call(["merge", "-h"], fn=Tool, checks=TOOL_CHECKS)
    out = capsys.readouterr().out
    assert out.startswith("usage: prog merge") and "Merge something." in out
    assert "--out STR" in out and "where every subcommand writes. [required; must be non-empty]" in out
    assert "--verbose" in out and "--rank INT" in out and "a rank." in out


def test_checks_name_real_flags():
    """A misspelled key in an entry point's CHECKS would silently check nothing."""
    import bench
    import generate
    import lora
    from data import prepare

    for fn, checks in [(generate.main, generate.CHECKS), (prepare.cli_prepare, prepare.CHECKS),
                       (lora.Command, lora.CHECKS), (bench.Bench, bench.CHECKS)]:
        subcommands = cli._subcommands(fn) or {None: None}
        names = set()
        for sub in subcommands:
            flags = cli.signature_flags(fn, sub, checks)
            names |= set(flags) | {f"{sub}.{name}" for name in flags}
            assert all(flag.doc for flag in flags.values()), (fn, sub, [n for n, f in flags.items() if not f.doc])
        assert set(checks) <= names, (fn, set(checks) - names)


# -- every entry point, black-box ------------------------------------------------------------------------


def run_entry(*argv):
    """Run an entry point from the repository root: (exit status, stdout, stderr)."""
    env = {k: v for k, v in os.environ.items() if k != "LLAMA_DEBUG"}
    p = subprocess.run([sys.executable, *map(str, argv)], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env=env)
    return p.returncode, p.stdout, p.stderr


ENTRY_POINTS = {  # how each is run, and a flag that names what it would write
    "train": (["train.py"], "--out_dir"),
    "generate": (["generate.py"], None),
    "lora": (["lora.py", "merge", "--ckpt_dir", "ckpt", "--adapter", "adapter"], "--out"),
    "prepare": (["-m", "data.prepare", "--input", "corpus.jsonl", "--tokenizer", "tokenizer.model"], "--out"),
    "bench": (["bench.py", "kernels"], "--json"),
}
BAD = [
    ("train", ["--lora_rnak", "8"], "unknown flag --lora_rnak (did you mean --lora_rank?)"),
    ("train", ["--max_steps", "abc"], "--max_steps takes an integer, not 'abc'"),
    ("train", ["--lr", "abc"], "--lr takes a finite number"),
    ("train", ["--seq_len", "1e2"], "--seq_len takes an integer"),
    ("train", ["--batch_size", "2.5"], "--batch_size takes an integer"),
    ("train", ["--norm_eps", "nan"], "--norm_eps takes a finite number"),
    ("train", ["--max_steps", "0"], "--max_steps must be positive, got 0"),
    ("train", ["--dim", "0"], "--dim must be positive, got 0"),
    ("train", ["--n_heads", "0"], "--n_heads must be positive"),
    ("train", ["--n_layers", "0"], "--n_layers must be positive"),
    ("train", ["--device", "tpu"], "--device must be cpu, cuda, cuda:N or mps"),
    ("train", ["--lora_targets", "wq,foo"], "--lora_targets must be comma-separated names"),
    ("train", ["--out_dir", ""], "--out_dir must be non-empty"),
    ("generate", ["--temprature", "0"], "unknown flag --temprature (did you mean --temperature?)"),
    ("generate", ["--temperature", "hot"], "--temperature takes a finite number, not 'hot'"),
    ("generate", ["--max_new_tokens", "abc"], "--max_new_tokens takes an integer"),
    ("generate", ["--top_p", "0"], "--top_p must be in (0, 1]"),
    ("generate", ["--max_seq_len", "-5"], "--max_seq_len must be positive"),
    ("generate", ["--device", "tpu"], "--device must be cpu, cuda, cuda:N or mps"),
    ("lora", ["--rank", "8"], "unknown flag --rank"),
    ("lora", ["--adapter", "again"], "--adapter is given twice"),
    ("lora", ["--out", ""], "--out must be non-empty"),
    ("prepare", ["--bogus", "1"], "unknown flag --bogus"),
    ("prepare", ["--workers", "two"], "--workers takes an integer, not 'two'"),
    ("prepare", ["--val_fraction", "1.5"], "--val_fraction must be in (0, 1)"),
    ("prepare", ["--vocab_size", "100"], "--vocab_size must be at least 260"),
    ("prepare", ["--format", "csv"], "--format must be one of auto, text, jsonl, instruct, chat"),
    ("bench", ["--bogus", "1"], "unknown flag --bogus; see bench.py kernels --help"),
    ("bench", ["--dim", "4096.0"], "--dim takes an integer"),
    ("bench", ["--tokens", "8192,x"], "--tokens must be comma-separated positive integers"),
    ("bench", ["--warmup", "-1"], "--warmup must be at least 0"),
]


@pytest.mark.parametrize("entry, argv, message", BAD, ids=[f"{e}{' '.join(a)}" for e, a, _ in BAD])
def test_entry_point_refuses_a_bad_command_line(tmp_path, entry, argv, message):
    head, out_flag = ENTRY_POINTS[entry]
    out = tmp_path / "out"
    status, stdout, stderr = run_entry(*head, *argv, *([out_flag, out] if out_flag and out_flag not in argv else []))
    prog = "python -m data.prepare" if entry == "prepare" else head[0]
    assert status == 2 and stdout == ""
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: ") and message in lines[0], stderr
    assert not out.exists() and os.listdir(tmp_path) == []  # nothing written


def test_lora_and_bench_need_a_known_subcommand():
    for argv, message in [(["lora.py"], "lora.py: the subcommand comes first: merge or export"),
                          (["lora.py", "mrege"], "lora.py: unknown subcommand 'mrege' (did you mean merge?)"),
                          (["lora.py", "export", "--format", "onnx", "--ckpt_dir", "c", "--adapter", "a", "--out", "o"],
                           "lora.py: --format must be one of peft, hf"),
                          (["bench.py", "decode", "--model", "llama9"], "bench.py: --model must be one of")]:
        status, stdout, stderr = run_entry(*argv)
        assert status == 2 and stdout == "" and stderr.startswith(message) and len(stderr.splitlines()) == 1, stderr


HELP = {  # entry point -> the command (class or function) whose flags --help must list
    "train.py": ("train", "main", None),
    "generate.py": ("generate", "main", None),
    "lora.py export": ("lora", "Command", "export"),
    "-m data.prepare": ("data.prepare", "cli_prepare", None),
    "bench.py train": ("bench", "Bench", "train"),
}


@pytest.mark.parametrize("entry", list(HELP))
def test_help_lists_every_flag_with_a_meaning(entry):
    module, name, subcommand = HELP[entry]
    status, stdout, stderr = run_entry(*entry.split(), "--help")
    assert status == 0 and stderr == "" and stdout.startswith("usage: ")
    fn = getattr(__import__(module, fromlist=[name]), name)
    flags = cli.signature_flags(fn, subcommand, {})
    for flag in flags:
        assert re.search(rf"^  --{flag}\b", stdout, re.M), (flag, stdout)
    if module != "train":  # every flag has a meaning from the Args: section (train.py's are its author's)
        assert "(undocumented)" not in stdout


def test_subcommand_lists_are_in_the_top_level_help():
    for script, subcommands in [("lora.py", ["merge", "export"]),
                                ("bench.py", ["prepare", "kernels", "train", "decode"])]:
        status, stdout, _ = run_entry(script, "-h")
        assert status == 0 and all(re.search(rf"^  {s} +\S", stdout, re.M) for s in subcommands), stdout
