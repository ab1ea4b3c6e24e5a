"""What every entry point shares to run: where it runs (torchrun's ranks, the device), how its
ranks fail together, how long it has left, what its steps cost, and its record in mlflow.
train.py, eval.py, generate.py and bench.py take these from here; none of them from another.

Reading guide, top to bottom:
    where it runs    default_device, setup_distributed, teardown, and `ranks` (all three as one block;
                     leave_within: a finished rank that cannot leave is ended, saying where it hung)
    failing together watch, stop, failed, exit_quietly: under torchrun, one rank's error stops every
                     rank within seconds and is printed once
    time left        format_eta, Progress
    FLOPs            matmul_params, flops_per_token, peak_flops (for MFU)
    mlflow           start_mlflow and Tracker: tracking that can never stop a run

Why ranks must fail together: a rank that fails leaves the others blocked in their next
collective (an all-reduce in backward, the broadcast of a checkpoint's path) until the process
group's timeout (NCCL's is ten minutes), or until torchrun's SIGKILL after --shutdown-timeout on the
failing rank's node only: a Python signal handler cannot run while its thread waits inside a
collective, and other nodes' agents are not told at all. So a daemon thread per rank polls the
process group's store (which every node shares) and ends its rank once another rank has failed.
"""

import faulthandler
import logging
import os
import pathlib
import re
import sys
import threading
import time
from contextlib import contextmanager

import torch
import torch.distributed as dist

from model import PROJECTIONS

# bf16 dense peak of the GPUs we know, for MFU; other devices print no MFU.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "4090": 165e12}


# -----------------------------------------------------------------------------------------------
# Where a process runs: torchrun's rank among world, on a device


def default_device():
    """cuda:LOCAL_RANK where CUDA is available (torchrun's LOCAL_RANK, 0 for a plain run), else cpu."""
    return f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu"


def setup_distributed(device=None, group_of_one=False):
    """(rank, world, device): torchrun's RANK / WORLD_SIZE, or 0 of 1 for a plain `python` run; the
    process group joined where there are several ranks (NCCL on CUDA, else gloo). group_of_one: a
    single process gets a group of its own too (FSDP2 shards over one, even of one rank)."""
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    device = device or default_device()
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if dist.is_initialized():
        pass
    elif world > 1:
        dist.init_process_group(backend=backend)
    elif group_of_one:
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
    return rank, world, device


def teardown():
    """Leave the process group, the watcher first (see stop)."""
    stop()
    if dist.is_initialized():
        dist.destroy_process_group()


# Seconds a finished rank may take to leave (teardown, then the interpreter's exit) before it is
# ended: its work is saved by then, and a rank stuck in leaving would hold the job up for ever.
LEAVE_S = 120


@contextmanager
def ranks(world):
    """The body of an entry point under torchrun: its ranks watched, so that one rank's error ends
    them all and is printed once (by the first rank to fail; the others leave quietly); the process
    group torn down once the body is done. A failed rank does not wait on the others to tear down.
    A finished rank that cannot leave is ended after LEAVE_S (leave_within)."""
    watch()
    try:
        yield
    except BaseException:
        if world > 1 and not failed():
            exit_quietly()  # another rank failed first and its error is printed
        raise
    if world > 1:
        leave_within(LEAVE_S)
    teardown()


def leave_within(seconds):
    """End this process `seconds` from now if it is still there, saying where each of its threads
    waits, with status 0: its body has finished and saved everything. Leaving a gloo group has been
    seen to hang, rarely, after a run was complete. Should that thread never get the GIL, faulthandler's
    watchdog (a C thread) ends the process a minute later, with status 1."""
    def end():
        time.sleep(seconds)
        print(f"finished and saved, but leaving the process group has hung for {seconds} s; ending this "
              f"rank. Where each thread waits:", file=sys.stderr, flush=True)
        faulthandler.dump_traceback(all_threads=True)
        exit_quietly(0)

    threading.Thread(target=end, daemon=True, name="leave").start()
    faulthandler.dump_traceback_later(seconds + 60, exit=True)  # never cancelled: it ends with the process


# -----------------------------------------------------------------------------------------------
# Failing together

_KEY = "llama/failed"  # the number of ranks that have failed
_POLL_S = 1.0
_stop = threading.Event()  # the watcher's end: the run is over, or this rank is failing and prints why
_watcher = []


def _store():
    try:  # the default group's store: torchrun's TCPStore, shared by every node of the job
        return dist.distributed_c10d._get_default_store()
    except (AttributeError, RuntimeError, ValueError):
        return None


