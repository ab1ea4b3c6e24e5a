"""The command line every entry point shares: python-fire's convention, made strict.

    run(main, prog="generate.py", checks={"top_p": interval("(0, 1]"), "device": torch_device})

A command is a function whose keyword parameters are its flags (a `*args` parameter, if it has
one, takes the arguments that are not flags: `report.py A.json B.json`), or a class whose `__init__` takes
the flags its subcommands share and whose public methods are the subcommands (fire's convention:
`python lora.py merge --ckpt_dir ...`). Before any work starts, `run` checks the command line
against the signature and types every value from the annotations (int, float, bool, str, and
Optional of those; `x: int = None` is Optional[int]); each entry point declares its range checks in
one mapping from flag name to a check below (a key "sub.flag" applies to one subcommand only).
Only then is the command called, with the typed values of the flags given (the others keep the
signature's defaults): the command line is parsed once, here.

Why not python-fire itself, whose convention this keeps (`--flag value`, `--flag=value`, `--noflag`,
subcommand first): it runs `main` with defaults when it meets a flag it does not know, reads values
as Python literals (`--prompt 1e5` would arrive as 100000.0, `--lr abc` as the text "abc"), and
shows help through a pager.

The exit status follows the exception's type, never its message:
    0    done, or --help / -h (every flag with its meaning, from the docstring's Args: section)
    1    UserError or another ValueError (CheckpointError, TokenizerError, ...), or OSError (a
         missing file, a full disk): one line `prog: message`
    2    UsageError: a bad command line (unknown flag, mistyped or out-of-range value)
    130  Ctrl-C
LLAMA_DEBUG=1 shows the traceback instead.

A running command may ask for its own command line (`command_line()`, for the records it writes)
and which flags it was given (`given_flags()`: the others hold their defaults).

Reading order: the error classes, the checks an entry point declares, `run`, then how a command
line is parsed and how help is written.
"""

import difflib
import inspect
import math
import os
import re
import shlex
import sys
import textwrap
import types
import typing
from typing import NamedTuple


class UserError(ValueError):
    """A mistake the user can fix, found while working (shards of another tokenizer, a NaN loss):
    printed as one line, exit status 1. Other modules' error classes may inherit it (a ValueError,
    as the project's user errors are)."""


class UsageError(UserError):
    """A bad command line: printed as one line, exit status 2."""


# -----------------------------------------------------------------------------------------------
# Checks an entry point declares for its flags: `test(value)` on the typed value, and what a good
# value is, which completes "--flag must be ..." in the error and in --help.


class Check(NamedTuple):
    test: typing.Callable
    wants: str


positive = Check(lambda v: v > 0, "positive")
non_empty = Check(lambda v: v.strip() != "", "non-empty")
torch_device = Check(lambda v: re.fullmatch(r"cpu|mps|cuda(:\d+)?", v) is not None, "cpu, cuda, cuda:N or mps")


def at_least(low):
    return Check(lambda v: v >= low, f"at least {low}")


def one_of(*choices):
    return Check(lambda v: v in choices, "one of " + ", ".join(choices))


def interval(text):
    """A range in the notation of mathematics: "(0, 1]" is 0 < value <= 1; a bound may be inf."""
    low_bracket, low, high, high_bracket = re.fullmatch(r"([(\[])(.+),(.+)([)\]])", text).groups()
    low, high = float(low), float(high)

    def test(v):
        return (low < v if low_bracket == "(" else low <= v) and (v < high if high_bracket == ")" else v <= high)

    return Check(test, f"in {text}")


# -----------------------------------------------------------------------------------------------
# Running a command


def run(command, prog, argv=None, checks=None):
    """Run `command` with the flags in argv (default: sys.argv[1:]); a user's mistake ends the
    process with one line on stderr and the exit status the module docstring lists."""
    global _invocation
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    debug = os.environ.get("LLAMA_DEBUG") == "1"
    outer = _invocation
    try:
        parsed = parse(command, argv, prog, checks or {})
        if parsed is None:  # --help was printed
            return
        subcommand, values = parsed
        check_kernels()
        _invocation = (shlex.join(shlex.split(prog) + argv), frozenset(values))
        call(command, subcommand, values)
    except BrokenPipeError:  # stdout closed early (`--help | head`): nothing is wrong, nothing to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit flush cannot fail
        sys.exit(141)
    except UsageError as e:
        _stop(prog, e, 2, debug)
    except (ValueError, OSError) as e:  # UserError, CheckpointError, ShardError, a missing file, a full disk
        _stop(prog, e, 1, debug)
    except KeyboardInterrupt:
        _stop(prog, "interrupted", 130, debug)
    finally:
        _invocation = outer


def call(command, subcommand, values):
    """command(**values), or for a class command its subcommand method on an instance made from the
    shared flags (those of __init__)."""
    if subcommand is None:
        rest = _rest_name(command)
        return command(*values.pop(rest, ()), **values) if rest else command(**values)
    shared = inspect.signature(command.__init__).parameters
    instance = command(**{name: value for name, value in values.items() if name in shared})
    return getattr(instance, subcommand)(**{name: value for name, value in values.items() if name not in shared})


