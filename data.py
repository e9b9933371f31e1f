"""
Data for X-VLM: tokenizer, image+box transforms, datasets for every format, checks and converters.

X-VLM's idea is data: images whose regions are enclosed by boxes, each box paired with a text
(object labels, region descriptions) next to whole-image captions. This file reads that data in
the authors' public formats, checks it and turns it into batches. synth.py writes a small
synthetic world in the same formats, so that everything runs with no download.

    python data.py check synth/*.json* --image-root synth/images   # validate records and images
    python data.py convert-coco --help               # COCO captions/instances -> these formats
    python data.py convert-vg --help                 # Visual Genome objects/regions -> these formats
    python data.py shards --data F... --image-root R --out DIR   # records -> tar shards (img2dataset's layout)
    python data.py check 'DIR/{00000..00009}.tar'    # validate shards: every sample, every image

From Python (train.py / tasks.py):

    import data
    tok = data.Tokenizer("synth/vocab.txt")          # a world synth.py wrote: python synth.py --out synth
    cfg = xvlm.XVLMConfig.tiny(vocab_size=tok.vocab_size)   # image_res, max_tokens, masking
    dataset = data.PretrainDataset(["synth/pretrain_captions.json", "synth/pretrain_regions.jsonl"],
                                   "synth/images", tok, cfg)
    for batch in data.pretrain_loader(dataset, batch_size=32): ...   # one epoch; state_dict() to resume

Contents, top to bottom:
  text      Tokenizer (BERT WordPiece via `tokenizers`), the authors' masking, clean_caption
  records   read_records, write_records, every format as a table of field checks, load_records
            (fails fast, naming file / record / field)
  images    load_image (any mode), crops, flips, resizes that carry boxes, to_tensor
  pretrain  PretrainDataset, pretrain_loader: half image-text, half box-annotated images (paper 4.2)
  shards    tar shards (WebDataset / img2dataset): expand_braces, tar_samples, SampleStream (per rank and
            worker, shuffle buffer), StreamLoader (step-exact resume), write_shards, check_shards
  tasks     RetrievalTrainDataset, RetrievalEvalDataset, VQADataset, NLVR2Dataset,
            GroundingDataset, task_train_loader, eval_loader
  cli       check, convert-coco, convert-vg; run_cli (one-line errors, for every command line)
"""

import argparse
import copy
import glob
import hashlib
import io
import itertools
import json
import math
import os
import pickle
import re
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers


# -----------------------------------------------------------------------------
# Text

# BERT's special tokens. The model's config defaults use these ids (PAD 0, UNK 100, CLS 101,
# SEP 102, MASK 103), so the synthetic vocab keeps them at the same positions.
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


class Tokenizer:
    """BERT WordPiece over a `vocab.txt` (one token a line, id = line number).

    Same pipeline as BERT: clean control characters, split CJK characters, lowercase and strip
    accents (uncased vocabularies), split on whitespace and punctuation, greedy longest-match
    WordPiece with [UNK] for words it cannot spell, then [CLS] ... [SEP], or with sep=False [CLS] ...
    alone, as the authors' tokenizer writes every text the released models read (XVLMConfig.text_sep;
    with_sep gives the tokenizer of a model's convention).
    """

    def __init__(self, vocab_file, lowercase=True, sep=True):
        self.vocab_file, self.sep = str(vocab_file), sep
        vocab = {}
        try:
            lines = Path(vocab_file).read_text(encoding="utf-8").split("\n")
        except (OSError, UnicodeDecodeError) as e:
            raise RecordError(f"{vocab_file}: not a vocabulary (a BERT vocab.txt, one token a line): "
                              f"{e.strerror if isinstance(e, OSError) and e.strerror else e}") from None
        for i, token in enumerate(lines[:-1] if lines[-1] == "" else lines):
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
        # whole-word masking groups a word's pieces: every piece after the first starts with "##"
        self.is_piece = np.array([token.startswith("##") for token in vocab], dtype=bool)

    def with_sep(self, sep):
        """This tokenizer, ending its texts in [SEP] (sep=True) or not (the authors' released models)."""
        other = copy.copy(self)
        other.sep = sep
        return other

    def encode(self, text, max_tokens, sep=None):
        """One text -> [CLS] tokens [SEP] as a list of ids, at most max_tokens (the tail is cut, never [SEP]).
        sep=False: [CLS] tokens, as the authors' released models read texts; None: the tokenizer's `sep`."""
        if max_tokens < 3:
            raise ValueError(f"max_tokens must leave room for [CLS], a token and [SEP], got {max_tokens}")
        sep = self.sep if sep is None else sep
        pieces = self._tok.encode(text, add_special_tokens=False).ids
        return [self.cls_id] + (pieces[:max_tokens - 2] + [self.sep_id] if sep else pieces[:max_tokens - 1])

    def pad(self, rows, value=None):
        """Id lists -> (ids int64 [n, L], mask bool [n, L]), L = the longest, padded with `value` ([PAD])."""
        length = max((len(r) for r in rows), default=2)
        ids = torch.full((len(rows), length), self.pad_id if value is None else value, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask = torch.arange(length)[None, :] < torch.tensor([len(r) for r in rows], dtype=torch.long)[:, None]
        return ids, mask

    def encode_batch(self, texts, max_tokens, sep=None):
        """Texts -> (input_ids int64 [n, L], attention_mask bool [n, L]), L = longest, <= max_tokens.

        Each row is [CLS] tokens [SEP] [PAD]... (sep as in encode); a long text loses its tail tokens, never [SEP].
        """
        # one `encode` per text, not `encode_batch`: the batch call starts a thread pool, and a
        # DataLoader worker forked after that pool exists gets the parallelism disabled with a warning
        return self.pad([self.encode(t, max_tokens, sep) for t in texts])

    def decode(self, ids):
        """Ids (list or 1-D tensor) -> text, special tokens left out, word pieces joined."""
        ids = ids.tolist() if torch.is_tensor(ids) else list(ids)
        return self._tok.decode([i for i in ids if i not in self.special_ids], skip_special_tokens=False)


def mask_spans(tokens, is_piece, rng, n, span_prob=0.2, span_max=3):
    """The spans (start, end) the authors' TextMaskingGenerator masks in `tokens` ([CLS] first):
    candidates 1.. in random order; each not yet masked starts a span of one token, or with
    probability span_prob of 2..span_max tokens, widened to whole words (back to the word's first
    piece, on over its "##" pieces) and cut at the end of the text; spans are added until they
    cover n positions or more. Every word is in or out whole."""
    covered, spans = set(), []
    for pos in rng.permutation(np.arange(1, len(tokens))).tolist():
        if len(covered) >= n:
            break
        if pos in covered:
            continue
        end = pos + (int(rng.integers(2, span_max + 1)) if span_prob > 0 and rng.random() < span_prob else 1)
        start = pos
        while start > 0 and is_piece[tokens[start]]:
            start -= 1
        while end < len(tokens) and is_piece[tokens[end]]:
            end += 1
        if start > 0:  # (a text cannot start with a "##" piece; theirs adds nothing then either)
            spans.append((start, min(end, len(tokens))))
            covered.update(range(*spans[-1]))
    return spans


def mask_text(ids, is_piece, rng, vocab_size, mask_id, prob=0.25, max_masks=8, spans=(0.2, 3)):
    """MLM corruption of one text (paper 3.3), as the authors' TextMaskingGenerator does it.

    ids: [CLS] tokens [SEP] (a list); is_piece: bool per vocabulary id, True for "##" pieces.
    n = min(max_masks, max(1, round(prob * (1 + #tokens)))) positions are masked ([CLS] counts in
    the length; [SEP] is not a candidate, as the authors mask before appending it): the mask_spans
    whole words and spans, and if the last one overshoots n, n of their positions at random (the
    only way a word is split). Each masked position becomes [MASK] with probability 0.8, else a
    random vocabulary id with probability 0.5, else stays. spans: (span_prob, span_max) of mask_spans.
    Returns (corrupted ids, labels: the original id where masked, -100 elsewhere).
    """
    tokens = ids[:-1]  # without [SEP]
    n = min(max_masks, max(1, round(len(tokens) * prob)))  # Python's round, half to even, as theirs
    masked = sorted({p for start, end in mask_spans(tokens, is_piece, rng, n, *spans) for p in range(start, end)})
    if len(masked) > n:
        masked = sorted(rng.permutation(masked)[:n].tolist())
    out, labels = list(ids), [-100] * len(ids)
    for pos in masked:
        labels[pos] = ids[pos]
        if rng.random() < 0.8:
            out[pos] = mask_id
        elif rng.random() < 0.5:
            out[pos] = int(rng.integers(vocab_size))
    return out, labels


def text_key(text):
    """A stable 63-bit id of a text's words, the same in every process (itc's equal-text positives)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little") >> 1


# Text clean-up exactly as the authors' dataset/utils.py, so that a text gives their tokens (the released
# models read those): pre_caption for every caption, region text, sentence and referring expression, and
# pre_question for VQA questions. Both delete , . ' ! ? " ( ) * # : ; ~ ("man's" -> "mans", "3.5" -> "35")
# and turn - and / into spaces; they cap the words counted between single spaces.
_DELETED = re.compile(r"[,.'!?\"()*#:;~]")
_SPACES = re.compile(r"\s{2,}")


def clean_caption(text, max_words=30):
    """Their pre_caption: lowercase, delete the marks above, - and / to spaces, "<person>" to "person", runs
    of whitespace to one space, trim, keep max_words. A text with no words gives "" (theirs raises)."""
    text = _DELETED.sub("", text.lower()).replace("-", " ").replace("/", " ").replace("<person>", "person")
    text = _SPACES.sub(" ", text).rstrip("\n").strip(" ")
    return " ".join(text.split(" ")[:max_words])


def clean_question(text, max_words=50):
    """Their pre_question: as clean_caption, but "<person>" and runs of spaces stay (an extra space counts
    as an empty word), and only the end is trimmed; max_words: 50 when they evaluate, 30 in training."""
    text = _DELETED.sub("", text.lower()).replace("-", " ").replace("/", " ").rstrip(" ")
    return " ".join(text.split(" ")[:max_words])


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
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise RecordError(f"{path}: cannot read: {e.strerror if isinstance(e, OSError) and e.strerror else e}") from None
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


def write_records(path, records, lines=False):
    """A JSON list with one record a line (diff-friendly), or JSON lines."""
    rows = [json.dumps(r) for r in records]
    Path(path).write_text("\n".join(rows) + "\n" if lines else "[\n" + ",\n".join(rows) + "\n]\n")


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# Each format is a table {field: (required, check)}. A check(value, field, out, seen) appends
# (field, message) pairs to `out`; `seen` carries image_size (path -> (W, H), or None: images are not
# opened) and the record's image size once its image field was checked, for the boxes that follow.

def _texts(value, field, out, seen, allow_list=True):
    """A non-empty text, or (allow_list) a non-empty list of them."""
    if isinstance(value, list) and allow_list:
        if not value:
            out.append((field, "empty list of texts"))
        for j, v in enumerate(value):
            _texts(v, f"{field}[{j}]", out, seen, allow_list=False)
    elif not isinstance(value, str):
        out.append((field, f"must be a string{' or a list of strings' if allow_list else ''}, got {value!r}"))
    elif not clean_caption(value):
        out.append((field, f"empty text {value!r}"))


def _text(value, field, out, seen):
    _texts(value, field, out, seen, allow_list=False)


# Annotation tools round coordinates, so a box may end a pixel past the border (Visual Genome
# has many); training clips boxes to the image anyway.
BOX_TOLERANCE = 1.0


def _box(value, field, out, seen):
    """[x, y, w, h] in pixels: four finite numbers, positive size, inside the image (W, H) if known."""
    if not (isinstance(value, (list, tuple)) and len(value) == 4 and all(_is_number(v) for v in value)):
        out.append((field, f"box must be 4 numbers [x, y, w, h], got {value!r}"))
        return
    x, y, w, h = value
    size = seen.get("size")
    if w <= 0 or h <= 0:
        out.append((field, f"box has a non-positive size: w={w}, h={h}"))
    elif x < -BOX_TOLERANCE or y < -BOX_TOLERANCE:
        out.append((field, f"box {value} starts outside the image"))
    elif size is not None and (x + w > size[0] + BOX_TOLERANCE or y + h > size[1] + BOX_TOLERANCE):
        out.append((field, f"box {value} lies outside the {size[0]}x{size[1]} image"))


def _image(path, field, out, seen):
    """An image path; with seen["image_size"], the image must open, and its (W, H) is kept in seen."""
    if not isinstance(path, str) or not path:
        out.append((field, f"must be an image path, got {path!r}"))
    elif seen.get("image_size") is not None:
        try:
            seen["size"] = seen["image_size"](path)
        except Exception as e:  # noqa: BLE001 -- any decoder error means the same thing: unusable image
            out.append((field, f"cannot read image {path!r}: {type(e).__name__}: {e}"))


def _image_pair(value, field, out, seen):
    if not isinstance(value, list) or len(value) != 2:
        out.append((field, f"must be a list of two image paths, got {value!r}"))
    else:
        for j, path in enumerate(value):
            _image(path, f"{field}[{j}]", out, seen)


def _id(value, field, out, seen):
    if not isinstance(value, (str, int)) or isinstance(value, bool):
        out.append((field, f"must be a string or an integer, got {value!r}"))


def _answers(value, field, out, seen):
    answers = value if isinstance(value, list) else [value]
    if not answers or not all(isinstance(a, str) and a.strip() for a in answers):
        out.append((field, f"must be a non-empty string or list of them, got {value!r}"))


def _true_false(value, field, out, seen):
    if value not in ("True", "False"):
        out.append((field, f"must be \"True\" or \"False\", got {value!r}"))


ELEMENT_KINDS = ("object", "region")
REFERRING_KINDS = ("name", "attribute", "position", "relation")  # RefCOCO+'s kinds of expression


def _element_kind(value, field, out, seen):
    if value not in ELEMENT_KINDS:
        out.append((field, f"must be one of {', '.join(map(repr, ELEMENT_KINDS))}, got {value!r}"))


# An element of a region record: a labelled object or a region description (kind), for Table 3's ablations.
ELEMENT = {"caption": (True, _texts), "bb": (True, _box), "attributes": (False, _texts), "kind": (False, _element_kind)}


def _elements(value, field, out, seen):
    if not isinstance(value, list) or not value:
        out.append((field, f"must be a non-empty list of regions, got {value!r}"))
        return
    for j, elem in enumerate(value):
        if isinstance(elem, dict):
            out += check_fields(elem, ELEMENT, seen, f"{field}[{j}].")
        else:
            out.append((f"{field}[{j}]", f"must be an object, got {elem!r}"))


VQA = {"question_id": (True, _id), "question": (True, _text), "image": (True, _image), "answer": (False, _answers),
       "dataset": (False, _text)}  # test sets have no answers
FORMATS = {
    "pretrain": {"image": (True, _image), "caption": (True, _texts)},  # image-text; with "elems": PRETRAIN_REGION
    "retrieval_train": {"image": (True, _image), "caption": (True, _text), "image_id": (True, _id)},
    "retrieval_eval": {"image": (True, _image), "caption": (True, _texts)},
    "vqa": VQA,
    "vqa_train": {**VQA, "answer": (True, _answers)},  # training needs the answers
    "nlvr2": {"images": (True, _image_pair), "sentence": (True, _text), "label": (True, _true_false)},
    "grounding": {"image": (True, _image), "text": (True, _text), "bbox": (True, _box), "kind": (False, _text),
                  "split": (False, _text)},
}
PRETRAIN_REGION = {"image": (True, _image), "caption": (False, _texts), "elems": (True, _elements)}


def check_fields(rec, schema, seen, prefix=""):
    """The (field, message) problems of one record (a dict) against a format's table."""
    out = []
    for name, (required, check) in schema.items():
        if name in rec:
            check(rec[name], prefix + name, out, seen)
        elif required:
            out.append((prefix + name, "missing field"))
    return out


def record_problem_list(rec, fmt, image_size=None):
    """The (field, message) problems of one record of format `fmt`; with image_size (path -> (W, H)),
    its images are opened and its boxes checked against them."""
    if not isinstance(rec, dict):
        return [("(record)", f"must be a JSON object, got {rec!r}")]
    schema = PRETRAIN_REGION if fmt == "pretrain" and "elems" in rec else FORMATS[fmt]
    return check_fields(rec, schema, {"image_size": image_size})


def record_problems(records, fmt, image_size=None):
    """Every problem of every record of one file, as (record index, field, message) triples."""
    return [(i, field, message) for i, rec in enumerate(records) for field, message in record_problem_list(rec, fmt, image_size)]


def problem_lines(path, found, jsonl):
    """`python data.py check`'s report: 'file: record i (line i+1): field 'f': message', one a line."""
    return [f"{record_name(path, i, jsonl)}: field '{field}': {message}" for i, field, message in found]


def problem_summary(path, found, jsonl, n_records):
    """One line for a file's problems, each kind of problem once with how many records have it."""
    kinds = {}
    for i, field, message in found:
        kinds.setdefault((re.sub(r"\[\d+\]", "[j]", field), message[:120]), []).append((i, field))
    parts = []
    for (field, message), rows in list(kinds.items())[:3]:
        where = record_name("", rows[0][0], jsonl)[2:]
        parts.append(f"{where}: field '{rows[0][1]}': {message}" if len(rows) == 1 else
                     f"field '{field}': {message} ({len(rows)} of {n_records} records, the first {where})")
    more = f"; and {len(kinds) - 3} more kinds of problem" if len(kinds) > 3 else ""
    return f"{path}: " + "; ".join(parts) + more


def load_records(files, fmt):
    """Read and check all records of `files` (one path or several, concatenated in order).

    Raises RecordError, one line per file naming each kind of problem, before any compute is spent.
    Images are not opened here (that is `python data.py check`); a corrupt image met during training
    is skipped and counted.
    """
    files = [files] if isinstance(files, (str, Path)) else list(files)
    if not files:
        raise RecordError(f"no {fmt} files given")
    records, problems = [], []
    for path in files:
        recs, jsonl = read_records(path)
        found = record_problems(recs, fmt)
        if found:
            problems.append(problem_summary(path, found, jsonl, len(recs)))
        records += recs
    if problems:
        raise RecordError(f"malformed {fmt} records (`python data.py check` lists each): " + " | ".join(problems))
    if not records:
        raise RecordError(f"{', '.join(map(str, files))}: no records")
    return records


# -----------------------------------------------------------------------------
# Images and boxes
#
# Boxes travel as float arrays [n, 4] of (x, y, w, h) in pixels of the image at hand; only at the
# end do they become (cx, cy, w, h) normalised by the final image size, the form the model predicts.

# The authors' normalisation (CLIP's constants), for every image of every task.
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)

