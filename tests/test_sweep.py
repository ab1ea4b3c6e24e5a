"""sweep.py on tiny models: a grid's combinations, Optuna pruning a hopeless trial, kill -9 and
the same command again (each trial once, in the trials and in mlflow), and one line per bad YAML."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

import sweep as sweep_module
from cli import UserError

from test_train import TINY, ROOT, text_data  # noqa: F401 (text_data: the tiny corpus, a fixture)

FAST = [*TINY, "--batch_size", "2", "--log_every", "50"]


def flags(data, **more):
    """TINY as the YAML's flags mapping."""
    words = FAST[:]
    out = {words[i][2:]: words[i + 1] for i in range(0, len(words), 2)}
    return {**out, "data": str(data), **more}


def write_yaml(path, **spec):
    path.write_text(yaml.safe_dump(spec))
    return path


def sweep(*args, env=None, check=True):
    out = subprocess.run([sys.executable, "sweep.py", *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, **(env or {})}, timeout=600)
    if check:
        assert out.returncode == 0, out.stderr[-3000:]
    return out


def records(d):
    return {name[:-5]: json.load(open(d / "trials" / name)) for name in sorted(os.listdir(d / "trials"))
            if name.endswith(".json")}


def steps(out_dir):
    return [json.loads(line)["step"] for line in open(out_dir / "log.jsonl")]


def test_dry_run_lists_every_combination_with_tied_flags(tmp_path):
    y = write_yaml(tmp_path / "s.yaml", dir=str(tmp_path / "s"), launcher="python", flags={"data": str(tmp_path)},
                   grid={"lr": [3e-4, 1e-3], "lora_rank,lora_alpha": [[4, 8], [8, 16], [16, 32]]},
                   objective={"metric": "val_loss", "direction": "minimize"})
    lines = sweep(y, "--dry_run").stdout.splitlines()
    assert len(lines) == 6
    got = set()
    for i, line in enumerate(lines):
        words = line.split()
        assert words[-2:] == ["--out_dir", str(tmp_path / "s" / f"trial-{i + 1:04d}")]
        value = {w[2:]: words[j + 1] for j, w in enumerate(words) if w.startswith("--")}
        got.add((value["lr"], value["lora_rank"], value["lora_alpha"]))
    assert got == {(lr, r, a) for lr in ("0.0003", "0.001") for r, a in (("4", "8"), ("8", "16"), ("16", "32"))}
    assert not (tmp_path / "s").exists()  # a dry run writes nothing


def test_kill_9_then_the_same_command_runs_each_trial_once_with_mlflow_tree(text_data, tmp_path):
    d = tmp_path / "lr"
    y = write_yaml(tmp_path / "lr.yaml", dir=str(d), launcher="python",
                   flags=flags(text_data, max_steps=60, eval_every=10, mlflow="true", save_every=10),
                   grid={"lr": [3e-3, 1e-3]}, objective={"metric": "val_loss", "direction": "minimize"})
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    proc = subprocess.Popen([sys.executable, "sweep.py", str(y)], cwd=ROOT, env={**os.environ, **env},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log, deadline = d / "trial-0001" / "log.jsonl", time.time() + 120
    while time.time() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 15):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    out = sweep(y, env=env)
    rec = records(d)
    assert sorted(rec) == ["trial-0001", "trial-0002"]
    assert [r["state"] for r in rec.values()] == ["FINISHED", "FINISHED"]
    assert rec["trial-0001"]["attempts"] == 2 and rec["trial-0002"]["attempts"] == 1
    for name in rec:
        assert steps(d / name) == list(range(1, 61))  # resumed: every step once
    assert "| trial-000" in out.stdout and (d / "summary.md").exists() and (d / "intermediate.png").exists()

    from mlflow import MlflowClient

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and parents[0].info.run_name == "lr"
    assert sorted(r.info.run_name for r in children) == ["trial-0001", "trial-0002"]
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}
    assert sorted(float(r.data.params["lr"]) for r in children) == [1e-3, 3e-3]
    assert all(r.info.status == "FINISHED" and "val_loss" in r.data.metrics for r in children)


