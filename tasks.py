"""The tasks eval.py scores (and train.py --eval_task at each evaluation), and their work split
across torchrun ranks.

    task = tasks.REGISTRY["classify"](tasks.Options(labels=["yes", "no"]))
    units = task.units("mortality.jsonl")                  # every record read and checked
    metrics, items = tasks.evaluate(task, model, tok, units, rank, world)

Tasks (records are JSONL, one per line, read by data/records.py):
    choice      {"question", "choices": [..], "answer": i} (+ "context"), or MedQA's {"question",
                "options": {"A": ..}, "answer": "C"}: acc, acc_norm (lm-evaluation-harness scoring)
    classify    {"text", "label"} with labels yes,no: accuracy, macro-F1, AUROC; on a model with a
                classification head, its probabilities for {"text", "label"} or {"text", "labels":
                [...]}, the labels the head's (heads.classification_metrics' metrics)
    tag         on a model with a tag head: {"tokens": [words], "tags": [tags]} or CoNLL sentences, each
                word's tag read at its first sub-word (data.prepare's encoding): seqeval's entity
                precision, recall, f1 (micro), f1_strict (IOB2), macro_f1, per_type, token_accuracy,
                invalid_transitions (tagging.tag_metrics)
    rank        {"query_id", "doc_id", "text", "relevance"}, one per (query, doc) pair (in qrels too):
                P@10, NDCG@10, MRR, MAP (trec_eval's)
    generate    {"prompt", "reference"} (or instruction/input/output): ROUGE-1/2/L, corpus BLEU
    perplexity  a shards directory (its val split) or JSONL {"text"}: loss, perplexity, bits per byte

Each task is one class with the same few methods: units (its records read, each checked into a
unit it scores; a bad one is a RecordError naming FILE:LINE), score (a batch of units -> one result
each), items (the results as the results file lists them) and metrics (over all items). REGISTRY
maps the names to them: a new task is a class here and a line in REGISTRY.

Reading guide, top to bottom:
    options          Options: what tasks read besides records (eval.py's flags, or train.py's defaults)
    templates        check_template, render: prompts from record fields only
    scoring          continuation log-likelihoods, lm-evaluation-harness's way: a batch of records'
                     prompts decoded at once, then each one's answers as one batch from its cache row
    tasks            Task, Choice, Classify (HeadClassify for a head), Tag (sentence_pieces, predict_tags:
                     what tag.py calls too), Rank, Generate, Perplexity; REGISTRY and NAMES
    ranking          trec_eval's P@10, NDCG@10, reciprocal rank and average precision, by hand; qrels
                     and run files
    perplexity       windows over shards or JSONL texts, and their losses
    evaluate         with_model (the task for the loaded model: classify's head, tag's labels), the units split
                     across ranks, the results gathered back in unit order
    during training  check_training_flags and TrainingEval: what train.py calls
"""

import functools
import itertools
import math
import os
import string
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist

import atomic
import common
import generate
import heads
import tagging
from cli import UsageError, UserError
from data import prepare
from data.records import (RecordError, is_table, label_field, label_names, need, read_jsonl, read_records,
                          tagged_words)
from data.shards import DataLoader, validate

CONTEXT_TEMPLATE = "Abstract: {context}\nQuestion: {question}\nAnswer:"  # PubMedQA, as lm-eval lays it out
RANK_QUERY_TEMPLATE = "Query: {query}\nDocument: {text}\nRelevant:"  # when records carry the query text


# -----------------------------------------------------------------------------------------------
# Options


@dataclass
class Options:
    """What the tasks read besides their records. eval.py fills it from its flags, TrainingEval
    with train.py's defaults. data_flag, labels_from: how messages name the records' file and
    where the labels came from (train.py has no --data and no --labels)."""
    template: Optional[str] = None  # the prompt, record fields in braces (check_template); None: the task's
    labels: list = field(default_factory=lambda: ["yes", "no"])  # classify / rank: the first is positive
    chat: bool = False  # prompts as a user turn in the tokenizer's chat layout
    max_examples: Optional[int] = None  # only the first N records
    batch_size: int = 8  # generate: prompts per batch; perplexity: windows per batch
    max_new_tokens: int = 256  # generate: sampling as generate.py
    temperature: float = 0.0
    top_p: float = 0.9
    seed: int = 0
    seq_len: Optional[int] = None  # perplexity: tokens per window (None: the model's context)
    qrels: Optional[str] = None  # rank: a TREC qrels file to take relevance from
    data_flag: str = "--data"
    labels_from: str = "--labels"
    # classify on a head: its records read and cut as data.prepare's flags of the same names do
    text_column: Optional[str] = None  # the text's column or field (None: "text")
    label_column: Optional[str] = None  # the label's (None: "label", or "labels" for a list)
    label_separator: Optional[str] = None  # splits a label cell into a list (multilabel)
    max_len: Optional[int] = None  # tokens a document keeps (None: the model's context)
    truncate: Optional[str] = None  # a longer document keeps its start (None, "start") or its end ("end")
    # tag: the words whose truth tag is one of these are left out of the metrics (data.prepare's --ignore_tags)
    ignore_tags: tuple = ("IGN",)
    columns: Optional[list] = None  # tag: [(field, JSON field or Parquet column)] (data.prepare's --columns)


