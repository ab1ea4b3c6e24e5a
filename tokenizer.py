"""Tokenizers: Llama 3 (tiktoken BPE) and Llama 2 / custom (sentencepiece), plus the chat layouts.

    tok = tokenizer.load("~/llama/Llama3.1-8B/tokenizer.model")   # or the directory holding it
    ids = tok.encode("Pt c/o SOB", bos=True, eos=False)
    ids = tok.encode_dialog([{"role": "user", "content": "Hi"}])  # ends with an open assistant turn

Both classes expose the same small interface: encode, decode, encode_words (tagged words, each word's
ids apart), encode_dialog, encode_dialog_targets,
bos_id, eos_id, stop_ids, n_words, path, sha256, kind, data (the bytes read), fingerprint (of what it
encodes: two files that turn every text into the same ids have the same one).

Security rule for both: text that merely *looks* like a control token ("<|eot_id|>", "<s>") is
encoded as ordinary text. Only encode_dialog / encode(bos=, eos=) ever emit control tokens, so a
user cannot end a turn or fake a system header by typing one. Llama 2's turn and system markers
([INST], [/INST], <<SYS>>, <</SYS>>) are ordinary text even to the tokenizer, so a dialog whose
messages contain them is refused (DialogError), as Meta's reference refuses it.
"""

import base64
import hashlib
import json
import os

import sentencepiece
import tiktoken
from tiktoken.load import load_tiktoken_bpe

import atomic
import jsonfile


class TokenizerError(ValueError):
    """A tokenizer file that is missing or unreadable; the message is one line naming the file."""


class DialogError(ValueError):
    """A chat message that cannot be laid out safely (one line, naming the message)."""


def check_fits(tok, vocab_size, where):
    """Refuse a tokenizer that does not belong to a model with vocab_size embeddings (where: the
    checkpoint, for the message). The model may pad its embedding past the tokenizer (to a multiple
    of 256 at most, as Llama 3's 128256 = 128000 + 256 specials); any other difference means the
    tokenizer is another model's, whose ids would index the wrong rows or none at all."""
    padded = -(-tok.n_words // 256) * 256
    if not tok.n_words <= vocab_size <= padded:  # every id, BOS and EOS included, is below n_words
        raise TokenizerError(f"{tok.path} has {tok.n_words} tokens (BOS {tok.bos_id}, EOS {tok.eos_id}) but "
                             f"{where} has {vocab_size} embeddings: the tokenizer belongs to another model (or is truncated)")


def load(path):
    """Open a tokenizer.model, or the one in a checkpoint directory (Meta's downloads keep it beside
    the weights, HF downloads of Llama 3 in original/), choosing the format by content. A directory
    with no tokenizer.model but a tokenizer.json (many Llama 3 fine-tunes ship only that) is read
    from the tokenizer.json."""
    path = os.path.expanduser(str(path))
    if not os.path.exists(path):
        path = atomic.readable(path)  # a directory swap a crash interrupted is finished first
    if os.path.isdir(path):
        path = find(path) or os.path.join(path, "tokenizer.model")
    if not os.path.isfile(path):
        raise TokenizerError(f"tokenizer file not found: {path}")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise TokenizerError(f"cannot read tokenizer file {path}: {e.strerror}") from None
    sha256 = hashlib.sha256(data).hexdigest()
    # A file name says nothing (Meta ships both formats as "tokenizer.model"), so sniff the bytes:
    # tiktoken files are text lines "base64 rank", sentencepiece files are a binary protobuf, and
    # a tokenizer.json is a JSON object.
    if data.lstrip()[:1] == b"{":
        tok = Llama3Tokenizer(path, sha256, *_read_tokenizer_json(path, data))
        tok.from_json = True  # whatever the file is called (TOKENIZER.JSON, tok.model): exports copy it
    elif _looks_like_tiktoken(data):
        tok = Llama3Tokenizer(path, sha256, _read_tiktoken(path, sha256), None, LLAMA3_PATTERN)
    else:
        tok = SentencePieceTokenizer(path, sha256)
    tok.data = data  # the bytes it was read from: copies are of these, not of a file since replaced
    return tok


def find(directory):
    """The tokenizer file a checkpoint directory keeps, where load(directory) reads it, or None."""
    inside = [os.path.join(directory, "tokenizer.model"), os.path.join(directory, "original", "tokenizer.model"),
              os.path.join(directory, "tokenizer.json")]
    return next((p for p in inside if os.path.isfile(p)), None)


def write_copy(tok, path):
    """The tokenizer file as it was loaded (tok.data, whose sha256 is tok.sha256) written to path in
    a directory being filled: a run keeps the tokenizer it started with, even if its source is
    replaced meanwhile."""
    with open(path, "wb") as f:
        f.write(tok.data)


def copy_into(tok, directory):
    """write_copy into a checkpoint directory under the name its kind goes by there (tokenizer.json
    or tokenizer.model, which load(directory) finds), replacing a link rather than writing through
    it; returns the path written."""
    path = os.path.join(directory, "tokenizer.json" if tok.from_json else "tokenizer.model")
    if os.path.lexists(path):
        os.remove(path)
    write_copy(tok, path)
    return path


def same_tokenizer(tok, recorded_sha256, recorded_fingerprint=None):
    """Whether tok is the tokenizer a record (meta.json, adapter.json) names: by fingerprint, what it
    encodes, where the record has one; by the file's sha256 in records older than fingerprints."""
    if recorded_fingerprint:
        return tok.fingerprint == recorded_fingerprint
    return tok.sha256 == recorded_sha256


def _digest(*parts):
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part if isinstance(part, bytes) else repr(part).encode())
        digest.update(b"\0")
    return digest.hexdigest()


