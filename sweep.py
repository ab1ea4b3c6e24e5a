"""Run many train.py trials from one YAML: every combination of a grid, or an Optuna search, each
trial an ordinary train.py run in its own directory, resumable after any crash.

    python sweep.py sweeps/lr.yaml --dry_run       # every trial's command, nothing run
    python sweep.py sweeps/lr.yaml                 # run (or, after a crash, continue) the sweep
    python sweep.py sweeps/lr.yaml --worker 2/4    # this process takes every 4th grid trial from the 2nd

The YAML (../shared/DESIGN.md, Contracts: Sweeps):
    dir: sweeps/lr                        # trial-0001, trial-0002, ... inside, one train.py --out_dir each
    launcher: python                      # or: torchrun --nproc_per_node 2 --standalone
    flags: {data: shards/notes, max_steps: 200}          # train.py flags, the same for every trial
    grid: {lr: [3e-4, 1e-3], "lora_rank,lora_alpha": [[4, 8], [16, 32]]}   # or optuna: below
    optuna: {trials: 20, seed: 0, sampler: tpe,          # sampler: tpe (default) or random
             pruner: {name: median, n_startup_trials: 2, n_warmup_steps: 50},   # or: median, or none
             params: {lr: {low: 1e-5, high: 1e-3, log: true}, lora_rank: {choices: [4, 8, 16]}}}
    storage: postgresql://host/db         # optional: the Optuna study's RDB (default DIR/study.db)
    eval: "eval.py --task classify --data val.jsonl --labels yes,no"   # optional, after each trial
    objective: {metric: val_loss, direction: minimize}

Grid: all combinations of the lists. A key naming several flags, comma-separated, ties them: its
list holds one list of values per point ("lora_rank,lora_alpha": [[4, 8], [16, 32]] is two points,
not four). Optuna params: {low, high} is an int range when both are written as integers (with an
optional step), else a float range (log: true for a log scale); {choices: [...]} is categorical.

The objective: with `eval:` it is a metric of eval.py's results file (DIR/trial-N/results.json,
"metrics"), else a key of the trial's log.jsonl, whose last value counts: the value of the model the
trial saved (val_loss is logged at every --eval_every and at the end). Optuna's pruner sees each
logged value of that key at its step while the trial runs (log.jsonl objectives only); a trial it
stops is sent SIGTERM, so train.py saves and exits, and is recorded PRUNED.

What the sweep keeps in DIR: sweep.json (the YAML's sha256 and the mlflow parent run), trials/
(trial-N.json, the trial's record, written atomically; trial-N.out and .err, its output), study.db,
summary.md and the PNG plots. Rerunning the same command never reruns a finished trial (FINISHED,
FAILED or PRUNED): an interrupted one is resumed from its checkpoint (train.py --resume) or, with
none, started again. Several processes may work on one sweep at once: a grid split by --worker K/N,
an Optuna study shared through its storage (each takes trials until the study holds `trials`).

Reading guide, top to bottom:
    the YAML         load_spec, grid_points, optuna_params, check_flags: every mistake found before any trial
    the commands     train_command, eval_command, print_commands (--dry_run)
    the sweep dir    open_sweep (sweep.json, refusing a changed YAML), locks, trial records
    one trial        run_trial -> launch -> watch (pruning) -> outcome, objective, eval
    grid, Optuna     run_grid, run_optuna (orphaned trials found and resumed)
    mlflow           the parent run (common.start_mlflow) and one child per trial (train.py continues it
                     through MLFLOW_RUN_ID)
    results          summary table, summary.md, plots
    main
"""

import ctypes
import fcntl
import glob
import hashlib
import itertools
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, fields

import yaml

import atomic
import cli
import common
import heads
import train
from cli import Check, UsageError, UserError

ROOT = os.path.dirname(os.path.abspath(__file__))
KEYS = {"dir", "launcher", "flags", "grid", "optuna", "storage", "eval", "objective"}
TRAIN_FLAGS = {f.name for f in fields(train.TrainConfig) if f.init}
OWN_FLAGS = ("out_dir", "resume", "overwrite")  # the sweep sets these itself
LOG_KEYS = {"loss", "lr", "tokens", "target_tokens", "grad_norm", "tokens_per_s", "mfu", "val_loss", "val_ppl"}
# --head classify and --head tag runs log their validation metrics too (val_auroc, ..., val_precision_at_K;
# tags: val_f1, val_precision, val_recall, val_f1_strict, val_token_accuracy)
HEAD_LOG_KEYS = {f"val_{name}" for n_labels, multilabel, kind in ((2, False, "classify"), (3, False, "classify"),
                                                                  (5, True, "classify"), (3, False, "tag"))
                 for name in heads.metric_names(n_labels, multilabel, kind=kind) if name != "labels_skipped"}
