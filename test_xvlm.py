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


# ---- tasks.py ----

import itertools

import tasks


def task_texts(n, length=8, seed=0):
    """n texts "[CLS] w.. [SEP] [PAD].." of random lengths in [4, length], right-padded."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 2000, (n, length), generator=g)
    lengths = torch.randint(4, length + 1, (n,), generator=g)
    mask = torch.arange(length)[None] < lengths[:, None]
    ids[:, 0] = 101
    ids[torch.arange(n), lengths - 1] = 102
    return ids.masked_fill(~mask, 0), mask


def task_images(n, res=64, seed=0):
    """Noise over a distinct colour per image, so that a tiny random model tells them apart from the start."""
    g = torch.Generator().manual_seed(seed)
    return 0.5 * torch.randn(n, 3, res, res, generator=g) + 2 * torch.randn(n, 3, 1, 1, generator=g)


def task_model(cls=XVLM, seed=0, **overrides):
    torch.manual_seed(seed)
    return cls(XVLMConfig.tiny(**overrides)).eval()


# -- metrics


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
    assert tasks.retrieval_chance(I, text_image) == pytest.approx(constant["r_mean"])
    inverted = tasks.recall_at_k(-truth, text_image, ks=(1, 5, 10, 11))  # every negative first
    assert inverted["txt_r10"] == 0 and inverted["txt_r11"] == 100  # 10 negative texts per image
    assert inverted["img_r5"] == 0 and inverted["img_r10"] == 100  # 5 negative images per text
    # The two directions can come from separately re-ranked matrices.
    mixed = tasks.recall_at_k(truth, text_image, scores_t2i=-truth.T)
    assert mixed["txt_r1"] == 100 and mixed["img_r1"] == 0
    with pytest.raises(ValueError, match="image 2 has no text"):
        tasks.recall_at_k(torch.zeros(3, 2), torch.tensor([0, 1]))


def test_tasks_vqa_accuracy_with_ten_annotators():
    annotators = [
        ["yes"] * 7 + ["no"] * 3,  # "no": 3 of 10 -> full credit
        ["2"] * 8 + ["3"] * 2,  # "3": 2 of 10 -> 2/3
        ["red"] * 9 + ["dark red"],  # "dark red": 1 -> 1/3
        ["cat"] * 10,  # "dog": none -> 0
    ]
    assert tasks.vqa_accuracy(["no", "3", "dark red", "dog"], annotators) == pytest.approx(100 * (1 + 2 / 3 + 1 / 3 + 0) / 4)
    assert tasks.vqa_accuracy(["yes", "2", "red", "cat"], annotators) == 100.0
    assert tasks.vqa_chance(annotators) == pytest.approx(100 * 1 / 4)  # "cat" (10 votes) answers everything
    with pytest.raises(ValueError):
        tasks.vqa_accuracy(["yes"], annotators)


def test_tasks_box_iou_and_grounding_accuracy_at_the_boundary():
    whole = torch.tensor([[0.5, 0.5, 1.0, 1.0]])
    left_half = torch.tensor([[0.25, 0.5, 0.5, 1.0]])  # IoU exactly 1/2, in binary fractions
    just_under = torch.tensor([[0.25, 0.5, 0.5, 0.998]])
    assert tasks.box_iou(whole, left_half).item() == 0.5
    assert tasks.grounding_accuracy(left_half, whole) == 100.0  # >= 0.5 counts
    assert tasks.grounding_accuracy(just_under, whole) == 0.0
    assert tasks.grounding_accuracy(torch.cat([left_half, just_under]), torch.cat([whole, whole])) == 50.0
    # Nested boxes: the hull is the union, so IoU equals xvlm's GIoU.
    torch.manual_seed(0)
    outer = torch.cat([torch.rand(20, 2) * 0.2 + 0.4, torch.rand(20, 2) * 0.3 + 0.5], 1)
    inner = torch.cat([outer[:, :2], outer[:, 2:] * torch.rand(20, 2)], 1)
    assert_close(tasks.box_iou(outer, inner), xvlm.giou(outer, inner))
    assert_close(tasks.box_iou(inner, outer), (inner[:, 2] * inner[:, 3]) / (outer[:, 2] * outer[:, 3]))
    assert tasks.box_iou(torch.tensor([[0.2, 0.2, 0.1, 0.1]]), torch.tensor([[0.8, 0.8, 0.1, 0.1]])).item() == 0
    assert tasks.box_iou(torch.zeros(1, 4), torch.zeros(1, 4)).item() == 0  # degenerate, no NaN


def test_tasks_accuracy_and_chance_baselines():
    assert tasks.accuracy(torch.tensor([0, 1, 1, 2]), torch.tensor([0, 1, 2, 2])) == 75.0
    assert tasks.majority_chance(torch.tensor([1, 1, 1, 0])) == 75.0
    boxes = torch.tensor([[0.5, 0.5, 0.4, 0.4]] * 3 + [[0.5, 0.5, 0.8, 0.8]])
    assert tasks.box_chance(boxes) == 75.0  # the mean box, side 0.5: IoU 0.64 with the small ones, 0.39 with the big
    proposals = torch.tensor([[[0.5, 0.5, 0.5, 0.5], [0.1, 0.1, 0.1, 0.1], [0.9, 0.9, 0.1, 0.1]]] * 2)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    targets = torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.1, 0.1, 0.1, 0.1]])
    assert tasks.proposal_chance(proposals, mask, targets) == pytest.approx(100 * (1 / 3 + 1 / 2) / 2)


# -- retrieval


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
    assert got == pytest.approx(tasks.recall_at_k(itm, text_image))
    assert not model.training  # evaluation leaves the mode as it found it
    model.train()
    tasks.evaluate_retrieval(model, [images], [(ids, mask)], text_image, k=3)
    assert model.training


def test_tasks_retrieval_loss_uses_image_ids_for_itc():
    model = task_model()
    ids, mask = task_texts(4)
    images = task_images(4)  # pairs 0 and 1: two augmented views of one image, two captions
    batch = {"images": images, "text_ids": ids, "text_mask": mask, "image_ids": torch.tensor([7, 7, 8, 9])}
    out = tasks.retrieval_loss(model, batch)
    assert set(out) == {"loss", "itc", "itm"} and torch.isfinite(out["loss"])
    assert_close(out["loss"], out["itc"] + out["itm"])
    image_embeds = model.encode_image(images)[0]
    feats = model.image_features(image_embeds), model.text_features(model.encode_text(ids, mask))
    shared = xvlm.itc_loss(*feats, model.temp, torch.tensor([7, 7, 8, 9]))
    assert_close(out["itc"], shared)
    assert abs(out["itc"].item() - xvlm.itc_loss(*feats, model.temp).item()) > 1e-4  # ids matter


# -- VQA


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
    states = model.fuse(model.encode_text(ids, mask), mask, model.encode_image(task_images(2))[0])
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
    batch = {"images": images, "question_ids": q_ids, "question_mask": q_mask, "answer_ids": answer_ids[pick],
             "answer_mask": answer_mask[pick], "answer_question": torch.tensor([0, 0, 1]),
             "answer_weights": torch.tensor([0.7, 0.3, 1.0])}
    out = tasks.vqa_loss(model, batch)
    states = model.fuse(model.encode_text(q_ids, q_mask), q_mask, model.encode_image(images)[0])

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
    batch = {"images": images, "question_ids": q_ids, "question_mask": q_mask, "answer_ids": answer_ids[target],
             "answer_mask": answer_mask[target], "answer_question": torch.tensor([0, 1]), "answer_weights": torch.ones(2)}
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(25):
        loss = tasks.vqa_loss(model, batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    assert torch.equal(tasks.rank_answers(model, images, q_ids, q_mask, answer_ids, answer_mask, k=2), target)
    # With k covering every candidate it is the argmax of the full likelihood, one candidate at a time.
    with torch.no_grad():
        states = model.fuse(model.encode_text(q_ids, q_mask), q_mask, model.encode_image(images)[0])
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


# -- NLVR2


def test_tasks_nlvr2_doubled_encoder_equals_each_layer_once_per_image():
    base = task_model()
    model = task_model(tasks.NLVR2Model, seed=1)
    assert tasks.load_pretrained(model, base.state_dict()) == ["assign_head", "cls_head", "fusion_second"]
    ids, mask = task_texts(3)
    text = base.encode_text(ids, mask)
    image1, image2 = base.encode_image(task_images(3, seed=1))[0], base.encode_image(task_images(3, seed=2))[0]

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


# -- grounding


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
    assert model.fusion.layers[1].cross_attn.keep_attention is False and model.fusion.layers[1].cross_attn.attention is None
    # layer 2 does not exist in the tiny model: the last layer. Compare with a plain backward
    # through the whole model and the retained attention gradient, as the authors compute it.
    attn = model.fusion.layers[1].cross_attn
    attn.keep_attention = True
    fused = model.fuse(model.encode_text(ids, mask), mask, model.encode_image(images)[0])
    model.itm_head(fused[:, 0])[:, 1].sum().backward()
    cam = (attn.attention.grad.clamp(min=0) * attn.attention.detach())[..., 1:].mean(1) * mask[..., None]
    attn.keep_attention, attn.attention = False, None
    assert_close(words, cam.view(3, -1, g, g), atol=1e-7, rtol=1e-4)
    assert not torch.equal(heat, tasks.gradcam(model, images, ids, mask, layer=0)[0])


def test_tasks_rank_proposals_hand_made_heat_map():
    heat = torch.zeros(1, 4, 4)
    heat[0, 1:3, 1:3] = 1.0  # a hot 2x2 block of patches in the middle
    proposals = torch.tensor([[
        [0.5, 0.5, 0.5, 0.5],  # exactly the block: 4 / sqrt(4) = 2
        [0.5, 0.5, 1.0, 1.0],  # the whole image: 4 / sqrt(16) = 1
        [0.375, 0.375, 0.25, 0.25],  # one hot patch: 1 / 1
        [0.125, 0.125, 0.25, 0.25],  # a cold corner: 0
        [0.3125, 0.375, 0.125, 0.25],  # half a hot patch: 0.5 / sqrt(0.5)
        [0.5, 0.5, 0.5, 0.5],  # the block again, but padding
    ]])
    mask = torch.tensor([[True] * 5 + [False]])
    best, scores = tasks.rank_proposals(heat, proposals, mask)
    assert best.tolist() == [0]
    assert_close(scores[0, :5], torch.tensor([2.0, 1.0, 1.0, 0.0, 0.5 / math.sqrt(0.5)]))
    assert scores[0, 5] == float("-inf")
    heat[0, 0, 0] = 10.0  # a hotter corner now wins
    assert tasks.rank_proposals(heat, proposals, mask)[0].tolist() == [3]


# -- loading and every task end to end


def test_tasks_load_pretrained_maps_an_xvlm_checkpoint_onto_each_task_model():
    base = task_model(seed=5)
    state = base.state_dict()
    vqa = task_model(tasks.VQAModel)
    assert tasks.load_pretrained(vqa, state) == ["decoder"]
    assert torch.equal(vqa.decoder.layers[1].mlp.fc1.weight, base.fusion.layers[1].mlp.fc1.weight)
    assert torch.equal(vqa.decoder.head.dense.weight, base.mlm_head.dense.weight)
    assert torch.equal(vqa.vision.pos_embed, base.vision.pos_embed)
    # A task's own checkpoint loads whole: nothing is re-initialised.
    with torch.no_grad():
        vqa.decoder.layers[0].mlp.fc1.weight.add_(1.0)
    again = task_model(tasks.VQAModel, seed=9)
    assert tasks.load_pretrained(again, vqa.state_dict()) == []
    assert torch.equal(again.decoder.layers[0].mlp.fc1.weight, vqa.decoder.layers[0].mlp.fc1.weight)
    assert tasks.load_pretrained(task_model(), state) == []
    nlvr = task_model(tasks.NLVR2Model)
    tasks.load_pretrained(nlvr, state)
    assert torch.equal(nlvr.fusion_second.layers[0].attn.qkv.weight, base.fusion.layers[0].attn.qkv.weight)
    # A shared tensor stored once (as .safetensors does) still counts as loaded.
    once = {k: v for k, v in nlvr.state_dict().items() if not k.startswith("fusion_second.") or ".kv." not in k}
    assert tasks.load_pretrained(task_model(tasks.NLVR2Model, seed=2), once) == []
    with pytest.raises(KeyError, match="not in XVLM"):
        tasks.load_pretrained(task_model(), vqa.state_dict())
    with pytest.raises(KeyError, match="lacks"):
        tasks.load_pretrained(vqa, {k: v for k, v in state.items() if not k.startswith("itm_head.")})
    with pytest.raises(KeyError, match="part of 'decoder'"):
        tasks.load_pretrained(vqa, state | {"decoder.head.bias": vqa.decoder.head.bias.detach()})


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
        return batch, lambda m: tasks.evaluate_grounding_weak(m, [ev])
    if name == "grounding":
        batch = {"images": images[:4], "text_ids": ids[:4], "text_mask": mask[:4],
                 "boxes": torch.tensor([[0.3, 0.3, 0.4, 0.4], [0.7, 0.6, 0.3, 0.5], [0.5, 0.5, 0.9, 0.9], [0.2, 0.8, 0.2, 0.2]])}
        return batch, lambda m: tasks.evaluate_grounding(m, [batch])
    if name == "vqa":
        images, q_ids, q_mask, answer_ids, answer_mask = vqa_setup()
        pick = torch.tensor([1, 0, 3])
        batch = {"images": images, "question_ids": q_ids, "question_mask": q_mask, "answer_ids": answer_ids[pick],
                 "answer_mask": answer_mask[pick], "answer_question": torch.tensor([0, 0, 1]),
                 "answer_weights": torch.tensor([0.7, 0.3, 1.0])}
        ev = {"images": images, "question_ids": q_ids, "question_mask": q_mask, "answers": [["b"] * 7 + ["a"] * 3, ["d"] * 10]}
        return batch, lambda m: tasks.evaluate_vqa(m, [ev], answer_ids, answer_mask, list("abcdef"), k=3)
    if name == "nlvr2":
        batch = {"images": images[:4], "images2": images[2:], "text_ids": ids[:4], "text_mask": mask[:4],
                 "labels": torch.tensor([0, 1, 1, 0])}
        return batch, lambda m: tasks.evaluate_nlvr2(m, [batch])
    batch = {"images": images, "text_ids": ids, "text_mask": mask}  # nlvr2_pretrain: image-text pairs
    return batch, lambda m: tasks.evaluate_text_assignment(m, [batch])


@pytest.mark.parametrize("name", list(tasks.TASKS))
def test_tasks_each_task_trains_and_evaluates(name):
    task = tasks.TASKS[name]
    torch.manual_seed(0)
    model = task.build(XVLMConfig.tiny()).train()
    batch, evaluate = task_case(name)
    # The loss reaches exactly the parameters outside the task's `unused` prefixes.
    out = task.loss(model, batch)
    assert "loss" in out and all(v.dim() == 0 and torch.isfinite(v) for v in out.values())
    out["loss"].backward()
    unreached = {n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()}
    assert unreached == {n for n, _ in model.named_parameters() if n.startswith(task.unused)}
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
    assert_close(tasks.TaskLoss(model, task.loss)(batch)["loss"], direct)  # the module DDP wraps
    metrics = evaluate(model)
    assert metrics and all(0.0 <= v <= 100.0 for v in metrics.values()), metrics
    assert model.training


def test_tasks_models_build_and_run_at_a_higher_resolution():
    # Fine-tuning raises the resolution (paper: 256 -> 384); here 64 -> 96, a 12x12 patch grid.
    cfg = XVLMConfig.tiny(image_res=96)
    for name in ("retrieval", "vqa", "nlvr2"):
        torch.manual_seed(0)
        model = tasks.TASKS[name].build(cfg)
        batch, _ = task_case(name)
        batch = {k: F.interpolate(v, size=96) if k.startswith("images") else v for k, v in batch.items()}
        assert torch.isfinite(tasks.TASKS[name].loss(model, batch)["loss"])
    heat, _ = tasks.gradcam(model, batch["images"][:2], batch["text_ids"][:2], batch["text_mask"][:2])
    assert heat.shape == (2, 12, 12)
