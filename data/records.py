"""Records: the rows users hand the project (JSONL, one JSON array, CSV / TSV, Parquet), read one
way by data.prepare (corpora), eval.py (--data) and generate.py (--prompts_file), and laid out as
text documents, dialogs, or prompts that end in an open assistant turn.

One error, RecordError (a UserError: cli prints it as one line, exit status 1), whose message
starts with where the record is: FILE:LINE for JSON lines, "FILE: record N" in a JSON array,
"FILE: row N (line M)" in a table. One skip rule: a line of only whitespace (an empty CSV row) is
no record, and is skipped by every reader; anything else is a record or an error.

Reading guide, top to bottom:
    files        file_kind (from the name, in any case), open_binary (.gz and .zst streamed), open_text
    lines        the non-blank lines of a file, each with its FILE:LINE
    JSON         parse (one line to a record), read_jsonl (eval.py), is_jsonl (generate.py),
                 json_records (data.prepare: JSON lines, or one array of records)
    tables       CSV / TSV through the csv module, Parquet through pyarrow: column_picker
    CoNLL        conll_records: word<TAB>tag lines (or whitespace-separated, the tag last), a blank
                 line between sentences, -DOCSTART- skipped; each sentence a {"tokens", "tags"} record
    read_records any record file by its kind (what data.prepare calls); renamed (--columns on JSON)
    layout       record_to_doc: a record as a text document or a finished dialog (data.prepare);
                 prompt_of: a record up to its open assistant turn (generate.py);
                 need: one typed field of a record (eval.py's tasks)
    labels       label_names, label_field: a labelled record's labels (data.prepare --label_column)
    tags         tagged_words: a tagged record's words and raw tags, checked (data.prepare)

Plain standard library (pyarrow and zstandard only when such a file is read): data.prepare imports
this and must not import torch.
"""

import csv
import gzip
import io
import os
import sys
import zlib
from collections import namedtuple

import jsonfile
from cli import UserError

# What a file holds, by how its name ends, compared case-insensitively (NOTES.CSV is a CSV): file_kind
# reads it. .ndjson is another name for JSON lines; a .json file may also be one array of records.
KINDS = {".txt": "text", ".md": "text", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json",
         ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet", ".conll": "conll"}
TABLE_KINDS = ("csv", "tsv", "parquet")
RECORD_KINDS = ("jsonl", "json", "conll") + TABLE_KINDS
COMPRESSIONS = (".gz", ".zst")  # after any of the above but .parquet (which compresses inside)
# what a damaged .gz / .zst raises while it is read (zstandard's error joins when it is imported)
DECOMPRESS_ERRORS = {EOFError, zlib.error, gzip.BadGzipFile}
INSTRUCT_KEYS = [("instruction", "output"), ("question", "answer"), ("prompt", "response"),
                 ("prompt", "completion"), ("input", "output")]
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}

# One document on its way to the tokenizer: where it came from (for messages), its record kind
# (text / instruct / chat) and what to encode: a string, or a list of chat messages.
Doc = namedtuple("Doc", "where kind payload")


class RecordError(UserError):
    """A record (or a record file) that cannot be used: one line, starting with where it is."""


# ---------------------------------------------------------------------------------------------
# Files: what a name says a file holds, and its bytes, decompressed as they are read


def compression(path):
    """".gz" or ".zst" when the file's name says it is compressed (in any case), else None."""
    ext = os.path.splitext(str(path))[1].lower()
    return ext if ext in COMPRESSIONS else None


def file_kind(path):
    """What the (decompressed) file holds, from its name whatever the case: "text", "jsonl", "json",
    "csv", "tsv" or "parquet"; None for a name none of KINDS ends. Every reader that goes by a
    file's name asks this, so DATA.JSONL is never raw text."""
    path = str(path)
    squeezed = compression(path)
    kind = KINDS.get(os.path.splitext(path[: -len(squeezed)] if squeezed else path)[1].lower())
    return None if kind == "parquet" and squeezed else kind