def test_optuna_prunes_a_hopeless_trial(text_data, tmp_path):
    import optuna

    d = tmp_path / "opt"
    y = write_yaml(tmp_path / "opt.yaml", dir=str(d), flags=flags(text_data, max_steps=400, eval_every=4),
                   optuna={"trials": 6, "seed": 6, "pruner": {"name": "median", "n_startup_trials": 1},
                           "params": {"lr": {"choices": [3e-3, 1e-9]}}},
                   objective={"metric": "val_loss", "direction": "minimize"})
    sweep(y)
    study = optuna.load_study(study_name="opt", storage=f"sqlite:///{d / 'study.db'}")
    trials = study.get_trials()
    assert len(trials) == 6
    pruned = [t for t in trials if t.state == optuna.trial.TrialState.PRUNED]
    assert pruned and all(t.params["lr"] == 1e-9 for t in pruned)
    for t in pruned:
        assert records(d)[f"trial-{t.number + 1:04d}"]["state"] == "PRUNED"
        assert steps(d / f"trial-{t.number + 1:04d}")[-1] < 400  # its log ends early
    assert study.best_trial.params["lr"] == 3e-3


@pytest.mark.parametrize("spec, message", [
    ({"grid": {"lrr": [1e-3]}}, "unknown train.py flag 'lrr'"),
    ({"grid": {"lr": [1e-3]}, "flags": {"bogus": 1}}, "unknown train.py flag 'bogus'"),
    ({"optuna": {"trials": 2, "params": {"nope": {"low": 1, "high": 2}}}}, "unknown train.py flag 'nope'"),
    ({"grid": {}}, "the grid is empty"),
    ({"grid": {"lr": [1e-3]}, "objective": None}, "objective is missing"),
    ({"grid": {"lr": [-1]}}, "--lr must be positive"),
    ({"grid": {"out_dir": ["x"]}}, "the sweep's to set"),
    ({"grid": {"lr": [1e-3]}, "objective": {"metric": "auroc", "direction": "maximize"}}, "no trial reports"),
])
def test_bad_yaml_is_one_line_and_starts_nothing(tmp_path, spec, message):
    base = {"dir": str(tmp_path / "s"), "flags": {"data": str(tmp_path)},
            "objective": {"metric": "val_loss", "direction": "minimize"}}
    y = write_yaml(tmp_path / "s.yaml", **{**base, **spec})
    out = sweep(y, check=False)
    assert out.returncode != 0 and message in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "s").exists()


def test_a_heads_validation_metrics_are_objectives():
    """train.py --head classify logs val_<metric> for its task (train.evaluate_head): each one is an
    objective a sweep may name; a metric no head logs is not."""
    for metric in ("val_auroc", "val_macro_auroc", "val_macro_f1", "val_auprc", "val_precision_at_5", "val_auroc_ovo",
                   "val_f1", "val_precision", "val_recall", "val_f1_strict", "val_token_accuracy"):  # and --head tag's
        assert sweep_module.objective("s.yaml", {"objective": {"metric": metric, "direction": "maximize"}}) == \
            (metric, "maximize", "log")
    for metric in ("val_labels_skipped", "val_aurc", "auroc"):
        with pytest.raises(UserError, match="no trial reports"):
            sweep_module.objective("s.yaml", {"objective": {"metric": metric, "direction": "maximize"}})


def test_a_dir_holding_something_else_and_a_changed_yaml_are_refused(tmp_path):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "notes.txt").write_text("mine")
    spec = {"dir": str(tmp_path / "s"), "flags": {"data": str(tmp_path / "missing"), "mlflow": False},
            "grid": {"lr": [1e-3]}, "objective": {"metric": "val_loss", "direction": "minimize"}}
    out = sweep(write_yaml(tmp_path / "s.yaml", **spec), check=False)
    assert out.returncode == 1 and "holds something else" in out.stderr and len(out.stderr.splitlines()) == 1
    assert sorted(os.listdir(tmp_path / "s")) == ["notes.txt"]
    y = write_yaml(tmp_path / "t.yaml", **{**spec, "dir": str(tmp_path / "t")})
    out = sweep(y, check=False)  # its one trial fails (no such --data): recorded, the sweep goes on
    assert records(tmp_path / "t")["trial-0001"]["state"] == "FAILED"
    assert "no such directory" in records(tmp_path / "t")["trial-0001"]["error"]
    write_yaml(y, **{**spec, "dir": str(tmp_path / "t"), "grid": {"lr": [1e-3, 2e-3]}})
    out = sweep(y, check=False)
    assert out.returncode == 1 and "has changed" in out.stderr and len(out.stderr.splitlines()) == 1


