"""Score a checkpoint (or a LoRA adapter on it) on the tasks medical fine-tuners report.

    python eval.py --ckpt_dir ~/llama/Llama3.1-8B --task choice --data medqa.jsonl
    python eval.py --ckpt_dir ~/llama/Llama3.1-8B --adapter out/notes/adapter --task classify \
        --data mortality.jsonl --labels yes,no
    python eval.py --ckpt_dir out/ner/model --task tag --data test.conll     # a tag head's checkpoint
    torchrun --nproc_per_node 8 eval.py ...          # records split across ranks, gathered on rank 0

Tasks (records are JSONL, one per line; tasks.py has each one's fields, scoring and metrics):
    choice      multiple choice (MedQA, PubMedQA): acc, acc_norm (lm-evaluation-harness scoring)
    classify    {"text", "label"} with --labels yes,no: accuracy, macro-F1, AUROC; on a checkpoint with a
                classification head no --labels: {"text", "label"} or {"text", "labels": [...]} scored
                by the head (results add "labels", "multilabel"; items "probabilities", "answer(s)")
    tag         on a checkpoint with a tag head: {"tokens": [words], "tags": [tags]} or a CoNLL file, as
                data.prepare reads them (IGN / --ignore_tags words unscored): entity precision, recall,
                f1 (seqeval's default mode, micro), f1_strict (IOB2), macro_f1, per_type, token_accuracy,
                invalid_transitions (results add "labels"; items "words", "tags", "predicted")
                (tag.py tags raw text and prints its entities with character offsets)
    rank        {"query_id", "doc_id", "text", "relevance"} (or --qrels): P@10, NDCG@10, MRR, MAP
    generate    {"prompt", "reference"} (or instruction/input/output): ROUGE-1/2/L, corpus BLEU
    perplexity  a shards directory (its val split) or JSONL {"text"}: loss, perplexity, bits per byte

Writes --out (default results.json) as {"task", "metrics", "items": [one per record, input order],
"command", "checkpoint", "data"}; prints a summary table on stdout and progress on stderr.
With --adapter DIR --compare_baseline it scores the base too (before merging the adapter into the
same weights): R.json (fine-tuned), R.base.json (base) and report.py's report in R_report/.

Reading guide, top to bottom:
    flags       task_options (the flags tasks read, as tasks.Options; tag_columns: --columns), checked_paths
                (the files)
    outputs     the data's digest, the results and run files, the summary table, mlflow
    compare     --compare_baseline: the base scored first, the adapter checked to change the weights
    main        the run: flags checked, records checked, the model loaded, tasks.evaluate, outputs
"""

import hashlib
import json
import os
import re
from types import SimpleNamespace

import atomic
import checkpoint
import cli
import common
import lora
import report
import tasks
from cli import UsageError, UserError, at_least, interval, non_empty, one_of, positive, run, torch_device
from data import prepare
from data.records import TAGGED_FIELDS
from data.shards import load_meta, shard_paths
from generate import apply_adapter, checked_ckpt_dir, load_for_sampling


# -----------------------------------------------------------------------------------------------
# Flags: what cli's per-flag checks cannot see


