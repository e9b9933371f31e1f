"""Experiment harness: train.main with the pre-training loss restricted to some terms (EXP_LOSSES)."""
import dataclasses, os, sys
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2]))
import torch
import train, tasks
keep = os.environ.get("EXP_LOSSES")
if keep:
    keep = keep.split(",")
    def loss(model, batch):
        out = model(batch)
        out["loss"] = sum(out[k] for k in keep)
        return out
    tasks.TASKS["pretrain"] = dataclasses.replace(tasks.TASKS["pretrain"], loss=loss)
import data
if os.environ.get("EXP_NOCROP"):
    data.region_crop = lambda width, height, box, rng: (0, 0, width, height)
import xvlm as _x
import torch.nn.functional as _F
if os.environ.get("EXP_ITC_NO_VISION"):
    _x.XVLM.image_features = lambda self, e: _F.normalize(self.vision_proj(e[:, 0].detach()), dim=-1)
if os.environ.get("EXP_ITC_NO_TEXT"):
    _x.XVLM.text_features = lambda self, e: _F.normalize(self.text_proj(e[:, 0].detach()), dim=-1)
if os.environ.get("EXP_FREEZE_TEMP"):
    tasks.TASKS["pretrain"] = dataclasses.replace(tasks.TASKS["pretrain"], frozen=("temp",))
if os.environ.get("EXP_GENTLE"):
    import math
    def gentle(width, height, box, rng):
        x, y, w, h = data.random_resized_crop(width, height, rng, (0.8, 1.0))
        bx, by, bw, bh = box
        x0, y0 = min(x, math.floor(bx)), min(y, math.floor(by))
        x1, y1 = max(x + w, min(math.ceil(bx + bw), width)), max(y + h, min(math.ceil(by + bh), height))
        return x0, y0, x1 - x0, y1 - y0
    data.region_crop = gentle
if os.environ.get("EXP_FRESH"):
    import checkpoints
    orig = train.load_weights
    def lw(model, settings, task, init, log):
        fresh = orig(model, settings, task, init, log)
        known = {ours for ours, _ in checkpoints.vit_key_pairs(model.cfg) + checkpoints.bert_key_pairs(model.cfg) if ours}
        new = {n for n, _ in model.named_parameters() if n not in known}
        log(f"EXP_FRESH: {len(new)} parameters at lr x lr_mult")
        return fresh | new
    train.load_weights = lw
sys.exit(train.cli(sys.argv[1:]))
