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

From Python (train.py / tasks.py):

    import data
    data.synthesize("synth", images=4000, seed=0)    # layout: data.SYNTH_FILES
    tok = data.Tokenizer("synth/vocab.txt")
    loader = data.pretrain_loader(["synth/pretrain_captions.json", "synth/pretrain_regions.jsonl"],
                                  "synth/images", tok, batch_size=32, image_res=64, max_tokens=25)
    for batch in loader: ...                          # one epoch; loader.state_dict() to resume

Contents, top to bottom:
  text      Tokenizer (BERT WordPiece via `tokenizers`), clean_caption, swap_left_right
  records   read_records, the per-format validators, load_records (fails fast, naming
            file / record / field)
  images    load_image (any mode), crops, flips, resizes that carry boxes, to_tensor
  pretrain  pretrain_loader: half image-text, half box-annotated images per batch (paper 4.2)
  tasks     RetrievalTrainDataset, RetrievalEvalDataset, VQADataset, NLVR2Dataset,
            GroundingDataset, task_loader, TaskTrainLoader
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


def prepare_text(raw, max_words, flip=False):
    """A text as the model sees it: cleaned, and mirrored with its image when that was flipped."""
    text = clean_caption(raw, max_words)
    return swap_left_right(text) if flip else text


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


def _id(value, field, out):
    if not isinstance(value, (str, int)) or isinstance(value, bool):
        out.append((field, f"must be a string or an integer, got {value!r}"))


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
        _id(rec["image_id"], "image_id", out)
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
        _id(rec["question_id"], "question_id", out)
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


def vqa_train_problems(rec, image_size=None):
    """A VQA record that training can learn from: as vqa_problems, and the answers are there."""
    return vqa_problems(rec, image_size) + ([] if "answer" in rec else [("answer", "missing field (training needs answers)")])


FORMATS = {
    "pretrain": pretrain_problems,
    "retrieval_train": retrieval_train_problems,
    "retrieval_eval": retrieval_eval_problems,
    "vqa": vqa_problems,
    "vqa_train": vqa_train_problems,
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


# -----------------------------------------------------------------------------
# Pre-training data (paper 3.1 and 4.2)

def pick(rng, value):
    """One of a list (at random), or the value itself: captions may be a string or a list."""
    return value[int(rng.integers(len(value)))] if isinstance(value, list) else value


def elem_text(elem, rng):
    """A region's text: "attributes caption" when it has attributes, as in the authors' code."""
    text = pick(rng, elem["caption"])
    return f"{pick(rng, elem['attributes'])} {text}" if "attributes" in elem else text


def open_image(image_root, rel):
    """load_image, or None (logged) for a missing or corrupt file: training skips and counts it."""
    path = Path(image_root) / rel
    try:
        return load_image(path)
    except Exception as e:  # noqa: BLE001 -- every decoder error means the same: skip this image
        log.warning("skipping unreadable image %s: %s: %s", path, type(e).__name__, e)
        return None


class PretrainDataset(torch.utils.data.Dataset):
    """Pre-training records (several files, JSON list or lines), made into samples by key.

    A record with "elems" is a region record, any other an image-text record. A key is
    (kind, index, seed), kind 0 = image-text, 1 = region: the sampler chooses the record and the
    seed of its random crop and flip, so a sample is the same whichever worker makes it.

    A sample is None for an unreadable image, else a dict: "image" float32 [3, res, res], and per
    text "texts" (cleaned), "boxes" (normalised (cx, cy, w, h) float32 [4], or None for a
    whole-image text) and "concepts" (visual-concept ids). Concept ids are stable across processes:
    one per distinct image path (all its captions are positives of each other), then one per
    element of each region record, in file order.
    """

    def __init__(self, files, image_root, image_res, max_regions=5, crop_scale=(0.2, 1.0), max_words=30):
        records = load_records(files, "pretrain")
        self.image_root, self.image_res, self.max_regions = Path(image_root), image_res, max_regions
        self.crop_scale, self.max_words = tuple(crop_scale), max_words
        self.texts = [r for r in records if "elems" not in r]
        self.regions = [r for r in records if "elems" in r]
        image_ids = {}
        for r in records:
            image_ids.setdefault(r["image"], len(image_ids))
        self.text_concept = [image_ids[r["image"]] for r in self.texts]
        self.region_concept = [image_ids[r["image"]] for r in self.regions]
        self.elem_concept = np.cumsum([len(image_ids)] + [len(r["elems"]) for r in self.regions])[:-1].tolist()

    def __len__(self):
        return len(self.texts) + len(self.regions)

    def __getitem__(self, key):
        kind, index, seed = key
        rng = np.random.default_rng(seed)
        rec = self.texts[index] if kind == 0 else self.regions[index]
        img = open_image(self.image_root, rec["image"])
        if img is None:
            return None
        return self.image_text_sample(rec, index, img, rng) if kind == 0 else self.region_sample(rec, index, img, rng)

    def text(self, raw, flip):
        return prepare_text(raw, self.max_words, flip)

    def image_text_sample(self, rec, index, img, rng):
        """Random resized crop and flip of the whole image; one of its captions."""
        crop = random_resized_crop(*img.size, rng, self.crop_scale)
        flip = bool(rng.random() < 0.5)
        image = to_tensor(crop_flip_resize(img, crop, flip, self.image_res))
        return {"image": image, "texts": [self.text(pick(rng, rec["caption"]), flip)], "boxes": [None],
                "concepts": [self.text_concept[index]]}

    def region_sample(self, rec, index, img, rng):
        """The authors' region crop: pick one element, crop around it, flip, resize; its caption
        (if any) plus up to max_regions element texts whose boxes keep half their area."""
        W, H = img.size
        elems = rec["elems"]
        # annotations may run a pixel past the border: clip to the image first
        boxes, inside = transform_boxes([e["bb"] for e in elems], (0, 0, W, H), False, (W, H), min_visible=0)
        elem_ids = np.flatnonzero(inside)
        if len(elem_ids) == 0:
            log.warning("skipping %s: no element box of record %d lies inside the %dx%d image", rec["image"], index, W, H)
            return None
        chosen = int(rng.integers(len(elem_ids)))
        crop = region_crop(W, H, boxes[chosen], rng)
        flip = bool(rng.random() < 0.5)
        image = to_tensor(crop_flip_resize(img, crop, flip, self.image_res))
        res = self.image_res
        out_boxes, keep = transform_boxes(boxes, crop, flip, (res, res))
        out_of = np.cumsum(keep) - 1  # row of each kept box in out_boxes
        # the chosen element first (it always survives), then the other survivors in random order
        order = [chosen] + [j for j in rng.permutation(len(elem_ids)).tolist() if j != chosen and keep[j]]
        texts, box_list, concepts = [], [], []
        if "caption" in rec:
            texts.append(self.text(pick(rng, rec["caption"]), flip))
            box_list.append(None)
            concepts.append(self.region_concept[index])
        for j in order[:self.max_regions]:
            e = int(elem_ids[j])
            texts.append(self.text(elem_text(elems[e], rng), flip))
            box_list.append(xywh_to_cxcywh(out_boxes[out_of[j]], res, res)[0])
            concepts.append(self.elem_concept[index] + e)
        return {"image": image, "texts": texts, "boxes": box_list, "concepts": concepts}


class PretrainCollate:
    """Samples -> the batch dict that XVLM.forward takes (see pretrain_loader)."""

    def __init__(self, tokenizer, max_tokens, image_res):
        self.tokenizer, self.max_tokens, self.image_res = tokenizer, max_tokens, image_res

    def __call__(self, samples):
        kept = [s for s in samples if s is not None]
        texts, text_image, text_box, concepts, boxes, box_image = [], [], [], [], [], []
        for i, s in enumerate(kept):
            for text, box, concept in zip(s["texts"], s["boxes"], s["concepts"]):
                texts.append(text)
                text_image.append(i)
                concepts.append(concept)
                text_box.append(-1 if box is None else len(boxes))
                if box is not None:
                    boxes.append(box)
                    box_image.append(i)
        text_ids, text_mask = self.tokenizer.encode_batch(texts, self.max_tokens)
        res = self.image_res
        return {
            "images": torch.stack([s["image"] for s in kept]) if kept else torch.zeros(0, 3, res, res),
            "text_ids": text_ids,
            "text_mask": text_mask,
            "text_image": torch.tensor(text_image, dtype=torch.long),
            "text_box": torch.tensor(text_box, dtype=torch.long),
            "boxes": torch.stack(boxes) if boxes else torch.zeros(0, 4),
            "box_image": torch.tensor(box_image, dtype=torch.long),
            "concept_ids": torch.tensor(concepts, dtype=torch.long),
            "skipped": len(samples) - len(kept),
        }


class PretrainSampler(torch.utils.data.Sampler):
    """Keys for each batch of this rank: batch_size // 2 image-text, the rest region samples.

    Each kind is read as an endless stream of permutations (a fresh one per pass, seeded by
    (seed, epoch, kind, pass)): the larger kind is read once per epoch and the smaller one cycles,
    the way the authors draw from two repeating loaders. Global batch b takes stream positions
    [b * world_size * k, (b + 1) * world_size * k) of a kind with k per rank, and rank r the r-th
    share of them: ranks are disjoint, and a sample's seed (seed, epoch, kind, position) does not
    depend on the world size, so two ranks see exactly what one process would in two batches.
    With only one kind of record, the whole batch is of that kind.
    """

    def __init__(self, n_texts, n_regions, batch_size, seed=0, rank=0, world_size=1):
        if n_texts + n_regions == 0:
            raise ValueError("no pre-training records")
        if n_texts and n_regions and batch_size < 2:
            raise ValueError(f"batch_size {batch_size}: half and half needs at least 2 images per batch")
        half = batch_size // 2 if n_texts and n_regions else (batch_size if n_texts else 0)
        self.counts, self.per_rank = (n_texts, n_regions), (half, batch_size - half)
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch, self.start = 0, 0
        self._perm = {}  # kind -> ((epoch, pass), permutation): only the current pass is kept

    def __len__(self):
        return max(1, max(n // (k * self.world_size) for n, k in zip(self.counts, self.per_rank) if k))

    def set_position(self, epoch, start_batch=0):
        self.epoch, self.start = epoch, start_batch

    def index(self, epoch, kind, position):
        cycle, i = divmod(position, self.counts[kind])
        if self._perm.get(kind, (None,))[0] != (epoch, cycle):
            perm = np.random.default_rng((self.seed, epoch, kind, cycle)).permutation(self.counts[kind])
            self._perm[kind] = ((epoch, cycle), perm)
        return int(self._perm[kind][1][i])

    def batch_keys(self, epoch, batch):
        keys = []
        for kind, k in enumerate(self.per_rank):
            first = (batch * self.world_size + self.rank) * k
            keys += [(kind, self.index(epoch, kind, p), (self.seed, epoch, kind, p)) for p in range(first, first + k)]
        return keys

    def __iter__(self):
        for b in range(self.start, len(self)):
            yield self.batch_keys(self.epoch, b)


class PretrainLoader:
    """Iterating yields the batches left in the current epoch, then moves on to the next epoch.

    state_dict() is {"epoch", "batch"}: the batches handed out so far in this epoch. Saved with a
    checkpoint after step k and given back to load_state_dict(), the loader goes on with exactly the
    batches an uninterrupted run would have seen, whatever the number of workers (randomness is
    keyed by position, not by worker). If every image of a draw is unreadable the draw is not
    yielded; its `skipped` count is added to the next batch, so no skip goes unreported.
    """

    def __init__(self, dataset, sampler, collate, workers=0):
        self.dataset, self.sampler = dataset, sampler
        # A private generator: starting an iterator draws a worker seed, which from the global RNG
        # would shift the model's random draws (masks, negatives) in a resumed run.
        self.loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate,
                                                  generator=torch.Generator().manual_seed(sampler.seed),
                                                  num_workers=workers, persistent_workers=workers > 0)
        self.epoch, self.batch, self.carried_skips = 0, 0, 0

    def __len__(self):
        return len(self.sampler)

    def state_dict(self):
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state):
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])

    def __iter__(self):
        self.sampler.set_position(self.epoch, self.batch)
        for batch in self.loader:
            self.batch += 1
            if len(batch["images"]) == 0:
                self.carried_skips += batch["skipped"]
                continue
            batch["skipped"] += self.carried_skips
            self.carried_skips = 0
            yield batch
        self.epoch, self.batch = self.epoch + 1, 0