DONE = ("FINISHED", "FAILED", "PRUNED")
FAILURES_IN_A_ROW = 3  # then the sweep stops: every trial is likely to fail the same way
POLL_SECONDS = 0.5


@dataclass
class Sweep:
    """The YAML, checked."""
    path: str
    sha256: str
    dir: str
    launcher: list
    flags: dict  # fixed train.py flags, as written
    grid: list  # the points: one {flag: value} per trial; None for Optuna
    optuna: dict
    storage: str
    eval: list  # eval.py's words after "eval.py"; None without
    metric: str
    direction: str
    source: str  # "log" (log.jsonl) or "eval" (eval.py's results file)
    mlflow: bool
    experiment: str


# -----------------------------------------------------------------------------------------------
# The YAML: every mistake is one line, found before any trial starts


def load_spec(path):
    try:
        with open(path, "rb") as f:
            text = f.read()
        spec = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(spec, dict):
        raise UserError(f"{path}: expected a mapping with dir, launcher, flags, grid or optuna, objective")
    unknown = sorted(set(map(str, spec)) - KEYS)
    if unknown:
        raise UserError(f"{path}: unknown key {unknown[0]!r}; the keys are {', '.join(sorted(KEYS))}")
    if not spec.get("dir"):
        raise UserError(f"{path}: dir is missing (the sweep's directory)")
    if ("grid" in spec) == ("optuna" in spec):
        raise UserError(f"{path}: give either grid or optuna")
    metric, direction, source = objective(path, spec)
    flags = spec.get("flags") or {}
    if not isinstance(flags, dict):
        raise UserError(f"{path}: flags must be a mapping of train.py flags to values")
    launcher = shlex.split(str(spec.get("launcher") or "python"))
    if launcher[0] not in ("python", "torchrun"):
        raise UserError(f"{path}: launcher must be python or torchrun ..., not {launcher[0]!r}")
    evaluation = shlex.split(str(spec["eval"])) if spec.get("eval") else None
    if evaluation and evaluation[0] in ("python", sys.executable):
        evaluation = evaluation[1:]
    if evaluation is not None and evaluation[:1] != ["eval.py"]:
        raise UserError(f"{path}: eval must be an eval.py command (eval.py --task ... --data ...)")
    return Sweep(path=path, sha256=hashlib.sha256(text).hexdigest(), dir=str(spec["dir"]), launcher=launcher,
                 flags=flags, grid=grid_points(path, spec["grid"]) if "grid" in spec else None,
                 optuna=optuna_spec(path, spec["optuna"]) if "optuna" in spec else None,
                 storage=spec.get("storage"), eval=evaluation[1:] if evaluation else None, metric=metric,
                 direction=direction, source=source, mlflow=True, experiment="llama")


def objective(path, spec):
    """(metric, direction, source) of the YAML's objective."""
    obj = spec.get("objective")
    if not isinstance(obj, dict) or not obj.get("metric"):
        raise UserError(f"{path}: objective is missing: objective: {{metric: val_loss, direction: minimize}}")
    direction = obj.get("direction")
    if direction not in ("minimize", "maximize"):
        raise UserError(f"{path}: objective's direction must be minimize or maximize")
    metric, source = str(obj["metric"]), "eval" if spec.get("eval") else "log"
    head_metric = metric in HEAD_LOG_KEYS or re.fullmatch(r"val_precision_at_\d+", metric)
    if source == "log" and metric not in LOG_KEYS and not head_metric and not metric.startswith("eval_"):
        raise UserError(f"{path}: no trial reports the objective {metric!r}: log.jsonl has "
                        f"{', '.join(sorted(LOG_KEYS))}, eval_* (with --eval_task) and a head's "
                        f"{', '.join(sorted(HEAD_LOG_KEYS))}; give eval: for eval.py's")
    return metric, direction, source