def task_options(task, labels=None, template=None, qrels=None, run_out=None, records=(None,) * 5,
                 ignore_tags=None, columns=None, **options):
    """tasks.Options from eval.py's flags: --template's escapes typed in a shell (\\n, \\t, \\\\)
    made characters and the template checked; --labels split and checked (classify without them:
    None, the head's labels; rank defaults to yes,no); --qrels and --run_out refused but for rank;
    records: (--text_column, --label_column, --label_separator, --max_len, --truncate), classify's
    (--max_len tag's too); ignore_tags, columns: tag's (tag_columns)."""
    if template is not None:  # typed in a shell, "\n" arrives as a backslash and an n
        template = re.sub(r"\\([nt\\])", lambda m: {"n": "\n", "t": "\t", "\\": "\\"}[m[1]], template)
        tasks.check_template(template)
    names = [s.strip() for s in (labels or "yes,no").split(",")]
    if len(set(names)) != len(names) or "" in names or len(names) < 2:
        raise UsageError(f"--labels must be two or more distinct, non-empty names, got {','.join(names)!r}")
    if task == "tag" and labels is not None:
        raise UsageError("--labels does not apply to --task tag: a tag head's labels come from its checkpoint")
    if task in ("classify", "tag") and labels is None:
        names = None  # a head's from its checkpoint; without a head, Classify.for_model asks for --labels
    for name, value in (("qrels", qrels), ("run_out", run_out)):
        if value is not None and task != "rank":
            raise UsageError(f"--{name} only applies to --task rank")
    record_flags = dict(zip(("text_column", "label_column", "label_separator", "max_len", "truncate"), records))
    given = [name for name, value in record_flags.items() if value is not None]
    if given and task != "classify" and (task != "tag" or given != ["max_len"]):
        raise UsageError(f"--{given[0]} only applies to --task classify (a classification head's records)"
                         + (" or --task tag" if given[0] == "max_len" else ""))
    if ignore_tags is not None:
        if task != "tag":
            raise UsageError("--ignore_tags only applies to --task tag")
        record_flags["ignore_tags"] = tuple(t.strip() for t in ignore_tags.split(",") if t.strip())
    if columns is not None:
        record_flags["columns"] = tag_columns(task, columns)
    return tasks.Options(template=template, labels=names, qrels=qrels, **options,
                         **{k: v for k, v in record_flags.items() if v is not None})


def tag_columns(task, columns):
    """--columns tokens=words,tags=ner_tags as data.prepare reads it: [(field, column)], a field not
    named read under its own name."""
    if task != "tag":
        raise UsageError("--columns only applies to --task tag (a tag head's records)")
    pairs = prepare.parse_columns(None, columns)
    other = [field for field, _ in pairs if field not in TAGGED_FIELDS]
    if other:
        raise UsageError(f"--columns: field '{other[0]}' is not a tagged record's (tokens, tags)")
    named = {field for field, _ in pairs}
    return pairs + [(field, field) for field in TAGGED_FIELDS if field not in named]


def checked_paths(ckpt_dir, data, outputs, inputs):
    """The checkpoint directory (default: the demo model), every path checked before anything loads:
    the inputs exist, and no output would overwrite an input (or another output). outputs: {flag:
    path}; inputs: {flag: path} besides these."""
    ckpt_dir = checked_ckpt_dir(ckpt_dir)
    if not os.path.exists(atomic.readable(data)):
        raise UserError(f"--data {data}: no such file or directory")
    atomic.check_outputs(outputs, {"--data": data, "--ckpt_dir": ckpt_dir, **inputs}, checkpoint.INPUT_FILES)
    return ckpt_dir


# -----------------------------------------------------------------------------------------------
# Outputs: the results file (rank 0 writes it once), the run file, the summary, mlflow


def sha256_of(path):
    """The file's sha256; for a shards directory that of its meta.json (which names every shard's
    tokenizer and counts), or, for llm.c / nano-llama31 shards without one, of the val shards
    perplexity scored, names and bytes."""
    if not os.path.isdir(path):
        return _sha256_of_files([path], named=False)
    if os.path.exists(os.path.join(path, "meta.json")):
        return _sha256_of_files([os.path.join(path, "meta.json")], named=False)
    return _sha256_of_files([p for p, _, _ in shard_paths(path, load_meta(path), "val")], named=True)


def _sha256_of_files(paths, named):
    digest = hashlib.sha256()
    for path in paths:
        if named:
            digest.update(os.path.basename(path).encode() + b"\0")
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def write_results(path, results):
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1, ensure_ascii=False)
            f.write("\n")

    atomic.write_file(path, write)


def write_text(path, text):
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic.write_file(path, write)


