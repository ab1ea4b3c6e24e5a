"""Token shards: the on-disk format, a validator, and the distributed loader.

Format (llm.c's, so its tools and ours read each other's files): a header of 256
little-endian int32 ([0] magic, [1] version, [2] token count), then the tokens.

    magic 20240520, version 1: uint16 tokens (vocab <= 65536: Llama 2, small sentencepiece)
    magic 20240801, version 7: uint32 tokens (Llama 3)
    magic 20241123, version 1: NAME.mask sidecar, one uint8 per token, 1 = training target
    magic 20241124, version 1: NAME.docs sidecar, one uint8 per token, 1 = a document starts here
    magic 20241125, version 1: NAME.labels sidecar (labelled shards, below), int32 values
    magic 20241126, version 1: NAME.tags sidecar (tagged shards, below), one int32 per token

A split is the concatenation of its shards in name order (train_000000.bin, train_000001.bin,
...); documents may run across a shard boundary. A dataset has mask files for every shard or
for none (none = every token is a target), and likewise docs files (none = a document starts at
every BOS token). A document is a whole record: a text, an instruction record or a whole dialog.
Docs files exist because BOS is not always a document start: Llama 2's chat layout puts a BOS
before every exchange of a dialog. DIR/meta.json describes the whole thing ("has_mask",
"has_docs", "has_labels").

Labelled shards (data.prepare on records with labels): every record is one document, BOS text EOS,
and each shard has a NAME.labels sidecar listing the documents that start in it. Its header is the
usual 256 int32 with [2] = the number of int32 values after the header (so the file size checks
as for the other files), [3] = the number of documents listed, [4] = the number of labels in the
vocabulary, [5] = 1 for a multilabel dataset, 0 for a single-label one. Then, per document in
token order, int32 values

    start  k  id_1 ... id_k

start: the token offset of its BOS in this shard; k: how many labels it has (always 1 when
single-label; 0 or more when multilabel); ids: indices into meta.json's "labels", ascending. A
document ends where the next one starts (in this shard or a later one) or at the end of the
split, and may run across a shard boundary like any other. Sparse ids rather than a bitset: a
clinical note carries a handful of ~1,300 ICD codes. meta.json holds "labels" (the vocabulary,
sorted, or as --labels gave it), "multilabel", and "label_counts" {split: [documents carrying
each label, in vocabulary order]}. Labelled shards are still plain text shards to DataLoader
(no mask or docs files: a document starts at each BOS); LabelledLoader reads the labels.

Tagged shards (data.prepare on tagged records: {"tokens": [words], "tags": [tags]} or CoNLL): every
sentence (or each piece of one longer than --max_len, split at word boundaries) is one document,
BOS words EOS, the words joined by spaces; a document starts at each BOS. Each shard has a
NAME.tags sidecar: the usual 256-int32 header ([2] = the token count, as the shard's, [3] = the
number of tags in the vocabulary), then one int32 per token: the tag id (an index into
meta.json's "tags") on each word's first token (with --label_all_subwords on its every token, a
B-X word's later tokens as I-X), and -100 on every other token (BOS, EOS, later sub-word tokens,
words tagged IGN or --ignore_tags): -100 is the ignore index of the loss and of the metrics.
meta.json holds "has_tags", "tags" (the vocabulary, sorted, or as --labels gave it), "tag_counts"
{split: [words carrying each tag]}, "ignored_words" {split: n}, "ignore_tags",
"label_all_subwords", "split_sentences" and "max_len". To DataLoader they are plain text shards;
TaggedLoader reads the tags (TagBatch).

A directory of llm.c / nano-llama31 shards has no meta.json (say fineweb_train_000001.bin,
fineweb_val_000000.bin): infer_meta reads it as it is. The splits come from "train" / "val" in
the file names, the token width from the headers, the document start token from the first token
of the train split (llm.c starts every document with GPT-2's <|endoftext|>, nano-llama31 with
Llama 3's <|begin_of_text|>), and the vocabulary from the tokenizer that validate() is given.
"""
import os
import re
from collections import namedtuple

import numpy as np

import atomic
import jsonfile
import tokenizer

HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
MAGIC_U16, VERSION_U16 = 20240520, 1
MAGIC_U32, VERSION_U32 = 20240801, 7
MAGIC_MASK, VERSION_MASK = 20241123, 1
MAGIC_DOCS, VERSION_DOCS = 20241124, 1
MAGIC_LABELS, VERSION_LABELS = 20241125, 1
MAGIC_TAGS, VERSION_TAGS = 20241126, 1
IGNORE_INDEX = -100  # a token without a tag, in a .tags file and in TagBatch.targets
# (magic, version) -> element type of the payload
FORMATS = {
    (MAGIC_U16, VERSION_U16): np.dtype("<u2"),
    (MAGIC_U32, VERSION_U32): np.dtype("<u4"),
    (MAGIC_MASK, VERSION_MASK): np.dtype("u1"),
    (MAGIC_DOCS, VERSION_DOCS): np.dtype("u1"),
    (MAGIC_LABELS, VERSION_LABELS): np.dtype("<i4"),
    (MAGIC_TAGS, VERSION_TAGS): np.dtype("<i4"),
}
SPLITS = ("train", "val")
# The files a shard directory consists of (data.prepare's and llm.c's), which no output replaces.
SHARD_FILES = ("*.bin", "*.mask", "*.docs", "*.labels", "*.tags", "meta.json", "tokenizer.model")
# llm.c / nano-llama31 shard names: the split is a word of the name (tinyshakespeare_val.bin)
SPLIT_IN_NAME = re.compile(r"(?:^|[_.-])(train|val)(?:[_.-]|$)")


