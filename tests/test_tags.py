"""Tagged data and the tag head: data.prepare on tagged JSONL and CoNLL (the .tags sidecar, meta.json's
tags, --max_len splitting at word boundaries, IGN, integer tags, --columns, --label_all_subwords) checked
against transformers' run_ner alignment with the genuine Llama 3 tokenizer.json; bad records one line
each; TaggedLoader's batches; the tag head's logits and loss against transformers'
LlamaForTokenClassification on the same weights, and its saves (Meta, HF through
AutoModelForTokenClassification)."""
import dataclasses
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import checkpoint
import heads
import model
import tokenizer
from ckpt_utils import VARIANTS, hf_config, rel_err
from data import prepare, shards
from data.shards import IGNORE_INDEX, ShardError, TaggedLoader
from test_data import LLAMA3, assert_one_line_error, run_prepare
from test_labels import in_process, write_jsonl

LLAMA3_JSON = os.path.join(os.path.dirname(LLAMA3), "tokenizer.json")
BOS, EOS = 128000, 128001
TAGS = ["B-CHEM", "B-DIS", "I-CHEM", "I-DIS", "O"]
# words that tokenize in every way that matters: several sub-words, numbers (their space a token of its
# own), punctuation, contractions, non-ASCII
WORDS = ("The patient 's troponin rose to 123.5 ng/mL after 2 doses of acetaminophen ( Tylenol ) ; "
         "no myocardial infarction , électrocardiogramme normal 体温 37.2°C hyperkalaemia").split()


def sentences(n, seed=0, lo=1, hi=14):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        k = int(rng.integers(lo, hi + 1))
        words = [str(w) for w in rng.choice(WORDS, k)]
        tags = [str(t) for t in rng.choice(TAGS + ["IGN"], k, p=[0.15, 0.15, 0.1, 0.1, 0.4, 0.1])]
        out.append({"tokens": words, "tags": tags})
    return out


@pytest.fixture(scope="module")
def hf_tok():
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=LLAMA3_JSON)


def run_ner_alignment(hf_tok, words, tags, label_list, all_subwords=False, ignore=("IGN",)):
    """(ids, labels) of one sentence by transformers' run_ner recipe (tokenize_and_align_labels):
    tokenizer(words, is_split_into_words=True) and word_ids(). Llama 3's tokenizer has no
    add_prefix_space, so the words carry the spaces between them as the text has them; our documents
    are BOS ... EOS; IGN words are -100 (our extension)."""
    enc = hf_tok([words[0]] + [" " + w for w in words[1:]], is_split_into_words=True, add_special_tokens=False)
    label_to_id = {name: i for i, name in enumerate(label_list)}
    b_to_i = {i: label_to_id.get("I-" + name[2:], i) if name.startswith("B-") else i for i, name in enumerate(label_list)}
    labels, previous = [], None
    for word in enc.word_ids():
        tag = -100 if word is None or tags[word] in ignore else label_to_id[tags[word]]
        if word is None or word != previous:
            labels.append(tag)
        else:
            labels.append(b_to_i[tag] if all_subwords and tag != -100 else -100)
        previous = word
    return [BOS] + enc.input_ids + [EOS], [-100] + labels + [-100], enc.word_ids()


def expected_documents(hf_tok, records, label_list, all_subwords=False, max_len=None):
    """{ids: tags} of every document the records should become: run_ner's alignment, a sentence of
    more than max_len tokens cut greedily between words into pieces of at most max_len (BOS, EOS each)."""
    out = {}
    for rec in records:
        ids, labels, word_ids = run_ner_alignment(hf_tok, rec["tokens"], rec["tags"], label_list, all_subwords)
        pieces = [(1, len(ids) - 1)]
        if max_len and len(ids) > max_len:
            pieces, begin = [], 1
            starts = [k + 1 for k, w in enumerate(word_ids) if k == 0 or w != word_ids[k - 1]] + [len(ids) - 1]
            for start, end in zip(starts, starts[1:]):
                if end - begin > max_len - 2:
                    pieces.append((begin, start))
                    begin = start
            pieces.append((begin, len(ids) - 1))
        for a, b in pieces:
            out[tuple([BOS] + ids[a:b] + [EOS])] = tuple([-100] + labels[a:b] + [-100])
    return out