def test_a_trial_runs_on_two_torchrun_ranks(text_data, tmp_path):
    """The YAML's launcher makes every trial distributed: its train.py runs on 2 gloo ranks."""
    d = tmp_path / "ddp"
    y = write_yaml(tmp_path / "ddp.yaml", dir=str(d), launcher="torchrun --nproc_per_node 2 --standalone",
                   flags=flags(text_data, max_steps=4, eval_every=4), grid={"lr": [3e-3]},
                   objective={"metric": "val_loss", "direction": "minimize"})
    sweep(y)
    (rec,) = records(d).values()
    assert rec["state"] == "FINISHED", rec
    assert "2 rank(s)" in (d / "trials" / "trial-0001.err").read_text()
    assert steps(d / "trial-0001") == [1, 2, 3, 4]


def test_two_sweep_processes_share_one_study_each_trial_once(text_data, tmp_path):
    import optuna

    d = tmp_path / "shared"
    y = write_yaml(tmp_path / "shared.yaml", dir=str(d), flags=flags(text_data, max_steps=3, eval_every=3),
                   optuna={"trials": 4, "seed": 0, "pruner": "none", "params": {"lr": {"low": 1e-4, "high": 1e-2,
                                                                                         "log": True}}},
                   objective={"metric": "val_loss", "direction": "minimize"})
    workers = [subprocess.Popen([sys.executable, "sweep.py", str(y)], cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [w.communicate(timeout=600) for w in workers]
    assert all(w.returncode == 0 for w in workers), [err[-2000:] for _, err in outs]
    study = optuna.load_study(study_name="shared", storage=f"sqlite:///{d / 'study.db'}")
    finished = [t for t in study.get_trials() if t.state == optuna.trial.TrialState.COMPLETE]
    assert 4 <= len(finished) <= 5  # a worker may start one trial past the count as the other finishes
    trial_dirs = sorted(p.name for p in d.iterdir() if p.name.startswith("trial-"))
    assert len(trial_dirs) == len(finished)
    for name in trial_dirs:  # each trial ran once: one run of max_steps steps in its log
        assert steps(d / name) == [1, 2, 3], name


def test_worker_k_of_n_splits_a_grid(text_data, tmp_path):
    d = tmp_path / "split"
    y = write_yaml(tmp_path / "split.yaml", dir=str(d), flags=flags(text_data, max_steps=2, eval_every=2),
                   grid={"lr": [1e-3, 2e-3, 3e-3]}, objective={"metric": "val_loss", "direction": "minimize"})
    sweep(y, "--worker", "1/2")
    assert sorted(records(d)) == ["trial-0001", "trial-0003"]
    sweep(y, "--worker", "2/2")
    rec = records(d)
    assert sorted(rec) == ["trial-0001", "trial-0002", "trial-0003"]
    assert all(r["state"] == "FINISHED" for r in rec.values())


def test_an_eval_objective_is_read_from_each_trials_results(text_data, tmp_path):
    d = tmp_path / "ev"
    y = write_yaml(tmp_path / "ev.yaml", dir=str(d), flags=flags(text_data, max_steps=2, eval_every=2),
                   grid={"lr": [1e-3, 3e-3]}, eval=f"eval.py --task perplexity --data {text_data} --mlflow false",
                   objective={"metric": "perplexity", "direction": "minimize"})
    out = sweep(y)
    rec = records(d)
    for name, r in rec.items():
        results = json.load(open(d / name / "results.json"))
        assert r["state"] == "FINISHED" and r["objective"] == pytest.approx(results["metrics"]["perplexity"]), r
    best = min(rec, key=lambda name: rec[name]["objective"])
    assert best in out.stdout
