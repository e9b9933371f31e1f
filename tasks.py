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
with `chance`, what a random or majority guess scores on the same split. `TASKS` is the table
`train.py --task NAME` runs. On raw images (PIL or a path):

    model, tok = xvlm.XVLM.from_checkpoint("runs/grounding/checkpoint.pt"), data.Tokenizer("synth/vocab.txt")
    tasks.score(model, "synth/images/val/00000.png", ["a red circle", "two squares"], tok)  # p_match each
    tasks.ground(model, "synth/images/val/00000.png", "yellow circle", tok)   # (x, y, w, h) in pixels
    tasks.answer(vqa_model, image, "what color is the circle?", ["red", "blue"], tok)

    python tasks.py predict --checkpoint runs/grounding/checkpoint.pt --image synth/images/val/00000.png \
        --text "yellow circle" --out predict.png      # box + per-word Grad-CAM (paper Figures 3-5)
"""

import argparse
import sys
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw

import data
import xvlm
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


# -----------------------------------------------------------------------------
# Image-text retrieval (paper 4.3): fine-tune with ITC + ITM, rank by s(I, T), re-rank the top k by ITM


def retrieval_loss(model, batch):
    """L_cl + L_match on image-text pairs (appendix B). Also the weakly supervised grounding loss.

    batch: images (B, 3, H, W), text_ids (B, L), text_mask (B, L) bool, image_ids (B,) int64.
    Pair i is (images[i], texts[i]). Pairs sharing an image id are all positives of each other:
    the ITC target is uniform over them, and ITM never draws one of them as a hard negative.
    Returns {"loss", "itc", "itm"}.
    """
    with torch.no_grad():
        model.temp.clamp_(0.001, 0.5)
    text_mask, ids = batch["text_mask"].bool(), batch["image_ids"]
    image_embeds = model.encode_image(batch["images"])[0]
    text_embeds = model.encode_text(batch["text_ids"], text_mask)
    image_feat, text_feat = model.image_features(image_embeds), model.text_features(text_embeds)
    itc = itc_loss(image_feat, text_feat, model.temp, ids)
    B = image_embeds.shape[0]
    full = torch.ones(image_embeds.shape[:2], dtype=torch.bool, device=image_embeds.device)
    itm = model.itm_loss(image_embeds, full, torch.arange(B, device=ids.device), text_embeds, text_mask,
                         image_feat, text_feat, ids)
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
    image_embeds = torch.cat([model.encode_image(images.to(device))[0] for images in image_batches])
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
    return {**metrics, "chance": retrieval_chance(sims.shape[0], text_image.cpu(), ks)}


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
        if "decoder" in names:
            self.init_decoder_from_fusion()


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
    """VQA accuracy of the ranked answers, overall and per answer type ("yes/no", "number", "other"),
    and `chance`, that of always giving the split's most common answer. batches yield
    data.VQADataset's {images, text_ids, text_mask (the questions), answers, counts (each distinct
    answer and how many annotators gave it)}; answer_list[c] is the string of candidate c."""
    device = model_device(model)
    answer_ids, answer_mask = answer_ids.to(device), answer_mask.to(device)
    predicted, truth = [], []
    for batch in batches:
        b = to_device(batch, device)
        best = rank_answers(model, b["images"], b["text_ids"], b["text_mask"], answer_ids, answer_mask, k)
        predicted += [answer_list[c] for c in best.tolist()]
        truth += [[a for a, n in zip(answers, counts) for _ in range(n)] for answers, counts in zip(b["answers"], b["counts"])]
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
        if "fusion_second" in names:
            self.init_second_blocks()

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
    image_embeds = model.encode_image(torch.cat([batch["images"], batch["images2"]]))[0]  # one ViT pass
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
    # + 1e-5 as xvlm.sample_hard_negatives: an underflowed negative can still be drawn
    weights = (F.softmax(sim.float(), dim=1) + 1e-5).masked_fill(same, 0.0)
    neg = torch.multinomial(weights, 2, generator=generator)  # (B, 2), without replacement
    labels = torch.randint(3, (B,), device=sim.device, generator=generator)
    own = torch.arange(B, device=sim.device)
    first = torch.where(labels == 0, own, neg[:, 0])
    second = torch.where(labels == 0, neg[:, 0], torch.where(labels == 1, own, neg[:, 1]))
    return first, second, labels


def text_assignment_logits(model, batch, generator=None):
    """batch: images (B, 3, H, W), text_ids (B, L), text_mask (B, L), optional image_ids (B,): image-text
    pairs, as retrieval's. Each image is encoded once; the pairs index into the batch."""
    image_embeds = model.encode_image(batch["images"])[0]
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
    fused = fuse_image_text(model, images, text_ids, text_mask.bool())
    return model.bbox_head(fused[:, 0]).float().sigmoid()


