"""
X-VLM: multi-grained vision language pre-training (Zeng, Zhang, Li; ICML 2022), in one file.

Read top to bottom, it is the paper's section 3: the config; one attention module; the image encoder
whose last layers use mixed attention (3.2, eq. 1); the BERT text and cross-modal encoders; the heads;
the four pre-training losses as small functions (3.3, eqs. 2-9), the contrastive loss's gather across
ranks beside it; and `XVLM.forward`, which ties them together. Then the loaders that fill a model from
DeiT / timm ViT, Hugging Face BERT, our checkpoints and the authors' released ones (the formats are
checkpoints.py's); last, the released models' Swin-B, behind the same interface as the ViT.

    import data, xvlm
    tok = data.Tokenizer("synth/vocab.txt")       # python synth.py --out synth
    cfg = xvlm.XVLMConfig.tiny(vocab_size=tok.vocab_size)
    dataset = data.PretrainDataset(["synth/pretrain_captions.json", "synth/pretrain_regions.jsonl"], "synth/images", tok, cfg)
    losses = xvlm.XVLM(cfg)(next(iter(data.pretrain_loader(dataset, batch_size=8))))  # {"loss", "itc", "itm", "mlm", "bbox"}
    losses["loss"].backward()

`python xvlm.py` builds X-VLM-base and prints its size.
"""

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

import checkpoints


# -----------------------------------------------------------------------------
# Config


@dataclass
class XVLMConfig:
    # Image encoder: ViT-B/16 as DeiT-base (paper 4.2), initialised from ImageNet-1k weights.
    image_res: int = 256  # pre-training resolution (4.2); fine-tuning raises it to 384
    patch_size: int = 16
    vision_width: int = 768
    vision_layers: int = 12
    vision_heads: int = 12
    local_layers: int = 4  # L2 mixed (full + local copies) after L1 = 8 full; all local: Table 3's w/o mixed attn
    vision_mlp_ratio: float = 4.0
    drop_path: float = 0.0  # stochastic depth; 0 in the authors' ViT builder (their Swin uses 0.1)
    # The position embeddings added again to the ViT's output tokens (image and region copies), which the
    # cross-modal encoder reads, as DETR adds them to its decoder's memory. Not the paper's: its ViT starts
    # from DeiT, whose tokens keep where each patch lies; tiny's, from scratch, keep too little of it.
    output_positions: bool = False
    # Text and cross-modal encoders: BERT-base layers 0-5 and 6-11 (paper 4.2).
    vocab_size: int = 30522  # bert-base-uncased
    text_width: int = 768
    text_heads: int = 12
    text_layers: int = 6
    fusion_layers: int = 6
    text_mlp_dim: int = 3072
    max_positions: int = 512  # BERT's position table, so public weights load as they are
    type_vocab_size: int = 2  # BERT adds the token-type-0 embedding to every token; kept for parity
    max_tokens: int = 25  # paper 4.2 (the authors' configs: 40)
    dropout: float = 0.1  # BERT's hidden and attention-probability dropout
    grad_checkpointing: bool = False  # keep each layer's input only, recompute the rest in backward: same gradients
    # Heads and losses.
    embed_dim: int = 256  # g_v, g_w project [CLS] to 256-d (paper 3.3)
    temp: float = 0.07  # learnable; clamped to [0.001, 0.5]
    # MLM (3.3): 25% of the tokens, replaced 80/10/10; the rest is the authors' TextMaskingGenerator
    # (data.mask_text): whole words, spans of 2..mask_span_max tokens with probability mask_span_prob.
    mask_prob: float = 0.25
    max_masks: int = 8
    mask_span_prob: float = 0.2
    mask_span_max: int = 3
    use_bbox_loss: bool = True  # False: Table 3's "w/o bbox loss"
    bbox_whole_image: bool = False  # put whole-image texts, target (0.5, 0.5, 1, 1), in the bbox loss
    # Positives in itc and itm. False: eq. (6) literally, one per (concept, text) pair, as the authors
    # pre-train. True: pairs sharing a concept or a text of the same words are positives of each other (and
    # never ITM negatives): repeated labels ("person") are otherwise false and mislabelled ITM negatives.
    equal_texts_positive: bool = False
    init_std: float = 0.02  # BERT's and timm's, for width 768; a narrow model from scratch: ~1/sqrt(width)
    # Special token ids: BERT's. The synthetic world's vocab.txt keeps them at the same ids.
    pad_token_id: int = 0
    cls_token_id: int = 101
    sep_token_id: int = 102
    mask_token_id: int = 103
    # The authors' released checkpoints (beyond the paper): their conventions, and their Swin instead of the
    # ViT (SwinConfig, the last section; regions pooled, no mixed attention; patch_size its final cell).
    text_sep: bool = True  # texts end in [SEP]; theirs are [CLS] + pieces (VQA answers keep their [SEP])
    rank_first_twice: bool = False  # rank_answers as their rank_answer: log p(first answer piece) counted twice
    swin: "SwinConfig" = None  # None: the paper's ViT

    def __post_init__(self):
        if isinstance(self.swin, dict):  # from a stored config
            self.swin = SwinConfig(**self.swin)
        checks = [
            (self.swin is None or not self.output_positions, "output_positions is for the ViT; Swin has no position table"),
            (self.image_res % self.patch_size == 0, f"image_res={self.image_res} is not a multiple of patch_size={self.patch_size}"),
            (0 <= self.local_layers <= self.vision_layers, f"local_layers={self.local_layers} must lie in [0, vision_layers={self.vision_layers}]"),
            (self.vision_width % self.vision_heads == 0, f"vision_width={self.vision_width} is not divisible by vision_heads={self.vision_heads}"),
            (self.text_width % self.text_heads == 0, f"text_width={self.text_width} is not divisible by text_heads={self.text_heads}"),
            (3 <= self.max_tokens <= self.max_positions, f"max_tokens={self.max_tokens} must lie in [3, max_positions={self.max_positions}]: [CLS], a token, [SEP]"),
            (0.0 < self.mask_prob < 1.0 and self.max_masks >= 1, "mask_prob must lie in (0, 1) and max_masks be >= 1"),
            (0.0 <= self.mask_span_prob <= 1.0 and self.mask_span_max >= 2, "mask_span_prob must lie in [0, 1] and mask_span_max be >= 2"),
            (0.0 < self.temp <= 0.5, f"temp={self.temp} must lie in (0, 0.5]"),
            (max(self.pad_token_id, self.cls_token_id, self.sep_token_id, self.mask_token_id) < self.vocab_size,
             f"vocab_size={self.vocab_size} must exceed every special token id"),
        ] + [(False, message) for message in (self.swin.problems(self) if self.swin else [])]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"XVLMConfig: {message}")

    @property
    def grid(self):
        return self.image_res // self.patch_size

    @classmethod
    def tiny(cls, **overrides):
        """A CPU-sized X-VLM for tests and the synthetic demo: 64px images on an 8x8 patch grid."""
        small = dict(image_res=64, patch_size=8, vision_width=96, vision_layers=4, vision_heads=4,
                     local_layers=2, text_width=96, text_heads=4, text_layers=2, fusion_layers=2,
                     text_mlp_dim=384, max_positions=64, dropout=0.0, embed_dim=64, init_std=0.1,
                     equal_texts_positive=True,  # the synthetic world repeats each object text in most batches
                     output_positions=True)  # the box loss needs it (docs/bbox-plateau); train.py's tiny lr is tuned with it
        return cls(**{**small, **overrides})

    def to_dict(self):
        return asdict(self)