def _looks_like_tiktoken(data):
    first = data[:4096].split(b"\n", 1)[0].strip()
    parts = first.split()
    if len(parts) != 2 or not parts[1].isdigit():
        return False
    try:
        base64.b64decode(parts[0], validate=True)
    except ValueError:
        return False
    return True


def _check_messages(messages, roles):
    if not isinstance(messages, (list, tuple)):
        raise ValueError("a dialog is a list of {'role', 'content'} messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise ValueError(f"message {i} must be a dict with a string 'content'")
        if m.get("role") not in roles:
            raise ValueError(f"message {i} has role {m.get('role')!r}; expected one of {sorted(roles)}")


# ---------------------------------------------------------------------------------------------
# Llama 3: tiktoken BPE over 128000 ranks, then 256 special tokens.

# Meta's pre-tokenizer: contractions, words with one leading non-letter, numbers in groups of at
# most 3 digits, punctuation runs (taking trailing newlines), and whitespace runs that leave their
# last space to the next word.
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Llama 3.1 names; 3.0 called ids 128004, 128005, 128008, 128010 reserved tokens, same ids.
LLAMA3_SPECIALS = [
    "<|begin_of_text|>", "<|end_of_text|>",
    "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|step_id|>",
    "<|start_header_id|>", "<|end_header_id|>",
    "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
]
LLAMA3_SPECIALS += [f"<|reserved_special_token_{i}|>" for i in range(2, 2 + 256 - len(LLAMA3_SPECIALS))]

# tiktoken's regex engine gives up (a Rust panic, not an exception you can catch well) on
# whitespace runs somewhere past ~500k chars, so text goes to it in windows of at most this many
# chars -- Meta's limit.
MAX_ENCODE_CHARS = 400_000


# The control tokens the Llama 3 layouts need (documents, chat headers, turn ends).
LLAMA3_REQUIRED = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                   "<|eot_id|>")


def _read_tiktoken(path, sha256):
    """{token bytes: rank} of a tiktoken file, checked to be exactly ranks 0..n-1."""
    try:
        # expected_hash matters: tiktoken caches files under /tmp keyed by *path*, and without
        # the hash a different file later written at the same path would load the stale copy.
        ranks = load_tiktoken_bpe(path, expected_hash=sha256)
    except Exception as e:
        raise TokenizerError(f"cannot read tiktoken file {path}: {e}".splitlines()[0]) from None
    # A file cut mid-line can end in a piece that repeats an earlier token, which makes
    # tiktoken's Rust core panic (a 90-line backtrace, not an exception): the ranks must be
    # exactly 0..n-1. (A file cut at a line end loads as a smaller vocabulary, which
    # check_fits then refuses against the model.)
    n_base = len(ranks)
    if n_base == 0 or max(ranks.values()) != n_base - 1 or len(set(ranks.values())) != n_base:
        raise TokenizerError(f"{path}: BPE ranks are not exactly 0..{n_base - 1} "
                             f"(a truncated or damaged tiktoken file?)")
    return ranks