# -----------------------------------------------------------------------------------------------
# Templates: record fields, and nothing else, in a prompt


def check_template(template):
    """The template, if it only substitutes record fields: plain {field}s, {{ and }} for braces.
    str.format would also follow {text.upper} or {text[0]} into the value, or apply {text!r} and
    format specs (which may nest fields), and put a bound method or a repr in every prompt."""
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
        raise RecordError(f"{where}: --template needs field {e.args[0]!r}, which the record lacks") from None


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
def continuation_logprobs(model, pairs):
    """Per-token log-probabilities of continuations after prompts (token ids): pairs is a list of
    (prompt, [continuation, ..]); the result is, per pair, one list per continuation.

    Every prompt but its last token goes through the model at once, right-padded, prompt i into row
    i of the KV cache. A row's padding slots hold garbage, but decode's mask lets position p see
    slots <= p only, and the row's continuations overwrite those slots from its own prompt's end.
    Then, per pair, its row is copied to one row per continuation and they run as one batch from
    the prompt's last token (whose logits predict each first token): a long prompt with four short
    answers costs about one forward pass, not four, and the output layer runs on no prompt position."""
    device = model.tok_embeddings.weight.device
    rows = max(len(pairs), max(len(conts) for _, conts in pairs))
    model.setup_cache(rows, max(len(p) + max(map(len, conts)) - 1 for p, conts in pairs))
    try:
        prompts = prefill(model, [p[:-1] for p, _ in pairs], device)
        return [answer_logprobs(model, p, conts, kv, device) for (p, conts), kv in zip(pairs, prompts)]
    finally:
        model.clear_cache()


def prefill(model, prompts, device):
    """The prompts decoded right-padded as one batch; each one's (keys, values) per layer, kept
    apart from the cache rows the continuations reuse."""
    longest = max(map(len, prompts))
    if longest:
        tokens = torch.zeros(len(prompts), longest, dtype=torch.long, device=device)
        for i, p in enumerate(prompts):
            tokens[i, : len(p)] = torch.tensor(p)
        model.decode(tokens, 0, last_only=True)  # only the cache is wanted; the one position is cheap
    caches = [layer.attention.cache for layer in model.layers]
    kept = [(c.k[: len(prompts), :, :longest].clone(), c.v[: len(prompts), :, :longest].clone()) for c in caches]
    return [[(k[i : i + 1], v[i : i + 1]) for k, v in kept] for i in range(len(prompts))]


def answer_logprobs(model, prompt, continuations, kv, device):
    """One prompt's continuations as one batch, from its last token, over copies of its cache row kv
    (its keys and values at the positions before that token)."""
    longest, kept = max(map(len, continuations)), kv[0][0].shape[2]
    n = len(continuations) if longest > 1 else 1  # one-token answers share their only input: the last token
    for layer, (k, v) in zip(model.layers, kv):
        cache = layer.attention.cache
        cache.k[:n, :, :kept].copy_(k.expand(n, -1, -1, -1))
        cache.v[:n, :, :kept].copy_(v.expand(n, -1, -1, -1))
    inputs = torch.full((n, longest), prompt[-1], dtype=torch.long, device=device)  # padding is never read
    targets = torch.zeros(len(continuations), longest, dtype=torch.long, device=device)
    for i, c in enumerate(continuations):
        targets[i, : len(c)] = torch.tensor(c)
        if i < n:
            inputs[i, 1 : len(c)] = torch.tensor(c[:-1])
    logprobs = model.decode(inputs, len(prompt) - 1).log_softmax(-1).expand(len(continuations), -1, -1)
    picked = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return [picked[i, : len(c)].tolist() for i, c in enumerate(continuations)]


def score_choices(model, tok, examples, chat):
    """Per example, the summed log-likelihood of " " + each choice after its prompt."""
    pairs = [choice_pair(tok, e, chat, model.args.max_seq_len) for e in examples]
    return [[sum(lp) for lp in lps] for lps in continuation_logprobs(model, pairs)]


def choice_pair(tok, example, chat, context):
    """(prompt ids, [each choice's ids]), checked to add tokens and fit the model's context."""
    pairs = [encode_pair(tok, example["prompt"], " " + choice, chat) for choice in example["choices"]]
    prompt = pairs[0][0]
    for (_, cont), choice in zip(pairs, example["choices"]):
        if not cont:
            raise RecordError(f"{example['where']}: choice {choice!r} adds no tokens after the prompt")
        if len(prompt) + len(cont) > context:
            raise RecordError(f"{example['where']}: prompt and choice are {len(prompt) + len(cont)} tokens, "
                              f"over the model's context of {context} (--max_seq_len)")
    return prompt, [cont for _, cont in pairs]