def grid_points(path, grid):
    """Every combination of the grid's lists, one {flag: value} each; a key "a,b" ties flags."""
    if not isinstance(grid, dict) or not grid:
        raise UserError(f"{path}: the grid is empty")
    axes = []
    for key, values in grid.items():
        names = [n.strip() for n in str(key).split(",")]
        if not isinstance(values, list) or not values:
            raise UserError(f"{path}: grid: {key} needs a non-empty list of values")
        if len(names) > 1 and not all(isinstance(v, list) and len(v) == len(names) for v in values):
            raise UserError(f"{path}: grid: {key} ties {len(names)} flags: each value must be a list of "
                            f"{len(names)} (e.g. [[4, 8], [16, 32]])")
        axes.append([dict(zip(names, v if len(names) > 1 else [v])) for v in values])
    return [{k: v for point in combo for k, v in point.items()} for combo in itertools.product(*axes)]


def optuna_spec(path, spec):
    if not isinstance(spec, dict) or not isinstance(spec.get("params"), dict) or not spec["params"]:
        raise UserError(f"{path}: optuna needs params: {{flag: {{low: ..., high: ...}} or {{choices: [...]}}}}")
    if not isinstance(spec.get("trials"), int) or spec["trials"] < 1:
        raise UserError(f"{path}: optuna needs trials: a positive number of trials")
    for name, p in spec["params"].items():
        if not isinstance(p, dict) or not ("choices" in p or {"low", "high"} <= set(p)):
            raise UserError(f"{path}: optuna: {name} needs low and high, or choices")
    pruner = spec.get("pruner", "median")
    pruner = pruner if isinstance(pruner, dict) else {"name": pruner}
    if pruner.get("name") not in ("median", "none", None):
        raise UserError(f"{path}: optuna: pruner must be median or none")
    if spec.get("sampler", "tpe") not in ("tpe", "random"):
        raise UserError(f"{path}: optuna: sampler must be tpe or random")
    return {**spec, "pruner": pruner}


def check_flags(sweep):
    """Every trial's train.py command line checked as train.py would (names, types, ranges);
    which also fixes whether trials are tracked in mlflow, and in which experiment."""
    searched = sweep.grid or [{name: value} for name, p in sweep.optuna["params"].items()
                              for value in p.get("choices") or (p["low"], p["high"])]
    for name in sorted(set(sweep.flags) | {k for point in searched for k in point}):
        if name in OWN_FLAGS:
            raise UserError(f"{sweep.path}: --{name} is the sweep's to set (each trial has its own --out_dir)")
        if name not in TRAIN_FLAGS:
            raise UserError(f"{sweep.path}: unknown train.py flag {name!r}; see python train.py --help")
    for i, point in enumerate(searched):
        try:
            values = cli.parse(train.main, flag_words({**sweep.flags, **point}), "train.py", train.CHECKS)[1]
        except UsageError as e:
            raise UserError(f"{sweep.path}: {', '.join(f'{k}={v}' for k, v in point.items())}: {e}") from None
    sweep.mlflow, sweep.experiment = values.get("mlflow", True), values.get("mlflow_experiment", "llama")


def flag_words(flags):
    return [w for name, value in flags.items() for w in (f"--{name}", as_text(value))]


def as_text(value):
    return str(value).lower() if isinstance(value, bool) else str(value)


# -----------------------------------------------------------------------------------------------
# The commands


def train_command(sweep, params, out_dir):
    """One trial's train.py command (the launcher's python is this one's)."""
    if sweep.launcher[0] == "torchrun":
        launcher = [sys.executable, "-m", "torch.distributed.run", *sweep.launcher[1:]]
    else:
        launcher = [sys.executable, *sweep.launcher[1:]]
    return [*launcher, os.path.join(ROOT, "train.py"), *flag_words({**sweep.flags, **params}),
            "--out_dir", out_dir]


def eval_command(sweep, params, out_dir):
    """eval.py on the trial's checkpoint: its adapter on the base for LoRA, else its model."""
    flags = {**sweep.flags, **params}
    lora_rank = int(float(flags.get("lora_rank", 0) or 0))
    weights = (["--ckpt_dir", str(flags["ckpt_dir"]), "--adapter", os.path.join(out_dir, "adapter")] if lora_rank
               else ["--ckpt_dir", os.path.join(out_dir, "model")])
    tracking = [] if "--mlflow" in sweep.eval else ["--mlflow", "false"]  # the trial's child run gets the objective
    return [sys.executable, os.path.join(ROOT, "eval.py"), *sweep.eval, *weights,
            "--out", os.path.join(out_dir, "results.json"), *tracking]


