"""Score a checkpoint (or a LoRA adapter on it) on the tasks medical fine-tuners report.

    python eval.py --ckpt_dir ~/llama/Llama3.1-8B --task choice --data medqa.jsonl
    python eval.py --ckpt_dir ~/llama/Llama3.1-8B --adapter out/notes/adapter --task classify \
        --data mortality.jsonl --labels yes,no
    torchrun --nproc_per_node 8 eval.py ...          # records split across ranks, gathered on rank 0

Tasks (records are JSONL, one per line):
    choice      {"question", "choices": [..], "answer": i} (+ "context"), or MedQA's {"question",
                "options": {"A": ..}, "answer": "C"}: acc, acc_norm (lm-evaluation-harness scoring)
    classify    {"text", "label"} with --labels yes,no: accuracy, macro-F1, AUROC
    rank        {"query_id", "doc_id", "text", "relevance"}, one per (query, doc) pair (in --qrels too):
                P@10, NDCG@10, MRR, MAP (trec_eval's)
    generate    {"prompt", "reference"} (or instruction/input/output): ROUGE-1/2/L, corpus BLEU
    perplexity  a shards directory (its val split) or JSONL {"text"}: loss, perplexity, bits per byte

Writes --out (default results.json) as {"task", "metrics", "items": [one per record, input order],
"command", "checkpoint", "data"}; prints a summary table on stdout and progress on stderr.

Reading guide, top to bottom:
    records          reading JSONL, and each task's record turned into a prompt (bad ones: DataError)
    scoring          continuation log-likelihoods, lm-evaluation-harness's way, one prompt cache per record
    tasks            score_* (one item per record) and *_metrics (over all items)
    ranking          trec_eval's P@10, NDCG@10, reciprocal rank and average precision, by hand
    perplexity       over shards windows or JSONL texts
    the run          torchrun split and gather, the results file, the summary, main
    during training  what train.py --eval_task / --eval_data calls at each evaluation
"""

import hashlib
import json
import math
import os
import re
import sys
from types import SimpleNamespace

import torch
import torch.distributed as dist

import atomic
import checkpoint
import cli
import common
import jsonfile
import generate as sampling
from cli import UsageError, UserError, at_least, interval, non_empty, one_of, positive, run, torch_device

TASKS = ("choice", "classify", "rank", "generate", "perplexity")
DEFAULT_TEMPLATES = {
    "choice": "Question: {question}\nAnswer:",  # lm-evaluation-harness's default for question + choices
    "classify": "{text}\nAnswer:",
    "rank": "{text}\nRelevant:",
    "generate": "{prompt}",
}
CONTEXT_TEMPLATE = "Abstract: {context}\nQuestion: {question}\nAnswer:"  # PubMedQA, as lm-eval lays it out
RANK_QUERY_TEMPLATE = "Query: {query}\nDocument: {text}\nRelevant:"  # when records carry the query text


class DataError(UserError):
    """A record that cannot be evaluated: one line naming the file and line number."""


# -----------------------------------------------------------------------------------------------
# Records: JSONL lines, each turned into what its task scores


def read_jsonl(path, limit=None, flag="--data"):
    """[(where, record)] with where = "FILE:LINE", blank lines skipped; stops after limit records.
    flag: the option that named the file (train.py's is --eval_data)."""
    try:
        f = open(path, encoding="utf-8")
    except OSError as e:
        raise UserError(f"{flag} {path}: {e.strerror}") from None
    records = []
    with f:
        for number, line in enumerate(f, 1):
            if limit is not None and len(records) >= limit:
                break
            if not line.strip():
                continue
            where = f"{path}:{number}"
            record = jsonfile.loads(line, where, DataError)
            if not isinstance(record, dict):
                raise DataError(f"{where}: a record is a JSON object, got {type(record).__name__}")
            records.append((where, record))
    if not records:
        raise DataError(f"{path}: no records in it")
    return records


def need(record, name, where, kind=str):
    """record[name], which must be present and of type kind."""
    if name not in record:
        raise DataError(f"{where}: missing field {name!r}")
    value = record[name]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise DataError(f"{where}: field {name!r} should be {getattr(kind, '__name__', kind)}, got {value!r}")
    return value


