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
    stop       before the process group is torn down (the store must not be in use as it goes)
    failed     called by a rank as its error propagates: marks the store, and says whether this
               rank is the first to fail (the one that prints the error; the others exit quietly)
    exit_quietly   how the others leave: at once, without the process group's teardown
"""

import os
import sys
import threading

import torch.distributed as dist

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
