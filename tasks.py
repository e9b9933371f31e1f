"""
X-VLM's downstream tasks (paper section 4.3 and appendix B): the task models, their fine-tuning
losses, evaluation, and the metrics the field reports, as small functions on tensors.

Read top to bottom: the metrics (pure functions), image-text retrieval (ITC + ITM fine-tuning,
top-k re-ranking by ITM), VQA (an answer decoder initialised from the cross-modal encoder,
ranking a closed answer list), NLVR2 (every cross-modal layer doubled, one block per image, and
the text-assignment pre-step), visual grounding (the bbox head, and Grad-CAM ranking proposals),
then loading a pre-trained X-VLM into a task model and the table `train.py --task` runs.

    import torch, xvlm, tasks
    cfg = xvlm.XVLMConfig.tiny(image_res=96)       # fine-tune above the pre-training resolution
    model = xvlm.XVLM(cfg).eval()
    images, ids, mask = torch.randn(2, 3, 96, 96), torch.randint(1000, 2000, (2, 6)), torch.ones(2, 6, dtype=torch.bool)
    heat, per_word = tasks.gradcam(model, images, ids, mask)   # (2, 12, 12), (2, 6, 12, 12)

Every loss takes (model, batch) and returns a dict of named 0-dim tensors with the sum in "loss";
each batch contract is in its loss's docstring; every evaluation returns its metrics (percent)
with `chance`, what a random or majority guess scores on the same split. train.py's TASKS table
wires them to data and flags. On raw images (PIL or a path):

    model, tok = xvlm.XVLM.from_checkpoint("runs/grounding/checkpoint.pt"), data.Tokenizer("synth/vocab.txt")
    tasks.score(model, "synth/images/val/00000.png", ["a red circle", "two squares"], tok)  # p_match each
    tasks.ground(model, "synth/images/val/00000.png", "yellow circle", tok)   # (x, y, w, h) in pixels
    tasks.answer(vqa_model, image, "what color is the circle?", ["red", "blue"], tok)

    python tasks.py predict --checkpoint runs/grounding/checkpoint.pt --image synth/images/val/00000.png \
        --text "yellow circle" --out predict.png      # box + per-word Grad-CAM (paper Figures 3-5)

The authors' released checkpoints load the same way, with bert-base-uncased's vocab.txt (--vocab):
README, "Reproduce the paper's numbers with the released models", and docs/released.md.
"""

import json
import math
import re
import sys
import time
from collections import Counter
from pathlib import Path
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw

import checkpoints
import data
import xvlm
from xvlm import (XVLM, Attention, BertLayer, FusionEncoder, MLMHead, TextEmbeddings, bbox_loss, bbox_terms, box_corners,
                  box_iou, draw_negatives, key_mask, mlp_head)


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


# The official VQA evaluation (Antol et al.; vqaEval.py, which the paper's test-dev numbers come from)
# normalises answers before comparing them. Its tables: 21 punctuation marks, number words, articles,
# and contractions written without one of their apostrophes ("dont" -> "don't").
VQA_PUNCTUATION = ";/[]\"{}()=+\\_-><@`,?!"
VQA_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
               "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
VQA_ARTICLES = ("a", "an", "the")
_CONTRACTED = """ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't
    he'd he'd've he's how'd how'll how's isn't it'd it'd've it'll ma'am mightn't mightn't've might've mustn't must've
    needn't not've o'clock oughtn't 'ow's'at shan't she'd've should've shouldn't shouldn't've somebody'd've somebody'll
    somebody's someone'd someone'd've someone'll someone's something'd something'd've something'll that's there'd
    there'd've there're there's they'd they'd've they'll they're they've 'twas wasn't we'd've we've weren't what'll
    what're what's what've when's where'd where's where've who'd who'd've who'll who's who've why'll why're why's won't
    would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're you've""".split()
VQA_CONTRACTIONS = {c[:i] + c[i + 1:]: c for c in _CONTRACTED for i, ch in enumerate(c) if ch == "'"}
VQA_CONTRACTIONS["somebody'd"] = "somebodyd"  # the official table's one entry the other way round
# (Its "I'm", "I've", "I'd've" entries are keyed capitalised and never match lowercased words: left out.)
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
_PERIOD = re.compile(r"\.(?!\d)")  # the official pattern "(?!<=\d)(\.)(?!\d)" strips every "." not before a digit


def vqa_punctuation(text):
    """The official processPunctuation: each mark is deleted where it touches a space (or the text
    has a digit-comma-digit), else replaced by a space; then every '.' not followed by a digit goes."""
    out = text
    for p in VQA_PUNCTUATION:
        glued = (p + " " in text or " " + p in text) or _DIGIT_COMMA_DIGIT.search(text) is not None
        out = out.replace(p, "" if glued else " ")
    return _PERIOD.sub("", out)


def vqa_digits_articles(text):
    """The official processDigitArticle: lowercase, number words to digits, articles dropped,
    contractions restored."""
    words = [VQA_NUMBERS.get(w, w) for w in text.lower().split()]
    return " ".join(VQA_CONTRACTIONS.get(w, w) for w in words if w not in VQA_ARTICLES)


def vqa_score(predicted, answers):
    """The official accuracy of one answer against the annotators' (VQA v2: ten): min(#others who
    gave it / 3, 1) averaged over the leave-one-annotator-out subsets. As the official script, the
    prediction is normalised in full, the annotators' answers only of their punctuation, and only
    when they disagree."""
    predicted = vqa_digits_articles(vqa_punctuation(predicted.replace("\n", " ").replace("\t", " ").strip()))
    if len(set(answers)) > 1:
        answers = [vqa_punctuation(a) for a in answers]
    hits = [a == predicted for a in answers]
    return sum(min(1.0, (sum(hits) - hit) / 3) for hit in hits) / len(hits)


def vqa_accuracy(predicted, annotator_answers):
    """VQA accuracy (percent), the official evaluation's: vqa_score averaged over questions."""
    scores = [vqa_score(p, answers) for p, answers in zip(predicted, annotator_answers, strict=True)]
    return 100.0 * sum(scores) / len(scores)


def answer_type(annotator_answers):
    """VQA v2's answer type of a question, from its most common answer: "yes/no", "number" or "other"
    (VQA v2's annotations carry it; the official evaluation reports accuracy per type)."""
    top = Counter(annotator_answers).most_common(1)[0][0]
    return "yes/no" if top in ("yes", "no") else "number" if top.isdigit() else "other"


def vqa_accuracy_by_type(predicted, annotator_answers):
    """{answer type: VQA accuracy over the questions of that type}, for the types present."""
    types = [answer_type(answers) for answers in annotator_answers]
    return {t: vqa_accuracy([p for p, u in zip(predicted, types, strict=True) if u == t],
                            [a for a, u in zip(annotator_answers, types) if u == t])
            for t in ("yes/no", "number", "other") if t in types}


def pixel_iou(a, b):
    """IoU of boxes (n, 4) (x, y, w, h) in pixels as the authors' RefCOCO+ evaluation counts it (their
    computeIoU): the intersection of the pixel spans x..x+w-1 and y..y+h-1, counted inclusively when both
    are positive, over the union of the plain areas w * h. (n,) float64."""
    a, b = a.double(), b.double()
    x0, y0 = torch.maximum(a[:, 0], b[:, 0]), torch.maximum(a[:, 1], b[:, 1])
    x1, y1 = torch.minimum(a[:, 0] + a[:, 2] - 1, b[:, 0] + b[:, 2] - 1), torch.minimum(a[:, 1] + a[:, 3] - 1, b[:, 1] + b[:, 3] - 1)
    inter = torch.where((x0 < x1) & (y0 < y1), (x1 - x0 + 1) * (y1 - y0 + 1), torch.zeros_like(x0))
    return inter / (a[:, 2] * a[:, 3] + b[:, 2] * b[:, 3] - inter)


def to_pixels(boxes, sizes):
    """Normalised (cx, cy, w, h) boxes (n, 4) -> (x, y, w, h) in pixels of images of sizes (n, 2) (W, H), in the
    boxes' precision and order of operations as the authors' grounding_eval_bbox (not clipped to the image)."""
    xywh = boxes * sizes.to(boxes.dtype).repeat(1, 2)
    return torch.cat([xywh[:, :2] - xywh[:, 2:] / 2, xywh[:, 2:]], 1)


def grounding_accuracy(pred, target):
    """RefCOCO+ accuracy: percent of predicted boxes with IoU >= 0.5 (pixel_iou) against the ground truth,
    both (n, 4) (x, y, w, h) in pixels."""
    return 100.0 * (pixel_iou(pred, target) >= 0.5).double().mean().item()


def accuracy_by(pred, target, groups, first=()):
    """grounding_accuracy over the expressions of each group (a kind of expression, a split), for the groups
    present: those of `first` in its order, then the others sorted; None belongs to none."""
    order = [g for g in first if g in groups] + sorted({g for g in groups if g not in first} - {None})
    return {g: grounding_accuracy(pred[[i for i, x in enumerate(groups) if x == g]], target[[i for i, x in enumerate(groups) if x == g]])
            for g in order}


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