# -----------------------------------------------------------------------------
# Building blocks


class Attention(nn.Module):
    """Multi-head attention: ViT and text self-attention, and cross-attention from text to image.

    Self-attention (kv_dim=None) projects q, k, v with one fused matrix, as timm's ViT does. Cross-attention
    projects queries from x and keys/values (fused) from `context`, whose width may differ. With
    `context_index` (B,), row b attends to context[context_index[b]]: keys and values are projected once per
    context row, not per query row, so pairing many texts with few visual concepts is cheap. `mask`: bool,
    True = may attend, broadcastable to (B, heads, Lq, Lk), or a float bias (Swin's relative positions; its
    windows give x more leading dimensions, (B, windows, L, D), and the mask (B, windows, heads, Lq, Lk))."""

    def __init__(self, dim, heads, kv_dim=None, dropout=0.0):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        if kv_dim is None:
            self.qkv = nn.Linear(dim, 3 * dim)
        else:
            self.q = nn.Linear(dim, dim)
            self.kv = nn.Linear(kv_dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, mask=None, context=None, context_index=None):
        D = x.shape[-1]
        if context is None:
            q, k, v = self.qkv(x).split(D, dim=-1)
        else:
            kv = self.kv(context)
            q, (k, v) = self.q(x), (kv if context_index is None else kv[context_index]).split(D, dim=-1)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(-3, -2) for t in (q, k, v))  # (B, heads, L, hd)
        return self.proj(self.attend(q, k, v, mask).transpose(-3, -2).flatten(-2))  # (B, Lq, D)

    def attend(self, q, k, v, mask):
        """softmax(QK^T / sqrt(d) + M) V, fused. The one place attention probabilities exist:
        tasks.gradcam replaces it on one layer with the literal form, which keeps them."""
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)


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

    Region j's positions {[CLS], p_1..p_M} attend only among themselves. Eq. (1) leaves the rows of out-of-box
    positions fully masked, whose softmax NaNs would leak through V: they attend to themselves (never used)."""
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
    return x[box_index[:, None], index], F.pad(real, (1, 0), value=True)  # (R, 1+M, D), (R, 1+M)


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
        self.checkpointing, self.output_positions = cfg.grad_checkpointing, cfg.output_positions
        self.patch_embed = nn.Conv2d(3, cfg.vision_width, cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.vision_width))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid ** 2, cfg.vision_width))
        rates = [cfg.drop_path * i / max(cfg.vision_layers - 1, 1) for i in range(cfg.vision_layers)]
        self.blocks = nn.ModuleList(VisionBlock(cfg, r) for r in rates)
        self.norm = nn.LayerNorm(cfg.vision_width, eps=1e-6)

    def init_from_scratch(self):
        """After XVLM's init, start as MAE's ViT: position embeddings learned (as DeiT's, whose weights replace
        all this) but started from 2-D sin-cos, the patch projection initialised as a linear layer. The model
        then knows where each patch is from the first step, which the bbox loss needs."""
        with torch.no_grad():
            self.pos_embed.copy_(sincos_pos_embed(self.pos_embed.shape[-1], self.grid))
        patch = self.patch_embed.weight
        nn.init.xavier_uniform_(patch.view(patch.shape[0], -1))
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def embed(self, images):
        x = self.patch_embed(images).flatten(2).transpose(1, 2)  # (B, N, D)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        return torch.cat([cls, x], dim=1) + self.pos_embed  # (B, 1+N, D)

    def finish(self, x, where=None):
        """The final LayerNorm; with output_positions, the positions `where` (default: the whole
        table, for (B, 1+N, D) tokens) added again."""
        x = self.norm(x)
        return x + (self.pos_embed if where is None else where) if self.output_positions else x

    def forward(self, images):
        """images (B, 3, H, W) -> image tokens (B, 1+N, D), full attention throughout."""
        x = self.embed(images)
        for block in self.blocks:
            x = run_layer(block, self.checkpointing, x)
        return self.finish(x)

    def forward_mixed(self, images, patch_mask, box_index):
        """The mixed layers' fast path for R regions: patch_mask (R, N), box_index (R,) their images.
        Returns image tokens (B, 1+N, D), region tokens (R, 1+M, D) and their mask (R, 1+M)."""
        x = self.embed(images)
        for block in self.blocks[:self.first_local]:
            x = run_layer(block, self.checkpointing, x)
        width = x.shape[-1]  # with output_positions, each token's position embedding rides in the same gather
        packed, mask = gather_regions(torch.cat([x, self.pos_embed.expand_as(x)], -1) if self.output_positions else x,
                                      patch_mask, box_index)
        regions, where = packed[..., :width], packed[..., width:] if self.output_positions else None
        for block in self.blocks[self.first_local:]:
            x = run_layer(block, self.checkpointing, x)  # the full-attention copy
            regions = run_layer(block, self.checkpointing, regions, key_mask(mask))  # local: [CLS] + the box
        return self.finish(x), self.finish(regions, where), mask

    forward_concepts = forward_mixed  # what XVLM.encode_concepts calls (the released models' Swin pools instead)

    def forward_literal(self, images, patch_mask, box_index):
        """Reference for forward_mixed, eq. (1) as written (and as the authors' ViT runs it): a full (1+N)-token
        copy per region under the mixed_attention_mask. Returns image tokens (B, 1+N, D), region copies
        (R, 1+N, D) and which of their positions are in the region."""
        x = self.embed(images)
        for block in self.blocks[:self.first_local]:
            x = block(x)
        regions = x[box_index]  # (R, 1+N, D)
        mask = mixed_attention_mask(patch_mask)[:, None]  # (R, 1, 1+N, 1+N)
        for block in self.blocks[self.first_local:]:
            x = block(x)
            regions = block(regions, mask)
        return self.finish(x), self.finish(regions), F.pad(patch_mask, (1, 0), value=True)


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

    def forward(self, x, mask, context=None, context_mask=None, context_index=None):
        x = self.attn_norm(x + self.drop(self.attn(x, mask)))
        if context is not None:
            x = self.cross_norm(x + self.drop(self.cross_attn(x, context_mask, context, context_index)))
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

    def forward(self, text_embeds, text_mask, image_embeds, image_mask=None, image_index=None):
        x, mask = text_embeds, key_mask(text_mask.bool())
        if image_mask is not None and image_index is not None:
            image_mask = image_mask[image_index]
        image_mask = key_mask(image_mask)
        for layer in self.layers:
            x = run_layer(layer, self.checkpointing, x, mask, image_embeds, image_mask, image_index)
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


def box_iou(a, b, eps=1e-7):
    """IoU and the area of the smallest box holding both, of boxes a[i] and b[i], both (n, 4)
    cxcywh -> ((n,), (n,)). Denominators are clamped at eps, so degenerate boxes stay finite."""
    a, b = box_corners(a), box_corners(b)
    area = lambda c: (c[:, 2:] - c[:, :2]).clamp(min=0).prod(-1)
    inter = (torch.minimum(a[:, 2:], b[:, 2:]) - torch.maximum(a[:, :2], b[:, :2])).clamp(min=0).prod(-1)
    union = area(a) + area(b) - inter
    hull = (torch.maximum(a[:, 2:], b[:, 2:]) - torch.minimum(a[:, :2], b[:, :2])).clamp(min=0).prod(-1)
    return inter / union.clamp(min=eps), union, hull


def giou(a, b, eps=1e-7):
    """Generalised IoU (Rezatofighi et al. 2019) of boxes a[i] and b[i], (n, 4) cxcywh -> (n,),
    finite in value and gradient for degenerate (zero-area) boxes, exact for every other box."""
    iou, union, hull = box_iou(a, b, eps)
    return iou - (hull - union) / hull.clamp(min=eps)


def bbox_terms(pred, target):
    """Eq. (3)'s two terms, each averaged over the boxes (n, 4) cxcywh: {"giou": 1 - GIoU, "l1": the
    L1 distance summed over the 4 coordinates}."""
    return {"giou": (1.0 - giou(pred, target)).mean(), "l1": (pred - target).abs().sum(-1).mean()}


def bbox_loss(pred, target):
    """Eq. (3): (1 - GIoU) + L1, averaged over boxes. (n, 4) cxcywh."""
    if pred.shape[0] == 0:
        return pred.sum() * 0.0  # no region texts: zero, but still in the graph (DDP needs it)
    return sum(bbox_terms(pred, target).values())


def same_id(a, b):
    """(n, k), (m, k) ids -> (n, m) bool: rows that share an id in any of the k columns."""
    return (a[:, None, :] == b[None, :, :]).any(-1)


def world():
    """(rank, world size); (0, 1) outside torch.distributed."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)


