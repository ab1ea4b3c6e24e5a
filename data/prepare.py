"""Corpora -> token shards (format: data/shards.py).

    python -m data.prepare --input notes/ --out shards/notes --tokenizer ~/llama/Llama3.1-8B
    python -m data.prepare --input qa.jsonl --out shards/qa --vocab_size 8192 --format instruct
    python -m data.prepare --demo                 # ICD-10-CM tabular list -> shards/icd10cm

Input: a file, a directory (searched recursively) or a glob. .txt/.md files are one document
each, or many with --doc_separator REGEX (split_documents: streamed, chunk by chunk); .jsonl and
.ndjson files hold one record per line (.json: JSON lines, or one array of records, which is read
whole); .csv/.tsv rows (the csv module: quoted cells may span lines) and .parquet rows (pyarrow, batch
by batch) become records through --text_column / --columns, or through their header names. Any file
but Parquet may be .gz or .zst compressed. Endings count in any case (DATA.JSONL, NOTES.CSV.GZ).
Records are read, and laid out as documents, by data/records.py (shared with eval.py and
generate.py): file_kind decides what a file holds, a bad record is a RecordError. A record is
{"text"} (plain text), {"instruction","input","output"} or an alias pair (question/answer,
prompt/response, prompt/completion, input/output) (instruct), or {"messages": [{"role","content"}]}
/ ShareGPT {"conversations": [{"from","value"}]} (chat).
--format auto decides per record; text, instruct or chat insists on one kind (jsonl = text).

Text documents become BOS tokens EOS with every token a target. Instruct and chat records go
through the tokenizer's chat layout (encode_dialog_targets): only assistant content and its end
token are targets. Mask files are written for every shard when at least one token of the
dataset is not a target, and for none otherwise (readers treat a missing mask as all ones).
Docs files (NAME.docs, 1 where a document starts) are written for every shard exactly when mask
files are, i.e. when the data holds instruction or chat records: Llama 2's chat layout puts a
BOS before every exchange, so there BOS does not mark where a dialog starts. Plain text datasets
get none (readers then start a document at each BOS, which is exact for text), so their
files are exactly as before. meta.json says which: "has_mask", "has_docs".
Shards hold exactly --shard_tokens tokens (the last one fewer): documents run across shard
boundaries, and each mask and docs file matches its shard token for token.

Labelled records (a "label" or "labels" field in JSON, or --label_column NAME in any record file;
--label_separator SEP splits a cell into a list) make labelled shards: each record is one text
document, and a .labels sidecar beside each shard lists each document's labels (data/shards.py);
the rules (single- or multilabel, integer labels, the vocabulary's order) are Labelling's.
--max_len N cuts every document to N tokens, keeping its start (or its end with --truncate end)
and its BOS and EOS; the summary and meta.json ("truncated_documents") count the cut ones.

Tagged records ({"tokens": [words], "tags": [tags]} in JSON, HF's token-classification layout;
--columns tokens=words,tags=ner_tags renames JSON fields and picks Parquet columns; or .conll files,
word<TAB>tag lines with a blank line between sentences) make tagged shards: each sentence is one
document, BOS, the words joined by spaces, EOS, and a .tags sidecar beside each shard gives each
token its tag (data/shards.py). Each word is encoded apart (tokenizer encode_words, checked against
the joined text), so its tokens are known exactly; its first token carries its tag, or with
--label_all_subwords all of them (transformers' run_ner rules); words tagged IGN (--ignore_tags)
carry none. The rules (integer tags through --labels, the vocabulary's order, --max_len splitting
a sentence between words, each piece a document) are Tagging's; meta.json holds the tags and
their counts, and the summary says how many sentences were split.

Each document goes to val when a seeded hash of its content falls below --val_fraction, so the
split streams, does not depend on --workers, and exact duplicates never straddle it. If that
leaves a split empty, the document nearest the threshold is moved over; if the whole input is
one document, its last --val_fraction of tokens is val (nanoGPT's rule). --dedup drops exact
repeats of a document before tokenizing (drop_duplicates) and meta.json counts them.
Everything is written to DIR.tmp and swapped in as a whole at the end (atomic.write_dir);
--overwrite replaces only a shard directory this tool wrote, never the input.
"""
import glob
import hashlib
import json
import multiprocessing
import os
import re
import shutil
import signal
import sys
import time
from collections import deque, namedtuple

import numpy as np
import sentencepiece

import atomic
from cli import UsageError, UserError, at_least, command_line, interval, non_empty, one_of, positive, run
from data import shards
from data.records import (DECOMPRESS_ERRORS, RECORD_KINDS, TAGGED_FIELDS, Doc, RecordError, corrupt, file_kind, is_table,
                          label_field, label_names, open_text, read_records, record_to_doc, tagged_words)
from tokenizer import TokenizerError, load as load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the fields a record may have, and so the names --columns may map columns to
RECORD_FIELDS = ("text", "instruction", "input", "output", "question", "answer", "prompt", "response",
                 "completion", "system") + TAGGED_FIELDS
SEPARATOR_MAX = 1 << 16  # the longest --doc_separator match that is sure to be found across read chunks
FORMAT_VERSION = 1


class PrepareError(UserError):
    """A problem the user can fix; cli prints it as one line and exits 1."""


