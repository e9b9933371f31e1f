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
"""

import argparse
import json
import math
import re
import sys
import time
from collections import Counter
from pathlib import Path
from contextlib import contextmanager
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw

import data
import xvlm
from xvlm import (XVLM, Attention, BertLayer, FusionEncoder, MLMHead, TextEmbeddings, bbox_loss, box_corners, box_iou,
                  draw_negatives, giou, itc_loss, itm_loss, key_mask, mlp_head, sample_hard_negatives)


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


def grounding_accuracy(pred, target):
    """RefCOCO+ accuracy: percent of predicted boxes with IoU >= 0.5 against the ground truth."""
    return 100.0 * (box_iou(pred, target)[0] >= 0.5).float().mean().item()


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
    hit = box_iou(proposals.reshape(B * P, 4), boxes.repeat_interleave(P, 0))[0].view(B, P) >= 0.5
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


# -----------------------------------------------------------------------------
# Image-text retrieval (paper 4.3): fine-tune with ITC + ITM, rank by s(I, T), re-rank the top k by ITM


def retrieval_loss(model, batch):
    """L_cl + L_match on image-text pairs (appendix B). Also the weakly supervised grounding loss.

    batch: images (B, 3, H, W), text_ids (B, L), text_mask (B, L) bool, image_ids (B,) int64.
    Pair i is (images[i], texts[i]). Pairs sharing an image id are all positives of each other:
    the ITC target is uniform over them, and ITM never draws one of them as a hard negative.
    Returns {"loss", "itc", "itm"}.
    """
    text_mask, ids = batch["text_mask"].bool(), batch["image_ids"]
    image_embeds = model.encode_image(batch["images"])
    text_embeds = model.encode_text(batch["text_ids"], text_mask)
    image_feat, text_feat = model.image_features(image_embeds), model.text_features(text_embeds)
    itc = itc_loss(image_feat, text_feat, model.temperature, ids)
    with torch.no_grad():
        neg_text, neg_image = sample_hard_negatives(image_feat @ text_feat.T / model.temperature, ids)
    every = torch.arange(len(ids), device=ids.device)
    texts, images = torch.cat([every, neg_text, every]), torch.cat([every, every, neg_image])
    logits = model.itm_head(model.fuse(text_embeds[texts], text_mask[texts], image_embeds, image_index=images)[:, 0])
    itm = itm_loss(logits[:len(ids)], logits[len(ids):])
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
    Like the authors, all image tokens stay in memory (COCO 5k at 384px: ~9 GB in fp32)."""
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


class VQAModel(XVLM):
    """X-VLM plus the answer decoder. An X-VLM state dict loads into it by name; the decoder's
    keys (`decoder.*`) are the new ones, copied from the cross-modal encoder (load_pretrained)."""

    new_modules = ("decoder",)

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
    with the highest full log-likelihood. Batched over questions and candidates.

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
                                   states.repeat_interleave(k, 0), question_mask.repeat_interleave(k, 0))
        return top.gather(1, ll.view(B, k).argmax(1, keepdim=True)).squeeze(1)