def byte_alphabet():
    """{byte: char}: byte-level BPE files (GPT-2's convention, kept by Llama 3's tokenizer.json)
    spell each byte as a printable character: printable Latin-1 bytes as themselves, the other
    68 (controls, space, soft hyphen...) as chars from U+0100 on, in byte order."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    shifted = (b for b in range(256) if b not in printable)
    chars = {b: chr(b) for b in printable}
    chars.update({b: chr(0x100 + i) for i, b in enumerate(shifted)})
    return dict(sorted(chars.items()))


def _read_tokenizer_json(path, data):
    """(ranks, special, pattern) of a byte-level BPE tokenizer.json as Llama 3 ships it. tiktoken
    merges the adjacent pair whose result has the lowest id, tokenizers the pair listed first in
    merges: the two agree when merges are listed in the order of their results' ids, as in every
    file converted from Meta's tiktoken ranks. Anything else is refused rather than encoded
    differently."""
    spec = jsonfile.loads(data, path, TokenizerError, bad="not a byte-level BPE tokenizer.json")
    bpe = jsonfile.field(spec, "model", dict, path, TokenizerError)
    if bpe.get("type") != "BPE" or not isinstance(bpe.get("vocab"), dict):
        raise TokenizerError(f"{path}: not a BPE tokenizer.json (model type {bpe.get('type')!r})")
    vocab = bpe["vocab"]
    odd = next((i for i in vocab.values() if type(i) is not int), None)
    if odd is not None:
        raise TokenizerError(f"{path}: model.vocab holds {odd!r}, not an integer id")
    added = [_added_token(path, n, t) for n, t in
             enumerate(jsonfile.field(spec, "added_tokens", list, path, TokenizerError, default=[]))]
    merges = [_merge(path, m) for m in jsonfile.field(bpe, "merges", list, f"{path}: model", TokenizerError, [])]
    to_byte = {c: b for b, c in byte_alphabet().items()}
    try:
        ranks = {bytes(to_byte[c] for c in text): i for text, i in vocab.items()}
    except KeyError as e:
        raise TokenizerError(f"{path}: not a byte-level BPE tokenizer.json (vocab char {e.args[0]!r} is "
                             f"outside the byte alphabet)") from None
    ids = set(ranks.values())
    special = {t["content"]: t["id"] for t in added if t["id"] not in ids or t.get("special")}
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise TokenizerError(f"{path}: vocabulary ids are not exactly 0..{len(ranks) - 1}")
    order = [vocab.get(a + b, -1) for a, b in merges]
    if -1 in order or any(x > y for x, y in zip(order, order[1:])):
        raise TokenizerError(f"{path}: merges are not in the order of their results' ids (not a "
                             f"tiktoken-style byte-level BPE, which this reader needs)")
    pre = jsonfile.field(spec, "pre_tokenizer", dict, path, TokenizerError, default={})
    return ranks, special, _split_pattern(path, pre)


def _added_token(path, n, token):
    """One of added_tokens: an object with a string content and an integer id."""
    where = f"{path}: added_tokens[{n}]"
    jsonfile.expect(token, dict, where, TokenizerError)
    jsonfile.field(token, "content", str, where, TokenizerError)
    jsonfile.field(token, "id", int, where, TokenizerError)
    return token


def _merge(path, merge):
    """(left, right) of one of model.merges: "a b" (tokenizers < 0.20) or ["a", "b"]."""
    pair = merge.split(" ") if isinstance(merge, str) else merge
    if not isinstance(pair, list) or len(pair) != 2 or not all(isinstance(p, str) for p in pair):
        raise TokenizerError(f"{path}: model.merges holds {merge!r}, not a pair of tokens"[:300])
    return pair


def _split_pattern(path, pre):
    """The regex of the Split pre-tokenizer (alone or first in a Sequence) that precedes ByteLevel."""
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    for step in steps if isinstance(steps, list) else []:
        pattern = step.get("pattern") if isinstance(step, dict) and step.get("type") == "Split" else None
        if isinstance(pattern, dict) and isinstance(pattern.get("Regex"), str):
            return pattern["Regex"]
    raise TokenizerError(f"{path}: no Split regex in its pre_tokenizer (not a Llama 3 style tokenizer.json)")


class Llama3Tokenizer:
    kind = "llama3"
    from_json = False  # read from a tokenizer.json (load decides by content, not by the name)

    def __init__(self, path, sha256, ranks, special, pattern):
        """ranks: {token bytes: id} of the BPE (an id is also its merge priority); special:
        {text: id} of the control tokens (None: Meta's 256, after the ranks); pattern: the
        pre-tokenizer's regex."""
        self.path, self.sha256, self.pattern = path, sha256, pattern
        self.ranks = ranks
        if special is None:
            special = {tok: len(ranks) + i for i, tok in enumerate(LLAMA3_SPECIALS)}
        self.special = special
        missing = [t for t in LLAMA3_REQUIRED if t not in self.special]
        if missing:
            raise TokenizerError(f"{path}: no {', '.join(missing)} token (not a Llama 3 tokenizer)")
        try:
            self.model = tiktoken.Encoding(name=os.path.basename(path), pat_str=pattern,
                                           mergeable_ranks=ranks, special_tokens=self.special)
        except Exception as e:  # e.g. a regex tiktoken's engine rejects
            raise TokenizerError(f"{path}: cannot build the BPE ({str(e).splitlines()[0]})") from None
        self.n_words = self.model.n_vocab
        self.bos_id = self.special["<|begin_of_text|>"]
        self.eos_id = self.special["<|end_of_text|>"]
        self.eot_id = self.special["<|eot_id|>"]
        self.start_header_id = self.special["<|start_header_id|>"]
        self.end_header_id = self.special["<|end_header_id|>"]
        # A base model ends with end_of_text; chat models end a turn with eot, or eom when the
        # turn hands over to a tool.
        self.stop_ids = frozenset({self.eos_id, self.eot_id} | {self.special[t] for t in ["<|eom_id|>"]
                                                                 if t in self.special})

    @property
    def fingerprint(self):
        """sha256 of what this tokenizer encodes: the BPE's (bytes, id) pairs, the split pattern and
        the control tokens it emits (a tokenizer.model and the tokenizer.json of the same model agree,
        though their files, and the names of the reserved tokens, differ)."""
        if not hasattr(self, "_fingerprint"):
            emitted = (self.bos_id, self.eos_id, self.eot_id, self.start_header_id, self.end_header_id)
            self._fingerprint = _digest(self.kind, self.n_words, self.pattern, emitted,
                                        *(b"%d " % rank + piece for piece, rank in sorted(self.ranks.items())))
        return self._fingerprint

    def encode(self, text, bos, eos):
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        ids = [self.bos_id] if bos else []
        for piece in _split_long(text):
            # allowed_special=set(): special-token text is plain text; disallowed_special=(): and
            # that is not an error either (tiktoken's default would raise on it).
            ids.extend(self.model.encode(piece, allowed_special=set(), disallowed_special=()))
        if eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids):
        return self.model.decode(list(ids))

    def encode_words(self, words):
        """[ids of each word] of the text " ".join(words), cut where each word starts: every word
        after the first keeps the space before it (" patient"), as the BPE's pre-tokenizer splits the
        joined text (a piece never runs from a word across the next space; a number's space is a piece
        of its own, " " then "123"). data.prepare checks the joined ids against encode(text)."""
        return [self.encode((" " if i else "") + word, False, False) for i, word in enumerate(words)]

    # Meta's ChatFormat: <|start_header_id|>role<|end_header_id|>\n\n content <|eot_id|>
    def _header(self, role):
        return [self.start_header_id] + self.encode(role, False, False) + [self.end_header_id] + \
            self.encode("\n\n", False, False)

    def _dialog(self, messages):
        """ids and mask of begin_of_text + every message; mask marks assistant content + its eot."""
        ids, mask = [self.bos_id], [0]
        for m in messages:
            head = self._header(m["role"])
            body = self.encode(m["content"].strip(), False, False) + [self.eot_id]
            target = 1 if m["role"] == "assistant" else 0
            ids += head + body
            mask += [0] * len(head) + [target] * len(body)
        return ids, mask

    def encode_dialog(self, messages):
        _check_messages(messages, {"system", "user", "assistant", "ipython"})
        if messages and messages[-1]["role"] == "assistant":
            raise ValueError("encode_dialog: the last message must not be from the assistant "
                             "(the layout ends with an open assistant turn)")
        ids, _ = self._dialog(messages)
        return ids + self._header("assistant")

    def encode_dialog_targets(self, messages):
        """(ids, mask) for training. Every message is laid out as in encode_dialog, so the ids are
        exactly encode_dialog(messages[:-1]) followed by the last answer and <|eot_id|>. mask is 1
        on each assistant message's content tokens and its <|eot_id|> (the model must learn to end
        its turn), 0 on begin_of_text, headers, and system/user text."""
        _check_messages(messages, {"system", "user", "assistant", "ipython"})
        if not messages or messages[-1]["role"] != "assistant":
            raise ValueError("encode_dialog_targets: the last message must be from the assistant")
        return self._dialog(messages)