def is_table(path):
    return file_kind(path) in TABLE_KINDS


def open_binary(path):
    """The file's bytes, decompressed on the fly for .gz and .zst: streamed, never read whole."""
    if compression(path) == ".gz":
        return gzip.open(path, "rb")
    if compression(path) == ".zst":
        return io.BufferedReader(ZstdReader(path), 1 << 20)
    return open(path, "rb")


class ZstdReader(io.RawIOBase):
    """A .zst file's decompressed bytes, frame after frame (parallel compressors write many). A file
    that ends inside a frame raises EOFError, as gzip does; zstandard's stream_reader would end quietly."""

    def __init__(self, path):
        import zstandard  # only for .zst inputs

        DECOMPRESS_ERRORS.add(zstandard.ZstdError)
        self.file, self.decompressor = open(path, "rb"), zstandard.ZstdDecompressor()
        self.frame, self.in_frame = self.decompressor.decompressobj(), False
        self.pending, self.taken = b"", 0  # decompressed bytes, and how many of them were read

    def readable(self):
        return True

    def readinto(self, buffer):
        while self.taken == len(self.pending):
            compressed = self.file.read(1 << 20)
            if not compressed:
                if self.in_frame:
                    raise EOFError("compressed file ended inside a zstd frame")
                return 0
            parts = []
            while compressed:
                parts.append(self.frame.decompress(compressed))
                self.in_frame, compressed = True, b""
                if self.frame.eof:  # the bytes after this frame start the next one
                    compressed, self.in_frame = self.frame.unused_data, False
                    self.frame = self.decompressor.decompressobj()
            self.pending, self.taken = b"".join(parts), 0
        n = min(len(buffer), len(self.pending) - self.taken)
        buffer[:n] = self.pending[self.taken:self.taken + n]
        self.taken += n
        return n

    def close(self):
        self.file.close()
        super().close()


def open_text(path):
    """The file as UTF-8 text, line endings as they are (csv needs newline="", text keeps \\r\\n)."""
    return io.TextIOWrapper(open_binary(path), encoding="utf-8", newline="")


def corrupt(path, error):
    """The RecordError of a .gz / .zst file that cannot be decompressed."""
    return RecordError(f"{path}: corrupt compressed data ({type(error).__name__}: {error})")


# ---------------------------------------------------------------------------------------------
# Lines: the one skip rule


def lines(path, flag):
    """(FILE:LINE, bytes) of each line of the file that is not blank, streamed. flag: the option
    that named the file, for the message when it cannot be opened."""
    try:
        f = open_binary(path)
    except OSError as e:
        raise RecordError(f"{flag} {path}: {e.strerror or e}") from None
    with f:
        try:
            for number, line in enumerate(f, 1):
                if line.strip():
                    yield f"{path}:{number}", line
        except tuple(DECOMPRESS_ERRORS) as e:
            raise corrupt(path, e) from None


def text_of(line, where):
    """A line (bytes) as text, its line ending dropped."""
    try:
        return line.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError:
        raise RecordError(f"{where}: not UTF-8 text") from None


# ---------------------------------------------------------------------------------------------
# JSON records


def parse(text, where):
    """One JSON record (a line, str or bytes): a JSON object, never nested past jsonfile's bound."""
    record = jsonfile.loads(text, where, RecordError)
    if not isinstance(record, dict):
        raise RecordError(f"{where}: a record is a JSON object, got {type(record).__name__}")
    return record


def passed_over(error, skip):
    """A bad record: raised, or handed to skip (data.prepare --skip_bad counts it and goes on)."""
    if skip is None:
        raise error
    skip(error)


def json_lines(path, flag, skip=None):
    """(where, record) of each JSON line. skip: called with the RecordError of a line that is not
    a record, which is then passed over (data.prepare --skip_bad); None: the error is raised."""
    for where, line in lines(path, flag):
        try:
            yield where, parse(line, where)
        except RecordError as e:
            passed_over(e, skip)