def all_sizes(n, device):
    """The first-dimension size of every rank's tensor."""
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world()[1])]
    dist.all_gather(sizes, torch.tensor([n], device=device))
    return [int(s) for s in sizes]


def all_gather(x, sizes):
    """Concatenate every rank's x along dim 0; sizes may differ (padded for the collective)."""
    padded = F.pad(x, (0, 0) * (x.dim() - 1) + (0, max(sizes) - x.shape[0])).contiguous()
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


class GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward gives each rank the sum over ranks of its rows' gradient: every rank's loss
    reads every rank's features. (The authors' AllGather returns only this rank's own part: 1/world_size of it.)"""

    @staticmethod
    def forward(ctx, x):
        sizes = all_sizes(x.shape[0], x.device)
        ctx.start, ctx.n = sum(sizes[:world()[0]]), x.shape[0]
        return all_gather(x, sizes)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.start:ctx.start + ctx.n]


def gather_with_grad(x):
    """All-gather along dim 0 keeping gradients; the identity at world size 1."""
    return x if world()[1] == 1 else GatherWithGrad.apply(x)


def itc_loss(image_feat, text_feat, temp, ids=None):
    """Contrastive loss, eqs. (4)-(6): L2-normalised features (n, E) of n (visual concept, text)
    pairs; in-batch negatives; symmetric cross-entropy.

    ids=None: one-hot targets, each pair its own positive (eq. 6). ids (n,) or (n, k): pairs
    sharing an id (in any column) are all positives, the target uniform over them (appendix B).
    Under DDP each rank scores its rows against the global batch (features gathered with their
    gradient), scaled so that DDP's gradient averaging gives exactly the loss and gradients of one
    process holding the whole batch.
    """
    rank, size = world()
    n = image_feat.shape[0]
    sizes = all_sizes(n, image_feat.device) if size > 1 else [n]
    start, total = sum(sizes[:rank]), sum(sizes)
    ids = (torch.arange(n, device=image_feat.device) + start if ids is None else ids).view(n, -1)  # (n, k)
    all_ids = all_gather(ids, sizes) if size > 1 else ids
    positive = same_id(ids, all_ids).float()  # (n, total)
    target = positive / positive.sum(1, keepdim=True)
    i2t = -(F.log_softmax(image_feat @ gather_with_grad(text_feat).T / temp, dim=1) * target).sum(1)
    t2i = -(F.log_softmax(text_feat @ gather_with_grad(image_feat).T / temp, dim=1) * target).sum(1)
    return (i2t + t2i).sum() / 2 / total * size


def draw_negatives(sim, exclude, k=1, generator=None):
    """k indices per row drawn from softmax(sim) + 1e-5 (as the authors: a negative that softmax
    underflows to 0 can still be drawn), never an `exclude` (n, m) column, without replacement.
    Non-finite similarities (a diverged step) draw uniformly, so that the loss, not the sampler,
    reports the problem. Rows excluding every column draw from all but themselves."""
    weights = torch.nan_to_num(F.softmax(sim.float(), dim=1), nan=1.0) + 1e-5
    weights = weights.masked_fill(exclude, 0.0)
    hopeless = weights.sum(1, keepdim=True) == 0
    own = torch.eye(*sim.shape, dtype=torch.bool, device=sim.device)
    weights = torch.where(hopeless & ~own, 1.0, weights)
    return torch.multinomial(weights, k, generator=generator)  # (n, k)