def label_scores(model, tok, examples, chat):
    """classify / rank, per example: each label's log-likelihood, their softmax and the most likely label."""
    results = []
    for lls in score_choices(model, tok, examples, chat):
        probs = torch.tensor(lls, dtype=torch.float64).softmax(0).tolist()
        results.append({"loglikelihoods": lls, "probabilities": probs, "prediction": argmax(lls)})
    return results


def argmax(values):
    return max(range(len(values)), key=lambda i: (values[i], -i))  # the first of equal maxima, as numpy


def cut(ids, keep, truncate=None):
    """A document (BOS ... EOS) of more than keep tokens cut to keep, its BOS and EOS kept and the
    rest taken from its start or its end: the cut data.prepare --max_len --truncate makes."""
    if len(ids) <= keep:
        return ids
    middle = ids[len(ids) - 1 - (keep - 2) : -1] if truncate == "end" else ids[1 : keep - 1]
    return ids[:1] + middle + ids[-1:]


# -----------------------------------------------------------------------------------------------
# Tasks


class Task:
    """What every task does; the subclasses below fill in unit, score and metrics."""
    name = None
    batched = False  # score takes opts.batch_size units at a time (else one)
    needs_model = False  # units needs the tokenizer and the model (so records are read after loading)

    def __init__(self, opts):
        self.opts = opts

    def for_model(self, model):
        """The task that scores this model (classify: the head's, where the model has one)."""
        return self

    def header(self):
        """What the results file holds besides task, metrics and items (a head's labels)."""
        return {}

    def units(self, data, tok=None, model=None):
        """Every record of the file data, each checked into a unit (dict) that knows its line."""
        records = read_jsonl(data, self.opts.max_examples, self.opts.data_flag)
        return [{**self.unit(record, where), "where": where} for where, record in records]

    def unit(self, record, where):
        raise NotImplementedError

    def score(self, model, tok, batch):
        """One result (a dict) per unit of the batch."""
        raise NotImplementedError

    def items(self, units, results):
        """The results file's items: one per unit, naming its line."""
        return [{"line": u["where"], **r} for u, r in zip(units, results)]

    def metrics(self, items):
        raise NotImplementedError


class Choice(Task):
    """Multiple choice, scored as lm-evaluation-harness does: acc and acc_norm."""
    name = "choice"
    batched = True  # opts.batch_size records' prompts at once (continuation_logprobs)
    template = "Question: {question}\nAnswer:"  # lm-evaluation-harness's default for question + choices

    def unit(self, record, where):
        """{"prompt", "choices", "answer": index}. MedQA-style options are listed in the prompt and
        their letters are what the model chooses between."""
        question, template = need(record, "question", where), self.opts.template
        if "options" in record:
            options = need(record, "options", where, dict)
            letters = list(options)
            listed = "".join(f"\n{letter}. {text}" for letter, text in options.items())
            prompt = render(template, record, where) if template else f"Question: {question}{listed}\nAnswer:"
            answer = need(record, "answer", where, (str, int))
            if isinstance(answer, int):
                answer = letters[answer] if 0 <= answer < len(letters) else answer
            if answer not in letters:
                raise RecordError(f"{where}: answer {answer!r} is not one of the options {', '.join(letters)}")
            choices, index = letters, letters.index(answer)
        else:
            choices = need(record, "choices", where, list)
            index = need(record, "answer", where, int)
            if "context" in record and not template:
                template = CONTEXT_TEMPLATE
            prompt = render(template or self.template, record, where)
        if not choices:
            raise RecordError(f"{where}: the choice list is empty")
        if not all(isinstance(c, str) and c for c in choices):
            raise RecordError(f"{where}: every choice must be a non-empty string")
        if not 0 <= index < len(choices):
            raise RecordError(f"{where}: answer index {index} is out of range for {len(choices)} choices")
        return {"prompt": prompt, "choices": [str(c) for c in choices], "answer": index}

    def score(self, model, tok, batch):
        results = []
        for example, lls in zip(batch, score_choices(model, tok, batch, self.opts.chat)):
            normed = [ll / len(c) for ll, c in zip(lls, example["choices"])]  # lm-eval: characters, no delimiter
            results.append({"loglikelihoods": lls, "prediction": argmax(lls), "prediction_norm": argmax(normed),
                            "answer": example["answer"]})
        return results

    def metrics(self, items):
        n = len(items)
        return {"acc": sum(i["prediction"] == i["answer"] for i in items) / n,
                "acc_norm": sum(i["prediction_norm"] == i["answer"] for i in items) / n, "n": n}