def shard_documents(data_dir, bos=BOS):
    """{ids: tags} of every document of both splits, read straight from the files (not the loader)."""
    meta = shards.load_meta(data_dir)
    out = {}
    for split in shards.SPLITS:
        tokens, tags = shards.split_tags(data_dir, meta, split)
        tokens, tags = np.concatenate(tokens).astype(np.int64), np.concatenate(tags)
        starts = list(np.flatnonzero(tokens == bos)) + [len(tokens)]
        for a, b in zip(starts, starts[1:]):
            out[tuple(tokens[a:b].tolist())] = tuple(tags[a:b].tolist())
    return out


# ---------------------------------------------------------------------------------------------
# Words and sub-words


def test_encode_words_is_the_joined_text_cut_at_word_starts(tmp_path):
    tok3 = tokenizer.load(LLAMA3)
    for rec in sentences(30, seed=3):
        pieces = tok3.encode_words(rec["tokens"])
        assert [i for p in pieces for i in p] == tok3.encode(" ".join(rec["tokens"]), False, False)
        assert all(pieces)
    import sentencepiece

    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(" ".join(r["tokens"]) for r in sentences(300, seed=4)))
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(tmp_path / "m"), model_type="bpe", vocab_size=300, byte_fallback=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, character_coverage=1.0,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    tok2 = tokenizer.load(tmp_path / "m.model")
    for rec in sentences(30, seed=5):
        pieces = tok2.encode_words(rec["tokens"])
        assert [i for p in pieces for i in p] == tok2.encode(" ".join(rec["tokens"]), False, False)


# ---------------------------------------------------------------------------------------------
# data.prepare on tagged records


@pytest.fixture(scope="module")
def tagged(tmp_path_factory):
    """Tagged JSONL shards (with --max_len splitting some sentences) and their records."""
    d = tmp_path_factory.mktemp("tagged")
    records = sentences(60)
    write_jsonl(d / "ner.jsonl", records)
    meta = in_process("--input", d / "ner.jsonl", "--out", d / "shards", "--max_len", 16)
    return d / "shards", records, meta


def test_jsonl_round_trip_is_run_ners_alignment(tagged, hf_tok):
    data_dir, records, meta = tagged
    assert meta["has_tags"] and meta["tags"] == TAGS  # sorted; IGN is no tag
    assert meta["max_len"] == 16 and meta["split_sentences"] > 0
    want = expected_documents(hf_tok, records, TAGS, max_len=16)
    assert shard_documents(data_dir) == want
    assert max(len(ids) for ids in want) <= 16
    words = {t: sum(r["tags"].count(t) for r in records) for t in TAGS + ["IGN"]}
    counts = meta["tag_counts"]
    assert [counts["train"][k] + counts["val"][k] for k in range(len(TAGS))] == [words[t] for t in TAGS]
    assert sum(meta["ignored_words"].values()) == words["IGN"]
    assert not any(name.endswith((".mask", ".docs", ".labels")) for name in os.listdir(data_dir))
    shards.validate(data_dir)


def test_conll_integer_tags_columns_and_all_subwords(tmp_path, hf_tok):
    records = sentences(25, seed=1)
    with open(tmp_path / "ner.conll", "w") as f:
        f.write("-DOCSTART-\tO\n\n")
        for k, rec in enumerate(records):
            for word, tag in zip(rec["tokens"], rec["tags"]):
                f.write(f"{word}\t{tag}\n" if k % 2 else f"{word} NN B-NP {tag}\n")  # tab, or CoNLL-2003 columns
            f.write("\n\n" if k % 3 else "\n")
    conll = in_process("--input", tmp_path / "ner.conll", "--out", tmp_path / "a", "--label_all_subwords")
    assert conll["tags"] == TAGS and conll["records"]["tagged"] == len(records)
    assert shard_documents(tmp_path / "a") == expected_documents(hf_tok, records, TAGS, all_subwords=True)
    # HF's layout: integer ner_tags naming --labels (IGN among them is ignored), other field names
    order = ["O", "B-DIS", "I-DIS", "IGN", "B-CHEM", "I-CHEM"]
    hf_records = [{"words": r["tokens"], "ner_tags": [order.index(t) for t in r["tags"]]} for r in records]
    write_jsonl(tmp_path / "hf.jsonl", hf_records)
    hf = in_process("--input", tmp_path / "hf.jsonl", "--out", tmp_path / "b", "--labels", ",".join(order),
                    "--columns", "tokens=words,tags=ner_tags")
    vocabulary = [t for t in order if t != "IGN"]
    assert hf["tags"] == vocabulary
    assert shard_documents(tmp_path / "b") == expected_documents(hf_tok, records, vocabulary)