def print_commands(sweep):
    if sweep.grid:
        for i, point in enumerate(sweep.grid):
            out_dir = os.path.join(sweep.dir, trial_name(i))
            print(shlex.join(train_command(sweep, point, out_dir)))
            if sweep.eval:
                print("  then: " + shlex.join(eval_command(sweep, point, out_dir)))
        return
    params = {name: f"<{describe(p)}>" for name, p in sweep.optuna["params"].items()}
    print(f"# {sweep.optuna['trials']} Optuna trials, {trial_name(0)} to {trial_name(sweep.optuna['trials'] - 1)}:")
    print(shlex.join(train_command(sweep, params, os.path.join(sweep.dir, "trial-NNNN"))))
    if sweep.eval:
        print("  then: " + shlex.join(eval_command(sweep, params, os.path.join(sweep.dir, "trial-NNNN"))))


def describe(p):
    if "choices" in p:
        return "one of " + ",".join(map(str, p["choices"]))
    return f"{p['low']}..{p['high']}" + (" log" if p.get("log") else "") + (f" step {p['step']}" if "step" in p else "")


def trial_name(index):
    return f"trial-{index + 1:04d}"


# -----------------------------------------------------------------------------------------------
# The sweep's directory: sweep.json, locks, one record per trial


def open_sweep(sweep, force):
    """Create or continue DIR: a directory holding something else is refused, and so is a changed
    YAML unless --force. Returns the mlflow parent run's Tracker (None without mlflow)."""
    path = os.path.join(sweep.dir, "sweep.json")
    others = sorted(set(os.listdir(sweep.dir)) - {"trials", ".sweep.lock"}) if os.path.isdir(sweep.dir) else []
    if others and not os.path.exists(path):
        raise UserError(f"{sweep.dir} holds something else ({others[0]}); a sweep needs a new or empty dir")
    os.makedirs(os.path.join(sweep.dir, "trials"), exist_ok=True)
    with locked(os.path.join(sweep.dir, ".sweep.lock")):
        state = {}
        if os.path.exists(path):
            with open(path) as f:
                state = json.load(f)
        if state.get("yaml_sha256", sweep.sha256) != sweep.sha256 and not force:
            raise UserError(f"{sweep.path} has changed since {sweep.dir} began; --force to continue with it")
        tracker = parent_run(sweep, state.get("mlflow_run_id")) if sweep.mlflow else None
        state.update(yaml=sweep.path, yaml_sha256=sweep.sha256, mlflow_run_id=tracker and tracker.run_id)
        write_json(path, state)
    return tracker


class locked:
    """flock on a file: `with locked(path)`, or acquire() (which with blocking=False says whether it
    got the lock) and release()."""

    def __init__(self, path, blocking=True):
        self.path, self.blocking, self.fd = path, blocking, None

    def acquire(self):
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | (0 if self.blocking else fcntl.LOCK_NB))
            return True
        except BlockingIOError:
            self.release()
            return False

    def release(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *_):
        self.release()


def write_json(path, value):
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(value, f, indent=1)
    atomic.write_file(path, write)


def record_path(sweep, name, ext=".json"):
    return os.path.join(sweep.dir, "trials", name + ext)


def read_record(sweep, name):
    path = record_path(sweep, name)
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def all_records(sweep):
    records = []
    for path in sorted(glob.glob(os.path.join(sweep.dir, "trials", "trial-*.json"))):
        with open(path) as f:
            records.append(json.load(f))
    return records


# -----------------------------------------------------------------------------------------------
# One trial: train.py (resumed if it left a checkpoint), watched for pruning, then eval.py