def summary_table(task, metrics, data):
    """The metrics, one a line; tag's per-type table (precision, recall, f1, support) after them."""
    rows = [(name, "-" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value))
            for name, value in metrics.items() if not isinstance(value, dict)]
    width = max(len(name) for name, _ in rows)
    lines = [f"{task} on {data}"] + [f"  {name:<{width}}  {value:>10}" for name, value in rows]
    per_type = metrics.get("per_type") or {}
    if per_type:
        wide = max(len("type"), *map(len, per_type))
        lines.append(f"  {'type':<{wide}}  {'precision':>9}  {'recall':>9}  {'f1':>9}  {'support':>7}")
        lines += [f"  {name:<{wide}}  {r['precision']:>9.4f}  {r['recall']:>9.4f}  {r['f1']:>9.4f}  {r['support']:>7}"
                  for name, r in per_type.items()]
    return "\n".join(lines)


def results_of(job, data, model, metrics, items, ckpt_dir, adapter):
    """The results file's content (with what the task adds: a head's labels); the weights'
    fingerprint is the model's as it scored."""
    weights = {"dir": ckpt_dir, "adapter": adapter, "weights_fingerprint": lora.base_fingerprint(model)}
    return {"task": job.name, **job.header(), "metrics": metrics, "items": items, "command": cli.command_line(),
            "checkpoint": weights, "data": {"path": data, "sha256": sha256_of(data)}}


def write_outputs(results, out, run_out):
    """The results file (and with --run_out the TREC run file), then the summary on stdout."""
    if run_out:
        write_text(run_out, tasks.run_file_text(results["items"]))
    write_results(out, results)
    print(summary_table(results["task"], results["metrics"], results["data"]["path"]))


# -----------------------------------------------------------------------------------------------
# --compare_baseline: the base scored, the adapter merged into the same model, the report


def comparison_paths(compare_baseline, adapter, quantize, out, report_dir):
    """(the base's results file, the report directory), or (None, None) without --compare_baseline."""
    if not compare_baseline:
        if report_dir is not None:
            raise UsageError("--report_dir only applies with --compare_baseline")
        return None, None
    if adapter is None:
        raise UsageError("--compare_baseline needs --adapter (the fine-tune to compare with its base)")
    if quantize is not None:  # the adapter stays beside NF4 weights: the fingerprint cannot tell it applied
        raise UsageError("--compare_baseline does not take --quantize yet; compare in bf16 or fp32")
    stem = out[:-5] if out.endswith(".json") else out
    return stem + ".base.json", report_dir or stem + "_report"


def score_base(job, model, tok, units, rank, world, what, adapting):
    """The base's results (the adapter not yet applied), then the adapter merged into the model and
    checked to have changed its weights. The base's results stay in memory until the fine-tune has
    been scored too: a refused comparison writes nothing. what: (the task, data, ckpt_dir); adapting:
    (adapter, force, quantize)."""
    metrics, items = tasks.evaluate(job, model, tok, units, rank, world)
    base = results_of(*what[:2], model, metrics, items, what[2], None)
    apply_adapter(model, tok, *adapting)
    check_adapter_changed(base, model, adapting[0])
    return base


def check_adapter_changed(base, model, adapter):
    if base["checkpoint"]["weights_fingerprint"] == lora.base_fingerprint(model):
        raise UserError(f"--adapter {adapter} did not change the model's weights (fingerprint "
                        f"{base['checkpoint']['weights_fingerprint']} before and after: a no-op adapter, its B "
                        f"all zero?); nothing to compare")


def log_to_mlflow(experiment, out, params, metrics):
    """The metrics in the same store as train.py's runs (a run named after --out). Names are made
    valid for mlflow there (P@10 -> P_at_10); a tracking failure is one warning line, and the
    results file, already written, stays."""
    tracker = common.start_mlflow(experiment, os.path.basename(os.path.abspath(out)), params, prog="eval.py")
    if tracker is not None:
        tracker.log_metrics({f"eval_{k}": v for k, v in metrics.items() if isinstance(v, (int, float))})
        tracker.end_run()