class ShardError(ValueError):
    """A shard directory that cannot be trained on; the message names the file."""


def token_format(vocab_size):
    """(magic, version, dtype) for token ids below vocab_size."""
    if vocab_size <= 65536:
        return MAGIC_U16, VERSION_U16, FORMATS[MAGIC_U16, VERSION_U16]
    return MAGIC_U32, VERSION_U32, FORMATS[MAGIC_U32, VERSION_U32]


def make_header(magic, version, count):
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = magic, version, count
    return header.tobytes()


def read_header(path):
    """(magic, version, count, dtype) of a shard, mask or docs file, checked against its size."""
    try:
        with open(path, "rb") as f:
            raw = f.read(HEADER_BYTES)
        size = os.path.getsize(path)
    except OSError as e:
        raise ShardError(f"{path}: cannot read ({e.strerror})") from None
    if len(raw) < HEADER_BYTES:
        raise ShardError(f"{path}: too short for a shard header ({len(raw)} bytes)")
    magic, version, count = (int(v) for v in np.frombuffer(raw, dtype="<i4", count=3))
    dtype = FORMATS.get((magic, version))
    if dtype is None:
        raise ShardError(f"{path}: unknown magic/version {magic}/{version}")
    expected = HEADER_BYTES + count * dtype.itemsize
    if count < 0 or size != expected:
        raise ShardError(f"{path}: header says {count} tokens ({expected} bytes) but the file has {size} bytes")
    return magic, version, count, dtype


def _write_atomic(path, header, payload):
    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(header)
            f.write(payload.tobytes())

    atomic.write_file(path, write)  # a reader never sees a half-written shard


def write_shard(path, tokens, vocab_size):
    """Write token ids (any int array) as one shard, uint16 or uint32 depending on vocab_size."""
    magic, version, dtype = token_format(vocab_size)
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
        raise ShardError(f"{path}: token ids outside [0, {vocab_size})")
    _write_atomic(path, make_header(magic, version, tokens.size), tokens.astype(dtype))


def write_mask(path, mask):
    mask = np.asarray(mask, dtype=np.uint8)
    _write_atomic(path, make_header(MAGIC_MASK, VERSION_MASK, mask.size), mask)


def write_docs(path, docs):
    """docs: one 0/1 per token of the shard, 1 where a document starts."""
    docs = np.asarray(docs, dtype=np.uint8)
    _write_atomic(path, make_header(MAGIC_DOCS, VERSION_DOCS, docs.size), docs)


def write_labels(path, documents, n_labels, multilabel):
    """documents: [(start token offset in this shard, label ids)] of the documents starting in it."""
    values = [v for start, ids in documents for v in (start, len(ids), *sorted(ids))]
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:6] = MAGIC_LABELS, VERSION_LABELS, len(values), len(documents), n_labels, int(multilabel)
    _write_atomic(path, header.tobytes(), np.asarray(values, dtype="<i4"))


def write_tags(path, tags, n_tags):
    """tags: one int per token of the shard beside it, a tag id below n_tags or IGNORE_INDEX."""
    tags = np.asarray(tags, dtype="<i4")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:4] = MAGIC_TAGS, VERSION_TAGS, tags.size, n_tags
    _write_atomic(path, header.tobytes(), tags)


def read_tags(path, shard_tokens, n_tags):
    """The tags of a .tags file (a read-only memmap) beside a shard of shard_tokens tokens, checked:
    one per token, each a tag id below n_tags (meta.json's) or IGNORE_INDEX."""
    magic, _, count, _ = read_header(path)
    if magic != MAGIC_TAGS:
        raise ShardError(f"{path}: magic {magic} is not a tags file's ({MAGIC_TAGS})")
    with open(path, "rb") as f:
        stated = int(np.frombuffer(f.read(16), dtype="<i4")[3])
    if stated != n_tags:
        raise ShardError(f"{path}: {stated} tags in its header, meta.json lists {n_tags}")
    if count != shard_tokens:
        raise ShardError(f"{path}: {count} tags for {shard_tokens} tokens in its shard")
    tags = open_shard(path)
    bad = (tags != IGNORE_INDEX) & ((tags < 0) | (tags >= n_tags))
    if bad.any():
        raise ShardError(f"{path}: tag {int(tags[bad][0])} at token {int(np.flatnonzero(bad)[0])} is neither "
                         f"{IGNORE_INDEX} nor one of the {n_tags} tags")
    return tags


LabelSidecar = namedtuple("LabelSidecar", "starts offsets ids n_labels multilabel")
LabelSidecar.__doc__ = """A .labels file read: document i starts at token starts[i] of its shard
and has the label ids ids[offsets[i]:offsets[i+1]] (int64 arrays)."""


