"""Did the fine-tune help? Base against fine-tuned on the same records, with paired statistics.

    python report.py base.json tuned.json [more.json] [--out DIR] [--train_dir OUT_DIR]
    python eval.py ... --adapter DIR --out R.json --compare_baseline       # scores both, then this

Reads eval.py's results files (the first is the base; each later one is compared with it) and
writes DIR (default: the second file's name without .json, plus _report) as a whole:
    report.md     the metrics table (base, fine-tuned, difference, 95% CI, p), the plots, what
                  produced each side (command, checkpoint, adapter, data digest), the records that
                  changed most
    report.json   {"metrics": {name: {"base", "tuned", "delta", "ci": [lo, hi], "p", "skipped"}}, ...}
    *.png         by task: ROC and precision-recall (classify), f1 per entity type (tag), accuracy by answer (choice), ROUGE-L
                  per item (generate), P@10 per query (rank), loss per record (perplexity); with
                  --train_dir the training curves of its log.jsonl

The paired bootstrap (sacrebleu's paired test, DESIGN.md "Reports"): rng = default_rng(seed); idx =
rng.choice(n, size=(resamples, n)) over the n records (queries for rank); on each row both models'
metric is recomputed by tasks.py on the same records, d_b = tuned_b - base_b; CI = the 2.5 and 97.5
percentiles of d; p = (#{b: |d_b - mean(d)| >= |d_obs|} + 1) / (resamples + 1), resamples counting
the rows where the metric is defined (AUROC of one class is not, and is skipped and counted).

Refused with one line: two sides with the same weights fingerprint (the adapter did not apply),
another task, other data (sha256), other records, an output directory that is or holds an input.

Reading guide, top to bottom:
    inputs      load_results, check_pair: the guards
    statistics  units_of, resample, paired_bootstrap: the rule above
    per record  record_scores, changed_most: what each record scored, and the largest changes
    plots       one function per task, and the training curves
    report      markdown, report.json, the directory written whole, mlflow, main
"""

import json
import math
import os

import numpy

import atomic
import common
import tasks
from cli import UsageError, UserError, at_least, command_line, non_empty, positive, run
from data.records import read_jsonl

COUNTS = {"n", "queries", "tokens", "bytes", "labels_skipped"}  # in metrics, but not scores to compare
LOWER_IS_BETTER = {"loss", "perplexity", "bits_per_byte", "invalid_transitions"}
TOP = 5  # records shown among the largest gains and the largest losses


# -----------------------------------------------------------------------------------------------
# Inputs: results files and the guards that make a comparison mean something


def load_results(path):
    """An eval.py results file, checked for the fields a report reads."""
    try:
        with open(path, encoding="utf-8") as f:
            results = json.load(f)
    except OSError as e:
        raise UserError(f"{path}: {e.strerror}") from None
    except ValueError as e:
        raise UserError(f"{path}: not a results file of eval.py ({e})") from None
    missing = [k for k in ("task", "metrics", "items", "checkpoint", "data") if k not in results]
    if not isinstance(results, dict) or missing:
        raise UserError(f"{path}: not a results file of eval.py (no {', '.join(missing) or 'object'})")
    if results["task"] == "rank" and any(i.get("relevance") is None for i in results["items"]):
        raise UserError(f"{path}: rank results scored with --qrels carry no relevance per item; "
                        f"the report recomputes P@10 from the items")
    return results


def item_key(task, item):
    """What identifies a record in a results file: its line number and its truth."""
    fields = ("answer", "answers", "reference", "query_id", "doc_id", "relevance", "tokens", "bytes", "words", "tags")
    return (str(item.get("line", "")).rpartition(":")[2],) + tuple(item.get(f) for f in fields)