def check_kernels():
    """LLAMA_KERNELS, checked before any work: a value model.py does not know, or triton where
    Triton cannot run (a CPU without TRITON_INTERPRET=1), is one line now rather than a
    KernelError traceback once the model has loaded. model.use_triton holds the rules."""
    model = sys.modules.get("model")
    if model is None or not os.environ.get("LLAMA_KERNELS"):
        return
    import torch

    try:
        model.use_triton(torch.empty(0, device="cuda" if torch.cuda.is_available() else "cpu"))
    except model.KernelError as e:
        raise UsageError(str(e)) from None


def _stop(prog, error, status, debug):
    if debug:
        raise  # the exception being handled, with its traceback
    print(f"{prog}: {error}", file=sys.stderr)
    sys.exit(status)


_invocation = None  # (command line, flags given) of the command `run` is running


def command_line():
    """The running command as a shell would retype it (for the records a command writes)."""
    return _invocation[0]


def given_flags():
    """The names of the flags the running command was given (the others have their defaults); none
    outside a command (a test building a config itself)."""
    return _invocation[1] if _invocation else frozenset()


# -----------------------------------------------------------------------------------------------
# Parsing: flags from the signature, values typed from the annotations


class Flag(NamedTuple):
    type: type
    default: object
    required: bool
    doc: str
    check: Check = None


def parse(command, argv, prog, checks):
    """(subcommand or None, {flag: typed value}) for argv, or None after printing help."""
    subcommands = _subcommands(command)
    subcommand = None
    if subcommands:
        if argv[:1] in (["-h"], ["--help"]):
            print(help_text(command, prog, None, checks))
            return None
        if not argv or argv[0].startswith("-"):
            raise UsageError(f"the subcommand comes first: {_either(subcommands)} (see {prog} --help)")
        subcommand, argv = argv[0], argv[1:]
        if subcommand not in subcommands:
            raise UsageError(f"unknown subcommand {subcommand!r}{_did_you_mean(subcommand, subcommands, '')}; "
                             f"choose {_either(subcommands)}")
    flags = signature_flags(command, subcommand, checks)
    where = f"{prog} {subcommand}" if subcommand else prog
    values, rest = {}, None if subcommand else _rest_name(command)
    i = 0
    while i < len(argv):
        arg, i = argv[i], i + 1
        if arg in ("-h", "--help"):
            print(help_text(command, prog, subcommand, checks))
            return None
        if not arg.startswith("--") and rest:
            values[rest] = values.get(rest, ()) + (arg,)  # `report.py A.json B.json`: the *rest arguments
            continue
        if not arg.startswith("--"):
            raise UsageError(f"unexpected argument {arg!r}: every option is a --flag (see {where} --help)")
        name, has_value, text = arg[2:].partition("=")
        name = name.replace("-", "_")
        if name not in flags and name.startswith("no") and not has_value and _is_bool(flags.get(name[2:])):
            name, has_value, text = name[2:], True, "false"  # --noflag, fire's way of saying --flag false
        if name not in flags:
            raise UsageError(f"unknown flag --{name}{_did_you_mean(name, flags, '--')}; see {where} --help")
        if name in values:
            raise UsageError(f"--{name} is given twice")
        if not has_value:
            if flags[name].type is bool and (i == len(argv) or argv[i].startswith("--")):
                text = "true"
            elif i == len(argv):
                raise UsageError(f"--{name} needs a value")
            else:
                text, i = argv[i], i + 1
        values[name] = typed_value(name, flags[name], text)
    missing = [f"--{name}" for name, flag in flags.items() if flag.required and name not in values]
    if missing:
        raise UsageError(f"missing {' '.join(missing)} (see {where} --help)")
    return subcommand, values


def typed_value(name, flag, text):
    """The value of --name as its annotation types it, after its declared check."""
    try:
        if flag.type is bool:
            value = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}[text.lower()]
        elif flag.type is float:
            value = float(text)
            if not math.isfinite(value):
                raise ValueError(text)
        else:
            value = flag.type(text)  # int("1e2") and int("2.5") fail, as they should
    except (KeyError, ValueError):
        wanted = {bool: "true or false", int: "an integer", float: "a finite number"}[flag.type]
        raise UsageError(f"--{name} takes {wanted}, not {text!r}") from None
    try:
        good = flag.check is None or flag.check.test(value)
    except ValueError:  # a check that parses the text, e.g. a comma-separated list
        good = False
    if not good:
        raise UsageError(f"--{name} must be {flag.check.wants}, got {value!r}")
    return value


def _did_you_mean(word, known, prefix):
    close = difflib.get_close_matches(word, list(known), n=1)
    return f" (did you mean {prefix}{close[0]}?)" if close else ""


def _either(names):
    names = list(names)
    return ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else names[0]


def _rest_name(command):
    """The name of a function command's *args parameter (its arguments that are not flags), or None."""
    if inspect.isclass(command):
        return None
    return next((name for name, p in inspect.signature(command).parameters.items() if p.kind == p.VAR_POSITIONAL),
                None)