def test_ignore_tags_flag_and_summary_line(tmp_path):
    records = sentences(20, seed=2)
    write_jsonl(tmp_path / "ner.jsonl", records)
    rc, lines = run_prepare("--input", tmp_path / "ner.jsonl", "--out", tmp_path / "o", "--tokenizer", LLAMA3,
                            "--workers", "2", "--val_fraction", "0.25", "--ignore_tags", "O,IGN", "--max_len", "8")
    assert rc == 0, lines
    meta = json.load(open(tmp_path / "o" / "meta.json"))
    assert meta["tags"] == [t for t in TAGS if t != "O"] and meta["ignore_tags"] == ["IGN", "O"]
    ignored = sum(r["tags"].count("O") + r["tags"].count("IGN") for r in records)
    assert sum(meta["ignored_words"].values()) == ignored
    assert f"({ignored:,} words ignored)" in lines[-1]
    assert f"{meta['split_sentences']:,} sentences split at --max_len 8" in lines[-1]


@pytest.mark.parametrize("name, text, says", [
    ("a.jsonl", '{"tokens": ["a", "b"], "tags": ["O", "O"]}\n{"tokens": ["a", "b"], "tags": ["O"]}\n',
     "a.jsonl:2: 2 tokens but 1 tags"),
    ("a.jsonl", '{"tokens": ["a"], "tags": ["O"]}\n{"tokens": [], "tags": []}\n', "a.jsonl:2: empty sentence"),
    ("a.jsonl", '{"tokens": ["a"], "tags": ["O"]}\n{"tokens": ["a b"], "tags": ["O"]}\n', "a.jsonl:2: token 0"),
    ("a.jsonl", '{"tokens": ["a"], "tags": ["O"]}\n{"tokens": ["a"], "tags": ["X"]}\n', "a.jsonl:2: tag 'X'"),
    ("a.jsonl", '{"tokens": ["a"], "tags": ["O"]}\n{"tokens": ["a"], "tags": [7]}\n', "a.jsonl:2: tag 7"),
    ("a.jsonl", '{"tokens": ["a"], "tags": ["O"]}\n{"text": "a"}\n', "a.jsonl:2: field 'tokens' is missing"),
    ("a.conll", "a\tO\n\nb\tO\nc\n\n", "a.conll:4: not word<TAB>tag"),
])
def test_bad_tagged_records_are_one_line(tmp_path, name, text, says):
    (tmp_path / name).write_text(text)
    rc, lines = run_prepare("--input", tmp_path / name, "--out", tmp_path / "o", "--tokenizer", LLAMA3,
                            "--labels", "O,B-X")
    assert_one_line_error(rc, lines, says)
    assert not (tmp_path / "o").exists()


def test_skip_bad_counts_bad_sentences(tmp_path):
    good = sentences(6, seed=7)
    text = "".join(f"{w}\t{t}\n" for w, t in zip(good[0]["tokens"], good[0]["tags"])) + "\n"
    text += "lonely\n\n"  # a line without a separator: its sentence is skipped
    for rec in good[1:]:
        text += "".join(f"{w}\t{t}\n" for w, t in zip(rec["tokens"], rec["tags"])) + "\n"
    (tmp_path / "a.conll").write_text(text)
    meta = in_process("--input", tmp_path / "a.conll", "--out", tmp_path / "o", "--skip_bad")
    assert meta["skipped_records"] == 1 and meta["records"]["tagged"] == len(good)


def test_a_word_longer_than_max_len_is_a_bad_record(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"tokens": ["ok"], "tags": ["O"]},
                                       {"tokens": ["a", "électrocardiogramme" * 4], "tags": ["O", "B-DIS"]}])
    rc, lines = run_prepare("--input", tmp_path / "a.jsonl", "--out", tmp_path / "o", "--tokenizer", LLAMA3,
                            "--max_len", "6")
    assert_one_line_error(rc, lines, "a.jsonl:2: word 1", "--max_len 6")


