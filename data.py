"""
Data for X-VLM: tokenizer, image+box transforms, datasets for every format, the synthetic world.

X-VLM's idea is data: images whose regions are enclosed by boxes, each box paired with a text
(object labels, region descriptions) next to whole-image captions. This file reads that data in
the authors' public formats, checks it, turns it into batches, and can write a small synthetic
world in the same formats so that everything runs with no download.

    python data.py synth --out synth                 # write the synthetic world (~10 s)
    python data.py check synth/*.json* --image-root synth/images   # validate records and images
    python data.py convert-coco --help               # COCO captions/instances -> these formats
    python data.py convert-vg --help                 # Visual Genome objects/regions -> these formats

Contents, top to bottom:
  text      Tokenizer (BERT WordPiece via `tokenizers`), clean_caption, swap_left_right
  records   read_records, the per-format validators, load_records (fails fast, naming
            file / record / field)
  images    load_image (any mode), crops, flips, resizes that carry boxes, to_tensor
  pretrain  pretrain_loader: half image-text, half box-annotated images per batch (paper 4.2)
  tasks     RetrievalTrainDataset, RetrievalEvalDataset, VQADataset, NLVR2Dataset,
            NLVR2AssignDataset, GroundingDataset, task_loader
  chance    the score of a model that learns nothing, for each downstream metric
  synth     synthesize(): the synthetic multi-grained world
  cli       synth, check, convert-coco, convert-vg
"""

import argparse
import json
import logging
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers

log = logging.getLogger("data")

# -----------------------------------------------------------------------------
# Text

# BERT's special tokens. The model's config defaults use these ids (PAD 0, UNK 100, CLS 101,
# SEP 102, MASK 103), so the synthetic vocab keeps them at the same positions.
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


class Tokenizer:
    """BERT WordPiece over a `vocab.txt` (one token a line, id = line number).

    Same pipeline as BERT: clean control characters, split CJK characters, lowercase and strip
    accents (uncased vocabularies), split on whitespace and punctuation, greedy longest-match
    WordPiece with [UNK] for words it cannot spell, then [CLS] ... [SEP].
    """

    def __init__(self, vocab_file, lowercase=True):
        self.vocab_file = str(vocab_file)
        vocab = {}
        with open(vocab_file, encoding="utf-8") as f:
            for i, line in enumerate(f):
                token = line.rstrip("\n")
                if token in vocab:
                    raise ValueError(f"{vocab_file}: line {i + 1}: token {token!r} repeats line {vocab[token] + 1}")
                vocab[token] = i
        for token in SPECIAL_TOKENS:
            if token not in vocab:
                raise ValueError(f"{vocab_file}: special token {token} is missing")
        self.vocab_size = len(vocab)
        self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = (vocab[t] for t in SPECIAL_TOKENS)
        self.special_ids = {self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id}
        tok = HFTokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
        # strip_accents=None follows `lowercase`, exactly as BERT's uncased/cased tokenizers do
        tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                    strip_accents=None, lowercase=lowercase)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        self._tok = tok

    def encode_batch(self, texts, max_tokens):
        """Texts -> (input_ids int64 [n, L], attention_mask bool [n, L]), L = longest, <= max_tokens.

        Each row is [CLS] tokens [SEP] [PAD]...; a long text loses its tail tokens, never [SEP].
        """
        if max_tokens < 2:
            raise ValueError(f"max_tokens must leave room for [CLS] and [SEP], got {max_tokens}")
        # one `encode` per text, not `encode_batch`: the batch call starts a thread pool, and a
        # DataLoader worker forked after that pool exists gets the parallelism disabled with a warning
        rows = [[self.cls_id] + self._tok.encode(t, add_special_tokens=False).ids[:max_tokens - 2] + [self.sep_id]
                for t in texts]
        length = max((len(r) for r in rows), default=2)
        ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r)
        mask = torch.arange(length)[None, :] < torch.tensor([len(r) for r in rows], dtype=torch.long)[:, None]
        return ids, mask

    def decode(self, ids):
        """Ids (list or 1-D tensor) -> text, special tokens left out, word pieces joined."""
        ids = ids.tolist() if torch.is_tensor(ids) else list(ids)
        return self._tok.decode([i for i in ids if i not in self.special_ids], skip_special_tokens=False)


# Caption clean-up as the authors' `pre_caption`: lowercase, punctuation noise to spaces, words
# capped. Every text (caption, question, referring expression) goes through it before tokenising.
_PUNCT = re.compile(r"[,.'!?\"()*#:;~\-/]")


def clean_caption(text, max_words=30):
    """Lowercase, replace , . ' ! ? " ( ) * # : ; ~ - / by spaces, squeeze spaces, keep max_words."""
    words = _PUNCT.sub(" ", text.lower()).replace("<person>", "person").split()
    return " ".join(words[:max_words])