DECODINGS = ("ours", "pil")  # to_rgb's two readings of an image file: ours, or PIL's convert("RGB") (the authors')


def to_rgb(img, decode="ours"):
    """Any PIL image -> 8-bit RGB (L, LA, RGBA, P, CMYK, 16-bit, 32-bit integer and float, ...), the
    one conversion for image files and for PIL images handed to the inference API. decode="pil":
    PIL's convert("RGB") instead, as the authors' datasets read every image (the released models saw
    transparent pixels in the colour stored underneath, 16-bit images clipped).

    Wide modes are scaled by the range their values use, not clipped: 16-bit by 1/257; 32-bit
    integers and floats by what fits their largest value (0..1, 0..255, 0..65535, else the maximum).
    Transparent pixels show as white paper (their colour underneath is arbitrary).
    """
    if decode == "pil":
        return img.convert("RGB")
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        x = np.nan_to_num(np.asarray(img, dtype=np.float64))
        top = x.max(initial=0.0)
        ranges = [(1.0, 255.0)] if img.mode == "F" else []  # a float image in 0..1
        ranges += [(255.0, 1.0), (65535.0, 1 / 257)] if not img.mode.startswith("I;16") else [(65535.0, 1 / 257)]
        scale = next((s for limit, s in ranges if top <= limit), 255.0 / max(top, 1e-12))
        img = Image.fromarray((x * scale).clip(0, 255).round().astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        img = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img.alpha_composite(rgba)
    return img.convert("RGB")


def load_image(path, decode="ours"):
    """Any image file -> 8-bit RGB PIL image (to_rgb, `decode` its reading). Raises if unreadable.

    EXIF orientation is not applied: COCO and Visual Genome boxes refer to the stored pixels.
    """
    with Image.open(path) as img:
        img.load()  # decode now, so that a truncated or corrupt file fails here, not in a transform
        return to_rgb(img, decode)


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


def region_crop(width, height, box, rng, scale=None):
    """A random window (x, y, w, h) of whole pixels that contains `box` whole: the authors' (each edge
    uniform between the box and the border), or with `scale` (LO, HI), a random resized crop of that
    share of the area widened to hold the box."""
    if scale is not None:
        x, y, w, h = random_resized_crop(width, height, rng, scale)
        x0, y0 = min(x, math.floor(box[0])), min(y, math.floor(box[1]))
        x1, y1 = max(x + w, min(math.ceil(box[0] + box[2]), width)), max(y + h, min(math.ceil(box[1] + box[3]), height))
        return x0, y0, x1 - x0, y1 - y0
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
    (W, H) of the resized result. Each box is clipped to the window and kept only if more than
    `min_visible` of its area survives (the authors' min_perc_in_image rule). Returns (kept boxes
    [k, 4] in output pixels, keep mask [n]).
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    cx0, cy0, cw, ch = crop
    x0 = np.maximum(boxes[:, 0], cx0)
    y0 = np.maximum(boxes[:, 1], cy0)
    x1 = np.minimum(boxes[:, 0] + boxes[:, 2], cx0 + cw)
    y1 = np.minimum(boxes[:, 1] + boxes[:, 3], cy0 + ch)
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    keep = (inter > 0) & (inter > min_visible * boxes[:, 2] * boxes[:, 3])
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

class DataError(ValueError):
    """The data cannot be used as given (no readable image, no records). The message says which."""


class UsageError(ValueError):
    """A flag, an input or an output directory that cannot work; the message says what to do instead."""


class Unreadable(NamedTuple):
    """What a dataset returns for an image it cannot open: batches leave it out and list it under
    "skipped", and train.py logs and counts each one."""
    path: str
    reason: str
    what: str = "unreadable image"  # "sample": a tar shard's sample that is not one (no caption, bad JSON, ...)


def open_image(image_root, rel, decode="ours"):
    """load_image(image_root / rel, decode), or an Unreadable naming the file and the error."""
    path = Path(image_root) / rel
    try:
        return load_image(path, decode)
    except Exception as e:  # noqa: BLE001 -- every decoder error means the same: skip this image
        return Unreadable(str(path), f"{type(e).__name__}: {e}")


def readable(samples):
    """(the samples that are not Unreadable, the Unreadable ones)."""
    return [s for s in samples if not isinstance(s, Unreadable)], [s for s in samples if isinstance(s, Unreadable)]


def stack_images(samples, res, key="image"):
    """The samples' image tensors as a batch [B, 3, res, res] (B may be 0)."""
    return torch.stack([s[key] for s in samples]) if samples else torch.zeros(0, 3, res, res)


def pick(rng, value):
    """One of a list (at random), or the value itself: captions may be a string or a list."""
    return value[int(rng.integers(len(value)))] if isinstance(value, list) else value


def elem_text(elem, rng):
    """A region's text: "attributes caption" when it has attributes, as in the authors' code."""
    text = pick(rng, elem["caption"])
    return f"{pick(rng, elem['attributes'])} {text}" if "attributes" in elem else text


def split_records(records, elements):
    """(image-text records, region records) keeping only elements of the given kinds ("object",
    "region"): a region record left with none becomes an image-text record if it has a caption.
    With both kinds, elements need no "kind"; otherwise each must say which it is."""
    texts, regions = [], []
    for i, r in enumerate(records):
        if "elems" not in r:
            texts.append(r)
            continue
        if set(elements) != set(ELEMENT_KINDS):
            unsaid = [j for j, e in enumerate(r["elems"]) if "kind" not in e]
            if unsaid:
                raise DataError(f"record {i} ({r['image']}): element {unsaid[0]} has no 'kind' ('object' or 'region'), "
                                f"which keeping only {' and '.join(elements) or 'no'} elements needs")
        kept = [e for e in r["elems"] if e.get("kind", "object") in elements]
        if kept:
            regions.append({**r, "elems": kept})
        elif "caption" in r:
            texts.append({"image": r["image"], "caption": r["caption"]})
    return texts, regions


class Crops(NamedTuple):
    """Pre-training crops. An image-text image: a random resized crop of `image` (LO, HI) of its area.
    A box-annotated image: a window holding its chosen element whole, the authors' (region None) or a
    random resized crop of `region` of the area widened to hold it (data.region_crop)."""
    image: tuple = (0.2, 1.0)
    region: tuple = None


class PretrainDataset(torch.utils.data.Dataset):
    """Pre-training records (several files, JSON list or lines), made into samples by key.

    A record with "elems" is a region record, any other an image-text record. A key is
    (kind, index, seed), kind 0 = image-text, 1 = region: the sampler chooses the record and the
    seed of its random crop, flip and masking, so a sample is the same whichever worker makes it.

    A sample is an Unreadable, or a dict: "image" float32 [3, res, res], and per text "texts"
    (cleaned), "ids" ([CLS] ... [SEP]), "mlm" ((corrupted ids, labels) of mask_text, with `mlm`),
    "kinds" ("caption", or the element's kind: "object", "region"),
    "boxes" (normalised (cx, cy, w, h) float32 [4], or None for a whole-image text) and "concepts"
    (visual-concept ids). Concept ids are stable across processes: one per distinct image path (all
    its captions are positives of each other), then one per element of each region record, in order.
    `elements` keeps only object or region texts (Table 3's "w/o object", "w/o region").
    """

    max_words = 30  # texts are cut to this many words (clean_caption)

    def __init__(self, files, image_root, tokenizer, cfg, max_regions=5, crops=Crops(), elements=ELEMENT_KINDS, mlm=True):
        record_files, shard_paths = split_data(files)
        records = load_records(record_files, "pretrain") if record_files or not shard_paths else []
        try:
            self.texts, self.regions = split_records(records, elements)
        except DataError as e:
            raise DataError(f"{', '.join(record_files)}: {e}") from None
        self.shards = open_tar_shards(shard_paths)  # kind -> [TarShard]: the samples of that kind stream from these
        for kind, held in enumerate((self.texts, self.regions)):
            if held and self.shards[kind]:
                raise UsageError(f"--data: {SAMPLE_KINDS[kind]} records come from both JSON ({len(held)} records) and "
                                 f"shards ({self.shards[kind][0].path}, ...): one source a kind; pack the JSON into shards "
                                 "with python data.py shards")
        self.image_root = None if image_root is None else Path(image_root)
        if records and self.image_root is None:
            raise UsageError(f"--data {', '.join(record_files)}: JSON records need --image-root")
        self.tokenizer, self.cfg, self.elements = tokenizer, cfg, elements
        self.max_regions, self.crops, self.mlm = max_regions, Crops(*crops), mlm
        image_ids = {}
        for r in records:
            image_ids.setdefault(r["image"], len(image_ids))
        self.text_concept = [image_ids[r["image"]] for r in self.texts]
        self.region_concept = [image_ids[r["image"]] for r in self.regions]
        self.elem_concept = np.cumsum([len(image_ids)] + [len(r["elems"]) for r in self.regions])[:-1].tolist()

    def counts(self, image_text=True):
        """How many samples of each kind (image-text, box-annotated) there are, JSON records or shard samples."""
        return tuple(len(held) + sum(s.samples for s in self.shards[kind]) if image_text or kind == 1 else 0
                     for kind, held in enumerate((self.texts, self.regions)))

    def __len__(self):
        return sum(self.counts())

    def __getitem__(self, key):
        kind, index, seed = key
        rec = self.texts[index] if kind == 0 else self.regions[index]
        img = open_image(self.image_root, rec["image"])
        if isinstance(img, Unreadable):
            return img
        concept = self.text_concept[index] if kind == 0 else self.region_concept[index]
        return self.sample(kind, rec, img, np.random.default_rng(seed), concept,
                           None if kind == 0 else self.elem_concept[index], str(self.image_root / rec["image"]))

    def sample(self, kind, rec, img, rng, concept, first_elem=None, where=""):
        """Record `rec` of `kind` with its image `img` as a sample: the image-text or region sample, its
        texts encoded and masked. `concept` is the caption's concept id, elements take first_elem + e."""
        sample = (self.image_text_sample(rec, img, rng, concept) if kind == 0 else
                  self.region_sample(rec, img, rng, concept, first_elem, where))
        if isinstance(sample, Unreadable):
            return sample
        cfg, tok = self.cfg, self.tokenizer
        sample["ids"] = [tok.encode(t, cfg.max_tokens) for t in sample["texts"]]
        if self.mlm:
            sample["mlm"] = [mask_text(ids, tok.is_piece, rng, tok.vocab_size, tok.mask_id, cfg.mask_prob, cfg.max_masks,
                                       (cfg.mask_span_prob, cfg.mask_span_max)) for ids in sample["ids"]]
        return sample

    def text(self, raw, flip):
        return prepare_text(raw, self.max_words, flip)

    def image_text_sample(self, rec, img, rng, concept):
        """Random resized crop and flip of the whole image; one of its captions."""
        crop = random_resized_crop(*img.size, rng, self.crops.image)
        flip = bool(rng.random() < 0.5)
        image = to_tensor(crop_flip_resize(img, crop, flip, self.cfg.image_res))
        return {"image": image, "texts": [self.text(pick(rng, rec["caption"]), flip)], "boxes": [None],
                "concepts": [concept], "kinds": ["caption"]}

    def region_sample(self, rec, img, rng, concept, first_elem, where):
        """The authors' region sample: pick one element, crop around it, flip, resize; its caption
        (if any) and element texts whose boxes keep more than half their area, max_regions texts in all."""
        W, H = img.size
        elems = rec["elems"]
        # annotations may run a pixel past the border: clip to the image first
        boxes, inside = transform_boxes([e["bb"] for e in elems], (0, 0, W, H), False, (W, H), min_visible=0)
        elem_ids = np.flatnonzero(inside)
        if len(elem_ids) == 0:
            return Unreadable(where, f"no element box of the record lies inside the {W}x{H} image")
        chosen = int(rng.integers(len(elem_ids)))
        crop = region_crop(W, H, boxes[chosen], rng, self.crops.region)
        flip = bool(rng.random() < 0.5)
        res = self.cfg.image_res
        image = to_tensor(crop_flip_resize(img, crop, flip, res))
        out_boxes, keep = transform_boxes(boxes, crop, flip, (res, res))
        out_of = np.cumsum(keep) - 1  # row of each kept box in out_boxes
        # the chosen element first (the crop holds it whole), then the other survivors in random order
        order = [chosen] + [j for j in rng.permutation(len(elem_ids)).tolist() if j != chosen and keep[j]]
        texts, box_list, concepts, kinds = [], [], [], []
        if "caption" in rec:  # it takes one of the max_regions places, as in the authors' code
            texts.append(self.text(pick(rng, rec["caption"]), flip))
            box_list.append(None)
            concepts.append(concept)
            kinds.append("caption")
        for j in order[:max(1, self.max_regions - len(texts))]:
            e = int(elem_ids[j])
            texts.append(self.text(elem_text(elems[e], rng), flip))
            box_list.append(xywh_to_cxcywh(out_boxes[out_of[j]], res, res)[0])
            concepts.append(first_elem + e)
            kinds.append(elems[e].get("kind", "object"))
        return {"image": image, "texts": texts, "boxes": box_list, "concepts": concepts, "kinds": kinds}

    def collate(self, samples):
        """Samples -> the batch dict that XVLM.forward takes (see pretrain_loader)."""
        kept, skipped = readable(samples)
        rows = [(i, ids, box, concept, text) for i, s in enumerate(kept)
                for ids, box, concept, text in zip(s["ids"], s["boxes"], s["concepts"], s["texts"])]
        boxes = [box for _, _, box, _, _ in rows if box is not None]
        text_box, n = [], 0
        for _, _, box, _, _ in rows:
            text_box.append(-1 if box is None else n)
            n += box is not None
        text_ids, text_mask = self.tokenizer.pad([ids for _, ids, _, _, _ in rows])
        batch = {
            "images": stack_images(kept, self.cfg.image_res),
            "text_ids": text_ids,
            "text_mask": text_mask,
            "text_image": torch.tensor([i for i, *_ in rows], dtype=torch.long),
            "text_box": torch.tensor(text_box, dtype=torch.long),
            "boxes": torch.stack(boxes) if boxes else torch.zeros(0, 4),
            "box_image": torch.tensor([i for i, _, box, _, _ in rows if box is not None], dtype=torch.long),
            "concept_ids": torch.tensor([concept for *_, concept, _ in rows], dtype=torch.long),
            "text_keys": torch.tensor([text_key(text) for *_, text in rows], dtype=torch.long),
            "skipped": skipped,
        }
        if self.mlm:
            masked = [m for s in kept for m in s["mlm"]]
            batch["mlm_ids"] = self.tokenizer.pad([ids for ids, _ in masked])[0]
            batch["mlm_labels"] = self.tokenizer.pad([labels for _, labels in masked], value=-100)[0]
        return batch


class PretrainSampler:
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
            raise DataError("no pre-training records")
        if n_texts and n_regions and batch_size < 2:
            raise DataError(f"batch_size {batch_size}: half and half needs at least 2 images per batch")
        half = batch_size // 2 if n_texts and n_regions else (batch_size if n_texts else 0)
        self.counts, self.per_rank = (n_texts, n_regions), (half, batch_size - half)
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self._perm = {}  # kind -> ((epoch, pass), permutation): only the current pass is kept

    def __len__(self):
        return max(1, max(n // (k * self.world_size) for n, k in zip(self.counts, self.per_rank) if k))

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

    def batches(self, epoch, start):
        """This rank's batches of `epoch` from batch `start` on, lazily."""
        return (self.batch_keys(epoch, b) for b in range(start, len(self)))


class EpochLoader:
    """A dataset's batches epoch after epoch, the way train.py consumes them; resumable at a batch.

    Iterating yields the batches left in the current epoch, then moves on to the next epoch.
    `batches(epoch, start)` lists this rank's batches of an epoch (lists of dataset keys) from
    batch `start`, and every random draw of a sample is keyed by its position, not by the worker,
    so state_dict() ({"epoch", "batch"}) saved after step k and given back to load_state_dict()
    goes on with exactly the batches an uninterrupted run would have seen, whatever the workers.
    A batch whose every image is unreadable is not yielded (its skips come with the next batch);
    `patience` of them in a row stop with a DataError naming a file: such data can never work.
    """

    def __init__(self, dataset, batches, length, workers=0, seed=0, patience=3):
        self.dataset, self.batches, self.length, self.workers, self.seed = dataset, batches, length, workers, seed
        self.patience, self.empty = patience, 0  # batches in a row with no readable image, across epochs
        self.epoch, self.batch, self.carried = 0, 0, []

    def __len__(self):
        return self.length

    def state_dict(self):
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state):
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])

    def __iter__(self):
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(self.epoch)  # workers start afresh each epoch and copy it
        # A private generator: starting an iterator draws a worker seed, which from the global RNG
        # would shift the model's random draws (masks, negatives) in a resumed run.
        loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=self.batches(self.epoch, self.batch),
                                             collate_fn=self.dataset.collate, num_workers=self.workers,
                                             generator=torch.Generator().manual_seed(self.seed))
        yield from self.readable(loader)
        self.epoch, self.batch = self.epoch + 1, 0

    def readable(self, batches):
        """The batches holding a readable image, each batch counted in the position; the skips of one
        without come with the next, and `patience` of them in a row raise a DataError."""
        for batch in batches:
            self.batch += 1
            if len(batch["images"]) == 0:
                self.carried += batch["skipped"]
                self.empty += 1
                if self.empty >= self.patience:
                    first = self.carried[0]
                    raise DataError(f"no readable image in {self.empty} batches in a row ({len(self.carried)} images), "
                                    f"e.g. {first.path}: {first.reason}; is the image root right?")
                continue
            self.empty = 0
            batch["skipped"], self.carried = self.carried + batch["skipped"], []
            yield batch