def check_template(template):
    """The template, if it only substitutes record fields: plain {field}s, {{ and }} for braces.
    str.format would also follow {text.upper} or {text[0]} into the value, or apply {text!r} and
    format specs (which may nest fields), and put a bound method or a repr in every prompt."""
    import string

    try:
        fields = [(name, spec, conversion) for _, name, spec, conversion in string.Formatter().parse(template)
                  if name is not None]
    except ValueError as e:  # a lone { or }
        raise UsageError(f"--template {template!r}: {e}") from None
    for name, spec, conversion in fields:
        shown = "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
        if not name or name.isdigit():
            raise UsageError(f"--template {template!r}: {shown} names no field; write {{text}}, {{question}}, ...")
        if "." in name or "[" in name or conversion or spec:
            raise UsageError(f"--template {template!r}: {shown} reaches into a field or formats it; only plain "
                             f"{{field}} substitutions (and {{{{ }}}} for literal braces) are allowed")
    return template


def render(template, record, where):
    """The template (checked by check_template) with the record's fields filled in."""
    try:
        return template.format_map(record)
    except KeyError as e:
        raise DataError(f"{where}: --template needs field {e.args[0]!r}, which the record lacks") from None


def choice_example(record, where, template):
    """{"prompt", "choices", "answer": index}. MedQA-style options are listed in the prompt and
    their letters are what the model chooses between."""
    question = need(record, "question", where)
    if "options" in record:
        options = need(record, "options", where, dict)
        letters = list(options)
        listed = "".join(f"\n{letter}. {text}" for letter, text in options.items())
        prompt = render(template, record, where) if template else f"Question: {question}{listed}\nAnswer:"
        answer = need(record, "answer", where, (str, int))
        if isinstance(answer, int):
            answer = letters[answer] if 0 <= answer < len(letters) else answer
        if answer not in letters:
            raise DataError(f"{where}: answer {answer!r} is not one of the options {', '.join(letters)}")
        choices, index = letters, letters.index(answer)
    else:
        choices = need(record, "choices", where, list)
        index = need(record, "answer", where, int)
        if "context" in record and not template:
            template = CONTEXT_TEMPLATE
        prompt = render(template or DEFAULT_TEMPLATES["choice"], record, where)
    if not choices:
        raise DataError(f"{where}: the choice list is empty")
    if not all(isinstance(c, str) and c for c in choices):
        raise DataError(f"{where}: every choice must be a non-empty string")
    if not 0 <= index < len(choices):
        raise DataError(f"{where}: answer index {index} is out of range for {len(choices)} choices")
    return {"prompt": prompt, "choices": [str(c) for c in choices], "answer": index}


def label_example(record, where, template, labels, task, labels_from="--labels"):
    """classify / rank: {"prompt", "choices": labels, "answer": index or None, ...}. labels_from:
    where the labels came from, for the message (train.py has no --labels)."""
    if task == "rank":
        for name in ("query_id", "doc_id"):
            need(record, name, where, (str, int))
        if not template and "query" in record:
            template = RANK_QUERY_TEMPLATE
    need(record, "text", where)
    prompt = render(template or DEFAULT_TEMPLATES[task], record, where)
    example = {"prompt": prompt, "choices": labels, "answer": None}
    if task == "classify":
        label = str(need(record, "label", where, (str, int)))
        if label not in labels:
            raise DataError(f"{where}: label {label!r} is not one of {labels_from} {','.join(labels)}")
        example["answer"] = labels.index(label)
    else:
        example.update(query_id=str(record["query_id"]), doc_id=str(record["doc_id"]),
                       relevance=record.get("relevance"))
    return example


def generate_example(record, where, template):
    """{"prompt", "reference"}: the prompt/reference pair, or data.prepare's instruction fields."""
    if template:
        prompt = render(template, record, where)
    elif "prompt" in record:
        prompt = need(record, "prompt", where)
    else:
        prompt = need(record, "instruction", where)
        if record.get("input"):
            prompt += "\n\n" + need(record, "input", where)
    reference = need(record, "reference" if "reference" in record else "output", where)
    return {"prompt": prompt, "reference": reference}


def examples_for(task, records, template, labels, qrels, labels_from="--labels"):
    if task == "choice":
        examples = [choice_example(r, where, template) for where, r in records]
    elif task in ("classify", "rank"):
        examples = [label_example(r, where, template, labels, task, labels_from) for where, r in records]
    else:
        examples = [generate_example(r, where, template) for where, r in records]
    first = {}  # (query, doc) -> the line that judged it
    for (where, _), example in zip(records, examples):
        example["where"] = where
        if task != "rank":
            continue
        check_unique(first, (example["query_id"], example["doc_id"]), where)
        if qrels is None:
            relevance = example["relevance"]
            if not isinstance(relevance, int) or isinstance(relevance, bool):
                raise DataError(f"{where}: field 'relevance' should be an integer grade (or give --qrels)")
    return examples