def grounding_loss(model, batch):
    """Supervised grounding: L_bbox (eq. 3), L1 + (1 - GIoU), on the referred box.
    batch: images (B, 3, H, W), text_ids (B, L), text_mask (B, L), boxes (B, 4) normalised cxcywh.
    Returns {"loss", "l1", "giou"}."""
    pred, target = predict_boxes(model, batch["images"], batch["text_ids"], batch["text_mask"]), batch["boxes"].float()
    l1 = (pred - target).abs().sum(-1).mean()
    g = (1.0 - giou(pred, target)).mean()
    return {"loss": l1 + g, "l1": l1, "giou": g}


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
    the map has a gradient: its words' maps are zero (draw_prediction, which shows them, reads the
    last layer but one; ranking proposals on the tiny model's last layer scored 49% against 26%).
    Returns heat (B, grid, grid), the mean over each text's real tokens, and per-word maps
    (B, L, grid, grid), zero at padding. Both are non-negative.
    """
    layer = min(layer, len(model.fusion.layers) - 1)
    attn = model.fusion.layers[layer].cross_attn
    text_mask = text_mask.bool()
    B, L = text_ids.shape
    grid = model.cfg.grid
    with evaluating(model):
        with torch.no_grad():
            image_embeds = model.encode_image(images)[0]
            text_embeds = model.encode_text(text_ids, text_mask)
        attn.keep_attention = True
        try:
            with torch.enable_grad():
                # A leaf that needs grad: the map gets a gradient even with frozen weights, and
                # backward stops at the cross-modal encoder.
                image_embeds.requires_grad_()
                fused = model.fuse(text_embeds, text_mask, image_embeds)
                score = model.itm_head(fused[:, 0])[:, 1].sum()  # samples are independent: one backward
                grad, = torch.autograd.grad(score, attn.attention)
            attention = attn.attention.detach()
        finally:
            attn.keep_attention, attn.attention = False, None
    cam = (grad.clamp(min=0) * attention)[..., 1:].mean(1)  # (B, L, N): heads averaged, image [CLS] dropped
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
        _, regions, _ = model.encode_image(images, proposals[keep].float(), box_image)
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
    encoder). Returns the names of the modules initialised here.
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
    xvlm.load_checkpoint(model, state, allow_missing=covered + [m + "." for m in fresh])
    if fresh:
        model.init_new_modules(fresh)
    return fresh


# -----------------------------------------------------------------------------
# What `train.py --task NAME` runs: each task's model, loss, data and evaluation


@dataclass
class Files:
    """Where a run's data is; train.py fills it from the flags or the synthetic world."""

    train: list  # training records
    val: list  # evaluation records
    image_root: str
    vocab: str
    answer_list: str = None  # VQA's candidate answers
    proposals: str = None  # weakly supervised grounding's proposal boxes
    grounding_val: list = None  # pre-training's zero-shot grounding records


class Counted:
    """Iterate a loader's batches, counting the unreadable images it skipped (reported, not hidden)."""

    def __init__(self, loader):
        self.loader, self.skipped = loader, 0

    def __iter__(self):
        for batch in self.loader:
            self.skipped += batch.pop("skipped", 0)
            yield batch


def eval_batches(dataset, batch_size=64):
    return Counted(torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=dataset.collate))


def with_skipped(metrics, counted):
    return {**metrics, "skipped_images": counted.skipped} if counted.skipped else metrics