def sample_hard_negatives(sim, ids=None):
    """ITM hard negatives (paper 3.3): sim (n, n) relates pair i's concept to pair j's text. For each
    concept one text drawn by following p_v2t (eq. 4), and for each text one concept by p_t2v, with
    positives (ids as in itc_loss) excluded. Returns (text index per concept, concept index per text)."""
    n = sim.shape[0]
    ids = torch.arange(n, device=sim.device) if ids is None else ids
    positive = same_id(ids.view(n, -1), ids.view(n, -1))
    return draw_negatives(sim, positive)[:, 0], draw_negatives(sim.T, positive)[:, 0]


def itm_loss(positive_logits, negative_logits):
    """Eq. (7): cross-entropy of the ITM head's (n, 2) logits on matched pairs (label 1) and on
    hard negatives (label 0)."""
    logits = torch.cat([positive_logits, negative_logits]).float()
    labels = (torch.arange(len(logits), device=logits.device) < len(positive_logits)).long()
    return F.cross_entropy(logits, labels)


def mlm_loss(logits, labels):
    """Eq. (8): cross-entropy of the predicted tokens at the masked positions, (m, vocab) and (m,)."""
    return F.cross_entropy(logits.float(), labels)


# -----------------------------------------------------------------------------
# The model


def num_params(module):
    return sum(p.numel() for p in module.parameters())


def concept_bank(image_embeds, region_embeds, region_mask):
    """Every visual concept of the batch in one padded tensor, images first, then regions, so any
    text can be fused with any concept in one batched call: (B+R, 1+N, D) and mask (B+R, 1+N)."""
    B, S, _ = image_embeds.shape
    image_mask = torch.ones(B, S, dtype=torch.bool, device=image_embeds.device)
    pad = S - region_embeds.shape[1]
    regions = F.pad(region_embeds, (0, 0, 0, pad))
    return torch.cat([image_embeds, regions]), torch.cat([image_mask, F.pad(region_mask, (0, pad), value=False)])


def box_targets(boxes, text_box):
    """The box each located text predicts (n, 4): its region's (cx, cy, w, h) for text_box >= 0, the
    whole image (0.5, 0.5, 1, 1) for an image text (the paper's footnote 2), from boxes (R, 4)."""
    whole = boxes.new_tensor([0.5, 0.5, 1.0, 1.0])
    own = boxes[text_box.clamp(min=0)] if len(boxes) else whole.expand(len(text_box), 4)
    return torch.where((text_box >= 0)[:, None], own, whole).float()