def box_chance(boxes, sizes):
    """Always predicting the split's mean box, relative to each image (the supervised grounding guess
    without looking). boxes (n, 4) (x, y, w, h) in pixels of images of sizes (n, 2)."""
    relative = boxes.double() / sizes.double().repeat(1, 2)
    return grounding_accuracy(relative.mean(0, keepdim=True) * sizes.double().repeat(1, 2), boxes)


def proposal_chance(proposals, proposal_mask, boxes):
    """Picking one of each text's proposals uniformly at random (weakly supervised grounding); boxes in pixels."""
    B, P, _ = proposals.shape
    hit = pixel_iou(proposals.reshape(B * P, 4), boxes.repeat_interleave(P, 0)).view(B, P) >= 0.5
    return 100.0 * ((hit & proposal_mask).sum(1) / proposal_mask.sum(1)).double().mean().item()


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
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def model_device(model):
    return next(model.parameters()).device


def fuse_image_text(model, images, text_ids, text_mask):
    """The cross-modal encoder's output for each (full-attention image, text) pair: (B, L, D)."""
    return model.fuse(model.encode_text(text_ids, text_mask), text_mask, model.encode_image(images))


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


def lacks(model, module):
    """Whether `model` came from a checkpoint without `module` (one of the authors' files for another
    task: model.load_report names what it left at random init)."""
    report = getattr(model, "load_report", None)
    return report is not None and any(k == module or k.startswith(module + ".") for k in report.missing)


def require_modules(model, modules, use):
    """`model`, unless its checkpoint lacked one of `modules`, which `use` needs: they would compute noise."""
    lacking = [m for m in modules if lacks(model, m)]
    if lacking:
        raise ValueError(f"{model.load_report.source}: has no {', '.join(lacking)}, which {use} needs; the authors' "
                         f"files and the heads each holds: checkpoints.RELEASED_HEADS")
    return model


# -----------------------------------------------------------------------------
# Image-text retrieval (paper 4.3): fine-tune with ITC + ITM, rank by s(I, T), re-rank the top k by ITM


def retrieval_loss(model, batch):
    """L_cl + L_match on image-text pairs (appendix B), as pre-training computes them
    (XVLM.contrastive_and_pairs, matching_loss). Also the weakly supervised grounding loss.

    batch: images (B, 3, H, W), text_ids (B, L), text_mask (B, L) bool, image_ids (B,) int64.
    Pair i is (images[i], texts[i]). Pairs sharing an image id are all positives of each other:
    the ITC target is uniform over them, and ITM never draws one of them as a hard negative.
    Returns {"loss", "itc", "itm"}.
    """
    text_mask = batch["text_mask"].bool()
    image_embeds = model.encode_image(batch["images"])
    text_embeds = model.encode_text(batch["text_ids"], text_mask)
    itc, texts, images = model.contrastive_and_pairs(model.image_features(image_embeds), model.text_features(text_embeds),
                                                     batch["image_ids"])
    itm = model.matching_loss(model.fuse(text_embeds[texts], text_mask[texts], image_embeds, image_index=images))
    return {"loss": itc + itm, "itc": itc, "itm": itm}


class RetrievalFeatures(NamedTuple):
    image_embeds: torch.Tensor  # (I, 1+N, Dv) image encoder output, kept for the ITM re-ranking
    image_feat: torch.Tensor  # (I, E) normalised g_v(v_cls)
    text_embeds: torch.Tensor  # (T, L, D) text encoder output, padded to the longest batch
    text_mask: torch.Tensor  # (T, L) bool
    text_feat: torch.Tensor  # (T, E) normalised g_w(w_cls)


@torch.no_grad()
def retrieval_features(model, image_batches, text_batches):
    """Encode every image and text once. image_batches yields (b, 3, H, W) tensors;
    text_batches yields (text_ids, text_mask) pairs, whose lengths may differ between batches.
    Like the authors, all image tokens stay in memory: 5k images x (1 + N) tokens x width floats."""
    device = model_device(model)
    image_embeds = torch.cat([model.encode_image(images.to(device)) for images in image_batches])
    texts = [(model.encode_text(ids.to(device), mask.to(device).bool()), mask.to(device).bool()) for ids, mask in text_batches]
    L = max(mask.shape[1] for _, mask in texts)
    text_embeds = torch.cat([F.pad(e, (0, 0, 0, L - e.shape[1])) for e, _ in texts])
    text_mask = torch.cat([F.pad(m, (0, L - m.shape[1]), value=False) for _, m in texts])
    return RetrievalFeatures(image_embeds, model.image_features(image_embeds), text_embeds, text_mask,
                             model.text_features(text_embeds))


def itm_scores(model, image_embeds, text_embeds, text_mask, image_index, text_index, chunk=256):
    """The ITM head's positive logit for the pairs (image_index[p], text_index[p]), fused `chunk`
    pairs per batch: (P,). The authors rank by this logit (not its softmax)."""
    scores = []
    for s in range(0, len(image_index), chunk):
        i, t = image_index[s:s + chunk], text_index[s:s + chunk]
        # A chunk holds few distinct images (a query's k candidates sit together): project their
        # keys/values once each, not once per pair.
        images, which = i.unique(return_inverse=True)
        fused = model.fuse(text_embeds[t], text_mask[t], image_embeds[images], None, which)
        scores.append(model.itm_head(fused[:, 0])[:, 1].float())
    return torch.cat(scores) if scores else image_embeds.new_zeros(0)