def evaluate_vqa(model, batches, answer_ids, answer_mask, answer_list, k=128):
    """VQA accuracy (the official evaluation's) of the ranked answers, overall and per answer type
    ("yes/no", "number", "other"), and `chance`, that of always giving the split's most common answer.
    batches yield data.VQADataset's {images, text_ids, text_mask (the questions), answers (every
    annotator's)}; answer_list[c] is the string of candidate c."""
    device = model_device(model)
    answer_ids, answer_mask = answer_ids.to(device), answer_mask.to(device)
    predicted, truth = [], []
    for batch in batches:
        b = to_device(batch, device)
        best = rank_answers(model, b["images"], b["text_ids"], b["text_mask"], answer_ids, answer_mask, k)
        predicted += [answer_list[c] for c in best.tolist()]
        truth += b["answers"]
    return {"vqa_acc": vqa_accuracy(predicted, truth), **vqa_accuracy_by_type(predicted, truth), "chance": vqa_chance(truth)}


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
    """Supervised grounding: L_bbox (eq. 3), L1 + (1 - GIoU), on the referred box.
    batch: images (B, 3, H, W), text_ids (B, L), text_mask (B, L), boxes (B, 4) normalised cxcywh.
    Returns {"loss", "l1", "giou"}."""
    pred, target = predict_boxes(model, batch["images"], batch["text_ids"], batch["text_mask"]), batch["boxes"].float()
    l1 = (pred - target).abs().sum(-1).mean()
    g = (1.0 - giou(pred, target)).mean()
    return {"loss": l1 + g, "l1": l1, "giou": g}


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
    """Accuracy (IoU >= 0.5) of the predicted boxes, and `chance`, always predicting the split's
    mean box. batches yield grounding_loss's batches."""
    pred, target = [], []
    with evaluating(model):
        for batch in batches:
            b = to_device(batch, model_device(model))
            pred.append(predict_boxes(model, b["images"], b["text_ids"], b["text_mask"]))
            target.append(b["boxes"].float())
    target = torch.cat(target)
    return {"acc": grounding_accuracy(torch.cat(pred), target), "chance": box_chance(target)}


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


def rank_proposals(heat, proposals, proposal_mask=None):
    """Score each proposal by the heat inside it / sqrt(its area), in patch units (ALBEF's rule,
    alpha = 0.5), and return the best proposal's index (B,) and all scores (B, P).

    heat (B, g, g), constant over each patch; proposals (B, P, 4) normalised cxcywh;
    proposal_mask (B, P) bool, False for padding. A patch partly inside a box counts by the part
    inside: the exact integral of the map over the box. (The authors upsample the map bicubically to
    pixels first; the sum / sqrt(area) rule is the same.)
    """
    g = heat.shape[-1]
    corners = box_corners(proposals.float()) * g  # (B, P, 4) in patch units
    cells = torch.arange(g, device=heat.device, dtype=corners.dtype)

    def overlap(lo, hi):  # (B, P, g): how much of each patch row / column lies inside [lo, hi]
        return (torch.minimum(hi[..., None], cells + 1) - torch.maximum(lo[..., None], cells)).clamp(min=0)

    ox, oy = overlap(corners[..., 0], corners[..., 2]), overlap(corners[..., 1], corners[..., 3])
    inside = torch.einsum("bpy,byx,bpx->bp", oy, heat.float(), ox)
    area = (proposals[..., 2] * proposals[..., 3]).float() * g * g
    scores = inside / area.clamp(min=1e-6).sqrt()
    if proposal_mask is not None:
        scores = scores.masked_fill(~proposal_mask.bool(), float("-inf"))
    return scores.argmax(1), scores


def proposal_accuracy(model, batches, choose):
    """Accuracy (IoU >= 0.5) of the proposal that choose(batch) -> (B,) picks for each text, and
    `chance`, picking a proposal at random. batches yield {images, text_ids, text_mask, boxes
    (B, 4), proposals (B, P, 4) normalised cxcywh, proposal_mask (B, P) bool}."""
    pred, target, lucky = [], [], 0.0
    for batch in batches:
        b = to_device(batch, model_device(model))
        best = choose(b)
        pred.append(b["proposals"][torch.arange(len(best)), best].float())
        target.append(b["boxes"].float())
        mask = b.get("proposal_mask", torch.ones(b["proposals"].shape[:2], dtype=torch.bool, device=best.device))
        lucky += proposal_chance(b["proposals"].float(), mask.bool(), target[-1]) * len(best)
    target = torch.cat(target)
    return {"acc": grounding_accuracy(torch.cat(pred), target), "chance": lucky / len(target)}


def evaluate_grounding_weak(model, batches, layer=2):
    """Weakly supervised grounding: the proposal ranked first by Grad-CAM (proposal_accuracy)."""
    def choose(b):
        heat, _ = gradcam(model, b["images"], b["text_ids"], b["text_mask"], layer)
        return rank_proposals(heat, b["proposals"], b.get("proposal_mask"))[0]
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