class XVLM(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.vision = VisionTransformer(cfg) if cfg.swin is None else SwinTransformer(cfg)  # Swin: the last section
        self.text = TextEncoder(cfg)
        self.fusion = FusionEncoder(cfg)
        self.vision_proj = nn.Linear(cfg.vision_width, cfg.embed_dim)
        self.text_proj = nn.Linear(cfg.text_width, cfg.embed_dim)
        self.temp = nn.Parameter(torch.tensor(cfg.temp))
        self.itm_head = mlp_head(cfg.text_width, 2)
        self.bbox_head = mlp_head(cfg.text_width, 4)
        self.mlm_head = MLMHead(cfg)
        self.apply(self.init_weights)
        self.vision.init_from_scratch()

    def init_weights(self, m):
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.Embedding)):
            nn.init.trunc_normal_(m.weight, std=self.cfg.init_std)
        if isinstance(m, (nn.Linear, nn.Conv2d)) and m.bias is not None:
            nn.init.zeros_(m.bias)

    @classmethod
    def from_checkpoint(cls, source, name=None, **overrides):
        """A model from one of our checkpoints alone (a file, or what checkpoints.read_file read from one, `name`
        naming it): its config with `overrides` (image_res=384: position embeddings resampled; swin=dict(window=12)
        a group's fields), its weights loaded strictly. The authors' released files load too (released_model)."""
        return model_from_file(cls, source, name, overrides)

    released_kinds = ("pretrain", "retrieval", "bbox")  # the authors' files it reads; a task model adds its own

    @classmethod
    def released_layout(cls, cfg, kind):
        """(our layers for their cross-modal ones, in order; key pairs of what else the file fills: a task model's)."""
        return [f"fusion.layers.{n}" for n in range(cfg.fusion_layers)], []

    def param_counts(self):
        return {"vision": num_params(self.vision), "text+fusion": num_params(self.text) + num_params(self.fusion),
                "total": num_params(self)}

    def encode_image(self, images):
        """images (B, 3, H, W) -> I-trans(V^0) = image_embeds (B, 1+N, D), full attention."""
        return self.vision(images)

    def encode_concepts(self, images, boxes, box_index):
        """Every visual concept of the images (3.2): the images with full attention (B, 1+N, D),
        and one region per box through mixed attention, region_embeds (R, 1+M, D) with region_mask
        (R, 1+M). boxes (R, 4) normalised cxcywh, box_index (R,) the image of each box. (The released
        models' Swin: one pass, each region's [CLS] the mean of its in-box tokens.)"""
        if boxes.shape[0] == 0:
            image_embeds = self.vision(images)
            return image_embeds, image_embeds[:0, :1], torch.ones(0, 1, dtype=torch.bool, device=images.device)
        return self.vision.forward_concepts(images, patch_mask(boxes, self.vision.grid), box_index)

    def encode_text(self, input_ids, attention_mask):
        """(T, L) ids and mask -> (T, L, D) text encoder output."""
        return self.text(input_ids, attention_mask)

    def fuse(self, text_embeds, text_mask, image_embeds, image_mask=None, image_index=None):
        """Cross-modal encoder: text (T, L, D) attends to visual tokens (T, S, Dv) -> (T, L, D).
        With image_index (T,), text t attends to image_embeds[image_index[t]] of (C, S, Dv)."""
        return self.fusion(text_embeds, text_mask, image_embeds, image_mask, image_index)

    def image_features(self, image_embeds):
        return F.normalize(self.vision_proj(image_embeds[:, 0]), dim=-1)  # g_v(v_cls)

    def text_features(self, text_embeds):
        return F.normalize(self.text_proj(text_embeds[:, 0]), dim=-1)  # g_w(w_cls)

    @property
    def temperature(self):
        return self.temp.clamp(0.001, 0.5)  # tau, learned (eqs. 4-5)

    def predict_boxes(self, image_embeds, text_embeds, text_mask, image_index=None):
        """Eq. (2) for texts (T, L, D) and the full-attention images they refer to: (T, 4) cxcywh."""
        return self.box_head(self.fuse(text_embeds, text_mask, image_embeds, image_index=image_index))

    def box_head(self, fused):
        """Eq. (2): b_hat = sigmoid(MLP(x_cls)) on the fused texts (T, L, D) -> (T, 4) normalised cxcywh."""
        return self.bbox_head(fused[:, 0]).float().sigmoid()

    def contrastive_and_pairs(self, concept_feat, text_feat, ids=None):
        """L_cl (eqs. 4-6) of n (visual concept, text) pairs, and the pairs that matching (eq. 7) fuses:
        each pair, a hard negative text for each concept, a hard negative concept for each text.
        Returns (itc, texts (3n,), concepts (3n,)), indices into the n pairs, positives first."""
        itc = itc_loss(concept_feat, text_feat, self.temperature, ids)
        with torch.no_grad():
            neg_text, neg_concept = sample_hard_negatives(concept_feat @ text_feat.T / self.temperature, ids)
        every = torch.arange(len(text_feat), device=text_feat.device)
        return itc, torch.cat([every, neg_text, every]), torch.cat([every, every, neg_concept])

    def matching_loss(self, fused):
        """Eq. (7) on the fused pairs of contrastive_and_pairs (3n, L, D): n matched, then 2n not."""
        logits = self.itm_head(fused[:, 0])
        n = len(logits) // 3
        return itm_loss(logits[:n], logits[n:])

    def fuse_segments(self, bank, bank_mask, **segments):
        """One cross-modal pass over named segments, each (text_embeds (n, L, D), text_mask (n, L),
        rows (n,) of the concept bank each text attends to). Returns {name: fused (n, L, D)}."""
        embeds, masks, rows = zip(*segments.values())
        fused = self.fuse(torch.cat(embeds), torch.cat(masks), bank, bank_mask, torch.cat(rows))
        return dict(zip(segments, fused.split([len(r) for r in rows])))

    def forward(self, batch):
        """The pre-training loss, eq. (9): L = L_bbox + L_cl + L_match + L_mlm, on a batch of
        data.pretrain_loader (its docstring lists the tensors; here on the model's device).

        A region text (object or region) is paired with its region's copy of the image (mixed
        attention) for itc, itm and mlm, and with the full image for bbox, which locates its box
        (paper 3.3). Returns {"loss", "itc", "itm", "mlm", "bbox"}, 0-dim tensors; loss is the sum.
        """
        cfg = self.cfg
        text_ids, text_mask = batch["text_ids"], batch["text_mask"].bool()
        text_image, text_box, boxes = batch["text_image"], batch["text_box"], batch["boxes"]

        # Visual concepts (3.2): the images and a region copy per box, in one bank (B+R, 1+N, D).
        image_embeds, region_embeds, region_mask = self.encode_concepts(batch["images"], boxes, batch["box_image"])
        bank, bank_mask = concept_bank(image_embeds, region_embeds, region_mask)
        concept = torch.where(text_box >= 0, len(image_embeds) + text_box, text_image)  # (T,) each text's row in the bank
        ids = torch.stack([batch["concept_ids"], batch["text_keys"]], 1) if cfg.equal_texts_positive else None

        # Contrastive learning, eqs. (4)-(6), on [CLS] features; it also draws matching's hard negatives.
        text_embeds = self.encode_text(text_ids, text_mask)
        itc, pair_text, pair_concept = self.contrastive_and_pairs(self.image_features(bank)[concept],
                                                                  self.text_features(text_embeds), ids)

        # The cross-modal encoder, in one pass over three segments: the matching pairs (eq. 7), each
        # corrupted text with its concept (eq. 8), each region text with its full image (eqs. 2-3).
        located = ((text_box >= 0) | cfg.bbox_whole_image) & cfg.use_bbox_loss
        boxed = located.nonzero().squeeze(1)  # one host sync: how many texts have a box is data
        fused = self.fuse_segments(
            bank, bank_mask,
            matching=(text_embeds[pair_text], text_mask[pair_text], concept[pair_concept]),
            masked=(self.encode_text(batch["mlm_ids"], text_mask), text_mask, concept),
            located=(text_embeds[boxed], text_mask[boxed], text_image[boxed]))

        itm = self.matching_loss(fused["matching"])
        labels = batch["mlm_labels"]
        chosen = labels != -100  # only masked positions reach the vocab-sized output (a host sync)
        mlm = mlm_loss(self.mlm_head(fused["masked"][chosen], self.text.embeddings.word.weight), labels[chosen])
        bbox = (bbox_loss(self.box_head(fused["located"]), box_targets(boxes, text_box[boxed]))
                if cfg.use_bbox_loss else itc.new_zeros(()))
        return {"loss": itc + itm + mlm + bbox, "itc": itc, "itm": itm, "mlm": mlm, "bbox": bbox}


# -----------------------------------------------------------------------------
# Loaders: public weights, our checkpoints and the authors' released files into a model
#
# Every loader reads a state dict (a dict, a file, or a directory holding one; checkpoints.py reads it
# without running code), renames it to our parameter names with a declarative key table, and copies it in
# strictly: an unexpected key, a shape mismatch or a tied copy that differs raises one ValueError naming
# every such key and the file. What a complete checkpoint of that kind would fill but this one lacks comes
# back in a checkpoints.LoadReport.

def assign(model, tensors, source, origin=None, problems=(), required=()):
    """Copy `tensors` (our names) into `model`, strictly: each must be one of the model's keys, of its
    shape (a VisionTransformer's pos_embed is resampled to the model's grid), and every `required`
    key must be there; otherwise raise, naming every problem at once, before anything is copied."""
    own, origin, problems = model.state_dict(), origin or {}, list(problems)
    grids = {f"{name}.pos_embed".lstrip("."): m.grid for name, m in model.named_modules() if isinstance(m, VisionTransformer)}
    tensors = {k: checkpoints.resample_pos_embed(v, grids[k]) if k in grids and v.dim() == 3 and v.shape[1] != own[k].shape[1] else v
               for k, v in tensors.items()}
    unexpected = [k for k in tensors if k not in own]
    if unexpected:
        problems.append(f"not in the model: {checkpoints.listed(unexpected)}")
    mismatched = [f"{' + '.join(origin.get(k, [k]))}: {tuple(v.shape)} in the checkpoint, {tuple(own[k].shape)} in the model ({k})"
                  for k, v in tensors.items() if k in own and v.shape != own[k].shape]
    problems += mismatched[:12] + ([f"and {len(mismatched) - 12} more shape mismatches"] if len(mismatched) > 12 else [])
    absent = [k for k in required if k not in tensors]
    if absent:
        problems.append(f"missing keys: {checkpoints.listed(absent)}")
    if problems:
        raise ValueError(f"{source}: does not fit the {type(model).__name__}:\n  " + "\n  ".join(problems))
    model.load_state_dict({**own, **tensors})  # strict: exactly the model's keys