def read_labels(path, shard_tokens):
    """The LabelSidecar of a .labels file beside a shard of shard_tokens tokens, checked through."""
    magic, _, count, _ = read_header(path)
    if magic != MAGIC_LABELS:
        raise ShardError(f"{path}: magic {magic} is not a labels file's ({MAGIC_LABELS})")
    with open(path, "rb") as f:
        n_docs, n_labels, multilabel = (int(v) for v in np.frombuffer(f.read(24), dtype="<i4")[3:6])
    values = np.asarray(open_shard(path), dtype=np.int64)
    starts, offsets, ids, at = [], [0], [], 0
    while at < count and len(starts) < n_docs:
        k = int(values[at + 1]) if at + 1 < count else -1
        if k < 0 or at + 2 + k > count or (not multilabel and k != 1):
            raise ShardError(f"{path}: document {len(starts)} has a bad label count {k}")
        starts.append(int(values[at]))
        ids.append(values[at + 2:at + 2 + k])
        offsets.append(offsets[-1] + k)
        at += 2 + k
    ids = np.concatenate(ids) if ids else np.zeros(0, np.int64)
    if at != count or len(starts) != n_docs:
        raise ShardError(f"{path}: {n_docs} documents in the header, but the values hold {len(starts)} "
                         f"and {count - at} values more")
    if np.any(np.diff(starts) <= 0) or (starts and not 0 <= starts[0] <= starts[-1] < shard_tokens):
        raise ShardError(f"{path}: document starts are not increasing offsets inside the shard's {shard_tokens} tokens")
    if ids.size and (ids.min() < 0 or ids.max() >= n_labels):
        raise ShardError(f"{path}: label id {int(ids.max() if ids.max() >= n_labels else ids.min())} "
                         f"outside the {n_labels} labels")
    return LabelSidecar(np.asarray(starts, np.int64), np.asarray(offsets, np.int64), ids, n_labels, bool(multilabel))


def open_shard(path):
    """The payload of a shard, mask or docs file as a read-only memmap (header checked)."""
    _, _, count, dtype = read_header(path)
    if count == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(count,))


def load_meta(data_dir, infer=True):
    """DIR/meta.json, checked; without one (and with infer), what infer_meta reads from the shards."""
    data_dir = atomic.readable(data_dir)  # a swap a crash interrupted is finished first
    path = os.path.join(data_dir, "meta.json")
    if infer and not os.path.exists(path) and os.path.isdir(data_dir):
        return infer_meta(data_dir)
    if not os.path.exists(path):
        raise ShardError(f"{path}: missing (is {data_dir} a directory made by data.prepare?)")
    meta = jsonfile.load(path, ShardError, bad="unreadable")
    # a hand-edited file may say anything: the keys everything relies on are checked here
    jsonfile.field(meta, "vocab_size", int, path, ShardError, positive=True)
    for key in ("bos_id", "eos_id"):
        if jsonfile.field(meta, key, int, path, ShardError) < 0:
            raise ShardError(f"{path}: {key} is {meta[key]}, not an integer of at least 0")
    splits = jsonfile.field(meta, "splits", dict, path, ShardError)
    for split in splits:
        listed = jsonfile.field(splits, split, dict, f"{path}: splits", ShardError)
        jsonfile.field(listed, "shards", list, f"{path}: splits.{split}", ShardError)
    jsonfile.field(splits, "train", dict, f"{path}: splits", ShardError)
    jsonfile.field(meta, "tokenizer", dict, path, ShardError, default={})
    if meta.get("has_labels"):
        _check_label_meta(meta, path)
    if meta.get("has_tags"):
        names = jsonfile.field(meta, "tags", list, path, ShardError)
        if not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names):
            raise ShardError(f"{path}: 'tags' must be distinct non-empty strings")
    return meta


def _check_label_meta(meta, path):
    """A labelled dataset's vocabulary: distinct non-empty names, and whether it is multilabel."""
    names = jsonfile.field(meta, "labels", list, path, ShardError)
    if not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names):
        raise ShardError(f"{path}: 'labels' must be distinct non-empty strings")
    jsonfile.field(meta, "multilabel", bool, path, ShardError)


def infer_meta(data_dir):
    """The meta of a directory of llm.c / nano-llama31 shards without meta.json ("inferred": true;
    vocab_size None until validate() is given the tokenizer's). Raises ShardError naming the file."""
    names, listing = {split: [] for split in SPLITS}, sorted(os.listdir(data_dir))
    sidecar = next((name for name in listing if name.endswith((".mask", ".docs", ".labels", ".tags"))), None)
    if sidecar:  # data.prepare's shards: without meta.json, nothing would say the masks are there
        raise ShardError(f"{os.path.join(data_dir, 'meta.json')}: missing, yet {sidecar} is there; "
                         f"re-run data.prepare")
    for name in listing:
        found = SPLIT_IN_NAME.findall(name[: -len(".bin")]) if name.endswith(".bin") else []
        if len(set(found)) == 1:  # a name that says both train and val says nothing
            names[found[0]].append(name)
    if not names["train"] or not names["val"]:
        raise ShardError(f"{os.path.join(data_dir, 'meta.json')}: missing (is {data_dir} a directory made by "
                         f"data.prepare, or of llm.c shards named *_train_*.bin and *_val_*.bin?)")
    meta = {"inferred": True, "vocab_size": None, "eos_id": None, "has_mask": False, "has_docs": False, "splits": {}}
    for split, files in names.items():
        listed = []
        for name in files:
            magic, _, count, dtype = read_header(os.path.join(data_dir, name))
            if magic not in (MAGIC_U16, MAGIC_U32):
                raise ShardError(f"{os.path.join(data_dir, name)}: magic {magic} is not a token shard's")
            if meta.setdefault("magic", magic) != magic:
                raise ShardError(f"{os.path.join(data_dir, name)}: {dtype} tokens, unlike the other shards there")
            meta["dtype"] = dtype.name
            listed.append({"file": name, "tokens": count})
        meta["splits"][split] = {"shards": listed, "tokens": sum(shard["tokens"] for shard in listed)}
    first = next((name for name in names["train"] if open_shard(os.path.join(data_dir, name)).size), None)
    if first is None:
        raise ShardError(f"{os.path.join(data_dir, names['train'][0])}: the train split has no tokens")
    meta["bos_id"] = int(open_shard(os.path.join(data_dir, first))[0])
    return meta