def load_pretrained(model, source):
    """Load one of our checkpoints (pre-trained X-VLM, or the task's own) into a task model, strictly,
    through xvlm.load_checkpoint (position embeddings resampled to the model's resolution, shapes
    and key sets checked). A model key may be absent only if it belongs to one of the model's
    `new_modules`, and then the whole module must be; those modules are then initialised by the
    model from its loaded weights (the VQA decoder and the NLVR2 twins from the cross-modal
    encoder). Returns (the modules initialised so, the parameter names left at their random init).
    """
    state, source = xvlm.read_state_dict(source)
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
    xvlm.load_checkpoint(model, state, allow_missing=covered + [m + "." for m in fresh], name=source)
    left = model.init_new_modules(fresh) if fresh else []
    return fresh, left


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


@torch.no_grad()
def score(model, image, texts, tokenizer):
    """p_match(I, T) of the ITM head for each text (a list, or one string): (n,), how well each
    text describes the image."""
    texts = text_list(texts, "score")
    with evaluating(model):
        x, _ = image_tensor(image, model.cfg.image_res)
        ids, mask = tokenizer.encode_batch([data.clean_caption(t) for t in texts], model.cfg.max_tokens)
        device = model_device(model)
        fused = fuse_image_text(model, x.to(device).expand(len(texts), -1, -1, -1), ids.to(device), mask.to(device))
        return model.itm_head(fused[:, 0]).float().softmax(-1)[:, 1].cpu()


