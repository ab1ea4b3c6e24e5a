"""train.py under torchrun with one rank made to fail, run by tests/test_train_faults.py:

    torchrun --nproc_per_node 2 tests/rank_fault.py RANK WHEN TRAIN_FLAGS...

WHEN is "start" (the rank fails while setting up, before its first collective), "mid" (it fails
in its third training step, while the others wait for its gradients in backward's all-reduce) or
"save" (rank 0 cannot write its checkpoint, while under --fsdp the others wait for the directory's
path). The failure is a UserError, as a rank-local mistake (a file one node cannot read, a disk
that is full) would be.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cli  # noqa: E402
import train  # noqa: E402

rank, when, flags = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
if int(os.environ["RANK"]) == rank:
    if when == "save":
        import atomic

        def write_dir(path, write):
            raise cli.UserError(f"injected failure on rank {rank} saving")
        atomic.write_dir = write_dir
    elif when == "start":
        def set_up(cfg):
            raise cli.UserError(f"injected failure on rank {rank} at start-up")
        train.set_up = set_up
    else:
        step, calls = train.train_step, [0]

        def train_step(*args, **kwargs):
            calls[0] += 1
            if calls[0] == 3:
                raise cli.UserError(f"injected failure on rank {rank} mid-run")
            return step(*args, **kwargs)
        train.train_step = train_step
cli.run(train.main, prog="train.py", argv=flags)