@dataclass(frozen=True)
class Shard:
    """How one training process reads the data: its share (rank of world_size), the loader worker
    processes, and the seed of every random draw (order, crops, flips, masks)."""
    rank: int = 0
    world_size: int = 1
    workers: int = 0
    seed: int = 0


def pretrain_loader(dataset, batch_size, shard=Shard(), image_text=True, buffer=1000):
    """The pre-training loader of a PretrainDataset: batches of `batch_size` images for this process,
    half image-text pairs and half box-annotated images (paper 4.2); image_text=False reads only the
    box-annotated records (the grounding pre-step). Resume with state_dict / load_state_dict.

    Each batch is the dict that XVLM.forward takes (B images, T texts, R region texts):
      images      float32 [B, 3, res, res]  normalised with MEAN / STD; image-text images first
      text_ids    int64 [T, L]              [CLS] ... [SEP] [PAD]..., L = longest, <= cfg.max_tokens
      text_mask   bool [T, L]               True = real token
      text_image  int64 [T]                 index into images of each text's image
      text_box    int64 [T]                 index into boxes for region texts, -1 for captions
      boxes       float32 [R, 4]            normalised (cx, cy, w, h) in the transformed image
      box_image   int64 [R]                 image of each box
      mlm_ids     int64 [T, L]              text_ids corrupted by mask_text (with `mlm`)
      mlm_labels  int64 [T, L]              the original id where corrupted, -100 elsewhere
      concept_ids int64 [T]                 visual concept of each text (stable across processes); with
      text_keys   int64 [T]                 text_key of each text; texts sharing either are positives of
                                            each other under cfg.equal_texts_positive
      skipped     [Unreadable]              images of this draw that could not be read, left out
    An image-text image brings one of its captions (crops.image: random resized crop; flip); a region
    image brings its caption if it has one and element texts, max_regions in all, the randomly chosen
    element first (crops.region: a window that keeps it whole; flip, resize; boxes keeping half their
    area or less are dropped). A flip swaps "left" and "right" in the image's texts. The authors' crops
    are Crops((0.2, 1.0), None); the synthetic world's captions name every shape, and a crop that cuts
    shapes out makes them partly false, so the tiny preset keeps 80% of the area or more: Crops((0.8, 1.0), (0.8, 1.0)).

    A kind whose samples come from tar shards streams through shuffle buffers of `buffer` samples
    (StreamLoader, see "Tar shards"); JSON records are drawn by PretrainSampler, each kind from one source.
    """
    sampler = PretrainSampler(*dataset.counts(image_text), batch_size, shard.seed, shard.rank, shard.world_size)
    if any(dataset.shards[kind] for kind, k in enumerate(sampler.per_rank) if k):
        return stream_loader(dataset, sampler, shard, buffer)
    return EpochLoader(dataset, sampler.batches, len(sampler), shard.workers, shard.seed)