def pretrain_loader(files, image_root, tokenizer, batch_size, image_res, max_tokens, max_regions=5,
                    workers=0, seed=0, rank=0, world_size=1, crop_scale=(0.2, 1.0), max_words=30):
    """The pre-training loader: batches of `batch_size` images for this rank, half image-text
    pairs and half box-annotated images (paper 4.2). Malformed records raise RecordError here.

    Each batch is the dict that XVLM.forward takes (B images, T texts, R region texts):
      images      float32 [B, 3, res, res]  normalised with MEAN / STD; image-text images first
      text_ids    int64 [T, L]              [CLS] ... [SEP] [PAD]..., L = longest, <= max_tokens
      text_mask   bool [T, L]               True = real token
      text_image  int64 [T]                 index into images of each text's image
      text_box    int64 [T]                 index into boxes for region texts, -1 for captions
      boxes       float32 [R, 4]            normalised (cx, cy, w, h) in the transformed image
      box_image   int64 [R]                 image of each box
      concept_ids int64 [T]                 visual concept of each text; equal ids are positives
      skipped     int                       unreadable images in this draw (logged, then skipped)
    An image-text image brings one of its captions (random resized crop with `crop_scale`, flip);
    a region image brings its caption if it has one plus up to `max_regions` element texts, the
    randomly chosen element first (region crop that keeps it whole, flip, resize; boxes keeping
    less than half their area are dropped). A flip swaps "left" and "right" in the image's texts.
    crop_scale (0.2, 1.0) is the authors'; the synthetic world's captions name every shape, and a
    crop that cuts shapes out makes them partly false, so a gentler (0.8, 1.0) suits it better.
    Resume with loader.state_dict() / load_state_dict() (see PretrainLoader).
    """
    dataset = PretrainDataset(files, image_root, image_res, max_regions, crop_scale, max_words)
    sampler = PretrainSampler(len(dataset.texts), len(dataset.regions), batch_size, seed, rank, world_size)
    return PretrainLoader(dataset, sampler, PretrainCollate(tokenizer, max_tokens, image_res), workers)


# -----------------------------------------------------------------------------
# Downstream tasks (paper 4.3 and appendix B)
#
# Every dataset has a `collate` for its DataLoader (task_loader wires both); every batch carries
# `index` (int64 [B], the record of each row, to undo the padding DistributedSampler adds at
# evaluation) and `skipped` (unreadable images left out of this batch, already logged).