def test_untagged_shards_have_no_tag_files(tmp_path):
    write_jsonl(tmp_path / "t.jsonl", [{"text": "fever and rash"}, {"text": "chest pain"}])
    meta = in_process("--input", tmp_path / "t.jsonl", "--out", tmp_path / "o")
    assert "has_tags" not in meta and not any(n.endswith(".tags") for n in os.listdir(tmp_path / "o"))
    with pytest.raises(ShardError, match="no tags"):
        TaggedLoader(tmp_path / "o", "train", 2, 16)


def test_validate_refuses_a_damaged_tags_file(tagged, tmp_path):
    data_dir = tmp_path / "copy"
    import shutil

    shutil.copytree(tagged[0], data_dir)
    path = data_dir / "train_000000.tags"
    raw = bytearray(path.read_bytes())
    raw[shards.HEADER_BYTES + 4:shards.HEADER_BYTES + 8] = np.int32(99).tobytes()
    path.write_bytes(bytes(raw))
    with pytest.raises(ShardError, match="train_000000.tags: tag 99 at token 1"):
        shards.validate(data_dir)


# ---------------------------------------------------------------------------------------------
# TaggedLoader


def loader_documents(loader, n_batches):
    """{ids: tags} of every document the loader's batches hold, and their count."""
    out, n = {}, 0
    for _ in range(n_batches):
        b = loader.next_batch()
        for row in range(b.inputs.shape[0]):
            starts = list(torch.nonzero(b.positions[row] == 0).flatten().tolist()) + [b.inputs.shape[1]]
            for a, z in zip(starts, starts[1:]):
                if b.valid[row, a]:
                    out[tuple(b.inputs[row, a:z].tolist())] = tuple(b.targets[row, a:z].tolist())
                    n += 1
                else:
                    assert (b.targets[row, a:z] == IGNORE_INDEX).all() and (b.inputs[row, a:z] == EOS).all()
    return out, n


@pytest.mark.parametrize("padded", [False, True])
def test_loader_reproduces_every_document_and_its_tags(tagged, padded):
    data_dir = tagged[0]
    files = shard_documents(data_dir)
    got = {}
    for split in shards.SPLITS:
        loader = TaggedLoader(data_dir, split, 4, 16, shuffle=False, padded=padded)
        batches = -(-len(loader.epoch_rows(0)) // 4)
        docs, n = loader_documents(loader, batches)
        assert n >= loader.n_documents
        got.update(docs)
    assert got == files


def test_loader_same_global_batch_for_one_or_two_ranks_and_resume(tagged):
    data_dir = tagged[0]
    one = TaggedLoader(data_dir, "train", 4, 16, seed=3)
    two = [TaggedLoader(data_dir, "train", 2, 16, rank=r, world_size=2, seed=3) for r in range(2)]
    for _ in range(6):
        a = one.next_batch()
        parts = [loader.next_batch() for loader in two]
        for field in ("inputs", "positions", "valid", "targets"):
            interleaved = torch.stack([getattr(p, field) for p in parts], dim=1).flatten(0, 1)
            assert torch.equal(getattr(a, field), interleaved), field
    state = one.state_dict()
    resumed = TaggedLoader(data_dir, "train", 4, 16, seed=3)
    resumed.load_state_dict(state)
    assert torch.equal(resumed.next_batch().targets, one.next_batch().targets)


# ---------------------------------------------------------------------------------------------
# The tag head against transformers' LlamaForTokenClassification


def hf_tagger(n_labels=len(TAGS), vocab_size=128256, seed=0):
    """transformers' LlamaForTokenClassification, random (non-trivial) weights with a bias, fp32, eval mode."""
    from transformers import LlamaForTokenClassification

    args = dataclasses.replace(VARIANTS["llama3.1"]["args"], vocab_size=vocab_size)
    config = hf_config(args, tied=False)
    config.num_labels = n_labels
    torch.manual_seed(seed)
    hf = LlamaForTokenClassification(config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p)) if "norm" in name else p.normal_(0, 0.08)
    return hf