# -----------------------------------------------------------------------------
# Tar shards: pre-training samples streamed from WebDataset tars (img2dataset's layout)
#
# A shard is a tar whose samples are the files sharing a key (the name up to its first dot):
# KEY.jpg|jpeg|png|webp (the image), KEY.txt (the caption) and optionally KEY.json (img2dataset's
# metadata; here it may also hold "caption" as a list and "elems" as in a region record, boxes in
# pixels of that image, which makes the sample box-annotated). A shard holds one kind of sample, the
# kind of its first (`python data.py shards` writes each kind to shards of its own).
#
# Each training process and each of its loader workers reads shards of its own, one after another,
# through a bounded shuffle buffer (as webdataset does), and decodes images in the worker. The
# order is a function of the seed and a position alone, so a resumed run reads on exactly:
#   - reader g of R = world_size * streams reads, in pass p, the shards permutation(seed, kind, p)[g::R];
#   - rank r's batch i comes from its stream i % streams (a worker holds streams/workers of them), and
#     draws its samples from that stream's buffer; a sample's crop, flip and masks are seeded by
#     (seed, kind, reader, draw);
#   - on resume each stream replays its draws before the checkpoint reading only the tar headers and
#     the small members (no image), then goes on. The run's world size and streams are in its state.

SAMPLE_KINDS = ("image-text", "box-annotated")
TAR_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
SHARD_CONCEPTS = 1 << 58  # concept ids of shard samples: above any JSON record's (see tar_concept)


class TarShard(NamedTuple):
    path: str
    kind: int  # 0 image-text, 1 box-annotated: the kind of its first sample
    samples: int  # img2dataset's NNNNN_stats.json "successes" beside it, else counted from its headers