def read_jsonl(path, limit=None, flag="--data"):
    """[(where, record)] of a JSON lines file, stopping after limit records; none at all is an error.
    flag: the option that named the file (train.py's is --eval_data)."""
    found = []
    for where, record in json_lines(path, flag):
        found.append((where, record))
        if len(found) == limit:
            break
    if not found:
        raise RecordError(f"{path}: no records in it")
    return found


def is_jsonl(path, first_line):
    """Whether a file of prompts holds JSON records: its name says so (PROMPTS.JSONL, x.ndjson,
    x.json), or else its first line is a JSON object. Neither depends on how many lines there are,
    so a file of one record is read as one of many would be."""
    return file_kind(path) in ("jsonl", "json") or first_line.lstrip().startswith(b"{")


def json_records(path, flag, skip=None):
    """(where, record) of a .json file holding one array of records (read whole), or of JSON lines."""
    if file_kind(path) == "json":
        with open_binary(path) as f:
            head = f.peek(4096)[:4096].lstrip()  # without consuming it: a .gz stream cannot seek back
            if head.startswith(b"["):
                array = jsonfile.loads(f.read(), path, RecordError)
                for i, record in enumerate(array):
                    where = f"{path}: record {i}"
                    if isinstance(record, dict):
                        yield where, record
                    else:
                        passed_over(RecordError(f"{where}: a record is a JSON object, got {type(record).__name__}"),
                                    skip)
                return
    yield from json_lines(path, flag, skip)


# ---------------------------------------------------------------------------------------------
# Tables: rows as records, keyed by record fields


def column_picker(path, names, columns, fmt):
    """A function: one row (values in the order of `names`) -> a record dict, keyed by the record
    fields of --columns [(field, column)], or by the header's own names when columns is None."""
    shown = ", ".join(names[:40]) + (", ..." if len(names) > 40 else "")
    if columns is None:
        known = "text" in names or any(q in names and a in names for q, a in INSTRUCT_KEYS)
        if fmt in ("auto", "text", "jsonl", "instruct") and not known:
            raise RecordError(f"{path}: no 'text' or instruction/output columns (its columns: {shown}); "
                              f"name one with --text_column or --columns")
        return lambda row: dict(zip(names, row))
    missing = [column for _, column in columns if column not in names]
    if missing:
        raise RecordError(f"{path}: no column '{missing[0]}' (its columns: {shown})")
    index = [(field, names.index(column)) for field, column in columns]
    return lambda row: {field: row[i] for field, i in index}


def csv_records(path, columns, fmt, skip=None):
    """CSV / TSV through the csv module: quoted cells may hold commas, quotes and newlines."""
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # a note can be far over csv's 128 KB default
    delimiter = "\t" if file_kind(path) == "tsv" else ","
    with open_text(path) as f:
        reader = csv.reader(f, delimiter=delimiter)
        try:
            header = next(reader, None)
            if header is None:
                raise RecordError(f"{path}: empty (no header row)")
            pick, line = column_picker(path, header, columns, fmt), reader.line_num
            for row_no, row in enumerate(reader, 1):
                where = f"{path}: row {row_no} (line {line + 1})"
                line = reader.line_num  # where the next row starts, less one (cells may span lines)
                if not row:
                    continue
                if len(row) == len(header):
                    yield where, pick(row)
                    continue
                passed_over(RecordError(f"{where}: {len(row)} fields where the header has {len(header)}"), skip)
        except csv.Error as e:
            raise RecordError(f"{path}: line {reader.line_num}: malformed CSV ({e})") from None
        except UnicodeDecodeError:
            raise RecordError(f"{path}: not UTF-8 text (after line {reader.line_num})") from None


