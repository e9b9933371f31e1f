"""
X-VLM: multi-grained vision language pre-training (Zeng et al.), in one file.

Read top to bottom: the config, one attention module, the image encoder with mixed attention
(paper 3.2, eq. 1), the BERT text and cross-modal ("fusion") encoders, the heads, the four
pre-training losses (paper 3.3, eqs. 2-9) as small functions, the model that ties them together, and
weight loading: DeiT / timm ViT and Hugging Face BERT through declarative key tables, and our checkpoints.

    import torch, xvlm
    cfg = xvlm.XVLMConfig.tiny()
    model = xvlm.XVLM(cfg)
    batch = {
        "images": torch.randn(2, 3, cfg.image_res, cfg.image_res),
        "text_ids": torch.randint(1000, 2000, (3, 8)), "text_mask": torch.ones(3, 8, dtype=torch.bool),
        "text_image": torch.tensor([0, 1, 1]),   # which image each text belongs to
        "text_box": torch.tensor([-1, -1, 0]),   # text 2 describes box 0 (a region of image 1)
        "boxes": torch.tensor([[0.3, 0.3, 0.4, 0.4]]), "box_image": torch.tensor([1]),
    }
    losses = model(batch)                     # {"loss", "itc", "itm", "mlm", "bbox"}
    losses["loss"].backward()

`python -c "import xvlm; xvlm.XVLM(xvlm.XVLMConfig())"` builds X-VLM-base and prints its size.
"""

import math
import os
import pickle
import random
import re
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint


# -----------------------------------------------------------------------------
# Config


@dataclass
class XVLMConfig:
    # Image encoder: ViT-B/16 as DeiT-base (paper 4.2), initialised from ImageNet-1k weights.
    image_res: int = 256  # pre-training resolution; fine-tuning raises it to 384
    patch_size: int = 16
    vision_width: int = 768
    vision_layers: int = 12
    vision_heads: int = 12
    local_layers: int = 4  # L2: the last layers are mixed (full + local copies); the first L1 = 8 full
    vision_mlp_ratio: float = 4.0
    drop_path: float = 0.1  # stochastic depth of DeiT-base, linearly increasing over the layers
    # Text and cross-modal encoders: BERT-base layers 0-5 and 6-11 (paper 4.2).
    vocab_size: int = 30522  # bert-base-uncased
    text_width: int = 768
    text_heads: int = 12
    text_layers: int = 6
    fusion_layers: int = 6
    text_mlp_dim: int = 3072
    max_positions: int = 512  # BERT's position table, so public weights load as they are
    type_vocab_size: int = 2  # BERT adds the token-type-0 embedding to every token; kept for parity
    max_tokens: int = 25  # paper 4.2
    dropout: float = 0.1  # BERT's hidden and attention-probability dropout
    # Activation checkpointing: keep only each ViT block's and BERT layer's input, and recompute the
    # rest in backward. Same losses and gradients; ~1/3 more compute for a fraction of the memory.
    grad_checkpointing: bool = False
    # Heads and losses.
    embed_dim: int = 256  # g_v, g_w project [CLS] to 256-d (paper 3.3)
    temp: float = 0.07  # learnable; clamped to [0.001, 0.5]
    mask_prob: float = 0.25  # paper 3.3: 25%, replaced 80/10/10
    max_masks: int = 8  # as the authors' config: at most 8 masked tokens per text
    bbox_whole_image: bool = False  # put whole-image texts, target (0.5, 0.5, 1, 1), in the bbox loss
    # Texts of equal words are positives of each other in itc and never itm negatives. Object
    # labels repeat across images ("person", "red circle"): as one-hot targets they are false
    # negatives, and the hardest ITM "negatives" (so many labelled wrong that ITM cannot learn).
    equal_texts_positive: bool = True
    # Weights start as BERT's and timm's: normal, std 0.02, which suits width 768. A narrow model
    # trained from scratch learns much faster with ~1/sqrt(width) (tiny uses 0.1).
    init_std: float = 0.02
    # Special token ids: BERT's. The synthetic world's vocab.txt keeps them at the same ids.
    pad_token_id: int = 0
    cls_token_id: int = 101
    sep_token_id: int = 102
    mask_token_id: int = 103

    def __post_init__(self):
        def need(ok, msg):
            if not ok:
                raise ValueError(f"XVLMConfig: {msg}")
        need(self.image_res % self.patch_size == 0, f"image_res={self.image_res} is not a multiple of patch_size={self.patch_size}")
        need(0 <= self.local_layers <= self.vision_layers, f"local_layers={self.local_layers} must lie in [0, vision_layers={self.vision_layers}]")
        need(self.vision_width % self.vision_heads == 0, f"vision_width={self.vision_width} is not divisible by vision_heads={self.vision_heads}")
        need(self.text_width % self.text_heads == 0, f"text_width={self.text_width} is not divisible by text_heads={self.text_heads}")
        need(self.max_tokens <= self.max_positions, f"max_tokens={self.max_tokens} exceeds max_positions={self.max_positions}")
        need(0.0 < self.mask_prob < 1.0 and self.max_masks >= 1, "mask_prob must lie in (0, 1) and max_masks be >= 1")

    @property
    def grid(self):
        return self.image_res // self.patch_size

    @classmethod
    def tiny(cls, **overrides):
        """A CPU-sized X-VLM for tests and the synthetic demo: 64px images on an 8x8 patch grid."""
        small = dict(image_res=64, patch_size=8, vision_width=96, vision_layers=4, vision_heads=4,
                     local_layers=2, drop_path=0.0, text_width=96, text_heads=4, text_layers=2,
                     fusion_layers=2, text_mlp_dim=384, max_positions=64, dropout=0.0, embed_dim=64, init_std=0.1)
        small.update(overrides)
        return cls(**small)

    def to_dict(self):
        return {f.name: getattr(self, f.name) for f in fields(self)}


# -----------------------------------------------------------------------------
# Building blocks


class Attention(nn.Module):
    """Multi-head attention for ViT self-attention, text self-attention and cross-attention.

    Self-attention (kv_dim=None) projects q, k, v with one fused matrix, as timm's ViT does.
    Cross-attention projects queries from x and keys/values (fused) from `context`, which may be
    wider or narrower than x. `mask` is boolean, True = may attend, broadcastable to
    (B, heads, Lq, Lk). With `context_index` (B,), row b attends to context[context_index[b]]:
    keys and values are projected once per distinct context, not once per query row, which is
    what makes pairing many texts with few images cheap. `context_kv`, when given, is self.kv(context)
    computed beforehand, so that several calls on the same context share one projection (`context` is
    then not read). Set `keep_attention = True` to compute softmax(QK^T/sqrt(d) + M) V
    literally and keep the probabilities in `self.attention` (with their gradient), for Grad-CAM.
    """

    def __init__(self, dim, heads, kv_dim=None, dropout=0.0):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        if kv_dim is None:
            self.qkv = nn.Linear(dim, 3 * dim)
        else:
            self.q = nn.Linear(dim, dim)
            self.kv = nn.Linear(kv_dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.keep_attention = False
        self.attention = None

    def forward(self, x, mask=None, context=None, context_index=None, context_kv=None):
        D = x.shape[-1]
        if context is None and context_kv is None:
            q, k, v = self.qkv(x).split(D, dim=-1)
        else:
            kv = self.kv(context) if context_kv is None else context_kv
            q, (k, v) = self.q(x), (kv if context_index is None else kv[context_index]).split(D, dim=-1)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))  # (B, heads, L, hd)
        p = self.dropout if self.training else 0.0
        if self.keep_attention:
            scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, heads, Lq, Lk)
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            self.attention = scores.softmax(-1)
            if self.attention.requires_grad:
                self.attention.retain_grad()
            y = F.dropout(self.attention, p, self.training) @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        return self.proj(y.transpose(1, 2).flatten(2))  # (B, Lq, D)


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU, as both DeiT and BERT