def load_table(model, state, pairs, source, kind, rename=lambda k: k, optional=()):
    """Map, check and copy a foreign state dict; report the table's keys it did not fill (but those
    under `optional` prefixes, which this kind of checkpoint need not have)."""
    tensors, origin, problems = checkpoints.map_state_dict(state, pairs, rename)
    if not tensors and not problems:
        raise ValueError(f"{source}: holds no {kind} weights ({len(state)} tensors, none of them {kind}'s)")
    assign(model, tensors, source, origin, problems)
    scope = dict.fromkeys(ours for ours, _ in pairs if ours is not None)
    missing = [k for k in scope if k not in tensors and not k.startswith(optional)]
    return checkpoints.LoadReport(source, list(tensors), missing)


def load_vit(model, source):
    """Initialise the image encoder from a DeiT / timm ViT state dict (paper 4.2: DeiT-base,
    ImageNet-1k), e.g. deit_base_patch16_224-b5f2ef4d.pth. Its 224px position embeddings are
    resampled to the model's grid; the classifier head is ignored. Returns a LoadReport; raises
    ValueError on unexpected keys, shape mismatches and checkpoints deeper than the model."""
    state, source = checkpoints.read_state_dict(source)
    if "dist_token" in state:
        raise ValueError(f"{source}: a distilled DeiT (dist_token): two prefix tokens where X-VLM's ViT has one; "
                         f"use the plain DeiT, e.g. deit_base_patch16_224")
    blocks, layers = checkpoints.depth(state, r"blocks\.(\d+)\."), model.cfg.vision_layers
    if blocks > layers:
        raise ValueError(f"{source}: {blocks} ViT blocks, the model has {layers}; refusing to drop blocks {layers}-{blocks - 1}")
    return load_table(model, state, checkpoints.vit_key_pairs(model.cfg), source, "ViT")


def load_bert(model, source):
    """Initialise the text and cross-modal encoders from a Hugging Face BertModel / BertForMaskedLM /
    BertForPreTraining state dict, with or without the "bert." prefix (paper 4.2: bert-base-uncased).

    BERT layer i goes to text layer i for i < text_layers, and to fusion layer i - text_layers above
    (12 layers: 0-5 text, 6-11 fusion self-attention and FFN; cross-attention is new). A shallower
    checkpoint (6-layer MiniLM) fills what it has and reports the rest missing; a deeper one than the
    model is refused. The MLM head loads when the checkpoint has one (a BertModel has none, and it is
    then not reported missing). Returns a LoadReport; raises ValueError as load_vit does."""
    state, source = checkpoints.read_state_dict(source)
    cfg = model.cfg
    layers, ours = checkpoints.depth(state, r"(?:bert\.)?encoder\.layer\.(\d+)\."), cfg.text_layers + cfg.fusion_layers
    if layers > ours:
        raise ValueError(f"{source}: {layers} BERT layers, the model has {cfg.text_layers} text + {cfg.fusion_layers} "
                         f"fusion layers; refusing to drop layers {ours}-{layers - 1}")
    has_head = any(checkpoints.hf_bert_name(k).startswith("cls.predictions.") for k in state)
    return load_table(model, state, checkpoints.bert_key_pairs(cfg), source, "BERT", checkpoints.hf_bert_name,
                      optional=() if has_head else ("mlm_head.",))


def load_checkpoint(model, source, prefix="", allow_missing=(), name=None):
    """Load the weights of one of our checkpoints (a file, or a state dict of ours) into `model`,
    strictly. A checkpoint made at another image_res is resampled to the model's grid (256 -> 384 to
    fine-tune). For a downstream model wrapping an XVLM, `prefix` is where it sits ("xvlm.") and
    `allow_missing` names the prefixes of new modules (a task model's) that the checkpoint lacks: they
    come back in the report's `missing`. Any other missing or unexpected key, or a shape mismatch,
    raises ValueError naming the file (or `name`, for a state dict read from one)."""
    state, source = checkpoints.read_state_dict(source)
    return load_state(model, {prefix + k: v for k, v in state.items()}, name or source, allow_missing)


def load_state(model, state, source, allow_missing=()):
    """load_checkpoint for a state dict already read (from the file `source`), its keys as the model's."""
    allow = (allow_missing,) if isinstance(allow_missing, str) else tuple(allow_missing)
    own = model.state_dict()
    assign(model, state, source, required=[k for k in own if not k.startswith(allow)])
    return checkpoints.LoadReport(source, list(state), [k for k in own if k not in state])


def model_from_file(cls, source, name, overrides):
    """XVLM.from_checkpoint: `cls` built from the file's stored config (or a released file's) and filled."""
    checkpoint, source = checkpoints.read_file(source)
    source = name or source
    if checkpoints.is_released(checkpoint):
        return released_model(cls, checkpoint, source, **overrides)
    stored = checkpoints.stored_config(checkpoint)
    if stored is None:
        raise ValueError(f"{source}: not an X-VLM checkpoint (no config): build XVLM(cfg), then load_checkpoint")
    model = cls(config_from(merged(stored, overrides), source))
    load_state(model, checkpoints.state_dict_of(checkpoint, source), source)
    return model


def config_from(values, source="config"):
    """An XVLMConfig from a stored dict (checkpoints.stored_config's), refusing fields it does not have."""
    unknown = set(values) - {f.name for f in fields(XVLMConfig)}
    if unknown:
        raise ValueError(f"{source}: config fields this XVLMConfig does not have: {checkpoints.listed(sorted(unknown))}")
    return XVLMConfig(**values)


def merged(values, overrides):
    """Config values with overrides; a group (swin) is overridden field by field."""
    group = lambda k, v: {**values[k], **v} if isinstance(v, dict) and isinstance(values.get(k), dict) else v
    return {**values, **{k: group(k, v) for k, v in overrides.items()}}