def retrieval_eval_data(files, tokenizer, cfg):
    """The retrieval split's images (batches), texts (tokenised batches) and the image of each text,
    leaving out the texts of images that turn out unreadable (counted in `skipped`)."""
    ds = data.RetrievalEvalDataset(files.val, files.image_root, tokenizer, cfg.max_tokens, cfg.image_res)
    images, kept = [], []
    batches = eval_batches(ds)
    for b in batches:
        images.append(b["images"])
        kept += b["index"].tolist()
    row = {image: r for r, image in enumerate(kept)}
    texts = [t for t in range(len(ds.texts)) if ds.txt2img[t] in row]
    text_batches = [tokenizer.encode_batch([ds.texts[t] for t in texts[i:i + 256]], cfg.max_tokens)
                    for i in range(0, len(texts), 256)]
    return images, text_batches, torch.tensor([row[ds.txt2img[t]] for t in texts]), batches


def run_retrieval_eval(model, files, tokenizer, cfg, args):
    images, texts, text_image, counted = retrieval_eval_data(files, tokenizer, cfg)
    return with_skipped(evaluate_retrieval(model, images, texts, text_image, k=args.rerank_k), counted)


def run_grounding_eval(model, files, tokenizer, cfg, args):
    batches = eval_batches(data.GroundingDataset(files.val, files.image_root, tokenizer, cfg.max_tokens, cfg.image_res))
    return with_skipped(evaluate_grounding(model, batches), batches)


def run_pretrain_eval(model, files, tokenizer, cfg, args):
    """Zero-shot, straight after pre-training, each next to its chance level: retrieval by ITC + ITM
    re-ranking; grounding by the pre-training bbox head (eq. 2), and, given proposals, by ranking
    the proposal boxes as visual concepts against the text (region_scores)."""
    out = {}
    if files.val:
        out["retrieval"] = run_retrieval_eval(model, files, tokenizer, cfg, args)
    if files.grounding_val:  # the images are read once for both
        counted = eval_batches(data.GroundingDataset(files.grounding_val, files.image_root, tokenizer, cfg.max_tokens,
                                                     cfg.image_res, proposals=files.proposals))
        batches = list(counted)
        out["grounding"] = with_skipped(evaluate_grounding(model, batches), counted)
        if files.proposals:
            out["grounding_regions"] = with_skipped(evaluate_grounding_regions(model, batches), counted)
    return out


def run_vqa_eval(model, files, tokenizer, cfg, args):
    answer_list = data.read_answer_list(files.answer_list)
    answer_ids, answer_mask = tokenizer.encode_batch(answer_list, cfg.max_tokens)
    batches = eval_batches(data.VQADataset(files.val, files.image_root, tokenizer, cfg.max_tokens, cfg.image_res))
    return with_skipped(evaluate_vqa(model, batches, answer_ids, answer_mask, answer_list, k=args.rerank_k), batches)


def run_nlvr2_eval(model, files, tokenizer, cfg, args):
    batches = eval_batches(data.NLVR2Dataset(files.val, files.image_root, tokenizer, cfg.max_tokens, cfg.image_res))
    return with_skipped(evaluate_nlvr2(model, batches), batches)


def run_assignment_eval(model, files, tokenizer, cfg, args):
    """The pre-step's accuracy on the retrieval split's images, each with its first caption."""
    ds = data.RetrievalEvalDataset(files.val, files.image_root, tokenizer, cfg.max_tokens, cfg.image_res)
    batches = eval_batches(ds)

    def pairs():
        for b in batches:
            ids, mask = tokenizer.encode_batch([ds.texts[ds.img2txt[i][0]] for i in b["index"].tolist()], cfg.max_tokens)
            yield {"images": b["images"], "text_ids": ids, "text_mask": mask}

    return with_skipped(evaluate_text_assignment(model, pairs()), batches)


def run_grounding_weak_eval(model, files, tokenizer, cfg, args):
    batches = eval_batches(data.GroundingDataset(files.val, files.image_root, tokenizer, cfg.max_tokens, cfg.image_res,
                                                 proposals=files.proposals))
    return with_skipped(evaluate_grounding_weak(model, batches), batches)


def pretrain_loss(model, batch):
    return model(batch)  # XVLM.forward is the pre-training loss, eq. (9)