def drop_path(x, p, training):
    """Stochastic depth: drop the whole residual branch of a sample with probability p."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty(x.shape[0], *([1] * (x.dim() - 1))).bernoulli_(1.0 - p)
    return x * keep / (1.0 - p)


def run_layer(layer, checkpointing, *args):
    """layer(*args); with `checkpointing`, while training with gradients, its activations are
    recomputed in backward instead of kept (the RNG is replayed, so dropout draws the same masks)."""
    if checkpointing and layer.training and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(layer, *args, use_reentrant=False)
    return layer(*args)


def key_mask(mask):
    """(B, Lk) bool, True = real token -> (B, 1, 1, Lk), broadcast over heads and queries."""
    return None if mask is None else mask[:, None, None, :]


# -----------------------------------------------------------------------------
# Image encoder with mixed attention (paper 3.2)


def patch_mask(boxes, grid):
    """Which patches of a grid x grid ViT each box overlaps: bool (R, grid*grid), raster order.

    boxes: (R, 4) normalised (cx, cy, w, h). In patch units, the box spans columns
    x0 = min(floor(x), n-1) .. x1 = max(x0+1, min(ceil(x+w), n)) (exclusive), rows likewise, so a
    box always covers at least one patch, even when it lies inside one or on the border.
    """
    eps = 1e-4  # an edge exactly on a patch border must not pick up its neighbour through rounding
    n = grid
    lo = (boxes[:, :2] - boxes[:, 2:] / 2) * n  # (R, 2) left and top edge in patch units
    hi = (boxes[:, :2] + boxes[:, 2:] / 2) * n
    first = torch.floor(lo + eps).clamp(0, n - 1)
    last = torch.maximum(first + 1, torch.ceil(hi - eps).clamp(max=n))
    cells = torch.arange(n, device=boxes.device, dtype=boxes.dtype)
    inside = (cells >= first[:, :, None]) & (cells < last[:, :, None])  # (R, 2, n): columns, rows
    return (inside[:, 1, :, None] & inside[:, 0, None, :]).flatten(1)  # (R, n*n)


def mixed_attention_mask(patch_mask):
    """The literal eq. (1) mask of each region copy: bool (R, 1+N, 1+N), True = may attend.

    Region j's positions {[CLS], p_1..p_M} attend only among themselves. Eq. (1) leaves the rows of
    out-of-box positions fully masked, which would make NaNs in softmax that then leak through
    V; they attend to themselves instead. Their outputs are never used.
    """
    keep = F.pad(patch_mask, (1, 0), value=True)  # (R, 1+N): [CLS] + in-box patches
    mask = keep[:, :, None] & keep[:, None, :]
    return mask | torch.eye(keep.shape[1], dtype=torch.bool, device=keep.device)


def gather_regions(x, patch_mask, box_index):
    """The fast path's input: each region's [CLS] + in-box patches, padded and key-masked.

    x: (B, 1+N, D) image tokens; patch_mask: (R, N); box_index: (R,) image of each region.
    Returns tokens (R, 1+M, D) with M the largest box's patch count, and mask (R, 1+M), True for
    real tokens. Patches keep raster order, and their position embeddings travel with them.
    """
    counts = patch_mask.sum(1)
    M = int(counts.max())  # one host sync: the packed length depends on the boxes
    # Stable sort puts each region's in-box patch indices first, in raster order.
    order = torch.sort((~patch_mask).to(torch.uint8), dim=1, stable=True).indices[:, :M]  # (R, M)
    real = torch.arange(M, device=x.device) < counts[:, None]
    index = F.pad(order + 1, (1, 0), value=0)  # token positions in the (1+N) sequence, [CLS] first
    mask = F.pad(real, (1, 0), value=True)
    tokens = x[box_index[:, None], index]  # (R, 1+M, D)
    return tokens, mask


def sincos_pos_embed(dim, grid):
    """(1, 1+grid*grid, dim) 2-D sin-cos position embeddings: a quarter of the channels each for
    sin and cos of the row and of the column, at geometric frequencies; zero for [CLS]."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / max(quarter, 1))
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64), indexing="ij")
    angles = [pos.flatten()[:, None] * omega[None] for pos in (rows, cols)]  # (N, quarter) each
    table = torch.cat([f(a) for a in angles for f in (torch.sin, torch.cos)], dim=1)  # (N, 4 * quarter)
    table = F.pad(table, (0, dim - table.shape[1]))  # dim not a multiple of 4: zero the remainder
    return F.pad(table, (0, 0, 1, 0)).float()[None]


class VisionBlock(nn.Module):
    def __init__(self, cfg, drop_path):
        super().__init__()
        w = cfg.vision_width
        self.norm1 = nn.LayerNorm(w, eps=1e-6)
        self.attn = Attention(w, cfg.vision_heads)
        self.norm2 = nn.LayerNorm(w, eps=1e-6)
        self.mlp = Mlp(w, int(w * cfg.vision_mlp_ratio))
        self.drop_path = drop_path

    def forward(self, x, mask=None):
        x = x + drop_path(self.attn(self.norm1(x), mask), self.drop_path, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)


class VisionTransformer(nn.Module):
    """ViT whose last `local_layers` blocks are mixed: the image copy attends fully, and one copy
    per region attends locally (eq. 1). Outputs are after the final LayerNorm, as timm/DeiT."""

    def __init__(self, cfg):
        super().__init__()
        self.grid = cfg.grid
        self.first_local = cfg.vision_layers - cfg.local_layers  # L1
        self.checkpointing = cfg.grad_checkpointing
        self.patch_embed = nn.Conv2d(3, cfg.vision_width, cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.vision_width))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid ** 2, cfg.vision_width))
        rates = [cfg.drop_path * i / max(cfg.vision_layers - 1, 1) for i in range(cfg.vision_layers)]
        self.blocks = nn.ModuleList(VisionBlock(cfg, r) for r in rates)
        self.norm = nn.LayerNorm(cfg.vision_width, eps=1e-6)

    def embed(self, images):
        x = self.patch_embed(images).flatten(2).transpose(1, 2)  # (B, N, D)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        return torch.cat([cls, x], dim=1) + self.pos_embed  # (B, 1+N, D)

    def forward(self, images, patch_mask=None, box_index=None):
        """images (B, 3, H, W); patch_mask (R, N) and box_index (R,) for R regions, or None.
        Returns image tokens (B, 1+N, D) and, with regions, region tokens (R, 1+M, D) + mask (R, 1+M)."""
        x = self.embed(images)
        for block in self.blocks[:self.first_local]:
            x = run_layer(block, self.checkpointing, x)
        if patch_mask is None:
            for block in self.blocks[self.first_local:]:
                x = run_layer(block, self.checkpointing, x)
            return self.norm(x), None, None
        regions, mask = gather_regions(x, patch_mask, box_index)
        for block in self.blocks[self.first_local:]:
            x = run_layer(block, self.checkpointing, x)  # the full-attention copy
            regions = run_layer(block, self.checkpointing, regions, key_mask(mask))  # local attention within [CLS] + box
        return self.norm(x), self.norm(regions), mask

    def forward_literal(self, images, patch_mask, box_index):
        """Reference for the mixed layers, as eq. (1) is written (and as the authors' ViT runs it):
        a full (1+N)-token copy per region under the mixed_attention_mask. Returns image tokens
        (B, 1+N, D), region copies (R, 1+N, D) and which of their positions are in the region."""
        x = self.embed(images)
        for block in self.blocks[:self.first_local]:
            x = block(x)
        regions = x[box_index]  # (R, 1+N, D)
        mask = mixed_attention_mask(patch_mask)[:, None]  # (R, 1, 1+N, 1+N)
        for block in self.blocks[self.first_local:]:
            x = block(x)
            regions = block(regions, mask)
        return self.norm(x), self.norm(regions), F.pad(patch_mask, (1, 0), value=True)


