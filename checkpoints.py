"""
Every foreign file format X-VLM reads, and nothing that is a model: no nn.Module lives here.

Reading files without running code (torch.load(weights_only=True), safetensors; a pickle that would
import anything else is refused, naming what it imports); the declarative key tables of DeiT / timm
ViT, Hugging Face BERT and the authors' released files, their expansion into (ours, theirs) pairs
and the strict mapping of a foreign state dict to our names; position-embedding and Swin bias-table
resizing; and a released file's kind and config read from its tensors' shapes. xvlm.py's loaders
(load_vit, load_bert, load_checkpoint, XVLM.from_checkpoint) put what these return into a model.

    import checkpoints
    checkpoint, name = checkpoints.read_file("runs/pretrain/checkpoint.pt")   # read once, no code run
    state = checkpoints.state_dict_of(checkpoint, name)
    pairs = checkpoints.vit_key_pairs(xvlm.XVLMConfig())   # [("vision.cls_token", ("cls_token",)), ...]
"""

import math
import pickle
import pickletools
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch
import torch.nn.functional as F


# -----------------------------------------------------------------------------
# Reading files: tensors only, never code
#
# Files never run code: torch.load(weights_only=True) or safetensors; a pickle that would import anything
# but torch's tensors and plain containers is refused, naming what it would import.

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".th")
PREFERRED_FILES = ("model.safetensors", "pytorch_model.bin")  # Hugging Face's, when a directory holds several


def listed(keys, most=12):
    """The first `most` keys, comma-separated, and how many more there are: for messages."""
    keys = list(keys)
    return ", ".join(keys[:most]) + (f" and {len(keys) - most} more" if len(keys) > most else "")


def weights_file(path):
    """The file `path` names: itself, or the weights file in a directory."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path}: no such file or directory")
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
        try:
            return safetensors.torch.load_file(path), str(path)
        except Exception as e:  # noqa: BLE001 -- safetensors raises its own error types
            raise ValueError(f"{path}: not a readable .safetensors file ({e})") from e
    try:
        return torch.load(path, map_location="cpu", weights_only=True), str(path)
    except pickle.UnpicklingError as e:
        # Anything but tensors and plain containers could run code when unpickled: name what it imports.
        named = re.findall(r"Unsupported global: GLOBAL ([\w.]+)", str(e)) or foreign_globals(path)
        if named:
            raise ValueError(f"{path}: refused: unpickling it would import {', '.join(named[:3])}, which can run code; "
                             f"save the weights as .safetensors or as a plain state dict") from e
        raise ValueError(f"{path}: not a PyTorch checkpoint (the weights-only unpickler cannot read it)") from e
    except (RuntimeError, EOFError, OSError) as e:
        raise ValueError(f"{path}: cannot be read as a PyTorch checkpoint, truncated or corrupt? ({str(e).splitlines()[0]})") from e


def foreign_globals(path):
    """The module.name globals other than torch's that a pickle (or a torch zip archive's data.pkl)
    would import, read from its opcodes without unpickling; [] when it is not a pickle at all."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                raw = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
        else:
            raw = Path(path).read_bytes()
        found, strings = [], []
        for op, arg, _ in pickletools.genops(raw):
            if op.name == "GLOBAL":
                found.append(arg.replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                found.append(f"{strings[-2]}.{strings[-1]}")
            if isinstance(arg, str):
                strings.append(arg)
    except Exception:  # noqa: BLE001 -- not a readable pickle: nothing to name
        return []
    return [g for g in dict.fromkeys(found) if not g.startswith(("torch.", "collections.OrderedDict"))]


def state_dict_of(obj, name):
    """The state dict in a file's object, unwrapping {"model": ...} as DeiT releases and our checkpoints store it."""
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict):
        raise ValueError(f"{name}: holds a {type(obj).__name__}, not a state dict")
    not_tensors = [str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor) or not isinstance(k, str)]
    if not_tensors:
        raise ValueError(f"{name}: not a state dict of named tensors: {listed(not_tensors)}")
    return obj


def read_state_dict(source):
    """(state dict, name) from a dict, a file (.safetensors .bin .pt .pth .th) or a directory."""
    obj, name = read_file(source)
    return state_dict_of(obj, name), name


# Our checkpoints before the Swin's settings were grouped (XVLMConfig.swin) stored them flat.
FLAT_SWIN_FIELDS = {"swin_embed_dim": "embed_dim", "swin_depths": "depths", "swin_heads": "heads", "swin_window": "window"}