def parquet_records(path, columns, fmt, batch_rows=1024):
    """Parquet, a batch of rows at a time (pyarrow reads it row group by row group)."""
    import pyarrow
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except (pyarrow.ArrowException, OSError) as e:
        raise RecordError(f"{path}: not a readable Parquet file ({e})") from None
    names = table.schema_arrow.names
    column_picker(path, names, columns, fmt)  # refuses a missing column, listing the file's
    wanted = list(dict.fromkeys(column for _, column in columns)) if columns else names
    pick = column_picker(path, wanted, columns, fmt)
    row_no = 0
    try:
        for batch in table.iter_batches(batch_size=batch_rows, columns=wanted):
            for row in zip(*(column.to_pylist() for column in batch.columns)):
                row_no += 1
                yield f"{path}: row {row_no}", pick(row)
    except (pyarrow.ArrowException, OSError) as e:
        raise RecordError(f"{path}: unreadable Parquet data after row {row_no} ({e})") from None


# ---------------------------------------------------------------------------------------------
# CoNLL: one word a line, its tag in the last column; a blank line ends a sentence

DOCSTART = "-DOCSTART-"


def conll_records(path, skip=None):
    """({"tokens", "tags"} of each sentence, where: FILE:LINE of its first line). A line is
    word<TAB>...<TAB>tag, or without a tab whitespace-separated (CoNLL-2003's "EU NNP B-NP B-ORG"):
    the first column is the word, the last its tag. A line of one column is a bad line, which makes
    its sentence a bad record (skip: as json_lines). -DOCSTART- lines (and their blank line) are no
    sentence."""
    with open_text(path) as f:
        sentence, start, error, number = [], None, None, 0
        try:
            for number, line in enumerate(f, 1):
                line = line.rstrip("\r\n")
                if line.strip():
                    columns = line.split("\t") if "\t" in line else line.split()
                    if columns[0] == DOCSTART:
                        continue
                    start = start or number
                    if len(columns) < 2 or not columns[0].strip() or not columns[-1].strip():
                        error = error or RecordError(f"{path}:{number}: not word<TAB>tag (no separator, or an "
                                                     f"empty column): {line[:60]!r}")
                    sentence.append((columns[0].strip(), columns[-1].strip()))
                    continue
                yield from _conll_sentence(path, start, sentence, error, skip)
                sentence, start, error = [], None, None
        except UnicodeDecodeError:
            raise RecordError(f"{path}:{number + 1}: not UTF-8 text") from None
        yield from _conll_sentence(path, start, sentence, error, skip)


def _conll_sentence(path, start, sentence, error, skip):
    if error is not None:
        passed_over(error, skip)
    elif sentence:
        yield f"{path}:{start}", {"tokens": [w for w, _ in sentence], "tags": [t for _, t in sentence]}


def renamed(rec, columns, where):
    """A JSON record's fields under the names --columns gives them [(record field, field)]."""
    missing = [column for _, column in columns if column not in rec]
    if missing:
        raise RecordError(f"{where}: no field '{missing[0]}' (--columns; its fields: {', '.join(list(rec)[:8])})")
    return {field: rec[column] for field, column in columns}


def read_records(path, columns=None, fmt="auto", skip=None, flag="--input"):
    """(where, record) of any record file (RECORD_KINDS), by its kind. columns: [(record field,
    column)] for tables (None: the header's own names), and for JSON records whose fields they
    rename where they name a tagged record's fields (tokens, tags); fmt: the record kind asked
    for (a table without a fitting column is refused); skip: as json_lines."""
    kind = file_kind(path)
    if kind in ("csv", "tsv"):
        return csv_records(path, columns, fmt, skip)
    if kind == "parquet":
        return parquet_records(path, columns, fmt)
    if kind == "conll":
        return conll_records(path, skip)
    if columns and any(field in TAGGED_FIELDS for field, _ in columns):
        return _renamed_records(json_records(path, flag, skip), columns, skip)
    return json_records(path, flag, skip)


def _renamed_records(records, columns, skip):
    for where, rec in records:
        try:
            yield where, renamed(rec, columns, where)
        except RecordError as e:
            passed_over(e, skip)


# ---------------------------------------------------------------------------------------------
# Layout: a record as a document (text, or a dialog whose assistant turns are the targets), or as a
# prompt up to the open assistant turn