CHECKS = {"task": one_of(*tasks.NAMES), "data": non_empty, "ckpt_dir": non_empty, "adapter": non_empty, "out": non_empty,
          "max_examples": positive, "batch_size": positive, "max_new_tokens": positive,
          "temperature": interval("[0, inf)"), "top_p": interval("(0, 1]"), "seq_len": positive,
          "max_seq_len": positive, "seed": at_least(0), "device": torch_device,
          "dtype": one_of("bf16", "fp16", "fp32"), "quantize": one_of("nf4"), "mlflow_experiment": non_empty,
          "report_dir": non_empty, "text_column": non_empty, "label_column": non_empty,
          "label_separator": non_empty, "max_len": at_least(3), "truncate": one_of("start", "end"),
          "ignore_tags": non_empty, "columns": non_empty}


def main(task: str, data: str, ckpt_dir: str = None, adapter: str = None, out: str = "results.json",
         labels: str = None, template: str = None, chat: bool = False, max_examples: int = None,
         batch_size: int = 8, max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 0.9,
         seed: int = 0, seq_len: int = None, qrels: str = None, run_out: str = None, max_seq_len: int = None,
         tokenizer: str = None, device: str = None, dtype: str = None, quantize: str = None,
         force: bool = False, mlflow: bool = True, mlflow_experiment: str = "llama", compare_baseline: bool = False,
         report_dir: str = None, text_column: str = None, label_column: str = None, label_separator: str = None,
         max_len: int = None, truncate: str = None, ignore_tags: str = None, columns: str = None):
    """Evaluate a model on a task and write the results file.

    Args:
        task: choice, classify, tag, rank, generate or perplexity (see the top of tasks.py for each one's records).
        data: the records (JSONL; for a classification head also CSV/TSV/Parquet, for a tag head also
            CoNLL, as data.prepare reads them); for perplexity also a shards directory (its val split).
        ckpt_dir: Meta or HF checkpoint; default out/demo, the model `python train.py` makes.
        adapter: a LoRA adapter directory saved by train.py (merged into the weights).
        out: the results file: task, metrics, one item per record in input order, digests.
        labels: classify / rank: the label words in order, comma-separated (the first is the positive
            class); rank defaults to yes,no; a classification head's come from its checkpoint.
        template: the prompt with the record's fields in braces, e.g. "{text}\\nLabel:" (\\n and \\t
            typed in the shell are a newline and a tab; {{ and }} are literal braces). Only plain
            {field}s: attributes, indexes, !conversions and :format specs are refused.
        chat: lay each prompt out as a user turn in the tokenizer's chat format (instruct models).
        max_examples: only the first N records.
        batch_size: prompts per batch for generate, windows for perplexity, documents for a head, records
            for choice, classify and rank (their prompts decoded as one batch, then each record's answers
            as one batch from its prompt's cache).
        max_new_tokens, temperature, top_p, seed: generate: sampling as generate.py (default greedy).
        seq_len: perplexity: tokens per window (default the model's context).
        qrels: rank: a TREC qrels file to take relevance from instead of the records.
        run_out: rank: also write a TREC run file (qid Q0 docid rank score tag).
        max_seq_len: the context to build the model for; default the checkpoint's.
        tokenizer: a tokenizer.model to use instead of the one in ckpt_dir.
        device: cuda or cpu (default: cuda when available).
        dtype: bf16, fp16 or fp32, for the weights and the compute (default bf16 on CUDA; on a
            CPU the weights as the checkpoint stores them, computed in that dtype where the CPU is
            fast at it, else in fp32: cpu_paths.py).
        quantize: nf4 holds the base's projections in 4 bits (as a QLoRA run trained them).
        force: apply --adapter even to a base other than the one it was trained on.
        mlflow: log the metrics to mlflow ($MLFLOW_TRACKING_URI or sqlite:///mlflow.db).
        mlflow_experiment: the mlflow experiment's name.
        compare_baseline: with --adapter, also score the base on the same records (OUT.base.json).
        report_dir: --compare_baseline's report.py report (default: OUT without .json, plus _report).
        text_column: a head's records: the column (or field) holding the text (default: text).
        label_column: a head's records: the column (or field) holding the label(s) (default: label,
            or labels for a list).
        label_separator: a head's records: split each label cell into a list (multilabel), e.g. ';'.
        max_len, truncate: cut each of a head's documents to max_len tokens (default: the model's
            context), keeping its start (truncate start, the default) or its end, as data.prepare cuts;
            tag: a sentence of more tokens is split between words into pieces (as data.prepare splits).
        ignore_tags: tag: the tags whose words no metric scores (default IGN), comma-separated.
        columns: tag: the JSON fields (or Parquet columns) holding the words and the tags, e.g.
            tokens=words,tags=ner_tags (as data.prepare --columns; default tokens and tags).
    """
    run_eval(SimpleNamespace(**locals()))