def shard_paths(data_dir, meta, split):
    """[(tokens_path, mask_path or None, docs_path or None)] of a split, in order, as meta.json
    lists them."""
    if split not in meta["splits"]:
        raise ShardError(f"{data_dir}/meta.json: no '{split}' split")
    out = []
    for shard in meta["splits"][split]["shards"]:
        name = shard.get("file") if isinstance(shard, dict) else None
        # a bare file name: meta.json must not lead the loader out of its own directory
        if not isinstance(name, str) or os.path.basename(name) != name or not name.endswith(".bin"):
            raise ShardError(f"{os.path.join(data_dir, 'meta.json')}: shard name {name!r} in split '{split}' "
                             f"is not a .bin file inside {data_dir}")
        path = os.path.join(data_dir, name)
        stem = path[: -len(".bin")]
        out.append((path, stem + ".mask" if meta.get("has_mask") else None,
                    stem + ".docs" if meta.get("has_docs") else None))
    return out


def label_paths(data_dir, meta, split):
    """The .labels file beside each shard of a split (shard_paths' order)."""
    return [path[: -len(".bin")] + ".labels" for path, _, _ in shard_paths(data_dir, meta, split)]


def split_labels(data_dir, meta, split):
    """(starts, offsets, ids) of every document of a labelled split, starts counted in the split's
    concatenated stream: document i is tokens [starts[i], starts[i+1]) (the last one runs to the
    end) with label ids ids[offsets[i]:offsets[i+1]]. Checks the .labels files against meta.json."""
    if not meta.get("has_labels"):
        raise ShardError(f"{os.path.join(data_dir, 'meta.json')}: these shards have no labels "
                         f"(made by data.prepare from records without a label field)")
    starts, offsets, ids, base, n_ids = [], [np.zeros(1, np.int64)], [], 0, 0
    for path, label_path in zip([p for p, _, _ in shard_paths(data_dir, meta, split)], label_paths(data_dir, meta, split)):
        count = read_header(path)[2]
        side = read_labels(label_path, count)
        if side.n_labels != len(meta["labels"]) or side.multilabel != meta["multilabel"]:
            raise ShardError(f"{label_path}: {side.n_labels} labels, multilabel {side.multilabel}; meta.json says "
                             f"{len(meta['labels'])}, multilabel {meta['multilabel']}")
        starts.append(side.starts + base)
        offsets.append(side.offsets[1:] + n_ids)  # a shard may have no document starting in it
        ids.append(side.ids)
        n_ids += len(side.ids)
        base += count
    starts = np.concatenate(starts) if starts else np.zeros(0, np.int64)
    listed = meta["splits"][split].get("documents", len(starts))
    if listed != len(starts):
        raise ShardError(f"{os.path.join(data_dir, 'meta.json')}: split '{split}' has {listed!r} documents, "
                         f"its .labels files {len(starts)}")
    if base and (not starts.size or starts[0] != 0):
        raise ShardError(f"{label_paths(data_dir, meta, split)[0]}: the split's first token does not start a document")
    return starts, np.concatenate(offsets), np.concatenate(ids) if ids else np.zeros(0, np.int64)


def split_tags(data_dir, meta, split):
    """(tokens, tags) of a tagged split: each a list of its shards' arrays (memmaps), the tags
    checked (read_tags)."""
    if not meta.get("has_tags"):
        raise ShardError(f"{os.path.join(data_dir, 'meta.json')}: these shards have no tags (made by "
                         f"data.prepare from records without tokens and tags)")
    tokens, tags = [], []
    for path, _, _ in shard_paths(data_dir, meta, split):
        tokens.append(open_shard(path))
        tags.append(read_tags(path[: -len(".bin")] + ".tags", len(tokens[-1]), len(meta["tags"])))
    return tokens, tags


def _check_sidecar(path, magic, what, count, shard_path):
    """Open a mask or docs file that must hold `count` 0/1 values, one per token of shard_path."""
    got, _, got_count, _ = read_header(path)
    if got != magic:
        raise ShardError(f"{path}: magic {got} is not a {what} file's ({magic})")
    if got_count != count:
        raise ShardError(f"{path}: {got_count} {what} entries for {count} tokens in {os.path.basename(shard_path)}")
    values = open_shard(path)
    if count and int(values.max()) > 1:
        raise ShardError(f"{path}: {what} values must be 0 or 1")
    return values


