"""Issue 22's workflows as users run them: one clear line where a switch or a path is wrong, a full
disk under log.jsonl named as such, and what cpu_gemv says it runs."""

import os
import subprocess
import sys

from test_train import ROOT, TINY, text_data, train  # noqa: F401  (fixture)
from test_train_faults import faults


def test_a_missing_ckpt_dir_is_named(text_data, tmp_path):
    r = train(*TINY, "--ckpt_dir", tmp_path / "nope", "--data", text_data, "--out_dir", tmp_path / "o", check=False)
    assert r.returncode == 1 and r.stderr.strip() == f"train.py: --ckpt_dir {tmp_path / 'nope'}: no such checkpoint directory"


def test_a_bad_kernels_switch_is_one_line_before_loading(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    for value, says in [("bogus", "LLAMA_KERNELS=bogus: expected triton or torch"),
                        ("triton", "LLAMA_KERNELS=triton on a cpu tensor: Triton needs CUDA")]:
        r = subprocess.run([sys.executable, "generate.py", "--ckpt_dir", tmp_path / "nope", "--prompt", "x"], cwd=ROOT,
                           capture_output=True, text=True, env={**env, "LLAMA_KERNELS": value})
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert r.stderr.startswith(f"generate.py: {says}"), r.stderr


def test_cpu_gemv_status_says_torch_mv_under_llama_kernels_torch():
    r = subprocess.run([sys.executable, "-c", "import cpu_gemv; print(cpu_gemv.status())"], cwd=ROOT,
                       capture_output=True, text=True, env={**os.environ, "LLAMA_KERNELS": "torch"})
    assert r.stdout.strip() == "torch.mv (LLAMA_KERNELS=torch)", r.stderr


def test_a_full_disk_under_log_jsonl_is_one_line_naming_it(text_data, tmp_path):
    out_dir = tmp_path / "o"
    r = faults("log_full", 1, *TINY, "--data", text_data, "--out_dir", out_dir, "--max_steps", 3)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith(f"train.py: disk full while appending step 2 to {out_dir / 'log.jsonl'}"), line