def _text(rec, key, where, required=True):
    value = rec.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise RecordError(f"{where}: field '{key}' is {'missing' if value is None else 'not a string'}")
    if required and not value.strip():
        raise RecordError(f"{where}: field '{key}' is empty")
    return value


def record_kind(rec, fmt, where, answered=True):
    """text, instruct or chat: fmt itself unless it is auto (jsonl means text). answered: an
    instruction record needs its answer field (False: a prompt may come without one)."""
    if fmt != "auto":
        return "text" if fmt == "jsonl" else fmt
    if "messages" in rec or "conversations" in rec:
        return "chat"
    if "text" in rec:
        return "text"
    if any(q in rec and (a in rec or not answered) for q, a in INSTRUCT_KEYS):
        return "instruct"
    raise RecordError(f"{where}: no 'text', 'messages' or instruction/output fields (keys: {', '.join(list(rec)[:8])})")


def _with_system(rec, where, messages):
    if _text(rec, "system", where, required=False).strip():
        return [{"role": "system", "content": rec["system"]}] + messages
    return messages


def instruct_messages(rec, where, answered=True):
    """[system], user, assistant of an instruction record (answered=False: the assistant turn only
    where the record has its answer field)."""
    pair = next(((q, a) for q, a in INSTRUCT_KEYS if q in rec and (a in rec or not answered)), None)
    if pair is None:
        raise RecordError(f"{where}: no instruction/output (or question/answer, prompt/response, "
                          f"prompt/completion) fields")
    prompt = _text(rec, pair[0], where)
    if pair[0] == "instruction" and _text(rec, "input", where, required=False).strip():
        prompt += "\n\n" + rec["input"]
    messages = [{"role": "user", "content": prompt}]
    if pair[1] in rec:
        messages.append({"role": "assistant", "content": _text(rec, pair[1], where)})
    return _with_system(rec, where, messages)


def chat_messages(rec, where):
    """The messages of a chat record: {"messages": [{"role", "content"}]} or ShareGPT's
    {"conversations": [{"from", "value"}]}, after its "system" field if it has one."""
    sharegpt = "messages" not in rec
    turns = rec.get("conversations" if sharegpt else "messages")
    if not isinstance(turns, list) or not turns:
        raise RecordError(f"{where}: '{'conversations' if sharegpt else 'messages'}' is missing, empty or not a list")
    role_key, content_key = ("from", "value") if sharegpt else ("role", "content")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise RecordError(f"{where}: message {i} is not an object")
        role = SHAREGPT_ROLES.get(turn.get(role_key)) if sharegpt else turn.get(role_key)
        if role not in ("system", "user", "assistant"):
            raise RecordError(f"{where}: message {i} has role {turn.get(role_key)!r}")
        if not isinstance(turn.get(content_key), str):
            raise RecordError(f"{where}: message {i} has no string '{content_key}'")
        messages.append({"role": role, "content": turn[content_key]})
    return _with_system(rec, where, messages)


def _answered(messages, where):
    if messages[-1]["role"] != "assistant" or not messages[-1]["content"].strip():
        raise RecordError(f"{where}: dialog does not end with a non-empty assistant message")
    return messages


def record_to_doc(rec, fmt, where):
    """The Doc of a finished record (data.prepare's training data), or RecordError."""
    kind = record_kind(rec, fmt, where)
    if kind == "text":
        return Doc(where, "text", _text(rec, "text", where))
    messages = instruct_messages(rec, where) if kind == "instruct" else chat_messages(rec, where)
    return Doc(where, kind, _answered(messages, where))