def retrieval_set(files, tokenizer, cfg, args):
    return data.RetrievalTrainDataset(files.train, files.image_root, tokenizer, cfg.max_tokens, cfg.image_res,
                                      train=True, seed=args.seed, crop_scale=args.crop_scale or (0.5, 1.0))


def vqa_set(files, tokenizer, cfg, args):
    return data.VQADataset(files.train, files.image_root, tokenizer, cfg.max_tokens, cfg.image_res,
                           train=True, seed=args.seed, crop_scale=args.crop_scale or (0.5, 1.0))


def nlvr2_set(files, tokenizer, cfg, args):
    return data.NLVR2Dataset(files.train, files.image_root, tokenizer, cfg.max_tokens, cfg.image_res,
                             train=True, seed=args.seed, crop_scale=args.crop_scale or (0.5, 1.0))


def grounding_set(files, tokenizer, cfg, args):
    return data.GroundingDataset(files.train, files.image_root, tokenizer, cfg.max_tokens, cfg.image_res)


def train_loader(task, files, tokenizer, cfg, batch_size, args, rank=0, world_size=1):
    """The task's training batches, epoch after epoch, resumable (state_dict / load_state_dict)."""
    if task.train_set is None:  # pre-training: half image-text, half box-annotated images
        return data.pretrain_loader(files.train, files.image_root, tokenizer, batch_size, cfg.image_res, cfg.max_tokens,
                                    args.max_regions, args.workers, args.seed, rank, world_size,
                                    crop_scale=args.crop_scale or (0.2, 1.0))
    return data.TaskTrainLoader(task.train_set(files, tokenizer, cfg, args), batch_size, args.workers, args.seed,
                                rank, world_size)


@dataclass(frozen=True)
class Task:
    """One task as `train.py --task NAME` runs it."""

    build: Callable  # build(cfg) -> model; load_pretrained(model, checkpoint) puts an X-VLM into it
    loss: Callable  # loss(model, batch) -> {"loss": total, name: term, ...}, 0-dim tensors
    unused: tuple  # parameter prefixes the loss never reaches: train.py freezes them (DDP needs every gradient)
    train_set: Callable  # train_set(files, tokenizer, cfg, args) -> a data.py dataset; None: pre-training
    evaluate: Callable  # evaluate(model, files, tokenizer, cfg, args) -> metrics, each with "chance"
    synth: dict  # the synthetic world's files (data.SYNTH_FILES keys): "train", "val", maybe more
    tiny: dict  # defaults for the tiny preset on the synthetic world: steps, batch_size, lr, rerank_k


class TaskLoss(nn.Module):
    """A task model and its loss as one module: `TaskLoss(model, task.loss)(batch)`. DDP syncs
    gradients correctly only for work done inside its forward, and the losses call the model's
    methods, so train.py wraps this in DDP (and saves `.model`, the unwrapped task model)."""

    def __init__(self, model, loss):
        super().__init__()
        self.model, self.loss = model, loss

    def forward(self, batch):
        return self.loss(self.model, batch)


_ITC_ITM = ("vision_proj", "text_proj", "temp", "itm_head")  # the contrastive and matching heads