class TaskDataset(torch.utils.data.Dataset):
    """What the downstream datasets share: records checked at start-up, the authors' transforms,
    randomness keyed by (seed, epoch, index), texts cleaned and tokenised in `collate`.

    train=True: random resized crop (crop_scale of the area), horizontal flip that swaps "left"
    and "right" in the texts, resize to image_res. train=False: resize to image_res only.
    Call set_epoch(e) each epoch (task_loader does; workers must not be persistent).
    """
    fmt = None  # key of FORMATS for the records
    train_fmt = None  # a stricter one for training, where it differs

    def __init__(self, files, image_root, tokenizer, max_tokens, image_res, train=False, seed=0,
                 crop_scale=(0.5, 1.0), max_words=30):
        self.records = load_records(files, (train and self.train_fmt) or self.fmt)
        self.image_root, self.tokenizer, self.max_tokens = Path(image_root), tokenizer, max_tokens
        self.image_res, self.train, self.seed = image_res, train, seed
        self.crop_scale, self.max_words = tuple(crop_scale), max_words
        self.epoch = 0

    def __len__(self):
        return len(self.records)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def rng(self, index):
        return np.random.default_rng((self.seed, self.epoch, index))

    def flip(self, rng):
        return self.train and bool(rng.random() < 0.5)

    def image(self, rel, rng, flip):
        """Image tensor [3, res, res] through the train or eval transform, or None if unreadable."""
        img = open_image(self.image_root, rel)
        if img is None:
            return None
        crop = random_resized_crop(*img.size, rng, self.crop_scale) if self.train else (0, 0, *img.size)
        return to_tensor(crop_flip_resize(img, crop, flip, self.image_res))

    def text(self, raw, flip):
        return prepare_text(raw, self.max_words, flip)

    def collate_common(self, samples, text_key="text"):
        """images, text_ids, text_mask, index, skipped of the readable samples, and those samples."""
        kept = [s for s in samples if s is not None]
        text_ids, text_mask = self.tokenizer.encode_batch([s[text_key] for s in kept], self.max_tokens)
        res = self.image_res
        batch = {
            "images": torch.stack([s["image"] for s in kept]) if kept else torch.zeros(0, 3, res, res),
            "text_ids": text_ids,
            "text_mask": text_mask,
            "index": torch.tensor([s["index"] for s in kept], dtype=torch.long),
            "skipped": len(samples) - len(kept),
        }
        return batch, kept


class RetrievalTrainDataset(TaskDataset):
    """Retrieval fine-tuning: one record {"image", "caption", "image_id"} a row.

    Batch: images [B, 3, H, W], text_ids / text_mask [B, L], image_ids int64 [B] (captions of one
    image share it: they are positives of each other for itc), index, skipped.
    """
    fmt = "retrieval_train"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        ids = {}
        self.image_ids = [ids.setdefault(r["image_id"], len(ids)) for r in self.records]

    def __getitem__(self, index):
        rec, rng = self.records[index], self.rng(index)
        flip = self.flip(rng)
        image = self.image(rec["image"], rng, flip)
        if image is None:
            return None
        return {"image": image, "text": self.text(rec["caption"], flip), "image_id": self.image_ids[index], "index": index}

    def collate(self, samples):
        batch, kept = self.collate_common(samples)
        batch["image_ids"] = torch.tensor([s["image_id"] for s in kept], dtype=torch.long)
        return batch


class RetrievalEvalDataset(TaskDataset):
    """Retrieval evaluation: records {"image", "caption": [str, ...]}; items are the images.

    Attributes: texts (all captions, cleaned, in record order), txt2img[t] = image of text t,
    img2txt[i] = texts of image i. Batch: images [B, 3, H, W] (resized, no augmentation),
    index int64 [B] (image numbers), skipped. Tokenise `texts` with the tokenizer in chunks.
    """
    fmt = "retrieval_eval"

    def __init__(self, files, image_root, tokenizer, max_tokens, image_res, max_words=30):
        super().__init__(files, image_root, tokenizer, max_tokens, image_res, train=False, max_words=max_words)
        self.images = [r["image"] for r in self.records]
        self.texts, self.txt2img, self.img2txt = [], [], []
        for i, rec in enumerate(self.records):
            captions = rec["caption"] if isinstance(rec["caption"], list) else [rec["caption"]]
            self.img2txt.append(list(range(len(self.texts), len(self.texts) + len(captions))))
            self.texts += [clean_caption(c, max_words) for c in captions]
            self.txt2img += [i] * len(captions)

    def __getitem__(self, index):
        image = self.image(self.records[index]["image"], None, False)
        return None if image is None else {"image": image, "index": index}

    def collate(self, samples):
        kept = [s for s in samples if s is not None]
        res = self.image_res
        return {"images": torch.stack([s["image"] for s in kept]) if kept else torch.zeros(0, 3, res, res),
                "index": torch.tensor([s["index"] for s in kept], dtype=torch.long),
                "skipped": len(samples) - len(kept)}


def answer_list_problems(path, value):
    """Message lines for an answer list that is not a JSON list of non-empty strings."""
    if not isinstance(value, list):
        return [f"{path}: expected a JSON list of answer strings, got a JSON {type(value).__name__}"]
    return [f"{path}: record {i}: must be a non-empty answer string, got {a!r}"
            for i, a in enumerate(value) if not (isinstance(a, str) and a.strip())]


def read_answer_list(path):
    """answer_list.json: a JSON list of the candidate answers (strings) VQA ranks at inference."""
    answers, _ = read_json(path)
    problems = answer_list_problems(path, answers)
    if problems:
        raise RecordError(problems[0])
    return answers


class VQADataset(TaskDataset):
    """VQA: records {"question_id", "question", "image", "answer": [str] | str, "dataset"}.

    Answer weights follow the authors: an answer given by k of the n annotators weighs k / n; a
    Visual Genome answer ("dataset": "vg") weighs 0.5. A flip swaps left/right in the question
    and in the answers. Batch: images [B, 3, H, W], text_ids / text_mask [B, L] (questions),
    answers list[list[str]] (distinct answers of each question, [] without annotations),
    counts list[list[int]] (k, for VQA accuracy min(k / 3, 1)), weights list[list[float]],
    question_ids list, index, skipped; and for the answer decoder's loss (tasks.vqa_loss), every
    distinct answer of the batch as a row: answer_ids / answer_mask [A, La] ("[CLS] answer [SEP]"),
    answer_question int64 [A] (its question's row), answer_weights float32 [A].
    """
    fmt, train_fmt = "vqa", "vqa_train"

    def __getitem__(self, index):
        rec, rng = self.records[index], self.rng(index)
        flip = self.flip(rng)
        image = self.image(rec["image"], rng, flip)
        if image is None:
            return None
        given = rec.get("answer", [])
        given = [given] if isinstance(given, str) else given
        given = [swap_left_right(a) if flip else a for a in given]
        answers = sorted(set(given), key=given.index)
        counts = [given.count(a) for a in answers]
        weights = [0.5] * len(answers) if rec.get("dataset") == "vg" else [k / len(given) for k in counts]
        return {"image": image, "text": self.text(rec["question"], flip), "answers": answers, "counts": counts,
                "weights": weights, "question_id": rec["question_id"], "index": index}

    def collate(self, samples):
        batch, kept = self.collate_common(samples)
        for key in ("answers", "counts", "weights"):
            batch[key] = [s[key] for s in kept]
        batch["question_ids"] = [s["question_id"] for s in kept]
        answers = [a for s in kept for a in s["answers"]]
        batch["answer_ids"], batch["answer_mask"] = self.tokenizer.encode_batch(answers, self.max_tokens)
        batch["answer_question"] = torch.tensor([i for i, s in enumerate(kept) for _ in s["answers"]], dtype=torch.long)
        batch["answer_weights"] = torch.tensor([w for s in kept for w in s["weights"]], dtype=torch.float32)
        return batch


