"""--resume on another number of ranks: the same global batch (ranks x --batch_size x --grad_accum)
continues the run exactly, with no flag; another global batch is refused in one line."""

import signal
import sys

import pytest

from test_fsdp import torchrun, torchrun_cmd
from test_train import TINY, _one_line_error, interrupt_after, losses, text_data, train  # noqa: F401  (fixtures)

# The same 4 sequences per step either way: 2 ranks x 2 rows, or 1 rank x 2 rows x 2 micro-steps.
TWO_RANKS = ["--batch_size", "2"]
ONE_RANK = ["--batch_size", "2", "--grad_accum", "2"]
# Ranks' partial sums of the loss and of the gradients add up in another order than one rank's
# micro-steps do: fp32 rounding (about 1e-7 relative per step), carried through AdamW over the steps.
TOLERANCE = 1e-5


def launch(ranks, common, out_dir, *extra):
    if ranks == 2:
        return torchrun(*common, *TWO_RANKS, "--out_dir", out_dir, *extra)
    return train(*common, *ONE_RANK, "--out_dir", out_dir, *extra)


def cut(ranks, common, out_dir):
    """A run stopped by SIGTERM (as a scheduler stops it) after 10 steps; returns the step saved."""
    argv = torchrun_cmd(*common, *TWO_RANKS, "--out_dir", out_dir) if ranks == 2 else \
        [sys.executable, "train.py", *map(str, [*common, *ONE_RANK, "--out_dir", out_dir])]
    status, err = interrupt_after(argv, out_dir, 10, signal.SIGTERM)
    assert status != 0 and "continue with --resume" in err, err[-3000:]
    return len(losses(out_dir))


def gap(a, b):
    assert len(a) == len(b)
    return max(abs(x - y) / abs(y) for x, y in zip(a, b))


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_resume_on_another_number_of_ranks_with_the_same_global_batch(text_data, tmp_path, fsdp):
    common = [*TINY, "--data", text_data, "--max_steps", "60", "--eval_every", "1000", "--save_every", "1000",
              "--lr", "3e-3", *(["--fsdp"] if fsdp else [])]
    for start, then in ((2, 1), (1, 2)):
        straight, resumed = tmp_path / f"straight{start}", tmp_path / f"cut{start}"
        launch(start, common, straight)
        stopped = cut(start, common, resumed)
        out = launch(then, common, resumed, "--resume")
        assert f"{then} rank(s)" in out.stderr and "resuming with changes" not in out.stderr
        assert losses(resumed)[:stopped] == losses(straight)[:stopped]
        worst = gap(losses(resumed), losses(straight))
        print(f"\n{start} -> {then} rank(s) at step {stopped}: max relative loss gap {worst:.1e}")
        assert worst < TOLERANCE


def test_resume_with_another_global_batch_is_refused_in_one_line(text_data, tmp_path):
    common = [*TINY, "--data", text_data, "--eval_every", "100", "--save_every", "100", "--batch_size", "2",
              "--out_dir", tmp_path]
    torchrun(*common, "--max_steps", "3")
    # the same flags on 1 rank: half the global batch (and a longer run, so that there is more to do)
    refused = train(*common, "--max_steps", "6", "--resume", check=False)
    _one_line_error(refused, "the global batch 2 rows = 1 rank(s) x --batch_size 2 x --grad_accum 1 "
                             "(was 4 = 2 rank(s) x --batch_size 2 x --grad_accum 1)")
    assert "--max_steps 6 (was 3)" in refused.stderr and len(losses(tmp_path)) == 3
    allowed = train(*common, "--max_steps", "6", "--resume", "--resume_with_changes")
    assert "resuming with changes" in allowed.stderr and "the global batch 2 rows" in allowed.stderr
    assert len(losses(tmp_path)) == 6