def test_logits_and_loss_match_transformers_on_run_ner_batches(tagged, hf_tok, tmp_path):
    """The loader's padded batch of our shards, through our model, against run_ner's batch of the same
    sentences (tokenizer + word_ids alignment) through LlamaForTokenClassification on the same weights."""
    data_dir, records, _ = tagged
    hf = hf_tagger()
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    ours = checkpoint.load(tmp_path / "hf")
    assert (ours.args.head_kind, ours.args.n_labels) == ("tag", len(TAGS))
    assert ours.score.bias is not None
    loader = TaggedLoader(data_dir, "train", 6, 16, shuffle=False, padded=True)
    batch = loader.next_batch()
    by_ids = {}
    for rec in records:
        ids, labels, _ = run_ner_alignment(hf_tok, rec["tokens"], rec["tags"], TAGS)
        by_ids[tuple(ids)] = labels
    hf_ids = torch.full_like(batch.inputs, EOS)
    hf_labels = torch.full_like(batch.inputs, -100)
    for row in range(6):
        n = int(batch.valid[row].sum())
        ids = tuple(batch.inputs[row, :n].tolist())
        if ids in by_ids:  # a sentence kept whole: run_ner's own labels (split ones: the files' test above)
            assert batch.targets[row, :n].tolist() == by_ids[ids]
        hf_ids[row, :n], hf_labels[row, :n] = batch.inputs[row, :n], batch.targets[row, :n]
    assert sum(tuple(batch.inputs[r, :int(batch.valid[r].sum())].tolist()) in by_ids for r in range(6)) >= 2
    with torch.no_grad():
        out = hf(hf_ids, attention_mask=batch.valid.long(), labels=hf_labels)
        logits = ours.tag(batch.inputs, batch.positions)
        plain = ours.tag(batch.inputs)  # right padding: the plain causal mask gives the same
        loss = heads.tag_loss(logits, batch.targets)
    real = batch.valid
    assert logits.shape == (6, 16, len(TAGS)) and logits.dtype == torch.float32
    assert rel_err(logits[real], out.logits[real]) < 1e-5
    assert rel_err(plain[real], out.logits[real]) < 1e-5
    assert abs(loss.item() - out.loss.item()) < 1e-5 * out.loss.item()


def test_tag_loss_weights_focal_and_no_targets():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 5, generator=g, requires_grad=True)
    targets = torch.randint(0, 5, (3, 7), generator=g)
    targets[0, :3] = -100
    weights = heads.balanced_class_weights(torch.bincount(targets[targets >= 0], minlength=5))
    ref = F.cross_entropy(logits.reshape(-1, 5), targets.reshape(-1), weight=weights, ignore_index=-100)
    assert abs(heads.tag_loss(logits, targets, class_weights=weights).item() - ref.item()) < 1e-6
    keep = targets != -100
    log_p = F.log_softmax(logits[keep], -1).gather(1, targets[keep][:, None]).squeeze(1)
    focal = (-(1 - log_p.exp()) ** 2 * log_p).mean()
    assert abs(heads.tag_loss(logits, targets, focal_gamma=2.0).item() - focal.item()) < 1e-6
    none = heads.tag_loss(logits, torch.full_like(targets, -100))
    none.backward()
    assert none.item() == 0 and logits.grad.abs().sum() == 0


def _tag_model(labels=tuple(TAGS)):
    args = model.ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, multiple_of=32,
                           max_seq_len=64)
    torch.manual_seed(5)
    m = model.Transformer(args)
    m.init_weights(std=0.08)
    heads.attach_head(m, len(labels), False, labels, pad_id=2, kind="tag")
    with torch.no_grad():
        m.score.weight.normal_(0, 0.3)
        m.score.bias.normal_(0, 0.3)
    return m.eval()