def collate_pairs(dataset, samples):
    """images, images2, text_ids, text_mask, labels, index, skipped for the two-image tasks."""
    batch, kept = dataset.collate_common(samples)
    res = dataset.image_res
    batch["images2"] = torch.stack([s["image2"] for s in kept]) if kept else torch.zeros(0, 3, res, res)
    batch["labels"] = torch.tensor([s["label"] for s in kept], dtype=torch.long)
    return batch


class NLVR2Dataset(TaskDataset):
    """NLVR2: records {"images": [a, b], "sentence", "label": "True" | "False"}.

    Both images of a pair share one flip decision, so the sentence (left/right swapped) stays true
    of the pair. Batch: images [B, 3, H, W] (image 1), images2 [B, 3, H, W] (image 2),
    text_ids / text_mask [B, L], labels int64 [B] (1 = True), index, skipped.
    """
    fmt = "nlvr2"

    def __getitem__(self, index):
        rec, rng = self.records[index], self.rng(index)
        flip = self.flip(rng)
        image, image2 = (self.image(p, rng, flip) for p in rec["images"])
        if image is None or image2 is None:
            return None
        return {"image": image, "image2": image2, "text": self.text(rec["sentence"], flip),
                "label": int(rec["label"] == "True"), "index": index}

    def collate(self, samples):
        return collate_pairs(self, samples)


def proposal_problems(path, value, image_size=None):
    """Message lines for a proposals file that is not {image path: [[x, y, w, h], ...]}."""
    if not isinstance(value, dict):
        return [f"{path}: expected a JSON object {{image: [[x, y, w, h], ...]}}, got a JSON {type(value).__name__}"]
    lines = []
    for image, boxes in value.items():
        out = []
        size = _image(image, "(image)", out, image_size)
        if not isinstance(boxes, list):
            out.append(("(boxes)", f"must be a list of boxes, got {boxes!r}"))
        else:
            for j, box in enumerate(boxes):
                _box(box, f"[{j}]", out, size)
        lines += [f"{path}: image {image!r}: field '{field}': {message}" for field, message in out]
    return lines


def read_proposals(path):
    """Proposal boxes for weakly supervised grounding: {image path: [[x, y, w, h], ...]} in pixels."""
    value, _ = read_json(path)
    problems = proposal_problems(path, value)
    if problems:
        raise RecordError(problems[0])
    return value


class GroundingDataset(TaskDataset):
    """RefCOCO+-style grounding: records {"image", "text", "bbox": [x, y, w, h]}.

    Images are only resized (train and eval), so boxes stay valid: a box normalised by the
    original size is the box of the resized image (IoU does not change under per-axis scaling).
    Batch: images [B, 3, H, W], text_ids / text_mask [B, L], boxes float32 [B, 4] (normalised
    (cx, cy, w, h) of the target), image_sizes int64 [B, 2] (original W, H), image_ids int64 [B]
    (one per image path: the weakly supervised setting trains image-text matching on these
    pairs, where expressions of one image are positives of each other), index, skipped; with
    `proposals` (read_proposals file) also proposals float32 [B, P, 4] (normalised cxcywh,
    zero-padded) and proposal_mask bool [B, P].
    """
    fmt = "grounding"

    def __init__(self, files, image_root, tokenizer, max_tokens, image_res, proposals=None, max_words=30):
        super().__init__(files, image_root, tokenizer, max_tokens, image_res, train=False, max_words=max_words)
        self.proposals = None if proposals is None else read_proposals(proposals)
        if self.proposals is not None:
            missing = [r["image"] for r in self.records if r["image"] not in self.proposals]
            if missing:
                raise RecordError(f"{proposals}: no proposals for image {missing[0]!r} ({len(missing)} images lack them)")
        ids = {}
        self.image_ids = [ids.setdefault(r["image"], len(ids)) for r in self.records]

    def __getitem__(self, index):
        rec = self.records[index]
        img = open_image(self.image_root, rec["image"])
        if img is None:
            return None
        W, H = img.size
        image = to_tensor(img.resize((self.image_res, self.image_res), Image.BICUBIC))
        # the target clipped to the image (annotations may run a pixel past the border)
        x0, y0, w, h = rec["bbox"]
        x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x0 + w, W), min(y0 + h, H)
        sample = {"image": image, "text": clean_caption(rec["text"], self.max_words), "index": index,
                  "box": xywh_to_cxcywh([x0, y0, x1 - x0, y1 - y0], W, H)[0], "size": (W, H),
                  "image_id": self.image_ids[index]}
        if self.proposals is not None:
            sample["proposals"] = xywh_to_cxcywh(self.proposals[rec["image"]], W, H)
        return sample

    def collate(self, samples):
        batch, kept = self.collate_common(samples)
        batch["boxes"] = torch.stack([s["box"] for s in kept]) if kept else torch.zeros(0, 4)
        batch["image_sizes"] = torch.tensor([s["size"] for s in kept], dtype=torch.long).reshape(-1, 2)
        batch["image_ids"] = torch.tensor([s["image_id"] for s in kept], dtype=torch.long)
        if self.proposals is not None:
            most = max((len(s["proposals"]) for s in kept), default=0)
            batch["proposals"] = torch.zeros(len(kept), most, 4)
            batch["proposal_mask"] = torch.zeros(len(kept), most, dtype=torch.bool)
            for i, s in enumerate(kept):
                batch["proposals"][i, :len(s["proposals"])] = s["proposals"]
                batch["proposal_mask"][i, :len(s["proposals"])] = True
        return batch


def task_loader(dataset, batch_size, train, workers=0, seed=0, rank=0, world_size=1, epoch=0):
    """DataLoader over this rank's share of a downstream dataset, for epoch `epoch`.

    Training shuffles (seeded by seed + epoch) and drops the last partial batch; evaluation keeps
    the order and pads the last rank with repeats (DistributedSampler): drop rows by `index`.
    """
    sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=train,
                                                  seed=seed, drop_last=train)
    sampler.set_epoch(epoch)
    dataset.set_epoch(epoch)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                                       collate_fn=dataset.collate, drop_last=train)


class TaskTrainLoader:
    """A downstream training set epoch after epoch, the way train.py consumes it; resumable.

    As PretrainLoader: iterating yields the batches left in the current epoch, then moves on to
    the next, and state_dict() is {"epoch", "batch"}. Epoch e's order is DistributedSampler's
    shuffle for (seed, e) (this rank's share, last partial batch dropped) and each sample's
    augmentation is keyed by (seed, e, index), so a resumed run skips straight to its batch (no
    image is read for the skipped ones) and sees exactly what an uninterrupted run would.
    """

    def __init__(self, dataset, batch_size, workers=0, seed=0, rank=0, world_size=1):
        self.dataset, self.batch_size, self.workers = dataset, batch_size, workers
        self.sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True,
                                                           seed=seed, drop_last=True)
        if len(self) == 0:
            raise ValueError(f"{len(dataset)} training records make no batch of {batch_size} x {world_size} processes")
        self.epoch, self.batch, self.carried_skips = 0, 0, 0

    def __len__(self):
        return len(self.sampler) // self.batch_size

    def state_dict(self):
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state):
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])

    def __iter__(self):
        self.sampler.set_epoch(self.epoch)
        self.dataset.set_epoch(self.epoch)  # workers start afresh each epoch and copy it
        order, size = list(self.sampler), self.batch_size
        batches = [order[b * size:(b + 1) * size] for b in range(self.batch, len(self))]
        # a private generator, as PretrainLoader's: the global RNG belongs to the model
        loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=batches, num_workers=self.workers,
                                             generator=torch.Generator().manual_seed(self.sampler.seed),
                                             collate_fn=self.dataset.collate)
        for batch in loader:
            self.batch += 1
            if len(batch["images"]) == 0:
                self.carried_skips += batch["skipped"]
                continue
            batch["skipped"] += self.carried_skips
            self.carried_skips = 0
            yield batch
        self.epoch, self.batch = self.epoch + 1, 0