def expand_braces(pattern):
    """'cc3m/{00000..00002}.tar' -> ['cc3m/00000.tar', 'cc3m/00001.tar', 'cc3m/00002.tar'] (zero-padded as
    written); '{a,b}' lists; several groups expand left to right."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if not m:
        return [pattern]
    body, head, tail = m.group(1), pattern[:m.start()], pattern[m.end():]
    span = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if span:
        lo, hi = span.groups()
        if int(lo) > int(hi):
            raise UsageError(f"{pattern}: the range {{{body}}} is empty")
        width = len(lo) if len(lo) == len(hi) or lo.startswith("0") else 0
        items = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    elif "," in body:
        items = body.split(",")
    else:
        raise UsageError(f"{pattern}: {{{body}}} is neither a range {{LO..HI}} nor a list {{a,b}}")
    return [p for item in items for p in expand_braces(head + item + tail)]


def is_tar_pattern(path):
    """Whether a --data entry names tar shards: 'x.tar', 'x/{0..9}.tar', 'x/{a.tar,b.tar}'."""
    return re.search(r"\.tar$|\.tar[},]", str(path)) is not None


def split_data(files):
    """Data files -> (JSON record files, tar shard paths): shard patterns expanded ({a..b}, {x,y}, and * ? [] as
    glob); a pattern that names no file is refused here, in one line."""
    files = [files] if isinstance(files, (str, Path)) else list(files or [])
    records, shards = [], []
    for f in map(str, files):
        if not is_tar_pattern(f):
            records.append(f)
            continue
        expanded = [p for e in expand_braces(f) for p in (sorted(glob.glob(e)) if re.search(r"[*?[]", e) else [e])]
        if not expanded:
            raise UsageError(f"{f}: the pattern matches no file")
        shards += expanded
    return records, shards


def tar_key(name):
    """A tar member's (key, extension) as webdataset splits them: at the first dot of the file name."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def tar_files(f):
    """(name, data offset, size) of each file in an open tar, in order. Plain ustar / GNU headers are read here
    (a fifth of tarfile's time per header); from the first other one (pax, GNU long names) tarfile reads the
    rest. Ends at the end-of-archive block; raises tarfile.ReadError where the tar breaks off or is not one."""
    offset = 0
    while True:
        f.seek(offset)
        block = f.read(512)
        if block == bytes(512):
            return
        if len(block) < 512:
            raise tarfile.ReadError("the tar breaks off (no end-of-archive blocks)" if offset else
                                    f"not a tar ({len(block)} bytes)" if block else "empty file")
        try:
            checksum, size = (int(block[a:b].split(b"\0", 1)[0].strip() or b"0", 8) for a, b in ((148, 156), (124, 136)))
        except ValueError:
            raise tarfile.ReadError(f"not a tar header at byte {offset}") from None
        if checksum != sum(block) - sum(block[148:156]) + 256:
            raise tarfile.ReadError(f"not a tar header at byte {offset} (bad checksum)")
        kind, data = block[156:157], offset + 512
        if kind not in (b"0", b"\0", b"5", b"7"):  # an extended header: tarfile reads the rest from here
            f.seek(offset)
            with tarfile.open(fileobj=f, mode="r:") as tar:
                yield from ((i.name, i.offset_data, i.size) for i in tar if i.isfile())
            return
        if kind != b"5":
            prefix = block[345:500].split(b"\0", 1)[0] if block[257:262] == b"ustar" else b""
            name = block[:100].split(b"\0", 1)[0]
            yield (prefix + b"/" + name if prefix else name).decode("utf-8", "surrogateescape"), data, size
        offset = data + -(-size // 512) * 512


def tar_samples(path, images=lambda: True):
    """A shard's samples in file order: (key, {extension: bytes}); an image is (offset, size) in the file
    instead when images() is false. A tar that breaks off (a truncated download) ends with (None, reason),
    the sample it broke into left out."""
    key, members = None, {}
    try:
        with open(path, "rb") as f:
            size_on_disk = os.fstat(f.fileno()).st_size
            for name, offset, size in tar_files(f):
                k, ext = tar_key(name)
                if k != key and key is not None:
                    yield key, members
                    members = {}
                key = k
                if offset + size > size_on_disk:
                    raise tarfile.ReadError(f"the tar breaks off in {name}")
                if ext in TAR_IMAGE_EXTS and not images():
                    members[ext] = (offset, size)
                else:
                    f.seek(offset)
                    members[ext] = f.read(size)
    except (tarfile.TarError, OSError, EOFError) as e:
        yield None, f"{type(e).__name__}: {e}" + (f" (sample {key} left out: it may lack files)" if key else "")
        return
    if key is not None:
        yield key, members


def tar_record(members, elements=ELEMENT_KINDS):
    """A shard sample's members as a pre-training record {"caption", ["elems"], "image": the image member}, or
    the reason it cannot be one. Elements of kinds not in `elements` are left out (Table 3's switches)."""
    ext = next((e for e in TAR_IMAGE_EXTS if e in members), None)
    if ext is None:
        return f"no image (.{', .'.join(TAR_IMAGE_EXTS)}) among its files .{', .'.join(sorted(members))}"
    meta = {}
    if "json" in members:
        try:
            meta = json.loads(members["json"])
        except (ValueError, UnicodeDecodeError) as e:
            return f".json is not valid JSON: {e}"
        if not isinstance(meta, dict):
            return f".json must hold an object, got a JSON {type(meta).__name__}"
    rec = {k: meta[k] for k in ("caption", "elems") if meta.get(k) is not None}
    if "caption" not in rec and "txt" in members:
        rec["caption"] = members["txt"].decode("utf-8", errors="replace").strip()
    rec["image"] = f"KEY.{ext}"
    if "caption" not in rec and "elems" not in rec:
        return "no caption (.txt, or \"caption\" in its .json)"
    problems = record_problem_list(rec, "pretrain")
    if problems:
        return "; ".join(f"field '{field}': {message}" for field, message in problems[:3])
    if "elems" in rec and set(elements) != set(ELEMENT_KINDS):
        if any("kind" not in e for e in rec["elems"]):
            return f"an element has no 'kind' ('object' or 'region'), which keeping only {' and '.join(elements)} needs"
        rec["elems"] = [e for e in rec["elems"] if e["kind"] in elements]
    rec["image"] = members[ext]
    return rec


def decode_member(payload):
    """An image member's bytes as load_image reads a file; raises, with a message that names no buffer, if unreadable."""
    try:
        return load_image(io.BytesIO(payload))
    except Exception as e:  # noqa: BLE001 -- re-raised as it was, less the in-memory file's repr
        raise type(e)(re.sub(r" <_io\.BytesIO object at 0x[0-9a-f]+>", "", str(e))) from None


def read_member(path, image):
    """An image member's bytes: as read, or read now from its (offset, size) in the shard."""
    if isinstance(image, bytes):
        return image
    with open(path, "rb") as f:
        f.seek(image[0])
        return f.read(image[1])


def tar_concept(kind, shard, index):
    """The concept id of sample `index` of shard number `shard` of a kind; its elements take the next ids."""
    return SHARD_CONCEPTS + (((kind << 20 | shard) << 24 | index) << 12)


def stats_count(path):
    """The "successes" of img2dataset's NNNNN_stats.json beside a shard (our packer writes it too), or None."""
    try:
        count = json.loads(Path(str(path)[:-len(".tar")] + "_stats.json").read_text())["successes"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return count if isinstance(count, int) and count >= 0 else None


def shard_path_problem(path):
    """Why a shard path names no file to read ("no such shard", "a directory, ..."), or None."""
    return "a directory, not a tar shard" if Path(path).is_dir() else None if Path(path).exists() else "no such shard"


def tar_shard(path):
    """A shard's TarShard, read before any compute: a shard that is missing or that no sample can be read
    from stops here, in one line."""
    if shard_path_problem(path):
        raise DataError(f"{path}: {shard_path_problem(path)}")
    count, kind = stats_count(path), None
    scan = tar_samples(path, images=lambda: False)
    n = 0
    for key, members in scan:
        if key is None and n == 0:
            raise DataError(f"{path}: cannot be read as a tar shard ({members})")
        if key is None:
            break
        n += 1
        rec = tar_record(members)
        if kind is None and isinstance(rec, dict):
            kind = int("elems" in rec)
            if count is not None:
                scan.close()
                break
    if kind is None:
        raise DataError(f"{path}: no usable sample in the shard ({n} samples; python data.py check {path} says why)")
    return TarShard(str(path), kind, n if count is None else count)


def open_tar_shards(paths):
    """Each shard's TarShard, by kind: {0: image-text shards, 1: box-annotated shards}."""
    missing = [p for p in paths if shard_path_problem(p) == "no such shard"]
    if missing:
        raise DataError(f"{missing[0]}: no such shard" + (f" ({len(missing)} of the {len(paths)} shards are missing)"
                                                         if len(missing) > 1 else ""))
    by_kind = {0: [], 1: []}
    for path in paths:
        shard = tar_shard(path)
        by_kind[shard.kind].append(shard)
    return by_kind


class SampleStream:
    """One reader's endless stream of one kind's shard samples, drawn through a shuffle buffer of `size`
    (the first draw waits for it to fill). Samples that cannot be used are kept in `problems`, each an
    Unreadable naming shard and key, until the batch they were met in takes them."""

    def __init__(self, shards, kind, reader, readers, seed, size, elements=ELEMENT_KINDS):
        self.shards, self.kind, self.reader, self.readers, self.seed = shards, kind, reader, readers, seed
        self.size, self.elements = max(1, size), elements
        self.rng = np.random.default_rng((seed, kind, reader))
        self.buffer, self.problems, self.drawn, self.images = [], [], 0, True
        self.source = self.read()

    def read(self):
        """(shard number, sample number, key, record) in reading order, pass after pass over its shards."""
        for p in itertools.count():
            order = np.random.default_rng((self.seed, self.kind, p)).permutation(len(self.shards))[self.reader::self.readers]
            found = 0
            for n in order.tolist():
                path = self.shards[n].path
                for j, (key, members) in enumerate(tar_samples(path, lambda: self.images)):
                    rec = members if key is None else tar_record(members, self.elements)
                    if isinstance(rec, str) or int("elems" in rec) != self.kind:
                        why = rec if isinstance(rec, str) else (f"a {SAMPLE_KINDS[1 - self.kind]} sample in a shard of "
                                                               f"{SAMPLE_KINDS[self.kind]} samples (data.py shards "
                                                               "writes each kind to shards of its own)")
                        self.problems.append(Unreadable(path if key is None else f"{path}:{key}", why,
                                                        "broken shard" if key is None else "sample"))
                    elif self.kind == 0 or rec["elems"]:
                        found += 1
                        yield n, j, key, rec
            if not found:
                raise DataError(f"no usable {SAMPLE_KINDS[self.kind]} sample in {len(order)} shards, e.g. "
                                f"{self.shards[order[0]].path}: python data.py check says why")

    def draw(self):
        while len(self.buffer) < self.size:
            self.buffer.append(next(self.source))
        j = int(self.rng.integers(len(self.buffer)))
        item, self.buffer[j] = self.buffer[j], next(self.source)
        self.drawn += 1
        return item

    def skip(self, n):
        """Draw n samples reading no image: the position of a resumed run."""
        self.images = False
        for _ in range(n):
            self.draw()
        self.images, self.problems = True, []

    def sample(self, dataset):
        """The next sample as dataset.sample makes it, or an Unreadable."""
        n, j, key, rec = self.draw()
        path = self.shards[n].path
        try:
            img = decode_member(read_member(path, rec["image"]))
        except Exception as e:  # noqa: BLE001 -- as open_image: every decoder error means skip this image
            return Unreadable(f"{path}:{key}", f"{type(e).__name__}: {e}")
        concept = tar_concept(self.kind, n, j)
        rng = np.random.default_rng((self.seed, self.kind, self.reader, self.drawn))
        return dataset.sample(self.kind, rec, img, rng, concept, concept + 1, f"{path}:{key}")


class StreamPlan(NamedTuple):
    """How a process's batches are drawn: its share (rank of world_size), its streams, the seed, the shuffle
    buffer, the samples of each kind per batch, and the sampler of the kinds that come from JSON records."""
    rank: int
    world_size: int
    streams: int
    seed: int
    buffer: int
    per_rank: tuple
    sampler: "PretrainSampler"


class StreamBatches(torch.utils.data.IterableDataset):
    """A process's batches from `start` on, in order. Worker w of W yields batches start + w, start + w + W, ...
    (the DataLoader takes them in turn), batch i from stream i % streams: a stream stays in one worker."""

    def __init__(self, dataset, plan, start):
        self.dataset, self.plan, self.start = dataset, plan, start

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        p, ds = self.plan, self.dataset
        streams = {s: {kind: SampleStream(ds.shards[kind], kind, p.rank * p.streams + s, p.world_size * p.streams,
                                          p.seed, p.buffer, ds.elements)
                       for kind in (0, 1) if p.per_rank[kind] and ds.shards[kind]}
                   for s in range(p.streams) if (s - self.start) % workers == worker}
        for s, by_kind in streams.items():
            for kind, stream in by_kind.items():
                stream.skip(len(range(s, self.start, p.streams)) * p.per_rank[kind])
        for i in itertools.count(self.start + worker, workers):
            yield self.batch(i, streams[i % p.streams])

    def batch(self, i, streams):
        p, ds = self.plan, self.dataset
        samples, skipped = [], []
        for kind, k in enumerate(p.per_rank):
            if kind in streams:
                samples += [streams[kind].sample(ds) for _ in range(k)]
                skipped += streams[kind].problems
                streams[kind].problems = []
            elif k:
                first = (i * p.world_size + p.rank) * k
                samples += [ds[(kind, p.sampler.index(0, kind, q), (p.seed, 0, kind, q))] for q in range(first, first + k)]
        batch = ds.collate(samples)
        batch["skipped"] = skipped + batch["skipped"]
        return batch


def as_is(batch):
    return batch


class StreamLoader(EpochLoader):
    """pretrain_loader's loader when samples come from tar shards (an EpochLoader whose epochs are the
    nominal length of the data): one DataLoader runs for the whole run, its workers keeping their streams.
    state_dict() adds the run's streams and world size; a resumed run needs the same world size, and
    --workers that divide its streams (the run's first --workers)."""

    def __init__(self, dataset, plan, length, workers=0, seed=0):
        super().__init__(dataset, None, length, workers, seed)
        self.plan, self.running = plan, None

    def state_dict(self):
        return {**super().state_dict(), "streams": self.plan.streams, "world_size": self.plan.world_size}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        streams, world = int(state.get("streams", 1)), int(state.get("world_size", self.plan.world_size))
        if world != self.plan.world_size:
            raise UsageError(f"the run read its shards on {world} process(es), each its own: resume it on {world}, "
                             f"not {self.plan.world_size}")
        if streams % max(1, self.workers):
            raise UsageError(f"the run reads its shards as {streams} stream(s) per process: resume with --workers "
                             f"dividing {streams} (e.g. {streams}), not {self.workers}")
        self.plan, self.running = self.plan._replace(streams=streams), None

    def __iter__(self):
        if self.running is None:
            batches = StreamBatches(self.dataset, self.plan, self.epoch * self.length + self.batch)
            self.running = iter(torch.utils.data.DataLoader(batches, batch_size=None, collate_fn=as_is,
                                                            num_workers=self.workers,
                                                            generator=torch.Generator().manual_seed(self.seed)))
        yield from self.readable(itertools.islice(self.running, self.length - self.batch))
        self.epoch, self.batch = self.epoch + 1, 0


def stream_loader(dataset, sampler, shard, buffer):
    """The StreamLoader of a PretrainDataset with shards (pretrain_loader's); each shard kind in use must
    give every reader (processes x streams) a shard of its own."""
    plan = StreamPlan(shard.rank, shard.world_size, max(1, shard.workers), shard.seed, buffer, sampler.per_rank, sampler)
    readers = plan.world_size * plan.streams
    for kind, k in enumerate(plan.per_rank):
        if k and 0 < len(dataset.shards[kind]) < readers:
            raise UsageError(f"{len(dataset.shards[kind])} {SAMPLE_KINDS[kind]} shards cannot feed {plan.world_size} "
                             f"process(es) x {plan.streams} worker(s), each reading shards of its own: pack smaller "
                             "shards (python data.py shards --per-shard) or lower --workers")
    return StreamLoader(dataset, plan, len(sampler), shard.workers, shard.seed)


def tar_member(tar, name, payload):
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(payload), 0o644, 0  # the same records make the same bytes
    tar.addfile(info, io.BytesIO(payload))


def image_member(path):
    """(extension, bytes) of an image file for a shard: as stored when a shard may hold its format, else PNG."""
    ext = Path(path).suffix.lower().lstrip(".")
    with Image.open(path) as img:
        img.load()  # unreadable: raises, and the packer skips the record
        if ext in TAR_IMAGE_EXTS:
            return ext, Path(path).read_bytes()
        buffer = io.BytesIO()
        img.save(buffer, "PNG")
        return "png", buffer.getvalue()


class ShardWriter:
    """Samples into OUT/00000.tar, 00001.tar, ... of `per_shard` samples each, every tar written whole under a
    .partial name and then renamed, with its NNNNN_stats.json ({"successes", "kind"}, as img2dataset's)."""

    def __init__(self, out, per_shard):
        self.out, self.per_shard, self.paths, self.tar, self.count, self.samples = Path(out), per_shard, [], None, 0, 0

    def add(self, kind, rec, ext, payload):
        if self.tar is not None and (self.count == self.per_shard or kind != self.kind):
            self.close()
        if self.tar is None:
            self.path, self.kind, self.count = self.out / f"{len(self.paths):05d}.tar", kind, 0
            self.tar = tarfile.open(self.path.with_suffix(".tar.partial"), "w", format=tarfile.GNU_FORMAT)
        key = f"{self.samples:09d}"
        tar_member(self.tar, f"{key}.{ext}", payload)
        caption = rec.get("caption")
        if caption is not None:
            tar_member(self.tar, f"{key}.txt", (caption[0] if isinstance(caption, list) else caption).encode())
        meta = {"key": key, "source": rec["image"], **{k: v for k, v in rec.items() if k != "image"}}
        tar_member(self.tar, f"{key}.json", json.dumps(meta).encode())
        self.count, self.samples = self.count + 1, self.samples + 1

    def close(self):
        if self.tar is not None:
            self.tar.close()
            self.path.with_suffix(".tar.partial").replace(self.path)
            stats = {"successes": self.count, "kind": SAMPLE_KINDS[self.kind]}
            self.path.with_name(f"{self.path.stem}_stats.json").write_text(json.dumps(stats) + "\n")
            self.paths.append(self.path)
            self.tar = None


def write_shards(files, image_root, out, per_shard=1000, say=print):
    """Pre-training records (or any with an image and a caption) -> tar shards OUT/00000.tar, ... in
    img2dataset's layout (ShardWriter): image-text records first, then box-annotated ones, each kind in
    shards of its own. A record whose image cannot be read is skipped, named and counted. Returns the shard paths."""
    out = Path(out)
    if per_shard < 1:
        raise UsageError(f"--per-shard must be >= 1, got {per_shard}")
    if out.exists() and any(out.glob("*.tar")):
        raise UsageError(f"{out} holds shards already: write to a new directory (a rerun never overwrites)")
    texts, regions = split_records(load_records(files, "pretrain"), ELEMENT_KINDS)
    out.mkdir(parents=True, exist_ok=True)
    writer, skipped = ShardWriter(out, per_shard), 0
    for kind, records in enumerate((texts, regions)):
        for rec in records:
            try:
                ext, payload = image_member(Path(image_root) / rec["image"])
            except Exception as e:  # noqa: BLE001 -- any unreadable image: skip the record, count it
                skipped += 1
                say(f"skipped {Path(image_root) / rec['image']}: {type(e).__name__}: {e}")
                continue
            writer.add(kind, rec, ext, payload)
    writer.close()
    if not writer.paths:
        raise DataError(f"{', '.join(map(str, files))}: no record with a readable image: no shard written")
    say(f"wrote {writer.samples} samples to {len(writer.paths)} shards: --data '{out}/{{00000..{len(writer.paths) - 1:05d}}}.tar'"
        + (f"; {skipped} records skipped (image unreadable)" if skipped else ""))
    return writer.paths


# -----------------------------------------------------------------------------
# Downstream tasks (paper 4.3 and appendix B)
#
# Every dataset has a `collate` for its DataLoader; every batch carries `index` (int64 [B], the
# record of each row) and `skipped` (the Unreadable images left out of this batch).

class Augment(NamedTuple):
    """A training set's augmentation: the draws' seed, and the random resized crop's area range."""
    seed: int = 0
    crop_scale: tuple = (0.5, 1.0)


class TaskDataset(torch.utils.data.Dataset):
    """What the downstream datasets share: records checked at start-up, the authors' transforms,
    randomness keyed by (seed, epoch, index), texts cleaned and tokenised in `collate` (texts of at
    most max_tokens, ending as the tokenizer's `sep` says), images read as `decode` says (to_rgb).

    train=Augment(...): random resized crop (crop_scale of the area), horizontal flip that swaps
    "left" and "right" in the texts, resize to image_res. train=None: resize to image_res only.
    """
    fmt = None  # key of FORMATS for the records
    train_fmt = None  # a stricter one for training, where it differs
    max_words = 30  # texts are cut to this many words (clean_caption)

    def __init__(self, files, image_root, tokenizer, max_tokens, image_res, train=None, decode="ours"):
        self.records = load_records(files, (train and self.train_fmt) or self.fmt)
        self.image_root, self.tokenizer, self.max_tokens = Path(image_root), tokenizer, max_tokens
        self.image_res, self.train, self.decode = image_res, train is not None, decode
        self.seed, self.crop_scale = (train.seed, tuple(train.crop_scale)) if train is not None else (0, None)
        self.epoch = 0

    def __len__(self):
        return len(self.records)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def rng(self, index):
        return np.random.default_rng((self.seed, self.epoch, index))

    def flip(self, rng):
        return self.train and bool(rng.random() < 0.5)

    def record(self, index):
        """(record, its random generator, whether it is flipped, its image tensor or an Unreadable)."""
        rec, rng = self.records[index], self.rng(index)
        flip = self.flip(rng)
        return rec, rng, flip, self.image(rec["image"], rng, flip)

    def image(self, rel, rng, flip):
        """Image tensor [3, res, res] through the train or eval transform, or an Unreadable."""
        img = open_image(self.image_root, rel, self.decode)
        if isinstance(img, Unreadable):
            return img
        crop = random_resized_crop(*img.size, rng, self.crop_scale) if self.train else (0, 0, *img.size)
        return to_tensor(crop_flip_resize(img, crop, flip, self.image_res))

    def text(self, raw, flip):
        return prepare_text(raw, self.max_words, flip)

    def collate_common(self, samples, text_key="text"):
        """images, text_ids, text_mask, index, skipped of the readable samples, and those samples."""
        kept, skipped = readable(samples)
        text_ids, text_mask = self.tokenizer.encode_batch([s[text_key] for s in kept], self.max_tokens)
        batch = {
            "images": stack_images(kept, self.image_res),
            "text_ids": text_ids,
            "text_mask": text_mask,
            "index": torch.tensor([s["index"] for s in kept], dtype=torch.long),
            "skipped": skipped,
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
        rec, rng, flip, image = self.record(index)
        if isinstance(image, Unreadable):
            return image
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

    def __init__(self, files, image_root, tokenizer, max_tokens, image_res, decode="ours"):
        super().__init__(files, image_root, tokenizer, max_tokens, image_res, decode=decode)
        self.texts, self.txt2img, self.img2txt = [], [], []
        for i, rec in enumerate(self.records):
            captions = rec["caption"] if isinstance(rec["caption"], list) else [rec["caption"]]
            self.img2txt.append(list(range(len(self.texts), len(self.texts) + len(captions))))
            self.texts += [clean_caption(c, self.max_words) for c in captions]
            self.txt2img += [i] * len(captions)

    def __getitem__(self, index):
        image = self.image(self.records[index]["image"], None, False)
        return image if isinstance(image, Unreadable) else {"image": image, "index": index}

    def collate(self, samples):
        kept, skipped = readable(samples)
        return {"images": stack_images(kept, self.image_res),
                "index": torch.tensor([s["index"] for s in kept], dtype=torch.long), "skipped": skipped}


def answer_list_problems(path, value):
    """Message lines for an answer list that is not a non-empty JSON list of non-empty strings."""
    if not isinstance(value, list):
        return [f"{path}: expected a JSON list of answer strings, got a JSON {type(value).__name__}"]
    if not value:
        return [f"{path}: an empty answer list: VQA ranks candidate answers from it"]
    return [f"{path}: record {i}: must be a non-empty answer string, got {a!r}"
            for i, a in enumerate(value) if not (isinstance(a, str) and a.strip())]


def read_checked(path, problems):
    """A JSON file whose value problems(path, value) finds nothing wrong with; else the first problem."""
    value, _ = read_json(path)
    found = problems(path, value)
    if found:
        raise RecordError(found[0])
    return value


def read_answer_list(path):
    """answer_list.json: a JSON list of the candidate answers (strings) VQA ranks at inference."""
    return read_checked(path, answer_list_problems)


class VQADataset(TaskDataset):
    """VQA: records {"question_id", "question", "image", "answer": [str] | str, "dataset"}.

    Answer weights follow the authors: an answer given by k of the n annotators weighs k / n; a
    Visual Genome answer ("dataset": "vg") weighs 0.5. A flip swaps left/right in the question
    and in the answers. Batch: images [B, 3, H, W], text_ids / text_mask [B, L] (questions),
    answers list[list[str]] (every annotator's answer, in order, [] without annotations), index,
    skipped; and for the answer decoder's loss (tasks.vqa_loss), every distinct answer of the batch
    as a row: answer_ids / answer_mask [A, La] ("[CLS] answer [SEP]"), answer_question int64 [A]
    (its question's row), answer_weights float32 [A].
    """
    fmt, train_fmt = "vqa", "vqa_train"

    def __getitem__(self, index):
        rec, rng, flip, image = self.record(index)
        if isinstance(image, Unreadable):
            return image
        given = rec.get("answer", [])
        given = [given] if isinstance(given, str) else given
        given = [swap_left_right(a) if flip else a for a in given]
        answers = sorted(set(given), key=given.index)
        weights = [0.5] * len(answers) if rec.get("dataset") == "vg" else [given.count(a) / len(given) for a in answers]
        # the authors' pre_question, not pre_caption, of 30 words in training and 50 when they evaluate
        question = clean_question(rec["question"], self.max_words if self.train else 50)
        return {"image": image, "text": swap_left_right(question) if flip else question, "given": given, "answers": answers,
                "weights": weights, "index": index}

    def collate(self, samples):
        batch, kept = self.collate_common(samples)
        batch["answers"] = [s["given"] for s in kept]
        distinct = [a for s in kept for a in s["answers"]]
        batch["answer_ids"], batch["answer_mask"] = self.tokenizer.encode_batch(distinct, self.max_tokens, sep=True)
        batch["answer_question"] = torch.tensor([i for i, s in enumerate(kept) for _ in s["answers"]], dtype=torch.long)
        batch["answer_weights"] = torch.tensor([w for s in kept for w in s["weights"]], dtype=torch.float32)
        return batch


class NLVR2Dataset(TaskDataset):
    """NLVR2: records {"images": [a, b], "sentence", "label": "True" | "False"}.

    The flip mirrors the pair as a whole: the two images swap places and each is flipped, and the
    sentence swaps "left" and "right". Both kinds of sentence stay true: "the left image has two
    dogs" (the image it names moved to the other side) and "a dog left of a cat" (within a flipped
    image). Flipping each image alone (the authors) breaks the second; swapping the words alone
    breaks the first. Batch: images [B, 3, H, W] (image 1), images2 [B, 3, H, W] (image 2),
    text_ids / text_mask [B, L], labels int64 [B] (1 = True), index, skipped.
    """
    fmt = "nlvr2"

    def __getitem__(self, index):
        rec, rng = self.records[index], self.rng(index)
        flip = self.flip(rng)
        first, second = (self.image(p, rng, flip) for p in (rec["images"][::-1] if flip else rec["images"]))
        for image in (first, second):
            if isinstance(image, Unreadable):
                return image
        return {"image": first, "image2": second, "text": self.text(rec["sentence"], flip),
                "label": int(rec["label"] == "True"), "index": index}

    def collate(self, samples):
        batch, kept = self.collate_common(samples)
        batch["images2"] = stack_images(kept, self.image_res, "image2")
        batch["labels"] = torch.tensor([s["label"] for s in kept], dtype=torch.long)
        return batch


def proposal_problems(path, value, image_size=None):
    """Message lines for a proposals file that is not {image path: [[x, y, w, h], ...]}."""
    if not isinstance(value, dict):
        return [f"{path}: expected a JSON object {{image: [[x, y, w, h], ...]}}, got a JSON {type(value).__name__}"]
    lines = []
    for image, boxes in value.items():
        out, seen = [], {"image_size": image_size}
        _image(image, "(image)", out, seen)
        if not isinstance(boxes, list) or not boxes:
            out.append(("(boxes)", f"must be a non-empty list of boxes, got {boxes!r}"))
        else:
            for j, box in enumerate(boxes):
                _box(box, f"[{j}]", out, seen)
        lines += [f"{path}: image {image!r}: field '{field}': {message}" for field, message in out]
    return lines


def read_proposals(path):
    """Proposal boxes for weakly supervised grounding: {image path: [[x, y, w, h], ...]} in pixels."""
    return read_checked(path, proposal_problems)


class GroundingDataset(TaskDataset):
    """RefCOCO+-style grounding: records {"image", "text", "bbox": [x, y, w, h]}.

    Images are only resized (train and eval), so boxes stay valid: a box normalised by the
    original size is the box of the resized image (IoU does not change under per-axis scaling).
    Batch: images [B, 3, H, W], text_ids / text_mask [B, L], boxes float32 [B, 4] (normalised
    (cx, cy, w, h) of the target), image_ids int64 [B] (one per image path: the weakly supervised
    setting trains image-text matching on these pairs, where expressions of one image are
    positives of each other), kinds (each record's "kind" of expression, or None), splits (its "split", or
    None), sizes float64 [B, 2] (each image's W, H), target_xywh float64 [B, 4] (the record's box, as given),
    index, skipped; with `proposals` (a read_proposals file) also proposals float32 [B, P, 4] (normalised
    cxcywh, zero-padded), proposals_xywh float64 [B, P, 4] (as given, in pixels) and proposal_mask bool [B, P].
    """
    fmt = "grounding"

    def __init__(self, files, image_root, tokenizer, max_tokens, image_res, proposals=None, decode="ours"):
        super().__init__(files, image_root, tokenizer, max_tokens, image_res, decode=decode)
        self.proposals = None if proposals is None else read_proposals(proposals)
        if self.proposals is not None:
            missing = [r["image"] for r in self.records if r["image"] not in self.proposals]
            if missing:
                raise RecordError(f"{proposals}: no proposals for image {missing[0]!r} ({len(missing)} images lack them)")
        ids = {}
        self.image_ids = [ids.setdefault(r["image"], len(ids)) for r in self.records]

    def __getitem__(self, index):
        rec = self.records[index]
        img = open_image(self.image_root, rec["image"], self.decode)
        if isinstance(img, Unreadable):
            return img
        W, H = img.size
        image = to_tensor(img.resize((self.image_res, self.image_res), Image.BICUBIC))
        # the target clipped to the image (annotations may run a pixel past the border)
        x0, y0, w, h = rec["bbox"]
        x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x0 + w, W), min(y0 + h, H)
        if x1 <= x0 or y1 <= y0:  # skipped and counted as an unreadable image is: no box to learn or score
            return Unreadable(str(self.image_root / rec["image"]), f"record {index}: field 'bbox' {rec['bbox']} lies "
                              f"outside the {W}x{H} image")
        sample = {"image": image, "text": clean_caption(rec["text"], self.max_words), "index": index,
                  "box": xywh_to_cxcywh([x0, y0, x1 - x0, y1 - y0], W, H)[0], "image_id": self.image_ids[index],
                  "kind": rec.get("kind"), "split": rec.get("split"), "size": (W, H), "bbox": rec["bbox"]}
        if self.proposals is not None:
            sample["proposals"] = xywh_to_cxcywh(self.proposals[rec["image"]], W, H)
            sample["proposals_xywh"] = self.proposals[rec["image"]]
        return sample

    def collate(self, samples):
        batch, kept = self.collate_common(samples)
        batch["boxes"] = torch.stack([s["box"] for s in kept]) if kept else torch.zeros(0, 4)
        batch["image_ids"] = torch.tensor([s["image_id"] for s in kept], dtype=torch.long)
        batch["kinds"], batch["splits"] = [s["kind"] for s in kept], [s["split"] for s in kept]
        batch["sizes"] = torch.tensor([s["size"] for s in kept], dtype=torch.float64).view(-1, 2)
        batch["target_xywh"] = torch.tensor([s["bbox"] for s in kept], dtype=torch.float64).view(-1, 4)
        if self.proposals is not None:
            most = max((len(s["proposals"]) for s in kept), default=0)
            batch["proposals"] = torch.zeros(len(kept), most, 4)
            batch["proposals_xywh"] = torch.zeros(len(kept), most, 4, dtype=torch.float64)
            batch["proposal_mask"] = torch.zeros(len(kept), most, dtype=torch.bool)
            for i, s in enumerate(kept):
                batch["proposals"][i, :len(s["proposals"])] = s["proposals"]
                batch["proposals_xywh"][i, :len(s["proposals"])] = torch.tensor(s["proposals_xywh"], dtype=torch.float64)
                batch["proposal_mask"][i, :len(s["proposals"])] = True
        return batch


def task_train_loader(dataset, batch_size, shard=Shard()):
    """A downstream training set as an EpochLoader: epoch e's order is DistributedSampler's shuffle
    for (seed, e), this rank's share, the last partial batch dropped; each sample's augmentation is
    keyed by (seed, e, index), so a resumed run skips straight to its batch (no image read for the
    skipped ones)."""
    sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=shard.world_size, rank=shard.rank, shuffle=True,
                                                  seed=shard.seed, drop_last=True)
    length = len(sampler) // batch_size
    if length == 0:
        raise DataError(f"{len(dataset)} training records make no batch of {batch_size} x {shard.world_size} processes")

    def batches(epoch, start):
        sampler.set_epoch(epoch)
        order = list(sampler)
        return [order[b * batch_size:(b + 1) * batch_size] for b in range(start, length)]

    return EpochLoader(dataset, batches, length, shard.workers, shard.seed)


def eval_loader(dataset, batch_size=64):
    """A dataset's batches in order, as evaluation reads them."""
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=dataset.collate)


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