@torch.no_grad()
def itm_rerank(model, sims, image_embeds, text_embeds, text_mask, k, chunk=256):
    """Paper 4.3: for each image its top-k texts by s(I, T), and for each text its top-k images,
    re-scored by ITM. Every pair either direction needs is fused once, in chunks of pairs.
    The model must be in eval mode (evaluate_retrieval sets it), or dropout reorders the ranking.

    sims (I, T). Returns scores_i2t (I, T) and scores_t2i (T, I): the ITM logit inside each
    query's top k, -inf outside, so that re-ranked candidates always rank first.
    """
    I, T = sims.shape
    kt, ki = min(k, T), min(k, I)
    dev = sims.device
    i2t_image = torch.arange(I, device=dev).repeat_interleave(kt)
    i2t_text = sims.topk(kt, dim=1).indices.flatten()  # (I * kt,)
    t2i_text = torch.arange(T, device=dev).repeat_interleave(ki)
    t2i_image = sims.T.topk(ki, dim=1).indices.flatten()  # (T * ki,)
    pair = torch.cat([i2t_image * T + i2t_text, t2i_image * T + t2i_text])
    unique, where = pair.unique(return_inverse=True)  # a pair in both lists is scored once
    score = itm_scores(model, image_embeds, text_embeds, text_mask, unique // T, unique % T, chunk)[where]
    scores_i2t = torch.full((I, T), float("-inf"), device=dev)
    scores_t2i = torch.full((T, I), float("-inf"), device=dev)
    scores_i2t[i2t_image, i2t_text] = score[:len(i2t_image)]
    scores_t2i[t2i_text, t2i_image] = score[len(i2t_image):]
    return scores_i2t, scores_t2i


@torch.no_grad()
def itm_rerank_one_by_one(model, sims, image_embeds, text_embeds, text_mask, k):
    """The reference for itm_rerank, as the re-ranking reads: one pair at a time, each text cut
    to its own length (no padding). Slow; for tests and the benchmark."""
    I, T = sims.shape
    scores_i2t = torch.full((I, T), float("-inf"), device=sims.device)
    scores_t2i = torch.full((T, I), float("-inf"), device=sims.device)

    def one(i, t):
        n = int(text_mask[t].sum())
        fused = model.fuse(text_embeds[t:t + 1, :n], text_mask[t:t + 1, :n], image_embeds[i:i + 1])
        return model.itm_head(fused[:, 0])[0, 1].float()

    for i in range(I):
        for t in sims[i].topk(min(k, T)).indices.tolist():
            scores_i2t[i, t] = one(i, t)
    for t in range(T):
        for i in sims[:, t].topk(min(k, I)).indices.tolist():
            scores_t2i[t, i] = one(i, t)
    return scores_i2t, scores_t2i


def evaluate_retrieval(model, image_batches, text_batches, text_image, k=128, chunk=256, ks=(1, 5, 10)):
    """TR and IR R@K after ITM re-ranking of the top k (paper: 256 on COCO, 128 on Flickr30K), and
    `chance`, the r_mean of a random ranking. text_image (T,): the index of each text's image in
    the order image_batches yields them."""
    with evaluating(model), torch.no_grad():
        f = retrieval_features(model, image_batches, text_batches)
        sims = f.image_feat @ f.text_feat.T  # s(I, T), cosine
        scores_i2t, scores_t2i = itm_rerank(model, sims, f.image_embeds, f.text_embeds, f.text_mask, k, chunk)
    metrics = recall_at_k(scores_i2t.cpu(), text_image.cpu(), ks, scores_t2i.cpu())
    constant = recall_at_k(torch.zeros(sims.shape), text_image.cpu(), ks)  # what a random ranking gets
    return {**metrics, "chance": constant["r_mean"], "chance_txt_r1": constant["txt_r1"], "chance_img_r1": constant["img_r1"]}


# -----------------------------------------------------------------------------
# VQA (paper 4.3, appendix B): a 6-layer answer decoder over the fused question, ranking a closed answer list


def decoder_layer(cfg):
    """A cross-modal layer whose cross-attention reads the fused question (text width), not the image."""
    layer = BertLayer(cfg, cross=True)
    if cfg.vision_width != cfg.text_width:
        layer.cross_attn = Attention(cfg.text_width, cfg.text_heads, kv_dim=cfg.text_width, dropout=cfg.dropout)
    return layer


class AnswerDecoder(nn.Module):
    """The answer decoder (appendix B, following ALBEF): text embeddings, `fusion_layers` BERT
    layers with causal self-attention over the answer so far and cross-attention to the fused
    question, and an LM head tied to its own word embeddings. Shaped like the text embeddings +
    cross-modal encoder + MLM head, from which VQAModel.init_decoder_from_fusion copies it."""

    def __init__(self, cfg):
        super().__init__()
        self.embeddings = TextEmbeddings(cfg)
        self.layers = nn.ModuleList(decoder_layer(cfg) for _ in range(cfg.fusion_layers))
        self.head = MLMHead(cfg)

    def forward(self, answer_ids, answer_mask, question_states, question_mask):
        """answer_ids, answer_mask (A, La); question_states (A, Lq, D), question_mask (A, Lq) -> (A, La, D)."""
        La = answer_ids.shape[1]
        causal = torch.ones(La, La, dtype=torch.bool, device=answer_ids.device).tril()
        mask = key_mask(answer_mask.bool()) & causal  # (A, 1, La, La): real tokens at or before the query
        question_mask = key_mask(question_mask.bool())
        x = self.embeddings(answer_ids)
        for layer in self.layers:
            x = layer(x, mask, question_states, question_mask)
        return x

    def logits(self, hidden):
        return self.head(hidden, self.embeddings.word.weight)


DECODER_MODULES = {"text.embeddings.": "decoder.embeddings.", "mlm_head.": "decoder.head."}  # BERT_KEYS' names, in the answer decoder


class VQAModel(XVLM):
    """X-VLM plus the answer decoder. An X-VLM state dict loads into it by name; the decoder's
    keys (`decoder.*`) are the new ones, copied from the cross-modal encoder (load_pretrained)."""

    new_modules = ("decoder",)
    released_kinds = XVLM.released_kinds + ("vqa",)

    def __init__(self, cfg):
        super().__init__(cfg)
        self.decoder = AnswerDecoder(cfg)
        self.decoder.apply(self.init_weights)
        self.init_decoder_from_fusion()

    def init_decoder_from_fusion(self):
        """Appendix B: the decoder starts as the pre-trained cross-modal encoder: embeddings from the
        text encoder, layer i from cross-modal layer i, the LM head from the MLM head. Returns the
        decoder tensors left as they were: the cross-attention key/value when the image and text
        widths differ (it reads the question, not the image), as in the authors' code."""
        kept = [f"embeddings.{n}" for n in copy_matching(self.decoder.embeddings, self.text.embeddings)]
        for i, (dec, enc) in enumerate(zip(self.decoder.layers, self.fusion.layers, strict=True)):
            kept += [f"layers.{i}.{n}" for n in copy_matching(dec, enc)]
        kept += [f"head.{n}" for n in copy_matching(self.decoder.head, self.mlm_head)]
        return kept

    def init_new_modules(self, names):
        """Initialise the new modules `names` from the loaded weights; return the parameters left at init."""
        return [f"decoder.{n}" for n in self.init_decoder_from_fusion()] if "decoder" in names else []

    @classmethod
    def from_checkpoint(cls, source, name=None, **overrides):
        """From one of our vqa runs' checkpoints, or the authors' released VQA file (their text_decoder is
        the decoder; its config ranks answers as their rank_answer: rank_first_twice)."""
        return require_modules(super().from_checkpoint(source, name, **overrides), ("decoder",), "VQA")

    @classmethod
    def released_layout(cls, cfg, kind):
        """XVLM's, and in their VQA file the decoder: their text_decoder, a BERT whose every layer cross-attends
        (to the question), with its embeddings and LM head (checkpoints' BERT rows, moved into the decoder)."""
        fusion, extra = super().released_layout(cfg, kind)
        if kind != "vqa":
            return fusion, extra
        layers = [dict(i=i, layer=f"decoder.layers.{i}") for i in range(cfg.fusion_layers)]
        rows = checkpoints.expand_table(checkpoints.BERT_KEYS, layers) + checkpoints.expand_table(checkpoints.CROSS_KEYS, layers)
        move = lambda ours: next((ours.replace(a, b, 1) for a, b in DECODER_MODULES.items() if ours.startswith(a)), ours)
        return fusion, extra + [(ours and move(ours), theirs) for ours, theirs in checkpoints.prefixed(rows, "text_decoder.")]


def answer_log_likelihood(decoder, answer_ids, answer_mask, question_states, question_mask):
    """log p(answer | question) = sum_t log p(a_t | [CLS] a_<t, question): teacher forcing over every
    token after the [CLS] that starts each answer, [SEP] included. (A,)."""
    answer_mask = answer_mask.bool()
    hidden = decoder(answer_ids[:, :-1], answer_mask[:, :-1], question_states, question_mask)
    target, real = answer_ids[:, 1:], answer_mask[:, 1:]
    log_p = decoder.logits(hidden[real]).float().log_softmax(-1)  # only real targets reach the vocab
    token = log_p.gather(1, target[real][:, None]).squeeze(1)
    rows = real.nonzero()[:, 0]
    return torch.zeros(answer_ids.shape[0], device=token.device).index_add(0, rows, token)


def vqa_loss(model, batch):
    """The answer likelihood (appendix B), weighted as the authors: an answer given by k of a
    question's n annotators has weight k/n; the decoder sees the fused question once per answer.

    batch (data.VQADataset's): images (B, 3, H, W), text_ids (B, Lq), text_mask (B, Lq) bool (the questions),
    answer_ids (A, La) "[CLS] answer [SEP] [PAD]..", answer_mask (A, La) bool,
    answer_question (A,) int64 the question of each answer, answer_weights (A,) float.
    Returns {"loss", "answer"}: the weighted negative log-likelihood summed per question, averaged
    over questions.
    """
    question_mask = batch["text_mask"].bool()
    states = fuse_image_text(model, batch["images"], batch["text_ids"], question_mask)
    q = batch["answer_question"]
    nll = -answer_log_likelihood(model.decoder, batch["answer_ids"], batch["answer_mask"], states[q], question_mask[q])
    loss = (batch["answer_weights"].float() * nll).sum() / states.shape[0]
    return {"loss": loss, "answer": loss}


@torch.no_grad()
def rank_answers(model, images, question_ids, question_mask, answer_ids, answer_mask, k=128):
    """Answer from the closed candidate list (paper 4.3, the authors' `rank_answer`): score every
    candidate's first token after [CLS], keep the k best candidates, and pick the one of those
    with the highest full log-likelihood. Batched over questions and candidates. With
    cfg.rank_first_twice (the released VQA models), as their rank_answer does: the first token's
    log-probability is added to the full log-likelihood, which already holds it, so it counts twice.

    answer_ids, answer_mask (C, La): the candidates, "[CLS] answer [SEP] [PAD]..". Returns the
    chosen candidate index of each question (B,).
    """
    with evaluating(model):
        question_mask = question_mask.bool()
        states = fuse_image_text(model, images, question_ids, question_mask)
        B, k = states.shape[0], min(k, answer_ids.shape[0])
        bos = answer_ids[:1, :1].expand(B, 1)
        after_bos = model.decoder(bos, torch.ones_like(bos, dtype=torch.bool), states, question_mask)[:, 0]
        first = model.decoder.logits(after_bos).float().log_softmax(-1)[:, answer_ids[:, 1]]  # (B, C)
        top = first.topk(k, dim=1).indices  # (B, k)
        cand = top.flatten()
        ll = answer_log_likelihood(model.decoder, answer_ids[cand], answer_mask[cand],
                                   states.repeat_interleave(k, 0), question_mask.repeat_interleave(k, 0)).view(B, k)
        if model.cfg.rank_first_twice:
            ll = ll + first.gather(1, top)
        return top.gather(1, ll.argmax(1, keepdim=True)).squeeze(1)


def evaluate_vqa(model, batches, answer_ids, answer_mask, answer_list, k=128, score=True):
    """VQA accuracy (the official evaluation's) of the ranked answers, overall and per answer type
    ("yes/no", "number", "other"), and `chance`, that of always giving the split's most common answer
    (score=False: no metrics, for records without answers). batches yield data.VQADataset's {images,
    text_ids, text_mask (the questions), answers (every annotator's), index}; answer_list[c] is the string
    of candidate c. Returns (metrics, [(record index, chosen answer), ...])."""
    device = model_device(model)
    answer_ids, answer_mask = answer_ids.to(device), answer_mask.to(device)
    chosen, truth = [], []
    for batch in batches:
        b = to_device(batch, device)
        best = rank_answers(model, b["images"], b["text_ids"], b["text_mask"], answer_ids, answer_mask, k)
        index = batch["index"].tolist() if "index" in batch else range(len(chosen), len(chosen) + len(best))
        chosen += [(i, answer_list[c]) for i, c in zip(index, best.tolist())]
        truth += b["answers"]
    if not score:
        return {}, chosen
    predicted = [a for _, a in chosen]
    return {"vqa_acc": vqa_accuracy(predicted, truth), **vqa_accuracy_by_type(predicted, truth), "chance": vqa_chance(truth)}, chosen


# -----------------------------------------------------------------------------
# NLVR2 (paper 4.3, appendix B, following ALBEF): every cross-modal layer doubled, one block per image


class NLVR2Model(XVLM):
    """X-VLM whose cross-modal layers each become two consecutive blocks: `fusion.layers[i]` (the
    pre-trained layer) cross-attends to image 1, then its twin `fusion_second.layers[i]` to
    image 2. The twins start as copies, and each pair shares the cross-attention key/value
    projection (one module in both blocks), as ALBEF. Heads on the final [CLS]: `cls_head`
    (true / false, the task) and `assign_head` (the pre-step: the text describes image 1 /
    image 2 / neither; one linear layer, as the authors').

    An X-VLM state dict loads by name; new keys: fusion_second.* (copied from fusion.*),
    cls_head.*, assign_head.*. The inherited single-image `fuse` runs the first blocks only.
    """

    new_modules = ("fusion_second", "assign_head", "cls_head")
    released_kinds = XVLM.released_kinds + ("nlvr2",)

    def __init__(self, cfg):
        super().__init__(cfg)
        self.fusion_second = FusionEncoder(cfg)
        for first, second in zip(self.fusion.layers, self.fusion_second.layers):
            second.cross_attn.kv = first.cross_attn.kv  # shared: both images go through one key/value map
        self.assign_head = nn.Linear(cfg.text_width, 3)
        self.cls_head = mlp_head(cfg.text_width, 2)
        self.assign_head.apply(self.init_weights)
        self.cls_head.apply(self.init_weights)
        self.init_second_blocks()

    def init_second_blocks(self):
        """Each image-2 block starts as the same pre-trained layer as its image-1 block."""
        for first, second in zip(self.fusion.layers, self.fusion_second.layers):
            second.load_state_dict(first.state_dict())

    @classmethod
    def from_checkpoint(cls, source, name=None, **overrides):
        """From one of our nlvr2 runs' checkpoints, or the authors' released NLVR2 file (their text encoder's
        cross-modal layers T + 2i and T + 2i + 1 are fusion.layers[i] and fusion_second.layers[i]; it has no
        assign_head, the pre-step's, which stays at init)."""
        return require_modules(super().from_checkpoint(source, name, **overrides), ("fusion_second", "cls_head"), "NLVR2")

    @classmethod
    def released_layout(cls, cfg, kind):
        """XVLM's, and in their NLVR2 file: their BERT interleaves each cross-modal layer's two blocks, T + 2n over
        image 1 (ours: fusion.layers[n]) and T + 2n + 1 over image 2 (fusion_second.layers[n]), and cls_head."""
        if kind != "nlvr2":
            return super().released_layout(cfg, kind)
        fusion = [f"{('fusion', 'fusion_second')[n % 2]}.layers.{n // 2}" for n in range(2 * cfg.fusion_layers)]
        return fusion, checkpoints.expand_table([("cls_head.{i}.{p}", "cls_head.{i}.{p}")], checkpoints.MLP_HEAD_LAYERS)

    def init_new_modules(self, names):
        """Initialise the new modules `names` from the loaded weights; return the parameters left at init."""
        if "fusion_second" in names:
            self.init_second_blocks()
        return [n for n, _ in self.named_parameters() if n.split(".")[0] in set(names) - {"fusion_second"}]

    def fuse_pair(self, text_embeds, text_mask, image1_embeds, image2_embeds):
        """Text (B, L, D) through each doubled layer: the block over image 1, then the one over image 2."""
        x, mask = text_embeds, key_mask(text_mask.bool())
        for first, second in zip(self.fusion.layers, self.fusion_second.layers):
            x = first(x, mask, image1_embeds)
            x = second(x, mask, image2_embeds)
        return x


def nlvr2_logits(model, batch):
    """batch: images (B, 3, H, W) image 1, images2 (B, 3, H, W) image 2, text_ids (B, L), text_mask (B, L)."""
    B = batch["images"].shape[0]
    image_embeds = model.encode_image(torch.cat([batch["images"], batch["images2"]]))  # one ViT pass
    text_mask = batch["text_mask"].bool()
    fused = model.fuse_pair(model.encode_text(batch["text_ids"], text_mask), text_mask, image_embeds[:B], image_embeds[B:])
    return model.cls_head(fused[:, 0])


def nlvr2_loss(model, batch):
    """Does the text describe the image pair? batch as nlvr2_logits, plus labels (B,) int64 (1 = true).
    Returns {"loss", "nlvr2"}."""
    loss = F.cross_entropy(nlvr2_logits(model, batch).float(), batch["labels"])
    return {"loss": loss, "nlvr2": loss}


def assignment_pairs(sim, ids=None, generator=None):
    """The text-assignment pre-step's pairs (appendix B; sampling as the authors'): text b goes with
    its own image and a hard negative, in random order (labels 0: own image first, 1: second), or
    with two distinct hard negatives (label 2: neither); each label has probability 1/3. Negatives
    are drawn from softmax(image-image similarity), never an image sharing b's id.

    sim (B, B); ids (B,) image ids (default: all distinct). Returns image indices first, second
    and labels, each (B,).
    """
    B = sim.shape[0]
    ids = torch.arange(B, device=sim.device) if ids is None else ids
    same = ids[:, None] == ids[None, :]
    if bool(((~same).sum(1) < 2).any()):
        raise ValueError("text assignment: every image needs two others with a different id in the batch")
    neg = draw_negatives(sim, same, k=2, generator=generator)  # (B, 2), without replacement
    labels = torch.randint(3, (B,), device=sim.device, generator=generator)
    own = torch.arange(B, device=sim.device)
    first = torch.where(labels == 0, own, neg[:, 0])
    second = torch.where(labels == 0, neg[:, 0], torch.where(labels == 1, own, neg[:, 1]))
    return first, second, labels


def text_assignment_logits(model, batch, generator=None):
    """batch: images (B, 3, H, W), text_ids (B, L), text_mask (B, L), optional image_ids (B,): image-text
    pairs, as retrieval's. Each image is encoded once; the pairs index into the batch."""
    image_embeds = model.encode_image(batch["images"])
    with torch.no_grad():
        feat = model.image_features(image_embeds)
        sim = feat @ feat.T / 0.07  # the authors' fixed temperature for this sampling
    first, second, labels = assignment_pairs(sim, batch.get("image_ids"), generator)
    text_mask = batch["text_mask"].bool()
    fused = model.fuse_pair(model.encode_text(batch["text_ids"], text_mask), text_mask, image_embeds[first], image_embeds[second])
    return model.assign_head(fused[:, 0]), labels


def text_assignment_loss(model, batch, generator=None):
    """The NLVR2 pre-step: assign the text to image 1, image 2 or neither. Returns {"loss", "assign"}."""
    logits, labels = text_assignment_logits(model, batch, generator)
    loss = F.cross_entropy(logits.float(), labels)
    return {"loss": loss, "assign": loss}


@torch.no_grad()
def evaluate_classifier(model, batches, logits_and_labels):
    """Accuracy over batches, and `chance`, always answering the most common label;
    logits_and_labels(model, batch) -> (logits (B, n), labels (B,))."""
    predicted, labels = [], []
    with evaluating(model):
        for batch in batches:
            logits, y = logits_and_labels(model, to_device(batch, model_device(model)))
            predicted.append(logits.argmax(1))
            labels.append(y)
    labels = torch.cat(labels)
    return {"acc": accuracy(torch.cat(predicted), labels), "chance": majority_chance(labels)}


def evaluate_nlvr2(model, batches):
    """NLVR2 accuracy. batches yield nlvr2_loss's batches."""
    return evaluate_classifier(model, batches, lambda m, b: (nlvr2_logits(m, b), b["labels"]))


def evaluate_text_assignment(model, batches, seed=0):
    """Accuracy of the pre-step on pairs drawn with a fixed seed, so that runs compare."""
    generator = torch.Generator(model_device(model)).manual_seed(seed)
    return evaluate_classifier(model, batches, lambda m, b: text_assignment_logits(m, b, generator))


# -----------------------------------------------------------------------------
# Visual grounding (paper 4.3, appendix B): the bbox head, or Grad-CAM ranking proposals


def predict_boxes(model, images, text_ids, text_mask):
    """Eq. (2) on the fused [CLS] of the full-attention image and the text: (B, 4) normalised cxcywh."""
    text_mask = text_mask.bool()
    return model.predict_boxes(model.encode_image(images), model.encode_text(text_ids, text_mask), text_mask)


def grounding_loss(model, batch):
    """Supervised grounding: L_bbox (eq. 3), (1 - GIoU) + L1, on the referred box.
    batch: images (B, 3, H, W), text_ids (B, L), text_mask (B, L), boxes (B, 4) normalised cxcywh.
    Returns {"loss", "giou", "l1"}."""
    pred = predict_boxes(model, batch["images"], batch["text_ids"], batch["text_mask"])
    terms = bbox_terms(pred, batch["boxes"].float())
    return {"loss": terms["giou"] + terms["l1"], **terms}


def grounding_pretrain_loss(model, batch):
    """The supervised grounding pre-step (appendix B): "an additional pre-training step for 1 epoch
    using L_bbox only" on the pre-training data's box-annotated records, before fine-tuning.
    batch: data.pretrain_loader's; every region text locates its box in its full image (eqs. 2-3).
    Returns {"loss", "bbox"}."""
    boxed = (batch["text_box"] >= 0).nonzero().squeeze(1)
    text_mask = batch["text_mask"].bool()[boxed]
    pred = model.predict_boxes(model.encode_image(batch["images"]), model.encode_text(batch["text_ids"][boxed], text_mask),
                               text_mask, batch["text_image"][boxed])
    loss = bbox_loss(pred, batch["boxes"][batch["text_box"][boxed]].float())
    return {"loss": loss, "bbox": loss}


@torch.no_grad()
def evaluate_grounding(model, batches):
    """Accuracy (IoU >= 0.5, the authors' pixel_iou) of the predicted boxes in pixels of each image, overall,
    by split (RefCOCO+'s val / testA / testB, as their grounding_eval_bbox) and by kind of expression where
    the records say them, and `chance`, always predicting the split's mean box. batches yield
    data.GroundingDataset's batches."""
    pred, found = [], []
    with evaluating(model):
        for batch in batches:
            b = to_device(batch, model_device(model))
            pred.append(to_pixels(predict_boxes(model, b["images"], b["text_ids"], b["text_mask"]).float(), b["sizes"]).cpu())
            found.append(scoring_fields(batch))
    pred, target, sizes = torch.cat(pred), torch.cat([b["target_xywh"] for b in found]), torch.cat([b["sizes"] for b in found])
    return {"acc": grounding_accuracy(pred, target), "chance": box_chance(target, sizes), **grouped_metrics(pred, target, found)}


def scoring_fields(batch):
    """What the grounding metrics read of a batch, without its images (kept for the whole split)."""
    return {k: batch[k] for k in ("target_xywh", "sizes", "kinds", "splits")}


def grouped_metrics(pred, target, batches):
    """{"by_split": ..., "by_kind": ...} (accuracy_by) for the groups the records name; nothing for those none names."""
    out = {}
    for name, key, first in (("by_split", "splits", ("val", "testA", "testB")), ("by_kind", "kinds", data.REFERRING_KINDS)):
        found = accuracy_by(pred, target, [g for b in batches for g in b[key]], first)
        if found:
            out[name] = found
    return out


def gradcam(model, images, text_ids, text_mask, layer=2):
    """Grad-CAM on a cross-attention map (paper 4.3 and Figures 3-5, following ALBEF): the
    gradient of the ITM positive logit w.r.t. layer `layer`'s cross-attention probabilities,
    cam = relu(grad) * attention, averaged over heads, without the image [CLS] column.

    layer: 2, the 3rd cross-modal layer, as the paper; clamped to the last layer of smaller
    models. The ITM head reads the [CLS] output alone, so in the last layer only the [CLS] row of
    the map has a gradient and the words' maps are zero (draw_prediction reads the layer below).
    Returns heat (B, grid, grid), the mean over each text's real tokens, and per-word maps
    (B, L, grid, grid), zero at padding. Both are non-negative.
    """
    layer = min(layer, len(model.fusion.layers) - 1)
    attn = model.fusion.layers[layer].cross_attn
    text_mask = text_mask.bool()
    B, L = text_ids.shape
    grid = model.cfg.grid
    kept = []

    def literal(q, k, v, mask):  # softmax(QK^T / sqrt(d) + M) V, keeping the probabilities
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, heads, L, 1+N)
        kept.append((scores if mask is None else scores.masked_fill(~mask, float("-inf"))).softmax(-1))
        return kept[-1] @ v

    with evaluating(model):
        with torch.no_grad():
            image_embeds = model.encode_image(images)
            text_embeds = model.encode_text(text_ids, text_mask)
        attn.attend = literal  # on this one layer, instead of the fused kernel
        try:
            with torch.enable_grad():
                # A leaf that needs grad: the map gets a gradient even with frozen weights, and
                # backward stops at the cross-modal encoder.
                image_embeds.requires_grad_()
                fused = model.fuse(text_embeds, text_mask, image_embeds)
                score = model.itm_head(fused[:, 0])[:, 1].sum()  # samples are independent: one backward
                grad, = torch.autograd.grad(score, kept[0])
        finally:
            del attn.attend
    cam = (grad.clamp(min=0) * kept[0].detach())[..., 1:].mean(1)  # (B, L, N): heads averaged, image [CLS] dropped
    words = cam * text_mask[..., None]
    heat = words.sum(1) / text_mask.sum(1, keepdim=True)
    return heat.view(B, grid, grid), words.view(B, L, grid, grid)