def _split_long(text):
    """Cut text into windows of at most MAX_ENCODE_CHARS that encode to the same ids as the whole.

    Meta cuts blindly every 400k chars, and also every run of more than 25k whitespace or
    non-whitespace chars because tiktoken's BPE was quadratic in piece length (100k letters: ~5 s
    before tiktoken 0.13, ~0.02 s since). Both cuts can change the ids, so here a window ends at
    the last point where the pre-tokenizer always splits anyway; only a window without one (400k
    chars with no space after a word nor newline after a letter or digit) is cut blindly."""
    start = 0
    while len(text) - start > MAX_ENCODE_CHARS:
        end = start + MAX_ENCODE_CHARS
        cut = next((p for p in range(end, start, -1) if _exact_cut(text, p)), end)
        yield text[start:cut]
        start = cut
    yield text[start:]


def _exact_cut(text, p):
    """True if no regex piece spans text[p-1:p+1], so text[:p] and text[p:] encode independently.
    Pieces cross from whitespace into non-whitespace (" word"), but back only as punctuation
    followed by newlines ("!\n"); the lookahead in \s+(?!\S) never looks past a non-space."""
    a, b = text[p - 1], text[p]
    return (b in " \t" and not a.isspace()) or (b in "\r\n" and a.isascii() and a.isalnum())