def run_eval(f):
    """main's run, its flags as one namespace: flags checked, records checked, the model loaded,
    tasks.evaluate, outputs."""
    opts = task_options(f.task, f.labels, f.template, f.qrels, f.run_out, chat=f.chat, max_examples=f.max_examples,
                        batch_size=f.batch_size, max_new_tokens=f.max_new_tokens, temperature=f.temperature,
                        top_p=f.top_p, seed=f.seed, seq_len=f.seq_len,
                        records=(f.text_column, f.label_column, f.label_separator, f.max_len, f.truncate),
                        ignore_tags=f.ignore_tags, columns=f.columns)
    base_out, report_dir = comparison_paths(f.compare_baseline, f.adapter, f.quantize, f.out, f.report_dir)
    ckpt_dir = checked_paths(f.ckpt_dir, f.data, {"--out": f.out, "--run_out": f.run_out,
                                                  "the base's results": base_out, "--report_dir": report_dir},
                             {"--qrels": f.qrels, "--adapter": f.adapter, "--tokenizer": f.tokenizer})
    job = tasks.REGISTRY[f.task](opts)  # rank reads --qrels here
    rank, world, device = common.setup_distributed(f.device)
    units = None if job.needs_model else job.units(f.data)  # bad records stop the run before the model loads
    model, tok = load_for_sampling(os.path.expanduser(ckpt_dir), f.tokenizer, None if f.compare_baseline else f.adapter,
                                   device, f.dtype, f.max_seq_len, f.force, f.quantize)
    job, units = tasks.with_model(job, units, f.data, tok, model)  # classify: a head's task where there is one
    adapting = (f.adapter, f.force, f.quantize)
    base = score_base(job, model, tok, units, rank, world, (job, f.data, ckpt_dir), adapting) \
        if f.compare_baseline else None  # the base first, then the adapter merged into the same weights
    metrics, items = tasks.evaluate(job, model, tok, units, rank, world)
    if rank == 0:
        results = results_of(job, f.data, model, metrics, items, ckpt_dir, f.adapter)
        write_all(results, f.out, f.run_out, (base, base_out, report_dir), f.mlflow, f.mlflow_experiment)
    common.teardown()


def write_all(results, out, run_out, comparison, mlflow, mlflow_experiment):
    """Rank 0's outputs: the results (and run) file, mlflow, and with --compare_baseline the base's
    results and the report. comparison: (the base's results or None, its file, the report's directory)."""
    write_outputs(results, out, run_out)
    if mlflow:
        params = {"task": results["task"], "ckpt_dir": results["checkpoint"]["dir"],
                  "adapter": results["checkpoint"]["adapter"], "data": results["data"]["path"]}
        log_to_mlflow(mlflow_experiment, out, params, results["metrics"])
    base, base_out, report_dir = comparison
    if base is not None:
        write_report(base, base_out, out, report_dir, mlflow, mlflow_experiment)


def write_report(base, base_out, out, report_dir, mlflow, mlflow_experiment):
    """--compare_baseline's base results, then its report (report.py's, with its defaults)."""
    write_outputs(base, base_out, None)
    built = report.build([base_out, out], report_dir, command=cli.command_line())
    print(f"eval.py: wrote {os.path.join(report_dir, 'report.md')}")
    if mlflow:
        report.log_to_mlflow(mlflow_experiment, report_dir, built, prog="eval.py")


if __name__ == "__main__":
    run(main, prog="eval.py", checks=CHECKS)