def rank_proposals(heat, proposals, sizes, proposal_mask=None, alpha=0.5):
    """Score each proposal as the authors' grounding_eval does (ALBEF's rule): the Grad-CAM map upsampled
    bicubically to the image's pixels, summed over the box's pixel rows int(y)..int(y + h) and columns
    int(x)..int(x + w), over area ** alpha. Returns the best proposal's index (B,), the first of equal
    best scores, and all scores (B, P), -inf at padding.

    heat (B, g, g); proposals (B, P, 4) (x, y, w, h) in pixels (float64, so int() cuts as theirs);
    sizes (B, 2) each image's (W, H); proposal_mask (B, P) bool, False for padding.
    """
    B, P, _ = proposals.shape
    scores = torch.full((B, P), float("-inf"), dtype=torch.float64)
    keep = torch.ones(B, P, dtype=torch.bool) if proposal_mask is None else proposal_mask.bool().cpu()
    for b in range(B):
        W, H = (int(v) for v in sizes[b].tolist())
        pixels = F.interpolate(heat[b][None, None].float().cpu(), size=(H, W), mode="bicubic")[0, 0]
        for p in keep[b].nonzero()[:, 0].tolist():
            x, y, w, h = proposals[b, p].tolist()
            scores[b, p] = pixels[int(y):int(y + h), int(x):int(x + w)].sum().item() / (w * h) ** alpha
    return scores.argmax(1), scores