# -----------------------------------------------------------------------------
# The synthetic world
#
# Images of 2-4 flat shapes (kind, colour, size) on a lightly mottled background, 96-128 px a side,
# and texts at three granularities: captions listing the shapes, object texts ("red circle") with
# their boxes, and region texts relating two shapes ("red circle left of blue square") with the
# union box. Shapes often share a colour or a kind with another shape of the image, so a bag of
# words does not identify an object: only binding colour to shape to place does.

# What synthesize() writes, relative to its output directory. Images live under images/, and
# every "image" field is relative to it (pass image_root = OUT/images).
SYNTH_FILES = {
    "vocab": "vocab.txt",                               # BERT special ids + the world's words
    "images": "images",                                 # images/{pretrain,train,val,test}/NNNNN.png
    "pretrain_captions": "pretrain_captions.json",      # image-text records (JSON list)
    "pretrain_regions": "pretrain_regions.jsonl",       # region records (JSON lines), other images
    "retrieval_train": "retrieval_train.json",          # one caption a record, with image_id
    "retrieval_val": "retrieval_val.json",              # five captions per image
    "retrieval_test": "retrieval_test.json",
    "vqa_train": "vqa_train.json",                      # three questions per image, ten answers each
    "vqa_val": "vqa_val.json",
    "vqa_test": "vqa_test.json",
    "answer_list": "answer_list.json",                  # every possible answer
    "nlvr2_train": "nlvr2_train.json",                  # image pairs with a true/false sentence
    "nlvr2_val": "nlvr2_val.json",
    "nlvr2_test": "nlvr2_test.json",
    "grounding_train": "grounding_train.json",          # unambiguous expressions with their box
    "grounding_val": "grounding_val.json",
    "grounding_test": "grounding_test.json",
    "grounding_proposals": "grounding_proposals.json",  # all shape boxes + 2 decoys per image
}

COLOURS = {"red": (215, 35, 35), "orange": (245, 140, 20), "yellow": (230, 205, 30),
           "green": (40, 160, 60), "blue": (35, 85, 215), "purple": (140, 55, 185)}
KINDS = ("circle", "square", "triangle", "cross")
SIZES = {"small": (22, 26), "large": (32, 38)}  # side in pixels: a small one covers ~2 patches at 64 px
RELATIONS = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight")


def plural(kind):
    return kind + ("es" if kind.endswith("s") else "s")


# Every word the world's texts use (test_synth_vocab_keeps_bert_ids_and_spells_every_text keeps this honest).
WORDS = sorted(set(" ".join([
    *COLOURS, *KINDS, *SIZES, *NUMBERS, *map(plural, KINDS),
    "a an the and of with picture shapes shape object objects from to left right above below",
    "what color is are there how many in total both images image contains contain exactly",
    "one on at top bottom yes no or shows",
]).split()))


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    size: str
    box: tuple  # (x, y, w, h) in pixels

    @property
    def name(self):
        return f"{self.colour} {self.kind}"


def with_article(phrase):
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def join_words(items):
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def relations(a, b):
    """The relations that strictly hold of shape a to shape b (boxes separated along that axis)."""
    (ax, ay, aw, ah), (bx, by, bw, bh) = a.box, b.box
    return [r for r, holds in (("left of", ax + aw <= bx), ("right of", bx + bw <= ax),
                               ("above", ay + ah <= by), ("below", by + bh <= ay)) if holds]


def union_box(a, b):
    x0, y0 = min(a.box[0], b.box[0]), min(a.box[1], b.box[1])
    x1 = max(a.box[0] + a.box[2], b.box[0] + b.box[2])
    y1 = max(a.box[1] + a.box[3], b.box[1] + b.box[3])
    return [x0, y0, x1 - x0, y1 - y0]


def make_scene(rng):
    """(width, height, shapes): 2-4 non-overlapping shapes, each sharing its colour or its kind
    with an earlier one 30% of the time each, so that colour and kind must be bound to tell them apart."""
    width, height = int(rng.integers(96, 129)), int(rng.integers(96, 129))
    shapes = []
    for _ in range(int(rng.integers(2, 5))):
        colour, kind = str(rng.choice(list(COLOURS))), str(rng.choice(KINDS))
        r = rng.random()
        if shapes and r < 0.3:
            colour = pick(rng, shapes).colour
        elif shapes and r < 0.6:
            kind = pick(rng, shapes).kind
        size = str(rng.choice(list(SIZES)))
        side = int(rng.integers(SIZES[size][0], SIZES[size][1] + 1))
        for _ in range(100):  # rejection sampling of a free spot, 4 px clear of the others
            x, y = int(rng.integers(2, width - side - 1)), int(rng.integers(2, height - side - 1))
            if all(x + side + 4 <= s.box[0] or s.box[0] + s.box[2] + 4 <= x or
                   y + side + 4 <= s.box[1] or s.box[1] + s.box[3] + 4 <= y for s in shapes):
                shapes.append(Shape(kind, colour, size, (x, y, side, side)))
                break
    return width, height, shapes