def watch():
    """Start the watcher (a no-op without a multi-rank process group)."""
    store = _store() if dist.is_initialized() and dist.get_world_size() > 1 else None
    if store is None:
        return
    _stop.clear()
    _watcher.append(threading.Thread(target=_watch, args=(store,), daemon=True, name="fail-together"))
    _watcher[-1].start()


def _watch(store):
    while not _stop.wait(_POLL_S):
        try:
            if store.check([_KEY]):
                os._exit(1)  # another rank failed and said why; this one was waiting on it
        except Exception:  # the store is gone: torchrun is already tearing the job down
            return


def stop():
    """End the watcher and wait for it: a store destroyed while the thread is inside it aborts the
    process (C++'s terminate)."""
    _stop.set()
    while _watcher:
        _watcher.pop().join()


def failed() -> bool:
    """Mark this rank as failed; True if it is the first rank to fail (so the one to print the
    error). Without a multi-rank process group, always True."""
    stop()
    store = _store() if dist.is_initialized() and dist.get_world_size() > 1 else None
    if store is None:
        return True
    try:
        return store.add(_KEY, 1) == 1
    except Exception:  # the store is gone: say it anyway
        return True


def exit_quietly(code=1):
    """Leave at once, without the process group's teardown (which may wait on the failed rank)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# -----------------------------------------------------------------------------------------------
# Time left


def format_eta(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class Progress:
    """`label 37/120 [=====     ] 12.3/s ETA 0m07s` on stderr, redrawn at most twice a second."""

    def __init__(self, total, label, enabled):
        self.total, self.label, self.enabled = total, label, enabled
        self.done, self.t0, self.shown = 0, time.perf_counter(), 0.0

    def advance(self, k=1):
        self.done += k
        now = time.perf_counter()
        if not self.enabled or (now - self.shown < 0.5 and self.done < self.total):
            return
        self.shown, rate = now, self.done / max(now - self.t0, 1e-9)
        bar = "=" * (20 * self.done // max(self.total, 1))
        end = "\n" if self.done >= self.total else ""
        print(f"\r{self.label} {self.done}/{self.total} [{bar:<20}] {rate:.1f}/s "
              f"ETA {format_eta((self.total - self.done) / rate)}", end=end, file=sys.stderr, flush=True)


# -----------------------------------------------------------------------------------------------
# FLOPs, for MFU


def matmul_params(args, lora_rank=0, lora_targets=PROJECTIONS):
    """Weights that take part in matrix products: every projection and the output layer (tied or
    not), not the embedding lookup or the norms; plus LoRA adapters of this rank on lora_targets."""
    q, kv, hidden = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim, args.hidden_dim
    shapes = {"wq": (args.dim, q), "wk": (args.dim, kv), "wv": (args.dim, kv), "wo": (q, args.dim),
              "w1": (args.dim, hidden), "w2": (hidden, args.dim), "w3": (args.dim, hidden)}
    per_layer = sum(i * o + (lora_rank * (i + o) if name in lora_targets else 0) for name, (i, o) in shapes.items())
    return args.n_layers * per_layer + args.vocab_size * args.dim


def flops_per_token(args, seq_len, lora_rank=0, lora_targets=PROJECTIONS):
    """Training FLOPs per token: 6N for a full step (2N forward, 4N backward) with N = matmul_params;
    with LoRA the frozen weights get no gradient, 4N. Attention scores and their use add
    12 * layers * heads * head_dim * seq_len (activation-checkpointing recomputation is not counted)."""
    n = matmul_params(args, lora_rank, lora_targets)
    return (4 if lora_rank else 6) * n + 12 * args.n_layers * args.n_heads * args.head_dim * seq_len


def peak_flops(device):
    """(name, bf16 dense FLOP/s) of a GPU we know, else (None, None): MFU = achieved / peak."""
    device = torch.device(device)
    if device.type != "cuda":
        return None, None
    gpu = torch.cuda.get_device_name(device)
    return next(((name, flops) for name, flops in PEAK_FLOPS.items() if name in gpu), (None, None))


# -----------------------------------------------------------------------------------------------
# mlflow: one store for train.py's and eval.py's runs; a failure is one warning line, never a lost run


def start_mlflow(experiment, run_name, params, run_id=None, prog="train.py"):
    """A Tracker on run_id continued (train.py --resume) or on a new run named run_name with params
    logged; None (and the one warning line) where mlflow cannot be used. The store is
    $MLFLOW_TRACKING_URI, or sqlite:///mlflow.db (mlflow's file store is deprecated)."""
    try:
        with quiet_mlflow():
            tracker = _start_run(experiment, run_name, run_id, prog)
    except Exception as e:  # tracking is a convenience: never lose a run over it
        warn_tracking_stopped(prog, e)
        return None
    if tracker.run_id != run_id:
        tracker.log_params(params)
    return tracker if tracker.mlflow else None