_LEFT_RIGHT = re.compile(r"\b(left|right)\b")


def swap_left_right(text):
    """'left' <-> 'right' as whole words: what a horizontal flip does to a true description."""
    return _LEFT_RIGHT.sub(lambda m: "right" if m.group(1) == "left" else "left", text)


# -----------------------------------------------------------------------------
# Records: reading and checking every format
#
# Every format is a JSON list of objects or JSON lines (one object a line). A checker returns
# the problems of one record as (field, message) pairs; with `image_size` (path -> (W, H)) it also
# opens the image and checks that the boxes lie inside it. Training calls them without images, so
# a malformed record stops the run at start-up; `python data.py check` calls them with images.

class RecordError(ValueError):
    """Malformed data. The message names the file, the record and the field."""


def record_name(path, index, jsonl):
    """How messages name a record: 0-based position, plus the line for JSON lines."""
    return f"{path}: record {index}" + (f" (line {index + 1})" if jsonl else "")


def read_json(path):
    """Parse a JSON document, or JSON lines into a list of records. Returns (value, jsonl)."""
    text = Path(path).read_text(encoding="utf-8")
    try:
        return json.loads(text), False
    except json.JSONDecodeError as e:
        if not text.lstrip().startswith("{"):
            raise RecordError(f"{path}: not valid JSON: {e}") from None
    records = []
    for i, line in enumerate(text.rstrip().split("\n")):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            # blank lines are not skipped, so record i is always line i + 1
            raise RecordError(f"{record_name(path, i, True)}: not valid JSON: {e}") from None
    return records, True


def read_records(path):
    """Records of a JSON list or JSON lines file -> (list, jsonl)."""
    value, jsonl = read_json(path)
    if isinstance(value, dict):  # JSON lines holding a single record
        return [value], True
    if not isinstance(value, list):
        raise RecordError(f"{path}: expected a JSON list of records or JSON lines, got a JSON {type(value).__name__}")
    return value, jsonl


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _text(value, field, out, allow_list=True):
    """A non-empty text, or with allow_list a non-empty list of them."""
    if isinstance(value, list) and allow_list:
        if not value:
            out.append((field, "empty list of texts"))
        for j, v in enumerate(value):
            _text(v, f"{field}[{j}]", out, allow_list=False)
    elif not isinstance(value, str):
        out.append((field, f"must be a string{' or a list of strings' if allow_list else ''}, got {value!r}"))
    elif not clean_caption(value):
        out.append((field, f"empty text {value!r}"))


# Annotation tools round coordinates, so a box may end a pixel past the border (Visual Genome
# has many); training clips boxes to the image anyway.
BOX_TOLERANCE = 1.0


def _box(value, field, out, size=None):
    """[x, y, w, h] in pixels: four finite numbers, positive size, inside the image (W, H) if known."""
    if not (isinstance(value, (list, tuple)) and len(value) == 4 and all(_is_number(v) for v in value)):
        out.append((field, f"box must be 4 numbers [x, y, w, h], got {value!r}"))
        return
    x, y, w, h = value
    if w <= 0 or h <= 0:
        out.append((field, f"box has a non-positive size: w={w}, h={h}"))
    elif x < -BOX_TOLERANCE or y < -BOX_TOLERANCE:
        out.append((field, f"box {value} starts outside the image"))
    elif size is not None and (x + w > size[0] + BOX_TOLERANCE or y + h > size[1] + BOX_TOLERANCE):
        out.append((field, f"box {value} lies outside the {size[0]}x{size[1]} image"))


def _image(path, field, out, image_size):
    """An image path; with image_size, the image must open. Returns its (W, H) or None."""
    if not isinstance(path, str) or not path:
        out.append((field, f"must be an image path, got {path!r}"))
        return None
    if image_size is None:
        return None
    try:
        return image_size(path)
    except Exception as e:  # noqa: BLE001 -- any decoder error means the same thing: unusable image
        out.append((field, f"cannot read image {path!r}: {type(e).__name__}: {e}"))
        return None


def _fields(rec, out, *names):
    """Record the missing ones among `names`; True when all are there."""
    missing = [n for n in names if n not in rec]
    out.extend((n, "missing field") for n in missing)
    return not missing


