"""Ranks that fail together: under torchrun, one rank's error stops every rank within seconds, and is
printed once.

Without this, a rank that fails leaves the others blocked in their next collective (an all-reduce
in backward, the broadcast of a checkpoint's path) until the process group's timeout (NCCL's is
ten minutes), or until torchrun's SIGKILL after --shutdown-timeout on the failing rank's node only:
a Python signal handler cannot run while its thread waits inside a collective, and other nodes'
agents are not told at all.

Read top to bottom:
    watch      after init_process_group: a daemon thread per rank polls the process group's store
               (which every node shares) and ends its rank once another rank has failed
    failed     called by a rank as its error propagates: marks the store, and says whether this
               rank is the first to fail (the one that prints the error; the others exit quietly)
"""

import os
import sys
import threading
import time

import torch.distributed as dist

_KEY = "llama/failed"  # the number of ranks that have failed
_POLL_S = 1.0
_failing = threading.Event()  # this rank is failing: its own watcher must let it print and exit


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
    threading.Thread(target=_watch, args=(store,), daemon=True, name="fail-together").start()


def _watch(store):
    while not _failing.is_set():
        time.sleep(_POLL_S)
        try:
            if store.check([_KEY]) and not _failing.is_set():
                os._exit(1)  # another rank failed and said why; this one was waiting on it
        except Exception:  # the store is gone: torchrun is already tearing the job down
            return


def failed() -> bool:
    """Mark this rank as failed; True if it is the first rank to fail (so the one to print the
    error). Without a multi-rank process group, always True."""
    _failing.set()
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