# ---------------------------------------------------------------------------------------------
# Llama 2 and custom vocabularies: sentencepiece.

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
# Llama 2's turn and system markers are plain text, not control tokens, so typed into a message they
# encode to exactly the ids of a real turn end or system block. Meta's chat_completion refuses such
# dialogs; so do we.
LLAMA2_TAGS = ("[INST]", "[/INST]", "<<SYS>>", "<</SYS>>")


class SentencePieceTokenizer:
    kind = "sentencepiece"
    from_json = False

    def __init__(self, path, sha256):
        self.path, self.sha256 = path, sha256
        try:
            self.model = sentencepiece.SentencePieceProcessor(model_file=path)
            n = self.model.vocab_size()
        except Exception as e:
            raise TokenizerError(f"{path} is neither a tiktoken nor a sentencepiece model "
                                 f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
        if n <= 0:
            raise TokenizerError(f"{path} is neither a tiktoken nor a sentencepiece model (empty vocabulary)")
        self.n_words = n
        self.bos_id, self.eos_id = self.model.bos_id(), self.model.eos_id()
        # Every document is laid out BOS ... EOS, so a vocabulary without them is unusable here.
        if self.bos_id < 0 or self.eos_id < 0:
            raise TokenizerError(f"sentencepiece model {path} has no bos/eos pieces")
        self.stop_ids = frozenset({self.eos_id})

    @property
    def fingerprint(self):
        """sha256 of what this tokenizer encodes: every piece with its id, score and type, and bos/eos."""
        if not hasattr(self, "_fingerprint"):
            m = self.model
            pieces = [(m.id_to_piece(i), m.get_score(i), m.is_control(i), m.is_unknown(i), m.is_byte(i))
                      for i in range(self.n_words)]
            self._fingerprint = _digest(self.kind, self.n_words, self.bos_id, self.eos_id, *pieces)
        return self._fingerprint

    def encode(self, text, bos, eos):
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        # sentencepiece never matches control pieces (<s>, </s>) from text, so "<s>" typed by a
        # user becomes ordinary pieces; no escaping is needed.
        ids = self.model.encode(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids):
        return self.model.decode(list(ids))

    def encode_words(self, words):
        """[ids of each word] of the text " ".join(words), cut where each word starts: sentencepiece
        writes a space as the "▁" that starts the word after it and adds one before the text
        (add_dummy_prefix), so each word encoded alone is its part of the joined ids ("▁patient");
        data.prepare checks the joined ids against encode(text) (a model without the dummy prefix fails it)."""
        return [self.model.encode(word) for word in words]

    def _turns(self, messages):
        """Meta's Llama 2 chat rules: fold the system prompt into the first user message, then
        roles must alternate user, assistant, user, ... Returns the list of contents."""
        _check_messages(messages, {"system", "user", "assistant"})
        for i, m in enumerate(messages):
            tag = next((t for t in LLAMA2_TAGS if t in m["content"]), None)
            if tag:
                raise DialogError(f"message {i} ({m['role']}) contains {tag!r}, which would forge Llama 2's "
                                  f"chat layout; remove it from the text")
        if messages and messages[0]["role"] == "system":
            if len(messages) < 2 or messages[1]["role"] != "user":
                raise ValueError("a system message must be followed by a user message")
            first = B_SYS + messages[0]["content"] + E_SYS + messages[1]["content"]
            messages = [{"role": "user", "content": first}] + list(messages[2:])
        for i, m in enumerate(messages):
            want = "user" if i % 2 == 0 else "assistant"
            if m["role"] != want:
                raise ValueError(f"Llama 2 dialogs alternate user/assistant after an optional "
                                 f"system message; turn {i} is {m['role']!r}, expected {want!r}")
        return [m["content"].strip() for m in messages]

    def _prompt(self, user):
        return self.encode(f"{B_INST} {user} {E_INST}", True, False)

    def _pair(self, user, answer):
        """ids and mask of one finished exchange: BOS [INST] user [/INST] answer EOS.

        The pair is encoded as one string, as Meta does, so the ids of earlier turns are exactly
        what encode_dialog produces. The mask starts where those ids leave the bare prompt's ids:
        with sentencepiece's whitespace splitting (the default, and Llama 2's) the prompt is always
        a prefix, so the targets are the answer pieces (starting with the "▁" that follows
        [/INST]), Meta's trailing space piece and EOS -- what generation appends to _prompt."""
        ids = self.encode(f"{B_INST} {user} {E_INST} {answer} ", True, True)
        prompt = self._prompt(user)
        k = 0
        while k < min(len(ids), len(prompt)) and ids[k] == prompt[k]:
            k += 1
        return ids, [0] * k + [1] * (len(ids) - k)

    def encode_dialog(self, messages):
        turns = self._turns(messages)
        if len(turns) % 2 == 0:
            raise ValueError("encode_dialog: the last message must be from the user "
                             "(the layout ends with an open assistant turn)")
        ids = []
        for user, answer in zip(turns[0::2], turns[1::2]):
            ids += self._pair(user, answer)[0]
        return ids + self._prompt(turns[-1])

    def encode_dialog_targets(self, messages):
        """(ids, mask) for training: every exchange laid out as in encode_dialog; mask is 1 on each
        answer's tokens and its EOS, 0 on BOS and the [INST] ... [/INST] prompt."""
        turns = self._turns(messages)
        if not turns or len(turns) % 2:
            raise ValueError("encode_dialog_targets: the last message must be from the assistant")
        ids, mask = [], []
        for user, answer in zip(turns[0::2], turns[1::2]):
            i, m = self._pair(user, answer)
            ids += i
            mask += m
        return ids, mask


# ---------------------------------------------------------------------------------------------
# Files for transformers: tokenizer.json, tokenizer_config.json and the chat template, so that an
# exported checkpoint serves as it is (AutoTokenizer.apply_chat_template gives encode_dialog's ids).

# Jinja chat templates that render encode_dialog's layouts as text (contents stripped, as here).
LLAMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set first = '<<SYS>>\\n' + messages[0]['content'] + "
    "'\\n<</SYS>>\\n\\n' + messages[1]['content'] %}{% set messages = [{'role': 'user', 'content': first}]"
    " + messages[2:] %}{% endif %}"
    "{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + message['content'] | trim + ' [/INST]' }}"
    "{% else %}{{ ' ' + message['content'] | trim + ' ' + eos_token }}{% endif %}{% endfor %}"
)