def _is_bool(flag):
    return flag is not None and flag.type is bool


def _subcommands(command):
    """{name: method} for a class command (its public methods, in the order written); {} for a function."""
    if not inspect.isclass(command):
        return {}
    return {name: fn for name, fn in vars(command).items() if inspect.isfunction(fn) and not name.startswith("_")}


def signature_flags(command, subcommand, checks):
    """{name: Flag} for a function, or for a class's shared flags plus one subcommand's."""
    if subcommand is None and not inspect.isclass(command):
        functions = [command]
    else:
        functions = [command.__init__] + ([_subcommands(command)[subcommand]] if subcommand else [])
    docs = {}
    for fn in [command] + functions:
        docs.update(_arg_docs(fn))
    flags = {}
    for fn in functions:
        hints = typing.get_type_hints(fn)
        for name, p in inspect.signature(fn).parameters.items():
            if name == "self" or p.kind not in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
                continue
            check = checks.get(f"{subcommand}.{name}", checks.get(name))
            # the signature's own annotation where fn has none (train.main borrows TrainConfig's)
            annotation = hints.get(name, None if p.annotation is p.empty else p.annotation)
            flags[name] = Flag(_flag_type(fn, name, annotation, p.default), p.default,
                               p.default is p.empty, docs.get(name, ""), check)
    return flags


def _flag_type(fn, name, annotation, default):
    """int, float, bool or str: the annotation, without Optional; else the default's type."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):  # Optional[int], int | None
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    if annotation is None:
        annotation = str if default in (None, inspect.Parameter.empty) else type(default)
    if annotation not in (int, float, bool, str):
        raise TypeError(f"{fn.__qualname__}: flag {name} is annotated {annotation}; cli types int, float, bool, str")
    return annotation


# -----------------------------------------------------------------------------------------------
# --help, written from the docstrings


def _arg_docs(fn):
    """{flag: text} from the docstring's "Args:" section; an entry "a, b: text" documents both."""
    lines = (inspect.getdoc(fn) or "").splitlines()
    starts = [i for i, line in enumerate(lines) if line.strip() == "Args:"]
    docs, names, indent = {}, [], None
    for line in lines[starts[0] + 1:] if starts else []:
        if not line.strip():
            continue
        depth = len(line) - len(line.lstrip())
        indent = depth if indent is None else indent
        if depth < indent:  # the next section (Returns:, ...)
            break
        entry = re.fullmatch(r"(\w+(?:, \w+)*)(?: \(.*?\))?: (.*)", line.strip()) if depth == indent else None
        if entry:
            names = entry[1].split(", ")
            docs.update({name: entry[2] for name in names})
        else:
            docs.update({name: docs[name] + " " + line.strip() for name in names})
    return docs


def _summary(fn):
    return " ".join((inspect.getdoc(fn) or "").split("\n\n")[0].split())


_HELP_WIDTH, _HELP_INDENT = 100, 28  # columns: the whole line, where a flag's meaning starts
_HELP_PAD = " " * _HELP_INDENT


def help_text(command, prog, subcommand, checks):
    """The usage line, what the command does, and every flag with its meaning, default and range."""
    subcommands = _subcommands(command)
    if subcommands and subcommand is None:
        lines = [f"usage: {prog} {'|'.join(subcommands)} [--flag value ...]", "", _summary(command), ""]
        lines += [f"  {name}".ljust(_HELP_INDENT) + _summary(fn) for name, fn in subcommands.items()]
        lines += ["", f"`{prog} SUBCOMMAND --help` lists a subcommand's flags."]
        return "\n".join(lines)
    where = f"{prog} {subcommand}" if subcommand else prog
    summary = _summary(subcommands[subcommand] if subcommand else command)
    rest = "" if subcommand else _rest_name(command)
    rest = f" {rest.upper()} ..." if rest else ""
    lines = [f"usage: {where}{rest} [--flag value ...]", "", *textwrap.wrap(summary, _HELP_WIDTH), ""]
    for name, flag in signature_flags(command, subcommand, checks).items():
        left = f"  --{name}" + ("" if flag.type is bool else f" {flag.type.__name__.upper()}")
        shown = not flag.required and flag.default is not None and flag.default is not False  # a switch is off
        notes = ["required"] if flag.required else [f"default {_shown(flag.default)}"] if shown else []
        notes += [f"must be {flag.check.wants}"] if flag.check else []
        text = (flag.doc or "(undocumented)") + (f" [{'; '.join(notes)}]" if notes else "")
        body = textwrap.wrap(text, _HELP_WIDTH - _HELP_INDENT, break_on_hyphens=False)
        lines += [left.ljust(_HELP_INDENT) + body[0]] if len(left) < _HELP_INDENT else [left, _HELP_PAD + body[0]]
        lines += [_HELP_PAD + more for more in body[1:]]
    return "\n".join(lines)


def _shown(default):
    if isinstance(default, bool):
        return str(default).lower()
    return str(default) if default != "" else "''"