# -----------------------------------------------------------------------------
# Text and cross-modal encoders (BERT-base layers 0-5 and 6-11)


class TextEmbeddings(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.word = nn.Embedding(cfg.vocab_size, cfg.text_width)
        self.position = nn.Embedding(cfg.max_positions, cfg.text_width)
        self.token_type = nn.Embedding(cfg.type_vocab_size, cfg.text_width)
        self.norm = nn.LayerNorm(cfg.text_width, eps=1e-12)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, input_ids):
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.word(input_ids) + self.position(positions) + self.token_type.weight[0]
        return self.drop(self.norm(x))


class BertLayer(nn.Module):
    """A post-LayerNorm BERT layer; with `cross`, a cross-attention sub-layer to the image sits
    between self-attention and the feed-forward block (the cross-modal encoder's layers)."""

    def __init__(self, cfg, cross=False):
        super().__init__()
        d = cfg.text_width
        self.attn = Attention(d, cfg.text_heads, dropout=cfg.dropout)
        self.attn_norm = nn.LayerNorm(d, eps=1e-12)
        if cross:
            self.cross_attn = Attention(d, cfg.text_heads, kv_dim=cfg.vision_width, dropout=cfg.dropout)
            self.cross_norm = nn.LayerNorm(d, eps=1e-12)
        self.mlp = Mlp(d, cfg.text_mlp_dim)
        self.mlp_norm = nn.LayerNorm(d, eps=1e-12)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, mask, context=None, context_mask=None, context_index=None, context_kv=None):
        x = self.attn_norm(x + self.drop(self.attn(x, mask)))
        if context is not None or context_kv is not None:
            x = self.cross_norm(x + self.drop(self.cross_attn(x, context_mask, context, context_index, context_kv)))
        return self.mlp_norm(x + self.drop(self.mlp(x)))


class TextEncoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.embeddings = TextEmbeddings(cfg)
        self.layers = nn.ModuleList(BertLayer(cfg) for _ in range(cfg.text_layers))
        self.checkpointing = cfg.grad_checkpointing

    def forward(self, input_ids, attention_mask):
        x, mask = self.embeddings(input_ids), key_mask(attention_mask.bool())
        for layer in self.layers:
            x = run_layer(layer, self.checkpointing, x, mask)
        return x


class FusionEncoder(nn.Module):
    """The cross-modal encoder: text self-attention, cross-attention to visual tokens, FFN."""

    def __init__(self, cfg):
        super().__init__()
        self.layers = nn.ModuleList(BertLayer(cfg, cross=True) for _ in range(cfg.fusion_layers))
        self.checkpointing = cfg.grad_checkpointing

    def project_images(self, image_embeds):
        """Every layer's cross-attention keys/values of the visual tokens, [(C, S, 2D)] per layer: pass
        them as `image_kv` to fuse several batches of texts with the same images, projecting them once."""
        return [layer.cross_attn.kv(image_embeds) for layer in self.layers]

    def forward(self, text_embeds, attention_mask, image_embeds, image_mask=None, image_index=None, image_kv=None):
        x, mask = text_embeds, key_mask(attention_mask.bool())
        if image_mask is not None and image_index is not None:
            image_mask = image_mask[image_index]
        image_mask = key_mask(image_mask)
        for i, layer in enumerate(self.layers):
            kv = None if image_kv is None else image_kv[i]
            x = run_layer(layer, self.checkpointing, x, mask, image_embeds, image_mask, image_index, kv)
        return x


def mlp_head(dim, out):
    """The ITM and bbox heads (paper eq. 2's MLP): Linear d->2d, LayerNorm, GELU, Linear 2d->out."""
    return nn.Sequential(nn.Linear(dim, 2 * dim), nn.LayerNorm(2 * dim), nn.GELU(), nn.Linear(2 * dim, out))


class MLMHead(nn.Module):
    """BERT's prediction head; the output matrix is the word embedding, passed in (tied)."""

    def __init__(self, cfg):
        super().__init__()
        self.dense = nn.Linear(cfg.text_width, cfg.text_width)
        self.norm = nn.LayerNorm(cfg.text_width, eps=1e-12)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, x, word_embeddings):
        return F.linear(self.norm(F.gelu(self.dense(x))), word_embeddings, self.bias)


# -----------------------------------------------------------------------------
# Losses (paper eqs. 2-9), each a small pure function


def box_corners(b):
    """(cx, cy, w, h) -> (x0, y0, x1, y1)."""
    return torch.cat([b[..., :2] - b[..., 2:] / 2, b[..., :2] + b[..., 2:] / 2], dim=-1)


def giou(a, b, eps=1e-7):
    """Generalised IoU (Rezatofighi et al. 2019) of boxes a[i] and b[i], both (n, 4) cxcywh -> (n,).
    Denominators are clamped at eps so degenerate (zero-area) boxes stay finite, value and
    gradient, while every other box gets the exact value."""
    a, b = box_corners(a), box_corners(b)
    area_a = (a[:, 2] - a[:, 0]).clamp(min=0) * (a[:, 3] - a[:, 1]).clamp(min=0)
    area_b = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    wh = (torch.minimum(a[:, 2:], b[:, 2:]) - torch.maximum(a[:, :2], b[:, :2])).clamp(min=0)
    inter = wh[:, 0] * wh[:, 1]
    union = area_a + area_b - inter
    iou = inter / union.clamp(min=eps)
    hull_wh = (torch.maximum(a[:, 2:], b[:, 2:]) - torch.minimum(a[:, :2], b[:, :2])).clamp(min=0)
    hull = hull_wh[:, 0] * hull_wh[:, 1]
    return iou - (hull - union) / hull.clamp(min=eps)


def bbox_loss(pred, target):
    """Eq. (3): (1 - GIoU) + L1 summed over the 4 coordinates, averaged over boxes. (n, 4) cxcywh."""
    if pred.shape[0] == 0:
        return pred.sum() * 0.0  # no region texts: zero, but still in the graph (DDP needs it)
    return ((1.0 - giou(pred, target)) + (pred - target).abs().sum(-1)).mean()


def world():
    """(rank, world size); (0, 1) outside torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_sizes(n, device):
    """The first-dimension size of every rank's tensor."""
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world()[1])]
    dist.all_gather(sizes, torch.tensor([n], device=device))
    return [int(s) for s in sizes]