# Each kind has its own fill as well as its outline: light bands 4 px wide, counted from the shape's
# corner (u, v), on the shape's colour. A ViT sees an outline only through how it crosses the patch
# grid, at whatever offset the shape happens to sit; a fill shows in every patch the shape covers.
# Trained 800 steps (batch 32) to say which of the 4 kinds an image holds, the tiny ViT (8-px
# patches at 64 px) was right for 76% of (image, kind) pairs with outlines alone, 95% with fills.
FILLS = {
    "circle": lambda u, v: np.zeros(u.shape, dtype=bool),  # solid
    "square": lambda u, v: (v // 4) % 2 == 1,              # horizontal stripes
    "triangle": lambda u, v: (u // 4 + v // 4) % 2 == 1,   # checks
    "cross": lambda u, v: (u // 4) % 2 == 1,               # vertical stripes
}


def draw_scene(width, height, shapes, rng):
    """The scene as an RGB image: a soft mottled background, each shape in a slightly jittered
    colour with its kind's fill (FILLS) in a lighter tint of it."""
    base = rng.integers(195, 241, 3)
    blotches = (base + rng.integers(-12, 13, (4, 4, 3))).clip(0, 255).astype(np.uint8)
    pixels = np.array(Image.fromarray(blotches).resize((width, height), Image.BILINEAR))
    v, u = np.mgrid[0:height, 0:width]
    for s in shapes:
        colour = np.clip(np.array(COLOURS[s.colour]) + rng.integers(-12, 13, 3), 0, 255)
        x, y, w, h = s.box
        silhouette = Image.new("1", (width, height))
        draw = ImageDraw.Draw(silhouette)
        if s.kind == "circle":
            draw.ellipse((x, y, x + w - 1, y + h - 1), fill=1)
        elif s.kind == "square":
            draw.rectangle((x, y, x + w - 1, y + h - 1), fill=1)
        elif s.kind == "triangle":
            draw.polygon([(x + w / 2, y), (x + w - 1, y + h - 1), (x, y + h - 1)], fill=1)
        else:  # cross: two bars a third of the side thick
            t = w // 3
            draw.rectangle((x, y + (h - t) // 2, x + w - 1, y + (h + t) // 2 - 1), fill=1)
            draw.rectangle((x + (w - t) // 2, y, x + (w + t) // 2 - 1, y + h - 1), fill=1)
        inside = np.array(silhouette)
        light = FILLS[s.kind](u - x, v - y)
        pixels[inside & ~light] = colour
        pixels[inside & light] = (colour + 255) // 2
    return Image.fromarray(pixels)


def sentence(text, end="."):
    return text[0].upper() + text[1:] + end


def listing(shapes, sized=False):
    """'two red circles, a blue square and a green cross' (identical shapes counted together)."""
    names = [f"{s.size} {s.name}" if sized else s.name for s in shapes]
    groups = sorted(set(names), key=names.index)
    return join_words([with_article(n) if names.count(n) == 1 else f"{NUMBERS[names.count(n)]} {plural_name(n)}"
                       for n in groups])


def plural_name(name):
    *adjectives, kind = name.split()
    return " ".join(adjectives + [plural(kind)])


def caption_templates(shapes, rng):
    """Every caption this scene allows, one per template, in template order."""
    order = [shapes[i] for i in rng.permutation(len(shapes))]
    out = [listing(order), "a picture of " + listing(order), f"{NUMBERS[len(shapes)]} shapes: " + listing(order),
           listing(order, sized=True)]
    by_x = sorted(shapes, key=lambda s: s.box[0])
    if all("left of" in relations(a, b) for a, b in zip(by_x, by_x[1:])):
        out.append("from left to right: " + join_words([with_article(s.name) for s in by_x]))
    pairs = [(a, b, r) for a in order for b in order if a is not b for r in relations(a, b)]
    if pairs:
        a, b, r = pick(rng, pairs)
        rest = [s for s in order if s is not a and s is not b]
        out.append(f"{with_article(a.name)} {r} {with_article(b.name)}" + (f", with {listing(rest)}" if rest else ""))
    return out


def captions(shapes, rng, k):
    """k captions from distinct templates (fewer if the scene allows fewer), as sentences."""
    options = caption_templates(shapes, rng)
    return [sentence(options[i]) for i in sorted(rng.permutation(len(options))[:k].tolist())]


def unique_shapes(shapes):
    """Shapes that their name ('red circle') alone picks out in the scene."""
    names = [s.name for s in shapes]
    return [s for s in shapes if names.count(s.name) == 1]


def region_elems(shapes, rng, max_relations=3):
    """Object texts (attributes + caption, as Visual Genome) and up to max_relations region texts
    relating two uniquely named shapes, with the union box."""
    elems = [{"caption": s.kind, "attributes": f"{s.size} {s.colour}" if rng.random() < 0.3 else s.colour,
              "bb": list(s.box)} for s in shapes]
    named = unique_shapes(shapes)
    pairs = [(a, b) for i, a in enumerate(named) for b in named[i + 1:]]
    for i in rng.permutation(len(pairs))[:max_relations].tolist():
        a, b = pairs[i] if rng.random() < 0.5 else pairs[i][::-1]
        # shapes are placed apart along at least one axis, so some relation always holds
        elems.append({"caption": f"{a.name} {pick(rng, relations(a, b))} {b.name}", "bb": union_box(a, b)})
    return elems


def vqa_questions(shapes, rng, k):
    """k (question, answer) pairs of distinct types among those the scene allows."""
    kinds, colours, named = [s.kind for s in shapes], [s.colour for s in shapes], unique_shapes(shapes)
    options = []
    if any(kinds.count(s.kind) == 1 for s in shapes):
        s = pick(rng, [s for s in shapes if kinds.count(s.kind) == 1])
        options.append((f"what color is the {s.kind}", s.colour))
    if any(colours.count(s.colour) == 1 for s in shapes):
        s = pick(rng, [s for s in shapes if colours.count(s.colour) == 1])
        options.append((f"what shape is the {s.colour} object", s.kind))
    kind = str(rng.choice(KINDS))
    options.append((f"how many {plural(kind)} are there", str(kinds.count(kind))))
    colour = pick(rng, colours) if rng.random() < 0.5 else str(rng.choice(list(COLOURS)))
    options.append((f"how many {colour} objects are there", str(colours.count(colour))))
    options.append(("how many objects are there", str(len(shapes))))
    present = {s.name for s in shapes}
    if rng.random() < 0.5:
        options.append((f"is there {with_article(pick(rng, shapes).name)}", "yes"))
    else:  # prefer a decoy whose colour and kind are both in the image, on different shapes
        decoys = [f"{c} {k}" for c in sorted(set(colours)) for k in sorted(set(kinds)) if f"{c} {k}" not in present]
        decoys = decoys or [f"{c} {k}" for c in COLOURS for k in KINDS if f"{c} {k}" not in present]
        options.append((f"is there {with_article(pick(rng, decoys))}", "no"))
    pairs = [(a, b, r) for a in named for b in named if a is not b for r in relations(a, b)]
    if pairs:
        a, b, r = pick(rng, pairs)
        asked, answer = (r, "yes") if rng.random() < 0.5 else (RELATIONS[r], "no")
        options.append((f"is the {a.name} {asked} the {b.name}", answer))
        a, b, r = pick(rng, pairs)
        axis = "left or right of" if r in ("left of", "right of") else "above or below"
        options.append((f"is the {a.name} {axis} the {b.name}", r.split()[0]))
    return [(sentence(q, "?"), a) for q, a in (options[i] for i in sorted(rng.permutation(len(options))[:k].tolist()))]


VQA_ANSWERS = [*COLOURS, *KINDS, *(str(n) for n in range(5)), "yes", "no", "left", "right", "above", "below"]


def nlvr2_statement(pair, rng, want):
    """A sentence about two scenes whose truth is `want`, or None if none was found in 200 tries."""
    everything = pair[0] + pair[1]
    for _ in range(200):
        template = int(rng.integers(5))
        s = pick(rng, everything)
        has = [any(t.name == s.name for t in shapes) for shapes in pair]
        if template == 0:
            text, truth = f"both images contain {with_article(s.name)}", all(has)
        elif template == 1:
            text, truth = f"exactly one image contains {with_article(s.name)}", has[0] != has[1]
        elif template in (2, 3):
            attribute = "kind" if template == 2 else "colour"
            total = sum(getattr(t, attribute) == getattr(s, attribute) for t in everything)
            n = max(2, total + int(rng.integers(-1, 2)))
            what = plural(s.kind) if template == 2 else f"{s.colour} shapes"
            text, truth = f"there are {NUMBERS[n]} {what} in total", n == total
        else:
            shapes = pick(rng, list(pair))
            if len(shapes) < 2:
                continue
            a, b = (shapes[i] for i in rng.permutation(len(shapes))[:2])
            r = str(rng.choice(list(RELATIONS)))
            truth = any(x.name == a.name and y.name == b.name and r in relations(x, y)
                        for shapes in pair for x in shapes for y in shapes if x is not y)
            text = f"one image shows {with_article(a.name)} {r} {with_article(b.name)}"
        if truth == want:
            return sentence(text)
    return None


def referring_expression(shapes, target, rng):
    """An expression that picks out `target` alone, or None: its name (or kind / colour alone when
    that is unique), else its size, else its place among the look-alikes."""
    same = [s for s in shapes if s.name == target.name]
    if len(same) == 1:
        options = [target.name]
        if [s.kind for s in shapes].count(target.kind) == 1:
            options.append(target.kind)
        if [s.colour for s in shapes].count(target.colour) == 1:
            options.append(f"{target.colour} shape")
        text = pick(rng, options)
    elif [s.size for s in same].count(target.size) == 1:
        text = f"{target.size} {target.name}"
    else:
        others = [s for s in same if s is not target]
        places = [p for p, r in (("on the left", "left of"), ("on the right", "right of"),
                                 ("at the top", "above"), ("at the bottom", "below"))
                  if all(r in relations(target, o) for o in others)]
        if not places:
            return None
        text = f"{target.name} {pick(rng, places)}"
    return ("the " if rng.random() < 0.5 else "") + text


def synth_vocab():
    """[PAD], [unused0-98], [UNK], [CLS], [SEP], [MASK] at BERT's ids, then punctuation, digits,
    letters, the world's words and the letters as word pieces (so any text can be spelled)."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    tokens = ["[PAD]", *(f"[unused{i}]" for i in range(99)), "[UNK]", "[CLS]", "[SEP]", "[MASK]",
              *".,?!'\"-:;/()", *"0123456789", *letters]
    tokens += [w for w in WORDS if w not in tokens] + [f"##{c}" for c in letters]
    return tokens


def write_json(path, records, lines=False):
    """A JSON list with one record a line (diff-friendly), or JSON lines."""
    rows = [json.dumps(r) for r in records]
    Path(path).write_text("\n".join(rows) + "\n" if lines else "[\n" + ",\n".join(rows) + "\n]\n")


def synthesize(out_dir, images=4000, seed=0):
    """Write the synthetic world under out_dir (layout: SYNTH_FILES); return how many records each file holds.

    `images` pre-training images (half with captions only, half with boxes), plus downstream image
    pools train = images // 2, val = test = images // 20 (at least 8 / 6), shared by the tasks as
    COCO's are. The training splits take more from each image (three NLVR2 pairs, every shape a
    referring expression) than the evaluation splits do: the tiny model overfits the fine-tuning
    data long before it tires of pre-training. Every file is a function of (images, seed) alone.
    """
    out = Path(out_dir)
    pools = {"pretrain": images, "train": max(8, images // 2), "val": max(6, images // 20), "test": max(6, images // 20)}
    scenes = {}
    for p, (pool, n) in enumerate(pools.items()):
        (out / "images" / pool).mkdir(parents=True, exist_ok=True)
        scenes[pool] = []
        for i in range(n):
            rng = np.random.default_rng((seed, p, i))
            width, height, shapes = make_scene(rng)
            path = f"{pool}/{i:05d}.png"
            draw_scene(width, height, shapes, rng).save(out / "images" / path, compress_level=1)
            scenes[pool].append((path, shapes))

    def rng(task, pool, i):  # one stream per (task, pool, image): the tasks do not shift each other
        return np.random.default_rng((seed, 1000 + task, list(pools).index(pool), i))

    pre = scenes["pretrain"]
    half = len(pre) // 2
    write_json(out / SYNTH_FILES["pretrain_captions"],
               [{"image": path, "caption": captions(shapes, rng(0, "pretrain", i), 3)} for i, (path, shapes) in enumerate(pre[:half])])
    write_json(out / SYNTH_FILES["pretrain_regions"],
               [{"image": path, "caption": captions(shapes, rng(0, "pretrain", i), 1)[0],
                 "elems": region_elems(shapes, rng(1, "pretrain", i))} for i, (path, shapes) in enumerate(pre[half:], half)],
               lines=True)
    write_json(out / SYNTH_FILES["retrieval_train"],
               [{"image": path, "caption": c, "image_id": f"train_{i}"}
                for i, (path, shapes) in enumerate(scenes["train"]) for c in captions(shapes, rng(2, "train", i), 3)])
    for split in ("val", "test"):
        write_json(out / SYNTH_FILES[f"retrieval_{split}"],
                   [{"image": path, "caption": captions(shapes, rng(2, split, i), 5)} for i, (path, shapes) in enumerate(scenes[split])])
    write_json(out / SYNTH_FILES["answer_list"], VQA_ANSWERS)
    for split in ("train", "val", "test"):
        # ten annotators who all agree, as VQA's ten answers per question
        write_json(out / SYNTH_FILES[f"vqa_{split}"],
                   [{"question_id": i * 10 + j, "question": q, "answer": [a] * 10, "image": path, "dataset": "vqa"}
                    for i, (path, shapes) in enumerate(scenes[split]) for j, (q, a) in enumerate(vqa_questions(shapes, rng(3, split, i), 3))])
        records = []
        pool = scenes[split]
        for i in range((3 if split == "train" else 2) * len(pool)):  # pairs: more than images
            r = rng(4, split, i)
            a, b = (pool[j] for j in r.choice(len(pool), 2, replace=False))
            label = bool(r.random() < 0.5)
            text = nlvr2_statement((a[1], b[1]), r, label)
            if text is not None:
                records.append({"images": [a[0], b[0]], "sentence": text, "label": str(label)})
        write_json(out / SYNTH_FILES[f"nlvr2_{split}"], records)
        records = []
        for i, (path, shapes) in enumerate(pool):
            r = rng(5, split, i)
            for target in [shapes[j] for j in r.permutation(len(shapes))[:None if split == "train" else 2]]:
                text = referring_expression(shapes, target, r)
                if text is not None:
                    records.append({"image": path, "text": text, "bbox": list(target.box)})
        write_json(out / SYNTH_FILES[f"grounding_{split}"], records)
    proposals = {}
    for split in ("train", "val", "test"):
        for i, (path, shapes) in enumerate(scenes[split]):
            r = rng(6, split, i)
            with Image.open(out / "images" / path) as img:
                W, H = img.size
            decoys = []
            for _ in range(2):  # boxes of shape size in random places: a proposal need not hold a shape
                side = int(r.integers(SIZES["small"][0], SIZES["large"][1] + 1))
                decoys.append([int(r.integers(0, W - side)), int(r.integers(0, H - side)), side, side])
            boxes = [list(s.box) for s in shapes] + decoys
            proposals[path] = [boxes[j] for j in r.permutation(len(boxes))]
    (out / SYNTH_FILES["grounding_proposals"]).write_text(json.dumps(proposals) + "\n")
    (out / SYNTH_FILES["vocab"]).write_text("\n".join(synth_vocab()) + "\n")
    return {key: len(read_records(out / name)[0]) for key, name in SYNTH_FILES.items()
            if name.endswith((".json", ".jsonl")) and key != "grounding_proposals"}


def synth_ready(out_dir):
    """Whether out_dir holds a complete synthetic world (train.py writes one when it does not)."""
    return all((Path(out_dir) / name).exists() for name in SYNTH_FILES.values())



# -----------------------------------------------------------------------------
# Checking files and converting public annotations

def detect_format(value):
    """The format of a parsed file, from its shape and the fields of its first record."""
    if isinstance(value, dict) and value and all(isinstance(v, list) for v in value.values()):
        return "proposals"
    records = [value] if isinstance(value, dict) else value
    if isinstance(records, list) and records and all(isinstance(v, str) for v in records):
        return "answer_list"
    first = next((r for r in records if isinstance(r, dict)), {}) if isinstance(records, list) else {}
    for field, fmt in (("question", "vqa"), ("images", "nlvr2"), ("bbox", "grounding"), ("image_id", "retrieval_train")):
        if field in first:
            return fmt
    return "pretrain"  # also holds retrieval val/test records: {"image", "caption": [...]}


def check_files(files, image_root, fmt="auto"):
    """Every problem in `files`, each naming file, record and field, with every image decoded in
    full and every box checked against its image. Returns (problem lines, number of records)."""
    sizes = {}

    def image_size(rel):
        if rel not in sizes:
            try:
                sizes[rel] = load_image(Path(image_root) / rel).size
            except Exception as e:  # noqa: BLE001 -- remembered, reported for each record naming it
                sizes[rel] = e
        if isinstance(sizes[rel], Exception):
            raise sizes[rel]
        return sizes[rel]

    problems, count = [], 0
    for path in files:
        try:
            value, jsonl = read_json(path)
        except RecordError as e:
            problems.append(str(e))
            continue
        except (OSError, UnicodeDecodeError) as e:
            problems.append(f"{path}: cannot read: {e}")
            continue
        kind = detect_format(value) if fmt == "auto" else fmt
        if kind == "answer_list":
            problems += answer_list_problems(path, value)
        elif kind == "proposals":
            problems += proposal_problems(path, value, image_size)
        elif isinstance(value, (list, dict)):
            problems += record_problems(path, [value] if isinstance(value, dict) else value, jsonl, kind, image_size)
        else:
            problems.append(f"{path}: expected a JSON list of records or JSON lines, got a JSON {type(value).__name__}")
        count += len(value) if isinstance(value, (list, dict)) else 0
    return problems, count


def convert_coco(captions=None, instances=None, image_dir=""):
    """COCO annotation files -> pre-training records. With instances: a region record per image that
    has objects (category names as element texts, its captions as "caption"); otherwise (or for
    images without objects) image-text records."""
    files, caps, elems = {}, {}, {}
    if captions:
        coco = json.loads(Path(captions).read_text())
        files.update({im["id"]: im["file_name"] for im in coco["images"]})
        for a in coco["annotations"]:
            caps.setdefault(a["image_id"], []).append(a["caption"].strip())
    if instances:
        coco = json.loads(Path(instances).read_text())
        files.update({im["id"]: im["file_name"] for im in coco["images"]})
        names = {c["id"]: c["name"] for c in coco["categories"]}
        for a in coco["annotations"]:
            # a crowd box covers many objects under one label: not a single visual concept
            if not a.get("iscrowd") and a["bbox"][2] > 0 and a["bbox"][3] > 0:
                elems.setdefault(a["image_id"], []).append({"caption": names[a["category_id"]], "bb": a["bbox"]})
    records = []
    for image_id in sorted(files):
        rec = {"image": f"{image_dir}/{files[image_id]}" if image_dir else files[image_id]}
        if caps.get(image_id):
            rec["caption"] = caps[image_id]
        if elems.get(image_id):
            rec["elems"] = elems[image_id]
        if len(rec) > 1:
            records.append(rec)
    return records


def convert_vg(objects=None, regions=None, image_dir="VG_100K", image_data=None):
    """Visual Genome -> region records: objects (objects.json, or attributes.json for their
    attributes) and region descriptions (region_descriptions.json) as elements. Image paths are
    image_dir/ID.jpg, or taken from the urls of image_data.json (VG_100K or VG_100K_2)."""
    elems = {}
    if objects:
        for entry in json.loads(Path(objects).read_text()):
            for o in entry.get("objects", entry.get("attributes", [])):
                names = [n.strip() for n in o.get("names", [o.get("name", "")]) if n.strip()]
                if names and o["w"] > 0 and o["h"] > 0:
                    elem = {"caption": names[0], "bb": [o["x"], o["y"], o["w"], o["h"]]}
                    attributes = [a.strip() for a in o.get("attributes") or [] if a.strip()]
                    if attributes:  # one is drawn per sample, as the authors do
                        elem["attributes"] = attributes
                    elems.setdefault(entry.get("image_id", entry.get("id")), []).append(elem)
    if regions:
        for entry in json.loads(Path(regions).read_text()):
            for r in entry["regions"]:
                if r["phrase"].strip() and r["width"] > 0 and r["height"] > 0:
                    elems.setdefault(r["image_id"], []).append(
                        {"caption": r["phrase"].strip(), "bb": [r["x"], r["y"], r["width"], r["height"]]})
    paths = {}
    if image_data:
        paths = {im.get("image_id", im.get("id")): "/".join(im["url"].split("/")[-2:])
                 for im in json.loads(Path(image_data).read_text())}
    return [{"image": paths.get(i, f"{image_dir}/{i}.jpg"), "elems": elems[i]} for i in sorted(elems)]


# -----------------------------------------------------------------------------
# Command line

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="write the synthetic world (images + every task's JSON + vocab.txt)",
                       description="Write the synthetic multi-grained world. Layout (data.SYNTH_FILES): "
                       + ", ".join(SYNTH_FILES.values()) + ". Image paths are relative to OUT/images.")
    p.add_argument("--out", default="synth", help="output directory (created; files in it are overwritten)")
    p.add_argument("--images", type=int, default=4000,
                   help="pre-training images; the downstream pools get images/2 (train) and images/20 (val, test)")
    p.add_argument("--seed", type=int, default=0, help="the world is a function of this seed alone")

    p = sub.add_parser("check", help="validate data files and every image they name",
                       description="Read every record, decode every image, report each problem with file, record "
                       "and field; exit 1 if there is any.")
    p.add_argument("files", nargs="+", help="JSON / JSON lines files of any format, answer lists, proposal files")
    p.add_argument("--image-root", required=True, help="directory the records' image paths are relative to")
    p.add_argument("--format", default="auto", choices=["auto", *FORMATS, "answer_list", "proposals"],
                   help="record format; auto = from the fields of each file's first record")

    p = sub.add_parser("convert-coco", help="COCO captions / instances -> pre-training records",
                       description="COCO captions -> image-text records; with --instances, region records whose "
                       "elements are the object boxes with their category names.")
    p.add_argument("--captions", help="captions_*.json (COCO captions annotation file)")
    p.add_argument("--instances", help="instances_*.json (COCO detection annotation file)")
    p.add_argument("--image-dir", default="", help="prefix of the image paths, relative to the image root, e.g. train2014")
    p.add_argument("--out", required=True, help="output file: .json for a JSON list, .jsonl for JSON lines")

    p = sub.add_parser("convert-vg", help="Visual Genome objects / regions -> region records",
                       description="Visual Genome objects (with attributes) and region descriptions -> region "
                       "records, one per image.")
    p.add_argument("--objects", help="objects.json, or attributes.json to keep the objects' attributes")
    p.add_argument("--regions", help="region_descriptions.json")
    p.add_argument("--image-dir", default="VG_100K", help="image paths are IMAGE_DIR/ID.jpg relative to the image root")
    p.add_argument("--image-data", help="image_data.json: take each image's folder (VG_100K or VG_100K_2) from its url")
    p.add_argument("--out", required=True, help="output file: .json for a JSON list, .jsonl for JSON lines")

    args = parser.parse_args(argv)
    if args.command == "synth":
        counts = synthesize(args.out, images=args.images, seed=args.seed)
        print(f"wrote the synthetic world to {args.out}/ (images under {args.out}/{SYNTH_FILES['images']}/):")
        for key, n in counts.items():
            print(f"  {SYNTH_FILES[key]:26s} {n:6d} records")
        return 0
    if args.command == "check":
        problems, count = check_files(args.files, args.image_root, args.format)
        for line in problems:
            print(line)
        print(f"{count} records in {len(args.files)} file(s): {len(problems)} problem(s)")
        return 1 if problems else 0
    if args.command == "convert-coco":
        if not (args.captions or args.instances):
            parser.error("convert-coco needs --captions and/or --instances")
        records = convert_coco(args.captions, args.instances, args.image_dir)
    else:
        if not (args.objects or args.regions):
            parser.error("convert-vg needs --objects and/or --regions")
        records = convert_vg(args.objects, args.regions, args.image_dir, args.image_data)
    write_json(args.out, records, lines=str(args.out).endswith(".jsonl"))
    print(f"wrote {len(records)} records to {args.out}; next: python data.py check {args.out} --image-root DIR")
    return 0


if __name__ == "__main__":
    sys.exit(main())
