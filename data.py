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