def _all_gather(x, sizes):
    """Concatenate every rank's x along dim 0; sizes may differ (padded for the collective)."""
    longest = max(sizes)
    padded = F.pad(x, (0, 0) * (x.dim() - 1) + (0, longest - x.shape[0])).contiguous()
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        rank, _ = world()
        sizes = _all_sizes(x.shape[0], x.device)
        ctx.start, ctx.n = sum(sizes[:rank]), x.shape[0]
        return _all_gather(x, sizes)

    @staticmethod
    def backward(ctx, grad):
        # Every rank's loss reads every rank's features: this rank's slice gets the sum of them.
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.start:ctx.start + ctx.n]


def gather_with_grad(x):
    """All-gather along dim 0 keeping gradients; the identity at world size 1."""
    return x if world()[1] == 1 else _GatherWithGrad.apply(x)


def itc_loss(image_feat, text_feat, temp, ids=None):
    """Contrastive loss, eqs. (4)-(6): L2-normalised features (n, E) of n (visual concept, text)
    pairs; in-batch negatives; symmetric cross-entropy.

    `ids` (n,) names each pair's visual concept: pairs sharing an id are all positives, with the
    target uniform over them (appendix B). ids (n, k) give several names per pair (XVLM.forward:
    the concept and the text's words): pairs sharing any of them are positives. Under DDP this
    rank's rows are scored against the
    global batch (features gathered with gradient) and the sum is scaled so that DDP's gradient
    averaging gives exactly the loss and gradients of one process holding the whole batch.
    """
    rank, size = world()
    n = image_feat.shape[0]
    all_image, all_text = gather_with_grad(image_feat), gather_with_grad(text_feat)
    sizes = _all_sizes(n, image_feat.device) if size > 1 else [n]
    start, total = sum(sizes[:rank]), sum(sizes)
    if ids is None:
        ids = torch.arange(n, device=image_feat.device) + start
    ids = ids.view(n, -1)  # (n, k)
    all_ids = _all_gather(ids, sizes) if size > 1 else ids
    positive = same_id(ids, all_ids).float()  # (n, total)
    target = positive / positive.sum(1, keepdim=True)
    i2t = -(F.log_softmax(image_feat @ all_text.T / temp, dim=1) * target).sum(1)
    t2i = -(F.log_softmax(text_feat @ all_image.T / temp, dim=1) * target).sum(1)
    return (i2t + t2i).sum() / 2 / total * size


def same_id(a, b):
    """(n, k), (m, k) ids -> (n, m) bool: rows that share an id in any of the k columns."""
    return (a[:, None, :] == b[None, :, :]).any(-1)


def text_key(input_ids, attention_mask):
    """One int64 per text, equal for texts of equal tokens: a 62-bit polynomial hash (two 31-bit
    halves, computed without int64 overflow), the same on every rank."""
    ids = input_ids.masked_fill(~attention_mask.bool(), 0)
    modulus = 2**31 - 1
    halves = []
    for base in (1_000_003, 999_983):
        powers = torch.tensor([pow(base, t, modulus) for t in range(ids.shape[1])], device=ids.device)
        halves.append((ids * powers).sum(1) % modulus)  # ids < 2^20, powers < 2^31: the sum fits
    return halves[0] * 2**31 + halves[1]


def sample_hard_negatives(sim_i2t, sim_t2i, ids=None):
    """ITM hard negatives (paper 3.3): for each visual concept (row of sim_i2t) one text drawn from
    softmax(sim) with the positives' weight zeroed, and for each text one concept likewise.
    Square (n, n) similarities; `ids` as in itc_loss. Returns (text index per concept,
    concept index per text), never a positive."""
    n = sim_i2t.shape[0]
    ids = torch.arange(n, device=sim_i2t.device) if ids is None else ids.view(n, -1)
    positive = same_id(ids.view(n, -1), ids.view(n, -1))
    if bool(positive.all(1).any()):  # one host sync, for this error rather than multinomial's
        raise ValueError("ITM hard negatives: a batch needs at least two distinct visual concepts")

    def draw(sim):
        # + 1e-5 as the authors: a negative that softmax underflows to 0 can still be drawn
        weights = (F.softmax(sim.float(), dim=1) + 1e-5).masked_fill(positive, 0.0)
        return torch.multinomial(weights, 1).squeeze(1)

    return draw(sim_i2t), draw(sim_t2i)


def mask_tokens(input_ids, attention_mask, vocab_size, mask_token_id, special_ids, prob=0.25,
                max_masks=8, generator=None):
    """MLM corruption (paper 3.3): choose `prob` of each text's maskable tokens (real tokens that
    are not special), at least one and at most `max_masks`; replace 80% of the chosen with [MASK],
    10% with a random token, leave 10% unchanged. Returns (masked_ids, labels), labels -100 where
    not chosen."""
    rand = lambda: torch.rand(input_ids.shape, device=input_ids.device, generator=generator)
    maskable = attention_mask.bool() & ~torch.isin(input_ids, torch.as_tensor(special_ids, device=input_ids.device))
    score = rand().masked_fill(~maskable, 2.0)  # non-maskable sort last
    # Bernoulli(prob) per token, then clamp the count to [1, max_masks]; the chosen tokens are the
    # lowest-scoring ones, which is exactly {score < prob} when the count is not clamped.
    count = (score < prob).sum(1).clamp(1, max_masks)
    rank = score.argsort(1).argsort(1)
    chosen = (rank < count[:, None]) & maskable
    labels = input_ids.masked_fill(~chosen, -100)
    action = rand()
    random_ids = torch.randint(vocab_size, input_ids.shape, device=input_ids.device, generator=generator)
    masked = torch.where(chosen & (action < 0.8), torch.full_like(input_ids, mask_token_id), input_ids)
    masked = torch.where(chosen & (action >= 0.8) & (action < 0.9), random_ids, masked)
    return masked, labels


# -----------------------------------------------------------------------------
# The model


def num_params(module):
    return sum(p.numel() for p in module.parameters())