def released_model(cls, checkpoint, source, **overrides):
    """A `cls` (XVLM, or a task model) from one of the authors' files: the config from the tensors' shapes
    (checkpoints.released_config), with `overrides` (image_res=384, swin=dict(window=12) to fine-tune a
    pre-trained file as theirs), the weights by the class's released_layout through load_released;
    model.load_report says what the file did not fill."""
    state = checkpoints.state_dict_of(checkpoint, source)
    kind = checkpoints.released_kind(state, source)
    if kind not in cls.released_kinds:
        readers = [c for c in subclasses(XVLM) if kind in c.released_kinds]
        reader = f"{readers[0].__module__}.{readers[0].__name__}" if readers else "the task model that reads it"
        raise ValueError(f"{source}: the authors' {kind} checkpoint: load it with {reader}.from_checkpoint")
    config = checkpoint.get("config") if isinstance(checkpoint.get("config"), dict) else {}
    cfg = XVLMConfig(**merged(checkpoints.released_config(state, config, kind, source), overrides))
    fusion, extra = cls.released_layout(cfg, kind)
    model = cls(cfg)
    model.load_report = load_released(model, state, source, checkpoints.released_key_pairs(cfg, kind, fusion, extra))
    return model


def subclasses(cls):
    """Every subclass of cls defined so far, depth first."""
    return [s for c in cls.__subclasses__() for s in (c, *subclasses(c))]