class Classify(Task):
    """Labels as continuations of the prompt: accuracy, macro-F1, AUROC (the first label positive).
    A model with a classification head is scored by its head instead (HeadClassify), so the records
    are read once the model is loaded and known."""
    name = "classify"
    batched = True
    template = "{text}\nAnswer:"
    needs_model = True

    def for_model(self, model):
        if model.args.n_labels and model.args.head_kind == "tag":
            raise UsageError("this checkpoint's head is a tag head (one tag per token): score it with --task tag")
        if model.args.n_labels:
            return HeadClassify.of(model, self.opts)
        given = [name for name in ("text_column", "label_column", "label_separator", "max_len", "truncate")
                 if getattr(self.opts, name) is not None]
        if given:
            raise UsageError(f"--{given[0]} applies to a classification head's records; this checkpoint has no head "
                             f"(its records are JSONL {{\"text\", \"label\"}}, scored through --labels)")
        if self.opts.labels is None:
            raise UsageError("--task classify needs --labels (the verbalizers, e.g. --labels yes,no), or a "
                             "checkpoint with a classification head; this one has none")
        return self

    def unit(self, record, where):
        need(record, "text", where)
        prompt, labels = render(self.opts.template or self.template, record, where), self.opts.labels
        label = str(need(record, "label", where, (str, int)))
        if label not in labels:
            raise RecordError(f"{where}: label {label!r} is not one of {self.opts.labels_from} {','.join(labels)}")
        return {"prompt": prompt, "choices": labels, "answer": labels.index(label)}

    def score(self, model, tok, batch):
        scores = label_scores(model, tok, batch, self.opts.chat)
        return [{**s, "answer": e["answer"]} for e, s in zip(batch, scores)]

    def metrics(self, items):
        from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

        truth, predicted = [i["answer"] for i in items], [i["prediction"] for i in items]
        probs, labels = [i["probabilities"] for i in items], self.opts.labels
        metrics = {"accuracy": accuracy_score(truth, predicted), "macro_f1": f1_score(truth, predicted, average="macro")}
        if len(set(truth)) < 2:
            metrics["auroc"] = None  # undefined with one class present
        elif len(labels) == 2:  # the first label is the positive class
            metrics["auroc"] = roc_auc_score([t == 0 for t in truth], [p[0] for p in probs])
        elif len(set(truth)) == len(labels):
            metrics["auroc"] = roc_auc_score(truth, probs, multi_class="ovr", average="macro")
        else:
            metrics["auroc"] = None  # one-vs-rest needs every class in the data
        metrics = {k: float(v) if v is not None else None for k, v in metrics.items()}  # numpy's to plain floats
        return {**metrics, "n": len(items)}