def repeated_ids(records, fmt):
    """(record, field, message) for each VQA record whose question_id an earlier record has: the result file
    the evaluation server takes holds one answer per question."""
    if not fmt.startswith("vqa"):
        return []
    first, out = {}, []
    for i, rec in enumerate(records):
        qid = rec.get("question_id") if isinstance(rec, dict) else None
        if isinstance(qid, (int, str)) and first.setdefault(qid, i) != i:
            out.append((i, "question_id", f"{qid!r} repeats record {first[qid]}"))
    return out


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
        kind = detect_format(value) if fmt == "auto" else fmt
        if isinstance(value, (list, dict)) and not value:
            problems.append(f"{path}: holds no records")
        elif kind == "answer_list":
            problems += answer_list_problems(path, value)
        elif kind == "proposals":
            problems += proposal_problems(path, value, image_size)
        elif isinstance(value, (list, dict)):
            found = record_problems([value] if isinstance(value, dict) else value, kind, image_size)
            problems += problem_lines(path, found + repeated_ids(value if isinstance(value, list) else [value], kind), jsonl)
        else:
            problems.append(f"{path}: expected a JSON list of records or JSON lines, got a JSON {type(value).__name__}")
        count += len(value) if isinstance(value, (list, dict)) else 0
    return problems, count