class XVLM(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.vision = VisionTransformer(cfg)
        self.text = TextEncoder(cfg)
        self.fusion = FusionEncoder(cfg)
        self.vision_proj = nn.Linear(cfg.vision_width, cfg.embed_dim)
        self.text_proj = nn.Linear(cfg.text_width, cfg.embed_dim)
        self.temp = nn.Parameter(torch.tensor(cfg.temp))
        self.itm_head = mlp_head(cfg.text_width, 2)
        self.bbox_head = mlp_head(cfg.text_width, 4)
        self.mlm_head = MLMHead(cfg)
        self.apply(self.init_weights)
        # From scratch, the image encoder starts as MAE's: position embeddings learned (as DeiT's,
        # whose weights replace all this) but started from 2-D sin-cos, and the patch projection
        # initialised as a linear layer. The model then knows where each patch is from the first
        # step, which localisation (the bbox loss) needs; from a std-0.02 init it learns it slowly.
        with torch.no_grad():
            self.vision.pos_embed.copy_(sincos_pos_embed(cfg.vision_width, cfg.grid))
        patch = self.vision.patch_embed.weight
        nn.init.xavier_uniform_(patch.view(patch.shape[0], -1))
        nn.init.trunc_normal_(self.vision.cls_token, std=0.02)
        sizes = self.param_counts()
        print(f"XVLM: {sizes['vision'] / 1e6:.1f}M vision, {sizes['text+fusion'] / 1e6:.1f}M text+fusion, "
              f"{sizes['total'] / 1e6:.1f}M parameters in all")

    def init_weights(self, m):
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.Embedding)):
            nn.init.trunc_normal_(m.weight, std=self.cfg.init_std)
        if isinstance(m, (nn.Linear, nn.Conv2d)) and m.bias is not None:
            nn.init.zeros_(m.bias)

    @classmethod
    def from_checkpoint(cls, source, **overrides):
        """Rebuild a model from one of our checkpoints alone: its stored config, with `overrides`
        (image_res=384 to fine-tune at a higher resolution: position embeddings are resampled),
        and its weights, loaded strictly (see load_checkpoint)."""
        checkpoint, source = read_file(source)
        stored = stored_config(checkpoint, source)
        if stored is None:
            raise ValueError(f"{source}: not an X-VLM checkpoint (no config): build XVLM(cfg), then load_checkpoint")
        model = cls(XVLMConfig(**{**stored, **overrides}))
        _load_own(model, _state_dict(checkpoint, source), source)
        return model

    def param_counts(self):
        return {"vision": num_params(self.vision), "text+fusion": num_params(self.text) + num_params(self.fusion),
                "total": num_params(self)}

    # -- encoders ---------------------------------------------------------------

    def encode_image(self, images, boxes=None, box_index=None):
        """images (B, 3, H, W); boxes (R, 4) normalised cxcywh, box_index (R,) their images
        (default: box r belongs to image r). Returns image_embeds (B, 1+N, D) with full
        attention, and for regions region_embeds (R, 1+M, D) + region_mask (R, 1+M), else None."""
        if boxes is None or boxes.shape[0] == 0:
            return self.vision(images)
        if box_index is None:
            box_index = torch.arange(boxes.shape[0], device=boxes.device)
        return self.vision(images, patch_mask(boxes, self.vision.grid), box_index)

    def encode_text(self, input_ids, attention_mask):
        """(B, L) ids and mask -> (B, L, D) text encoder output."""
        return self.text(input_ids, attention_mask)

    def fuse(self, text_embeds, attention_mask, image_embeds, image_mask=None, image_index=None, image_kv=None):
        """Cross-modal encoder: text (B, L, D) attends to visual tokens (B, S, Dv) -> (B, L, D).
        With image_index (B,), text b attends to image_embeds[image_index[b]] of (C, S, Dv).
        image_kv: self.fusion.project_images(image_embeds), when several calls share the images."""
        return self.fusion(text_embeds, attention_mask, image_embeds, image_mask, image_index, image_kv)

    def image_features(self, image_embeds):
        return F.normalize(self.vision_proj(image_embeds[:, 0]), dim=-1)  # g_v(v_cls)

    def text_features(self, text_embeds):
        return F.normalize(self.text_proj(text_embeds[:, 0]), dim=-1)  # g_w(w_cls)

    # -- pre-training -------------------------------------------------------------

    def forward(self, batch):
        """The pre-training loss, eq. (9): L = L_bbox + L_cl + L_match + L_mlm.

        batch (tensors on the model's device):
          images      (B, 3, H, W)  normalised images
          text_ids    (T, L) int64  token ids, [CLS] ... [SEP] [PAD]...
          text_mask   (T, L) bool   True for real tokens
          text_image  (T,) int64    image of each text
          text_box    (T,) int64    box of each region text (object or region), -1 for whole-image texts
          boxes       (R, 4)        normalised (cx, cy, w, h) of the region texts' boxes
          box_image   (R,) int64    image of each box
          concept_ids (T,) int64    optional: a global id of each text's visual concept; texts
                                    sharing one (or, with cfg.equal_texts_positive, the same
                                    words) are positives of each other in itc and itm
        A region text is paired with its region's copy of the image (mixed attention) for itc,
        itm and mlm, and with the full image for bbox, which locates its box (paper 3.3).
        Returns {"loss", "itc", "itm", "mlm", "bbox"}, 0-dim tensors; loss is the sum.
        """
        cfg = self.cfg
        with torch.no_grad():
            self.temp.clamp_(0.001, 0.5)
        images, boxes = batch["images"], batch["boxes"]
        text_ids, text_mask = batch["text_ids"], batch["text_mask"].bool()
        text_image, text_box = batch["text_image"], batch["text_box"]

        image_embeds, region_embeds, region_mask = self.encode_image(images, boxes, batch["box_image"])
        bank, bank_mask = concept_bank(image_embeds, region_embeds, region_mask)
        concept = torch.where(text_box >= 0, images.shape[0] + text_box, text_image)  # (T,) row in bank
        ids = batch.get("concept_ids")
        if ids is None:
            # bank rows are unique only within this process; itc compares ids across ranks
            ids = concept + (world()[0] << 32)
        if cfg.equal_texts_positive:
            ids = torch.stack([ids, text_key(text_ids, text_mask)], 1)  # (T, 2): same concept or same words

        text_embeds = self.encode_text(text_ids, text_mask)
        image_feat = self.image_features(bank)[concept]  # (T, E): each text's visual concept
        text_feat = self.text_features(text_embeds)
        itc = itc_loss(image_feat, text_feat, self.temp, ids)
        # itm, mlm and bbox each fuse texts with the bank's concepts: project their keys/values once.
        bank_kv = self.fusion.project_images(bank)
        itm = self.itm_loss(bank, bank_mask, concept, text_embeds, text_mask, image_feat, text_feat, ids, bank_kv)
        mlm = self.mlm_loss(bank, bank_mask, concept, text_ids, text_mask, bank_kv)
        # the bank's first B rows are the full-attention images, which the bbox loss reads
        bbox = self.bbox_prediction_loss(bank, text_embeds, text_mask, text_image, text_box, boxes, bank_kv)
        return {"loss": itc + itm + mlm + bbox, "itc": itc, "itm": itm, "mlm": mlm, "bbox": bbox}

    def bbox_prediction_loss(self, image_embeds, text_embeds, text_mask, text_image, text_box, boxes, image_kv=None):
        """Eqs. (2)-(3): locate each region text's box from the full-attention image fused with
        the text. Whole-image texts, box (0.5, 0.5, 1, 1), join only with cfg.bbox_whole_image.
        image_embeds[text_image] are the images; image_kv as in fuse."""
        whole = torch.tensor([0.5, 0.5, 1.0, 1.0], device=text_box.device)
        target = whole.expand(text_box.shape[0], 4)
        if boxes.shape[0]:
            target = torch.where((text_box >= 0)[:, None], boxes[text_box.clamp(min=0)].float(), whole)
        located = torch.ones_like(text_box, dtype=torch.bool) if self.cfg.bbox_whole_image else text_box >= 0
        pick = located.nonzero().squeeze(1)  # one host sync: how many texts have a box is data
        fused = self.fuse(text_embeds[pick], text_mask[pick], image_embeds, None, text_image[pick], image_kv)
        pred = self.bbox_head(fused[:, 0]).float().sigmoid()  # eq. (2)
        return bbox_loss(pred, target[pick])

    def itm_loss(self, bank, bank_mask, concept, text_embeds, text_mask, image_feat, text_feat, ids, bank_kv=None):
        """Eq. (7): each pair, plus one hard negative text per concept and one hard negative
        concept per text (1 : 2), classified from the fused [CLS]. bank_kv as image_kv in fuse."""
        T = concept.shape[0]
        with torch.no_grad():
            sim = image_feat @ text_feat.T / self.temp  # (T, T): concept of text i vs text j
            neg_text, neg_concept = sample_hard_negatives(sim, sim.T, ids)
        texts = torch.cat([torch.arange(T, device=concept.device), neg_text, torch.arange(T, device=concept.device)])
        concepts = torch.cat([concept, concept, concept[neg_concept]])
        fused = self.fuse(text_embeds[texts], text_mask[texts], bank, bank_mask, concepts, bank_kv)
        logits = self.itm_head(fused[:, 0])
        labels = (torch.arange(3 * T, device=logits.device) < T).long()  # pairs 1, negatives 0
        return F.cross_entropy(logits.float(), labels)

    def mlm_loss(self, bank, bank_mask, concept, text_ids, text_mask, bank_kv=None):
        """Eq. (8): predict masked tokens from the cross-modal encoder given the visual concept."""
        cfg = self.cfg
        special = [cfg.pad_token_id, cfg.cls_token_id, cfg.sep_token_id, cfg.mask_token_id]
        masked, labels = mask_tokens(text_ids, text_mask, cfg.vocab_size, cfg.mask_token_id, special,
                                     cfg.mask_prob, cfg.max_masks)
        fused = self.fuse(self.encode_text(masked, text_mask), text_mask, bank, bank_mask, concept, bank_kv)
        # Only masked positions reach the (vocab-sized) output layer. One host sync: how many were
        # drawn is data. (Padding to max_masks slots per text avoids it, but doubles this layer's
        # work: 19% of the tiny config's CPU step.)
        chosen = labels != -100
        logits = self.mlm_head(fused[chosen], self.text.embeddings.word.weight)
        return F.cross_entropy(logits.float(), labels[chosen])