def check_unique(first, pair, where):
    """Refuse a second line for the same (query, doc): the document would be retrieved (or judged)
    twice, each copy a hit, and average precision could pass 1 (MAP 2.0). first: pair -> where."""
    if pair in first:
        raise DataError(f"{where}: query {pair[0]!r} and doc {pair[1]!r} again (first at line "
                        f"{first[pair].rpartition(':')[2]}): one line per (query, doc) pair")
    first[pair] = where


# -----------------------------------------------------------------------------------------------
# Scoring: the log-likelihood of a continuation after a prompt, as lm-evaluation-harness computes it


def encode_pair(tok, context, continuation, chat):
    """(prompt ids, continuation ids). lm-eval's rule: trailing whitespace of the prompt moves to the
    continuation, and the continuation's tokens are those of encode(prompt + continuation) beyond
    encode(prompt), so a boundary the tokenizer would merge is scored as the model would read it.
    With chat the prompt is a dialog ending in an open assistant turn, which the answer starts."""
    if chat:
        dialog = [{"role": "user", "content": context}]
        return tok.encode_dialog(dialog), tok.encode(continuation.lstrip(), bos=False, eos=False)
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    prompt = tok.encode(context, bos=True, eos=False)
    return prompt, tok.encode(context + continuation, bos=True, eos=False)[len(prompt):]


@torch.inference_mode()
def continuation_logprobs(model, prompt, continuations):
    """Per-token log-probabilities of each continuation after the prompt (lists of token ids).

    The prompt goes through the model once, into row 0 of the KV cache; that row is copied to one
    row per continuation, and all continuations then run as one batch from the prompt's end.
    A long prompt with four short answers costs about one forward pass, not four."""
    n, longest, start = len(continuations), max(map(len, continuations)), len(prompt)
    device = model.tok_embeddings.weight.device
    model.setup_cache(n, start + longest)
    try:
        last = model.decode(torch.tensor([prompt], device=device), 0)[:, -1:]  # predicts each first token
        for layer in model.layers:
            cache = layer.attention.cache
            cache.k[1:n].copy_(cache.k[:1].expand(n - 1, -1, -1, -1))
            cache.v[1:n].copy_(cache.v[:1].expand(n - 1, -1, -1, -1))
        rows = torch.zeros(n, longest, dtype=torch.long, device=device)  # padding after a row is never read
        for i, c in enumerate(continuations):
            rows[i, : len(c)] = torch.tensor(c)
        logits = model.decode(rows, start)[:, :-1] if longest > 1 else last.new_empty(n, 0, last.shape[-1])
    finally:
        model.clear_cache()
    logprobs = torch.cat([last.expand(n, -1, -1), logits.float()], dim=1).log_softmax(-1)
    picked = logprobs.gather(-1, rows.unsqueeze(-1)).squeeze(-1)
    return [picked[i, : len(c)].tolist() for i, c in enumerate(continuations)]


def score_choices(model, tok, example, chat):
    """The summed log-likelihood of " " + each choice after the example's prompt."""
    context = model.args.max_seq_len
    pairs = [encode_pair(tok, example["prompt"], " " + choice, chat) for choice in example["choices"]]
    prompt = pairs[0][0]
    for (_, cont), choice in zip(pairs, example["choices"]):
        if not cont:
            raise DataError(f"{example['where']}: choice {choice!r} adds no tokens after the prompt")
        if len(prompt) + len(cont) > context:
            raise DataError(f"{example['where']}: prompt and choice are {len(prompt) + len(cont)} tokens, "
                            f"over the model's context of {context} (--max_seq_len)")
    return [sum(lp) for lp in continuation_logprobs(model, prompt, [cont for _, cont in pairs])]


def argmax(values):
    return max(range(len(values)), key=lambda i: (values[i], -i))  # the first of equal maxima, as numpy


# -----------------------------------------------------------------------------------------------
# Tasks: score_* makes one item per example; *_metrics computes the metrics over all items


def score_choice(model, tok, example, opts):
    lls = score_choices(model, tok, example, opts.chat)
    normed = [ll / len(c) for ll, c in zip(lls, example["choices"])]  # lm-eval: characters, no delimiter
    return {"loglikelihoods": lls, "prediction": argmax(lls), "prediction_norm": argmax(normed),
            "answer": example["answer"]}


def choice_metrics(items, opts):
    n = len(items)
    return {"acc": sum(i["prediction"] == i["answer"] for i in items) / n,
            "acc_norm": sum(i["prediction_norm"] == i["answer"] for i in items) / n, "n": n}


def score_labels(model, tok, example, opts):
    lls = score_choices(model, tok, example, opts.chat)
    probs = torch.tensor(lls, dtype=torch.float64).softmax(0).tolist()
    item = {"loglikelihoods": lls, "probabilities": probs, "prediction": argmax(lls)}
    if example["answer"] is not None:
        item["answer"] = example["answer"]
    else:
        item.update(query_id=example["query_id"], doc_id=example["doc_id"], score=probs[0],
                    relevance=example["relevance"])
    return item


