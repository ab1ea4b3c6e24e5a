"""Entities in tag sequences, and what eval.py --task tag and tag.py report of them.

    tagging.entities(["B-DIS", "I-DIS", "O", "I-CHEM"])      # [("DIS", 0, 1), ("CHEM", 3, 3)]
    tagging.tag_metrics(truth, predicted)                     # f1, precision, recall, f1_strict, ...

Entities are read from BIO tags as seqeval reads them, written out here so that the product does
not depend on seqeval (the tests compare every number with seqeval's own):
    default mode  seqeval's get_entities (conlleval's rules): an entity starts at B-X, or at an I-X
                  that does not continue one of type X (a lone I- starts an entity), and runs over
                  the I-X after it; E- and S- (IOBES) are read as seqeval reads them
    strict IOB2   seqeval's mode="strict", scheme=IOB2: an entity is B-X followed by I-X*; an I-X
                  that continues nothing is no entity. Tags other than O, B-*, I-* have no strict
                  reading (seqeval refuses them): f1_strict is then None
Metrics over a set of sentences: precision, recall, f1 micro over the entities (an entity is right
when its type, first and last word match), macro_f1 the mean over entity types (those of the truth
and of the predictions, as seqeval's classification_report lists them) of each type's f1, a
per-type table, token_accuracy over the words whose truth is not ignored, and invalid_transitions:
the predicted I-X tags that follow neither B-X nor I-X (a sentence's first word included).

Reading guide, top to bottom:
    entities      entities (default mode), strict_entities (IOB2), invalid_transitions
    metrics       prf (seqeval's zero-division rule: 0), tag_metrics
    raw text      text_words (whitespace-split words and their character offsets), spans (the
                  entities of predicted tags as {"start", "end", "type", "text"} of the text)
"""

IOB2_PREFIXES = "BIO"


# -----------------------------------------------------------------------------------------------
# Entities: (type, first word, last word) of each


def _split(tag):
    """(prefix, type) as seqeval's default mode reads a tag: "B-DIS" -> ("B", "DIS"), "O" -> ("O", "_")."""
    return tag[0], tag[1:].split("-", maxsplit=1)[-1] or "_"


def entities(tags):
    """[(type, first, last)] of one sentence's tags, seqeval's default mode (get_entities)."""
    found, prev, prev_type, begin = [], "O", "", 0
    for i, tag in enumerate(list(tags) + ["O"]):
        prefix, type_ = _split(tag)
        typed_change = prev_type != type_
        if prev in "ES" or (prev in "BI" and prefix in "BSO") or (prev not in "O." and typed_change):
            found.append((prev_type, begin, i - 1))
        if prefix in "BS" or (prev in "ESO" and prefix in "EI") or (prefix not in "O." and typed_change):
            begin = i
        prev, prev_type = prefix, type_
    return found


def strict_entities(tags):
    """[(type, first, last)] of one sentence's tags, seqeval's strict IOB2 mode: B-X I-X*. None when
    a tag is not O, B-* or I-* (no strict IOB2 reading)."""
    if any(not tag or tag[0] not in IOB2_PREFIXES for tag in tags):
        return None
    found, i = [], 0
    kinds = [(tag[0], tag[1:].strip("-") or "_") for tag in tags]
    while i < len(kinds):
        prefix, type_ = kinds[i]
        if prefix != "B":
            i += 1
            continue
        end = i + 1
        while end < len(kinds) and kinds[end] == ("I", type_):
            end += 1
        found.append((type_, i, end - 1))
        i = end
    return found


def invalid_transitions(tags):
    """How many I-X tags follow neither B-X nor I-X (the first tag's predecessor is O)."""
    count, prev = 0, "O"
    for tag in tags:
        if tag.startswith("I-") and prev not in ("B-" + tag[2:], tag):
            count += 1
        prev = tag
    return count


# -----------------------------------------------------------------------------------------------
# Metrics: seqeval's, over sentences


def prf(correct, predicted, true):
    """(precision, recall, f1); 0 where a denominator is 0, as seqeval's zero_division default."""
    precision = correct / predicted if predicted else 0.0
    recall = correct / true if true else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def _entity_sets(sequences, reader):
    """{(sentence, type, first, last)} of every sentence, or None where reader has no reading."""
    out = set()
    for k, tags in enumerate(sequences):
        found = reader(tags)
        if found is None:
            return None
        out.update((k,) + e for e in found)
    return out


def tag_metrics(truth, predicted, ignored=frozenset()):
    """The metrics of predicted tag sequences against the truth (lists of tag names, one list per
    sentence, the same lengths). Words whose truth tag is in ignored are left out of every metric
    (as transformers' run_ner drops its -100 positions before seqeval). Names as DESIGN.md's Heads
    contract: f1, precision, recall (default mode, micro), f1_strict (IOB2), token_accuracy; and
    macro_f1, invalid_transitions (over the whole predicted sequences), per_type, n."""
    kept = [[(t, p) for t, p in zip(ts, ps) if t not in ignored] for ts, ps in zip(truth, predicted)]
    true_seqs, pred_seqs = [[t for t, _ in s] for s in kept], [[p for _, p in s] for s in kept]
    gold, guess = _entity_sets(true_seqs, entities), _entity_sets(pred_seqs, entities)
    precision, recall, f1 = prf(len(gold & guess), len(guess), len(gold))
    per_type = {}
    for type_ in sorted({e[1] for e in gold | guess}):
        g, p = {e for e in gold if e[1] == type_}, {e for e in guess if e[1] == type_}
        tp, tr, tf = prf(len(g & p), len(p), len(g))
        per_type[type_] = {"precision": tp, "recall": tr, "f1": tf, "support": len(g)}
    strict_gold, strict_guess = _entity_sets(true_seqs, strict_entities), _entity_sets(pred_seqs, strict_entities)
    f1_strict = None if strict_gold is None or strict_guess is None else \
        prf(len(strict_gold & strict_guess), len(strict_guess), len(strict_gold))[2]
    words = sum(len(s) for s in kept)
    right = sum(t == p for s in kept for t, p in s)
    return {"f1": f1, "precision": precision, "recall": recall, "f1_strict": f1_strict,
            "macro_f1": sum(r["f1"] for r in per_type.values()) / len(per_type) if per_type else 0.0,
            "token_accuracy": right / words if words else None,
            "invalid_transitions": sum(invalid_transitions(p) for p in predicted), "per_type": per_type,
            "n": len(truth)}


# -----------------------------------------------------------------------------------------------
# Raw text: words with their offsets, and the entities of their predicted tags


def text_words(text):
    """[(word, start, end)] of the text split on whitespace (str.split's), text[start:end] == word."""
    out, i, n = [], 0, len(text)
    while i < n:
        while i < n and text[i].isspace():
            i += 1
        start = i
        while i < n and not text[i].isspace():
            i += 1
        if i > start:
            out.append((text[start:i], start, i))
    return out


def spans(text, words, tags):
    """[{"start", "end", "type", "text"}] of the entities (default mode: an I- without a B- starts
    one) in the predicted tags of words ([(word, start, end)]): character offsets into text, the
    entity's text the slice text[start:end] (its words and the spaces between them)."""
    out = []
    for type_, first, last in entities(tags):
        start, end = words[first][1], words[last][2]
        out.append({"start": start, "end": end, "type": type_, "text": text[start:end]})
    return out