def concept_bank(image_embeds, region_embeds, region_mask):
    """Every visual concept of the batch in one padded tensor, images first, then regions, so any
    text can be fused with any concept in one batched call: (B+R, 1+N, D) and mask (B+R, 1+N)."""
    B, S, _ = image_embeds.shape
    image_mask = torch.ones(B, S, dtype=torch.bool, device=image_embeds.device)
    if region_embeds is None:
        return image_embeds, image_mask
    pad = S - region_embeds.shape[1]
    regions = F.pad(region_embeds, (0, 0, 0, pad))
    return torch.cat([image_embeds, regions]), torch.cat([image_mask, F.pad(region_mask, (0, pad), value=False)])


# -----------------------------------------------------------------------------
# Weights: DeiT / timm ViT, Hugging Face BERT, our own checkpoints
#
# Every loader reads a state dict (a dict, a file, or a directory holding one), renames it to our
# parameter names with a declarative key table, and copies it in strictly: an unexpected key, a shape
# mismatch or a tied copy that differs raises one ValueError naming every such key and the file.
# What a complete checkpoint of that kind would fill but this one lacks comes back in a LoadReport.
# Files never run code: torch.load(weights_only=True) or safetensors.

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".th")
PREFERRED_FILES = ("model.safetensors", "pytorch_model.bin")  # Hugging Face's, when a directory holds several


def _names(keys, most=12):
    keys = list(keys)
    return ", ".join(keys[:most]) + (f" and {len(keys) - most} more" if len(keys) > most else "")


def weights_file(path):
    """The file `path` names: itself, or the weights file in a directory."""
    path = Path(path)
    if not path.is_dir():
        return path
    found = sorted(p.name for p in path.iterdir() if p.name.endswith(WEIGHT_SUFFIXES))
    preferred = [name for name in PREFERRED_FILES if name in found]
    if len(found) == 1 or preferred:
        return path / (preferred or found)[0]
    raise ValueError(f"{path}: " + (f"several weights files ({', '.join(found)}); name one" if found else
                                    f"no weights file ({', '.join('*' + s for s in WEIGHT_SUFFIXES)})"))


def read_file(source):
    """(object, name): a dict passes through; a file or directory is read without running code."""
    if isinstance(source, dict):
        return source, "state dict"
    path = weights_file(source)
    if not path.name.endswith(WEIGHT_SUFFIXES):
        raise ValueError(f"{path}: not a weights file; expected one of {', '.join(WEIGHT_SUFFIXES)}")
    if path.suffix == ".safetensors":
        return safetensors.torch.load_file(path), str(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True), str(path)
    except pickle.UnpicklingError as e:
        # Anything but tensors and plain containers could run code when unpickled; torch names it.
        why = re.search(r"Unsupported global: GLOBAL [\w.]+", str(e))
        raise ValueError(f"{path}: refused: it pickles objects other than tensors and plain containers "
                         f"({why.group(0) if why else str(e).splitlines()[0]}); "
                         f"save the weights as .safetensors or as a plain state dict") from e


def stored_config(checkpoint, source):
    """The config dict in one of our checkpoints (as read_file returns it), or None for weights
    alone (.safetensors, a plain state dict). Fields this XVLMConfig lacks raise ValueError."""
    stored = checkpoint.get("config") if isinstance(checkpoint, dict) else None
    if not isinstance(stored, dict):
        return None
    unknown = set(stored) - {f.name for f in fields(XVLMConfig)}
    if unknown:
        raise ValueError(f"{source}: config fields this XVLMConfig does not have: {_names(sorted(unknown))}")
    return stored


def _state_dict(obj, name):
    """The state dict in a file's object, unwrapping {"model": ...} as DeiT releases and our checkpoints store it."""
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict):
        raise ValueError(f"{name}: holds a {type(obj).__name__}, not a state dict")
    not_tensors = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise ValueError(f"{name}: not a state dict: {_names(not_tensors)} are not tensors")
    return obj


def read_state_dict(source):
    """(state dict, name) from a dict, a file (.safetensors .bin .pt .pth .th) or a directory."""
    obj, name = read_file(source)
    return _state_dict(obj, name), name


def resample_pos_embed(pos_embed, grid, prefix_tokens=1):
    """Position embeddings (1, prefix + n*n, D) of an n x n patch grid -> (1, prefix + grid*grid, D),
    as timm's resample_abs_pos_embed: the prefix ([CLS]) rows kept, the grid resized bicubically in
    float32, the dtype restored. On the same grid it is the identity."""
    prefix, patches = pos_embed[:, :prefix_tokens], pos_embed[:, prefix_tokens:]
    n = math.isqrt(patches.shape[1])
    if n * n != patches.shape[1]:
        raise ValueError(f"resample_pos_embed: {patches.shape[1]} patch positions do not form a square grid")
    x = patches.float().unflatten(1, (n, n)).permute(0, 3, 1, 2)  # (1, D, n, n)
    # antialias (as timm) matters only when shrinking: average the cells rather than skip some
    x = F.interpolate(x, size=(grid, grid), mode="bicubic", align_corners=False, antialias=True)
    patches = x.permute(0, 2, 3, 1).flatten(1, 2).to(pos_embed.dtype)  # (1, grid*grid, D)
    return torch.cat([prefix, patches], dim=1)


@dataclass
class LoadReport:
    """What a loader filled: `loaded` (our keys), and `missing`, the keys a complete checkpoint of this
    kind fills but this one lacked (e.g. the fusion encoder from a 6-layer BERT). The missing keep their
    init, as do the modules no such checkpoint has (cross-attention, heads, the other encoder)."""
    source: str
    loaded: list
    missing: list

    def missing_modules(self):
        """The missing keys by module, a layer counting as one: ["fusion.layers.0", ...]."""
        modules = []
        for key in self.missing:
            m = re.match(r"(.*?\.\d+)\.", key) or re.match(r"(.*)\.", key)  # up to a layer index, or the parameter
            modules.append(m.group(1) if m else key)
        return list(dict.fromkeys(modules))

    def __str__(self):
        missing = f"; not in it, left at init: {', '.join(self.missing_modules())}" if self.missing else ""
        return f"{self.source}: loaded {len(self.loaded)} tensors{missing}"