def classify_metrics(items, opts):
    from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

    truth, predicted = [i["answer"] for i in items], [i["prediction"] for i in items]
    probs = [i["probabilities"] for i in items]
    metrics = {"accuracy": accuracy_score(truth, predicted), "macro_f1": f1_score(truth, predicted, average="macro")}
    if len(set(truth)) < 2:
        metrics["auroc"] = None  # undefined with one class present
    elif len(opts.labels) == 2:  # the first label is the positive class
        metrics["auroc"] = roc_auc_score([t == 0 for t in truth], [p[0] for p in probs])
    elif len(set(truth)) == len(opts.labels):
        metrics["auroc"] = roc_auc_score(truth, probs, multi_class="ovr", average="macro")
    else:
        metrics["auroc"] = None  # one-vs-rest needs every class in the data
    metrics = {k: float(v) if v is not None else None for k, v in metrics.items()}  # numpy's to plain floats
    return {**metrics, "n": len(items)}


def score_generation(model, tok, batch, opts):
    """Completions of a batch of examples (generate.py's sampling; greedy by default)."""
    prompts = sampling.encode_prompts(tok, [e["prompt"] for e in batch], opts.chat, None)
    for example, prompt in zip(batch, prompts):
        if len(prompt) >= model.args.max_seq_len:
            raise DataError(f"{example['where']}: the prompt is {len(prompt)} tokens, over the model's "
                            f"context of {model.args.max_seq_len} (--max_seq_len)")
    outs = sampling.generate(model, prompts, opts.max_new_tokens, opts.temperature, opts.top_p, tok.stop_ids,
                             opts.generator, n_words=tok.n_words)
    return [{"completion": sampling.completion_text(tok, p, ids), "reference": e["reference"]}
            for e, p, ids in zip(batch, prompts, outs)]


def generate_metrics(items, opts):
    import sacrebleu
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    scores = [scorer.score(i["reference"], i["completion"]) for i in items]
    metrics = {name: sum(s[name].fmeasure for s in scores) / len(scores) for name in ("rouge1", "rouge2", "rougeL")}
    metrics["bleu"] = sacrebleu.corpus_bleu([i["completion"] for i in items], [[i["reference"] for i in items]]).score
    metrics["n"] = len(items)
    return metrics


# -----------------------------------------------------------------------------------------------
# Ranking: trec_eval's measures, written out (relevant = grade >= 1; gains are the grades)


def query_measures(ranked, judged, k=10):
    """P@k, NDCG@k, reciprocal rank and average precision of one query. ranked: the grades of the
    retrieved documents in rank order; judged: the grades of every judged document of the query
    (retrieved or not), which set the ideal ranking and the number of relevant documents."""
    relevant = sum(g > 0 for g in judged)
    dcg = sum(g / math.log2(r + 2) for r, g in enumerate(ranked[:k]) if g > 0)
    ideal = sum(g / math.log2(r + 2) for r, g in enumerate(sorted(judged, reverse=True)[:k]) if g > 0)
    hits, precision_sum, first = 0, 0.0, None
    for r, g in enumerate(ranked):
        if g > 0:
            hits += 1
            precision_sum += hits / (r + 1)
            first = r + 1 if first is None else first
    return {"P@10" if k == 10 else f"P@{k}": sum(g > 0 for g in ranked[:k]) / k,
            "NDCG@10" if k == 10 else f"NDCG@{k}": dcg / ideal if ideal > 0 else 0.0,
            "MRR": 1.0 / first if first else 0.0, "MAP": precision_sum / relevant if relevant else 0.0}


def ranked_queries(items):
    """{query: [(doc, score)] best first}; ties go to the larger doc id, as trec_eval breaks them."""
    queries = {}
    for i in items:
        queries.setdefault(i["query_id"], []).append((i["doc_id"], i["score"]))
    return {q: sorted(docs, key=lambda d: (d[1], d[0]), reverse=True) for q, docs in queries.items()}


def rank_metrics(items, opts):
    """Mean of each measure over the queries (those in --qrels, when given: trec_eval's default)."""
    if opts.qrels_table is None:
        qrels = {}
        for i in items:
            qrels.setdefault(i["query_id"], {})[i["doc_id"]] = i["relevance"]
    else:
        qrels = opts.qrels_table
    per_query = {}
    for query, docs in ranked_queries(items).items():
        if query in qrels:
            judged = qrels[query]
            per_query[query] = query_measures([judged.get(d, 0) for d, _ in docs], list(judged.values()))
    if not per_query:
        raise UserError(f"--qrels {opts.qrels}: none of the records' queries is judged in it")
    names = list(next(iter(per_query.values())))
    metrics = {name: sum(m[name] for m in per_query.values()) / len(per_query) for name in names}
    return {**metrics, "queries": len(per_query), "n": len(items)}