def run_trial(sweep, name, params, parent, prune=None):
    """Run (or continue) trial `name`; returns its record, written to trials/NAME.json."""
    out_dir = os.path.join(sweep.dir, name)
    record = {"name": name, "params": params, "attempts": 0, "seconds": 0.0, **read_record(sweep, name)}
    resume = settled_checkpoint(out_dir)
    command = train_command(sweep, params, out_dir)
    record["mlflow_run_id"] = record.get("mlflow_run_id") or child_run(parent, name)
    record.update(state="RUNNING", command=shlex.join(command), attempts=record["attempts"] + 1, error=None)
    write_json(record_path(sweep, name), record)
    t0 = time.time()
    env = {**os.environ, **({"MLFLOW_RUN_ID": record["mlflow_run_id"]} if record["mlflow_run_id"] else {})}
    code, pruned = launch(sweep, name, command + (["--resume"] if resume else []), env, prune)
    state, error = ("PRUNED", None) if pruned and code in (0, 130) else \
        ("FINISHED", None) if code == 0 else ("FAILED", last_line(record_path(sweep, name, ".err")))
    value = None
    if state == "FINISHED":
        state, error, value = result(sweep, name, params, out_dir)
    record.update(state=state, error=error, objective=value, seconds=record["seconds"] + time.time() - t0,
                  intermediate=intermediate(out_dir, sweep.metric) if sweep.source == "log" else [])
    write_json(record_path(sweep, name), record)
    end_child_run(record)
    return record


def settled_checkpoint(out_dir):
    """Whether out_dir holds a checkpoint to resume, once any train.py still in it (one orphaned by a
    killed sweep saves on the SIGTERM it got) has let go of its lock."""
    if not os.path.isdir(out_dir):
        return False
    with locked(os.path.join(out_dir, ".lock")):
        for name in ("model", "adapter"):
            atomic.recover(os.path.join(out_dir, name))
        return any(os.path.isfile(os.path.join(out_dir, name, "train_state.pt")) for name in ("model", "adapter"))


def launch(sweep, name, command, env, prune):
    """Run command to its end; prune(step, value) -> True stops it with SIGTERM. Returns (exit
    status, whether it was pruned). Its output goes to trials/NAME.out and .err."""
    log = os.path.join(sweep.dir, name, "log.jsonl")
    with open(record_path(sweep, name, ".out"), "a") as out, open(record_path(sweep, name, ".err"), "a") as err:
        proc = subprocess.Popen(command, stdout=out, stderr=err, env=env, preexec_fn=_end_with_parent)
        pruned, reported = False, set()
        try:
            while proc.poll() is None:
                time.sleep(POLL_SECONDS)
                for step, value in ([] if prune is None or pruned else intermediate(log, sweep.metric)):
                    if step not in reported:
                        reported.add(step)
                        if prune(step, value):
                            proc.send_signal(signal.SIGTERM)  # train.py saves and exits 130
                            pruned = True
                            break
        except BaseException:  # Ctrl-C: the trial saves and stops with the sweep (--resume continues it)
            proc.send_signal(signal.SIGTERM)
            proc.wait()
            raise
    return proc.returncode, pruned


def _end_with_parent():
    """In the child: SIGTERM when the sweep dies, even by kill -9, so the trial saves and stops
    rather than running on unseen (Linux's PR_SET_PDEATHSIG; elsewhere nothing)."""
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)
    except (AttributeError, OSError):
        pass


def intermediate(log_or_dir, metric):
    """[(step, value)] of metric in a log.jsonl (or a trial directory's), in order."""
    path = log_or_dir if log_or_dir.endswith(".jsonl") else os.path.join(log_or_dir, "log.jsonl")
    values = []
    try:
        with open(path) as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:  # a line being written
                    continue
                if isinstance(record.get(metric), (int, float)) and math.isfinite(record[metric]):
                    values.append((record["step"], record[metric]))
    except FileNotFoundError:
        pass
    return values


def result(sweep, name, params, out_dir):
    """(state, error, objective) of a trial whose train.py finished: eval.py run first if asked."""
    if sweep.source == "log":
        values = intermediate(out_dir, sweep.metric)
        if not values:
            return "FAILED", f"log.jsonl has no {sweep.metric}", None
        return "FINISHED", None, values[-1][1]
    err = record_path(sweep, name, ".err")
    with open(record_path(sweep, name, ".out"), "a") as out, open(err, "a") as f:
        code = subprocess.run(eval_command(sweep, params, out_dir), stdout=out, stderr=f).returncode
    if code != 0:
        return "FAILED", last_line(err), None
    with open(os.path.join(out_dir, "results.json")) as f:
        value = json.load(f).get("metrics", {}).get(sweep.metric)
    if not isinstance(value, (int, float)):
        return "FAILED", f"eval.py's results have no {sweep.metric}", None
    return "FINISHED", None, value


def last_line(path):
    try:
        with open(path, errors="replace") as f:
            lines = [line.strip() for line in f if line.strip()]
    except FileNotFoundError:
        return "no output"
    return lines[-1][:300] if lines else "no output"