def log(msg):
    print(f"prepare: {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# reading records


def list_files(path, tables=False):
    """The input files of --input: a file, a glob, or a directory searched recursively. In a directory,
    CSV/TSV/Parquet files count when `tables` (--text_column / --columns) or when it holds nothing
    else: a table next to the notes is more often a side file than part of the corpus."""
    if os.path.isfile(path):
        return [path]
    if os.path.isdir(path):
        found = []
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            found += [os.path.join(dirpath, f) for f in filenames if not f.startswith(".")
                      and file_kind(f) is not None]
        documents = [f for f in found if not is_table(f)]
        skipped = [] if tables or not documents else sorted(set(found) - set(documents))
        if skipped:  # said, not dropped in silence: the user may have meant them
            shown = ", ".join(os.path.relpath(f, path) for f in skipped[:3]) + (", ..." if len(skipped) > 3 else "")
            log(f"skipping {len(skipped)} table(s) in {path} beside its documents ({shown}); pass --text_column "
                f"or --columns to read them too")
        found = found if tables or not documents else documents
        if not found:
            raise PrepareError(f"--input {path}: no .txt, .md, .json, .jsonl or .ndjson files in it "
                               f"(nor .csv, .tsv, .parquet, nor .gz / .zst of them, in any case)")
        return sorted(found)
    found = sorted(f for f in glob.glob(path, recursive=True) if os.path.isfile(f))
    if not found:
        raise PrepareError(f"--input {path}: no such file or directory, and no file matches it as a glob")
    return found


def split_documents(f, separator, chunk_chars=1 << 20):
    """The texts between matches of the compiled regex `separator` in text stream f, read a chunk at a
    time. A match counts only once SEPARATOR_MAX characters follow it (or the stream has ended), so
    any separator shorter than that splits exactly as re.split over the whole text would."""
    buffer, scan_from, ended = "", 0, False
    while not ended:
        chunk = f.read(max(chunk_chars, len(buffer)))  # doubling: a long document costs linear time
        ended = not chunk
        buffer += chunk
        start = 0
        for m in separator.finditer(buffer, scan_from):
            if not ended and m.end() > len(buffer) - SEPARATOR_MAX:
                break  # more text might extend or move this match
            if m.end() > m.start():
                yield buffer[start:m.start()]
                start = m.end()
        buffer = buffer[start:]
        # every match ending before len - SEPARATOR_MAX was taken, so the next starts after this
        scan_from = max(0, len(buffer) - 2 * SEPARATOR_MAX)
    yield buffer


class Corpus:
    """Documents from files, read lazily; iterate docs() as many times as needed.

    columns: [(record field, column)] for CSV/TSV/Parquet files (None: the header's own names);
    doc_separator: a regex that splits text files into documents (None: one document a file)."""

    def __init__(self, path, fmt="auto", skip_bad=False, columns=None, doc_separator=None, labelling=None,
                 tagging=None):
        tagged_columns = any(field in TAGGED_FIELDS for field, _ in columns or ())
        self.files, self.fmt, self.skip_bad = list_files(path, tables=bool(columns) and not tagged_columns), fmt, skip_bad
        self.labelling, self.tagging = labelling or Labelling(), tagging or Tagging()
        self.columns, self.separator = columns, doc_separator and re.compile(doc_separator)
        self.skipped = 0
        if columns and not tagged_columns and not any(is_table(f) for f in self.files):
            raise PrepareError(f"--input {path}: no CSV, TSV or Parquet file for --text_column / --columns")

    def bad(self, where, reason, quiet):
        self.skip(PrepareError(f"{where}: {reason}"), quiet)

    def skip(self, error, quiet):
        """A bad record or file: the error, or with --skip_bad counted (unless quiet) and passed over."""
        if not self.skip_bad:
            raise error
        if not quiet:
            self.skipped += 1
            if self.skipped <= 3:
                log(f"skipping {error}")

    def docs(self, quiet=False):
        """quiet: a dry pass (vocab training) that neither counts nor reports skipped records."""
        for path in self.files:
            try:
                if file_kind(path) in RECORD_KINDS:  # a file named on the command line with no known ending: text
                    yield from self._record_docs(path, quiet)
                else:
                    yield from self._text_docs(path, quiet)
            except tuple(DECOMPRESS_ERRORS) as e:
                raise corrupt(path, e) from None

    def _record_docs(self, path, quiet):
        for where, rec in read_records(path, self.columns, self.fmt, lambda error: self.skip(error, quiet)):
            try:
                if self.tagging.is_tagged(rec, path, self.labelling):
                    yield self.tagging.doc_of(rec, where)
                    continue
                doc = record_to_doc(rec, self.fmt, where)
                names = self.labelling.names_of(rec, doc, where)
                yield doc if names is None else LabelledDoc(*doc, names)
            except RecordError as e:
                self.skip(e, quiet)

    def _text_docs(self, path, quiet):
        if self.fmt not in ("auto", "text", "jsonl"):
            self.bad(path, f"plain-text file but --format {self.fmt}", quiet)
            return
        if self.tagging.tagged is None:  # a text document first: the dataset is not a tagged one
            self.tagging.tagged = False
        try:
            with open_text(path) as f:
                if not self.separator:
                    text = f.read()
                    if text.strip():
                        yield Doc(path, "text", text)
                    else:
                        self.bad(path, "empty text", quiet)
                    return
                for i, text in enumerate(split_documents(f, self.separator), 1):
                    if text.strip():  # nothing between two separators is no document, not a bad one
                        yield Doc(f"{path}: document {i}", "text", text)
        except UnicodeDecodeError:
            self.bad(path, "not UTF-8 text", quiet)


# ---------------------------------------------------------------------------------------------
# labelled records (format of the shards' .labels sidecar: data/shards.py)

# A labelled record's text document and its label names (a tuple; empty for a multilabel record
# with no labels). Its first three fields are a Doc's, so the tokenizing path takes it as one.
LabelledDoc = namedtuple("LabelledDoc", Doc._fields + ("labels",))


class Labelling:
    """The label rules of a run, and what its records showed so far.

    A run is labelled when --label_column, --label_separator or --labels is given, or else when its
    first record has a "label" or "labels" field; then every record must carry its labels. It is
    multilabel when --label_separator is given, or else as its first labelled record says (a list
    of labels, "labels": [...]); then a record of the other kind is a bad record. Integer labels are
    label names as text (7 and "7" are one label). The vocabulary is --labels in its order (a label
    outside it is a bad record), or else every label seen, sorted as strings (so it does not depend
    on the records' order). max_len / truncate: each document is cut to max_len tokens (documents
    keep their BOS and EOS), keeping its start, or its end with truncate "end"."""

    def __init__(self, column=None, separator=None, fixed=None, max_len=None, truncate="start"):
        self.column, self.separator, self.fixed = column, separator, fixed
        self.max_len, self.truncate, self.cut = max_len, truncate, 0
        self.labelled = True if (column or separator or fixed) else None  # None: the first record decides
        self.multilabel = True if separator else None
        self.ids = {name: i for i, name in enumerate(fixed or ())}  # name -> id (first-seen order unless fixed)

    def names_of(self, rec, doc, where):
        """The label names of a record (RecordError naming where for a bad one), None when unlabelled."""
        if self.labelled is None:  # an instruction or chat record's "label" field is none of ours
            self.labelled = doc.kind == "text" and ("label" in rec or "labels" in rec)
        if not self.labelled:
            return None
        if doc.kind != "text":
            raise RecordError(f"{where}: a labelled record is a text record ('text' and its label), not {doc.kind}")
        field = label_field(rec, self.column, where)
        names, is_list = label_names(rec[field], where, field, self.separator)
        if self.multilabel is None:
            self.multilabel = is_list
        if is_list != self.multilabel:
            raise RecordError(f"{where}: {'a list of labels in a single-label' if is_list else 'one label in a multilabel'} "
                              f"dataset (field '{field}'); every record holds one label or every record a list")
        unknown = [name for name in names if self.fixed and name not in self.ids]
        if unknown:
            raise RecordError(f"{where}: label {unknown[0]!r} is not one of --labels {','.join(self.fixed)}")
        return tuple(dict.fromkeys(names))

    def intern(self, names):
        """Label ids of names, in first-seen order until final() renumbers them."""
        return [self.ids.setdefault(name, len(self.ids)) for name in names]

    def final(self):
        """(vocabulary, old id -> final id array): --labels' order, or sorted."""
        names = list(self.fixed) if self.fixed else sorted(self.ids)
        remap = np.zeros(len(self.ids), dtype=np.int64)
        for new, name in enumerate(names):
            remap[self.ids[name]] = new
        return names, remap

    def shorten(self, ids, mask):
        """A document cut to max_len tokens, its first (BOS) and last (EOS) kept; counted in self.cut."""
        if not self.max_len or len(ids) <= self.max_len:
            return ids, mask
        self.cut += 1
        keep = self.max_len - 2
        middle = slice(1, 1 + keep) if self.truncate == "start" else slice(len(ids) - 1 - keep, len(ids) - 1)
        ends = [0], [len(ids) - 1]
        picked = np.concatenate([ends[0], np.arange(len(ids))[middle], ends[1]])
        return ids[picked], mask[picked]


# ---------------------------------------------------------------------------------------------
# tagged records (format of the shards' .tags sidecar: data/shards.py)

# A tagged sentence: payload is its words, tags their raw tags (strings, or integers into --labels).
TaggedDoc = namedtuple("TaggedDoc", Doc._fields + ("tags",))
IGNORED = -100  # a token without a tag: not a word's first token, or a word tagged IGN / --ignore_tags
IGNORED_WORD = -1  # provisional: the first token of a word tagged IGN (counted, then IGNORED)


class Tagging:
    """The tag rules of a run, and what its sentences showed so far.

    A run is tagged when its first record is: a CoNLL sentence, or a record with a "tokens" field
    (after --columns); then every record must be a tagged one. Tags are strings, or integers that
    index --labels (HF's ClassLabel: ner_tags 3 = the fourth name); the vocabulary is --labels in
    its order (a tag outside it is a bad record), or else every tag seen, sorted. Tags in `ignore`
    (IGN, or --ignore_tags) are in no vocabulary: their words carry no target. Each word's first
    token carries its tag; with all_subwords its other tokens too (a B-X word's as I-X where I-X
    is a tag, transformers' run_ner --label_all_tokens). A sentence of more than max_len tokens
    (BOS and EOS included) is split at word boundaries into several documents (counted in split).

    While the shards are written, the .tags files hold provisional values: 2*id on a word's first
    token, 2*id + 1 on its other tokens (all_subwords), IGNORED_WORD on an ignored word's first
    token, IGNORED elsewhere; finish_tag_files maps them to the final vocabulary's ids."""

    def __init__(self, fixed=None, ignore=("IGN",), all_subwords=False, max_len=None):
        self.fixed, self.ignore, self.all_subwords, self.max_len = fixed, set(ignore), all_subwords, max_len
        self.tagged, self.split = None, 0
        self.ids = {name: i for i, name in enumerate(n for n in fixed or () if n not in self.ignore)}

    def is_tagged(self, rec, path, labelling):
        """Whether the run is tagged (decided by its first record), hence rec one of its records."""
        if self.tagged is None:
            self.tagged = file_kind(path) == "conll" or "tokens" in rec
            if self.tagged and (labelling.column or labelling.separator):
                raise UsageError("--label_column / --label_separator are for labelled records, not tagged ones "
                                 "(tokens and tags)")
            if self.tagged:
                labelling.labelled = False  # --labels and --max_len are the tags' now
        return self.tagged

    def doc_of(self, rec, where):
        words, tags = tagged_words(rec, where)
        return TaggedDoc(where, "tagged", words, tuple(self.tag_name(tag, where) for tag in tags))

    def tag_name(self, tag, where):
        """A raw tag as a name: an integer through --labels; an unknown name is a RecordError."""
        if isinstance(tag, int):
            if not self.fixed:
                raise RecordError(f"{where}: integer tag {tag}: name the tags with --labels (in id order)")
            if not 0 <= tag < len(self.fixed):
                raise RecordError(f"{where}: tag {tag} is no index into --labels ({len(self.fixed)} names)")
            return self.fixed[tag]
        if self.fixed and tag not in self.fixed and tag not in self.ignore:
            raise RecordError(f"{where}: tag {tag!r} is not one of --labels {','.join(self.fixed)}")
        return tag

    def token_tags(self, doc, word_of):
        """The provisional tag of each token (word_of: each token's word, -1 for BOS and EOS)."""
        ids = [None if name in self.ignore else self.ids.setdefault(name, len(self.ids)) for name in doc.tags]
        per_word = np.array([IGNORED_WORD if i is None else 2 * i for i in ids] + [IGNORED], dtype=np.int64)
        tags = per_word[word_of]  # word_of -1 (BOS, EOS) takes the IGNORED at the end
        first = np.r_[True, word_of[1:] != word_of[:-1]]
        later = ~first & (tags >= 0)
        tags[later] = tags[later] + 1 if self.all_subwords else IGNORED
        tags[~first & (tags == IGNORED_WORD)] = IGNORED
        return tags

    def pieces(self, doc, ids, word_of):
        """[(ids, tags)]: the sentence as one document, or split at word boundaries into documents
        of at most max_len tokens (each BOS ... EOS); RecordError for a word that alone is too long."""
        tags = self.token_tags(doc, word_of)
        if not self.max_len or len(ids) <= self.max_len:
            return [(ids, tags)]
        self.split += 1
        starts = np.flatnonzero(np.r_[False, word_of[1:-1] != word_of[:-2]])  # each word's first token
        ends = np.r_[starts[1:], len(ids) - 1]
        room, out, begin = self.max_len - 2, [], 1
        for i, (start, end) in enumerate(zip(starts, ends)):
            if end - start > room:
                raise RecordError(f"{doc.where}: word {i} ({doc.payload[i][:30]!r}) alone is {end - start} tokens, "
                                  f"more than --max_len {self.max_len} holds with BOS and EOS")
            if end - begin > room:
                out.append((begin, start))
                begin = start
        out.append((begin, len(ids) - 1))
        ends_ids = [ids[:1], ids[-1:]]
        return [(np.concatenate([ends_ids[0], ids[a:b], ends_ids[1]]),
                 np.concatenate([[IGNORED], tags[a:b], [IGNORED]])) for a, b in out]

    def final(self):
        """(vocabulary, provisional value -> final value as a function of an int array)."""
        names = [n for n in self.fixed if n not in self.ignore] if self.fixed else sorted(self.ids)
        remap = np.zeros(max(len(self.ids), 1), dtype=np.int64)
        for new, name in enumerate(names):
            remap[self.ids[name]] = new
        index = {name: i for i, name in enumerate(names)}
        inside = np.array([index.get("I-" + n[2:], i) if n.startswith("B-") else i for i, n in enumerate(names)]
                          + [0], dtype=np.int64)

        def convert(values):
            values = np.asarray(values, dtype=np.int64)
            known = values >= 0
            first = remap[np.where(known, values, 0) // 2]
            out = np.where(values % 2 == 0, first, inside[first])
            return np.where(known, out, IGNORED)

        return names, remap, convert


# ---------------------------------------------------------------------------------------------
# the ICD-10-CM demo corpus


class DemoCorpus(Corpus):
    """One document per ICD-10-CM code (chapters, blocks, categories, subcategories)."""

    def __init__(self):
        self.skip_bad, self.skipped, self.labelling, self.tagging = False, 0, Labelling(), Tagging()

    def docs(self, quiet=False):
        import simple_icd_10_cm as icd

        def section(title, items):
            items = [items] if isinstance(items, str) else items
            items = [line for item in items for line in item.split("\n") if line.strip()]
            return [f"{title}:"] + [f"- {line}" for line in items] if items else []

        for code in icd.get_all_codes(with_dots=True):
            head = f"Chapter {code}: " if icd.is_chapter(code) else f"{code} "
            lines = [head + icd.get_description(code)]
            if not icd.is_chapter(code) and icd.get_parent(code):
                parent = icd.get_parent(code)
                lines.append(f"Parent: {parent} {icd.get_description(parent)}")
            lines += section("Includes", icd.get_includes(code))
            lines += section("Inclusion terms", icd.get_inclusion_term(code))
            lines += section("Excludes1", icd.get_excludes1(code))
            lines += section("Excludes2", icd.get_excludes2(code))
            lines += section("Code first", icd.get_code_first(code))
            lines += section("Code also", icd.get_code_also(code))
            lines += section("Use additional code", icd.get_use_additional_code(code))
            lines += section("Notes", icd.get_notes(code))
            yield Doc(f"icd10cm:{code}", "text", "\n".join(lines))


# ---------------------------------------------------------------------------------------------
# tokenizing (in worker processes)

_tok = None


def _init_worker(tokenizer_path, in_pool=False):
    global _tok
    if in_pool:  # Ctrl-C is the parent's to handle; workers would each print a traceback
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    if _tok is None:  # a forked worker has the parent's (set by encode_all): loading takes ~0.5 s
        _tok = load_tokenizer(tokenizer_path)


def doc_bytes(doc):
    """A document's content as bytes: what the split hash and --dedup look at."""
    if doc.kind == "text":
        return doc.payload.encode("utf-8")
    if doc.kind == "tagged":  # the same words tagged otherwise are another document
        return json.dumps([doc.payload, doc.tags], ensure_ascii=False).encode("utf-8")
    return json.dumps(doc.payload, sort_keys=True, ensure_ascii=False).encode("utf-8")


def drop_duplicates(docs, dropped):
    """docs without exact repeats of an earlier one (copied-forward notes); counts them in
    dropped[0]. Holds a 16-byte digest per distinct document, so memory grows with their number."""
    seen = set()
    for doc in docs:
        digest = hashlib.blake2b(doc_bytes(doc), digest_size=16).digest()
        if digest in seen:
            dropped[0] += 1
            continue
        seen.add(digest)
        yield doc


def encode_words(words, tok=None):
    """(ids, word_of) of a tagged sentence: BOS, the words joined by spaces, EOS, and each token's
    word (-1 for BOS and EOS). The words are encoded apart (tokenizer's encode_words) so that each
    token's word is known exactly; their ids must be those of the joined text, or ValueError.
    tok: the tokenizer (None: this worker's; eval.py --task tag passes the checkpoint's)."""
    tok = tok or _tok
    pieces = tok.encode_words(words)
    ids = [i for piece in pieces for i in piece]
    if ids != tok.encode(" ".join(words), bos=False, eos=False):
        raise ValueError("this tokenizer encodes the words apart otherwise than the sentence (a token across "
                         "a word boundary); tagged data needs one that does not")
    word_of = np.repeat(np.arange(len(words), dtype=np.int32), [len(p) for p in pieces])
    return [tok.bos_id] + ids + [tok.eos_id], np.r_[np.int32(-1), word_of, np.int32(-1)].astype(np.int32)


def _encode_batch(docs, seed):
    """Tokenize a batch of Docs. Returns ([(split_hash, n_tokens, n_masked, error)], ids, mask,
    word_of): ids (uint32) and mask (uint8) are the batch's documents end to end -- arrays pickle
    back to the parent far faster than thousands of small ones -- and word_of (int32) each token's
    word, for the tagged documents only (encode_words). split_hash is uniform in [0, 1)."""
    info, ids, masks, words = [], [], [], []
    for doc in docs:
        digest = hashlib.blake2b(doc_bytes(doc), digest_size=8, key=str(seed).encode()).digest()
        u = int.from_bytes(digest, "little") / 2**64
        try:
            if doc.kind == "tagged":
                doc_ids, word_of = encode_words(doc.payload)
                doc_mask = np.ones(len(doc_ids), dtype=np.uint8)
                words.append(word_of)
            elif doc.kind == "text":
                doc_ids = _tok.encode(doc.payload, bos=True, eos=True)
                doc_mask = np.ones(len(doc_ids), dtype=np.uint8)
            else:
                doc_ids, doc_mask = _tok.encode_dialog_targets(doc.payload)
                doc_mask = np.asarray(doc_mask, dtype=np.uint8)
        except Exception as e:  # e.g. a dialog layout the tokenizer refuses: a bad record, not a crash
            info.append((u, 0, 0, f"{type(e).__name__}: {e}"))
            continue
        info.append((u, len(doc_ids), len(doc_mask) - int(doc_mask.sum()), None))
        ids.append(np.asarray(doc_ids, dtype=np.uint32))
        masks.append(doc_mask)
    words = np.concatenate(words) if words else np.zeros(0, np.int32)
    if not ids:
        return info, np.zeros(0, np.uint32), np.zeros(0, np.uint8), words
    return info, np.concatenate(ids), np.concatenate(masks), words


def _batches(docs, max_docs=256, max_chars=1 << 20):
    batch, chars = [], 0
    for doc in docs:
        batch.append(doc)
        chars += len(doc.payload) if doc.kind == "text" else sum(len(m) if doc.kind == "tagged" else len(m["content"])
                                                                 for m in doc.payload)
        if len(batch) >= max_docs or chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _unbatch(batch, result):
    info, ids, mask, words = result
    start = word_start = 0
    for doc, (u, n, masked, error) in zip(batch, info):
        word_of = None
        if doc.kind == "tagged" and not error:
            word_of, word_start = words[word_start:word_start + n], word_start + n
        yield doc, u, ids[start:start + n], mask[start:start + n], masked, error, word_of
        start += n


def encode_all(docs, tok, workers, seed):
    """Yield (doc, split_hash, ids, mask, n_masked, error, word_of) in input order, tokenizing with the
    loaded tokenizer tok on `workers` processes."""
    global _tok
    _tok = tok  # workers started by fork inherit it; others load tok.path
    try:
        if workers <= 1:
            for batch in _batches(docs):
                yield from _unbatch(batch, _encode_batch(batch, seed))
            return
        with multiprocessing.Pool(workers, _init_worker, (tok.path, True)) as pool:
            # Pool.imap would read the whole corpus ahead into its task queue; a bounded window of
            # in-flight batches keeps memory flat while preserving order.
            pending = deque()
            for batch in _batches(docs):
                pending.append((batch, pool.apply_async(_encode_batch, (batch, seed))))
                if len(pending) >= 2 * workers:
                    batch, result = pending.popleft()
                    yield from _unbatch(batch, result.get())
            while pending:
                batch, result = pending.popleft()
                yield from _unbatch(batch, result.get())
    finally:
        _tok = None  # the next run may bring another tokenizer


# ---------------------------------------------------------------------------------------------
# writing


SIDECARS = (".mask", ".docs")  # written beside every shard, removed at the end if not needed


class SplitWriter:
    """Appends documents to DIR/SPLIT_NNNNNN.bin (+ .mask, .docs, and .tags once a document with
    tags comes: a tagged dataset's come from the first on), starting a new shard every shard_tokens."""

    def __init__(self, out_dir, split, vocab_size, shard_tokens, buffer_tokens=1 << 20):
        self.out_dir, self.split, self.shard_tokens = out_dir, split, shard_tokens
        self.magic, self.version, self.dtype = shards.token_format(vocab_size)
        self.shards, self.documents, self.tokens, self.masked = [], 0, 0, 0
        self.files, self.count = None, 0
        self.buffer, self.buffered, self.buffer_tokens = [], 0, buffer_tokens
        self.doc_labels = []  # (start token in the split, label ids) of each labelled document
        self.tagged, self.tag_words, self.ignored_words = False, np.zeros(0, np.int64), 0  # words per provisional tag

    def add(self, ids, mask, masked, labels=None, tags=None):
        if labels is not None:
            self.doc_labels.append((self.tokens, labels))
        if tags is not None:
            self.tagged = True
            found = np.bincount(tags[(tags >= 0) & (tags % 2 == 0)] // 2)
            self.tag_words = np.pad(self.tag_words, (0, max(0, len(found) - len(self.tag_words))))
            self.tag_words[:len(found)] += found
            self.ignored_words += int((tags == IGNORED_WORD).sum())
        self.documents += 1
        self.tokens += len(ids)
        self.masked += masked
        # Buffered because many small writes cost more than one big one; copied because a slice
        # would keep its whole tokenized batch alive until the buffer is flushed.
        self.buffer.append((ids.copy(), mask.copy(), None if tags is None else tags.astype(np.int32)))
        self.buffered += len(ids)
        if self.buffered >= self.buffer_tokens:
            self._flush()

    def _flush(self):
        if not self.buffer:
            return
        ids = np.concatenate([i for i, _, _ in self.buffer]).astype(self.dtype)
        mask = np.concatenate([m for _, m, _ in self.buffer])
        tags = np.concatenate([t for _, _, t in self.buffer]) if self.tagged else None
        docs = np.zeros(len(ids), dtype=np.uint8)
        docs[np.cumsum([0] + [len(i) for i, _, _ in self.buffer[:-1]])] = 1  # documents are never empty
        self.buffer, self.buffered = [], 0
        start = 0
        while start < len(ids):
            if self.files is None:
                self._open()
            n = min(len(ids) - start, self.shard_tokens - self.count)
            self.files[0].write(ids[start:start + n].tobytes())
            self.files[1].write(mask[start:start + n].tobytes())
            self.files[2].write(docs[start:start + n].tobytes())
            if tags is not None:
                self.files[3].write(tags[start:start + n].tobytes())
            self.count += n
            start += n
            if self.count == self.shard_tokens:
                self._close()

    def _open(self):
        name = f"{self.split}_{len(self.shards):06d}"
        self.names = [os.path.join(self.out_dir, name + ext) for ext in (".bin",) + SIDECARS
                      + ((".tags",) if self.tagged else ())]
        self.files = [open(p, "wb") for p in self.names]
        for f in self.files:  # placeholder header, rewritten once the count is known
            f.write(shards.make_header(0, 0, 0))
        self.count = 0

    def _close(self):
        formats = [(self.magic, self.version), (shards.MAGIC_MASK, shards.VERSION_MASK),
                   (shards.MAGIC_DOCS, shards.VERSION_DOCS), (shards.MAGIC_TAGS, shards.VERSION_TAGS)]
        for f, (magic, version) in zip(self.files, formats):
            f.seek(0)
            f.write(shards.make_header(magic, version, self.count))
            f.close()
        self.shards.append({"file": os.path.basename(self.names[0]), "tokens": self.count})
        self.files = None

    def finish(self):
        self._flush()
        if self.files is not None:
            self._close()
        return {"documents": self.documents, "tokens": self.tokens, "masked_tokens": self.masked, "shards": self.shards}


def train_vocab(corpus, model_path, vocab_size, seed=0, input_sentence_size=1_000_000):
    """Train a Llama 2 style sentencepiece BPE vocabulary on the corpus text."""
    failure, count, t0 = [], [0], time.time()
    max_lines = 10 * input_sentence_size  # sentencepiece samples input_sentence_size of these

    def lines():
        try:
            for doc in corpus.docs(quiet=True):
                texts = ([doc.payload] if doc.kind == "text" else [" ".join(doc.payload)] if doc.kind == "tagged"
                         else [m["content"] for m in doc.payload])
                for text in texts:
                    for line in text.split("\n"):
                        if line.strip():
                            count[0] += 1
                            yield line
                if count[0] >= max_lines:
                    return
        except Exception as e:  # sentencepiece would turn it into a RuntimeError; keep the original
            failure.append(e)

    sentencepiece.set_random_generator_seed(seed)  # sentence sampling; otherwise seeded from the clock
    with open(model_path, "wb") as f:
        try:
            sentencepiece.SentencePieceTrainer.train(
                sentence_iterator=lines(), model_writer=f, model_type="bpe", vocab_size=vocab_size,
                byte_fallback=True, split_digits=True, normalization_rule_name="identity",
                remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
                unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=0.99995,
                input_sentence_size=input_sentence_size, shuffle_input_sentence=True,
                max_sentence_length=1 << 16, minloglevel=2,
                # the trainer records num_threads in the model file: a constant keeps its sha256
                # the same on every machine
                num_threads=16)
        except RuntimeError as e:
            if failure:
                raise failure[0] from None
            if count[0] == 0:
                raise PrepareError("no documents in the input") from None
            reason = str(e).strip().splitlines()[0]
            raise PrepareError(f"--vocab_size {vocab_size}: sentencepiece training failed: {reason}") from None
    if failure:
        raise failure[0]
    log(f"trained a {vocab_size}-token sentencepiece BPE vocabulary on {min(count[0], input_sentence_size):,} "
        f"lines in {time.time() - t0:.1f}s")


def check_out(out, corpus, overwrite, tokenizer_path=None):
    """Refuse an --out that would destroy something: a link, one that is or holds an input (a file
    of the corpus or the tokenizer), a non-empty directory without --overwrite, and even with it,
    anything but a shard directory this tool wrote (its meta.json)."""
    inputs = [("--input", f) for f in getattr(corpus, "files", [])] + [("--tokenizer", tokenizer_path)]
    atomic.check_outputs({"--out": out}, inputs)
    if os.path.exists(out) and not os.path.isdir(out):
        raise PrepareError(f"--out {out}: exists and is not a directory")
    if not os.path.isdir(out) or not os.listdir(out):
        return
    if not overwrite:
        raise PrepareError(f"--out {out}: exists and is not empty (pass --overwrite to replace it)")
    try:
        shards.load_meta(out, infer=False)  # llm.c shards are not ours to replace
    except shards.ShardError:
        raise PrepareError(f"--out {out}: not a shard directory made by data.prepare (no readable "
                           f"meta.json); --overwrite only replaces those. Choose another --out") from None


def prepare(corpus, out, tokenizer_path=None, vocab_size=None, val_fraction=0.005, seed=0,
            shard_tokens=100_000_000, workers=None, overwrite=False, command="", dedup=False):
    """Tokenize corpus into shards under out; returns the meta dict written to out/meta.json.
    Everything is written to OUT.tmp and swapped in whole (atomic.write_dir): a kill or a full
    disk leaves the previous out as it was."""
    workers = workers or len(os.sched_getaffinity(0))
    out = os.path.abspath(out)
    check_out(out, corpus, overwrite, tokenizer_path)
    t0, result = time.time(), {}

    def fill(tmp):
        tok, source = _tokenizer_into(tmp, corpus, tokenizer_path, vocab_size, seed)
        t_tok = time.time()
        docs, dropped = corpus.docs(), [0]
        if dedup:
            docs = drop_duplicates(docs, dropped)
        stats, kinds = _write_splits(tmp, corpus, docs, tok, workers, seed, val_fraction, shard_tokens)
        meta = _meta(tok, source, stats, kinds, corpus.skipped, val_fraction, seed, shard_tokens, command)
        meta["duplicates_dropped"] = dropped[0] if dedup else None  # None: --dedup was not asked for
        meta.update(getattr(corpus.labelling, "meta", {}))
        meta.update(getattr(corpus.tagging, "meta", {}))
        if corpus.tagging.tagged:
            meta.update(max_len=corpus.tagging.max_len)
        elif corpus.labelling.max_len:
            meta.update(max_len=corpus.labelling.max_len, truncate=corpus.labelling.truncate,
                        truncated_documents=corpus.labelling.cut)
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=2)
        result.update(meta=meta, t_tok=t_tok)

    atomic.write_dir(out, fill)
    meta, t_end = result["meta"], time.time()
    tr, va = meta["splits"]["train"], meta["splits"]["val"]
    dropped = "" if meta["duplicates_dropped"] is None else f"{meta['duplicates_dropped']:,} duplicates dropped; "
    log(f"wrote {out}: train {tr['tokens']:,} tokens / {tr['documents']:,} docs in {len(tr['shards'])} shard(s), "
        f"val {va['tokens']:,} tokens / {va['documents']:,} docs; {meta['masked_tokens']:,} masked tokens; "
        f"{corpus.skipped} skipped records; {dropped}{_labels_said(meta)}{t_end - t0:.1f}s in all, "
        f"{meta['tokens'] / (t_end - result['t_tok']):,.0f} tokens/s tokenizing")
    return meta


def _labels_said(meta):
    """The summary's words on labels and cut documents ("" for neither)."""
    said = ""
    if meta.get("has_labels"):
        said += f"{len(meta['labels']):,} labels ({'multilabel' if meta['multilabel'] else 'one per document'}); "
    if meta.get("has_tags"):
        said += (f"{len(meta['tags']):,} tags on {sum(sum(c) for c in meta['tag_counts'].values()):,} words "
                 f"({sum(meta['ignored_words'].values()):,} words ignored); ")
        if meta.get("max_len"):
            said += f"{meta['split_sentences']:,} sentences split at --max_len {meta['max_len']}; "
    elif meta.get("max_len"):
        said += (f"{meta['truncated_documents']:,} documents cut to --max_len {meta['max_len']} "
                 f"(keeping their {meta['truncate']}); ")
    return said


def _tokenizer_into(tmp, corpus, tokenizer_path, vocab_size, seed):
    """Train or copy the tokenizer to tmp/tokenizer.model; returns (tokenizer, its source)."""
    model_path = os.path.join(tmp, "tokenizer.model")
    if vocab_size:
        train_vocab(corpus, model_path, vocab_size, seed)
        source = f"trained (--vocab_size {vocab_size})"
    else:
        try:
            tok = load_tokenizer(tokenizer_path)
        except TokenizerError as e:
            raise PrepareError(f"--tokenizer {tokenizer_path}: {e}") from None
        source = os.path.abspath(tok.path)
        shutil.copyfile(source, model_path)
        return tok, source  # loaded once: the copy is the same bytes
    return load_tokenizer(model_path), source


def _write_splits(tmp, corpus, docs, tok, workers, seed, val_fraction, shard_tokens):
    """Stream the corpus's docs through the tokenizer into train/val shards; returns (each split's stats,
    documents per record kind)."""
    writers = {s: SplitWriter(tmp, s, tok.n_words, shard_tokens) for s in shards.SPLITS}
    labelling, tagging = corpus.labelling, corpus.tagging
    # Each split holds back its document nearest the threshold (train: lowest hash, val: highest)
    # so that one can be moved if the other split ends up empty.
    held, assigned = {"train": None, "val": None}, {"train": 0, "val": 0}
    kinds = {"text": 0, "instruct": 0, "chat": 0}  # and "tagged", in a tagged dataset
    done_docs, done_tokens, t_start, last_log = 0, 0, time.time(), time.time()
    for doc, u, ids, mask, masked, error, word_of in encode_all(docs, tok, workers, seed):
        split = "val" if u < val_fraction else "train"
        try:
            pieces = _pieces(doc, ids, mask, error, word_of, labelling, tagging)
        except RecordError as e:
            corpus.skip(e, quiet=False)
            continue
        kinds[doc.kind] = kinds.get(doc.kind, 0) + 1
        assigned[split] += 1
        done_docs, done_tokens = done_docs + 1, done_tokens + sum(len(p[0]) for p in pieces)
        item, h = (u, pieces), held[split]
        if h is None or (u < h[0] if split == "train" else u > h[0]):
            held[split], item = item, h
        if item is not None:
            for piece in item[1]:
                writers[split].add(*piece)
        if time.time() - last_log > 3:
            last_log = time.time()
            log(f"{done_docs:,} documents, {done_tokens:,} tokens, {done_tokens / (last_log - t_start):,.0f} tokens/s")
    _place_held(writers, held, assigned, labelling.labelled or tagging.tagged, val_fraction)
    stats = {s: w.finish() for s, w in writers.items()}
    if labelling.labelled:
        write_label_files(tmp, writers, labelling)
    if tagging.tagged:
        finish_tag_files(tmp, writers, tagging)
    if not any(st["masked_tokens"] for st in stats.values()):  # plain text: no sidecars at all
        for st in stats.values():
            for shard in st["shards"]:
                for ext in SIDECARS:
                    os.remove(os.path.join(tmp, shard["file"][: -len(".bin")] + ext))
    return stats, kinds


def _pieces(doc, ids, mask, error, word_of, labelling, tagging):
    """[(ids, mask, n_masked, label ids or None, tags or None)]: the documents one doc becomes
    (a tagged sentence longer than --max_len: several); RecordError for a bad one."""
    if error or labelling.labelled and not isinstance(doc, LabelledDoc):
        raise RecordError(f"{doc.where}: {error or 'no labels, in a labelled dataset'}")
    if tagging.tagged and not isinstance(doc, TaggedDoc):
        raise RecordError(f"{doc.where}: not a tagged record (tokens and tags), in a tagged dataset")
    if isinstance(doc, TaggedDoc):
        return [(piece, np.ones(len(piece), np.uint8), 0, None, tags)
                for piece, tags in tagging.pieces(doc, ids, word_of)]
    ids, mask = labelling.shorten(ids, mask)
    labels = labelling.intern(doc.labels) if isinstance(doc, LabelledDoc) else None
    return [(ids, mask, len(mask) - int(mask.sum()), labels, None)]


def _place_held(writers, held, assigned, labelled, val_fraction):
    """Write each split's held-back document, first moving one over to a split left empty."""
    total = sum(assigned.values())
    if total == 0:
        raise PrepareError("no documents in the input")
    if total == 1 and labelled:
        raise PrepareError("one labelled (or tagged) record in the input: such a dataset needs two or more "
                           "(train and val)")
    if total == 1:  # nanoGPT's rule: the last val_fraction of the one document's tokens are val
        (ids, mask, _, _, _), = (held["train"] or held["val"])[1]
        cut = min(len(ids) - 1, max(1, round(len(ids) * (1 - val_fraction))))
        log(f"one document in the input: its last {len(ids) - cut:,} of {len(ids):,} tokens are the val split")
        for split, part in (("train", slice(0, cut)), ("val", slice(cut, None))):
            writers[split].add(ids[part], mask[part], len(mask[part]) - int(mask[part].sum()))
        held = {}
    elif assigned["val"] == 0:
        held["val"], held["train"] = held["train"], None
    elif assigned["train"] == 0:
        held["train"], held["val"] = held["val"], None
    for split, h in held.items():
        if h is not None:
            for piece in h[1]:
                writers[split].add(*piece)


def write_label_files(tmp, writers, labelling):
    """The .labels sidecar of every shard (data/shards.py), in the final vocabulary; sets
    labelling.meta, meta.json's part: the vocabulary and each label's count per split."""
    names, remap = labelling.final()
    counts = {}
    for split, writer in writers.items():
        bounds = np.cumsum([0] + [shard["tokens"] for shard in writer.shards])
        per_shard = [[] for _ in writer.shards]
        count = np.zeros(len(names), dtype=np.int64)
        for start, ids in writer.doc_labels:
            k = int(np.searchsorted(bounds, start, side="right")) - 1
            final = remap[ids] if ids else np.zeros(0, np.int64)
            per_shard[k].append((start - int(bounds[k]), final.tolist()))
            count[final] += 1
        for shard, documents in zip(writer.shards, per_shard):
            shards.write_labels(os.path.join(tmp, shard["file"][: -len(".bin")] + ".labels"), documents, len(names),
                                bool(labelling.multilabel))
        counts[split] = count.tolist()
    labelling.meta = {"has_labels": True, "labels": names, "multilabel": bool(labelling.multilabel),
                      "label_counts": counts}


def finish_tag_files(tmp, writers, tagging):
    """Each shard's .tags sidecar in the final vocabulary (Tagging's provisional values mapped), its
    header completed; sets tagging.meta, meta.json's part: the tags and each one's words per split."""
    names, remap, convert = tagging.final()
    for writer in writers.values():
        for shard in writer.shards:
            path = os.path.join(tmp, shard["file"][: -len(".bin")] + ".tags")
            values = convert(shards.open_shard(path))
            shards.write_tags(path, values, len(names))
    counts, ignored = {}, {}
    for split, writer in writers.items():
        count = np.zeros(len(names), dtype=np.int64)
        words = np.zeros(len(tagging.ids), np.int64)
        words[:len(writer.tag_words)] = writer.tag_words
        np.add.at(count, remap[np.arange(len(words))], words)  # provisional -> final ids
        counts[split], ignored[split] = count.tolist(), writer.ignored_words
    tagging.meta = {"has_tags": True, "tags": names, "tag_counts": counts, "ignored_words": ignored,
                    "ignore_tags": sorted(tagging.ignore), "label_all_subwords": tagging.all_subwords,
                    "split_sentences": tagging.split}


def _meta(tok, source, stats, kinds, skipped, val_fraction, seed, shard_tokens, command):
    # Instruction and chat records always mask their prompt, so has_mask says whether there are
    # any, and docs files go with the masks.
    has_mask = any(st["masked_tokens"] for st in stats.values())
    return {
        "format_version": FORMAT_VERSION,
        "vocab_size": tok.n_words, "bos_id": tok.bos_id, "eos_id": tok.eos_id,
        "dtype": np.dtype(shards.token_format(tok.n_words)[2]).name, "has_mask": has_mask,
        "has_docs": has_mask,
        "tokenizer": {"kind": tok.kind, "sha256": tok.sha256, "fingerprint": tok.fingerprint, "file": "tokenizer.model",
                      "source": source},
        "documents": sum(st["documents"] for st in stats.values()),
        "tokens": sum(st["tokens"] for st in stats.values()),
        "masked_tokens": sum(st["masked_tokens"] for st in stats.values()),
        "records": kinds, "skipped_records": skipped,
        "val_fraction": val_fraction, "seed": seed, "shard_tokens": shard_tokens,
        "splits": stats, "command": command,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


# ---------------------------------------------------------------------------------------------
# command line


# Each flag's range, checked by cli before any work (the types come from the annotations).
CHECKS = {"input": non_empty, "out": non_empty, "tokenizer": non_empty, "vocab_size": at_least(260),
          "text_column": non_empty, "columns": non_empty, "doc_separator": non_empty,
          "format": one_of("auto", "text", "jsonl", "instruct", "chat"), "val_fraction": interval("(0, 1)"),
          "shard_tokens": positive, "workers": positive, "label_column": non_empty, "label_separator": non_empty,
          "labels": non_empty, "max_len": at_least(3), "truncate": one_of("start", "end"), "ignore_tags": non_empty}


def main(argv=None):
    """`python -m data.prepare ...`; train.py's demo calls it from Python with a list of arguments."""
    run(cli_prepare, prog="python -m data.prepare", argv=argv, checks=CHECKS)


def cli_prepare(input: str = None, out: str = None, tokenizer: str = None, vocab_size: int = None,
                format: str = "auto", val_fraction: float = 0.005, seed: int = 0, shard_tokens: int = 100_000_000,
                skip_bad: bool = False, workers: int = None, overwrite: bool = False, demo: bool = False,
                text_column: str = None, columns: str = None, doc_separator: str = None, dedup: bool = False,
                label_column: str = None, label_separator: str = None, labels: str = None, max_len: int = None,
                truncate: str = None, label_all_subwords: bool = False, ignore_tags: str = None):
    """Tokenize a corpus into token shards (see data/prepare.py).

    Args:
        input: a file, a directory (searched recursively) or a glob.
        out: the output directory (default for --demo: shards/icd10cm).
        tokenizer: a tokenizer.model, or a checkpoint directory holding one.
        vocab_size: instead of --tokenizer, train a sentencepiece BPE vocabulary of this size on the
            corpus (at least 260: 256 byte pieces, unk, bos, eos and one more).
        format: the record kind; auto decides per record, jsonl = text.
        val_fraction: the share of documents in the validation split.
        seed: seeds the split and the vocabulary's sampling.
        shard_tokens: tokens per shard.
        skip_bad: skip bad records (and count them) instead of stopping at the first.
        workers: tokenizer processes (default: all cores).
        overwrite: replace an --out that holds shards made by data.prepare (never anything else).
        demo: build the ICD-10-CM demo corpus.
        text_column: the CSV/TSV/Parquet column that holds plain text (default: one named text).
        columns: CSV/TSV/Parquet columns as record fields, e.g. instruction=question,output=answer
            (fields: text, instruction, input, output, question, answer, prompt, response,
            completion, system, tokens, tags); tokens and tags also rename JSON fields
            (tokens=words,tags=ner_tags).
        doc_separator: a regular expression that splits text files into documents, such as
            '\\n\\s*\\n' for a blank line (default: each text file is one document).
        dedup: drop exact duplicate documents (counted in the summary and meta.json).
        label_column: the field or column holding each record's label(s) (JSON default: "label",
            one, or "labels", a list); labelled records make labelled shards (data/shards.py).
        label_separator: split each label cell into a list of labels (multilabel), e.g. ';'.
        labels: the label (or tag) vocabulary in order, comma-separated (default: the labels seen,
            sorted); a record with another label is a bad record. Integer tags index it.
        max_len: cut each document to this many tokens (BOS and EOS kept); split a tagged sentence.
        truncate: start keeps a cut document's start (default), end keeps its end.
        label_all_subwords: tagged data: every token of a word carries its tag, not only its first.
        ignore_tags: tagged data: tags whose words carry no target, comma-separated (default IGN).
    """
    if demo:
        if input:
            raise UsageError("--demo builds its own corpus; drop --input")
        if not tokenizer and not vocab_size:
            vocab_size = 4096
        out = out or os.path.join(ROOT, "shards", "icd10cm")
    elif not input or not out:
        raise UsageError("--input and --out are required (or --demo)")
    if bool(tokenizer) == bool(vocab_size):
        raise UsageError("give exactly one of --tokenizer and --vocab_size")
    record_columns = parse_columns(text_column, columns)
    if label_column and record_columns:  # picked beside the text columns, under its own name
        record_columns.append((label_column, label_column))
    labelling = labelling_from_flags(label_column, label_separator, labels, max_len, truncate)
    tagging = Tagging(labelling.fixed, ignore_tags_flag(ignore_tags), label_all_subwords, max_len)
    check_separator(doc_separator)
    corpus = DemoCorpus() if demo else Corpus(input, format, skip_bad, record_columns, doc_separator, labelling, tagging)
    prepare(corpus, out, tokenizer_path=tokenizer, vocab_size=vocab_size, val_fraction=val_fraction, seed=seed,
            shard_tokens=shard_tokens, workers=workers, overwrite=overwrite, command=command_line(), dedup=dedup)


def ignore_tags_flag(ignore_tags):
    """The tags --ignore_tags names (default IGN)."""
    if ignore_tags is None:
        return ("IGN",)
    return tuple(name.strip() for name in ignore_tags.split(",") if name.strip())


def check_separator(doc_separator):
    """--doc_separator must be a regular expression that never matches the empty string."""
    if doc_separator:
        try:
            if re.compile(doc_separator).fullmatch(""):
                raise UsageError(f"--doc_separator {doc_separator!r}: matches the empty string")
        except re.error as e:
            raise UsageError(f"--doc_separator {doc_separator!r}: not a regular expression ({e})") from None


def labelling_from_flags(label_column, label_separator, labels, max_len, truncate):
    """The Labelling of --label_column, --label_separator, --labels, --max_len and --truncate."""
    if truncate and not max_len:
        raise UsageError(f"--truncate {truncate}: needs --max_len (the length to cut documents to)")
    fixed = None
    if labels is not None:
        fixed = [name.strip() for name in labels.split(",")]
        if not all(fixed) or len(set(fixed)) != len(fixed):
            raise UsageError(f"--labels {labels}: expected distinct, non-empty names, comma-separated")
    return Labelling(label_column, label_separator, fixed, max_len, truncate or "start")


def parse_columns(text_column, columns):
    """[(record field, column)] from --text_column or --columns, or None (the header's names)."""
    if text_column and columns:
        raise UsageError("give --text_column or --columns, not both")
    if text_column:
        return [("text", text_column)]
    if not columns:
        return None
    pairs = []
    for item in columns.split(","):
        field, equals, column = (part.strip() for part in item.partition("="))
        if not equals or not field or not column:
            raise UsageError(f"--columns {columns}: expected field=column,... "
                             f"(e.g. instruction=question,output=answer)")
        if field not in RECORD_FIELDS:
            raise UsageError(f"--columns: unknown field '{field}' (known: {', '.join(RECORD_FIELDS)})")
        pairs.append((field, column))
    return pairs


if __name__ == "__main__":
    main()