def validate(data_dir, split=None, vocab_size=None, tokenizer_sha256=None, tokenizer=None):
    """Check every file of data_dir (or of one split) before training starts; return meta.

    Checks meta.json, each shard's magic/version/size, that the dtype fits the vocabulary, that
    mask and docs files exist where meta says so, align token for token and hold only 0/1 (and
    that each split's stream starts a document), that every id is below
    vocab_size (the model's; default the tokenizer's from meta.json) and, when given, that the
    shards were made with tokenizer (what it encodes: tokenizer.same_tokenizer), or with the
    tokenizer file of sha256 tokenizer_sha256. A directory of llm.c
    shards (no meta.json) records no tokenizer: vocab_size, which it then needs, becomes its
    vocabulary, and uint16 shards are refused for one over 65536 tokens.
    Raises ShardError naming the offending file.
    """
    meta = load_meta(data_dir)
    meta_path = os.path.join(data_dir, "meta.json")
    if meta.get("inferred"):
        _vocabulary_for_inferred(data_dir, meta, vocab_size)
    made_with = meta.get("tokenizer", {})
    given = tokenizer.sha256 if tokenizer is not None else tokenizer_sha256
    same = _made_with(tokenizer, made_with) if tokenizer is not None else made_with.get("sha256") == given
    if given is not None and not same and not meta.get("inferred"):
        raise ShardError(
            f"{meta_path}: shards were made with tokenizer sha256 {str(made_with.get('sha256'))[:12]}..., "
            f"not the given tokenizer's {given[:12]}... (nor one that encodes alike); re-run data.prepare with it"
        )
    limit = vocab_size if vocab_size is not None else meta["vocab_size"]
    expected_magic = meta["magic"] if meta.get("inferred") else token_format(meta["vocab_size"])[0]
    for name in [split] if split else SPLITS:
        paths = shard_paths(data_dir, meta, name)
        if not paths:
            raise ShardError(f"{meta_path}: split '{name}' has no shards")
        for k, ((path, mask_path, docs_path), info) in enumerate(zip(paths, meta["splits"][name]["shards"])):
            magic, _, count, _ = read_header(path)
            if magic != expected_magic:
                raise ShardError(f"{path}: magic {magic} does not match vocab size {meta['vocab_size']} (want {expected_magic})")
            if count != info.get("tokens"):  # a bad entry is not a count either
                raise ShardError(f"{path}: {count} tokens but meta.json says {info.get('tokens')!r}")
            tokens = open_shard(path)
            top = int(tokens.max()) if count else 0
            if top >= limit:
                raise ShardError(f"{path}: token id {top} is beyond the vocabulary size {limit}")
            if mask_path is not None:
                _check_sidecar(mask_path, MAGIC_MASK, "mask", count, path)
            if docs_path is not None:
                docs = _check_sidecar(docs_path, MAGIC_DOCS, "docs", count, path)
                if k == 0 and count and docs[0] != 1:
                    raise ShardError(f"{docs_path}: the split's first token does not start a document")
        if meta.get("has_labels"):
            split_labels(data_dir, meta, name)
        if meta.get("has_tags"):
            split_tags(data_dir, meta, name)
    return meta


def _made_with(tok, made_with):
    return tokenizer.same_tokenizer(tok, made_with.get("sha256"), made_with.get("fingerprint"))


def _vocabulary_for_inferred(data_dir, meta, vocab_size):
    """Shards without meta.json take the given tokenizer's vocabulary, if their token width fits it."""
    if vocab_size is None:
        raise ShardError(f"{data_dir}: no meta.json, so the vocabulary must come from a tokenizer "
                         f"(the checkpoint's, or a tokenizer.model in {data_dir})")
    if meta["magic"] == MAGIC_U16 and vocab_size > 65536:
        raise ShardError(f"{data_dir}: uint16 shards (llm.c's GPT-2 ones?) cannot hold the ids of a "
                         f"{vocab_size}-token vocabulary; use shards made with this tokenizer")
    meta["vocab_size"] = vocab_size


def open_split(data_dir, meta, split):
    """([tokens], [mask or None], [docs or None]) of a split's shards, as read-only memmaps."""
    tokens, masks, docs = [], [], []
    for path, mask_path, docs_path in shard_paths(data_dir, meta, split):
        tokens.append(open_shard(path))
        for side_path, sides in ((mask_path, masks), (docs_path, docs)):
            sides.append(open_shard(side_path) if side_path else None)
            if side_path and len(sides[-1]) != len(tokens[-1]):
                raise ShardError(f"{side_path}: length differs from {path}")
    return tokens, masks, docs


def read_stream(arrays, starts, start, n):
    """n items at offset start of the stream that is arrays (one per shard, shard i beginning at
    starts[i]) end to end, crossing shard boundaries."""
    parts, i = [], int(np.searchsorted(starts, start, side="right")) - 1
    while n > 0:
        lo = start - starts[i]
        chunk = arrays[i][lo : lo + n]
        parts.append(chunk)
        start, n, i = start + len(chunk), n - len(chunk), i + 1
    return np.concatenate(parts) if len(parts) > 1 else parts[0]


Batch = namedtuple("Batch", "inputs targets positions")
Batch.__doc__ = """inputs, targets, positions: int64 tensors of shape (batch_size, seq_len)."""


