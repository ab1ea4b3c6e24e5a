"""The heads: their losses, what train.py's --head classify minimises over the logits that
model.Transformer.classify pools, one row per document, and --head tag over model.Transformer.tag's,
one row per token.

Read top to bottom:
  balanced_class_weights  --class_weights balanced: scikit-learn's rule n / (K * count), from counts
  classification_loss     one call for every head: cross-entropy (one label per document: multiclass,
                          and binary as two classes, as transformers' single-label case), or
                          BCE-with-logits (multilabel); class weights; focal loss (--focal_gamma,
                          --focal_alpha): softmax focal for one label, torchvision's
                          sigmoid_focal_loss for multilabel
  loss_sum, loss_normaliser  the two halves of that mean (loss = sum / normaliser), so train.py can
                          take the mean over a global batch split across micro-batches and ranks
  tag_loss                the tag head's: classification_loss over the tokens that carry a tag
  attach_head, head_config  a fresh head on a model (train.py --head), and what an adapter records of it
  classification_metrics  eval.py's metrics of a head's probabilities (scikit-learn), named as DESIGN.md's
                          Heads contract names them
  metric_names, probabilities  which metrics a head's task has (train.py --keep_best), and the
                          probabilities its logits give (softmax, or sigmoid for multilabel)
  TAG_METRICS             the tag head's metric names (tagging.tag_metrics computes them)
Every loss is a mean over the batch (a weighted mean where class weights weigh single-label
documents, as F.cross_entropy's weight= does), in fp32: loss_sum / loss_normaliser.
"""

from typing import Optional

import torch
import torch.nn.functional as F


def balanced_class_weights(counts, n_docs: Optional[int] = None, multilabel: bool = False) -> torch.Tensor:
    """scikit-learn's compute_class_weight("balanced"): n / (K * count) per class.

    One label per document: counts (K,) documents of each label, n their sum -> weights (K,).
    Multilabel: each label is its own binary problem (its K = 2 classes, absent and present), so
    counts (K,) documents carrying each label, n_docs all documents -> weights (2, K): row 0 for a
    label's absence, row 1 for its presence. A count of 0 is taken as 1: its weight then never
    applies (no document has that class) and stays finite.
    """
    counts = torch.as_tensor(counts, dtype=torch.float64)
    if not multilabel:
        return (counts.sum() / (len(counts) * counts.clamp(min=1))).float()
    if n_docs is None or n_docs < counts.max():
        raise ValueError(f"multilabel class weights need n_docs >= every label's count, got {n_docs}")
    present_absent = torch.stack([n_docs - counts, counts]).clamp(min=1)
    return (n_docs / (2 * present_absent)).float()


def classification_loss(logits, labels, multilabel: bool = False, class_weights=None,
                        focal_gamma: float = 0.0, focal_alpha: Optional[float] = None) -> torch.Tensor:
    """The mean loss of logits (N, K) against labels: (N,) label indices, or for multilabel (N, K)
    of 0/1. class_weights: balanced_class_weights' (K,) or, multilabel, (2, K). focal_gamma > 0
    scales each term by (1 - p_t)^gamma (Lin et al. 2017); focal_alpha weighs the positive class by
    alpha and the negative by 1 - alpha (multilabel, and binary heads: class 1 is positive)."""
    return (loss_sum(logits, labels, multilabel, class_weights, focal_gamma, focal_alpha) /
            loss_normaliser(labels, multilabel, class_weights, focal_alpha))


def loss_sum(logits, labels, multilabel: bool = False, class_weights=None, focal_gamma: float = 0.0,
             focal_alpha: Optional[float] = None) -> torch.Tensor:
    """classification_loss times its normaliser: the sum of the weighted terms. Sums and normalisers
    of several batches add up, so sum(loss_sum) / sum(loss_normaliser) is the loss of all of them
    as one batch (train.py: a global batch over micro-batches and ranks)."""
    logits = logits.float()
    if multilabel:
        return _sigmoid_loss(logits, labels.float(), class_weights, focal_gamma, focal_alpha)
    if focal_alpha is not None and logits.shape[1] != 2:
        raise ValueError(f"--focal_alpha weighs a positive class: a binary or multilabel head's, not "
                         f"{logits.shape[1]} classes (use --class_weights)")
    return _softmax_loss(logits, labels.long(), class_weights, focal_gamma, focal_alpha)


def loss_normaliser(labels, multilabel: bool = False, class_weights=None, focal_alpha: Optional[float] = None):
    """What classification_loss divides loss_sum by, from the labels alone (so it is known before
    the forward): multilabel, the number of (document, label) terms; one label, the number of
    documents, or with class weights the sum of the documents' weights (F.cross_entropy's weighted
    mean; a binary head's focal_alpha is then part of each weight)."""
    if multilabel:
        return labels.numel()
    if class_weights is None:
        return len(labels)
    return _softmax_weights(labels.long(), class_weights, focal_alpha).sum()