def check_pair(base, tuned, base_path, tuned_path):
    """Refuse a comparison that would not compare the same records under two different weights."""
    if base["task"] != tuned["task"]:
        raise UserError(f"{tuned_path} is task {tuned['task']}, {base_path} is task {base['task']}: "
                        f"a report compares results of one task")
    if base["data"].get("sha256") != tuned["data"].get("sha256"):
        raise UserError(f"{tuned_path} scored other data than {base_path} (sha256 {tuned['data'].get('sha256')} "
                        f"of {tuned['data'].get('path')}, not {base['data'].get('sha256')})")
    keys = [[item_key(r["task"], i) for i in r["items"]] for r in (base, tuned)]
    if keys[0] != keys[1]:
        where = next((k for k, (a, b) in enumerate(zip(*keys)) if a != b), min(map(len, keys)))
        raise UserError(f"{tuned_path} and {base_path} hold other records ({len(keys[1])} and {len(keys[0])} "
                        f"items; first difference at item {where + 1})")
    if base["task"] == "tag" and base.get("labels") != tuned.get("labels"):
        raise UserError(f"{tuned_path} and {base_path} come from tag heads with other labels "
                        f"({','.join(tuned.get('labels') or [])[:80]} against {','.join(base.get('labels') or [])[:80]})")
    fingerprint = base["checkpoint"].get("weights_fingerprint")
    if fingerprint is not None and fingerprint == tuned["checkpoint"].get("weights_fingerprint"):
        raise UserError(f"{tuned_path} and {base_path} have the same weights fingerprint {fingerprint}: the "
                        f"adapter did not change the model (not applied, or a no-op); nothing to compare")


def task_of(results):
    """The tasks.py task that recomputes the results' metrics (classify's label count from the items;
    a classification head's results carry "labels" and "multilabel": tasks.HeadClassify; a tag
    head's "labels": tasks.Tag)."""
    items = results["items"]
    if results["task"] == "tag":
        return tasks.Tag(tasks.Options(labels=None), results["labels"])
    labels = results.get("labels") or [str(k) for k in range(len(items[0].get("probabilities", [0, 0])))]
    if "multilabel" in results:
        return tasks.HeadClassify(tasks.Options(labels=labels), labels, results["multilabel"])
    return tasks.REGISTRY[results["task"]](tasks.Options(labels=labels))


def metric_names(metrics):
    return [k for k, v in metrics.items() if k not in COUNTS and (v is None or isinstance(v, (int, float)))]


# -----------------------------------------------------------------------------------------------
# Statistics: the paired bootstrap, over records (over queries for rank)


def units_of(task, items):
    """The resampled units: lists of item indices, one per record, or for rank one per query."""
    if task != "rank":
        return [[k] for k in range(len(items))]
    queries = {}
    for k, item in enumerate(items):
        queries.setdefault(item["query_id"], []).append(k)
    return list(queries.values())


def resample(items, units, row):
    """The items of the units in row; a query drawn twice is two queries (renamed #1, #2, ...)."""
    picked = []
    for copy, u in enumerate(row):
        for k in units[u]:
            item = items[k]
            picked.append({**item, "query_id": f"{item['query_id']}#{copy}"} if "query_id" in item else item)
    return picked


def metrics_or_none(job, items):
    """The task's metrics on items; {} where none is defined (rank with no judged query, say)."""
    try:
        return job.metrics(items)
    except (UserError, ValueError, ZeroDivisionError):
        return {}


def paired_bootstrap(job, base, tuned, names, seed=12345, resamples=1000):
    """{name: {"base", "tuned", "delta", "ci", "p", "skipped"}} over the same resampled units."""
    units = units_of(base["task"], base["items"])
    rng = numpy.random.default_rng(seed)
    idx = rng.choice(len(units), size=(resamples, len(units)), replace=True)
    diffs = {name: [] for name in names}
    for row in idx:
        b = metrics_or_none(job, resample(base["items"], units, row))
        t = metrics_or_none(job, resample(tuned["items"], units, row))
        for name in names:
            if b.get(name) is not None and t.get(name) is not None:
                diffs[name].append(t[name] - b[name])
    return {name: summary(base["metrics"].get(name), tuned["metrics"].get(name), diffs[name], resamples)
            for name in names}


def summary(base, tuned, d, resamples):
    """One metric's row: the observed values and difference, the CI and p of the resampled d."""
    row = {"base": base, "tuned": tuned, "delta": None, "ci": None, "p": None, "skipped": resamples - len(d)}
    if base is None or tuned is None:
        return row
    row["delta"] = tuned - base
    if d:
        d = numpy.asarray(d, dtype=numpy.float64)
        row["ci"] = [float(v) for v in numpy.percentile(d, [2.5, 97.5])]
        row["p"] = float((numpy.sum(numpy.abs(d - d.mean()) >= abs(row["delta"])) + 1) / (len(d) + 1))
    return row