def concat(*names):
    """A table entry filled by several tensors concatenated along dim 0 (output features): our fused
    qkv projection is BERT's query, key and value, in that order."""
    return tuple(names)


# (ours, timm / DeiT); {i}: block, {p}: weight and bias; ours None: known, deliberately not used.
VIT_KEYS = [
    ("vision.cls_token", "cls_token"),
    ("vision.pos_embed", "pos_embed"),  # resampled when the checkpoint's grid differs
    ("vision.patch_embed.{p}", "patch_embed.proj.{p}"),
    ("vision.blocks.{i}.norm1.{p}", "blocks.{i}.norm1.{p}"),
    ("vision.blocks.{i}.attn.qkv.{p}", "blocks.{i}.attn.qkv.{p}"),  # fused q, k, v as ours
    ("vision.blocks.{i}.attn.proj.{p}", "blocks.{i}.attn.proj.{p}"),
    ("vision.blocks.{i}.norm2.{p}", "blocks.{i}.norm2.{p}"),
    ("vision.blocks.{i}.mlp.fc1.{p}", "blocks.{i}.mlp.fc1.{p}"),
    ("vision.blocks.{i}.mlp.fc2.{p}", "blocks.{i}.mlp.fc2.{p}"),
    ("vision.norm.{p}", "norm.{p}"),
    (None, "head.{p}"),  # the ImageNet classifier
]

# (ours, Hugging Face BERT without its "bert." prefix); {i}: BERT layer, {layer}: where it lives here
# (text.layers.i, or fusion.layers.(i - text_layers) above the text encoder).
BERT_KEYS = [
    ("text.embeddings.word.weight", "embeddings.word_embeddings.weight"),
    ("text.embeddings.position.weight", "embeddings.position_embeddings.weight"),
    ("text.embeddings.token_type.weight", "embeddings.token_type_embeddings.weight"),
    ("text.embeddings.norm.{p}", "embeddings.LayerNorm.{p}"),
    ("{layer}.attn.qkv.{p}", concat("encoder.layer.{i}.attention.self.query.{p}",
                                    "encoder.layer.{i}.attention.self.key.{p}",
                                    "encoder.layer.{i}.attention.self.value.{p}")),
    ("{layer}.attn.proj.{p}", "encoder.layer.{i}.attention.output.dense.{p}"),
    ("{layer}.attn_norm.{p}", "encoder.layer.{i}.attention.output.LayerNorm.{p}"),
    ("{layer}.mlp.fc1.{p}", "encoder.layer.{i}.intermediate.dense.{p}"),
    ("{layer}.mlp.fc2.{p}", "encoder.layer.{i}.output.dense.{p}"),
    ("{layer}.mlp_norm.{p}", "encoder.layer.{i}.output.LayerNorm.{p}"),
    ("mlm_head.dense.{p}", "cls.predictions.transform.dense.{p}"),
    ("mlm_head.norm.{p}", "cls.predictions.transform.LayerNorm.{p}"),
    ("mlm_head.bias", "cls.predictions.bias"),
    # Tied copies, present in some files: a second row for the same key; the copies must be equal.
    ("mlm_head.bias", "cls.predictions.decoder.bias"),
    ("text.embeddings.word.weight", "cls.predictions.decoder.weight"),
    (None, "embeddings.position_ids"),  # a buffer: 0..max_positions-1
    (None, "pooler.dense.{p}"),  # BertModel's next-sentence pooler
    (None, "cls.seq_relationship.{p}"),  # BertForPreTraining's next-sentence head
]
OLD_LAYERNORM_NAMES = {"gamma": "weight", "beta": "bias"}  # TF-converted .bin files, bert-base-uncased's own


def hf_bert_name(key):
    """A Hugging Face BERT key as BERT_KEYS spells it: no "bert." prefix, LayerNorm weight and bias."""
    module, _, leaf = key.removeprefix("bert.").rpartition(".")
    if module.endswith("LayerNorm"):
        leaf = OLD_LAYERNORM_NAMES.get(leaf, leaf)
    return f"{module}.{leaf}" if module else leaf


def expand_table(table, layers):
    """Concrete (ours, (theirs, ...)) pairs from a key table: {p} stands for weight and bias; rows
    with {i} repeat once per entry of `layers`, a dict of format values for each layer."""
    pairs = []
    for ours, theirs in table:
        theirs = theirs if isinstance(theirs, tuple) else (theirs,)
        for values in (layers if "{i}" in theirs[0] else [{}]):
            for p in (("weight", "bias") if "{p}" in theirs[0] else ("",)):
                fill = lambda s: s.format(p=p, **values)
                pairs.append((None if ours is None else fill(ours), tuple(fill(n) for n in theirs)))
    return pairs


def vit_key_pairs(cfg):
    """VIT_KEYS for a model of this config: (ours, (timm name,)) pairs, one per tensor."""
    return expand_table(VIT_KEYS, [dict(i=i) for i in range(cfg.vision_layers)])


def bert_key_pairs(cfg):
    """BERT_KEYS for a model of this config: BERT layer i to text layer i below text_layers, to fusion
    layer i - text_layers above. (ours, (Hugging Face names, ...)) pairs."""
    T = cfg.text_layers
    return expand_table(BERT_KEYS, [dict(i=i, layer=f"text.layers.{i}" if i < T else f"fusion.layers.{i - T}")
                                    for i in range(T + cfg.fusion_layers)])


def map_state_dict(state, pairs, rename=lambda k: k):
    """Rename a foreign state dict to ours with expanded table pairs; keys are looked up as `rename`
    spells them and reported as the file does. Returns ({ours: tensor}, {ours: source names}, [problems])."""
    original = {rename(k): k for k in state}
    problems = [] if len(original) == len(state) else ["two keys that name the same tensor"]
    state = {rename(k): v for k, v in state.items()}
    known = {n for _, names in pairs for n in names}
    unexpected = [original[k] for k in state if k not in known]
    if unexpected:
        problems.append(f"unexpected keys: {_names(unexpected)}")
    tensors, origin = {}, {}
    for ours, names in pairs:
        parts = [state[n] for n in names if n in state]
        if ours is None or not parts:
            continue
        shown = [original.get(n, n) for n in names]
        if len(parts) < len(names) or len({p.shape for p in parts}) > 1:
            problems.append(f"{' + '.join(shown)}: incomplete or of unequal shapes")
            continue
        tensor = parts[0] if len(parts) == 1 else torch.cat(parts)
        if ours not in tensors:
            tensors[ours], origin[ours] = tensor, shown
        elif not torch.equal(tensors[ours], tensor):
            problems.append(f"{shown[0]} differs from {origin[ours][0]}, to which it is tied ({ours})")
    return tensors, origin, problems