def _softmax_weights(labels, class_weights, alpha):
    weight = torch.ones(labels.shape, dtype=torch.float32, device=labels.device) if class_weights is None \
        else class_weights.float().to(labels.device)[labels]
    if alpha is not None:
        weight = weight * torch.where(labels == 1, alpha, 1 - alpha)
    return weight


def _softmax_loss(logits, labels, class_weights, gamma, alpha):
    """Cross-entropy summed, each document's term -w_y (1 - p_y)^gamma log p_y (gamma 0: plain CE)."""
    log_p = F.log_softmax(logits, dim=-1).gather(1, labels[:, None]).squeeze(1)
    weight = _softmax_weights(labels, class_weights, alpha).to(log_p)
    focal = (1 - log_p.exp()) ** gamma if gamma else 1.0
    return -(weight * focal * log_p).sum()


def _sigmoid_loss(logits, targets, class_weights, gamma, alpha):
    """BCE-with-logits per (document, label), summed; with gamma or alpha, torchvision's
    sigmoid_focal_loss: ce * (1 - p_t)^gamma, times alpha_t = alpha for a present label, 1 - alpha
    for an absent one."""
    loss = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    if gamma:
        p = torch.sigmoid(logits)
        p_t = p * targets + (1 - p) * (1 - targets)
        loss = loss * (1 - p_t) ** gamma
    if alpha is not None:
        loss = loss * (alpha * targets + (1 - alpha) * (1 - targets))
    if class_weights is not None:
        absent, present = class_weights.to(loss)
        loss = loss * (present * targets + absent * (1 - targets))
    return loss.sum()


def tag_loss(logits, targets, class_weights=None, focal_gamma: float = 0.0, focal_alpha: Optional[float] = None,
             ignore_index: int = -100) -> torch.Tensor:
    """The tag head's loss: logits (B, T, K) against targets (B, T) tag ids, ignore_index where a token
    carries none (data/shards.py's TagBatch). classification_loss over the tagged tokens alone, so a
    mean over them (weighted with class_weights, as F.cross_entropy's weight=); 0, with zero
    gradients, where the batch has none (not F.cross_entropy's NaN)."""
    tagged = targets != ignore_index
    if not bool(tagged.any()):
        return logits.float().sum() * 0.0
    return classification_loss(logits[tagged], targets[tagged], False, class_weights, focal_gamma, focal_alpha)


def attach_head(model, n_labels: int, multilabel: bool, labels=None, pad_id=None, kind: str = "classify"):
    """Give model (a Transformer without a head) a fresh `score` for n_labels labels, in place, its
    weight zeros on the device of the model's final norm, in fp32 (under autocast on CUDA it
    computes in bf16; AdamW keeps fp32 master weights for it, as for LoRA's adapters). kind "tag":
    a tag head (model.head_layer: with a bias, zeros too).

    Zeros, not transformers' normal(0, 0.02): every document starts at the uniform prediction
    (loss log K), with no preference that a random head would bring (at dim 4096 normal(0, 0.02)
    gives logits of std ~1.3 from the first step). The head itself learns at once (its gradient
    h (p - y) is not zero); the trunk, or LoRA's adapters, from the second step on."""
    import dataclasses

    model.args = dataclasses.replace(model.args, n_labels=n_labels, multilabel=multilabel,
                                     labels=None if labels is None else tuple(labels), pad_id=pad_id, head_kind=kind)
    # model.Linear, as model.head_layer builds the head a checkpoint loads into (the same products,
    # bit for bit), without heads.py importing model.py (test_structure)
    Linear = type(model.output)
    model.score = Linear(model.args.dim, n_labels, bias=kind == "tag")
    model.score.to(device=model.norm.weight.device, dtype=torch.float32)
    for p in model.score.parameters():
        torch.nn.init.zeros_(p)
    return model


def head_config(args) -> dict:
    """What a head is, as adapter.json's "head" and train.py's checks read it ("kind" only for a tag
    head: a classification head's record stays as it was)."""
    config = {"n_labels": args.n_labels, "multilabel": args.multilabel,
              "labels": None if args.labels is None else list(args.labels), "pad_id": args.pad_id}
    if args.head_kind != "classify":
        config["kind"] = args.head_kind
    return config


# -----------------------------------------------------------------------------------------------
# Metrics: what eval.py --task classify reports for a head (scikit-learn computes them)