def proposal_accuracy(model, batches, choose):
    """Accuracy (IoU >= 0.5, pixel_iou) of the proposal that choose(batch) -> (B,) picks for each text, overall,
    by split and by kind of expression, and `chance`, picking a proposal at random. batches yield data.GroundingDataset's
    batches with proposals: proposals_xywh (B, P, 4) in pixels, proposal_mask (B, P), target_xywh (B, 4)."""
    pred, found, lucky = [], [], 0.0
    for batch in batches:
        b = to_device(batch, model_device(model))
        best = choose(b).cpu()
        pred.append(batch["proposals_xywh"][torch.arange(len(best)), best])
        found.append(scoring_fields(batch))
        lucky += proposal_chance(batch["proposals_xywh"], batch["proposal_mask"], batch["target_xywh"]) * len(best)
    pred, target = torch.cat(pred), torch.cat([b["target_xywh"] for b in found])
    return {"acc": grounding_accuracy(pred, target), "chance": lucky / len(target), **grouped_metrics(pred, target, found)}


def evaluate_grounding_weak(model, batches, layer=2):
    """Weakly supervised grounding: the proposal ranked first by Grad-CAM at cross-modal layer `layer`
    (rank_proposals; proposal_accuracy)."""
    def choose(b):
        heat, _ = gradcam(model, b["images"], b["text_ids"], b["text_mask"], layer)
        return rank_proposals(heat, b["proposals_xywh"], b["sizes"], b.get("proposal_mask"))[0]
    return proposal_accuracy(model, batches, choose)


@torch.no_grad()
def region_scores(model, images, text_ids, text_mask, proposals, proposal_mask=None):
    """s(V, T) = g_v(v_cls) . g_w(w_cls) (paper eq. 4) between each text and each of its image's
    proposal boxes, every box encoded as a visual concept (the ViT's mixed attention, eq. 1), as
    pre-training aligns object and region texts with their boxes. proposals (B, P, 4) normalised
    cxcywh, proposal_mask (B, P) bool (False: padding). Returns (B, P), -inf at padding."""
    B, P, _ = proposals.shape
    keep = torch.ones(B, P, dtype=torch.bool, device=proposals.device) if proposal_mask is None else proposal_mask.bool()
    box_image = torch.arange(B, device=proposals.device)[:, None].expand(B, P)[keep]
    with evaluating(model):
        _, regions, _ = model.encode_concepts(images, proposals[keep].float(), box_image)
        region_feat = model.image_features(regions)  # (K, E)
        text_feat = model.text_features(model.encode_text(text_ids, text_mask.bool()))  # (B, E)
    scores = torch.full((B, P), float("-inf"), device=proposals.device)
    scores[keep] = (region_feat * text_feat[box_image]).sum(-1).float()
    return scores


def evaluate_grounding_regions(model, batches):
    """Zero-shot grounding by region-text alignment: the proposal whose box, as a visual concept,
    the text matches best (region_scores; proposal_accuracy)."""
    return proposal_accuracy(model, batches, lambda b: region_scores(
        model, b["images"], b["text_ids"], b["text_mask"], b["proposals"], b.get("proposal_mask")).argmax(1))


