"""The classification head against transformers' LlamaForSequenceClassification on the same random
weights: pooled logits (right, left padding, a row of padding alone), packed rows against each document
run alone, the losses against transformers', scikit-learn's and torchvision's formulas, and the head
kept by every save and load."""

import json
import os

import pytest
import torch
import torch.nn.functional as F

import checkpoint
import heads
import model
from ckpt_utils import VARIANTS, hf_config, rel_err

PAD = 0


def hf_classifier(variant: str, n_labels: int = 3, problem_type=None, seed: int = 0):
    """transformers' LlamaForSequenceClassification with random (non-trivial) weights, fp32, eval mode."""
    from transformers import LlamaForSequenceClassification

    config = hf_config(VARIANTS[variant]["args"], VARIANTS[variant]["tied"])
    config.num_labels, config.pad_token_id, config.problem_type = n_labels, PAD, problem_type
    torch.manual_seed(seed)
    hf = LlamaForSequenceClassification(config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p)) if "norm" in name else p.normal_(0, 0.08)
    return hf


def ours_from(hf, path):
    """Our model from transformers' own save_pretrained of hf: read_hf finds the head by score.weight."""
    hf.save_pretrained(path, safe_serialization=True)
    return checkpoint.load(path)


def padded_batch(vocab_size):
    """Rows: full, right-padded, left-padded, all padding, a single token; no real token is PAD."""
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(1, vocab_size, (5, 12), generator=g)
    tokens[1, 7:] = PAD
    tokens[2, :5] = PAD
    tokens[3, :] = PAD
    tokens[4, 1:] = PAD
    return tokens


def hf_logits(hf, tokens, labels=None):
    with torch.no_grad():
        out = hf(tokens, attention_mask=(tokens != PAD).long(), labels=labels)
    return out.logits, out.loss


@pytest.mark.parametrize("variant", ["llama3.1", "llama3.2"])
def test_pooled_logits_match_transformers(variant, tmp_path):
    hf = hf_classifier(variant)
    m = ours_from(hf, tmp_path / "hf")
    assert (m.args.n_labels, m.args.pad_id, m.args.multilabel, m.args.labels) == (3, PAD, False, None)
    tokens = padded_batch(m.args.vocab_size)
    with torch.no_grad():
        ours = m.classify(tokens)
    ref, _ = hf_logits(hf, tokens)
    assert ours.shape == (5, 3) and ours.dtype == torch.float32
    for row in range(len(tokens)):  # each kind of row on its own, so none hides behind the others
        assert rel_err(ours[row], ref[row]) < 1e-5, row


def test_left_padding_scores_as_the_document_alone(tmp_path):
    m = ours_from(hf_classifier("llama2"), tmp_path / "hf")
    tokens = padded_batch(m.args.vocab_size)
    with torch.no_grad():
        assert rel_err(m.classify(tokens[2:3]), m.classify(tokens[2:3, 5:])) < 1e-5
        assert rel_err(m.classify(tokens[1:2]), m.classify(tokens[1:2, :7])) < 1e-5
    assert model.left_padding_positions(tokens[:2], PAD) is None  # no row starts with padding: plain causal


def test_packed_rows_equal_each_document_alone(tmp_path):
    m = ours_from(hf_classifier("llama3.1"), tmp_path / "hf")
    g = torch.Generator().manual_seed(2)
    docs = [torch.randint(1, m.args.vocab_size, (n,), generator=g) for n in (5, 1, 9, 7, 4, 3)]
    rows = [docs[:3], docs[3:]]  # 15 tokens and 14: the second row ends in padding
    T = 16
    tokens = torch.full((2, T), PAD)
    positions = torch.zeros(2, T, dtype=torch.long)
    for r, row in enumerate(rows):
        joined = torch.cat(row)
        tokens[r, :len(joined)] = joined
        positions[r, :len(joined)] = torch.cat([torch.arange(len(d)) for d in row])
        # padding continues the last document's positions: no document of its own
        positions[r, len(joined):] = torch.arange(len(row[-1]), len(row[-1]) + T - len(joined))
    with torch.no_grad():
        packed = m.classify(tokens, positions)
        alone = torch.cat([m.classify(d[None]) for d in docs])
    assert packed.shape == (len(docs), 3)
    assert rel_err(packed, alone) < 1e-5