# -----------------------------------------------------------------------------------------------
# Per record: what each record scored (higher is better), and the records that changed most


def record_scores(task, items, labels=()):
    """[(record label, score)]: choice correct (0/1), classify the truth's probability (multilabel:
    the mean over labels of the probability of each label's truth, on or off), generate ROUGE-L,
    perplexity minus the loss per token, tag the share of the sentence's scored words (truth one of
    the labels: not ignored) tagged right; rank: one entry per query, its P@10."""
    if task == "rank":
        ranked = tasks.ranked_queries(items)
        grades = {(i["query_id"], i["doc_id"]): i["relevance"] for i in items}
        judged = {}
        for i in items:
            judged.setdefault(i["query_id"], []).append(i["relevance"])
        return [(q, tasks.query_measures([grades[(q, d)] for d, _ in docs], judged[q])["P@10"])
                for q, docs in ranked.items()]
    score = {"choice": lambda i: float(i["prediction"] == i["answer"]),
             "classify": truth_probability,
             "generate": lambda i: tasks.rouge_fmeasures(i["reference"], i["completion"])[2],
             "perplexity": lambda i: -i["nll"] / max(i["tokens"], 1),
             "tag": lambda i: words_right(i, set(labels))}[task]
    return [(str(i.get("line", k + 1)), score(i)) for k, i in enumerate(items)]


def words_right(item, labels):
    """A tag item's share of scored words (truth among labels) predicted right; 0 without any."""
    scored = [t == p for t, p in zip(item["tags"], item["predicted"]) if t in labels]
    return sum(scored) / len(scored) if scored else 0.0


def truth_probability(item):
    """A classify item's probability of its truth; multilabel ("answers"), the mean over its labels."""
    if "answers" not in item:
        return item["probabilities"][item["answer"]]
    on = set(item["answers"])
    return sum(p if k in on else 1 - p for k, p in enumerate(item["probabilities"])) / len(item["probabilities"])


def records_by_line(data_path):
    """{line number: record} of the scored data file, where it is still there and JSONL."""
    try:
        return {where.rpartition(":")[2]: record for where, record in read_jsonl(data_path, None, "--data")}
    except (OSError, ValueError):
        return {}


def changed_most(base, tuned, top=TOP):
    """The largest gains and losses: [{"record", "base", "tuned", "change", "prompt", "reference",
    "base_output", "tuned_output"}], gains first."""
    task = base["task"]
    labels = base.get("labels") or ()
    pairs = zip(record_scores(task, base["items"], labels), record_scores(task, tuned["items"], labels))
    rows = [{"record": label, "base": b, "tuned": t, "change": t - b, "index": k}
            for k, ((label, b), (_, t)) in enumerate(pairs)]
    rows.sort(key=lambda r: r["change"])
    gains = [r for r in reversed(rows[-top:]) if r["change"] > 0]
    losses = [r for r in rows[:top] if r["change"] < 0]
    records = records_by_line(base["data"].get("path", "")) if task not in ("rank", "tag") else {}  # tag: items say it
    for row in gains + losses:
        row.update(describe(task, base["items"], tuned["items"], row.pop("index"), records))
    return gains + losses


def describe(task, base_items, tuned_items, k, records):
    """Prompt, reference and both outputs of one changed record, as far as the results say them."""
    if task == "rank":
        return {}
    b, t = base_items[k], tuned_items[k]
    record = records.get(str(b.get("line", "")).rpartition(":")[2], {})
    prompt = next((record[f] for f in ("prompt", "instruction", "question", "text") if f in record), "")
    if task == "generate":
        return {"prompt": prompt, "reference": b["reference"], "base_output": b["completion"],
                "tuned_output": t["completion"]}
    if task == "tag":
        return {"prompt": " ".join(b["words"]), "reference": " ".join(b["tags"]),
                "base_output": " ".join(b["predicted"]), "tuned_output": " ".join(t["predicted"])}
    if task == "perplexity":
        return {"prompt": prompt, "base_output": f"loss {b['nll'] / max(b['tokens'], 1):.4f}",
                "tuned_output": f"loss {t['nll'] / max(t['tokens'], 1):.4f}"}
    if "answers" in b:  # a multilabel head: label indices, those at probability >= 0.5 predicted
        on = lambda item: ",".join(str(k) for k, p in enumerate(item["probabilities"]) if p >= 0.5)
        return {"prompt": prompt, "reference": ",".join(map(str, b["answers"])), "base_output": on(b),
                "tuned_output": on(t)}
    choices = record.get("choices") or list(record.get("options", {})) or None
    name = (lambda j: choices[j]) if choices and all(j < len(choices) for j in (b["answer"], b["prediction"],
                                                                                  t["prediction"])) else str
    return {"prompt": prompt, "reference": name(b["answer"]), "base_output": name(b["prediction"]),
            "tuned_output": name(t["prediction"])}