class DataLoader:
    """Deterministic, resumable, rank-strided batches from a shard directory.

    The data: the split's shards concatenated into one stream of N tokens, cut into
    n_windows = (N - 1) // seq_len windows; window w is tokens [w*seq_len, w*seq_len + seq_len + 1)
    (neighbours share one token, so every token but the first is a target once per epoch).
    Global sequence g is window order_e[g % n_windows] with e = g // n_windows, where order_e is
    a permutation seeded by (seed, e) for train and the identity for val.

    The loader keeps one counter, `seq`, shared by all ranks: next_batch() takes the global
    sequences g = seq + i*world_size + rank for i in 0..batch_size-1, then advances seq by
    world_size*batch_size. So row i of rank r is row i*world_size + r of a world_size=1 loader
    with batch_size*world_size rows; and k micro-steps of batch B cover the same sequences as
    one step of batch k*B. Hence an optimizer step of (micro-batch B, world size W, K micro-steps)
    consumes sequences [s*K*W*B, (s+1)*K*W*B) -- the same set for any factorisation of K*W*B.

    next_batch() returns Batch(inputs, targets, positions), int64 (batch_size, seq_len) CPU tensors:
    targets are the next tokens, -100 where the target token's mask is 0; positions count from 0
    at the start of each row and restart at 0 at every document start: where the docs files say
    one starts, or, for datasets without docs files (plain text, and datasets made before them),
    on every BOS token. (Llama 2 chat layouts put a BOS before every exchange of a dialog; the
    docs files keep a whole dialog one document.) Use them for RoPE positions and/or a document
    mask (a new document starts wherever positions == 0).
    state_dict() holds `seq`; restoring it on any rank continues with the very next sequence.
    """

    def __init__(self, data_dir, split, batch_size, seq_len, rank=0, world_size=1, seed=0, shuffle=None):
        import torch  # imported here so data.prepare (which uses this module's format code) starts fast

        self._torch = torch
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, {world_size})")
        self.data_dir, self.split = data_dir, split
        self.batch_size, self.seq_len = batch_size, seq_len
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shuffle = (split == "train") if shuffle is None else shuffle
        meta = load_meta(data_dir)
        self.bos_id = meta["bos_id"]
        self.tokens, self.masks, self.docs = open_split(data_dir, meta, split)
        # starts[i] = offset of shard i in the concatenated stream
        self.starts = np.cumsum([0] + [len(t) for t in self.tokens])
        self.n_tokens = int(self.starts[-1])
        self.n_windows = (self.n_tokens - 1) // seq_len
        if self.n_windows < 1:
            raise ShardError(f"{data_dir}: split '{split}' has {self.n_tokens} tokens, fewer than seq_len+1 = {seq_len + 1}")
        self.seq = 0
        self._orders = {}

    def _order(self, epoch):
        if not self.shuffle:
            return None
        if epoch not in self._orders:
            if len(self._orders) >= 2:  # a batch spans at most two epochs
                self._orders.pop(min(self._orders))
            self._orders[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)
        return self._orders[epoch]

    def _read(self, arrays, start, n):
        return read_stream(arrays, self.starts, start, n)

    def window(self, g):
        """(tokens, mask or None, docs or None) of global sequence g: seq_len + 1 items each."""
        epoch, idx = divmod(g, self.n_windows)
        order = self._order(epoch)
        w = int(order[idx]) if order is not None else idx
        start, n = w * self.seq_len, self.seq_len + 1
        mask = self._read(self.masks, start, n) if self.masks[0] is not None else None
        docs = self._read(self.docs, start, n) if self.docs[0] is not None else None
        return self._read(self.tokens, start, n), mask, docs

    def next_batch(self):
        B, T = self.batch_size, self.seq_len
        buf = np.empty((B, T + 1), dtype=np.int64)
        targets = np.empty((B, T), dtype=np.int64)
        doc_start = np.empty((B, T), dtype=bool)
        for i in range(B):
            tokens, mask, docs = self.window(self.seq + i * self.world_size + self.rank)
            buf[i] = tokens
            targets[i] = tokens[1:]
            if mask is not None:
                targets[i][mask[1:] == 0] = -100
            doc_start[i] = docs[:T] == 1 if docs is not None else tokens[:T] == self.bos_id
        self.seq += B * self.world_size
        inputs = buf[:, :T]
        idx = np.broadcast_to(np.arange(T), (B, T))
        # position = distance to the latest document start at or before it (or to the row start)
        last_start = np.maximum.accumulate(np.where(doc_start, idx, 0), axis=1)
        positions = idx - last_start
        t = self._torch.from_numpy
        return Batch(t(np.ascontiguousarray(inputs)), t(targets), t(positions))

    def reset(self):
        """Back to the first sequence (for repeated evaluation over the val split)."""
        self.seq = 0

    def state_dict(self):
        return {"seq": self.seq, "split": self.split, "seq_len": self.seq_len,
                "n_windows": self.n_windows, "seed": self.seed, "shuffle": self.shuffle}

    def load_state_dict(self, state):
        for key in ("split", "seq_len", "n_windows", "seed", "shuffle"):
            if state[key] != getattr(self, key):
                raise ShardError(f"{self.data_dir}: cannot resume: saved {key}={state[key]!r}, now {getattr(self, key)!r}")
        self.seq = int(state["seq"])