class HeadClassify(Task):
    """A classification head's probabilities (model.classify: softmax, or sigmoid for multilabel)
    for {"text", "label"} or, multilabel, {"text", "labels": [...]} records, the labels the head's
    own (model.args.labels). Each text is one document, BOS text EOS, cut to the model's context
    keeping its start (and its BOS and EOS, as data.prepare --max_len cuts). Metrics:
    heads.classification_metrics. Picked by Classify.for_model; report.py makes one from a results
    file's "labels" and "multilabel"."""
    name = "classify"
    batched = True
    needs_model = True

    def __init__(self, opts, labels, multilabel=False):
        super().__init__(opts)
        self.labels, self.multilabel = list(labels), multilabel

    @classmethod
    def of(cls, model, opts):
        """The model's head as a task: its labels (or, unnamed in the checkpoint, --labels where
        given, else 0, 1, ...); --labels other than the checkpoint's is refused."""
        args, given = model.args, opts.labels
        labels = list(args.labels) if args.labels is not None else given or [str(k) for k in range(args.n_labels)]
        if given is not None and given != labels:
            raise UsageError(f"--labels {','.join(given)} differ from the checkpoint's head labels {','.join(labels)}"
                             f" (leave --labels out: a head's labels come from its checkpoint)")
        return cls(opts, labels, args.multilabel)

    def header(self):
        return {"labels": self.labels, "multilabel": self.multilabel}

    def units(self, data, tok=None, model=None):
        opts = self.opts
        units = [{**self.unit(record, where), "where": where} for where, record in self.records(data)]
        keep = min(opts.max_len or model.args.max_seq_len, model.args.max_seq_len)
        for u in units:
            u["ids"] = cut(tok.encode(u.pop("text"), bos=True, eos=True), keep, opts.truncate)
        return units

    def records(self, data):
        """(where, record) of JSONL, or of a CSV/TSV/Parquet table (its text column named "text"
        here, its label column by its own name), the first --max_examples of them."""
        opts = self.opts
        if not is_table(data):
            return read_jsonl(data, opts.max_examples, opts.data_flag)
        columns = [("text", opts.text_column or "text"), *([(opts.label_column,) * 2] if opts.label_column else
                                                          [("label", "label")])]
        records = list(itertools.islice(read_records(data, columns, "table", flag=opts.data_flag), opts.max_examples))
        if not records:
            raise RecordError(f"{data}: no records in it")
        return records

    def unit(self, record, where):
        opts, known = self.opts, f"the head's labels {','.join(self.labels[:20])}" + \
            (", ..." if len(self.labels) > 20 else "")
        text = need(record, opts.text_column if opts.text_column and opts.text_column in record else "text", where)
        column = label_field(record, opts.label_column, where)
        names, is_list = label_names(record[column], where, column, opts.label_separator)
        if is_list != self.multilabel:
            raise RecordError(f"{where}: {'a list of labels' if is_list else 'one label'} in field '{column}', but the "
                              f"head is {'multilabel (a list per record; --label_separator splits a cell)' if self.multilabel else 'single-label'}")
        index = {name: k for k, name in enumerate(self.labels)}
        for name in names:
            if name not in index:
                raise RecordError(f"{where}: label {name!r} is not one of {known}")
        answers = sorted({index[name] for name in names})
        return {"text": text, **({"answers": answers} if self.multilabel else {"answer": answers[0]})}

    @torch.inference_mode()
    def score(self, model, tok, batch):
        pad_id, device = model.args.pad_id, model.tok_embeddings.weight.device
        rows = [batch] if pad_id is not None else [[u] for u in batch]  # no pad token: one document a row
        results = []
        for part in rows:
            T = max(len(u["ids"]) for u in part)
            tokens = torch.full((len(part), T), 0 if pad_id is None else pad_id, dtype=torch.long, device=device)
            for i, u in enumerate(part):
                tokens[i, : len(u["ids"])] = torch.tensor(u["ids"])
            logits = model.classify(tokens).double()
            probs = logits.sigmoid() if self.multilabel else logits.softmax(-1)
            for u, p in zip(part, probs.tolist()):
                truth = {"answers": u["answers"]} if self.multilabel else \
                    {"answer": u["answer"], "prediction": argmax(p)}
                results.append({"probabilities": p, **truth})
        return results

    def metrics(self, items):
        answers = [i["answers"] if self.multilabel else i["answer"] for i in items]
        return heads.classification_metrics([i["probabilities"] for i in items], answers, self.multilabel,
                                            self.labels)


def sentence_pieces(tok, words, keep, where):
    """The words as data.prepare encodes a tagged sentence: [(ids, [(position, word index)])], one
    piece (BOS ... EOS) for the sentence, or several split at word boundaries where it is longer
    than keep tokens (prepare's Tagging.pieces, its rule); each word's first sub-word position in
    its piece, where its tag is read."""
    try:
        ids, word_of = prepare.encode_words(list(words), tok)
    except ValueError as e:
        raise RecordError(f"{where}: {e}") from None
    doc = prepare.TaggedDoc(where, "tagged", tuple(words), ("O",) * len(words))
    out, begin = [], 1  # each piece's first token in ids
    for piece_ids, _ in prepare.Tagging(max_len=keep).pieces(doc, ids, word_of):
        inner = len(piece_ids) - 2
        firsts = [(1 + j - begin, int(word_of[j])) for j in range(begin, begin + inner)
                  if j == begin or word_of[j] != word_of[j - 1]]
        out.append(([int(i) for i in piece_ids], firsts))
        begin += inner
    return out


@torch.inference_mode()
def predict_tags(model, sentences):
    """The head's most likely label index for every word of each sentence (sentence_pieces' output),
    read at the word's first sub-word: all pieces as one right-padded batch (a causal model's logits
    before the padding are those of the piece alone)."""
    pieces = [p for sentence in sentences for p in sentence]
    device = model.tok_embeddings.weight.device
    tokens = torch.zeros(len(pieces), max(len(ids) for ids, _ in pieces), dtype=torch.long, device=device)
    for i, (ids, _) in enumerate(pieces):
        tokens[i, : len(ids)] = torch.tensor(ids)
    best = model.tag(tokens).argmax(-1).tolist()
    out, k = [], 0
    for sentence in sentences:
        words = {}
        for ids, firsts in sentence:
            words.update((word, best[k][position]) for position, word in firsts)
            k += 1
        out.append([words[w] for w in range(len(words))])
    return out


def tag_head_labels(model, task="--task tag"):
    """A tag head's labels (unnamed in the checkpoint: 0, 1, ...); UsageError without one."""
    args = model.args
    if not args.n_labels or args.head_kind != "tag":
        has = "a classification head (--task classify)" if args.n_labels else "no head"
        raise UsageError(f"{task} needs a checkpoint with a tag head (train.py --head tag); this one has {has}")
    return list(args.labels) if args.labels is not None else [str(k) for k in range(args.n_labels)]