def check_shards(paths):
    """Every problem of tar shards, read whole, each image decoded and every box checked against it: one line
    per shard and kind of problem, with how many samples have it and the first key. Returns (lines, samples)."""
    problems, total = [], 0
    for path in paths:
        if shard_path_problem(path):
            problems.append(f"{path}: {shard_path_problem(path)}")
            continue
        found, kinds, n = {}, set(), 0
        for key, members in tar_samples(path):
            if key is None:
                found.setdefault(members, []).append("(end)")
                continue
            n += 1
            rec = tar_record(members)
            if isinstance(rec, dict):
                kinds.add(int("elems" in rec))
                try:
                    size = decode_member(rec["image"]).size
                except Exception as e:  # noqa: BLE001 -- reported, as check_files does for image files
                    rec = f"image cannot be read: {type(e).__name__}: {e}"
                else:
                    rec = "; ".join(f"field '{f}': {m}" for f, m in record_problem_list(
                        {**rec, "image": "KEY"}, "pretrain", lambda _: size)[:3]) or None
            if rec:
                found.setdefault(re.sub(r"\d+", "N", rec)[:200] if "field" in rec else rec, []).append(key)
        if len(kinds) > 1:
            problems.append(f"{path}: holds image-text and box-annotated samples; a shard is read as the kind of its first")
        counted = stats_count(path)
        if counted is not None and counted != n:
            problems.append(f"{path}: its _stats.json says {counted} samples, the tar holds {n}")
        if n == 0 and not found:
            problems.append(f"{path}: holds no samples")
        for message, keys in found.items():
            problems.append(f"{path}: " + (message if keys == ["(end)"] else f"key {keys[0]}: {message}" if len(keys) == 1
                                           else f"{message} ({len(keys)} of {n} samples, the first key {keys[0]})"))
        total += n
    return problems, total


def coco_images(coco, path, files):
    """A COCO file's images into files {id: file_name}; an id that names two files is refused, by name."""
    for im in coco["images"]:
        if files.setdefault(im["id"], im["file_name"]) != im["file_name"]:
            raise RecordError(f"{path}: image id {im['id']} names both {files[im['id']]!r} and {im['file_name']!r}")