LabelBatch = namedtuple("LabelBatch", "inputs positions valid rows last labels documents epochs")
LabelBatch.__doc__ = """One batch of LabelledLoader: inputs, positions (int64) and valid (bool), all
(batch_size, seq_len); then per document of the batch, row by row and left to right: rows (its
row), last (the column of its last token, EOS), labels (single-label: int64 (n_docs,) label ids;
multilabel: float32 multi-hot (n_docs, n_labels)), documents (its index in the split), epochs (the
epoch its row belongs to: one pass over val keeps those of epoch 0)."""


class LabelledLoader:
    """Deterministic, resumable batches of whole labelled documents (see the labelled shards above).

    Epoch e takes the split's documents in a permutation seeded by (seed, e) (train) or in order
    (val) and lays them into rows of seq_len: packed, each row takes documents while the next one
    fits (next-fit, so a row never splits a document), or padded, one document per row. Rows are
    numbered across epochs; as in DataLoader, one counter `seq` shared by all ranks: next_batch()
    takes the global rows seq + i*world_size + rank, i < batch_size, and advances seq by
    world_size*batch_size. So the global batch of a step is the same set of rows (and documents)
    for any world size and micro-steps with the same world_size*batch_size*grad_accum.

    In a row, positions count 0, 1, ... from each document's start; the padding after the last
    document holds pad_id (the EOS id) and is one more document of its own (positions from 0), so
    a document mask built from positions == 0 keeps it apart; valid is False there. A document
    longer than seq_len cannot be placed: the loader refuses the split (prepare with --max_len).
    state_dict() holds `seq`; restoring it continues with the very next row. One pass over a split
    (evaluation): reset(), then ceil(len(epoch_rows(0)) / (batch_size * world_size)) batches, keeping
    the documents whose epochs entry is 0 (the last batch may run into epoch 1).
    """

    def __init__(self, data_dir, split, batch_size, seq_len, rank=0, world_size=1, seed=0, shuffle=None,
                 padded=False):
        import torch  # imported here so data.prepare (which uses this module's format code) starts fast

        self._torch = torch
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, {world_size})")
        self.data_dir, self.split, self.batch_size, self.seq_len = data_dir, split, batch_size, seq_len
        self.rank, self.world_size, self.seed, self.padded = rank, world_size, seed, padded
        self.shuffle = (split == "train") if shuffle is None else shuffle
        meta = load_meta(data_dir)
        self._read(meta)  # tokens, starts, doc_starts and what each document is labelled with
        self.doc_lengths = np.diff(np.append(self.doc_starts, self.starts[-1]))
        self.n_documents = len(self.doc_starts)
        if self.n_documents == 0:
            raise ShardError(f"{data_dir}: split '{split}' has no documents")
        self._check_lengths(meta)
        self.seq, self._epochs, self._epoch_starts = 0, {}, [0]

    def _read(self, meta):
        """The split's token streams (tokens, starts: their offsets), its documents' first tokens
        (doc_starts) and their labels (the .labels sidecar)."""
        self.doc_starts, self.label_offsets, self.label_ids = split_labels(self.data_dir, meta, self.split)
        self.labels, self.multilabel, self.pad_id = meta["labels"], meta["multilabel"], meta["eos_id"]
        self.tokens, _, _ = open_split(self.data_dir, meta, self.split)
        self.starts = np.cumsum([0] + [len(t) for t in self.tokens])

    def _check_lengths(self, meta):
        max_len, longest = meta.get("max_len"), int(self.doc_lengths.max())
        if max_len is not None and max_len > self.seq_len:
            raise ShardError(f"{self.data_dir}: documents were cut to --max_len {max_len} tokens, more than "
                             f"seq_len {self.seq_len}; prepare with --max_len {self.seq_len} or raise seq_len")
        if longest > self.seq_len:
            raise ShardError(f"{self.data_dir}: split '{self.split}' has a document of {longest} tokens, more than "
                             f"seq_len {self.seq_len}; prepare with --max_len {self.seq_len} or raise seq_len")

    def epoch_rows(self, epoch):
        """The rows of an epoch: a list of arrays of document indices, in row order."""
        if epoch not in self._epochs:
            if len(self._epochs) >= 2:  # a batch spans at most two epochs
                self._epochs.pop(min(self._epochs))
            order = (np.random.default_rng([self.seed, epoch]).permutation(self.n_documents) if self.shuffle
                     else np.arange(self.n_documents))
            self._epochs[epoch] = [order[i:i + 1] for i in range(len(order))] if self.padded else self._pack(order)
        return self._epochs[epoch]

    def _pack(self, order):
        rows, begin, used = [], 0, 0
        for i, length in enumerate(self.doc_lengths[order]):
            if used + length > self.seq_len:
                rows.append(order[begin:i])
                begin, used = i, 0
            used += length
        return rows + [order[begin:]]

    def locate(self, g):
        """(epoch, row within it) of global row g. Epoch sizes vary with the packing: their
        boundaries are kept, each epoch packed once on the way."""
        while g >= self._epoch_starts[-1]:
            self._epoch_starts.append(self._epoch_starts[-1] + len(self.epoch_rows(len(self._epoch_starts) - 1)))
        epoch = int(np.searchsorted(self._epoch_starts, g, side="right")) - 1
        return epoch, g - self._epoch_starts[epoch]

    @property
    def epoch(self):
        """The epoch of the next row (train.py's --epochs counts these)."""
        return self.locate(self.seq)[0]

    def lay_out(self):
        """The next batch's rows: (inputs, positions, valid) arrays (batch_size, seq_len) and, per
        document, row by row and left to right, (row, column, document, length, epoch); advances
        to the batch after it."""
        B, T = self.batch_size, self.seq_len
        inputs = np.full((B, T), self.pad_id, dtype=np.int64)
        positions, valid = np.zeros((B, T), dtype=np.int64), np.zeros((B, T), dtype=bool)
        placed = []
        for i in range(B):
            epoch, row = self.locate(self.seq + i * self.world_size + self.rank)
            column = 0
            for doc in self.epoch_rows(epoch)[row]:
                n = int(self.doc_lengths[doc])
                inputs[i, column:column + n] = read_stream(self.tokens, self.starts, int(self.doc_starts[doc]), n)
                positions[i, column:column + n] = np.arange(n)
                valid[i, column:column + n] = True
                placed.append((i, column, int(doc), n, epoch))
                column += n
            positions[i, column:] = np.arange(T - column)  # the padding: a document of its own
        self.seq += B * self.world_size
        return inputs, positions, valid, placed

    def next_batch(self):
        inputs, positions, valid, placed = self.lay_out()
        t = self._torch
        rows, columns, documents, lengths, epochs = (list(column) for column in zip(*placed)) if placed else ([],) * 5
        last = [c + n - 1 for c, n in zip(columns, lengths)]
        return LabelBatch(t.from_numpy(inputs), t.from_numpy(positions), t.from_numpy(valid), t.tensor(rows, dtype=t.long),
                          t.tensor(last, dtype=t.long), self.label_tensor(documents), t.tensor(documents, dtype=t.long),
                          t.tensor(epochs, dtype=t.long))

    def label_ids_of(self, doc):
        return self.label_ids[self.label_offsets[doc]:self.label_offsets[doc + 1]]

    def label_tensor(self, documents):
        """Single-label: int64 (n,) ids; multilabel: float32 multi-hot (n, n_labels)."""
        t = self._torch
        if not self.multilabel:
            return t.tensor([int(self.label_ids_of(d)[0]) for d in documents], dtype=t.long)
        hot = t.zeros(len(documents), len(self.labels))
        for i, doc in enumerate(documents):
            hot[i, t.from_numpy(self.label_ids_of(doc))] = 1.0
        return hot

    def reset(self):
        """Back to the first row (for repeated evaluation over the val split)."""
        self.seq = 0

    def state_dict(self):
        return {"seq": self.seq, "split": self.split, "seq_len": self.seq_len, "n_documents": self.n_documents,
                "seed": self.seed, "shuffle": self.shuffle, "padded": self.padded}

    def load_state_dict(self, state):
        for key in ("split", "seq_len", "n_documents", "seed", "shuffle", "padded"):
            if state.get(key) != getattr(self, key):
                raise ShardError(f"{self.data_dir}: cannot resume: saved {key}={state.get(key)!r}, "
                                 f"now {getattr(self, key)!r}")
        self.seq = int(state["seq"])