# -----------------------------------------------------------------------------------------------
# The grid and the Optuna search


class Progress:
    """`sweep.py: trial 3 of 6 ...` lines, with an ETA from the trials this process ran, and the stop
    after FAILURES_IN_A_ROW failed trials."""

    def __init__(self, total, done):
        self.total, self.done, self.ran, self.t0, self.failed = total, done, 0, time.time(), 0

    def start(self, name, params):
        shown = " ".join(f"{k}={v}" for k, v in params.items())
        print(f"sweep.py: trial {self.done + 1} of {self.total}: {name} {shown}", file=sys.stderr, flush=True)

    def end(self, record):
        self.done, self.ran = self.done + 1, self.ran + 1
        eta = (time.time() - self.t0) / self.ran * max(self.total - self.done, 0)
        value = "-" if record.get("objective") is None else f"{record['objective']:.6g}"
        print(f"sweep.py: {record['name']} {record['state']} objective {value} "
              f"({self.done} of {self.total} done, ETA {common.format_eta(eta)})"
              + (f": {record['error']}" if record["error"] else ""), file=sys.stderr, flush=True)
        self.failed = self.failed + 1 if record["state"] == "FAILED" else 0
        if self.failed >= FAILURES_IN_A_ROW:
            raise UserError(f"{self.failed} trials failed in a row, the last ({record['name']}) with: {record['error']}")


def run_grid(sweep, worker, parent):
    k, n = map(int, worker.split("/"))
    mine = [i for i in range(len(sweep.grid)) if i % n == k - 1]
    todo = [i for i in mine if read_record(sweep, trial_name(i)).get("state") not in DONE]
    progress = Progress(len(mine), len(mine) - len(todo))
    for i in todo:
        with locked(record_path(sweep, trial_name(i), ".lock"), blocking=False) as mine_now:
            if not mine_now:  # another process runs it
                continue
            progress.start(trial_name(i), sweep.grid[i])
            progress.end(run_trial(sweep, trial_name(i), sweep.grid[i], parent))


def run_optuna(sweep, parent):
    """Take trials from the shared study until it holds `trials`: first those a killed process left
    RUNNING (their lock free), resumed as the same Optuna trial, then new ones."""
    import optuna  # heavy, and only for Optuna sweeps

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = load_study(sweep)
    progress = Progress(sweep.optuna["trials"], finished_count(study))
    while True:
        taken = take_trial(sweep, study)
        if taken is None:
            return
        trial, lock = taken
        try:
            name = trial_name(trial.number)
            progress.start(name, trial.params)
            record = run_trial(sweep, name, trial.params, parent, reporter(trial))
            state = {"FINISHED": optuna.trial.TrialState.COMPLETE, "PRUNED": optuna.trial.TrialState.PRUNED,
                     "FAILED": optuna.trial.TrialState.FAIL}[record["state"]]
            trial.set_user_attr("error", record["error"])
            study.tell(trial, record["objective"] if record["state"] == "FINISHED" else None, state=state)
        finally:
            lock.release()
        progress.end(record)


def load_study(sweep):
    import optuna

    spec, pruner = sweep.optuna, sweep.optuna["pruner"]
    sampler = (optuna.samplers.RandomSampler(seed=spec.get("seed", 0)) if spec.get("sampler") == "random"
               else optuna.samplers.TPESampler(seed=spec.get("seed", 0)))
    pruner = (optuna.pruners.NopPruner() if pruner.get("name") == "none" or sweep.source != "log" else
              optuna.pruners.MedianPruner(**{k: v for k, v in pruner.items() if k != "name"}))
    storage = sweep.storage or "sqlite:///" + os.path.abspath(os.path.join(sweep.dir, "study.db"))
    # Workers starting together would each create the storage's tables (optuna's schema migration
    # inserts its version row once: the second insert fails), so one creates while the others wait.
    with locked(os.path.join(sweep.dir, ".study.lock")):
        return optuna.create_study(storage=storage, study_name=os.path.basename(os.path.normpath(sweep.dir)),
                                   direction=sweep.direction, sampler=sampler, pruner=pruner, load_if_exists=True)


def finished_count(study):
    return sum(t.state.is_finished() for t in study.get_trials(deepcopy=False))