def stored_config(checkpoint):
    """The config dict in one of our checkpoints (as read_file returns it), or None for weights alone
    (.safetensors, a plain state dict). A config of the flat layout (image_encoder, swin_*) comes back
    as XVLMConfig now spells it; XVLMConfig.from_dict refuses fields it does not have."""
    stored = checkpoint.get("config") if isinstance(checkpoint, dict) else None
    if not isinstance(stored, dict):
        return None
    stored = dict(stored)
    flat = {ours: stored.pop(old) for old, ours in FLAT_SWIN_FIELDS.items() if old in stored}
    if stored.pop("image_encoder", "vit") == "swin":
        stored["swin"] = flat
    return stored


# -----------------------------------------------------------------------------
# Key tables: DeiT / timm ViT and Hugging Face BERT, expanded into (ours, theirs) pairs and mapped strictly
#
# A table row is (our name, their name or names) with {p} for weight and bias and {i} for a layer; ours None:
# a key of theirs known and deliberately not used. map_state_dict renames a state dict with the expanded
# pairs and names every unexpected key, incomplete group and differing tied copy at once.

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
    with other fields ({i}) repeat once per entry of `layers`, a dict of format values for each layer."""
    pairs = []
    for ours, theirs in table:
        theirs = theirs if isinstance(theirs, tuple) else (theirs,)
        for values in (layers if "{" in theirs[0].replace("{p}", "") else [{}]):
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
        problems.append(f"unexpected keys: {listed(unexpected)}")
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
        elif not (tensor.is_meta or torch.equal(tensors[ours], tensor)):  # a meta tensor has no values to compare
            problems.append(f"{shown[0]} differs from {origin[ours][0]}, to which it is tied ({ours})")
    return tensors, origin, problems


def depth(state, pattern):
    """How many layers a state dict holds, by a regex whose group is the layer index."""
    found = [int(m.group(1)) for k in state if (m := re.match(pattern, k))]
    return max(found) + 1 if found else 0


# -----------------------------------------------------------------------------
# Resizing: position embeddings to another grid, Swin's bias tables to another window


def resample_pos_embed(pos_embed, grid, prefix_tokens=1):
    """Position embeddings (1, prefix + n*n, D) of an n x n patch grid -> (1, prefix + grid*grid, D):
    the prefix ([CLS]) rows kept, the grid resized bicubically in float32 as the authors'
    interpolate_pos_embed (no antialiasing, unlike timm's default), the dtype restored. On the same
    grid it is the identity."""
    prefix, patches = pos_embed[:, :prefix_tokens], pos_embed[:, prefix_tokens:]
    n = math.isqrt(patches.shape[1])
    if n * n != patches.shape[1]:
        raise ValueError(f"resample_pos_embed: {patches.shape[1]} patch positions do not form a square grid")
    x = patches.float().unflatten(1, (n, n)).permute(0, 3, 1, 2)  # (1, D, n, n)
    x = F.interpolate(x, size=(grid, grid), mode="bicubic", align_corners=False)
    patches = x.permute(0, 2, 3, 1).flatten(1, 2).to(pos_embed.dtype)  # (1, grid*grid, D)
    return torch.cat([prefix, patches], dim=1)


def not_a_knot_spline(x, targets):
    """The matrix (len(targets), len(x)) that evaluates at `targets` the cubic spline through values at the
    increasing points x with not-a-knot ends (one cubic over the first two intervals, one over the last two):
    the interpolating spline FITPACK fits with s=0 on a grid, as scipy's interp2d(kind="cubic") does.
    Targets outside [x[0], x[-1]] are clamped to it, as FITPACK evaluates. float64 throughout."""
    x, n = x.double(), len(x)
    if n < 4:
        raise ValueError(f"a not-a-knot cubic spline needs 4 points or more, got {n}")
    h, eye = x[1:] - x[:-1], torch.eye(n, dtype=torch.float64)
    # Unknowns: the second derivatives M at the points, one column per unit data vector (the matrix is linear in the data).
    A, rhs = torch.zeros(n, n, dtype=torch.float64), torch.zeros(n, n, dtype=torch.float64)
    for i in range(1, n - 1):  # the first derivative is continuous at x[i]
        A[i, i - 1:i + 2] = torch.stack([h[i - 1], 2 * (h[i - 1] + h[i]), h[i]])
        rhs[i] = 6 * ((eye[i + 1] - eye[i]) / h[i] - (eye[i] - eye[i - 1]) / h[i - 1])
    A[0, :3] = torch.stack([h[1], -(h[0] + h[1]), h[0]])  # not-a-knot: the third derivative continuous at x[1]
    A[-1, -3:] = torch.stack([h[-1], -(h[-2] + h[-1]), h[-2]])  # and at x[n-2]
    M = torch.linalg.solve(A, rhs)  # (n points, n data)
    t = targets.double().clamp(x[0], x[-1])
    i = (torch.searchsorted(x, t, right=True) - 1).clamp(0, n - 2)  # each target's interval [x[i], x[i+1]]
    a, b, hi = (x[i + 1] - t)[:, None], (t - x[i])[:, None], h[i][:, None]
    return (M[i] * a ** 3 + M[i + 1] * b ** 3) / (6 * hi) + (eye[i] - M[i] * hi ** 2 / 6) * a / hi \
        + (eye[i + 1] - M[i + 1] * hi ** 2 / 6) * b / hi


def resize_bias_table(table, window):
    """A relative-position-bias table ((2w-1)^2, heads) resized for windows of `window`, as the authors resize
    Swin-B's window-7 tables to fine-tune at 384 px (window 12; BEiT's recipe): the source's offsets are put
    on a geometric progression whose ends reach the target's farthest offset, and a bicubic interpolating
    spline through them (not-a-knot, what their scipy interp2d(kind="cubic") fits; current SciPy has no
    interp2d, and this needs no SciPy) is read at every integer offset. The same window: the table itself."""
    src, dst = math.isqrt(table.shape[0]), 2 * window - 1
    if src * src != table.shape[0] or src % 2 == 0 or src > dst:
        raise ValueError(f"resize_bias_table: {tuple(table.shape)} is not a table of a window up to {window}")
    if src == dst:
        return table
    lo, hi = 1.01, 1.5  # the progression 1, q, q^2, ...: its src // 2 steps sum to dst // 2, q by bisection as theirs
    while hi - lo > 1e-6:
        q = (lo + hi) / 2
        lo, hi = (lo, q) if (1 - q ** (src // 2)) / (1 - q) > dst // 2 else (q, hi)
    steps = torch.tensor([q ** k for k in range(src // 2)], dtype=torch.float64).cumsum(0)  # 1, 1 + q, ...
    A = not_a_knot_spline(torch.cat([-steps.flip(0), steps.new_zeros(1), steps]),
                          torch.arange(-(dst // 2), dst // 2 + 1, dtype=torch.float64))  # (dst, src)
    grid = table.double().T.reshape(-1, src, src)  # (heads, dy, dx)
    return (A @ grid @ A.T).reshape(table.shape[1], dst * dst).T.to(table.dtype)


# -----------------------------------------------------------------------------
# The authors' released files: Swin-B X-VLM
#
# The checkpoints the authors released (github.com/zengyan-97/X-VLM: X-VLM 4M and 16M, and fine-tuned on
# retrieval, VQA, NLVR2 and RefCOCO+) are {"model": state dict, "config": their YAML dict}, with Swin-B
# (Liu et al. 2021) as the image encoder under "vision_encoder." and their BERT under "text_encoder.". The
# tables below name Swin's, the text encoder's and the shared heads' tensors; what a task model adds (VQA's
# answer decoder, NLVR2's doubled layers and head) it brings itself, as rows (tasks.py). xvlm.py's
# released_model builds the model from released_config and loads the pairs strictly.

# (ours, theirs under "vision_encoder."); {s}: stage, {b}: block of the stage
SWIN_KEYS = [
    ("vision.patch_embed.{p}", "patch_embed.proj.{p}"),
    ("vision.patch_norm.{p}", "patch_embed.norm.{p}"),
    ("vision.norm.{p}", "norm.{p}"),
]


SWIN_BLOCK_KEYS = [
    ("vision.stages.{s}.blocks.{b}.norm1.{p}", "layers.{s}.blocks.{b}.norm1.{p}"),
    ("vision.stages.{s}.blocks.{b}.attn.qkv.{p}", "layers.{s}.blocks.{b}.attn.qkv.{p}"),  # fused q, k, v as ours
    ("vision.stages.{s}.blocks.{b}.attn.proj.{p}", "layers.{s}.blocks.{b}.attn.proj.{p}"),
    ("vision.stages.{s}.blocks.{b}.bias_table", "layers.{s}.blocks.{b}.attn.relative_position_bias_table"),
    ("vision.stages.{s}.blocks.{b}.norm2.{p}", "layers.{s}.blocks.{b}.norm2.{p}"),
    ("vision.stages.{s}.blocks.{b}.mlp.fc1.{p}", "layers.{s}.blocks.{b}.mlp.fc1.{p}"),
    ("vision.stages.{s}.blocks.{b}.mlp.fc2.{p}", "layers.{s}.blocks.{b}.mlp.fc2.{p}"),
    (None, "layers.{s}.blocks.{b}.attn.relative_position_index"),  # buffers: recomputed (SwinBlock)
    (None, "layers.{s}.blocks.{b}.attn_mask"),  # (shifted blocks only)
]


SWIN_MERGE_KEYS = [  # every stage but the last
    ("vision.stages.{s}.merge.norm.{p}", "layers.{s}.downsample.norm.{p}"),
    ("vision.stages.{s}.merge.proj.weight", "layers.{s}.downsample.reduction.weight"),
]


# A cross-modal layer's cross-attention, in their BERT (names as BERT_KEYS, {layer} likewise).
CROSS_KEYS = [
    ("{layer}.cross_attn.q.{p}", "encoder.layer.{i}.crossattention.self.query.{p}"),
    ("{layer}.cross_attn.kv.{p}", concat("encoder.layer.{i}.crossattention.self.key.{p}",
                                         "encoder.layer.{i}.crossattention.self.value.{p}")),
    ("{layer}.cross_attn.proj.{p}", "encoder.layer.{i}.crossattention.output.dense.{p}"),
    ("{layer}.cross_norm.{p}", "encoder.layer.{i}.crossattention.output.LayerNorm.{p}"),
]

# XVLM's heads, named alike on both sides; {i}: an MLP head's Linear, LayerNorm and Linear (mlp_head, their build_mlp).
RELEASED_HEAD_KEYS = [
    ("vision_proj.{p}", "vision_proj.{p}"),
    ("text_proj.{p}", "text_proj.{p}"),
    ("temp", "temp"),
    ("itm_head.{i}.{p}", "itm_head.{i}.{p}"),
    ("bbox_head.{i}.{p}", "bbox_head.{i}.{p}"),
]

MLP_HEAD_LAYERS = [dict(i=0), dict(i=1), dict(i=3)]

# Which of XVLM's heads each kind of their files holds, named alike on both sides (RELEASED_HEAD_KEYS; their
# MLM head, text_encoder.cls.*, is our mlm_head through BERT_KEYS). The task files hold none of XVLM's heads.
RELEASED_HEADS = {
    "pretrain": ("vision_proj", "text_proj", "temp", "itm_head", "bbox_head", "mlm_head"),  # X-VLM 4M, 16M
    "retrieval": ("vision_proj", "text_proj", "temp", "itm_head"),  # COCO, Flickr30K; weakly supervised RefCOCO+
    "bbox": ("bbox_head",),  # RefCOCO+, the bbox head
    "vqa": (),
    "nlvr2": (),
}


def released_name(key):
    """A key of the authors' files as the tables spell it: their pre-trained text encoder and their VQA
    decoder are BERT models with heads (text_encoder.bert.*, text_encoder.cls.*), the fine-tuned encoder not."""
    return re.sub(r"^(text_encoder|text_decoder)\.bert\.", r"\1.", key)


def prefixed(pairs, prefix):
    """Expanded pairs with `prefix` before each of their names (their files nest each encoder under one)."""
    return [(ours, tuple(prefix + n for n in theirs)) for ours, theirs in pairs]


def released_key_pairs(cfg, kind, fusion_layers, extra=()):
    """(ours, (theirs, ...)) pairs of one kind of released file (RELEASED_HEADS), one per tensor: Swin, their text
    encoder, whose text layers are ours and whose cross-modal layers go to `fusion_layers` (our layer names, in
    their order), the kind's heads, and the `extra` pairs a task model brings for what else the file holds."""
    T, depths = cfg.text_layers, cfg.swin.depths
    layers = [dict(i=i, layer=f"text.layers.{i}") for i in range(T)] + [dict(i=T + n, layer=f) for n, f in enumerate(fusion_layers)]
    text = expand_table(BERT_KEYS, layers) + expand_table(CROSS_KEYS, layers[T:])
    swin = expand_table(SWIN_KEYS, []) + expand_table(SWIN_MERGE_KEYS, [dict(s=s) for s in range(len(depths) - 1)]) \
        + expand_table(SWIN_BLOCK_KEYS, [dict(s=s, b=b) for s, d in enumerate(depths) for b in range(d)])
    pairs = prefixed(swin, "vision_encoder.") + prefixed(text, "text_encoder.") + expand_table(RELEASED_HEAD_KEYS, MLP_HEAD_LAYERS)
    absent = {h for heads in RELEASED_HEADS.values() for h in heads} - set(RELEASED_HEADS[kind])  # the heads not in this file
    return [(ours, theirs) for ours, theirs in pairs if ours is None or ours.split(".")[0] not in absent] + list(extra)