def _start_run(experiment, run_name, run_id, prog):
    """mlflow's run: run_id's, or a new one named run_name (then its params are still to log)."""
    import mlflow

    if not os.environ.get("MLFLOW_TRACKING_URI"):
        mlflow.set_tracking_uri("sqlite:///mlflow.db")
    _set_experiment(mlflow, experiment)
    if run_id:
        try:
            mlflow.start_run(run_id=run_id)
            return Tracker(mlflow, prog)
        except Exception as e:  # another tracking store than the one that began the run
            print(f"{prog}: mlflow run {run_id} not found ({type(e).__name__}); starting a new one", file=sys.stderr)
    mlflow.start_run(run_name=run_name)
    return Tracker(mlflow, prog)


def _set_experiment(mlflow, name):
    """Select (creating if need be) the experiment. A database store has no place of its own for
    artifacts, and mlflow would put a new experiment's in ./mlruns of whatever directory the run
    started from: they go beside the database file instead."""
    uri = mlflow.get_tracking_uri()
    if uri.startswith("sqlite:///") and mlflow.get_experiment_by_name(name) is None:
        db_dir = os.path.dirname(os.path.abspath(uri[len("sqlite:///"):]))
        mlflow.create_experiment(name, artifact_location=pathlib.Path(db_dir, "mlartifacts").as_uri())
    mlflow.set_experiment(name)


@contextmanager
def quiet_mlflow():
    """mlflow logs its own warnings and tracebacks about a failing store; the warning line below
    reports the failure once, so its logger is silenced while it works for us."""
    import mlflow  # slow to import; only when asked for (and its import sets its logger's level)

    logger = logging.getLogger("mlflow")
    level = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        logger.setLevel(level)


def warn_tracking_stopped(prog, error):
    """The one line a tracking failure prints (mlflow's messages can run to many lines)."""
    message = (str(error).strip().splitlines() or [""])[0][:200]
    print(f"{prog}: warning: mlflow tracking stopped ({type(error).__name__}: {message}); "
          f"the run goes on without it", file=sys.stderr)


def mlflow_name(name):
    """A metric or param name mlflow accepts (alphanumerics, _ - . : / and spaces): eval.py's
    "P@10" becomes "P_at_10". The results file keeps eval.py's own names; only the store sees these."""
    return re.sub(r"[^\w\-.:/ ]", "_", str(name).replace("@", "_at_"))


class Tracker:
    """mlflow behind one guard. Tracking is a convenience: the first failure of any kind (store down
    or locked, a value it refuses, a database made unwritable mid-run) is reported in one warning
    line, tracking stops, and the run goes on with its checkpoints and log.jsonl."""

    def __init__(self, mlflow, prog):
        self.mlflow, self.prog = mlflow, prog
        self.run_id = mlflow.active_run().info.run_id

    def _call(self, method, *args, **kwargs):
        if self.mlflow is None:
            return
        try:
            with quiet_mlflow():
                getattr(self.mlflow, method)(*args, **kwargs)
        except Exception as e:
            warn_tracking_stopped(self.prog, e)
            self._abandon()

    def _abandon(self):
        """Leave mlflow's run, which its store may refuse too: else mlflow's own exit hook would
        try to end it and log the same failure again, traceback and all."""
        mlflow, self.mlflow = self.mlflow, None
        try:
            with quiet_mlflow():
                mlflow.end_run(status="FAILED")
        except Exception:
            pass  # already reported

    def log_params(self, params):
        self._call("log_params", {mlflow_name(k): str(v)[:250] for k, v in params.items()})

    def log_metrics(self, metrics, step=None):
        self._call("log_metrics", {mlflow_name(k): v for k, v in metrics.items()}, step=step)

    def artifact(self, path):
        if os.path.exists(path):
            self._call("log_artifacts" if os.path.isdir(path) else "log_artifact", path)

    def end_run(self, status="FINISHED"):
        self._call("end_run", status=status)
        self.mlflow = None