def take_trial(sweep, study):
    """(trial, its lock held) to run next, or None when the study is complete. Under the sweep's ask
    lock, so a trial another process has just asked for is never taken for an orphan."""
    import optuna

    with locked(os.path.join(sweep.dir, ".ask.lock")):
        trials = study.get_trials(deepcopy=False)
        for frozen in trials:
            if frozen.state == optuna.trial.TrialState.RUNNING:
                lock = locked(record_path(sweep, trial_name(frozen.number), ".lock"), blocking=False)
                if lock.acquire():  # its process is gone: resume it as the same trial
                    return optuna.trial.Trial(study, frozen._trial_id), lock
        if len(trials) >= sweep.optuna["trials"]:
            return None
        trial = study.ask(distributions(sweep.optuna["params"]))
        lock = locked(record_path(sweep, trial_name(trial.number), ".lock"))
        lock.acquire()
        return trial, lock


def distributions(params):
    import optuna

    out = {}
    for name, p in params.items():
        if "choices" in p:
            out[name] = optuna.distributions.CategoricalDistribution(p["choices"])
        elif isinstance(p["low"], int) and isinstance(p["high"], int):
            out[name] = optuna.distributions.IntDistribution(p["low"], p["high"], log=bool(p.get("log")),
                                                             step=int(p.get("step", 1)))
        else:
            out[name] = optuna.distributions.FloatDistribution(float(p["low"]), float(p["high"]),
                                                               log=bool(p.get("log")), step=p.get("step"))
    return out


def reporter(trial):
    """prune(step, value) for launch: the value reported at its step, and the pruner's verdict."""
    def prune(step, value):
        with warnings.catch_warnings():  # a resumed trial reports its earlier steps again
            warnings.simplefilter("ignore")
            trial.report(value, step)
        return trial.should_prune()
    return prune


# -----------------------------------------------------------------------------------------------
# mlflow: the sweep's parent run, one child per trial that train.py continues (MLFLOW_RUN_ID)


def parent_run(sweep, run_id):
    params = {"sweep": sweep.path, "search": "grid" if sweep.grid else "optuna", "objective": sweep.metric,
              "direction": sweep.direction, **{f"flag.{k}": v for k, v in sweep.flags.items()}}
    return common.start_mlflow(sweep.experiment, os.path.basename(os.path.normpath(sweep.dir)), params,
                               run_id, prog="sweep.py")


def child_run(parent, name):
    """A new run nested under the parent's (mlflow's parentRunId tag); None without mlflow."""
    if parent is None or parent.mlflow is None:
        return None
    try:
        with common.quiet_mlflow():
            client = parent.mlflow.MlflowClient()
            experiment = client.get_run(parent.run_id).info.experiment_id
            return client.create_run(experiment, run_name=name,
                                     tags={"mlflow.parentRunId": parent.run_id}).info.run_id
    except Exception as e:
        common.warn_tracking_stopped("sweep.py", e)
        return None


def end_child_run(record):
    """The trial's state and objective on its child run, which ends with it."""
    if not record.get("mlflow_run_id"):
        return
    try:
        with common.quiet_mlflow():
            import mlflow

            client = mlflow.MlflowClient()
            client.set_tag(record["mlflow_run_id"], "sweep.state", record["state"])
            if record["objective"] is not None:
                client.log_metric(record["mlflow_run_id"], "objective", record["objective"])
            status = {"FINISHED": "FINISHED", "PRUNED": "KILLED"}.get(record["state"], "FAILED")
            client.set_terminated(record["mlflow_run_id"], status=status)
    except Exception as e:
        common.warn_tracking_stopped("sweep.py", e)


# -----------------------------------------------------------------------------------------------
# Results: the table (stdout and summary.md), the best trial's command, the plots


def ranked(sweep, records):
    """Finished trials by objective, best first, then the others by name."""
    sign = 1 if sweep.direction == "minimize" else -1
    scored = sorted((r for r in records if r.get("objective") is not None), key=lambda r: sign * r["objective"])
    return scored + [r for r in records if r.get("objective") is None]


def summary_text(sweep, records):
    names = sorted({k for r in records for k in r["params"]})
    lines = [f"# Sweep {sweep.dir}: {sweep.metric} ({sweep.direction})", "",
             "| trial | " + " | ".join(names) + f" | {sweep.metric} | state | duration |",
             "|---" * (len(names) + 4) + "|"]
    for r in ranked(sweep, records):
        value = "-" if r.get("objective") is None else f"{r['objective']:.6g}"
        state = r["state"] + (f" ({r['error']})" if r.get("error") else "")
        lines.append(f"| {r['name']} | " + " | ".join(str(r["params"].get(k, "")) for k in names) +
                     f" | {value} | {state} | {common.format_eta(r.get('seconds', 0))} |")
    best = ranked(sweep, records)[0] if records else None
    if best and best.get("objective") is not None:
        lines += ["", f"Best: {best['name']}, {sweep.metric} {best['objective']:.6g}:", "",
                  f"    {best['command']}"]
    return "\n".join(lines) + "\n"