@pytest.mark.parametrize("layout", ["meta", "hf"])
def test_save_and_load_keep_the_tag_head(layout, tmp_path):
    m = _tag_model()
    (checkpoint.save if layout == "meta" else checkpoint.save_hf)(m, tmp_path / layout)
    back = checkpoint.load(tmp_path / layout)
    for key in ("n_labels", "multilabel", "labels", "pad_id", "head_kind"):
        assert getattr(back.args, key) == getattr(m.args, key), key
    tokens = torch.randint(3, 300, (3, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(back.tag(tokens), m.tag(tokens))
    if layout == "meta":
        assert json.load(open(tmp_path / "meta" / "params.json"))["head_kind"] == "tag"


def test_transformers_loads_our_hf_save_as_a_token_classifier(tmp_path):
    from transformers import AutoModelForTokenClassification, LlamaForTokenClassification

    m = _tag_model()
    checkpoint.save_hf(m, tmp_path / "hf")
    config = json.load(open(tmp_path / "hf" / "config.json"))
    assert config["architectures"] == ["LlamaForTokenClassification"] and "problem_type" not in config
    assert config["id2label"] == {str(i): t for i, t in enumerate(TAGS)}
    hf = AutoModelForTokenClassification.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    assert isinstance(hf, LlamaForTokenClassification) and hf.config.label2id["I-DIS"] == 3
    tokens = torch.randint(3, 300, (3, 10), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(tokens)
    mask[1, 6:] = 0
    with torch.no_grad():
        ref = hf(tokens, attention_mask=mask).logits
        ours = m.tag(tokens)
    assert rel_err(ours[mask.bool()], ref[mask.bool()]) < 1e-5


def test_heads_refuse_the_other_kind():
    m = _tag_model()
    with pytest.raises(ValueError, match="classification head"):
        m.classify(torch.ones(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="head_kind"):
        model.ModelArgs(dim=64, n_layers=1, n_heads=4, vocab_size=300, n_labels=2, head_kind="span")
    assert heads.head_config(m.args)["kind"] == "tag"
    c = model.Transformer(model.ModelArgs(dim=64, n_layers=1, n_heads=4, vocab_size=300, n_labels=2))
    assert c.score.bias is None and "kind" not in heads.head_config(c.args)
    with pytest.raises(ValueError, match="tag head"):
        c.tag(torch.ones(1, 3, dtype=torch.long))


def test_parquet_in_hf_datasets_layout(tmp_path, hf_tok):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    records = sentences(15, seed=9)
    order = ["O", "B-DIS", "I-DIS", "IGN", "B-CHEM", "I-CHEM"]
    table = pa.table({"id": [str(k) for k in range(len(records))], "tokens": [r["tokens"] for r in records],
                      "ner_tags": [[order.index(t) for t in r["tags"]] for r in records]})
    pq.write_table(table, tmp_path / "train.parquet")
    meta = in_process("--input", tmp_path / "train.parquet", "--out", tmp_path / "o", "--labels", ",".join(order),
                      "--columns", "tokens=tokens,tags=ner_tags")
    vocabulary = [t for t in order if t != "IGN"]
    assert meta["tags"] == vocabulary
    assert shard_documents(tmp_path / "o") == expected_documents(hf_tok, records, vocabulary)


def test_a_text_file_before_tagged_records_makes_them_bad_records(tmp_path):
    (tmp_path / "a.txt").write_text("a plain note")
    write_jsonl(tmp_path / "b.jsonl", sentences(3))
    rc, lines = run_prepare("--input", tmp_path, "--out", tmp_path / "o", "--tokenizer", LLAMA3)
    assert_one_line_error(rc, lines, "b.jsonl:1: no 'text'")


def test_tags_stay_aligned_across_shard_boundaries(tmp_path, hf_tok):
    records = sentences(12, seed=11)
    write_jsonl(tmp_path / "a.jsonl", records)
    meta = in_process("--input", tmp_path / "a.jsonl", "--out", tmp_path / "o", "--shard_tokens", 7)
    assert len(meta["splits"]["train"]["shards"]) > 3
    assert shard_documents(tmp_path / "o") == expected_documents(hf_tok, records, TAGS)
    shards.validate(tmp_path / "o")


def test_a_trained_sentencepiece_vocabulary_tags_each_words_first_piece(tmp_path):
    import sentencepiece

    records = sentences(80, seed=12)
    write_jsonl(tmp_path / "a.jsonl", records)
    prepare.main(["--input", str(tmp_path / "a.jsonl"), "--out", str(tmp_path / "o"), "--vocab_size", "300",
                  "--workers", "1", "--val_fraction", "0.25"])
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "o" / "tokenizer.model"))
    want = {}
    for rec in records:
        ids, tags = [sp.bos_id()], [-100]
        for word, tag in zip(rec["tokens"], rec["tags"]):
            pieces = sp.encode(word)  # "\u2581word": the space before it is its first piece's
            ids += pieces
            tags += [-100 if tag == "IGN" else TAGS.index(tag)] + [-100] * (len(pieces) - 1)
        assert ids[1:] == sp.encode(" ".join(rec["tokens"]))
        want[tuple(ids + [sp.eos_id()])] = tuple(tags + [-100])
    assert shard_documents(tmp_path / "o", sp.bos_id()) == want