def bpe_merges(ranks):
    """The merges list a tokenizers BPE needs to reproduce tiktoken's ranks: every split of a token
    into two tokens, listed in the order of the token's rank (tiktoken's merge priority), the
    splits of one token ordered by their parts' ranks."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        splits = [(token[:i], token[i:]) for i in range(1, len(token))]
        splits = [(a, b) for a, b in splits if a in ranks and b in ranks]
        merges += sorted(splits, key=lambda ab: (ranks[ab[0]], ranks[ab[1]]))
    return merges


def hf_tokenizer_json(tok) -> str:
    """tokenizer.json (as text) of a Llama 3 tokenizer, built with the tokenizers library: byte-level
    BPE over the ranks, Meta's split regex, BOS added to every encoded text, the control tokens
    as special added tokens."""
    if tok.from_json:  # read from one: hand on the file as it was read
        return tok.data.decode("utf-8")
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    alphabet = byte_alphabet()
    spell = lambda piece: "".join(alphabet[b] for b in piece)  # noqa: E731
    vocab = {spell(piece): rank for piece, rank in tok.ranks.items()}
    merges = [(spell(a), spell(b)) for a, b in bpe_merges(tok.ranks)]
    hf = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(tok.pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
    hf.decoder = decoders.ByteLevel()
    bos = "<|begin_of_text|>"
    hf.post_processor = processors.TemplateProcessing(
        single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, tok.bos_id)])
    specials = sorted(tok.special.items(), key=lambda item: item[1])
    if [i for _, i in specials] != list(range(len(vocab), len(vocab) + len(specials))):
        raise TokenizerError(f"{tok.path}: control token ids do not follow the vocabulary")
    hf.add_special_tokens([AddedToken(text, special=True, normalized=False) for text, _ in specials])
    return hf.to_str()


def hf_tokenizer_config(tok) -> dict:
    """tokenizer_config.json: the tokenizer class, its special tokens and the family's chat template."""
    if tok.kind == "llama3":
        names = {i: t for t, i in tok.special.items()}
        return {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": names[tok.bos_id],
                "eos_token": names[tok.eos_id], "clean_up_tokenization_spaces": False,
                "model_input_names": ["input_ids", "attention_mask"], "model_max_length": 131072,
                "chat_template": LLAMA3_CHAT_TEMPLATE}
    piece = tok.model.id_to_piece
    return {"tokenizer_class": "LlamaTokenizer", "bos_token": piece(tok.bos_id), "eos_token": piece(tok.eos_id),
            "unk_token": piece(tok.model.unk_id()) if tok.model.unk_id() >= 0 else None,
            "add_bos_token": True, "add_eos_token": False, "legacy": True, "clean_up_tokenization_spaces": False,
            "chat_template": LLAMA2_CHAT_TEMPLATE}


def write_hf_files(tok, out_dir):
    """The tokenizer files transformers reads, into out_dir (a directory being filled): for Llama 3
    tokenizer.json + tokenizer_config.json; for sentencepiece tokenizer.model + tokenizer_config.json
    (transformers builds its fast tokenizer from the model file). A file already there (a hard link
    carried over from the checkpoint being replaced) is replaced, never written through."""
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
        if os.path.lexists(os.path.join(out_dir, name)):
            os.remove(os.path.join(out_dir, name))
    if tok.kind == "llama3":
        with open(os.path.join(out_dir, "tokenizer.json"), "w", encoding="utf-8") as f:
            f.write(hf_tokenizer_json(tok))
    else:
        write_copy(tok, os.path.join(out_dir, "tokenizer.model"))
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(hf_tokenizer_config(tok), f, indent=2)