def test_last_tokens_rule():
    starts = torch.tensor([[1, 0, 0, 1, 0, 0], [1, 0, 0, 0, 0, 0]], dtype=torch.bool)
    real = torch.tensor([[1, 1, 0, 0, 0, 1], [0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    # row 0: documents 0..2 (last real 1) and 3..5 (last real 5); row 1: padding alone -> its first token
    assert model.last_tokens(starts, real).tolist() == [1, 5, 6]
    assert model.last_tokens(starts).tolist() == [2, 5, 11]


@pytest.mark.parametrize("n_labels, problem_type", [(3, "single_label_classification"),
                                                    (2, "single_label_classification"),
                                                    (4, "multi_label_classification")])
def test_losses_match_transformers(n_labels, problem_type, tmp_path):
    hf = hf_classifier("llama3.2", n_labels, problem_type)
    m = ours_from(hf, tmp_path / "hf")
    multilabel = problem_type == "multi_label_classification"
    assert m.args.multilabel == multilabel
    tokens = padded_batch(m.args.vocab_size)
    g = torch.Generator().manual_seed(3)
    if multilabel:
        labels = torch.randint(0, 2, (len(tokens), n_labels), generator=g).float()
    else:
        labels = torch.randint(0, n_labels, (len(tokens),), generator=g)
    _, ref = hf_logits(hf, tokens, labels)
    with torch.no_grad():
        ours = heads.classification_loss(m.classify(tokens), labels, multilabel=multilabel)
    assert abs(ours.item() - ref.item()) / ref.item() < 1e-5


def test_balanced_weights_are_scikit_learns():
    import numpy as np
    from sklearn.utils.class_weight import compute_class_weight

    y = [0, 0, 0, 1, 2, 2, 1, 0, 0, 3]
    counts = torch.bincount(torch.tensor(y))
    ref = compute_class_weight("balanced", classes=np.arange(4), y=np.array(y))
    assert torch.allclose(heads.balanced_class_weights(counts), torch.tensor(ref, dtype=torch.float32))
    multi = torch.tensor([[1, 0, 1], [0, 0, 1], [1, 1, 1], [0, 0, 1], [1, 0, 0]])
    weights = heads.balanced_class_weights(multi.sum(0), n_docs=len(multi), multilabel=True)
    for k in range(3):  # each label its own binary problem
        column = compute_class_weight("balanced", classes=np.arange(2), y=multi[:, k].numpy())
        assert torch.allclose(weights[:, k], torch.tensor(column, dtype=torch.float32))


def _labels_and_logits(K=4, N=9, multilabel=False, seed=4):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(N, K, generator=g) * 2
    labels = torch.randint(0, 2, (N, K), generator=g).float() if multilabel else torch.randint(0, K, (N,), generator=g)
    return logits, labels


def test_weighted_cross_entropy_is_torchs_weighted_mean():
    logits, labels = _labels_and_logits()
    w = torch.tensor([0.5, 2.0, 1.0, 3.0])
    ref = F.cross_entropy(logits, labels, weight=w)
    assert torch.allclose(heads.classification_loss(logits, labels, class_weights=w), ref)


def test_softmax_focal_loss_by_hand():
    logits, labels = _labels_and_logits(K=2)
    gamma, alpha = 2.0, 0.25
    terms = []
    for row, y in zip(logits.double(), labels.tolist()):
        p = torch.softmax(row, 0)[y].item()
        a = alpha if y == 1 else 1 - alpha
        terms.append(-a * (1 - p) ** gamma * torch.log(torch.tensor(p)).item())
    ours = heads.classification_loss(logits, labels, focal_gamma=gamma, focal_alpha=alpha)
    assert abs(ours.item() - sum(terms) / len(terms)) < 1e-6
    logits, labels = _labels_and_logits(K=4)
    plain = heads.classification_loss(logits, labels, focal_gamma=0.0)
    assert torch.allclose(plain, F.cross_entropy(logits, labels))
    assert heads.classification_loss(logits, labels, focal_gamma=2.0) < plain  # confident terms shrink
    with pytest.raises(ValueError, match="focal_alpha"):
        heads.classification_loss(logits, labels, focal_alpha=0.25)


def _sigmoid_focal_reference(logits, targets, alpha, gamma):
    """torchvision.ops.sigmoid_focal_loss (reduction mean), its formula written out."""
    try:
        from torchvision.ops import sigmoid_focal_loss

        return sigmoid_focal_loss(logits, targets, alpha=alpha, gamma=gamma, reduction="mean")
    except ImportError:
        p = torch.sigmoid(logits)
        ce = -(targets * torch.log(p) + (1 - targets) * torch.log(1 - p))
        p_t = p * targets + (1 - p) * (1 - targets)
        loss = ce * (1 - p_t) ** gamma
        if alpha >= 0:
            loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
        return loss.mean()


@pytest.mark.parametrize("gamma, alpha", [(2.0, 0.25), (1.5, -1), (0.0, 0.7)])
def test_sigmoid_focal_loss_is_torchvisions(gamma, alpha):
    logits, targets = _labels_and_logits(multilabel=True)
    ours = heads.classification_loss(logits, targets, multilabel=True, focal_gamma=gamma,
                                     focal_alpha=None if alpha < 0 else alpha)
    assert torch.allclose(ours, _sigmoid_focal_reference(logits.double(), targets.double(), alpha, gamma).float())


def test_multilabel_balanced_weights_weigh_each_element():
    logits, targets = _labels_and_logits(multilabel=True)
    w = heads.balanced_class_weights(targets.sum(0), n_docs=len(targets), multilabel=True)
    element = torch.where(targets == 1, w[1], w[0])
    ref = F.binary_cross_entropy_with_logits(logits, targets, weight=element)
    assert torch.allclose(heads.classification_loss(logits, targets, multilabel=True, class_weights=w), ref)


def _head_model(multilabel=False, labels=("died", "lived", "transferred")):
    args = model.ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, multiple_of=32,
                           max_seq_len=64, n_labels=3, multilabel=multilabel, labels=labels, pad_id=PAD)
    torch.manual_seed(5)
    m = model.Transformer(args)
    m.init_weights(std=0.08)
    return m.eval()


@pytest.mark.parametrize("layout", ["meta", "hf"])
@pytest.mark.parametrize("multilabel, labels", [(False, ("died", "lived", "transferred")), (True, None)])
def test_save_and_load_keep_the_head(layout, multilabel, labels, tmp_path):
    m = _head_model(multilabel, labels)
    (checkpoint.save if layout == "meta" else checkpoint.save_hf)(m, tmp_path / layout)
    back = checkpoint.load(tmp_path / layout)
    for key in ("n_labels", "multilabel", "labels", "pad_id"):
        assert getattr(back.args, key) == getattr(m.args, key), key
    tokens = padded_batch(300)
    with torch.no_grad():
        assert torch.equal(back.classify(tokens), m.classify(tokens))
        assert torch.equal(back(tokens), m(tokens))  # the LM head is kept beside it


def test_transformers_loads_our_hf_save_as_a_classifier(tmp_path):
    from transformers import AutoModelForSequenceClassification, LlamaForSequenceClassification

    m = _head_model()
    checkpoint.save_hf(m, tmp_path / "hf")
    config = json.load(open(tmp_path / "hf" / "config.json"))
    assert config["architectures"] == ["LlamaForSequenceClassification"]
    assert (config["num_labels"], config["pad_token_id"], config["problem_type"]) == \
        (3, PAD, "single_label_classification")
    assert config["id2label"] == {"0": "died", "1": "lived", "2": "transferred"}
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    assert isinstance(hf, LlamaForSequenceClassification) and hf.config.label2id["lived"] == 1
    tokens = padded_batch(300)
    ref, _ = hf_logits(hf, tokens)
    with torch.no_grad():
        assert rel_err(m.classify(tokens), ref) < 1e-5


def test_a_model_without_a_head_saves_as_before(tmp_path):
    args = model.ModelArgs(dim=64, n_layers=1, n_heads=4, vocab_size=300, multiple_of=32, max_seq_len=64)
    m = model.Transformer(args)
    assert m.score is None and "score.weight" not in m.state_dict()
    assert not {"n_labels", "multilabel", "labels", "pad_id"} & set(checkpoint.meta_params(args))
    config = checkpoint.hf_config(args, tied=False, dtype=torch.float32)
    assert config["architectures"] == ["LlamaForCausalLM"] and "num_labels" not in config
    with pytest.raises(ValueError, match="needs a head"):
        m.classify(torch.ones(1, 3, dtype=torch.long))


def test_bad_head_configs_are_one_line(tmp_path):
    with pytest.raises(ValueError, match="distinct names"):
        model.ModelArgs(dim=64, n_layers=1, n_heads=4, vocab_size=300, n_labels=2, labels=("a", "a"))
    with pytest.raises(ValueError, match="n_labels is 0"):
        model.ModelArgs(dim=64, n_layers=1, n_heads=4, vocab_size=300, multilabel=True)
    checkpoint.save_hf(_head_model(), tmp_path / "hf")
    path = tmp_path / "hf" / "config.json"
    config = json.load(open(path))
    config["id2label"] = {"0": "a", "1": "b"}
    json.dump(config, open(path, "w"))
    with pytest.raises(checkpoint.CheckpointError, match="id2label names 2 labels, but score.weight has 3"):
        checkpoint.load(tmp_path / "hf")
    meta = tmp_path / "meta"
    checkpoint.save(_head_model(), meta)
    params = json.load(open(meta / "params.json"))
    params["labels"] = ["a", 1, "c"]
    json.dump(params, open(meta / "params.json", "w"))
    with pytest.raises(checkpoint.CheckpointError, match="labels item is 1"):
        checkpoint.load(meta)


def test_a_meta_head_without_its_params_keys_is_kept(tmp_path):
    m = _head_model(labels=None)
    checkpoint.save(m, tmp_path / "meta")
    params = json.load(open(tmp_path / "meta" / "params.json"))
    for key in ("n_labels", "multilabel", "labels", "pad_id"):
        del params[key]
    json.dump(params, open(tmp_path / "meta" / "params.json", "w"))
    back = checkpoint.load(tmp_path / "meta")
    assert back.args.n_labels == 3
    tokens = padded_batch(300)
    with torch.no_grad():
        assert torch.equal(back.classify(tokens, pad_id=PAD), m.classify(tokens))