def classification_metrics(probabilities, answers, multilabel: bool, labels, k: int = 5) -> dict:
    """The head's metrics over N documents, the names DESIGN.md fixes. probabilities (N, K), one per
    label in the head's order (softmax, or sigmoid for multilabel); answers: each document's label
    index, or for multilabel its list of label indices. A metric that the evaluated set leaves
    undefined (an AUROC with one class present) is None.

    binary (2 labels, the second positive): accuracy, f1, auroc, auprc (average precision)
    multiclass: accuracy, macro_f1, auroc (macro one-vs-rest), auroc_ovo (macro one-vs-one; both
        need every label present)
    multilabel: macro_auroc over the labels with both classes present (labels_skipped: how many
        were not; None when none qualifies), micro_auroc, macro_f1 and micro_f1 with a label on
        where its probability is >= 0.5 (a label never true nor predicted counts F1 0), and
        precision_at_{k}: the mean share of each document's k most probable labels that are true
        (k = min(k, K), as written in the name)."""
    import numpy
    from sklearn.metrics import (accuracy_score, average_precision_score, f1_score, roc_auc_score)

    probs = numpy.asarray(probabilities, dtype=numpy.float64).reshape(len(answers), len(labels))
    n_labels = len(labels)
    if multilabel:
        truth = numpy.zeros(probs.shape, dtype=int)
        for row, on in enumerate(answers):
            truth[row, list(on)] = 1
        both = [j for j in range(n_labels) if 0 < truth[:, j].sum() < len(truth)]
        predicted = (probs >= 0.5).astype(int)
        k = min(k, n_labels)
        top = numpy.argsort(-probs, axis=1, kind="stable")[:, :k]
        metrics = {"macro_auroc": roc_auc_score(truth[:, both], probs[:, both], average="macro") if both else None,
                   "labels_skipped": n_labels - len(both),
                   "micro_auroc": roc_auc_score(truth.ravel(), probs.ravel()) if 0 < truth.sum() < truth.size
                   else None,
                   "macro_f1": f1_score(truth, predicted, average="macro", zero_division=0),
                   "micro_f1": f1_score(truth, predicted, average="micro", zero_division=0),
                   f"precision_at_{k}": numpy.take_along_axis(truth, top, axis=1).sum(axis=1).mean() / k}
    else:
        truth, predicted = numpy.asarray(answers, dtype=int), probs.argmax(axis=1)
        present = len(set(truth.tolist()))
        if n_labels == 2:
            metrics = {"accuracy": accuracy_score(truth, predicted),
                       "f1": f1_score(truth, predicted, pos_label=1, average="binary", zero_division=0),
                       "auroc": roc_auc_score(truth, probs[:, 1]) if present == 2 else None,
                       "auprc": average_precision_score(truth, probs[:, 1]) if present == 2 else None}
        else:
            every = present == n_labels  # sklearn's multiclass AUROCs need every class in y_true
            scores = probs / probs.sum(axis=1, keepdims=True)  # exact sums of 1, as sklearn checks
            metrics = {"accuracy": accuracy_score(truth, predicted),
                       "macro_f1": f1_score(truth, predicted, average="macro", labels=list(range(n_labels)),
                                            zero_division=0),
                       "auroc": roc_auc_score(truth, scores, multi_class="ovr", average="macro") if every else None,
                       "auroc_ovo": roc_auc_score(truth, scores, multi_class="ovo", average="macro") if every
                       else None}
    metrics = {name: v if v is None or isinstance(v, int) else float(v) for name, v in metrics.items()}
    return {**metrics, "n": len(answers)}


def metric_names(n_labels: int, multilabel: bool, k: int = 5, kind: str = "classify") -> tuple:
    """The metrics classification_metrics (kind "tag": tagging.tag_metrics) gives a head of n_labels labels
    (besides "n"), in its order."""
    if kind == "tag":
        return TAG_METRICS
    if multilabel:
        return ("macro_auroc", "labels_skipped", "micro_auroc", "macro_f1", "micro_f1",
                f"precision_at_{min(k, n_labels)}")
    return ("accuracy", "f1", "auroc", "auprc") if n_labels == 2 else ("accuracy", "macro_f1", "auroc", "auroc_ovo")


def probabilities(logits, multilabel: bool) -> torch.Tensor:
    """A head's probabilities from its logits (N, K), in fp64: sigmoid per label (multilabel), else softmax."""
    logits = logits.double()
    return logits.sigmoid() if multilabel else logits.softmax(-1)


# The tag head's metrics, as train.py logs them (val_f1, ...) and --keep_best names them; tagging.py
# computes them (and macro_f1, per_type, invalid_transitions besides, for eval.py's results)
TAG_METRICS = ("f1", "precision", "recall", "f1_strict", "token_accuracy")