def prompt_of(rec, where):
    """(text, None) or (None, messages) of a prompt record: {"prompt"} (plain text) or a text,
    instruction or chat record as record_to_doc reads it, without its answer (or ignoring it), up
    to the open assistant turn."""
    answers = [a for q, a in INSTRUCT_KEYS if q == "prompt"]
    if isinstance(rec.get("prompt"), str) and not any(a in rec for a in answers):
        return rec["prompt"], None
    kind = record_kind(rec, "auto", where, answered=False)
    if kind == "text":
        return _text(rec, "text", where), None
    messages = instruct_messages(rec, where, answered=False) if kind == "instruct" else chat_messages(rec, where)
    if messages[-1]["role"] == "assistant":
        messages = _answered(messages, where)[:-1]
    return None, messages


def need(record, name, where, kind=str):
    """record[name], which must be present and of type kind (a bool is no int)."""
    if name not in record:
        raise RecordError(f"{where}: missing field {name!r}")
    value = record[name]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise RecordError(f"{where}: field {name!r} should be {getattr(kind, '__name__', kind)}, got {value!r}")
    return value


# ---------------------------------------------------------------------------------------------
# Labels: what a labelled record (data.prepare --label_column, or JSON "label" / "labels") says


def label_names(value, where, field, separator=None):
    """(names, is_list) of a record's label value. A string or an integer is one label, its text
    (JSON 7 and "7" are the same label); a list is a set of labels (multilabel), and so is every
    value when separator splits it (an empty cell, or a missing Parquet one, is the empty set).
    Names are stripped of surrounding space."""
    if isinstance(value, list):
        return tuple(_label_name(v, where, field) for v in value), True
    if separator is None:
        return (_label_name(value, where, field),), False
    if value is None or isinstance(value, str) and not value.strip():
        return (), True
    text = _label_name(value, where, field)
    return tuple(part.strip() for part in text.split(separator) if part.strip()), True


def _label_name(value, where, field):
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise RecordError(f"{where}: label {value!r} in field '{field}' is not a string or an integer")
    name = str(value).strip()
    if not name:
        raise RecordError(f"{where}: empty label in field '{field}'")
    return name


def label_field(rec, label_column, where):
    """The field of a record that holds its labels: --label_column, else "labels" (a list) or
    "label" (one). RecordError for a record without it, or with both "label" and "labels"."""
    if label_column is not None:
        if label_column not in rec:
            raise RecordError(f"{where}: no label field '{label_column}' (--label_column)")
        return label_column
    present = [key for key in ("labels", "label") if key in rec]
    if len(present) != 1:
        raise RecordError(f"{where}: {'both' if present else 'neither'} 'label' and 'labels' fields; a labelled "
                          f"record has one of them")
    return present[0]


# ---------------------------------------------------------------------------------------------
# Tags: what a tagged record ({"tokens": [words], "tags": [tags]}, or a CoNLL sentence) says

TAGGED_FIELDS = ("tokens", "tags")


def tagged_words(rec, where):
    """(words, tags) of a tagged record, checked: a non-empty list of words (non-empty strings
    without whitespace: the text is the words joined by spaces) and as many tags, each a string
    or an integer (an index into --labels)."""
    words, tags = rec.get("tokens"), rec.get("tags")
    for name, value in (("tokens", words), ("tags", tags)):
        if not isinstance(value, list):
            raise RecordError(f"{where}: field '{name}' is {'missing' if value is None else 'not a list'} "
                              f"(a tagged record is {{\"tokens\": [words], \"tags\": [tags]}})")
    if not words:
        raise RecordError(f"{where}: empty sentence (no tokens)")
    if len(words) != len(tags):
        raise RecordError(f"{where}: {len(words)} tokens but {len(tags)} tags")
    for i, word in enumerate(words):
        if not isinstance(word, str) or not word or word != word.strip() or len(word.split()) != 1:
            raise RecordError(f"{where}: token {i} ({word!r}) is not a word (a non-empty string without spaces)")
    for i, tag in enumerate(tags):
        if isinstance(tag, bool) or not isinstance(tag, (str, int)) or isinstance(tag, str) and not tag.strip():
            raise RecordError(f"{where}: tag {i} ({tag!r}) is not a non-empty string or an integer")
    return tuple(words), [tag.strip() if isinstance(tag, str) else tag for tag in tags]