def is_released(checkpoint):
    """Whether a file's object is one of the authors' checkpoints: {"model": ..., "config": ...} with their
    image encoder under "vision_encoder."."""
    state = checkpoint.get("model") if isinstance(checkpoint, dict) else None
    return isinstance(state, dict) and any(isinstance(k, str) and k.startswith("vision_encoder.") for k in state)


def released_kind(state, source):
    """Which kind of file (RELEASED_HEADS) a state dict of theirs is, from the modules it holds: their VQA
    decoder, their NLVR2 head, pre-training's BERT with its MLM head, the ITM head, the bbox head."""
    has = lambda prefix: any(k.startswith(prefix) for k in state)
    if not has("vision_encoder.layers."):
        raise ValueError(f"{source}: one of the authors' checkpoints, but not with their Swin image encoder (the "
                         f"models they released): its DeiT / CLIP ViT variants do not load here")
    for kind, prefix in (("vqa", "text_decoder."), ("nlvr2", "cls_head."), ("pretrain", "text_encoder.bert."),
                         ("retrieval", "itm_head."), ("bbox", "bbox_head.")):
        if has(prefix):
            return kind
    raise ValueError(f"{source}: one of the authors' checkpoints without a head this loader knows "
                     f"(text_decoder, cls_head, itm_head, bbox_head, or pre-training's text_encoder.bert)")