def load_released(model, state, source, pairs):
    """Load one of the authors' state dicts into `model` by its key pairs, strictly: every tensor they name
    must be there, of the model's shape (bias tables of another window are resized, as theirs when
    fine-tuning at 384 px), and nothing else may be; buffers (relative_position_index, attn_mask,
    position_ids) are dropped. Returns a LoadReport whose `missing` are the model's modules this kind has
    not (the heads of other tasks), left at their init."""
    tensors, origin, problems = checkpoints.map_state_dict(state, pairs, checkpoints.released_name)
    own = model.state_dict()
    for k, v in tensors.items():
        if k.endswith(".bias_table") and k in own and v.shape[0] != own[k].shape[0] and v.shape[1] == own[k].shape[1]:
            tensors[k] = checkpoints.resize_bias_table(v, (math.isqrt(own[k].shape[0]) + 1) // 2)
    assign(model, tensors, source, origin, problems, required=[ours for ours, _ in pairs if ours is not None])
    return checkpoints.LoadReport(source, list(tensors), [k for k in own if k not in tensors])


# -----------------------------------------------------------------------------
# The authors' released models (beyond the paper): Swin-B
#
# The checkpoints the authors released (X-VLM 4M and 16M, and fine-tuned on retrieval, VQA, NLVR2 and
# RefCOCO+) encode images with Swin-B (Liu et al. 2021), not the paper's ViT, and their visual concepts are
# pooled, not mixed attention: Swin runs once over the image, a region's [CLS] is the mean of the final-grid
# tokens inside its box (patch_mask on Swin's 32 px cells), and the cross-modal encoder attends to that [CLS]
# and those tokens. This section is that Swin, written from the paper and their configs; it answers the
# ViT's interface (forward, forward_concepts, grid), so XVLM never asks which encoder it holds. Their files'
# key tables are checkpoints.py's.

@dataclass
class SwinConfig:
    """The released models' Swin-B, as their configs/config_swinB_224.json and _384.json; XVLMConfig.swin
    holds it. XVLMConfig's image_res, patch_size (Swin's final cell, 32 px) and vision_width (its last
    stage's width, embed_dim * 2**(stages - 1)) describe it as they describe the ViT."""
    embed_dim: int = 128  # the first stage's width
    depths: tuple = (2, 2, 18, 2)  # blocks per stage
    heads: tuple = (4, 8, 16, 32)
    window: int = 7  # their configs: 7 at 224 px, 12 at 384

    def __post_init__(self):
        self.depths, self.heads = tuple(self.depths), tuple(self.heads)  # lists, from a stored config

    def stages(self, cfg):
        """(grid side, width, heads, window) of each stage: the grid halves and the width doubles from one
        stage to the next; a stage no larger than a window attends over its whole grid (and never shifts)."""
        patch = cfg.patch_size // 2 ** (len(self.depths) - 1)  # 4: 32 px cells after three merges
        sides = [cfg.image_res // patch // 2 ** s for s in range(len(self.depths))]
        return [(side, self.embed_dim * 2 ** s, heads, min(self.window, side))
                for s, (side, heads) in enumerate(zip(sides, self.heads))]

    def problems(self, cfg):
        """Why an XVLMConfig with this Swin cannot be built, as messages (XVLMConfig raises the first)."""
        n = len(self.depths)
        if n == 0 or len(self.heads) != n:
            return [f"swin depths={self.depths} and heads={self.heads} must give each stage a depth and heads"]
        if cfg.patch_size % 2 ** (n - 1) or self.window < 1:
            return [f"patch_size={cfg.patch_size} (Swin's final cell) must be a multiple of 2**(stages - 1) = {2 ** (n - 1)}, "
                    f"and swin window={self.window} positive"]
        problems = [] if cfg.vision_width == self.embed_dim * 2 ** (n - 1) else [
            f"vision_width={cfg.vision_width} must be Swin's last width, embed_dim * 2**(stages - 1) = {self.embed_dim * 2 ** (n - 1)}"]
        for s, (side, width, heads, window) in enumerate(self.stages(cfg)):
            if width % heads:
                problems.append(f"Swin stage {s}: width {width} is not divisible by {heads} heads")
            if side % window:
                problems.append(f"Swin stage {s}: its {side}x{side} grid does not split into {window}x{window} windows")
        return problems


def relative_position_index(window):
    """Which row of a relative-position-bias table ((2w-1)^2 rows, one per offset) each pair of tokens in a
    w x w window reads: (w*w, w*w) long, row (dy + w - 1) * (2w - 1) + dx + w - 1 for query minus key = (dy, dx)."""
    rows, cols = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    y, x = rows.flatten(), cols.flatten()
    return (y[:, None] - y[None, :] + window - 1) * (2 * window - 1) + (x[:, None] - x[None, :] + window - 1)


def window_partition(x, window):
    """(B, side, side, C) -> (B, windows, w*w, C): w x w windows in raster order, their tokens in raster order."""
    B, H, W, C = x.shape
    return x.view(B, H // window, window, W // window, window, C).transpose(2, 3).reshape(B, -1, window * window, C)


def window_merge(windows, side):
    """window_partition's inverse: (B, windows, w*w, C) -> (B, side, side, C)."""
    B, _, N, C = windows.shape
    w = math.isqrt(N)
    return windows.view(B, side // w, side // w, w, w, C).transpose(2, 3).reshape(B, side, side, C)


def shifted_window_mask(side, window, shift):
    """Who may attend to whom in each window once the grid is rolled up and left by `shift`: (windows, w*w,
    w*w) bool. The roll wraps the last rows and columns round to the first; the windows on those borders then
    hold tokens from opposite edges of the image, which attend only to tokens from their own edge."""
    at = torch.arange(side)
    band = (at >= side - window).long() + (at >= side - shift).long()  # 0, 1, 2 along each axis
    area = window_partition((band[:, None] * 3 + band[None, :])[None, :, :, None], window)[0, :, :, 0]  # (windows, w*w)
    return area[:, :, None] == area[:, None, :]


class SwinBlock(nn.Module):
    """A Swin block: attention within w x w windows of the token grid, plus a learned bias per head and
    relative position; with `shift`, the grid is first rolled by half a window, so that windows straddle
    the previous block's borders. Pre-LayerNorm (eps 1e-5, torch's default, as theirs), MLP, residuals."""

    def __init__(self, width, heads, side, window, shift, drop_path):
        super().__init__()
        self.side, self.window, self.shift, self.drop_path = side, window, shift, drop_path
        self.norm1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))  # one row per (dy, dx)
        nn.init.trunc_normal_(self.bias_table, std=0.02)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = Mlp(width, 4 * width)
        # Recomputed, never loaded: the authors' files carry both (relative_position_index, attn_mask).
        self.register_buffer("bias_index", relative_position_index(window), persistent=False)
        self.register_buffer("shift_mask", shifted_window_mask(side, window, shift) if shift else None, persistent=False)

    def forward(self, x):
        """x (B, side*side, C) -> (B, side*side, C)."""
        B, L, C = x.shape
        h = self.norm1(x).view(B, self.side, self.side, C)
        if self.shift:
            h = torch.roll(h, (-self.shift, -self.shift), dims=(1, 2))
        bias = self.bias_table[self.bias_index].permute(2, 0, 1)  # (heads, w*w, w*w)
        if self.shift:
            bias = bias.masked_fill(~self.shift_mask[:, None], float("-inf"))  # (windows, heads, w*w, w*w)
        h = window_merge(self.attn(window_partition(h, self.window), bias), self.side)  # windows: (B, windows, w*w, C)
        if self.shift:
            h = torch.roll(h, (self.shift, self.shift), dims=(1, 2))
        x = x + drop_path(h.reshape(B, L, C), self.drop_path, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)


class PatchMerging(nn.Module):
    """Between stages: each 2x2 group of tokens concatenated (4C channels, in the order of theirs: (row, col)
    = (0, 0), (1, 0), (0, 1), (1, 1)), normalised and projected to 2C: half the grid, twice the width."""

    def __init__(self, width):
        super().__init__()
        self.norm = nn.LayerNorm(4 * width)
        self.proj = nn.Linear(4 * width, 2 * width, bias=False)

    def forward(self, x, side):
        B, _, C = x.shape
        x = x.view(B, side // 2, 2, side // 2, 2, C).permute(0, 1, 3, 4, 2, 5)  # (B, rows, cols, dcol, drow, C)
        return self.proj(self.norm(x.reshape(B, (side // 2) ** 2, 4 * C)))


class SwinStage(nn.Module):
    def __init__(self, cfg, side, width, heads, window, rates, last):
        super().__init__()
        self.side, self.checkpointing = side, cfg.grad_checkpointing
        # every second block shifts, unless the grid is a single window
        self.blocks = nn.ModuleList(SwinBlock(width, heads, side, window, window // 2 if b % 2 and side > window else 0, r)
                                    for b, r in enumerate(rates))
        self.merge = None if last else PatchMerging(width)

    def forward(self, x):
        for block in self.blocks:
            x = run_layer(block, self.checkpointing, x)
        return x if self.merge is None else self.merge(x, self.side)


class SwinTransformer(nn.Module):
    """The released models' image encoder: 4x4 patches, stages of window-attention blocks with patch merging
    between them, a final LayerNorm; outputs (B, 1+N, D) on the last stage's grid (N = grid^2), the mean of
    the tokens first as [CLS], as the authors' Swin. Stochastic depth grows linearly over all blocks."""

    def __init__(self, cfg):
        super().__init__()
        swin = cfg.swin
        stages, patch = swin.stages(cfg), cfg.patch_size // 2 ** (len(swin.depths) - 1)
        self.grid = cfg.grid
        self.patch_embed = nn.Conv2d(3, swin.embed_dim, patch, stride=patch)
        self.patch_norm = nn.LayerNorm(swin.embed_dim)
        n = sum(swin.depths)
        rates = [cfg.drop_path * i / max(n - 1, 1) for i in range(n)]
        ends = [sum(swin.depths[:s + 1]) for s in range(len(stages))]
        self.stages = nn.ModuleList(SwinStage(cfg, *stage, rates[end - depth:end], s == len(stages) - 1)
                                    for s, (stage, depth, end) in enumerate(zip(stages, swin.depths, ends)))
        self.norm = nn.LayerNorm(cfg.vision_width)

    def init_from_scratch(self):
        """After XVLM's init (normal, std init_std, for the linear layers): nothing to add. Swin keeps that
        init, timm's, as theirs; it exists to run their released weights."""

    def forward(self, images):
        """images (B, 3, H, W) -> image tokens (B, 1+N, D): [CLS] (the mean) and the final grid."""
        x = self.patch_norm(self.patch_embed(images).flatten(2).transpose(1, 2))  # (B, (H/4)^2, C)
        for stage in self.stages:
            x = stage(x)
        x = self.norm(x)
        return torch.cat([x.mean(1, keepdim=True), x], dim=1)

    def forward_concepts(self, images, patch_mask, box_index):
        """The released models' visual concepts: image tokens (B, 1+N, D), and for R boxes, patch_mask (R, N)
        and box_index (R,), region tokens (R, 1+M, D), each region's [CLS] the mean of its M in-box tokens,
        with their mask (R, 1+M): the layout of VisionTransformer.forward_mixed, from one pass of Swin."""
        x = self(images)
        regions, mask = gather_regions(x, patch_mask, box_index)
        inside = mask[:, 1:, None].to(x.dtype)
        pooled = (regions[:, 1:] * inside).sum(1) / inside.sum(1)  # (R, D)
        return x, torch.cat([pooled[:, None], regions[:, 1:]], dim=1), mask


if __name__ == "__main__":
    counts = XVLM(XVLMConfig()).param_counts()
    print(f"X-VLM-base: {counts['vision'] / 1e6:.1f}M vision, {counts['text+fusion'] / 1e6:.1f}M text+fusion, "
          f"{counts['total'] / 1e6:.1f}M parameters in all")