class Tag(Task):
    """A tag head's prediction for every word of {"tokens": [words], "tags": [tags]} records (JSONL or
    Parquet, opts.columns naming other fields) or CoNLL sentences, read as data.prepare reads them
    (data.records: read_records, tagged_words):
    tags are the head's label names, integers index them, and words tagged one of opts.ignore_tags
    are scored by no metric. Each sentence is encoded as prepare encodes it and split where it is
    longer than the model's context (or opts.max_len); a word's tag is read at its first sub-word.
    Items: "words", "tags" (the truth's names), "predicted" (names). Metrics: tagging.tag_metrics.
    Picked by for_model on a tag head; report.py makes one from a results file's "labels"."""
    name = "tag"
    batched = True
    needs_model = True

    def __init__(self, opts, labels=None):
        super().__init__(opts)
        self.labels = None if labels is None else list(labels)

    def for_model(self, model):
        labels = tag_head_labels(model)
        both = [t for t in self.opts.ignore_tags if t in labels]
        if both:  # data.prepare keeps ignored tags out of the vocabulary: the head cannot have learnt one
            raise UsageError(f"--ignore_tags {both[0]} is one of the head's labels {','.join(labels[:20])}")
        return Tag(self.opts, labels)

    def header(self):
        return {"labels": self.labels}

    def units(self, data, tok=None, model=None):
        context = model.args.max_seq_len
        keep = min(self.opts.max_len or context, context)
        records = itertools.islice(read_records(data, self.opts.columns, flag=self.opts.data_flag),
                                   self.opts.max_examples)
        units = []
        for where, record in records:
            unit = self.unit(record, where)
            units.append({**unit, "where": where, "pieces": sentence_pieces(tok, unit["words"], keep, where)})
        if not units:
            raise RecordError(f"{data}: no sentences in it")
        return units

    def unit(self, record, where):
        """{"words", "tags"}: the record checked (tagged_words), each tag a name of the head's labels,
        an ignored tag, or an index into the labels."""
        words, tags = tagged_words(record, where)
        names = []
        for tag in tags:
            if isinstance(tag, int):
                if not 0 <= tag < len(self.labels):
                    raise RecordError(f"{where}: tag {tag} is no index into the head's {len(self.labels)} labels")
                tag = self.labels[tag]
            elif tag not in self.labels and tag not in self.opts.ignore_tags:
                raise RecordError(f"{where}: tag {tag!r} is not one of the head's labels "
                                  f"{','.join(self.labels[:20])}{', ...' if len(self.labels) > 20 else ''} "
                                  f"(nor ignored: {','.join(self.opts.ignore_tags)})")
            names.append(tag)
        return {"words": list(words), "tags": names}

    def score(self, model, tok, batch):
        predicted = predict_tags(model, [u["pieces"] for u in batch])
        return [{"words": u["words"], "tags": u["tags"], "predicted": [self.labels[k] for k in p]}
                for u, p in zip(batch, predicted)]

    def metrics(self, items):
        """tagging.tag_metrics; the ignored words are those whose truth is none of the labels."""
        known = set(self.labels)
        ignored = {t for i in items for t in i["tags"] if t not in known}
        return tagging.tag_metrics([i["tags"] for i in items], [i["predicted"] for i in items], ignored)


class Rank(Task):
    """Each (query, doc) scored by the probability of the first label: trec_eval's measures over the
    ranking that gives, relevance from the records or from opts.qrels."""
    name = "rank"
    batched = True
    template = "{text}\nRelevant:"

    def __init__(self, opts):
        super().__init__(opts)
        self.qrels = read_qrels(opts.qrels) if opts.qrels else None  # {query: {doc: grade}}

    def units(self, data, tok=None, model=None):
        units, first = super().units(data), {}  # first: (query, doc) -> the line that judged it
        for unit in units:
            check_unique(first, (unit["query_id"], unit["doc_id"]), unit["where"])
            relevance = unit["relevance"]
            if self.qrels is None and (not isinstance(relevance, int) or isinstance(relevance, bool)):
                raise RecordError(f"{unit['where']}: field 'relevance' should be an integer grade (or give --qrels)")
        return units

    def unit(self, record, where):
        for name in ("query_id", "doc_id"):
            need(record, name, where, (str, int))
        template = self.opts.template or (RANK_QUERY_TEMPLATE if "query" in record else self.template)
        need(record, "text", where)
        return {"prompt": render(template, record, where), "choices": self.opts.labels,
                "query_id": str(record["query_id"]), "doc_id": str(record["doc_id"]),
                "relevance": record.get("relevance")}

    def score(self, model, tok, batch):
        results = []
        for e, scores in zip(batch, label_scores(model, tok, batch, self.opts.chat)):
            results.append({**scores, "query_id": e["query_id"], "doc_id": e["doc_id"],
                            "score": scores["probabilities"][0], "relevance": e["relevance"]})
        return results

    def metrics(self, items):
        """Mean of each measure over the queries (those in the qrels, when given: trec_eval's default)."""
        qrels = self.qrels
        if qrels is None:
            qrels = {}
            for i in items:
                qrels.setdefault(i["query_id"], {})[i["doc_id"]] = i["relevance"]
        per_query = {}
        for query, docs in ranked_queries(items).items():
            if query in qrels:
                judged = qrels[query]
                per_query[query] = query_measures([judged.get(d, 0) for d, _ in docs], list(judged.values()))
        if not per_query:
            raise UserError(f"--qrels {self.opts.qrels}: none of the records' queries is judged in it")
        names = list(next(iter(per_query.values())))
        metrics = {name: sum(m[name] for m in per_query.values()) / len(per_query) for name in names}
        return {**metrics, "queries": len(per_query), "n": len(items)}