def swin_fields(state, config, source):
    """XVLMConfig's image encoder fields, its `swin` group among them, from their vision_encoder's shapes: stages,
    depths, heads (the bias tables' columns), window (their rows), image size (a shifted block's window mask,
    else their config's)."""
    shape = lambda key: tuple(state[key].shape) if key in state else None
    stages = depth(state, r"vision_encoder\.layers\.(\d+)\.")
    depths = tuple(depth(state, rf"vision_encoder\.layers\.{s}\.blocks\.(\d+)\.") for s in range(stages))
    tables = [shape(f"vision_encoder.layers.{s}.blocks.0.attn.relative_position_bias_table") for s in range(stages)]
    embed, _, patch, _ = shape("vision_encoder.patch_embed.proj.weight")
    sides = [math.isqrt(m[0]) * math.isqrt(m[1]) * patch * 2 ** s for s in range(stages)  # windows * window * cell
             for b in range(depths[s]) if (m := shape(f"vision_encoder.layers.{s}.blocks.{b}.attn_mask"))]
    image_res = sides[0] if sides else config.get("image_res")
    if image_res is None or (sides and config.get("image_res", image_res) != image_res):
        raise ValueError(f"{source}: image size {sides[:1] or 'unknown'} from the window masks, {config.get('image_res')} in the config")
    swin = dict(embed_dim=embed, depths=depths, heads=tuple(t[1] for t in tables), window=(math.isqrt(tables[0][0]) + 1) // 2)
    return dict(swin=swin, image_res=image_res, patch_size=patch * 2 ** (stages - 1), vision_width=embed * 2 ** (stages - 1),
                vision_layers=sum(depths), vision_heads=tables[-1][1], local_layers=0, drop_path=0.1)


def bert_fields(state, kind):
    """XVLMConfig's text fields from their text_encoder's shapes: width, vocabulary, positions, text layers
    (those without cross-attention), cross-modal layers (NLVR2 doubles them), heads (BERT's 64 dims each)."""
    shape = lambda key: tuple(state[f"text_encoder.{key}"].shape)
    layers = depth(state, r"text_encoder\.encoder\.layer\.(\d+)\.")
    text = min(int(m.group(1)) for k in state if (m := re.match(r"text_encoder\.encoder\.layer\.(\d+)\.crossattention\.", k)))
    vocab, width = shape("embeddings.word_embeddings.weight")
    return dict(vocab_size=vocab, text_width=width, text_heads=max(1, width // 64), text_layers=text,
                fusion_layers=(layers - text) // (2 if kind == "nlvr2" else 1),
                max_positions=shape("embeddings.position_embeddings.weight")[0],
                type_vocab_size=shape("embeddings.token_type_embeddings.weight")[0],
                text_mlp_dim=shape("encoder.layer.0.intermediate.dense.weight")[0])


def released_config(state, config, kind, source):
    """XVLMConfig fields for one of the authors' files (a state dict, their YAML dict), from the tensors'
    shapes: their config names its encoders' config files by path (configs/config_swinB_384.json), not
    their sizes. max_tokens: their config's, else 40 (their NLVR2 config names none, their others 40)."""
    state = {released_name(k): v for k, v in state.items()}
    stages = depth(state, r"vision_encoder\.layers\.(\d+)\.")
    needed = ["vision_encoder.patch_embed.proj.weight", "text_encoder.embeddings.word_embeddings.weight",
              "text_encoder.embeddings.position_embeddings.weight", "text_encoder.embeddings.token_type_embeddings.weight",
              "text_encoder.encoder.layer.0.intermediate.dense.weight",
              ] + [f"vision_encoder.layers.{s}.blocks.0.attn.relative_position_bias_table" for s in range(stages)]
    absent = [k for k in needed if k not in state]
    if not any(".crossattention." in k for k in state):
        absent.append("text_encoder.encoder.layer.*.crossattention.*")
    if absent:
        raise ValueError(f"{source}: missing keys: {listed(absent)}")
    return {**swin_fields(state, config, source), **bert_fields(state, kind), "max_tokens": config.get("max_tokens", 40),
            "embed_dim": state["vision_proj.weight"].shape[0] if "vision_proj.weight" in state else 256,
            "text_sep": False, "rank_first_twice": kind == "vqa"}


# The keys of a released file's YAML this project reads: the image size and text length (released_config), the
# evaluation's top k and Grad-CAM layer (carried_settings). The rest describe the authors' own run.
RELEASED_CONFIG_KEYS = ("image_res", "max_tokens", "k_test", "block_num")


def carried_settings(checkpoint, task, source):
    """The run settings a checkpoint (as read_file read it) decides where the user's flags do not (train.resolve).
    One of the authors' released files: their recipe (--config base), their evaluation settings from the YAML
    it carries (k_test: the top k re-ranked; block_num, their BERT's layer index: the Grad-CAM layer), and
    their image reading (PIL's convert("RGB")). One of ours: its vocabulary and image reading (a model fine-tuned
    from a released file keeps theirs), and when it is a run of `task` the evaluation settings it ran with, so
    that evaluating it again gives the figures it wrote."""
    if not isinstance(checkpoint, dict):
        return {}
    if is_released(checkpoint):
        config = checkpoint.get("config") if isinstance(checkpoint.get("config"), dict) else {}
        state = {released_name(k): v for k, v in state_dict_of(checkpoint, source).items()}
        out = {"config": "base", "decode": "pil"}
        if "k_test" in config:
            out["rerank_k"] = int(config["k_test"])
        if "block_num" in config:
            out["gradcam_layer"] = int(config["block_num"]) - bert_fields(state, released_kind(state, source))["text_layers"]
        return out
    stored = checkpoint.get("extra", {}).get("settings", {}) if isinstance(checkpoint.get("extra"), dict) else {}
    same = stored.get("task") == task
    carried = {k: stored[k] for k in ("decode", "rerank_k", "gradcam_layer") if k in stored and (same or k == "decode")}
    vocab = stored_vocab(checkpoint)
    return {**carried, **({"vocab": vocab} if vocab else {})}


def stored_vocab(checkpoint):
    """The vocabulary a checkpoint of ours names: as its run's command line gave it when that path is there from
    here, else the absolute path the run saved beside it (train.py's "vocab_file") when that one is; None if it names none."""
    extra = checkpoint.get("extra") if isinstance(checkpoint.get("extra"), dict) else {}
    given, absolute = extra.get("settings", {}).get("vocab"), extra.get("vocab_file")
    return next((p for p in (given, absolute) if p and Path(p).is_file()), given)