def _assign(model, tensors, source, origin=None, problems=(), required=()):
    """Copy `tensors` (our names) into `model`, strictly: each must be one of the model's keys, of its
    shape (a VisionTransformer's pos_embed is resampled to the model's grid), and every `required`
    key must be there; otherwise raise, naming every problem at once, before anything is copied."""
    own, origin, problems = model.state_dict(), origin or {}, list(problems)
    grids = {f"{name}.pos_embed".lstrip("."): m.grid for name, m in model.named_modules() if isinstance(m, VisionTransformer)}
    tensors = {k: resample_pos_embed(v, grids[k]) if k in grids and v.dim() == 3 and v.shape[1] != own[k].shape[1] else v
               for k, v in tensors.items()}
    unexpected = [k for k in tensors if k not in own]
    if unexpected:
        problems.append(f"not in the model: {_names(unexpected)}")
    mismatched = [f"{' + '.join(origin.get(k, [k]))}: {tuple(v.shape)} in the checkpoint, {tuple(own[k].shape)} in the model ({k})"
                  for k, v in tensors.items() if k in own and v.shape != own[k].shape]
    problems += mismatched[:12] + ([f"and {len(mismatched) - 12} more shape mismatches"] if len(mismatched) > 12 else [])
    absent = [k for k in required if k not in tensors]
    if absent:
        problems.append(f"missing keys: {_names(absent)}")
    if problems:
        raise ValueError(f"{source}: does not fit the {type(model).__name__}:\n  " + "\n  ".join(problems))
    model.load_state_dict({**own, **tensors})  # strict: exactly the model's keys


def _load_table(model, state, pairs, source, rename=lambda k: k, optional=()):
    """Map, check and copy a foreign state dict; report the table's keys it did not fill (but those
    under `optional` prefixes, which this kind of checkpoint need not have)."""
    tensors, origin, problems = map_state_dict(state, pairs, rename)
    _assign(model, tensors, source, origin, problems)
    scope = dict.fromkeys(ours for ours, _ in pairs if ours is not None)
    missing = [k for k in scope if k not in tensors and not k.startswith(optional)]
    return LoadReport(source, list(tensors), missing)


def _depth(state, pattern):
    """How many layers a state dict holds, by a regex whose group is the layer index."""
    found = [int(m.group(1)) for k in state if (m := re.match(pattern, k))]
    return max(found) + 1 if found else 0


def load_vit(model, source):
    """Initialise the image encoder from a DeiT / timm ViT state dict (paper 4.2: DeiT-base,
    ImageNet-1k), e.g. deit_base_patch16_224-b5f2ef4d.pth. Its 224px position embeddings are
    resampled to the model's grid; the classifier head is ignored. Returns a LoadReport; raises
    ValueError on unexpected keys, shape mismatches and checkpoints deeper than the model."""
    state, source = read_state_dict(source)
    if "dist_token" in state:
        raise ValueError(f"{source}: a distilled DeiT (dist_token): two prefix tokens where X-VLM's ViT has one; "
                         f"use the plain DeiT, e.g. deit_base_patch16_224")
    depth, layers = _depth(state, r"blocks\.(\d+)\."), model.cfg.vision_layers
    if depth > layers:
        raise ValueError(f"{source}: {depth} ViT blocks, the model has {layers}; refusing to drop blocks {layers}-{depth - 1}")
    return _load_table(model, state, vit_key_pairs(model.cfg), source)


def load_bert(model, source):
    """Initialise the text and cross-modal encoders from a Hugging Face BertModel / BertForMaskedLM /
    BertForPreTraining state dict, with or without the "bert." prefix (paper 4.2: bert-base-uncased).

    BERT layer i goes to text layer i for i < text_layers, and to fusion layer i - text_layers above
    (12 layers: 0-5 text, 6-11 fusion self-attention and FFN; cross-attention is new). A shallower
    checkpoint (6-layer MiniLM) fills what it has and reports the rest missing; a deeper one than the
    model is refused. The MLM head loads when the checkpoint has one (a BertModel has none, and it is
    then not reported missing). Returns a LoadReport; raises ValueError as load_vit does."""
    state, source = read_state_dict(source)
    cfg = model.cfg
    depth, layers = _depth(state, r"(?:bert\.)?encoder\.layer\.(\d+)\."), cfg.text_layers + cfg.fusion_layers
    if depth > layers:
        raise ValueError(f"{source}: {depth} BERT layers, the model has {cfg.text_layers} text + {cfg.fusion_layers} "
                         f"fusion layers; refusing to drop layers {layers}-{depth - 1}")
    has_head = any(hf_bert_name(k).startswith("cls.predictions.") for k in state)
    return _load_table(model, state, bert_key_pairs(cfg), source, hf_bert_name,
                       optional=() if has_head else ("mlm_head.",))


# -- our own checkpoints ---------------------------------------------------------


def rng_state():
    """This process's random generators (torch CPU and CUDA, numpy, Python) as tensors and plain
    lists, so that a checkpoint holding them loads with weights_only=True."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, mt, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
            "python": [version, list(mt), gauss_next]}


def set_rng_state(state):
    """The inverse of rng_state(): every generator continues where it was saved. CUDA states are
    skipped on a machine without CUDA."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, mt, gauss_next = state["python"]
    random.setstate((version, tuple(mt), gauss_next))


def save_checkpoint(path, model, optimizer=None, scheduler=None, step=0, extra=None):
    """Write {"model", "optimizer", "scheduler", "step", "config", "rng", "extra"} to `path`.
    `model` is the unwrapped module (not DDP or compiled), with a `cfg`. Atomic: written to a temporary
    file beside `path`, then renamed over it, so a crash mid-write leaves the previous file whole.

    To resume: XVLM.from_checkpoint(path), then build the optimizer and the scheduler as at the start,
    then load their states and set_rng_state(checkpoint["rng"]). Footgun: a scheduler built after the
    optimizer's state is loaded resets the learning rate to its step-0 value. Bit-exact resumption also
    needs torch.use_deterministic_algorithms(True): index backward may accumulate in any order."""
    path = Path(path)
    checkpoint = {"model": model.state_dict(),
                  "optimizer": None if optimizer is None else optimizer.state_dict(),
                  "scheduler": None if scheduler is None else scheduler.state_dict(),
                  "step": step, "config": model.cfg.to_dict(), "rng": rng_state(), "extra": extra or {}}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic: readers see the old file or the new one, never half of one
    except BaseException:
        os.unlink(tmp)
        raise


def _load_own(model, state, source, prefix="", allow_missing=()):
    """load_checkpoint on a state dict already read from `source`."""
    allow = (allow_missing,) if isinstance(allow_missing, str) else tuple(allow_missing)
    tensors = {prefix + k: v for k, v in state.items()}
    own = model.state_dict()
    _assign(model, tensors, source, required=[k for k in own if not k.startswith(allow)])
    return LoadReport(source, list(tensors), [k for k in own if k not in tensors])


def load_checkpoint(model, source, prefix="", allow_missing=()):
    """Load the weights of one of our checkpoints (or a state dict of ours) into `model`, strictly.
    A checkpoint made at another image_res is resampled to the model's grid (256 -> 384 to fine-tune).
    For a downstream model wrapping an XVLM, `prefix` is where it sits ("xvlm.") and `allow_missing`
    names the prefixes of the new modules ("vqa_decoder.",) that the checkpoint lacks: they are returned
    in the report's `missing`. Any other missing or unexpected key, or a shape mismatch, raises ValueError."""
    state, source = read_state_dict(source)
    return _load_own(model, state, source, prefix, allow_missing)


if __name__ == "__main__":
    XVLM(XVLMConfig())