# -----------------------------------------------------------------------------------------------
# Plots (matplotlib without a display): one per task, both models on the same axes


def figure():
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    return pyplot


def save(pyplot, fig, out_dir, name, title):
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, name), dpi=100)
    pyplot.close(fig)
    return name


def plot_classify(base, tuned, out_dir, names):
    """ROC and precision-recall of both models (the first label positive, a head's second; several
    labels: micro-averaged one-vs-rest, multilabel over every (record, label)); with more than two
    labels, one each, also each model's confusion matrix."""
    from sklearn.metrics import confusion_matrix, precision_recall_curve, roc_curve

    pyplot = figure()
    fig, (roc, pr) = pyplot.subplots(1, 2, figsize=(10, 4.5))
    for side, results in (("base", base), ("fine-tuned", tuned)):
        truth, probs = curve_inputs(results["items"], positive=1 if "multilabel" in results else 0)
        if len(set(truth.tolist())) < 2:
            continue  # one class: no curve
        fpr, tpr, _ = roc_curve(truth, probs)
        precision, recall, _ = precision_recall_curve(truth, probs)
        roc.plot(fpr, tpr, label=side)
        pr.plot(recall, precision, label=side)
    roc.plot([0, 1], [0, 1], ":", color="grey")
    roc.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC")
    pr.set(xlabel="recall", ylabel="precision", title="precision-recall")
    roc.legend(), pr.legend()
    made = [save(pyplot, fig, out_dir, "roc_pr.png", f"{names[1]} against {names[0]}")]
    n_labels = len(base["items"][0]["probabilities"])
    if n_labels > 2 and not base.get("multilabel"):
        fig, axes = pyplot.subplots(1, 2, figsize=(10, 4.5))
        for ax, side, results in zip(axes, ("base", "fine-tuned"), (base, tuned)):
            matrix = confusion_matrix([i["answer"] for i in results["items"]],
                                      [i["prediction"] for i in results["items"]], labels=list(range(n_labels)))
            ax.imshow(matrix, cmap="Blues")
            ax.set(xlabel="predicted", ylabel="truth", title=side)
        made.append(save(pyplot, fig, out_dir, "confusion.png", "confusion matrices"))
    return made


def curve_inputs(items, positive=0):
    """(truth 0/1, score) for the curves: the positive label's probability against "is the
    positive label"; with more labels (or multilabel "answers") every (item, label) pair,
    micro-averaged."""
    probs = numpy.asarray([i["probabilities"] for i in items], dtype=numpy.float64)
    truth = numpy.zeros_like(probs)
    for row, item in enumerate(items):
        truth[row, item["answers"] if "answers" in item else item["answer"]] = 1
    if probs.shape[1] == 2 and "answers" not in items[0]:
        return truth[:, positive], probs[:, positive]
    return truth.ravel(), probs.ravel()


def plot_bars(base, tuned, out_dir, names, groups, ylabel, name, title):
    """Two bars per group: base and fine-tuned. groups: [(label, base value, tuned value)]."""
    pyplot = figure()
    fig, ax = pyplot.subplots(figsize=(max(5, 0.5 * len(groups) + 2), 4))
    x = numpy.arange(len(groups))
    ax.bar(x - 0.2, [g[1] for g in groups], 0.4, label=f"base ({names[0]})")
    ax.bar(x + 0.2, [g[2] for g in groups], 0.4, label=f"fine-tuned ({names[1]})")
    ax.set_xticks(x, [g[0] for g in groups], rotation=45 if len(groups) > 8 else 0)
    ax.set(ylabel=ylabel)
    ax.legend()
    return [save(pyplot, fig, out_dir, name, title)]