TASKS = {
    "pretrain": Task(XVLM, pretrain_loss, (), None, run_pretrain_eval,
                     {"train": ["pretrain_captions", "pretrain_regions"], "val": ["retrieval_val"],
                      "grounding_val": ["grounding_val"],
                      "proposals": "grounding_proposals"},
                     dict(steps=1200, batch_size=16, lr=5e-4, rerank_k=16)),
    "retrieval": Task(XVLM, retrieval_loss, ("bbox_head", "mlm_head"), retrieval_set, run_retrieval_eval,
                      {"train": ["retrieval_train"], "val": ["retrieval_val"]},
                      dict(steps=300, batch_size=32, lr=5e-4, rerank_k=16)),
    "vqa": Task(VQAModel, vqa_loss, _ITC_ITM + ("bbox_head", "mlm_head"), vqa_set, run_vqa_eval,
                {"train": ["vqa_train"], "val": ["vqa_val"], "answer_list": "answer_list"},
                dict(steps=1800, batch_size=32, lr=5e-4, rerank_k=8)),
    "nlvr2_pretrain": Task(NLVR2Model, text_assignment_loss, _ITC_ITM + ("bbox_head", "mlm_head", "cls_head"),
                           retrieval_set, run_assignment_eval, {"train": ["retrieval_train"], "val": ["retrieval_val"]},
                           dict(steps=300, batch_size=32, lr=5e-4, rerank_k=16)),
    "nlvr2": Task(NLVR2Model, nlvr2_loss, _ITC_ITM + ("bbox_head", "mlm_head", "assign_head"), nlvr2_set,
                  run_nlvr2_eval, {"train": ["nlvr2_train"], "val": ["nlvr2_val"]},
                  dict(steps=1000, batch_size=32, lr=5e-4, rerank_k=16)),
    "grounding": Task(XVLM, grounding_loss, _ITC_ITM + ("mlm_head",), grounding_set, run_grounding_eval,
                      {"train": ["grounding_train"], "val": ["grounding_val"]},
                      dict(steps=2000, batch_size=32, lr=5e-4, rerank_k=16)),
    "grounding_weak": Task(XVLM, retrieval_loss, ("bbox_head", "mlm_head"), grounding_set, run_grounding_weak_eval,
                           {"train": ["grounding_train"], "val": ["grounding_val"], "proposals": "grounding_proposals"},
                           dict(steps=600, batch_size=32, lr=5e-4, rerank_k=16)),
}


# -----------------------------------------------------------------------------
# Inference on raw images: five lines from Python, and `python tasks.py predict`


def image_tensor(image, image_res):
    """A PIL image or a path -> ((1, 3, res, res) normalised tensor, the RGB PIL image)."""
    img = data.load_image(image) if not isinstance(image, Image.Image) else image.convert("RGB")
    return data.to_tensor(img.resize((image_res, image_res), Image.BICUBIC))[None], img


@torch.no_grad()
def score(model, image, texts, tokenizer):
    """p_match(I, T) of the ITM head for each text (n,): how well each text describes the image."""
    with evaluating(model):
        x, _ = image_tensor(image, model.cfg.image_res)
        ids, mask = tokenizer.encode_batch([data.clean_caption(t) for t in texts], model.cfg.max_tokens)
        device = model_device(model)
        fused = fuse_image_text(model, x.to(device).expand(len(texts), -1, -1, -1), ids.to(device), mask.to(device))
        return model.itm_head(fused[:, 0]).float().softmax(-1)[:, 1].cpu()


@torch.no_grad()
def ground(model, image, text, tokenizer):
    """The box the text refers to, (x, y, w, h) in pixels of the image: the bbox head (eq. 2)."""
    with evaluating(model):
        x, img = image_tensor(image, model.cfg.image_res)
        ids, mask = tokenizer.encode_batch([data.clean_caption(text)], model.cfg.max_tokens)
        device = model_device(model)
        cx, cy, w, h = predict_boxes(model, x.to(device), ids.to(device), mask.to(device))[0].tolist()
        W, H = img.size
        return ((cx - w / 2) * W, (cy - h / 2) * H, w * W, h * H)


@torch.no_grad()
def answer(model, image, question, answers, tokenizer, k=128):
    """The candidate in `answers` that a VQAModel ranks first for the question."""
    x, _ = image_tensor(image, model.cfg.image_res)
    q_ids, q_mask = tokenizer.encode_batch([data.clean_caption(question)], model.cfg.max_tokens)
    a_ids, a_mask = tokenizer.encode_batch(list(answers), model.cfg.max_tokens)
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
    args = p.parse_args(argv)
    model = XVLM.from_checkpoint(args.checkpoint)
    vocab = args.vocab or xvlm.read_file(args.checkpoint)[0].get("extra", {}).get("vocab")
    if vocab is None:
        p.error(f"{args.checkpoint} names no vocabulary: pass --vocab")
    sheet = draw_prediction(model, args.image, args.text, data.Tokenizer(vocab), args.size)
    sheet.save(args.out)
    print(f"wrote {args.out}: box {tuple(round(v, 1) for v in ground(model, args.image, args.text, data.Tokenizer(vocab)))}"
          " (x, y, w, h in pixels)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