def read_qrels(path):
    """{query: {doc: grade}} from a TREC qrels file: `qid iteration docid grade` per line."""
    table, first = {}, {}
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                parts = line.split()
                if not parts:
                    continue
                if len(parts) != 4 or not parts[3].lstrip("-").isdigit():
                    raise DataError(f"{path}:{number}: a qrels line is `query iteration doc grade`")
                check_unique(first, (parts[0], parts[2]), f"{path}:{number}")
                table.setdefault(parts[0], {})[parts[2]] = int(parts[3])
    except OSError as e:
        raise UserError(f"--qrels {path}: {e.strerror}") from None
    return table


def run_file_text(items, tag="llama-eval"):
    """A TREC run: `qid Q0 docid rank score tag`, ranks from 1."""
    lines = [f"{q} Q0 {doc} {r} {score:.8g} {tag}"
             for q, docs in ranked_queries(items).items() for r, (doc, score) in enumerate(docs, 1)]
    return "\n".join(lines) + "\n"


# -----------------------------------------------------------------------------------------------
# Perplexity: the loss of every token, over shard windows or JSONL texts


def text_windows(tok, records, seq_len):
    """lm-eval's rolling windows for each {"text"}: [BOS] + tokens cut into pieces of seq_len
    targets, each predicted from the window's own tokens (the first from one token before it)."""
    windows = []
    for index, (where, record) in enumerate(records):
        text = need(record, "text", where)
        ids = tok.encode(text, bos=True, eos=False)
        if len(ids) < 2:
            raise DataError(f"{where}: the text is empty")
        for start in range(0, len(ids) - 1, seq_len):
            piece = ids[start : start + seq_len + 1]
            windows.append({"record": index, "inputs": piece[:-1], "targets": piece[1:]})
        windows[-1]["bytes"] = len(text.encode("utf-8"))
    return windows


def shard_windows(tok, data, seq_len, vocab_size):
    """The validation split of a shards directory in windows of seq_len targets (masked targets
    skipped); bytes are those of the target tokens' text, control tokens excluded. Shards made with
    another tokenizer are refused (data.shards.ShardError, naming the file)."""
    from data.shards import DataLoader, validate

    validate(data, "val", vocab_size, tokenizer=tok)
    loader = DataLoader(data, "val", 1, seq_len)
    control = {tok.bos_id, tok.eos_id, *tok.stop_ids}
    windows = []
    for w in range(loader.n_windows):
        x, y, _ = loader.next_batch()
        targets = [t for t in y[0].tolist() if t != -100]
        text = tok.decode([t for t in targets if t not in control])
        windows.append({"record": w, "inputs": x[0].tolist(), "targets": y[0].tolist(),
                        "bytes": len(text.encode("utf-8"))})
    return windows


@torch.inference_mode()
def score_windows(model, batch):
    """(summed loss, targets) of each window; windows of unequal length are padded with -100."""
    device = model.tok_embeddings.weight.device
    T = max(len(w["inputs"]) for w in batch)
    x = torch.zeros(len(batch), T, dtype=torch.long, device=device)
    y = torch.full((len(batch), T), -100, dtype=torch.long, device=device)
    for i, w in enumerate(batch):
        x[i, : len(w["inputs"])] = torch.tensor(w["inputs"])
        y[i, : len(w["targets"])] = torch.tensor(w["targets"])
    logprobs = model(x).log_softmax(-1)
    nll = -logprobs.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1) * (y != -100)
    return [(nll[i].sum().item(), int((y[i] != -100).sum())) for i in range(len(batch))]


def perplexity_items(windows, sums):
    """One item per record (text) or window (shards): its summed loss in nats, targets and bytes."""
    items = {}
    for w, (nll, n) in zip(windows, sums):
        item = items.setdefault(w["record"], {"nll": 0.0, "tokens": 0, "bytes": 0})
        item["nll"] += nll
        item["tokens"] += n
        item["bytes"] += w.get("bytes", 0)
    return [items[k] for k in sorted(items)]


def perplexity_metrics(items, opts):
    nll, tokens, n_bytes = (sum(i[k] for i in items) for k in ("nll", "tokens", "bytes"))
    loss = nll / max(tokens, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 700)), "bits_per_byte": nll / math.log(2) / max(n_bytes, 1),
            "tokens": tokens, "bytes": n_bytes, "n": len(items)}