def pretrain_problems(rec, image_size=None):
    """Image-text {"image", "caption": str | [str]} or, with "elems", a region record
    {"image", "caption"?, "elems": [{"caption", "bb": [x, y, w, h], "attributes"?}]}."""
    out = []
    if not _fields(rec, out, "image"):
        return out
    size = _image(rec["image"], "image", out, image_size)
    if "elems" not in rec:
        if _fields(rec, out, "caption"):
            _text(rec["caption"], "caption", out)
        return out
    if "caption" in rec:
        _text(rec["caption"], "caption", out)
    elems = rec["elems"]
    if not isinstance(elems, list) or not elems:
        out.append(("elems", f"must be a non-empty list of regions, got {elems!r}"))
        return out
    for j, elem in enumerate(elems):
        if not isinstance(elem, dict):
            out.append((f"elems[{j}]", f"must be an object, got {elem!r}"))
            continue
        for name in ("caption", "bb"):
            if name not in elem:
                out.append((f"elems[{j}].{name}", "missing field"))
        if "caption" in elem:
            _text(elem["caption"], f"elems[{j}].caption", out)
        if "attributes" in elem:
            _text(elem["attributes"], f"elems[{j}].attributes", out)
        if "bb" in elem:
            _box(elem["bb"], f"elems[{j}].bb", out, size)
    return out


def retrieval_train_problems(rec, image_size=None):
    """{"image", "caption": str, "image_id": str | int}"""
    out = []
    if _fields(rec, out, "image", "caption", "image_id"):
        _image(rec["image"], "image", out, image_size)
        _text(rec["caption"], "caption", out, allow_list=False)
        if not isinstance(rec["image_id"], (str, int)) or isinstance(rec["image_id"], bool):
            out.append(("image_id", f"must be a string or an integer, got {rec['image_id']!r}"))
    return out


def retrieval_eval_problems(rec, image_size=None):
    """{"image", "caption": [str, ...]}"""
    out = []
    if _fields(rec, out, "image", "caption"):
        _image(rec["image"], "image", out, image_size)
        _text(rec["caption"], "caption", out)
    return out


def vqa_problems(rec, image_size=None):
    """{"question_id", "question", "image", "answer"?: [str] | str, "dataset"?}; test sets have no answers."""
    out = []
    if _fields(rec, out, "question_id", "question", "image"):
        _image(rec["image"], "image", out, image_size)
        _text(rec["question"], "question", out, allow_list=False)
        if not isinstance(rec["question_id"], (str, int)) or isinstance(rec["question_id"], bool):
            out.append(("question_id", f"must be a string or an integer, got {rec['question_id']!r}"))
    answer = rec.get("answer")
    if answer is not None:
        answers = answer if isinstance(answer, list) else [answer]
        if not answers or not all(isinstance(a, str) and a.strip() for a in answers):
            out.append(("answer", f"must be a non-empty string or list of them, got {answer!r}"))
    return out


def nlvr2_problems(rec, image_size=None):
    """{"images": [a, b], "sentence", "label": "True" | "False"}"""
    out = []
    if _fields(rec, out, "images", "sentence", "label"):
        images = rec["images"]
        if not isinstance(images, list) or len(images) != 2:
            out.append(("images", f"must be a list of two image paths, got {images!r}"))
        else:
            for j, path in enumerate(images):
                _image(path, f"images[{j}]", out, image_size)
        _text(rec["sentence"], "sentence", out, allow_list=False)
        if rec["label"] not in ("True", "False"):
            out.append(("label", f"must be \"True\" or \"False\", got {rec['label']!r}"))
    return out


def grounding_problems(rec, image_size=None):
    """{"image", "text", "bbox": [x, y, w, h]}"""
    out = []
    if _fields(rec, out, "image", "text", "bbox"):
        size = _image(rec["image"], "image", out, image_size)
        _text(rec["text"], "text", out, allow_list=False)
        _box(rec["bbox"], "bbox", out, size)
    return out


FORMATS = {
    "pretrain": pretrain_problems,
    "retrieval_train": retrieval_train_problems,
    "retrieval_eval": retrieval_eval_problems,
    "vqa": vqa_problems,
    "nlvr2": nlvr2_problems,
    "grounding": grounding_problems,
}


def record_problems(path, records, jsonl, fmt, image_size=None):
    """Every problem of every record of one file, as 'file: record i: field 'f': message' lines."""
    check = FORMATS[fmt]
    lines = []
    for i, rec in enumerate(records):
        found = check(rec, image_size) if isinstance(rec, dict) else [("(record)", f"must be a JSON object, got {rec!r}")]
        lines += [f"{record_name(path, i, jsonl)}: field '{field}': {message}" for field, message in found]
    return lines


def load_records(files, fmt):
    """Read and check all records of `files` (one path or several, concatenated in order).

    Raises RecordError listing the problems before any compute is spent. Images are not opened
    here (that is `python data.py check`); a corrupt image met during training is skipped and counted.
    """
    files = [files] if isinstance(files, (str, Path)) else list(files)
    if not files:
        raise ValueError(f"no {fmt} files given")
    records, problems = [], []
    for path in files:
        recs, jsonl = read_records(path)
        problems += record_problems(path, recs, jsonl, fmt)
        records += recs
    if problems:
        shown = "\n".join(problems[:20]) + (f"\n... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise RecordError(f"{len(problems)} malformed {fmt} record field(s); run `python data.py check` for all:\n{shown}")
    return records


# -----------------------------------------------------------------------------
# Images and boxes
#
# Boxes travel as float arrays [n, 4] of (x, y, w, h) in pixels of the image at hand; only at the
# end do they become (cx, cy, w, h) normalised by the final image size, the form the model predicts.

# The authors' normalisation (CLIP's constants), for every image of every task.
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)