@torch.no_grad()
def ground(model, image, text, tokenizer):
    """The box the text refers to, (x, y, w, h) in pixels of the image, clipped to it: the bbox head (eq. 2)."""
    with evaluating(model):
        x, img = image_tensor(image, model.cfg.image_res)
        ids, mask = tokenizer.encode_batch([data.clean_caption(text)], model.cfg.max_tokens)
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
    q_ids, q_mask = tokenizer.encode_batch([data.clean_caption(question)], model.cfg.max_tokens)
    a_ids, a_mask = tokenizer.encode_batch(answers, model.cfg.max_tokens)
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
    whole text, then one map per word. Returns a PIL image."""
    x, img = image_tensor(image, model.cfg.image_res)
    ids, mask = tokenizer.encode_batch([data.clean_caption(text)], model.cfg.max_tokens)
    device = model_device(model)
    layer = max(0, min(2, len(model.fusion.layers) - 2))  # words have no map in the last layer (see gradcam)
    heat, per_word = gradcam(model, x.to(device), ids.to(device), mask.to(device), layer)
    box = ground(model, image, text, tokenizer)
    words = [(tokenizer.decode([t]), per_word[0, i]) for i, t in enumerate(ids[0].tolist())
             if mask[0, i] and t not in tokenizer.special_ids]
    panels = [img.resize((size, size), Image.BICUBIC), heat_overlay(img, heat[0].cpu(), size)]
    panels += [heat_overlay(img, m.cpu(), size) for _, m in words]
    titles = [f"box: {text}", "Grad-CAM: all words"] + [w for w, _ in words]
    sheet = Image.new("RGB", (size * len(panels), size + 24), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (panel, title) in enumerate(zip(panels, titles)):
        sheet.paste(panel, (i * size, 24))
        draw.text((i * size + 4, 6), title[:40], fill="black")
    W, H = img.size
    bx, by, bw, bh = box
    draw.rectangle([bx / W * size, 24 + by / H * size, (bx + bw) / W * size, 24 + (by + bh) / H * size],
                   outline=(255, 0, 0), width=3)
    return sheet


# -----------------------------------------------------------------------------
# The paper's Table 3 on the synthetic world: `python tasks.py ablation`
#
# Each variant is pre-trained with the default recipe (train.ABLATIONS: its switches), evaluated
# zero-shot, then fine-tuned on retrieval, VQA, NLVR2 and both groundings for fewer steps than the
# tiny defaults (ABLATION_STEPS), so that 6 variants x 2 seeds fit in about two hours on 2 cores.
# Every finished cell is a small JSON file under docs/ablation/: a rerun, even on a fresh machine,
# skips those and finishes the table; an unfinished train run resumes from its checkpoint.

ABLATION_VARIANTS = {"X-VLM": "none", "w/o object": "no_object", "w/o region": "no_region",
                     "w/o bbox loss": "no_bbox_loss", "w/o mixed attn": "no_mixed_attn", "w/o all": "no_all"}
ABLATION_STEPS = {"pretrain": 1200, "retrieval": 200, "vqa": 400, "nlvr2": 200, "grounding_pretrain": 300, "grounding": 400,
                  "grounding_weak": 400}  # pretrain: the default recipe's 1200 x 16 images
# (column, task, metric key, in Meta-Sum, in Meta-Sum*): R@1 for retrieval, as the paper's Table 3;
# Meta-Sum sums the fine-tuned scores, Meta-Sum* leaves out supervised grounding, as the paper's *.
ABLATION_COLUMNS = [
    ("zero-shot r_mean", "pretrain", "retrieval.r_mean", False, False),
    ("zero-shot region grounding", "pretrain", "grounding_regions.acc", False, False),
    ("TR R@1", "retrieval", "txt_r1", True, True),
    ("IR R@1", "retrieval", "img_r1", True, True),
    ("VQA", "vqa", "vqa_acc", True, True),
    ("NLVR2", "nlvr2", "acc", True, True),
    ("grounding", "grounding", "acc", True, False),
    ("weak grounding", "grounding_weak", "acc", True, True),
]
CHANCE_KEYS = {"retrieval.r_mean": "retrieval.chance", "grounding_regions.acc": "grounding_regions.chance",
               "txt_r1": "chance_txt_r1", "img_r1": "chance_img_r1", "vqa_acc": "chance", "acc": "chance"}


def lookup(metrics, key):
    for part in key.split("."):
        metrics = metrics[part]
    return metrics


def ablation_cell(variant, seed, workdir, say, steps=ABLATION_STEPS):
    """Pre-train one variant with one seed, then every fine-tune, each for steps[task]; each train run
    resumes or is skipped when it already finished. Returns {task: the run's evaluation}."""
    import train  # train imports this module: a late import keeps the order of the files' reading

    root = Path(workdir) / f"{ABLATION_VARIANTS[variant]}-seed{seed}"
    name = lambda task: f"{task}-{steps[task]}"
    out = {}
    for task in steps:
        # supervised grounding starts from its pre-step (L_bbox alone), as the paper's; the rest from pre-training
        flags = ["--ablation", ABLATION_VARIANTS[variant]] if task == "pretrain" else \
            ["--init", str(root / name("grounding_pretrain" if task == "grounding" else "pretrain") / "checkpoint.pt")]
        run = root / name(task)
        if not (run / "metrics.json").exists():
            say(f"  {task} ({variant}, seed {seed})")
            resume = ["--resume"] if (run / "checkpoint.pt").exists() else []
            train.main(["--task", task, "--out", str(run), "--seed", str(seed), "--steps", str(steps[task]),
                        "--log-every", "100", *flags, *resume])
        out[task] = json.loads((run / "metrics.json").read_text())["eval"]
    return out


def ablation_table(cells):
    """The markdown table: each column's mean and half-range over seeds, Meta-Sums, chance."""
    header = ["variant", "seeds"] + [c[0] for c in ABLATION_COLUMNS] + ["Meta-Sum", "Meta-Sum*"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for variant in ABLATION_VARIANTS:
        runs = [c for c in cells if c["variant"] == variant]
        if not runs:
            continue
        values = [[c["scores"][name] for c in runs] for name in [col[0] for col in ABLATION_COLUMNS] + ["Meta-Sum", "Meta-Sum*"]]
        fmt = lambda v: f"{np.mean(v):.1f}" + (f" ± {(max(v) - min(v)) / 2:.1f}" if len(v) > 1 else "")
        lines.append(f"| {variant} | {len(runs)} | " + " | ".join(fmt(v) for v in values) + " |")
    chance = cells[0]["chance"]
    lines.append("| chance | | " + " | ".join(f"{chance[c[0]]:.1f}" for c in ABLATION_COLUMNS)
                 + f" | {sum(chance[c[0]] for c in ABLATION_COLUMNS if c[3]):.1f} | {sum(chance[c[0]] for c in ABLATION_COLUMNS if c[4]):.1f} |")
    return "\n".join(lines) + "\n"


def ablation_plot(cells, path):
    """One bar per variant (its seeds' mean Meta-Sum), a dot per seed, drawn with PIL."""
    variants = [v for v in ABLATION_VARIANTS if any(c["variant"] == v for c in cells)]
    sums = {v: [c["scores"]["Meta-Sum"] for c in cells if c["variant"] == v] for v in variants}
    lo = min(min(s) for s in sums.values()) - 10
    hi = max(max(s) for s in sums.values()) + 5
    W, H, left, bottom = 120 * len(variants) + 80, 360, 60, 50
    img = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(img)
    draw.text((left, 8), "Meta-Sum on the synthetic world (bar: mean, dots: seeds)", fill="black")
    y = lambda v: H - bottom - (v - lo) / (hi - lo) * (H - bottom - 40)
    for tick in np.linspace(lo, hi, 5):
        draw.line([(left - 4, y(tick)), (W - 10, y(tick))], fill=(230, 230, 230))
        draw.text((4, y(tick) - 6), f"{tick:.0f}", fill="gray")
    for i, v in enumerate(variants):
        x0 = left + 20 + 120 * i
        draw.rectangle([x0, y(np.mean(sums[v])), x0 + 70, y(lo)], fill=(31, 119, 180) if v == "X-VLM" else (150, 170, 190))
        for s in sums[v]:
            draw.ellipse([x0 + 31, y(s) - 4, x0 + 39, y(s) + 4], fill="black")
        draw.text((x0, H - bottom + 8), v, fill="black")
    img.save(path)


def ablation(seeds=(0, 1), out="docs/ablation", workdir="runs/ablation", variants=tuple(ABLATION_VARIANTS), pretrain_steps=None):
    """Run (or finish) the table: every (variant, seed) cell not yet in `out`, then write
    out/table.md and out/metasum.png. Returns the cells. pretrain_steps: other than the recipe's."""
    out = Path(out)
    (out / "cells").mkdir(parents=True, exist_ok=True)
    steps = {**ABLATION_STEPS, "pretrain": pretrain_steps or ABLATION_STEPS["pretrain"]}
    for path in (out / "cells").glob("*.json"):
        if json.loads(path.read_text())["steps"] != steps:
            raise ValueError(f"{path} was run with other steps than {steps}: give the table its own --out and --workdir")
    todo = [(v, s) for s in seeds for v in variants if not (out / "cells" / f"{ABLATION_VARIANTS[v]}-seed{s}.json").exists()]
    start = time.time()
    say = lambda message: print(f"[ablation {time.strftime('%H:%M:%S')}] {message}", flush=True)
    say(f"{len(todo)} of {len(seeds) * len(variants)} cells to run")
    for n, (variant, seed) in enumerate(todo):
        say(f"cell {n + 1}/{len(todo)}: {variant}, seed {seed}" + (
            f" (eta {(time.time() - start) / n * (len(todo) - n) / 60:.0f} min)" if n else ""))
        began = time.time()
        evals = ablation_cell(variant, seed, workdir, say, steps)
        scores = {c[0]: lookup(evals[c[1]], c[2]) for c in ABLATION_COLUMNS}
        scores["Meta-Sum"] = sum(scores[c[0]] for c in ABLATION_COLUMNS if c[3])
        scores["Meta-Sum*"] = sum(scores[c[0]] for c in ABLATION_COLUMNS if c[4])
        chance = {c[0]: lookup(evals[c[1]], CHANCE_KEYS[c[2]]) for c in ABLATION_COLUMNS}
        cell = {"variant": variant, "seed": seed, "scores": scores, "chance": chance, "steps": steps,
                "minutes": round((time.time() - began) / 60, 1)}
        path = out / "cells" / f"{ABLATION_VARIANTS[variant]}-seed{seed}.json"
        path.with_suffix(".tmp").write_text(json.dumps(cell, indent=1) + "\n")
        path.with_suffix(".tmp").replace(path)  # atomically: a cell file is whole or absent
        say(f"cell done in {cell['minutes']} min: Meta-Sum {scores['Meta-Sum']:.1f}")
    cells = [json.loads(p.read_text()) for p in sorted((out / "cells").glob("*.json"))]
    (out / "table.md").write_text(ablation_table(cells))
    ablation_plot(cells, out / "metasum.png")
    say(f"wrote {out / 'table.md'} and {out / 'metasum.png'} ({len(cells)} cells; this pass {(time.time() - start) / 60:.0f} min)")
    return cells


def main(argv=None):
    p = argparse.ArgumentParser(description="X-VLM inference on one image.")
    sub = p.add_subparsers(dest="command", required=True)
    q = sub.add_parser("predict", help="draw the predicted box and per-word Grad-CAM maps for a text",
                       description="Draws, side by side: the image with the box the bbox head predicts for the "
                       "text, the Grad-CAM map of the whole text and one map per word (paper Figures 3-5).")
    q.add_argument("--checkpoint", required=True, help="one of our checkpoints (e.g. runs/grounding/checkpoint.pt)")
    q.add_argument("--image", required=True, help="image file")
    q.add_argument("--text", required=True, help="a referring expression, e.g. 'the red circle'")
    q.add_argument("--out", required=True, help="PNG to write")
    q.add_argument("--vocab", help="vocab.txt (default: the one the checkpoint was trained with)")
    q.add_argument("--size", type=int, default=256, help="side of each panel in pixels")
    a = sub.add_parser("ablation", help="the paper's Table 3 on the synthetic world (about two hours on 2 cores)",
                       description="Pre-train X-VLM and its five ablations (Table 3) with the default recipe, for each "
                       "seed, evaluate zero-shot, fine-tune on every task, and write OUT/table.md and OUT/metasum.png. "
                       "Finished cells are kept as OUT/cells/*.json: a rerun skips them. Run it in the background "
                       "(nohup ... &); it logs progress, and a stopped run continues where it stopped.")
    a.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="seeds of every variant (default: 0 1)")
    a.add_argument("--variants", nargs="+", default=list(ABLATION_VARIANTS), choices=list(ABLATION_VARIANTS),
                   metavar="VARIANT", help=f"a subset of the rows: {', '.join(ABLATION_VARIANTS)}")
    a.add_argument("--out", default="docs/ablation", help="where the cells, the table and the plot go (default: docs/ablation)")
    a.add_argument("--workdir", default="runs/ablation", help="the train runs' directories (default: runs/ablation)")
    a.add_argument("--pretrain-steps", type=int, help="pre-training steps of every cell (default: the recipe's 1200); "
                   "with its own --out and --workdir")
    args = p.parse_args(argv)
    if args.command == "ablation":
        ablation(args.seeds, args.out, args.workdir, args.variants, args.pretrain_steps)
        return 0
    model = XVLM.from_checkpoint(args.checkpoint)
    vocab = args.vocab or xvlm.read_file(args.checkpoint)[0].get("extra", {}).get("settings", {}).get("vocab")
    if vocab is None:
        p.error(f"{args.checkpoint} names no vocabulary: pass --vocab")
    sheet = draw_prediction(model, args.image, args.text, data.Tokenizer(vocab), args.size)
    sheet.save(args.out)
    print(f"wrote {args.out}: box {tuple(round(v, 1) for v in ground(model, args.image, args.text, data.Tokenizer(vocab)))}"
          " (x, y, w, h in pixels)")
    return 0


if __name__ == "__main__":
    sys.exit(data.run_cli(main))