# -----------------------------------------------------------------------------
# Loading a pre-trained X-VLM into a task model


def load_pretrained(model, source, name=None):
    """Load one of our checkpoints (pre-trained X-VLM, or the task's own; a file, or the state dict read from
    one, `name` naming it in messages) into a task model, strictly,
    through xvlm.load_state (position embeddings resampled to the model's resolution, shapes
    and key sets checked). A model key may be absent only if it belongs to one of the model's
    `new_modules`, and then the whole module must be; those modules are then initialised by the
    model from its loaded weights (the VQA decoder and the NLVR2 twins from the cross-modal
    encoder). Returns (the modules initialised so, the parameter names left at their random init).
    """
    if isinstance(source, dict) and checkpoints.is_released(source):
        return load_released_file(model, source, name or "the released file")
    state, source = checkpoints.read_state_dict(source)
    source = name or source
    new = getattr(model, "new_modules", ())
    own = model.state_dict(keep_vars=True)
    # A tensor shared under two names (NLVR2's key/value) is loaded when either name is present,
    # as in a .safetensors file, which stores shared tensors once.
    aliases = {}
    for k, t in own.items():
        aliases.setdefault(id(t), set()).add(k)
    absent = [k for k in own if k not in state]
    covered = [k for k in absent if aliases[id(own[k])] & state.keys()]
    owner = lambda key: next((m for m in new if key.startswith(m + ".")), None)
    fresh = sorted({owner(k) for k in absent if k not in covered and owner(k)})
    for m in fresh:
        part = [k for k in state if k.startswith(m + ".")]
        if part:
            raise ValueError(f"{source}: holds part of {type(model).__name__}.{m} ({part[:3]}), not all of it")
    xvlm.load_state(model, state, source, allow_missing=covered + [m + "." for m in fresh])
    left = model.init_new_modules(fresh) if fresh else []
    return fresh, left


def released_file_kind(model_class, state, source, reader=None):
    """The kind of one of the authors' state dicts, refused (naming the tasks it serves) if model_class (`reader` in
    the message) does not read it."""
    kind = checkpoints.released_kind(state, source)
    if kind not in model_class.released_kinds:
        readers = [t for t, row in TASKS.items() if kind in row.model.released_kinds]
        raise data.UsageError(f"{source} is the authors' {kind} checkpoint, which {reader or model_class.__name__} does "
                              f"not read: it serves --task {', '.join(readers)}")
    return kind


def load_released_file(model, checkpoint, source):
    """One of the authors' released files (as checkpoints.read_file read it) into a task model built with its
    config (train.model_config), by the model's released_layout; a file of a kind the model does not read (a
    VQA file for retrieval) is refused. The model's new modules the file lacks are initialised from it as
    load_pretrained does (the VQA decoder from a pre-trained file's cross-modal layers). Returns as load_pretrained."""
    state = checkpoints.state_dict_of(checkpoint, source)
    kind = released_file_kind(type(model), state, source)
    fusion, extra = model.released_layout(model.cfg, kind)
    report = xvlm.load_released(model, state, source, checkpoints.released_key_pairs(model.cfg, kind, fusion, extra))
    loaded = set(report.loaded)
    fresh = [m for m in getattr(model, "new_modules", ()) if not any(k.startswith(m + ".") for k in loaded)]
    left = model.init_new_modules(fresh) if fresh else []
    params = {n for n, _ in model.named_parameters()}
    return fresh, sorted(set(left) | {k for k in report.missing if k in params and not k.startswith(tuple(m + "." for m in fresh))})


# -----------------------------------------------------------------------------
# Inference on raw images: five lines from Python, and `python tasks.py predict`


def image_tensor(image, image_res):
    """A PIL image or a path -> ((1, 3, res, res) normalised tensor, the RGB PIL image), through the
    same conversion (data.to_rgb) either way."""
    img = data.to_rgb(image) if isinstance(image, Image.Image) else data.load_image(image)
    return data.to_tensor(img.resize((image_res, image_res), Image.BICUBIC))[None], img