def convert_coco(captions=None, instances=None, image_dir="", notes=None):
    """COCO annotation files -> pre-training records. With instances: a region record per image that
    has objects (category names as element texts, its captions as "caption"); otherwise (or for
    images without objects) image-text records. Empty captions are left out, and said in `notes`."""
    files, caps, elems, empty = {}, {}, {}, 0
    if captions:
        coco = read_json(captions)[0]
        coco_images(coco, captions, files)
        for a in coco["annotations"]:
            empty += not a["caption"].strip()
            if a["caption"].strip():
                caps.setdefault(a["image_id"], []).append(a["caption"].strip())
    if empty and notes is not None:
        notes.append(f"{captions}: left out {empty} empty caption(s)")
    if instances:
        coco = read_json(instances)[0]
        coco_images(coco, instances, files)
        names = {c["id"]: c["name"] for c in coco["categories"]}
        unknown = sorted({a["category_id"] for a in coco["annotations"] if a["category_id"] not in names})
        if unknown:
            raise RecordError(f"{instances}: annotations of category ids {unknown[:5]} that 'categories' does not list")
        for a in coco["annotations"]:
            # a crowd box covers many objects under one label: not a single visual concept
            if not a.get("iscrowd") and a["bbox"][2] > 0 and a["bbox"][3] > 0:
                elems.setdefault(a["image_id"], []).append({"caption": names[a["category_id"]], "bb": a["bbox"], "kind": "object"})
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
        for entry in read_json(objects)[0]:
            for o in entry.get("objects", entry.get("attributes", [])):
                names = [n.strip() for n in o.get("names", [o.get("name", "")]) if n.strip()]
                if names and o["w"] > 0 and o["h"] > 0:
                    elem = {"caption": names[0], "bb": [o["x"], o["y"], o["w"], o["h"]], "kind": "object"}
                    attributes = [a.strip() for a in o.get("attributes") or [] if a.strip()]
                    if attributes:  # one is drawn per sample, as the authors do
                        elem["attributes"] = attributes
                    elems.setdefault(entry.get("image_id", entry.get("id")), []).append(elem)
    if regions:
        for entry in read_json(regions)[0]:
            for r in entry["regions"]:
                if r["phrase"].strip() and r["width"] > 0 and r["height"] > 0:
                    elems.setdefault(r["image_id"], []).append(
                        {"caption": r["phrase"].strip(), "bb": [r["x"], r["y"], r["width"], r["height"]], "kind": "region"})
    paths = {}
    if image_data:
        paths = {im.get("image_id", im.get("id")): "/".join(im["url"].split("/")[-2:])
                 for im in read_json(image_data)[0]}
    return [{"image": paths.get(i, f"{image_dir}/{i}.jpg"), "elems": elems[i]} for i in sorted(elems)]


class DataOnly(pickle.Unpickler):
    """A pickle of plain data only (lists, dicts, strings, numbers): any class or function it names is refused,
    so reading it runs no code. Python 2 strings (the REFER files are Python 2 pickles) read as latin-1."""

    def find_class(self, module, name):
        raise RecordError(f"a pickle of plain data was expected, and this one names {module}.{name}: not read")


def read_plain_pickle(path):
    with open(path, "rb") as f:
        try:
            return DataOnly(f, encoding="latin1").load()
        except RecordError as e:
            raise RecordError(f"{path}: {e}") from None
        except (pickle.UnpicklingError, EOFError, ValueError) as e:
            raise RecordError(f"{path}: not a readable pickle ({e})") from None


def convert_refcoco(records, refs, instances, dets=None):
    """The authors' RefCOCO+ files -> grounding records and proposals. records: their refcoco+_*.json
    ({"image", "text", "ref_id"}); refs: REFER's refs(unc).p (each ref's split and annotation); instances:
    REFER's instances.json (the annotations' boxes, the images' sizes); dets: their dets.json ({image id:
    [[x, y, w, h, ...], ...]}, weakly supervised grounding's proposals). Returns (records with "bbox" (the
    ref's annotation), "split", "ref_id", "image_id", "width", "height"; {image: proposal boxes} or None)."""
    by_ref = {r["ref_id"]: r for r in read_plain_pickle(refs)}
    coco, _ = read_json(instances)
    boxes = {a["id"]: a["bbox"] for a in coco["annotations"]}
    images = {im["id"]: im for im in coco["images"]}
    detections = read_json(dets)[0] if dets else None
    out, proposals = [], {} if dets else None
    for i, rec in enumerate(read_json(records)[0]):
        ref = by_ref.get(rec.get("ref_id"))
        if ref is None:
            raise RecordError(f"{records}: record {i}: field 'ref_id': {rec.get('ref_id')!r} is not a ref of {refs}")
        image = images[ref["image_id"]]
        out.append({"image": rec["image"], "text": rec["text"], "bbox": boxes[ref["ann_id"]], "split": ref["split"],
                    "ref_id": ref["ref_id"], "image_id": ref["image_id"], "width": image["width"], "height": image["height"]})
        if detections is not None:
            found = detections.get(str(ref["image_id"]))
            if not found:
                raise RecordError(f"{dets}: no detections for image {ref['image_id']} (record {i} of {records})")
            proposals[rec["image"]] = [list(d[:4]) for d in found]
    return out, proposals


# -----------------------------------------------------------------------------
# Command line

class CommandParser(argparse.ArgumentParser):
    """A mistake on the command line ends in one line naming it and exit status 1 (run_cli), as every other mistake."""

    def error(self, message):
        raise UsageError(f"{self.prog}: {message} ({self.prog} --help lists the options)")


def cli_parser():
    parser = CommandParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("check", help="validate data files and every image they name",
                       description="Read every record, decode every image, report each problem with file, record "
                       "and field; exit 1 if there is any.")
    p.add_argument("files", nargs="+", help="JSON / JSON lines files of any format, answer lists, proposal files, "
                   "tar shards ('DIR/{00000..00009}.tar')")
    p.add_argument("--image-root", help="directory the records' image paths are relative to (JSON files need it)")
    p.add_argument("--format", default="auto", choices=["auto", *FORMATS, "answer_list", "proposals"],
                   help="record format; auto = from the fields of each file's first record")

    p = sub.add_parser("shards", help="records -> tar shards in img2dataset's layout",
                       description="Pre-training records (image-text, box-annotated; retrieval records too) -> OUT/00000.tar, "
                       "... with KEY.jpg|png|webp, KEY.txt (the caption) and KEY.json (the record), and NNNNN_stats.json; "
                       "each kind in shards of its own. Read by train.py --data 'OUT/{00000..NNNNN}.tar'.")
    p.add_argument("--data", nargs="+", required=True, help="record files (JSON list or JSON lines)")
    p.add_argument("--image-root", required=True, help="directory the records' image paths are relative to")
    p.add_argument("--out", required=True, help="a new directory for the shards")
    p.add_argument("--per-shard", type=int, default=1000, help="samples per shard (default: 1000; img2dataset's 10000)")

    converters = {
        "convert-coco": ("COCO captions / instances -> pre-training records", "COCO captions -> image-text records; with "
                         "--instances, region records whose elements are the object boxes with their category names.",
                         [("--captions", "captions_*.json (COCO captions annotation file)"),
                          ("--instances", "instances_*.json (COCO detection annotation file)")],
                         ("", "prefix of the image paths, relative to the image root, e.g. train2014")),
        "convert-vg": ("Visual Genome objects / regions -> region records", "Visual Genome objects (with attributes) and "
                       "region descriptions -> region records, one per image.",
                       [("--objects", "objects.json, or attributes.json to keep the objects' attributes"),
                        ("--regions", "region_descriptions.json"),
                        ("--image-data", "image_data.json: take each image's folder (VG_100K or VG_100K_2) from its url")],
                       ("VG_100K", "image paths are IMAGE_DIR/ID.jpg relative to the image root")),
    }
    p = sub.add_parser("convert-refcoco", help="the authors' RefCOCO+ files -> grounding records (+ proposals)",
                       description="Their refcoco+_{val,test}.json with REFER's refs(unc).p and instances.json (the boxes, "
                       "splits and image sizes) -> grounding records; with --dets, their dets.json -> a proposals file for "
                       "--task grounding_weak. The pickle is read as plain data: nothing in it runs.")
    for option, option_help in (("--records", "refcoco+_val.json or refcoco+_test.json (their data/finetune)"),
                                ("--refs", "refcoco+/refs(unc).p"), ("--instances", "refcoco+/instances.json"),
                                ("--dets", "refcoco+/dets.json (optional: proposals for weakly supervised grounding)"),
                                ("--out", "grounding records to write (.json)"), ("--proposals-out", "proposals to write (with --dets)")):
        p.add_argument(option, required=option in ("--records", "--refs", "--instances", "--out"), help=option_help)
    for name, (help, description, sources, (image_dir, image_help)) in converters.items():
        p = sub.add_parser(name, help=help, description=description)
        for option, option_help in sources:
            p.add_argument(option, help=option_help)
        p.add_argument("--image-dir", default=image_dir, help=image_help)
        p.add_argument("--out", required=True, help="output file: .json for a JSON list, .jsonl for JSON lines")
    return parser


def main(argv=None):
    parser = cli_parser()
    args = parser.parse_args(argv)
    if args.command.startswith("convert-"):
        try:
            return convert(parser, args)
        except (KeyError, TypeError, AttributeError, IndexError) as e:  # a file of another structure
            raise RecordError(f"{sources(args)}: not the files {args.command} reads ({type(e).__name__}: {e}); "
                              f"see python data.py {args.command} --help") from None
    if args.command == "shards":
        write_shards(args.data, args.image_root, args.out, args.per_shard)
        return 0
    if args.command == "check":
        files, shards = split_data(args.files)
        if files and args.image_root is None:
            parser.error("check: JSON files need --image-root")
        problems, count = check_files(files, args.image_root, args.format) if files else ([], 0)
        shard_problems, samples = check_shards(shards)
        for line in problems + shard_problems:
            print(line)
        print(f"{count} records in {len(files)} file(s)" + (f", {samples} samples in {len(shards)} shard(s)" if shards else "")
              + f": {len(problems) + len(shard_problems)} problem(s)")
        return 1 if problems or shard_problems else 0


def sources(args):
    """The input files a convert-* command was given, for messages."""
    return ", ".join(str(v) for k, v in vars(args).items()
                     if v and k in ("captions", "instances", "objects", "regions", "image_data", "records", "refs", "dets"))


def convert(parser, args):
    """The convert-* commands: read the public annotation files, write our records (none: refused)."""
    if args.command == "convert-refcoco":
        if bool(args.dets) != bool(args.proposals_out):
            parser.error("convert-refcoco: --dets and --proposals-out go together")
        records, proposals = convert_refcoco(args.records, args.refs, args.instances, args.dets)
        write_records(args.out, records)
        if proposals is not None:
            Path(args.proposals_out).write_text(json.dumps(proposals))
        print(f"wrote {len(records)} records to {args.out}" + (f" and proposals of {len(proposals)} images to "
              f"{args.proposals_out}" if proposals is not None else ""))
        return 0
    if args.command == "convert-coco":
        if not (args.captions or args.instances):
            parser.error("convert-coco needs --captions and/or --instances")
        notes = []
        records = convert_coco(args.captions, args.instances, args.image_dir, notes)
        for note in notes:
            print(note)
    else:
        if not (args.objects or args.regions):
            parser.error("convert-vg needs --objects and/or --regions")
        records = convert_vg(args.objects, args.regions, args.image_dir, args.image_data)
    if not records:
        raise RecordError(f"{sources(args)}: no records came out: not the files {args.command} reads, or holding nothing")
    write_records(args.out, records, lines=str(args.out).endswith(".jsonl"))
    print(f"wrote {len(records)} records to {args.out}; next: python data.py check {args.out} --image-root DIR")
    return 0


def run_cli(main, argv=None):
    """Run a command line's main: a user's mistake (bad data, a missing file, a refused checkpoint)
    ends with one line naming it and exit status 1, not a traceback; --debug on the command line, or
    XVLM_DEBUG=1, shows the traceback. Ctrl-C ends with status 130."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv or os.environ.get("XVLM_DEBUG") == "1"
    try:
        return main([a for a in argv if a != "--debug"])
    except KeyboardInterrupt:
        if debug:
            raise
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError) as e:
        if debug:
            raise
        print(f"error: {e} (--debug shows where)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(run_cli(main))