# -----------------------------------------------------------------------------------------------
# The run: the work split across torchrun ranks, gathered on rank 0, written once


def gather(results, error, rank, world, n):
    """Every rank's results (rank r did units r, r + world, ...) back in unit order. A rank that
    failed sends its error instead, and every rank then stops with the first one (none waits forever)."""
    if world == 1:
        if error is not None:
            raise error
        return results
    parts = [None] * world
    dist.all_gather_object(parts, (results, None if error is None else str(error)))
    errors = [e for _, e in parts if e is not None]
    if errors:
        raise UserError(errors[0])
    merged = [None] * n
    for r, (part, _) in enumerate(parts):
        merged[r::world] = part
    return merged


def score_units(task, model, tok, units, opts, progress):
    """The results of this rank's units: an item per example, or (loss, targets) per window."""
    if task in ("generate", "perplexity"):
        results = []
        for i in range(0, len(units), opts.batch_size):
            batch = units[i : i + opts.batch_size]
            results += score_generation(model, tok, batch, opts) if task == "generate" else score_windows(model, batch)
            progress.advance(len(batch))
        return results
    score = score_choice if task == "choice" else score_labels
    results = []
    for example in units:
        results.append(score(model, tok, example, opts))
        progress.advance()
    return results


METRICS = {"choice": choice_metrics, "classify": classify_metrics, "rank": rank_metrics,
           "generate": generate_metrics, "perplexity": perplexity_metrics}


def evaluate(task, model, tok, units, opts, rank=0, world=1, show_progress=True):
    """(metrics, items) of the model on units (examples, or perplexity windows), the units split
    across ranks. Every rank gets the results; the model is left in eval mode."""
    model.eval()
    mine = units[rank::world]
    progress = common.Progress(len(mine), f"eval {task}", show_progress and rank == 0)
    results, error = [], None
    try:
        results = score_units(task, model, tok, mine, opts, progress)
    except (ValueError, OSError) as e:
        error = e
    results = gather(results, error, rank, world, len(units))
    if task == "perplexity":
        items = perplexity_items(units, results)
    else:
        items = [{"line": u["where"], **r} for u, r in zip(units, results)]
    return METRICS[task](items, opts), items


def sha256_of(path):
    """The file's sha256; for a shards directory that of its meta.json (which names every shard's
    tokenizer and counts), or, for llm.c / nano-llama31 shards without one, of the val shards
    perplexity scored, names and bytes."""
    if not os.path.isdir(path):
        return _sha256_of_files([path], named=False)
    if os.path.exists(os.path.join(path, "meta.json")):
        return _sha256_of_files([os.path.join(path, "meta.json")], named=False)
    from data import shards

    return _sha256_of_files([p for p, _, _ in shards.shard_paths(path, shards.load_meta(path), "val")], named=True)


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
    rows = [(name, "-" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value))
            for name, value in metrics.items()]
    width = max(len(name) for name, _ in rows)
    return "\n".join([f"{task} on {data}"] + [f"  {name:<{width}}  {value:>10}" for name, value in rows])


def log_to_mlflow(opts, metrics):
    """The metrics in the same store as train.py's runs (a run named after --out). Names are made
    valid for mlflow there (P@10 -> P_at_10); a tracking failure is one warning line, and the
    results file, already written, stays."""
    tracker = common.start_mlflow(opts.mlflow_experiment, os.path.basename(os.path.abspath(opts.out)),
                                  {"task": opts.task, "ckpt_dir": opts.ckpt_dir, "adapter": opts.adapter,
                                   "data": opts.data}, prog="eval.py")
    if tracker is not None:
        tracker.log_metrics({f"eval_{k}": v for k, v in metrics.items() if isinstance(v, (int, float))})
        tracker.end_run()


def load_units(task, tok, opts, vocab_size=None):
    """What the task scores, every record checked (before the model is loaded, but for perplexity)."""
    if task == "perplexity" and os.path.isdir(opts.data):
        return shard_windows(tok, opts.data, opts.seq_len, vocab_size)
    records = read_jsonl(opts.data, opts.max_examples, opts.data_flag)
    if task == "perplexity":
        return text_windows(tok, records, opts.seq_len)
    return examples_for(task, records, opts.template, opts.labels, opts.qrels_table, opts.labels_from)