class Generate(Task):
    """Completions (generate.py's sampling; greedy by default) against references: ROUGE, BLEU."""
    name = "generate"
    batched = True

    def __init__(self, opts):
        super().__init__(opts)
        self.generator = None  # made on the model's device at the first batch, when sampling

    def unit(self, record, where):
        """{"prompt", "reference"}: the prompt/reference pair, or data.prepare's instruction fields."""
        if self.opts.template:
            prompt = render(self.opts.template, record, where)
        elif "prompt" in record:
            prompt = need(record, "prompt", where)
        else:
            prompt = need(record, "instruction", where)
            if record.get("input"):
                prompt += "\n\n" + need(record, "input", where)
        reference = need(record, "reference" if "reference" in record else "output", where)
        return {"prompt": prompt, "reference": reference}

    def score(self, model, tok, batch):
        opts, context = self.opts, model.args.max_seq_len
        prompts = generate.encode_prompts(tok, [e["prompt"] for e in batch], opts.chat, None)
        for example, prompt in zip(batch, prompts):
            if len(prompt) >= context:
                raise RecordError(f"{example['where']}: the prompt is {len(prompt)} tokens, over the model's "
                                  f"context of {context} (--max_seq_len)")
        if opts.temperature > 0 and self.generator is None:
            self.generator = torch.Generator(device=model.tok_embeddings.weight.device).manual_seed(opts.seed)
        outs = generate.generate(model, prompts, opts.max_new_tokens, opts.temperature, opts.top_p, tok.stop_ids,
                                 self.generator, n_words=tok.n_words)
        return [{"completion": generate.completion_text(tok, p, ids), "reference": e["reference"]}
                for e, p, ids in zip(batch, prompts, outs)]

    def metrics(self, items):
        import sacrebleu

        scores = [rouge_fmeasures(i["reference"], i["completion"]) for i in items]
        names = ("rouge1", "rouge2", "rougeL")
        metrics = {name: sum(s[k] for s in scores) / len(scores) for k, name in enumerate(names)}
        completions, references = [i["completion"] for i in items], [i["reference"] for i in items]
        metrics["bleu"] = sacrebleu.corpus_bleu(completions, [references]).score
        metrics["n"] = len(items)
        return metrics


@functools.lru_cache(maxsize=1 << 16)
def rouge_fmeasures(reference, completion):
    """(ROUGE-1, ROUGE-2, ROUGE-L) F-measures of one completion, stemmed (rouge-score's scorer).
    Cached: report.py's bootstrap scores the same pairs on every resample."""
    return tuple(score.fmeasure for score in _rouge_scorer().score(reference, completion).values())


@functools.lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)


class Perplexity(Task):
    """The loss of every token, over a shards directory's val split or JSONL {"text"} records (in
    lm-eval's rolling windows): loss, perplexity, bits per byte. A unit is a window of the context."""
    name = "perplexity"
    batched = True
    needs_model = True

    def units(self, data, tok=None, model=None):
        context = model.args.max_seq_len
        seq_len = min(self.opts.seq_len or context, context)
        if os.path.isdir(data):
            return shard_windows(tok, data, seq_len, model.args.vocab_size)
        return text_windows(tok, read_jsonl(data, self.opts.max_examples, self.opts.data_flag), seq_len)

    def score(self, model, tok, batch):
        return score_windows(model, batch)

    def items(self, units, results):
        return perplexity_items(units, results)

    def metrics(self, items):
        nll, tokens, n_bytes = (sum(i[k] for i in items) for k in ("nll", "tokens", "bytes"))
        loss = nll / max(tokens, 1)
        return {"loss": loss, "perplexity": math.exp(min(loss, 700)),
                "bits_per_byte": nll / math.log(2) / max(n_bytes, 1), "tokens": tokens, "bytes": n_bytes,
                "n": len(items)}


REGISTRY = {task.name: task for task in (Choice, Classify, Tag, Rank, Generate, Perplexity)}
NAMES = tuple(REGISTRY)


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