def plot_choice(base, tuned, out_dir, names):
    by_answer = {}
    for b, t in zip(base["items"], tuned["items"]):
        by_answer.setdefault(b["answer"], []).append((b["prediction"] == b["answer"], t["prediction"] == t["answer"]))
    groups = [(f"answer {a}", numpy.mean([c[0] for c in v]), numpy.mean([c[1] for c in v]))
              for a, v in sorted(by_answer.items())]
    return plot_bars(base, tuned, out_dir, names, groups, "accuracy", "accuracy_by_answer.png",
                     "accuracy by the correct choice's position")


def plot_rank(base, tuned, out_dir, names):
    groups = [(q, b, t) for (q, b), (_, t) in zip(record_scores("rank", base["items"]),
                                                 record_scores("rank", tuned["items"]))]
    return plot_bars(base, tuned, out_dir, names, groups, "P@10", "p_at_10_per_query.png", "P@10 per query")


def plot_distribution(base, tuned, out_dir, names):
    """generate: ROUGE-L per record; perplexity: loss per token of each record; both models."""
    pyplot = figure()
    task = base["task"]
    sign, xlabel = (1, "ROUGE-L F per record") if task == "generate" else (-1, "loss per token of each record")
    fig, ax = pyplot.subplots(figsize=(6, 4))
    values = [[sign * s for _, s in record_scores(task, r["items"])] for r in (base, tuned)]
    bins = numpy.histogram_bin_edges(values[0] + values[1], bins=20)
    ax.hist(values[0], bins=bins, alpha=0.5, label=f"base ({names[0]})")
    ax.hist(values[1], bins=bins, alpha=0.5, label=f"fine-tuned ({names[1]})")
    ax.set(xlabel=xlabel, ylabel="records")
    ax.legend()
    name = "rouge_l_per_record.png" if task == "generate" else "loss_per_record.png"
    return [save(pyplot, fig, out_dir, name, xlabel)]


def plot_tag(base, tuned, out_dir, names):
    """Each entity type's f1 (the types of either side's per-type table)."""
    tables = [r["metrics"].get("per_type") or {} for r in (base, tuned)]
    groups = [(t, *(table.get(t, {}).get("f1", 0.0) for table in tables)) for t in sorted(set(tables[0]) | set(tables[1]))]
    return plot_bars(base, tuned, out_dir, names, groups, "entity f1", "f1_per_type.png", "entity f1 per type")


PLOTS = {"classify": plot_classify, "tag": plot_tag, "choice": plot_choice, "rank": plot_rank,
         "generate": plot_distribution, "perplexity": plot_distribution}


def plot_training(train_dir, out_dir):
    """train and validation loss, learning rate and each eval_* metric against the step, from
    TRAIN_DIR/log.jsonl."""
    rows = read_log(os.path.join(train_dir, "log.jsonl"))
    keys = ["loss", "val_loss", "lr"] + sorted({k for r in rows for k in r if k.startswith("eval_")})
    keys = [k for k in keys if any(isinstance(r.get(k), (int, float)) for r in rows)]
    pyplot = figure()
    fig, axes = pyplot.subplots(len(keys), 1, figsize=(7, 2.2 * len(keys)), squeeze=False)
    for ax, key in zip(axes[:, 0], keys):
        points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and "step" in r]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="." if len(points) < 50 else None)
        ax.set(ylabel=key)
    axes[-1, 0].set(xlabel="step")
    return [save(pyplot, fig, out_dir, "training.png", f"training curves of {train_dir}")]


def read_log(path):
    try:
        with open(path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
    except OSError as e:
        raise UserError(f"--train_dir: {path}: {e.strerror}") from None
    except ValueError as e:
        raise UserError(f"--train_dir: {path}: not JSON lines ({e})") from None
    if not rows:
        raise UserError(f"--train_dir: {path} is empty")
    return rows


# -----------------------------------------------------------------------------------------------
# The report: markdown and JSON with the same numbers, written as one directory


def number(value, digits=4):
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) and math.isfinite(value) else str(value)


