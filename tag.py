"""Tag raw text with a tag head's checkpoint: each text's entities, with character offsets, as JSON lines.

    python tag.py --ckpt_dir out/ner/model --text "Started metformin for T2DM ; Cr 3.1 ."
    python tag.py --ckpt_dir out/ner/model --input notes.txt --out entities.jsonl

The texts: --text, or each non-blank line of a text file, or each {"text"} record of a JSONL file
(.jsonl / .ndjson). Each text is split into words on whitespace (each word's character offsets kept),
encoded as data.prepare encodes a tagged sentence (the words joined by single spaces, BOS ... EOS; a
text longer than the model's context, or --max_len, split between words) and tagged by the head at
each word's first sub-word (tasks.sentence_pieces, tasks.predict_tags: what eval.py --task tag
scores). The predicted tags make entities as seqeval's default mode reads BIO tags (an I- without a
B- starts one: tagging.spans). One JSON line per text, in input order:
    {"line": "FILE:N" (files only), "entities": [{"start", "end", "type", "text"}, ...]}
where text[start:end] == the entity's "text" (its words and whatever lay between them). Written to
--out (whole, atomically) or to stdout. Words are split on whitespace only: "T2DM," is one word, so
text tokenized the way the training data was (punctuation apart, say) tags best.

Reading guide, top to bottom: texts_of (the inputs, checked), tag_texts (the model), main.
"""

import json
import os

import atomic
import checkpoint
import common
import tagging
import tasks
from cli import UsageError, UserError, at_least, non_empty, one_of, positive, run, torch_device
from data.records import RecordError, file_kind, need, open_text, read_jsonl
from generate import checked_ckpt_dir, load_for_sampling


def texts_of(text, input_path):
    """[(where or None, text)]: --text, or the texts of --input (one of the two)."""
    if (text is None) == (input_path is None):
        raise UsageError("give --text TEXT or --input FILE (a text file, one text a line, or JSONL {\"text\"})")
    if text is not None:
        return [(None, text)]
    if not os.path.isfile(input_path):
        raise UserError(f"--input {input_path}: no such file")
    if file_kind(input_path) == "jsonl":
        return [(where, need(record, "text", where)) for where, record in read_jsonl(input_path, None, "--input")]
    try:
        with open_text(input_path) as f:
            return [(f"{input_path}:{n}", line.rstrip("\r\n")) for n, line in enumerate(f, 1) if line.strip()]
    except UnicodeDecodeError:
        raise RecordError(f"{input_path}: not UTF-8 text") from None


def tag_texts(model, tok, texts, labels, keep, batch_size):
    """One {"line"?, "entities"} per text; a text without words has no entities."""
    out = []
    for start in range(0, len(texts), batch_size):
        batch = [(where, text, tagging.text_words(text)) for where, text in texts[start : start + batch_size]]
        worded = [b for b in batch if b[2]]
        pieces = [tasks.sentence_pieces(tok, [w for w, _, _ in words], keep, where or "--text")
                  for where, _, words in worded]
        predicted = iter(tasks.predict_tags(model, pieces) if pieces else [])
        for where, text, words in batch:
            tags = [labels[k] for k in next(predicted)] if words else []
            out.append({**({"line": where} if where else {}), "entities": tagging.spans(text, words, tags)})
    return out


def write_lines(path, lines):
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(lines)

    atomic.write_file(path, write)


CHECKS = {"ckpt_dir": non_empty, "adapter": non_empty, "text": non_empty, "input": non_empty, "out": non_empty,
          "batch_size": positive, "max_len": at_least(3), "max_seq_len": positive, "tokenizer": non_empty,
          "device": torch_device, "dtype": one_of("bf16", "fp16", "fp32")}


def main(ckpt_dir: str = None, text: str = None, input: str = None, out: str = None, adapter: str = None,
         batch_size: int = 8, max_len: int = None, max_seq_len: int = None, tokenizer: str = None,
         device: str = None, dtype: str = None, force: bool = False):
    """Tag texts with a tag head and write their entities as JSON lines.

    Args:
        ckpt_dir: a checkpoint with a tag head (train.py --head tag; Meta or HF layout).
        text: one text to tag.
        input: a file of texts: one a line (blank lines skipped), or JSONL {"text"} records.
        out: the JSON lines file to write (default: stdout).
        adapter: a LoRA adapter directory saved by train.py --head tag (merged into the weights).
        batch_size: texts per forward pass.
        max_len: tokens per piece a long text is split into (default: the model's context).
        max_seq_len: the context to build the model for; default the checkpoint's.
        tokenizer: a tokenizer.model to use instead of the one in ckpt_dir.
        device: cuda or cpu (default: cuda when available).
        dtype: bf16, fp16 or fp32 (default as eval.py).
        force: apply --adapter even to a base other than the one it was trained on.
    """
    ckpt_dir = checked_ckpt_dir(ckpt_dir)
    texts = texts_of(text, input)
    if out is not None:
        atomic.check_outputs({"--out": out}, {"--input": input, "--ckpt_dir": ckpt_dir}, checkpoint.INPUT_FILES)
    model, tok = load_for_sampling(os.path.expanduser(ckpt_dir), tokenizer, adapter, device or common.default_device(),
                                   dtype, max_seq_len, force)
    labels = tasks.tag_head_labels(model, "tag.py")
    keep = min(max_len or model.args.max_seq_len, model.args.max_seq_len)
    lines = [json.dumps(r, ensure_ascii=False) + "\n" for r in tag_texts(model.eval(), tok, texts, labels, keep,
                                                                         batch_size)]
    if out is None:
        print("".join(lines), end="")
    else:
        write_lines(out, lines)


if __name__ == "__main__":
    run(main, prog="tag.py", checks=CHECKS)