def check_unique(first, pair, where):
    """Refuse a second line for the same (query, doc): the document would be retrieved (or judged)
    twice, each copy a hit, and average precision could pass 1 (MAP 2.0). first: pair -> where."""
    if pair in first:
        raise RecordError(f"{where}: query {pair[0]!r} and doc {pair[1]!r} again (first at line "
                          f"{first[pair].rpartition(':')[2]}): one line per (query, doc) pair")
    first[pair] = where


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
                    raise RecordError(f"{path}:{number}: a qrels line is `query iteration doc grade`")
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
# Perplexity: windows of tokens and their summed losses


def text_windows(tok, records, seq_len):
    """lm-eval's rolling windows for each {"text"}: [BOS] + tokens cut into pieces of seq_len
    targets, each predicted from the window's own tokens (the first from one token before it)."""
    windows = []
    for index, (where, record) in enumerate(records):
        text = need(record, "text", where)
        ids = tok.encode(text, bos=True, eos=False)
        if len(ids) < 2:
            raise RecordError(f"{where}: the text is empty")
        for start in range(0, len(ids) - 1, seq_len):
            piece = ids[start : start + seq_len + 1]
            windows.append({"record": index, "inputs": piece[:-1], "targets": piece[1:]})
        windows[-1]["bytes"] = len(text.encode("utf-8"))
    return windows


def shard_windows(tok, data, seq_len, vocab_size):
    """The validation split of a shards directory in windows of seq_len targets (masked targets
    skipped); bytes are those of the target tokens' text, control tokens excluded. Shards made with
    another tokenizer are refused (data.shards.ShardError, naming the file)."""
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


# -----------------------------------------------------------------------------------------------
# Evaluate: the work split across torchrun ranks, every rank given all the results


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


def with_model(task, units, data, tok, model):
    """(the task that scores the loaded model, its units): classify turns into the head's task where
    the model has a head; units (None) read now where the task needed the model to read them."""
    task = task.for_model(model)
    return task, units or task.units(data, tok, model)


def evaluate(task, model, tok, units, rank=0, world=1, show_progress=True):
    """(metrics, items) of the model on the task's units, split across ranks. Every rank gets the
    results; the model is left in eval mode."""
    model.eval()
    mine = units[rank::world]
    progress = common.Progress(len(mine), f"eval {task.name}", show_progress and rank == 0)
    step = task.opts.batch_size if task.batched else 1
    results, error = [], None
    try:
        for i in range(0, len(mine), step):
            batch = mine[i : i + step]
            results += task.score(model, tok, batch)
            progress.advance(len(batch))
    except (ValueError, OSError) as e:
        error = e
    results = gather(results, error, rank, world, len(units))
    items = task.items(units, results)
    return task.metrics(items), items


# -----------------------------------------------------------------------------------------------
# During training: train.py --eval_task TASK --eval_data FILE


def check_training_flags(eval_task, eval_data):
    """train.py's --eval_task / --eval_data, checked when the run is configured, before anything
    loads; the records themselves are checked by TrainingEval, before the first step."""
    if eval_task is None and eval_data is not None:
        raise UsageError("--eval_data needs --eval_task (choice, classify, tag, rank, generate or perplexity)")
    if eval_task is not None and eval_data is None:
        raise UsageError(f"--eval_task {eval_task} needs --eval_data (the records to score)")
    if eval_data is not None and not os.path.exists(atomic.readable(eval_data)):
        raise UserError(f"--eval_data {eval_data}: no such file or directory")


class TrainingEval:
    """A task as train.py scores it at each evaluation: the tasks' defaults (classify and rank:
    labels yes,no; generate: greedy, 64 new tokens) and train.py's flags named in messages. The
    records are read and checked here, in train.py's set-up, so a bad one stops the run before its
    first step, not at the first evaluation."""

    def __init__(self, task, data, model, tokenizer, batch_size, seq_len, rank, world):
        opts = Options(batch_size=batch_size, max_new_tokens=64, temperature=0.0, top_p=1.0, seq_len=seq_len,
                       data_flag="--eval_data", labels_from=f"the labels train.py --eval_task {task} scores:")
        self.task, self.tokenizer, self.rank, self.world = REGISTRY[task](opts), tokenizer, rank, world
        if task == "tag":  # the labels are the model's tag head's
            self.task = self.task.for_model(model)
        self.units = self.task.units(data, tokenizer, model)

    def __call__(self, model):
        """{"eval_<metric>": value} with the model being trained, for log.jsonl and mlflow (so
        accuracy or AUROC is a curve beside the loss). Every rank calls it (the records are split
        across them); the model goes back to its training mode afterwards."""
        training = model.training
        try:
            metrics, _ = evaluate(self.task, model, self.tokenizer, self.units, self.rank, self.world,
                                  show_progress=False)
        finally:
            model.train(training)
        return {f"eval_{k}": v for k, v in metrics.items() if isinstance(v, (int, float)) and k != "n"}