def checked_options(opts):
    """Flag combinations cli's per-flag checks cannot see; fills in labels and the checkpoint."""
    if opts.template is not None:  # typed in a shell, "\n" arrives as a backslash and an n
        opts.template = re.sub(r"\\([nt\\])", lambda m: {"n": "\n", "t": "\t", "\\": "\\"}[m[1]], opts.template)
        check_template(opts.template)
    if opts.task == "classify" and opts.labels is None:
        raise UsageError("--task classify needs --labels (the verbalizers, e.g. --labels yes,no)")
    opts.labels = [s.strip() for s in (opts.labels or "yes,no").split(",")]
    if len(set(opts.labels)) != len(opts.labels) or "" in opts.labels or len(opts.labels) < 2:
        raise UsageError(f"--labels must be two or more distinct, non-empty names, got {','.join(opts.labels)!r}")
    for name in ("qrels", "run_out"):
        if getattr(opts, name) is not None and opts.task != "rank":
            raise UsageError(f"--{name} only applies to --task rank")
    if opts.ckpt_dir is None:
        if not os.path.isdir(sampling.DEMO_DIR):
            raise UserError("no --ckpt_dir given and no demo model in out/demo/model (run `python train.py` first)")
        opts.ckpt_dir = sampling.DEMO_DIR
    if not os.path.isdir(atomic.readable(opts.ckpt_dir)):  # a swap a crash interrupted is finished first
        raise UserError(f"--ckpt_dir {opts.ckpt_dir}: no such checkpoint directory")
    if not os.path.exists(atomic.readable(opts.data)):
        raise UserError(f"--data {opts.data}: no such file or directory")
    atomic.check_outputs({"--out": opts.out, "--run_out": opts.run_out},
                         {"--data": opts.data, "--qrels": opts.qrels, "--ckpt_dir": opts.ckpt_dir,
                          "--adapter": opts.adapter, "--tokenizer": opts.tokenizer}, checkpoint.INPUT_FILES)
    opts.qrels_table = read_qrels(opts.qrels) if opts.qrels else None
    return opts


CHECKS = {"task": one_of(*TASKS), "data": non_empty, "ckpt_dir": non_empty, "adapter": non_empty, "out": non_empty,
          "max_examples": positive, "batch_size": positive, "max_new_tokens": positive,
          "temperature": interval("[0, inf)"), "top_p": interval("(0, 1]"), "seq_len": positive,
          "max_seq_len": positive, "seed": at_least(0), "device": torch_device,
          "dtype": one_of("bf16", "fp16", "fp32"), "quantize": one_of("nf4"), "mlflow_experiment": non_empty}


def main(task: str, data: str, ckpt_dir: str = None, adapter: str = None, out: str = "results.json",
         labels: str = None, template: str = None, chat: bool = False, max_examples: int = None,
         batch_size: int = 8, max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 0.9,
         seed: int = 0, seq_len: int = None, qrels: str = None, run_out: str = None, max_seq_len: int = None,
         tokenizer: str = None, device: str = None, dtype: str = None, quantize: str = None,
         force: bool = False, mlflow: bool = True, mlflow_experiment: str = "llama"):
    """Evaluate a model on a task and write the results file.

    Args:
        task: choice, classify, rank, generate or perplexity (see the top of eval.py for each one's records).
        data: the records (JSONL); for perplexity also a shards directory (its val split).
        ckpt_dir: Meta or HF checkpoint; default out/demo, the model `python train.py` makes.
        adapter: a LoRA adapter directory saved by train.py (merged into the weights).
        out: the results file: task, metrics, one item per record in input order, digests.
        labels: classify / rank: the label words in order, comma-separated (the first is the positive
            class); rank defaults to yes,no.
        template: the prompt with the record's fields in braces, e.g. "{text}\\nLabel:" (\\n and \\t
            typed in the shell are a newline and a tab; {{ and }} are literal braces). Only plain
            {field}s: attributes, indexes, !conversions and :format specs are refused.
        chat: lay each prompt out as a user turn in the tokenizer's chat format (instruct models).
        max_examples: only the first N records.
        batch_size: prompts per batch for generate, windows per batch for perplexity (choice, classify
            and rank run each record's answers as one batch over one shared prompt cache).
        max_new_tokens, temperature, top_p, seed: generate: sampling as generate.py (default greedy).
        seq_len: perplexity: tokens per window (default the model's context).
        qrels: rank: a TREC qrels file to take relevance from instead of the records.
        run_out: rank: also write a TREC run file (qid Q0 docid rank score tag).
        max_seq_len: the context to build the model for; default the checkpoint's.
        tokenizer: a tokenizer.model to use instead of the one in ckpt_dir.
        device: cuda or cpu (default: cuda when available).
        dtype: bf16, fp16 or fp32 (default bf16 on CUDA; on a CPU the checkpoint's own dtype
            where the CPU computes it natively, else fp32).
        quantize: nf4 holds the base's projections in 4 bits (as a QLoRA run trained them).
        force: apply --adapter even to a base other than the one it was trained on.
        mlflow: log the metrics to mlflow ($MLFLOW_TRACKING_URI or sqlite:///mlflow.db).
        mlflow_experiment: the mlflow experiment's name.
    """
    opts = checked_options(SimpleNamespace(**{k: v for k, v in locals().items()}, data_flag="--data",
                                           labels_from="--labels"))
    rank, world, device = common.setup_distributed(device)
    units = load_units(task, None, opts) if task != "perplexity" else None  # bad records stop before loading
    model, tok = sampling.load_for_sampling(os.path.expanduser(opts.ckpt_dir), tokenizer, adapter, device, dtype,
                                            max_seq_len, force, quantize)
    opts.seq_len = min(seq_len or model.args.max_seq_len, model.args.max_seq_len)
    units = units or load_units(task, tok, opts, model.args.vocab_size)
    opts.generator = torch.Generator(device=device).manual_seed(seed) if temperature > 0 else None
    metrics, items = evaluate(task, model, tok, units, opts, rank, world)
    if rank == 0:
        import lora  # for the weights' fingerprint

        weights = {"dir": opts.ckpt_dir, "adapter": adapter, "weights_fingerprint": lora.base_fingerprint(model)}
        results = {"task": task, "metrics": metrics, "items": items, "command": cli.command_line(),
                   "checkpoint": weights, "data": {"path": data, "sha256": sha256_of(data)}}
        if run_out:
            write_text(run_out, run_file_text(items))
        write_results(out, results)
        print(summary_table(task, metrics, data))
        if mlflow:
            log_to_mlflow(opts, metrics)
    common.teardown()