def metrics_table(rows):
    lines = ["| metric | base | fine-tuned | difference | 95% CI | p | skipped |", "|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        ci = f"[{number(r['ci'][0])}, {number(r['ci'][1])}]" if r["ci"] else "-"
        better = " (lower is better)" if name in LOWER_IS_BETTER else ""
        lines.append(f"| {name}{better} | {number(r['base'])} | {number(r['tuned'])} | {number(r['delta'])} | {ci} "
                     f"| {number(r['p'], 3)} | {r['skipped']} |")
    return lines


def sides_table(paths, results):
    lines = ["| side | results | command | checkpoint | adapter | weights fingerprint | data | data sha256 |",
             "|---|---|---|---|---|---|---|---|"]
    for k, (path, r) in enumerate(zip(paths, results)):
        c, d = r["checkpoint"], r["data"]
        cells = ["base" if k == 0 else "fine-tuned", path, f"`{r.get('command', '-')}`", c.get("dir"),
                 c.get("adapter") or "-", c.get("weights_fingerprint"), d.get("path"), d.get("sha256")]
        lines.append("| " + " | ".join(str(v).replace("|", "\\|") for v in cells) + " |")
    return lines


def changes_section(changes):
    if not changes:
        return ["No record changed its score."]
    lines = []
    for c in changes:
        lines.append(f"- **{'gain' if c['change'] > 0 else 'loss'} {c['change']:+.4f}** record {c['record']} "
                     f"(base {c['base']:.4f}, fine-tuned {c['tuned']:.4f})")
        for key, title in (("prompt", "prompt"), ("reference", "reference"), ("base_output", "base"),
                           ("tuned_output", "fine-tuned")):
            if key in c:
                lines.append(f"    - {title}: `{shorten(c[key])}`")
    return lines


def shorten(text, limit=300):
    text = " ".join(str(text).split()).replace("`", "'")
    return text if len(text) <= limit else text[:limit] + " …"


def markdown(report, paths, results, plots, command):
    """report.md: for each comparison its table, plots and changed records; the rule; the sides."""
    lines = [f"# Base against fine-tuned: {report['task']}", "", f"`{command}`", ""]
    for comparison in report["comparisons"]:
        lines += [f"## {comparison['tuned_results']} against {comparison['base_results']}", ""]
        lines += metrics_table(comparison["metrics"]) + [""]
        lines += [f"![{p}]({p})" for p in comparison["plots"]] + [""]
        lines += ["### The records that changed most", ""] + changes_section(comparison["changed_most"]) + [""]
    if plots:
        lines += ["## Training", ""] + [f"![{p}]({p})" for p in plots] + [""]
    lines += ["## How the intervals are computed", "", report["rule"], ""]
    lines += ["## What produced each side", ""] + sides_table(paths, results) + [""]
    return "\n".join(lines)


def rule_text(task, seed, resamples):
    unit = "queries (a query's documents stay together)" if task == "rank" else "records"
    return (f"Paired bootstrap over {unit}: rng = numpy.random.default_rng({seed}); idx = rng.choice(n, "
            f"size=({resamples}, n), replace=True); on each row both models' metric is recomputed on the same "
            f"resampled {unit} and d_b = tuned_b - base_b; 95% CI = numpy.percentile(d, [2.5, 97.5]); p = "
            f"(#{{b: |d_b - mean(d)| >= |d_obs|}} + 1) / (B + 1), B the resamples where the metric is defined "
            f"(sacrebleu's paired test). Resamples where a metric is undefined (AUROC with one class) are "
            f"skipped and counted in the table. Records are paired by line; both models scored the same ones.")


def compare(base, tuned, paths, out_dir, seed, resamples, prefix=False):
    """One comparison: its bootstrap rows, plots (written into out_dir) and changed records."""
    job = task_of(base)
    names = [n for n in metric_names(base["metrics"]) if n in tuned["metrics"]]
    rows = paired_bootstrap(job, base, tuned, names, seed, resamples)
    stems = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    plots = PLOTS[base["task"]](base, tuned, out_dir, stems)
    if prefix:  # several comparisons: each its own plot files
        plots = [rename_plot(out_dir, p, stems[1]) for p in plots]
    return {"base_results": paths[0], "tuned_results": paths[1], "metrics": rows, "plots": plots,
            "changed_most": changed_most(base, tuned)}


def rename_plot(out_dir, name, stem):
    """name prefixed with the fine-tuned side's stem, so that several comparisons keep their plots."""
    new = f"{stem}-{name}"
    os.replace(os.path.join(out_dir, name), os.path.join(out_dir, new))
    return new


def build(paths, out, train_dir=None, seed=12345, resamples=1000, command=""):
    """Check the results files, then write the report directory out whole. Returns report.json's
    content: {"metrics" (the first comparison's), "comparisons", "task", "seed", "resamples", "rule"}."""
    results = [load_results(p) for p in paths]
    for path, r in zip(paths[1:], results[1:]):
        check_pair(results[0], r, paths[0], path)
    report = {"task": results[0]["task"], "seed": seed, "resamples": resamples,
              "rule": rule_text(results[0]["task"], seed, resamples)}

    def write(tmp):
        report["comparisons"] = [compare(results[0], r, [paths[0], p], tmp, seed, resamples, len(paths) > 2)
                                 for p, r in zip(paths[1:], results[1:])]
        report["metrics"] = report["comparisons"][0]["metrics"]
        plots = plot_training(train_dir, tmp) if train_dir else []
        report["training_plots"] = plots
        with open(os.path.join(tmp, "report.json"), "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1, ensure_ascii=False)
            f.write("\n")
        with open(os.path.join(tmp, "report.md"), "w", encoding="utf-8") as f:
            f.write(markdown(report, paths, results, plots, command))

    atomic.write_dir(out, write)
    return report


def log_to_mlflow(experiment, out, report, prog="report.py"):
    """The report directory as artifacts and each difference as a metric; a tracking failure is one
    warning line (common.start_mlflow), the report already written stays."""
    params = {"task": report["task"], "seed": report["seed"], "resamples": report["resamples"],
              "base": report["comparisons"][0]["base_results"]}
    tracker = common.start_mlflow(experiment, os.path.basename(os.path.abspath(out)), params, prog=prog)
    if tracker is not None:
        tracker.log_metrics({f"delta_{k}": v["delta"] for k, v in report["metrics"].items() if v["delta"] is not None})
        tracker.artifact(out)
        tracker.end_run()


def default_out(tuned_path):
    stem = tuned_path[:-5] if tuned_path.endswith(".json") else tuned_path
    return stem + "_report"


def check_paths(paths, out, train_dir):
    if len(paths) < 2:
        raise UsageError("give two or more results files: BASE.json TUNED.json [more.json ...]")
    for path in paths:
        if not os.path.isfile(atomic.readable(path)):
            raise UserError(f"{path}: no such file")
    if train_dir is not None and not os.path.isdir(atomic.readable(train_dir)):
        raise UserError(f"--train_dir {train_dir}: no such directory")
    atomic.check_outputs({"--out": out}, [(f"results file {p}", p) for p in paths] + [("--train_dir", train_dir)])


CHECKS = {"out": non_empty, "train_dir": non_empty, "seed": at_least(0), "resamples": positive,
          "mlflow_experiment": non_empty}


def main(*results: str, out: str = None, train_dir: str = None, seed: int = 12345, resamples: int = 1000,
         mlflow: bool = True, mlflow_experiment: str = "llama"):
    """Compare eval.py results files: the first is the base, each later one is compared with it.

    Args:
        results: the results files, BASE.json TUNED.json [more.json ...], of one task on the same data.
        out: the report directory (replaced whole); default TUNED_report beside the second file.
        train_dir: a train.py --out_dir whose log.jsonl gives the training curves.
        seed: the paired bootstrap's seed (numpy.random.default_rng).
        resamples: the paired bootstrap's resamples.
        mlflow: log the report as artifacts to mlflow ($MLFLOW_TRACKING_URI or sqlite:///mlflow.db).
        mlflow_experiment: the mlflow experiment's name.
    """
    out = out or default_out(results[1] if len(results) > 1 else "report")
    check_paths(results, out, train_dir)
    report = build(list(results), out, train_dir, seed, resamples, command=command_line())
    print(f"report.py: wrote {os.path.join(out, 'report.md')}")
    for name, row in report["metrics"].items():
        print(f"  {name:<14} {number(row['base']):>10} -> {number(row['tuned']):>10}  p {number(row['p'], 3)}")
    if mlflow:
        log_to_mlflow(mlflow_experiment, out, report)


if __name__ == "__main__":
    run(main, prog="report.py", checks=CHECKS)
