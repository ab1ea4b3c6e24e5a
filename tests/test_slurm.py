"""slurm/train.sbatch, the README's SLURM recipe, run with stand-ins for srun and scontrol: the
time-limit signal (USR1 to the batch shell) saves the run, requeues the job, and the next start
resumes it to the end."""

import os
import signal
import socket
import subprocess
import time

from test_train import ROOT, TINY, log, text_data  # noqa: F401  (fixtures)

STUBS = {"srun": 'exec "$@"\n',  # one node: the task is the command itself, signals reach it directly
         "scontrol": 'case "$1" in show) echo localhost ;; requeue) echo "$@" >> "$REQUEUED" ;; esac\n'}


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_time_limit_signal_saves_requeues_and_the_next_start_resumes(text_data, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in STUBS.items():
        (bin_dir / name).write_text("#!/bin/bash\n" + body)
        (bin_dir / name).chmod(0o755)
    out = tmp_path / "out"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.path.dirname(os.sys.executable)}:{os.environ['PATH']}",
           "SLURM_JOB_ID": "42", "SLURM_NNODES": "1", "SLURM_JOB_NODELIST": "node1", "SLURM_GPUS_ON_NODE": "1",
           "MASTER_PORT": str(_free_port()), "REQUEUED": str(tmp_path / "requeued"), "SHUTDOWN_S": "120"}
    job = ["bash", "slurm/train.sbatch", str(out), *TINY, "--data", str(text_data), "--max_steps", "150",
           "--eval_every", "50", "--save_every", "1000", "--batch_size", "2"]
    proc = subprocess.Popen(job, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    logfile, deadline = out / "log.jsonl", time.time() + 120
    while time.time() < deadline and (not logfile.exists() or len(logfile.read_text().splitlines()) < 10):
        time.sleep(0.01)
    proc.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@600 sends the batch shell
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 0 and "continue with --resume" in err, err[-3000:]
    assert (tmp_path / "requeued").read_text().split() == ["requeue", "42"]
    import torch

    stopped = len(log(out))
    assert torch.load(out / "model" / "train_state.pt", weights_only=True)["step"] == stopped < 150
    again = subprocess.run(job, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)  # the requeued job
    assert again.returncode == 0 and f"at step {stopped}" in again.stderr, again.stderr[-3000:]
    assert [r["step"] for r in log(out)] == list(range(1, 151))
    assert (tmp_path / "requeued").read_text().split() == ["requeue", "42"]  # finished: not requeued again