# -----------------------------------------------------------------------------------------------
# During training: train.py --eval_task TASK --eval_data FILE calls this at each evaluation

TRAINING_LABELS = ["yes", "no"]  # classify and rank under train.py: the tasks' defaults (it has no --labels)
_training_units = {}  # (task, data) -> units, read once per run


def check_training_flags(cfg):
    """train.py's --eval_task / --eval_data, checked when the run is configured, before anything
    loads; the records themselves are checked by training_units, before the first step."""
    if cfg.eval_task is None and cfg.eval_data is not None:
        raise UsageError("--eval_data needs --eval_task (choice, classify, rank, generate or perplexity)")
    if cfg.eval_task is not None and cfg.eval_data is None:
        raise UsageError(f"--eval_task {cfg.eval_task} needs --eval_data (the records to score)")
    if cfg.eval_data is not None and not os.path.exists(atomic.readable(cfg.eval_data)):
        raise UserError(f"--eval_data {cfg.eval_data}: no such file or directory")


def training_options(cfg, model):
    """eval.py's options as train.py runs a task: its defaults, train.py's flags named in messages."""
    return SimpleNamespace(task=cfg.eval_task, data=cfg.eval_data, template=None, labels=TRAINING_LABELS, chat=False,
                           qrels=None, qrels_table=None, max_examples=None, batch_size=cfg.batch_size,
                           max_new_tokens=64, temperature=0.0, top_p=1.0, generator=None,
                           seq_len=min(cfg.seq_len, model.args.max_seq_len), data_flag="--eval_data",
                           labels_from=f"the labels train.py --eval_task {cfg.eval_task} scores:")


def training_units(cfg, model, tok):
    """--eval_task's units, read and checked once per run: train.py calls this in its set-up, so a
    bad record stops the run before the first step, not at the first evaluation."""
    if cfg.eval_task is None:
        return None
    key = (cfg.eval_task, cfg.eval_data)
    if key not in _training_units:
        _training_units[key] = load_units(cfg.eval_task, tok, training_options(cfg, model), model.args.vocab_size)
    return _training_units[key]


def during_training(cfg, run):
    """{"eval_<metric>": value} of cfg.eval_task on cfg.eval_data with the model being trained, for
    log.jsonl and mlflow (so accuracy or AUROC is a curve beside the loss); {} without --eval_task.
    Every rank calls it (the records are split across them). The task's defaults apply (classify and
    rank: labels yes,no); the model goes back to training mode afterwards."""
    if cfg.eval_task is None:
        return {}
    model = run.raw
    units = training_units(cfg, model, run.tokenizer)
    training = model.training
    try:
        metrics, _ = evaluate(cfg.eval_task, model, run.tokenizer, units, training_options(cfg, model), cfg.rank,
                              cfg.world, show_progress=False)
    finally:
        model.train(training)
    return {f"eval_{k}": v for k, v in metrics.items() if isinstance(v, (int, float)) and k != "n"}


if __name__ == "__main__":
    run(main, prog="eval.py", checks=CHECKS)
