"""The command-line wrapper every script shares: python-fire, made strict.

python-fire alone runs `main` with defaults when it meets a flag it does not know, and parses values
as Python literals, so `--prompt 1e5` would arrive as 100000.0. Here flags are checked against the
function's signature before any work starts, values of `str` parameters arrive exactly as typed, and
a user's mistake ends in one line on stderr and exit status 1 (2 for a bad flag), not a traceback.
Set LLAMA_DEBUG=1 to see the traceback anyway.
"""

import inspect
import os
import sys


class UsageError(ValueError):
    """A mistake in what the user asked for; printed as one line."""


def _flags(fn):
    params = inspect.signature(fn).parameters
    return {name: p for name, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def check_argv(fn, argv, prog):
    """Reject unknown flags and positional words; return argv with str values quoted for fire."""
    params = _flags(fn)
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            out.append(arg)
            i += 1
            continue
        if not arg.startswith("--"):
            raise UsageError(f"unexpected argument {arg!r}; every option is a --flag (see {prog} --help)")
        name, eq, value = arg[2:].partition("=")
        name = name.replace("-", "_")
        negated = name.startswith("no") and name[2:] in params and name not in params
        if name not in params and not negated:
            close = [p for p in params if p.startswith(name[:4])]
            hint = f" (did you mean --{close[0]}?)" if close else ""
            raise UsageError(f"unknown flag --{name}{hint}; see {prog} --help")
        i += 1
        if negated or _is_bool(params[name]) and not eq and (i >= len(argv) or argv[i].startswith("--")):
            out.append(f"--{name}")
            continue
        if not eq:
            if i >= len(argv):
                raise UsageError(f"flag --{name} needs a value")
            value, i = argv[i], i + 1
        if _is_bool(params[name]):
            # fire would read "false" as a non-empty, hence true, string
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise UsageError(f"flag --{name} takes true or false, not {value!r}")
            value = str(value.lower() in ("true", "1", "yes"))
        elif params[name].annotation is str or (params[name].annotation is inspect.Parameter.empty
                                               and isinstance(params[name].default, str)):
            value = repr(value)  # fire evaluates literals: quoting keeps the text exactly as typed
        out.append(f"--{name}={value}")
    return out


def _is_bool(param):
    return param.annotation is bool or isinstance(param.default, bool)


def run(fn, prog=None, argv=None):
    """Run fn as a command: strict flags, then fire, user errors as one line."""
    import fire

    prog = prog or os.path.basename(sys.argv[0])
    argv = sys.argv[1:] if argv is None else argv
    debug = os.environ.get("LLAMA_DEBUG") == "1"
    try:
        fire.Fire(fn, command=check_argv(fn, argv, prog), name=prog)
    except UsageError as e:
        if debug:
            raise
        print(f"{prog}: {e}", file=sys.stderr)
        sys.exit(2 if "flag" in str(e) or "argument" in str(e) else 1)
    except (ValueError, OSError) as e:
        # CheckpointError, TokenizerError, ShardError and missing files all land here.
        if debug:
            raise
        print(f"{prog}: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        sys.exit(130)