def text_list(texts, what):
    """A list of texts from a list or a single string; an empty one is refused."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not texts:
        raise ValueError(f"{what}: no texts given")
    return texts


def encode_texts(model, tokenizer, texts, clean=data.clean_caption):
    """Texts cleaned and tokenised as the model's training read them: ids, mask (n, L), L <= cfg.max_tokens;
    ending in [SEP] (ours) or not (the authors' released models: cfg.text_sep)."""
    return tokenizer.encode_batch([clean(t) for t in texts], model.cfg.max_tokens, sep=model.cfg.text_sep)


@torch.no_grad()
def score(model, image, texts, tokenizer):
    """p_match(I, T) of the ITM head for each text (a list, or one string): (n,), how well each
    text describes the image."""
    texts = text_list(texts, "score")
    require_modules(model, ("itm_head",), "score")
    with evaluating(model):
        x, _ = image_tensor(image, model.cfg.image_res)
        ids, mask = encode_texts(model, tokenizer, texts)
        device = model_device(model)
        fused = fuse_image_text(model, x.to(device).expand(len(texts), -1, -1, -1), ids.to(device), mask.to(device))
        return model.itm_head(fused[:, 0]).float().softmax(-1)[:, 1].cpu()


@torch.no_grad()
def ground(model, image, text, tokenizer):
    """The box the text refers to, (x, y, w, h) in pixels of the image, clipped to it: the bbox head (eq. 2)."""
    require_modules(model, ("bbox_head",), "ground")
    with evaluating(model):
        x, img = image_tensor(image, model.cfg.image_res)
        ids, mask = encode_texts(model, tokenizer, [text])
        device = model_device(model)
        x0, y0, x1, y1 = box_corners(predict_boxes(model, x.to(device), ids.to(device), mask.to(device)))[0].clamp(0, 1).tolist()
        W, H = img.size
        return (x0 * W, y0 * H, (x1 - x0) * W, (y1 - y0) * H)


@torch.no_grad()
def answer(model, image, question, answers, tokenizer, k=128):
    """The candidate in `answers` (a list of strings) that a VQAModel ranks first for the question."""
    if not hasattr(model, "decoder"):
        raise TypeError(f"answer needs a VQAModel (tasks.VQAModel.from_checkpoint of a vqa run), not a {type(model).__name__}")
    answers = text_list(answers, "answer: candidate answers")
    x, _ = image_tensor(image, model.cfg.image_res)
    q_ids, q_mask = encode_texts(model, tokenizer, [question], data.clean_question)
    a_ids, a_mask = tokenizer.encode_batch(answers, model.cfg.max_tokens, sep=True)  # "[CLS] answer [SEP]", theirs too
    device = model_device(model)
    best = rank_answers(model, x.to(device), q_ids.to(device), q_mask.to(device), a_ids.to(device), a_mask.to(device), k)
    return answers[best.item()]


def heat_overlay(img, heat, size):
    """The image at `size` with a Grad-CAM map (g, g) blended in: blue (cold) to red (hot)."""
    h = heat / heat.max().clamp(min=1e-12)
    h = F.interpolate(h[None, None].float(), size=(size, size), mode="bilinear", align_corners=False)[0, 0]
    colour = torch.stack([h, 1 - (2 * h - 1).abs(), 1 - h], -1)  # red, green peaking midway, blue
    base = torch.from_numpy(np.asarray(img.resize((size, size), Image.BICUBIC), dtype=np.float32) / 255)
    mixed = (0.5 * base + 0.5 * colour).clamp(0, 1)
    return Image.fromarray((mixed.numpy() * 255).astype(np.uint8))


def draw_prediction(model, image, text, tokenizer, size=256):
    """The paper's Figures 3-5 for one image and text: the predicted box, the Grad-CAM map of the
    whole text, then one map per word. Returns a PIL image. A model whose checkpoint had no bbox head
    (the authors' retrieval files) draws no box; one without an ITM head (their bbox files), no maps."""
    x, img = image_tensor(image, model.cfg.image_res)
    ids, mask = encode_texts(model, tokenizer, [text])
    device = model_device(model)
    words, panels, titles = [], [img.resize((size, size), Image.BICUBIC)], [f"box: {text}" if not lacks(model, "bbox_head") else text]
    if not lacks(model, "itm_head"):
        layer = max(0, min(2, len(model.fusion.layers) - 2))  # words have no map in the last layer (see gradcam)
        heat, per_word = gradcam(model, x.to(device), ids.to(device), mask.to(device), layer)
        words = [(tokenizer.decode([t]), per_word[0, i]) for i, t in enumerate(ids[0].tolist())
                 if mask[0, i] and t not in tokenizer.special_ids]
        panels += [heat_overlay(img, heat[0].cpu(), size)] + [heat_overlay(img, m.cpu(), size) for _, m in words]
        titles += ["Grad-CAM: all words"] + [w for w, _ in words]
    sheet = Image.new("RGB", (size * len(panels), size + 24), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (panel, title) in enumerate(zip(panels, titles)):
        sheet.paste(panel, (i * size, 24))
        draw.text((i * size + 4, 6), title[:40], fill="black")
    if not lacks(model, "bbox_head"):
        W, H = img.size
        bx, by, bw, bh = ground(model, image, text, tokenizer)
        draw.rectangle([bx / W * size, 24 + by / H * size, (bx + bw) / W * size, 24 + (by + bh) / H * size],
                       outline=(255, 0, 0), width=3)
    return sheet


# -----------------------------------------------------------------------------
# The tasks `train.py --task NAME` runs: one row each, holding everything the task is
#
# A row's train_loader(settings, tokenizer, cfg, shard) gives the training batches, its
# evaluation(settings, tokenizer, cfg, log) reads and checks every evaluation input at once (before
# any training) and returns evaluate(model) -> metrics, or None without evaluation data. `settings`
# is a TaskSettings, the part of train.Settings the rows read (train.task_settings builds it).


def log_skipped(batch, log):
    """Log and drop the unreadable images a batch lists under "skipped"; returns how many there were."""
    skipped = batch.pop("skipped")
    for u in skipped:
        log(f"skipping {u.what} {u.path}: {u.reason}")
    return len(skipped)


class Batches:
    """A dataset's evaluation batches, read afresh each time; unreadable images logged and counted, and a
    progress line (records done, images/s, eta) every `every` seconds."""

    def __init__(self, dataset, log, every=30.0, probe=3):
        self.dataset, self.log, self.skipped, self.every = dataset, log, 0, every
        tried = [dataset[i] for i in range(min(probe, len(dataset)))]  # at the start: a wrong --image-root fails now
        if tried and all(isinstance(t, data.Unreadable) for t in tried):
            raise data.DataError(f"the evaluation's first {len(tried)} records name no readable image ({tried[0].path}: "
                                 f"{tried[0].reason}): check --image-root and --eval-data")

    def __iter__(self):
        self.skipped, done, t0 = 0, 0, time.time()
        last = t0
        for batch in data.eval_loader(self.dataset):
            self.skipped += log_skipped(batch, self.log)
            yield batch
            done += len(batch["index"]) + len(batch.get("skipped", ()))
            if time.time() - last >= self.every and done < len(self.dataset):
                last, rate = time.time(), done / max(time.time() - t0, 1e-9)
                self.log(f"eval {type(self.dataset).__name__}: {done}/{len(self.dataset)} records  {rate:.1f} records/s  "
                         f"eta {(len(self.dataset) - done) / max(rate, 1e-9) / 60:.1f} min")

    def counted(self, metrics):
        return {**metrics, "skipped_images": self.skipped} if self.skipped else metrics


def retrieval_metrics(model, split, tokenizer, k, log):
    """TR / IR recall of a data.RetrievalEvalDataset, leaving out the texts of images that turn out unreadable."""
    batches = Batches(split, log)
    images, kept = [], []
    for b in batches:
        images.append(b["images"])
        kept += b["index"].tolist()
    row = {image: r for r, image in enumerate(kept)}
    texts = [t for t in range(len(split.texts)) if split.txt2img[t] in row]
    text_batches = [split.tokenizer.encode_batch([split.texts[t] for t in texts[i:i + 256]], split.max_tokens)
                    for i in range(0, len(texts), 256)]
    text_image = torch.tensor([row[split.txt2img[t]] for t in texts])
    return batches.counted(evaluate_retrieval(model, images, text_batches, text_image, k=k))


@dataclass(frozen=True)
class TaskSettings:
    """What a task's row reads of a run's settings: train.Settings' fields of the same names, no more."""
    data: tuple  # the training files
    eval_data: tuple  # the evaluation files, or None: no evaluation
    image_root: str  # the directory the records' image paths are relative to
    answer_list: str  # vqa: the candidate answers (a JSON list), or None
    proposals: str  # grounding_weak, pretrain: proposal boxes per image, or None
    grounding_data: tuple  # pretrain: the zero-shot grounding records, or None
    batch_size: int  # images per process and step
    seed: int  # a downstream training set's augmentation draws
    crop_scale: tuple  # the random resized crop's area range (lo, hi)
    region_crop_scale: tuple  # pre-training's box-annotated images: the window around the box, or None
    max_regions: int  # pre-training: most texts per box-annotated image, its caption included
    shuffle_buffer: int  # pre-training from tar shards: each reader's shuffle buffer, in samples
    objects: bool  # pre-training: object texts in (off: Table 3's w/o object)
    regions: bool  # pre-training: region texts in (off: Table 3's w/o region)
    rerank_k: int  # the top k re-ranked: by ITM in retrieval, by full likelihood in VQA
    gradcam_layer: int  # grounding_weak: the cross-modal layer whose cross-attention Grad-CAM reads
    decode: str  # how image files are read: data.DECODINGS
    out: str  # the run's directory: the VQA result file goes there


def eval_args(s, tokenizer, cfg, cut=False):
    """The evaluation files' dataset arguments. Texts are cut at cfg.max_tokens where the authors' evaluation
    cuts them (`cut`: retrieval), else only at the model's positions."""
    return s.eval_data, s.image_root, tokenizer, cfg.max_tokens if cut else cfg.max_positions, cfg.image_res


def pretrain_evaluation(s, tokenizer, cfg, log):
    """Zero-shot, straight after pre-training: retrieval, and grounding by the bbox head and by
    ranking proposal boxes as visual concepts (the images read once for both)."""
    if not s.eval_data and not s.grounding_data:
        return None
    split = data.RetrievalEvalDataset(*eval_args(s, tokenizer, cfg, cut=True), decode=s.decode) if s.eval_data else None
    grounding = (Batches(data.GroundingDataset(s.grounding_data, *eval_args(s, tokenizer, cfg)[1:], proposals=s.proposals,
                                               decode=s.decode), log) if s.grounding_data else None)

    def evaluate(model):
        out = {"retrieval": retrieval_metrics(model, split, tokenizer, s.rerank_k, log)} if split else {}
        if grounding:
            batches = list(grounding)
            out["grounding"] = grounding.counted(evaluate_grounding(model, batches))
            if s.proposals:
                out["grounding_regions"] = grounding.counted(evaluate_grounding_regions(model, batches))
        return out
    return evaluate


def retrieval_evaluation(s, tokenizer, cfg, log):
    if not s.eval_data:
        return None
    split = data.RetrievalEvalDataset(*eval_args(s, tokenizer, cfg, cut=True), decode=s.decode)
    return lambda model: retrieval_metrics(model, split, tokenizer, s.rerank_k, log)


def text_assignment_evaluation(s, tokenizer, cfg, log):
    """The NLVR2 pre-step on the retrieval split: each image with its first caption."""
    if not s.eval_data:
        return None
    split = data.RetrievalEvalDataset(*eval_args(s, tokenizer, cfg, cut=True), decode=s.decode)
    batches = Batches(split, log)

    def pairs():
        for b in batches:
            ids, mask = tokenizer.encode_batch([split.texts[split.img2txt[i][0]] for i in b["index"].tolist()], cfg.max_tokens)
            yield {"images": b["images"], "text_ids": ids, "text_mask": mask}
    return lambda model: batches.counted(evaluate_text_assignment(model, pairs()))


def vqa_evaluation(s, tokenizer, cfg, log):
    """VQA accuracy on records with answers; on records without (test-dev, test-std) the result file the
    evaluation server takes, OUT/vqa_result.json [{"question_id", "answer"}], as the authors' VQA.py writes."""
    if not s.eval_data:
        return None
    if not s.answer_list:
        raise data.UsageError("--task vqa evaluates by ranking candidate answers: give --answer-list (a JSON list of strings)")
    answers = data.read_answer_list(s.answer_list)
    answer_ids, answer_mask = tokenizer.encode_batch(answers, cfg.max_positions, sep=True)  # "[CLS] answer [SEP]", theirs too
    dataset = data.VQADataset(*eval_args(s, tokenizer, cfg), decode=s.decode)
    answered = ["answer" in r for r in dataset.records]
    if any(answered) and not all(answered):
        raise data.UsageError(f"{', '.join(s.eval_data)}: record {answered.index(False)} has no 'answer' while others do: "
                              "give answered records (accuracy) or unanswered ones (test-dev: a result file), not both")
    given = [a for r in dataset.records if "answer" in r for a in ([r["answer"]] if isinstance(r["answer"], str) else r["answer"])]
    if given and not set(given) & set(answers):
        raise data.UsageError(f"none of the {len(given)} answers in {', '.join(s.eval_data)} is a candidate of {s.answer_list} "
                              f"(e.g. {given[0]!r}): every question would score 0; give the answer list of these records")
    batches = Batches(dataset, log)

    def evaluate(model):
        metrics, chosen = evaluate_vqa(model, batches, answer_ids, answer_mask, answers, k=s.rerank_k, score=all(answered))
        result = [{"question_id": dataset.records[i]["question_id"], "answer": a} for i, a in chosen]
        data.write_records(Path(s.out) / "vqa_result.json", result)
        return batches.counted({**metrics, "questions": len(result), "result_file": str(Path(s.out) / "vqa_result.json")})
    return evaluate


def dataset_evaluation(dataset, evaluate):
    """An evaluation that runs `evaluate(model, batches)` over one data.*Dataset of the eval files."""
    def build(s, tokenizer, cfg, log):
        if not s.eval_data:
            return None
        batches = Batches(dataset(*eval_args(s, tokenizer, cfg), decode=s.decode), log)
        return lambda model: batches.counted(evaluate(model, batches))
    return build


def weak_grounding_evaluation(s, tokenizer, cfg, log):
    if not s.eval_data:
        return None
    if not s.proposals:
        raise data.UsageError("--task grounding_weak ranks proposal boxes: give --proposals ({image: [[x, y, w, h], ...]})")
    if s.gradcam_layer < 0:
        raise data.UsageError(f"--gradcam-layer must be >= 0 (a cross-modal layer, the first 0), got {s.gradcam_layer}")
    batches = Batches(data.GroundingDataset(*eval_args(s, tokenizer, cfg), proposals=s.proposals, decode=s.decode), log)
    return lambda model: batches.counted(evaluate_grounding_weak(model, batches, s.gradcam_layer))


def pretraining_data(image_text, mlm):
    """The loader of the pre-training records: image-text pairs and box-annotated images, half and
    half (pre-training), or the box-annotated images alone (the grounding pre-step); --no-objects and
    --no-regions (Table 3's switches) leave out those texts."""
    def build(s, tokenizer, cfg, shard):
        elements = tuple(k for k, on in (("object", s.objects), ("region", s.regions)) if on)
        crops = data.Crops(s.crop_scale, s.region_crop_scale)
        dataset = data.PretrainDataset(s.data, s.image_root, tokenizer, cfg, s.max_regions, crops, elements, mlm)
        return data.pretrain_loader(dataset, s.batch_size, shard, image_text=image_text, buffer=s.shuffle_buffer)
    return build


def task_data(dataset, train=True):
    """The loader of a downstream training set, data.*Dataset `dataset` (train: augmented). Texts are cut only at
    the model's positions: the authors' fine-tuning pads to the longest text and cuts none (their max_length
    without truncation=True)."""
    def build(s, tokenizer, cfg, shard):
        shards = data.split_data(s.data)[1]
        if shards:
            raise data.UsageError(f"--data {shards[0]}: tar shards are pre-training data (--task pretrain, "
                                  "grounding_pretrain); downstream tasks read JSON records")
        augment = {"train": data.Augment(s.seed, s.crop_scale)} if train else {}
        return data.task_train_loader(dataset(s.data, s.image_root, tokenizer, cfg.max_positions, cfg.image_res,
                                              **augment, decode=s.decode), s.batch_size, shard)
    return build


@dataclass(frozen=True)
class Task:
    model: type  # XVLM or a task model; load_pretrained puts an X-VLM checkpoint into it
    loss: Callable  # loss(model, batch) -> {"loss": total, name: term, ...}, 0-dim tensors
    train_loader: Callable  # (TaskSettings, tokenizer, cfg, data.Shard) -> data.EpochLoader
    evaluation: Callable  # (TaskSettings, tokenizer, cfg, log) -> evaluate(model) -> metrics, or None
    synth: dict  # the synthetic world's files (synth.SYNTH_FILES keys): "train", "val", maybe more
    frozen: tuple = ()  # parameter prefixes the loss never reaches: frozen (DDP needs every gradient)
    frozen_without_bbox_loss: tuple = ()  # and those it does not reach when cfg.use_bbox_loss is off
    new_heads: tuple = ()  # always at lr * lr_mult (the authors' init_params of the task)
    min_images: int = 2  # a batch left with fewer readable images is skipped
    ablations: tuple = ("none",)  # the Table 3 variants (train.ABLATIONS) that apply: it trains on pre-training data


ITC_ITM = ("vision_proj", "text_proj", "temp", "itm_head")  # the contrastive and matching heads
RETRIEVAL_FILES = {"train": ["retrieval_train"], "val": ["retrieval_val"]}
GROUNDING_FILES = {"train": ["grounding_train"], "val": ["grounding_val"]}

TASKS = {
    "pretrain": Task(XVLM, lambda model, batch: model(batch), pretraining_data(True, True), pretrain_evaluation,
                     {"train": ["pretrain_captions", "pretrain_regions"], "val": ["retrieval_val"],
                      "grounding_data": ["grounding_val"], "proposals": "grounding_proposals"},
                     frozen_without_bbox_loss=("bbox_head",),
                     ablations=("none", "no_object", "no_region", "no_bbox_loss", "no_mixed_attn", "no_all")),
    "grounding_pretrain": Task(XVLM, grounding_pretrain_loss, pretraining_data(False, False),
                               dataset_evaluation(data.GroundingDataset, evaluate_grounding),
                               {"train": ["pretrain_regions"], "val": ["grounding_val"]}, ITC_ITM + ("mlm_head",),
                               min_images=1, ablations=("none", "no_object", "no_region", "no_mixed_attn")),
    "nlvr2_pretrain": Task(NLVR2Model, text_assignment_loss, task_data(data.RetrievalTrainDataset), text_assignment_evaluation,
                           RETRIEVAL_FILES, ITC_ITM + ("bbox_head", "mlm_head", "cls_head"), new_heads=("assign_head",), min_images=3),
    "retrieval": Task(XVLM, retrieval_loss, task_data(data.RetrievalTrainDataset), retrieval_evaluation, RETRIEVAL_FILES,
                      ("bbox_head", "mlm_head")),
    "vqa": Task(VQAModel, vqa_loss, task_data(data.VQADataset), vqa_evaluation,
                {"train": ["vqa_train"], "val": ["vqa_val"], "answer_list": "answer_list"},
                ITC_ITM + ("bbox_head", "mlm_head"), min_images=1),
    "nlvr2": Task(NLVR2Model, nlvr2_loss, task_data(data.NLVR2Dataset), dataset_evaluation(data.NLVR2Dataset, evaluate_nlvr2),
                  {"train": ["nlvr2_train"], "val": ["nlvr2_val"]}, ITC_ITM + ("bbox_head", "mlm_head", "assign_head"),
                  new_heads=("cls_head",), min_images=1),
    "grounding": Task(XVLM, grounding_loss, task_data(data.GroundingDataset, train=False),
                      dataset_evaluation(data.GroundingDataset, evaluate_grounding), GROUNDING_FILES, ITC_ITM + ("mlm_head",),
                      min_images=1),
    "grounding_weak": Task(XVLM, retrieval_loss, task_data(data.GroundingDataset, train=False), weak_grounding_evaluation,
                           {**GROUNDING_FILES, "proposals": "grounding_proposals"}, ("bbox_head", "mlm_head")),
}


def main(argv=None):
    p = data.CommandParser(description="X-VLM inference on one image.")
    sub = p.add_subparsers(dest="command", required=True)
    q = sub.add_parser("predict", help="draw the predicted box and per-word Grad-CAM maps for a text",
                       description="Draws, side by side: the image with the box the bbox head predicts for the "
                       "text, the Grad-CAM map of the whole text and one map per word (paper Figures 3-5).")
    q.add_argument("--checkpoint", required=True, help="one of our checkpoints (e.g. runs/grounding/checkpoint.pt), "
                   "or one of the authors' released ones (docs/released.md)")
    q.add_argument("--image", required=True, help="image file")
    q.add_argument("--text", required=True, help="a referring expression, e.g. 'the red circle'")
    q.add_argument("--out", required=True, help="PNG to write")
    q.add_argument("--vocab", help="vocab.txt (default: the one the checkpoint was trained with; the authors' "
                   "checkpoints name none: bert-base-uncased's vocab.txt)")
    q.add_argument("--size", type=int, default=256, help="side of each panel in pixels")
    args = p.parse_args(argv)
    if Path(args.out).resolve() == Path(args.image).resolve():
        raise data.UsageError(f"--out {args.out} is the input image: give another file to draw on")
    if Path(args.out).suffix.lower() not in Image.registered_extensions():
        raise data.UsageError(f"--out {args.out}: name an image file PIL can write (e.g. .png)")
    if not args.text.strip():
        raise data.UsageError("--text is blank: give the expression to ground")
    checkpoint, name = checkpoints.read_file(args.checkpoint)  # read once: the weights, and the vocabulary it names
    model = XVLM.from_checkpoint(checkpoint, name=name)
    vocab = args.vocab or checkpoints.stored_vocab(checkpoint)
    if vocab is None:
        raise ValueError(f"{args.checkpoint} names no vocabulary: pass --vocab")  # one line, status 1, as every mistake
    if not Path(vocab).is_file():  # a run's vocabulary is named as its command line gave it, often relative
        raise data.UsageError(f"{args.checkpoint} names the vocabulary {vocab}, which is not there from {Path.cwd()}: pass --vocab")
    tokenizer = data.Tokenizer(vocab)
    if tokenizer.vocab_size > model.cfg.vocab_size:
        raise data.UsageError(f"--vocab {vocab} has {tokenizer.vocab_size} tokens, more than the {model.cfg.vocab_size} "
                              f"{args.checkpoint} embeds: give the vocabulary it was trained with")
    draw_prediction(model, args.image, args.text, tokenizer, args.size).save(args.out)
    box = "no bbox head" if lacks(model, "bbox_head") else \
        f"box {tuple(round(v, 1) for v in ground(model, args.image, args.text, tokenizer))} (x, y, w, h in pixels)"
    print(f"wrote {args.out}: {box}")
    return 0


if __name__ == "__main__":
    sys.exit(data.run_cli(main))
