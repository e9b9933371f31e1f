"""
X-VLM's downstream tasks (paper section 4.3 and appendix B): the task models, their fine-tuning
losses, evaluation, and the metrics the field reports, as small functions on tensors.

Every loss takes (model, batch) and returns a dict of named 0-dim tensors with the sum in "loss";
each batch contract is in its loss's docstring. Tests: `python -m pytest -q test_xvlm.py -k tasks`.
"""

from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from xvlm import (XVLM, Attention, BertLayer, FusionEncoder, MLMHead, TextEmbeddings, box_corners, giou, itc_loss,
                  key_mask, mlp_head)


# -----------------------------------------------------------------------------
# Metrics, each a small pure function. Percentages, as the paper's tables.


def hit_rate(scores, positive, ks):
    """Percent of queries with a positive candidate among their top K, for each K in ks.

    scores (Q, C), positive (Q, C) bool with at least one positive per row. Ties are broken
    uniformly at random, in expectation: a model with constant scores gets exactly chance, not
    the 100% that an index-order tie-break can hand it. Per query: `above` negatives score
    higher than its best positive, and `n` negatives tie with the `m` positives at that score.
    The first tied positive lands at `above + X`, where X counts the tied negatives drawn before
    it, and P(X >= j) = C(n, j) / C(n + m, j).
    """
    best = scores.masked_fill(~positive, float("-inf")).amax(1, keepdim=True)  # (Q, 1)
    negative = ~positive
    above = (negative & (scores > best)).sum(1).double()
    n = (negative & (scores == best)).sum(1).double()
    m = (positive & (scores == best)).sum(1).double()
    out = {}
    for k in ks:
        j = (k - above).clamp(min=0)  # slots left for the tied group; 0: no hit possible
        jn = torch.minimum(j, n)
        log_miss = torch.lgamma(n + 1) - torch.lgamma(n - jn + 1) - torch.lgamma(n + m + 1) + torch.lgamma(n + m - jn + 1)
        miss = torch.where(j > n, 0.0, log_miss.exp())  # more slots than tied negatives: a sure hit
        out[k] = 100.0 * (1.0 - miss).mean().item()
    return out


def recall_at_k(scores_i2t, text_image, ks=(1, 5, 10), scores_t2i=None):
    """Retrieval metrics (paper Table 1): TR R@K ranks the texts for each image, IR R@K the
    images for each text, and r_mean averages all six. Keys as the authors' `itm_eval`.

    scores_i2t (n_images, n_texts); text_image (n_texts,) the image of each text (an image has
    several texts, a text one image); scores_t2i (n_texts, n_images) when the two directions
    were re-ranked separately, else scores_i2t.T.
    """
    n_images = scores_i2t.shape[0]
    positive = text_image[None, :] == torch.arange(n_images, device=text_image.device)[:, None]  # (I, T)
    lonely = (~positive.any(1)).nonzero()
    if len(lonely):
        raise ValueError(f"recall_at_k: image {lonely[0].item()} has no text in text_image")
    tr = hit_rate(scores_i2t, positive, ks)
    ir = hit_rate(scores_i2t.T if scores_t2i is None else scores_t2i, positive.T, ks)
    out = {f"txt_r{k}": tr[k] for k in ks} | {"txt_r_mean": sum(tr.values()) / len(ks)}
    out |= {f"img_r{k}": ir[k] for k in ks} | {"img_r_mean": sum(ir.values()) / len(ks)}
    out["r_mean"] = (out["txt_r_mean"] + out["img_r_mean"]) / 2
    return out


def vqa_accuracy(predicted, annotator_answers):
    """VQA accuracy (Goyal et al.): an answer scores min(#annotators who gave it / 3, 1),
    averaged over questions, percent. (The official script also averages this over the ten
    leave-one-annotator-out subsets; the paper states the plain form used here.)"""
    scores = [min(answers.count(p) / 3, 1.0) for p, answers in zip(predicted, annotator_answers, strict=True)]
    return 100.0 * sum(scores) / len(scores)


def box_iou(a, b, eps=1e-7):
    """IoU of boxes a[i] and b[i], both (n, 4) normalised (cx, cy, w, h) as xvlm.giou -> (n,)."""
    a, b = box_corners(a), box_corners(b)
    area = lambda c: (c[:, 2:] - c[:, :2]).clamp(min=0).prod(-1)
    inter = (torch.minimum(a[:, 2:], b[:, 2:]) - torch.maximum(a[:, :2], b[:, :2])).clamp(min=0).prod(-1)
    return inter / (area(a) + area(b) - inter).clamp(min=eps)


def grounding_accuracy(pred, target):
    """RefCOCO+ accuracy: percent of predicted boxes with IoU >= 0.5 against the ground truth."""
    return 100.0 * (box_iou(pred, target) >= 0.5).float().mean().item()


def accuracy(predicted, labels):
    """Classification accuracy, percent (NLVR2 and its text-assignment pre-step)."""
    return 100.0 * (predicted == labels).float().mean().item()


# What a model that learned nothing scores on the same split: `chance` in metrics.json.


def retrieval_chance(n_images, text_image, ks=(1, 5, 10)):
    """Random scores: exactly what constant scores get under hit_rate's tie rule."""
    return recall_at_k(torch.zeros(n_images, len(text_image)), text_image, ks)["r_mean"]


def vqa_chance(annotator_answers):
    """Always giving the split's most common annotator answer."""
    majority = Counter(a for answers in annotator_answers for a in answers).most_common(1)[0][0]
    return vqa_accuracy([majority] * len(annotator_answers), annotator_answers)


def majority_chance(labels):
    """Always predicting the most common label."""
    return 100.0 * torch.bincount(labels).max().item() / len(labels)


def box_chance(boxes):
    """Always predicting the split's mean box (the supervised grounding guess without looking)."""
    return grounding_accuracy(boxes.mean(0, keepdim=True).expand_as(boxes), boxes)


def proposal_chance(proposals, proposal_mask, boxes):
    """Picking one of each text's proposals uniformly at random (weakly supervised grounding)."""
    B, P, _ = proposals.shape
    hit = box_iou(proposals.reshape(B * P, 4), boxes.repeat_interleave(P, 0)).view(B, P) >= 0.5
    return 100.0 * ((hit & proposal_mask).sum(1) / proposal_mask.sum(1)).mean().item()


# -----------------------------------------------------------------------------
# Shared helpers


@contextmanager
def evaluating(model):
    """Eval mode (no dropout) inside the block, then back to the mode the model was in."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def to_device(batch, device):
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def model_device(model):
    return next(model.parameters()).device


def fuse_image_text(model, images, text_ids, text_mask):
    """The cross-modal encoder's output for each (full-attention image, text) pair: (B, L, D)."""
    image_embeds = model.encode_image(images)[0]
    return model.fuse(model.encode_text(text_ids, text_mask), text_mask, image_embeds)


def copy_matching(dst, src):
    """Copy src's tensors into dst's of the same name and shape; return the names left as they were."""
    source = src.state_dict()
    kept = []
    with torch.no_grad():
        for name, tensor in dst.state_dict().items():
            if name in source and source[name].shape == tensor.shape:
                tensor.copy_(source[name])
            else:
                kept.append(name)
    return kept