_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def load_image(path):
    """Any image file -> 8-bit RGB PIL image (L, LA, RGBA, P, CMYK, 16-bit, ...). Raises if unreadable.

    EXIF orientation is not applied: COCO and Visual Genome boxes refer to the stored pixels.
    """
    with Image.open(path) as img:
        img.load()  # decode now, so that a truncated or corrupt file fails here, not in a transform
        if img.mode in _SIXTEEN_BIT:
            # 16-bit greyscale: Pillow's convert() would clip everything above 255 to white
            img = Image.fromarray((np.asarray(img, dtype=np.float64) / 257.0).clip(0, 255).round().astype(np.uint8))
        if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info):
            # transparent pixels have arbitrary colour underneath: show them as white paper
            rgba = img.convert("RGBA")
            img = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            img.alpha_composite(rgba)
        return img.convert("RGB")


def to_tensor(img):
    """PIL RGB -> float32 [3, H, W], normalised with MEAN / STD."""
    x = np.asarray(img, dtype=np.float32) / 255.0
    x = (x - np.asarray(MEAN, dtype=np.float32)) / np.asarray(STD, dtype=np.float32)
    return torch.from_numpy(x.transpose(2, 0, 1).copy())


def random_resized_crop(width, height, rng, scale, ratio=(3 / 4, 4 / 3)):
    """torchvision's RandomResizedCrop window: (x, y, w, h) covering `scale` of the area at a random aspect."""
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
    # fall back to the largest centred window of an allowed aspect ratio
    w, h = width, height
    if width / height < ratio[0]:
        h = round(width / ratio[0])
    elif width / height > ratio[1]:
        w = round(height * ratio[1])
    return (width - w) // 2, (height - h) // 2, w, h


def region_crop(width, height, box, rng):
    """The authors' region crop: a random window (x, y, w, h) of whole pixels that contains `box` whole."""
    x, y, w, h = box
    x0, y0 = int(rng.integers(0, math.floor(x) + 1)), int(rng.integers(0, math.floor(y) + 1))
    x1 = int(rng.integers(min(math.ceil(x + w), width), width + 1))
    y1 = int(rng.integers(min(math.ceil(y + h), height), height + 1))
    return x0, y0, x1 - x0, y1 - y0


def crop_flip_resize(img, crop, flip, size):
    """Cut `crop` (x, y, w, h) out of `img`, mirror it if `flip`, resize to size x size (bicubic)."""
    x, y, w, h = crop
    out = img.resize((size, size), Image.BICUBIC, box=(x, y, x + w, y + h))
    return out.transpose(Image.FLIP_LEFT_RIGHT) if flip else out


def transform_boxes(boxes, crop, flip, out_size, min_visible=0.5):
    """Follow boxes through crop -> flip -> resize.

    boxes: [n, 4] (x, y, w, h) pixels of the source image; crop: (x, y, w, h) window; out_size:
    (W, H) of the resized result. Each box is clipped to the window and kept only if at least
    `min_visible` of its area (and more than nothing) survives. Returns (kept boxes [k, 4] in
    output pixels, keep mask [n]).
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    cx0, cy0, cw, ch = crop
    x0 = np.maximum(boxes[:, 0], cx0)
    y0 = np.maximum(boxes[:, 1], cy0)
    x1 = np.minimum(boxes[:, 0] + boxes[:, 2], cx0 + cw)
    y1 = np.minimum(boxes[:, 1] + boxes[:, 3], cy0 + ch)
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    keep = (inter > 0) & (inter >= min_visible * boxes[:, 2] * boxes[:, 3])
    out = np.stack([x0 - cx0, y0 - cy0, x1 - x0, y1 - y0], axis=1)[keep]  # (x, y, w, h) in the window
    if flip:
        out[:, 0] = cw - out[:, 0] - out[:, 2]
    out *= np.array([out_size[0] / cw, out_size[1] / ch, out_size[0] / cw, out_size[1] / ch])
    return out, keep


def xywh_to_cxcywh(boxes, width, height):
    """Pixel (x, y, w, h) [n, 4] -> (cx, cy, w, h) normalised by the image size, float32 tensor."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    out = np.stack([boxes[:, 0] + boxes[:, 2] / 2, boxes[:, 1] + boxes[:, 3] / 2, boxes[:, 2], boxes[:, 3]], axis=1)
    return torch.from_numpy(out / np.array([width, height, width, height])).float()