def write_summary(sweep, parent):
    records = all_records(sweep)
    text = summary_text(sweep, records)
    print(text, end="")
    path = os.path.join(sweep.dir, "summary.md")

    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    atomic.write_file(path, write)
    plots = write_plots(sweep, records)
    if parent is not None:
        for artifact in [path, *plots]:
            parent.artifact(artifact)
        if all(r["state"] in DONE for r in records):
            parent.end_run()
    if not any(r.get("objective") is not None for r in records) and all(r["state"] in DONE for r in records):
        raise UserError(f"no trial reported the objective {sweep.metric}; see {path}")


def write_plots(sweep, records):
    """objective.png (by trial), params.png (against each searched flag), intermediate.png (over
    steps, pruned trials marked x); returns their paths."""
    from matplotlib.figure import Figure  # drawn without pyplot: no display, no global figures

    scored = [r for r in records if r.get("objective") is not None]
    names = sorted({k for r in records for k in r["params"]})
    paths = [os.path.join(sweep.dir, f) for f in ("objective.png", "params.png", "intermediate.png")]
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    ax.plot([int(r["name"][6:]) for r in scored], [r["objective"] for r in scored], "o")
    ax.set(xlabel="trial", ylabel=sweep.metric, title=f"{sweep.metric} by trial")
    save_figure(fig, paths[0])
    fig = Figure(figsize=(4 * max(len(names), 1), 4))
    axes = fig.subplots(1, max(len(names), 1), squeeze=False)
    for ax, name in zip(axes[0], names):
        ax.plot([str(r["params"].get(name)) for r in scored], [r["objective"] for r in scored], "o")
        ax.set(xlabel=name, ylabel=sweep.metric)
    save_figure(fig, paths[1])
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for r in records:
        steps, values = zip(*r["intermediate"]) if r.get("intermediate") else ((), ())
        line = ax.plot(steps, values, label=r["name"])[0]
        if r["state"] == "PRUNED" and steps:
            ax.plot(steps[-1:], values[-1:], "x", color=line.get_color(), markersize=10)
    ax.set(xlabel="step", ylabel=sweep.metric, title="intermediate values (x: pruned)")
    save_figure(fig, paths[2])
    return paths


def save_figure(fig, path):
    def write(tmp):
        fig.savefig(tmp, format="png", dpi=80, bbox_inches="tight")
    atomic.write_file(path, write)


# -----------------------------------------------------------------------------------------------
# main


WORKER = Check(lambda v: re.fullmatch(r"\d+/\d+", v) is not None and 1 <= int(v.split("/")[0]) <= int(v.split("/")[1]),
               "K/N with 1 <= K <= N")


def main(sweep: str, dry_run: bool = False, worker: str = "1/1", force: bool = False):
    """Run a grid or an Optuna search over train.py flags, from a YAML (see the top of sweep.py).

    Args:
        sweep: the sweep's YAML (also the first argument: python sweep.py SWEEP.yaml)
        dry_run: print every trial's command and stop
        worker: K/N: this process runs grid trials K, K+N, ... (Optuna workers share the study instead)
        force: continue a sweep whose YAML has changed since it began
    """
    spec = load_spec(sweep)
    check_flags(spec)
    if dry_run:
        print_commands(spec)
        return
    parent = open_sweep(spec, force)
    if spec.grid:
        run_grid(spec, worker, parent)
    else:
        run_optuna(spec, parent)
    write_summary(spec, parent)


def argv_with_yaml_first(argv):
    """`sweep.py SWEEP.yaml ...` is `sweep.py --sweep SWEEP.yaml ...` (cli.run takes flags only)."""
    return ["--sweep", *argv] if argv and not argv[0].startswith("-") else argv


if __name__ == "__main__":
    cli.run(main, prog="sweep.py", argv=argv_with_yaml_first(sys.argv[1:]),
            checks={"sweep": cli.non_empty, "worker": WORKER})