TagBatch = namedtuple("TagBatch", "inputs positions valid targets rows documents epochs")
TagBatch.__doc__ = """One batch of TaggedLoader: inputs, positions (int64), valid (bool) and targets
(int64: each token's tag id, IGNORE_INDEX where it has none and on padding), all (batch_size,
seq_len); then per document of the batch, row by row and left to right: rows (its row), documents
(its index in the split), epochs (the epoch its row belongs to)."""


class TaggedLoader(LabelledLoader):
    """Deterministic, resumable batches of whole tagged documents (see the tagged shards above), laid
    out into rows as LabelledLoader lays out labelled ones (packed or padded; the same global batch
    for any world size; state_dict, reset, one pass over val alike), with each token's tag as its
    target: TagBatch. A document starts at each BOS token (tagged shards have no docs files)."""

    def _read(self, meta):
        """The split's token streams, its documents' first tokens (each BOS) and each token's tag."""
        self.tokens, self.tags = split_tags(self.data_dir, meta, self.split)
        self.labels, self.pad_id = meta["tags"], meta["eos_id"]
        self.starts = np.cumsum([0] + [len(t) for t in self.tokens])
        self.doc_starts = np.concatenate([np.flatnonzero(np.asarray(t) == meta["bos_id"]) + base
                                          for t, base in zip(self.tokens, self.starts)]).astype(np.int64)
        if self.starts[-1] and (not self.doc_starts.size or self.doc_starts[0] != 0):
            raise ShardError(f"{self.data_dir}: split '{self.split}' does not start with BOS (a document start)")

    def next_batch(self):
        inputs, positions, valid, placed = self.lay_out()
        targets = np.full(inputs.shape, IGNORE_INDEX, dtype=np.int64)
        for i, column, doc, n, _ in placed:
            targets[i, column:column + n] = read_stream(self.tags, self.starts, int(self.doc_starts[doc]), n)
        rows, _, documents, _, epochs = zip(*placed) if placed else ([],) * 5
        t = self._torch
        return TagBatch(t.from_numpy(inputs), t.from_numpy(positions), t.from_numpy(valid), t.from_numpy(targets),
                        t.tensor(rows, dtype=t.long), t.tensor(documents, dtype=t.long), t.tensor(epochs, dtype=t.long))
