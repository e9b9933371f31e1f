"""
Train X-VLM: pre-training and every downstream task, in one CPU process or on many GPUs.

    python train.py --task pretrain              # tiny X-VLM on the synthetic world: minutes on a laptop CPU
    python train.py --task retrieval --init runs/pretrain/checkpoint.pt
    torchrun --nproc-per-node 8 train.py --task pretrain --config base \\
        --data coco.json vg.jsonl cc3m.json --image-root /data/images --vocab bert-base-uncased/vocab.txt \\
        --vit-init deit_base_patch16_224-b5f2ef4d.pth --bert-init bert-base-uncased --precision bf16

With no --data, a task trains on the synthetic world (written to --synth-dir on first use) and
evaluates on its validation split. Every run writes OUT/log.txt, OUT/metrics.json (the last
step's losses and the final evaluation next to its chance level), OUT/losses.png and
OUT/checkpoint.pt. `--resume` continues a stopped run exactly where it stopped, with the settings
it was started with; a run's directory is never overwritten without `--overwrite`.

main() is a fixed sequence: flags; the run's settings (RECIPES for the preset and task, the flags
over them, or on --resume the stored run's); distributed setup; data and the evaluation inputs
(all checked before any compute); model and weights; optimizer and schedule; compile then DDP; the
loop (autocast, skip what cannot train, step, log, evaluate, save); the final evaluation,
metrics.json and the loss plot.
"""

import argparse
import dataclasses
import glob
import json
import math
import os
import random
import signal
import sys
import tempfile
import threading
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw
from torch.nn.parallel import DistributedDataParallel as DDP

import data
import tasks
import xvlm
from xvlm import XVLMConfig


# A skipped step (non-finite loss, too few images) still advances the schedule, so that the run's
# length and its learning rates stay those of its settings; torch warns of a step before any update.
warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before `optimizer.step\(\)`")


class UsageError(ValueError):
    """A flag or an output directory that cannot work; the message says what to do instead."""


# -----------------------------------------------------------------------------
# Recipes: each task's defaults, per preset, in one table. Flags override any entry.
#
# base: the paper where it states a value (4.2 and appendix B: pre-training 50 epochs of 3072
# images, AdamW, weight decay 0.02, 1e-5 -> 1e-4 over the first fifth then cosine back to 1e-5;
# fine-tuning at 384px for 10 / 8 / 1 + 10 / 1 + 10 / 5 epochs), else the authors' configs
# (zengyan-97/X-VLM configs/*.yaml: per-GPU batches, learning rates, the linear schedule with 10%
# warm-up of every fine-tune, weight decay 0.01, gradient clipping at 1.0 in the pre-training
# scripts only, twice the learning rate for newly initialised parameters).
# tiny: the same shape on the synthetic world, sized for 2 CPU cores: steps instead of epochs,
# a higher learning rate for a narrow model trained from scratch, gentle crops (its captions name
# every shape), and 64px throughout.

PRETRAIN = dict(schedule="cosine", warmup=0.2, lr_ends=0.1, weight_decay=0.02, grad_clip=1.0, lr_mult=2.0, image_res=None)
PRESTEP = dict(schedule="linear", warmup=0.1, lr_ends=0.0, weight_decay=0.01, grad_clip=1.0, lr_mult=2.0, image_res=None)
FINETUNE = dict(schedule="linear", warmup=0.1, lr_ends=0.0, weight_decay=0.01, grad_clip=0.0, lr_mult=2.0, image_res=384)
TINY = dict(image_res=None, crop_scale=(0.8, 1.0), rerank_k=16, epochs=None)

RECIPES = {
    "base": {
        "pretrain": dict(PRETRAIN, epochs=50, batch_size=96, lr=1e-4, crop_scale=(0.2, 1.0), rerank_k=128),
        "grounding_pretrain": dict(PRESTEP, epochs=1, batch_size=9, lr=3e-5, crop_scale=(0.2, 1.0), rerank_k=128),
        "nlvr2_pretrain": dict(PRESTEP, epochs=1, batch_size=128, lr=3e-5, crop_scale=(0.2, 1.0), rerank_k=128),
        "retrieval": dict(FINETUNE, epochs=10, batch_size=20, lr=3e-5, crop_scale=(0.5, 1.0), rerank_k=128),
        "vqa": dict(FINETUNE, epochs=8, batch_size=24, lr=5e-5, crop_scale=(0.5, 1.0), rerank_k=128),
        "nlvr2": dict(FINETUNE, epochs=10, batch_size=10, lr=3e-5, crop_scale=(0.5, 1.0), rerank_k=128),
        "grounding": dict(FINETUNE, epochs=10, batch_size=20, lr=3e-5, crop_scale=(0.5, 1.0), rerank_k=128),
        "grounding_weak": dict(FINETUNE, epochs=5, batch_size=20, lr=2e-5, crop_scale=(0.5, 1.0), rerank_k=128),
    },
    "tiny": {
        "pretrain": dict(PRETRAIN, **TINY, steps=1200, batch_size=16, lr=5e-4),
        "grounding_pretrain": dict(PRESTEP, **TINY, steps=400, batch_size=16, lr=5e-4),
        "nlvr2_pretrain": dict(PRESTEP, **TINY, steps=300, batch_size=32, lr=5e-4),
        "retrieval": dict(FINETUNE, **TINY, steps=300, batch_size=32, lr=5e-4),
        "vqa": dict(FINETUNE, **dict(TINY, rerank_k=8), steps=1800, batch_size=32, lr=5e-4),
        "nlvr2": dict(FINETUNE, **TINY, steps=1000, batch_size=32, lr=5e-4),
        "grounding": dict(FINETUNE, **TINY, steps=2000, batch_size=32, lr=5e-4),
        "grounding_weak": dict(FINETUNE, **TINY, steps=600, batch_size=32, lr=5e-4),
    },
}
for recipe in RECIPES["base"].values():
    recipe.setdefault("steps", None)

# Table 3's ablations, as the paper defines them: flags they set.
ABLATIONS = {
    "none": {},
    "no_object": dict(objects=False),  # w/o object: no object texts
    "no_region": dict(regions=False),  # w/o region: no region texts
    "no_bbox_loss": dict(use_bbox_loss=False),  # w/o bbox loss
    "no_mixed_attn": dict(local_layers="all"),  # w/o mixed attn: concepts by local attention in every layer
    "no_all": dict(objects=False, regions=False, use_bbox_loss=False, local_layers="all"),  # image-text pairs only
}


# -----------------------------------------------------------------------------
# Tasks: what `--task NAME` trains and evaluates. tasks.py holds the losses and evaluations.


@dataclass(frozen=True)
class Task:
    model: type  # XVLM or a task model; tasks.load_pretrained puts an X-VLM checkpoint into it
    loss: Callable  # loss(model, batch) -> {"loss": total, name: term, ...}, 0-dim tensors
    frozen: tuple  # parameter prefixes the loss never reaches: frozen (DDP needs every gradient)
    synth: dict  # the synthetic world's files (data.SYNTH_FILES keys): "train", "val", maybe more
    new_heads: tuple = ()  # always at lr * lr_mult (the authors' init_params of the task)
    min_images: int = 2  # a batch left with fewer readable images is skipped


ITC_ITM = ("vision_proj", "text_proj", "temp", "itm_head")  # the contrastive and matching heads

TASKS = {
    "pretrain": Task(xvlm.XVLM, lambda model, batch: model(batch), (),
                     {"train": ["pretrain_captions", "pretrain_regions"], "val": ["retrieval_val"],
                      "grounding_data": ["grounding_val"], "proposals": "grounding_proposals"}),
    "grounding_pretrain": Task(xvlm.XVLM, tasks.grounding_pretrain_loss, ITC_ITM + ("mlm_head",),
                               {"train": ["pretrain_regions"], "val": ["grounding_val"]}, min_images=1),
    "nlvr2_pretrain": Task(tasks.NLVR2Model, tasks.text_assignment_loss, ITC_ITM + ("bbox_head", "mlm_head", "cls_head"),
                           {"train": ["retrieval_train"], "val": ["retrieval_val"]}, ("assign_head",), min_images=3),
    "retrieval": Task(xvlm.XVLM, tasks.retrieval_loss, ("bbox_head", "mlm_head"),
                      {"train": ["retrieval_train"], "val": ["retrieval_val"]}),
    "vqa": Task(tasks.VQAModel, tasks.vqa_loss, ITC_ITM + ("bbox_head", "mlm_head"),
                {"train": ["vqa_train"], "val": ["vqa_val"], "answer_list": "answer_list"}, min_images=1),
    "nlvr2": Task(tasks.NLVR2Model, tasks.nlvr2_loss, ITC_ITM + ("bbox_head", "mlm_head", "assign_head"),
                  {"train": ["nlvr2_train"], "val": ["nlvr2_val"]}, ("cls_head",), min_images=1),
    "grounding": Task(xvlm.XVLM, tasks.grounding_loss, ITC_ITM + ("mlm_head",),
                      {"train": ["grounding_train"], "val": ["grounding_val"]}, min_images=1),
    "grounding_weak": Task(xvlm.XVLM, tasks.retrieval_loss, ("bbox_head", "mlm_head"),
                           {"train": ["grounding_train"], "val": ["grounding_val"], "proposals": "grounding_proposals"}),
}


def data_files(settings):
    """The settings with every data path filled: the user's files, else the synthetic world's."""
    if settings.data is not None:
        return settings
    root, keys = Path(settings.synth_dir), TASKS[settings.task].synth
    path = lambda key: str(root / data.SYNTH_FILES[key])
    return dataclasses.replace(
        settings, data=[path(k) for k in keys["train"]], eval_data=[path(k) for k in keys["val"]],
        image_root=path("images"), vocab=path("vocab"),
        answer_list=settings.answer_list or (path(keys["answer_list"]) if "answer_list" in keys else None),
        proposals=settings.proposals or (path(keys["proposals"]) if "proposals" in keys else None),
        grounding_data=settings.grounding_data or [path(k) for k in keys.get("grounding_data", [])] or None)


def train_loader(settings, tokenizer, cfg, rank, world_size):
    """The task's training batches, epoch after epoch, resumable (state_dict / load_state_dict)."""
    s, task = settings, settings.task
    common = dict(workers=s.workers, seed=s.seed, rank=rank, world_size=world_size)
    if task in ("pretrain", "grounding_pretrain"):
        elements = tuple(k for k, on in (("object", s.objects), ("region", s.regions)) if on)
        return data.pretrain_loader(s.data, s.image_root, tokenizer, cfg, s.batch_size, s.max_regions, s.crop_scale,
                                    elements, image_text=task == "pretrain", mlm=task == "pretrain", **common)
    args = (s.data, s.image_root, tokenizer, cfg.max_tokens, cfg.image_res)
    if task in ("grounding", "grounding_weak"):
        dataset = data.GroundingDataset(*args)
    else:
        kind = {"retrieval": data.RetrievalTrainDataset, "nlvr2_pretrain": data.RetrievalTrainDataset,
                "vqa": data.VQADataset, "nlvr2": data.NLVR2Dataset}[task]
        dataset = kind(*args, train=True, seed=s.seed, crop_scale=s.crop_scale)
    return data.task_train_loader(dataset, s.batch_size, **common)


class Batches:
    """A dataset's evaluation batches, read afresh each time; unreadable images logged and counted."""

    def __init__(self, dataset, log):
        self.dataset, self.log, self.skipped = dataset, log, 0

    def __iter__(self):
        self.skipped = 0
        for batch in data.eval_loader(self.dataset):
            for u in batch.pop("skipped"):
                self.log(f"skipping unreadable image {u.path}: {u.reason}")
                self.skipped += 1
            yield batch

    def counted(self, metrics):
        return {**metrics, "skipped_images": self.skipped} if self.skipped else metrics


def evaluation(settings, tokenizer, cfg, log):
    """The task's evaluation as a function of the model, with its inputs (records, answer list,
    proposals) read and checked now, before any training; None without evaluation data."""
    s, task = settings, settings.task
    if not s.eval_data and not (task == "pretrain" and s.grounding_data):
        return None
    args = (tokenizer, cfg.max_tokens, cfg.image_res)
    if task in ("pretrain", "retrieval", "nlvr2_pretrain"):
        split = data.RetrievalEvalDataset(s.eval_data, s.image_root, *args) if s.eval_data else None
    if task == "pretrain":
        grounding = (Batches(data.GroundingDataset(s.grounding_data, s.image_root, *args, proposals=s.proposals), log)
                     if s.grounding_data else None)

        def run(model):  # zero-shot, straight after pre-training
            out = {"retrieval": retrieval_metrics(model, split, tokenizer, cfg, s.rerank_k, log)} if split else {}
            if grounding:
                batches = list(grounding)  # the images are read once for both
                out["grounding"] = grounding.counted(tasks.evaluate_grounding(model, batches))
                if s.proposals:
                    out["grounding_regions"] = grounding.counted(tasks.evaluate_grounding_regions(model, batches))
            return out
        return run
    if task == "retrieval":
        return lambda model: retrieval_metrics(model, split, tokenizer, cfg, s.rerank_k, log)
    if task == "nlvr2_pretrain":
        batches = Batches(split, log)

        def pairs():  # each image with its first caption
            for b in batches:
                ids, mask = tokenizer.encode_batch([split.texts[split.img2txt[i][0]] for i in b["index"].tolist()], cfg.max_tokens)
                yield {"images": b["images"], "text_ids": ids, "text_mask": mask}
        return lambda model: batches.counted(tasks.evaluate_text_assignment(model, pairs()))
    if task == "vqa":
        if not s.answer_list:
            raise UsageError("--task vqa evaluates by ranking candidate answers: give --answer-list (a JSON list of strings)")
        answers = data.read_answer_list(s.answer_list)
        answer_ids, answer_mask = tokenizer.encode_batch(answers, cfg.max_tokens)
        batches = Batches(data.VQADataset(s.eval_data, s.image_root, *args), log)
        return lambda model: batches.counted(tasks.evaluate_vqa(model, batches, answer_ids, answer_mask, answers, k=s.rerank_k))
    if task == "nlvr2":
        batches = Batches(data.NLVR2Dataset(s.eval_data, s.image_root, *args), log)
        return lambda model: batches.counted(tasks.evaluate_nlvr2(model, batches))
    if task == "grounding_weak" and not s.proposals:
        raise UsageError("--task grounding_weak ranks proposal boxes: give --proposals ({image: [[x, y, w, h], ...]})")
    batches = Batches(data.GroundingDataset(s.eval_data, s.image_root, *args, proposals=s.proposals if task == "grounding_weak" else None), log)
    evaluate = tasks.evaluate_grounding_weak if task == "grounding_weak" else tasks.evaluate_grounding
    return lambda model: batches.counted(evaluate(model, batches))


def retrieval_metrics(model, split, tokenizer, cfg, k, log):
    """TR / IR recall of the retrieval split, leaving out the texts of images that turn out unreadable."""
    batches = Batches(split, log)
    images, kept = [], []
    for b in batches:
        images.append(b["images"])
        kept += b["index"].tolist()
    row = {image: r for r, image in enumerate(kept)}
    texts = [t for t in range(len(split.texts)) if split.txt2img[t] in row]
    text_batches = [tokenizer.encode_batch([split.texts[t] for t in texts[i:i + 256]], cfg.max_tokens)
                    for i in range(0, len(texts), 256)]
    text_image = torch.tensor([row[split.txt2img[t]] for t in texts])
    return batches.counted(tasks.evaluate_retrieval(model, images, text_batches, text_image, k=k))


# -----------------------------------------------------------------------------
# Flags: one dataclass, one argparse flag per field (and one per XVLMConfig field)


def flag(default, help, **kwargs):
    return field(default=default, metadata=dict(help=help, **kwargs))


RECIPE = "(default: RECIPES[--config][--task])"


@dataclass
class TrainConfig:
    task: str = flag("pretrain", "what to train (default: pretrain)", choices=list(TASKS))
    config: str = flag("tiny", "model preset and recipe: 'base' is the paper's X-VLM-base, 'tiny' (the default) a CPU-sized one", choices=["tiny", "base"])
    data: list = flag(None, "training files (JSON list or JSON lines) (default: the synthetic world's split for --task)", nargs="+")
    eval_data: list = flag(None, "evaluation files (pretrain: retrieval val/test records) (default: the synthetic world's validation split; with --data, none: no evaluation)", nargs="+")
    image_root: str = flag(None, "directory the records' image paths are relative to (default: the synthetic world's)")
    vocab: str = flag(None, "BERT vocab.txt (default: the synthetic world's)")
    answer_list: str = flag(None, "vqa: the candidate answers, a JSON list (default: the synthetic world's)")
    proposals: str = flag(None, "grounding_weak (and pretrain's zero-shot grounding): proposal boxes per image, {image: [[x, y, w, h], ...]} (default: the synthetic world's)")
    grounding_data: list = flag(None, "pretrain: grounding records for the zero-shot grounding evaluation (default: the synthetic world's validation split)", nargs="+")
    synth_dir: str = flag("synth", "where the synthetic world lives; written on first use (default: synth)")
    steps: int = flag(None, f"optimizer steps {RECIPE}; with --epochs, epochs of the training data")
    epochs: float = flag(None, f"epochs of the training data, instead of --steps {RECIPE}")
    batch_size: int = flag(None, f"images per process and step {RECIPE}")
    lr: float = flag(None, f"peak learning rate {RECIPE}")
    lr_mult: float = flag(None, f"learning rate factor of parameters no checkpoint filled and of new heads (the authors' lr_mult) {RECIPE}")
    schedule: str = flag(None, f"'cosine': warm up from lr * lr_ends, cosine back down (the paper's pre-training); 'linear': warm up from 0, linear to 0 (the authors' fine-tuning) {RECIPE}", choices=["cosine", "linear"])
    warmup: float = flag(None, f"fraction of the steps spent warming up {RECIPE}")
    lr_ends: float = flag(None, f"cosine: start and end learning rate as a fraction of the peak (paper: 1e-5 / 1e-4) {RECIPE}")
    weight_decay: float = flag(None, f"AdamW weight decay, not on biases, norms and other 1-d parameters {RECIPE}")
    grad_clip: float = flag(None, f"clip the gradient norm to this value, 0: off {RECIPE}")
    precision: str = flag("fp32", "autocast precision; fp16 (with a GradScaler) needs CUDA (default: fp32)", choices=["fp32", "bf16", "fp16"])
    vit_init: str = flag(None, "DeiT/timm ViT weights (file or directory) for the image encoder")
    bert_init: str = flag(None, "Hugging Face BERT weights (file or directory) for the text and cross-modal encoders")
    init: str = flag(None, "one of our checkpoints to start from (e.g. a pre-trained one for a downstream task); its architecture comes along, flags override it")
    out: str = flag(None, "output directory (default: runs/TASK)")
    resume: bool = flag(False, "continue the run in OUT from its checkpoint, with the settings it was started with")
    overwrite: bool = flag(False, "start over in OUT, deleting the run there")
    ablation: str = flag("none", "pretrain: one of the paper's Table 3 ablations (default: none)", choices=list(ABLATIONS))
    objects: bool = flag(True, "pretrain: use object texts (--no-objects: Table 3's w/o object)")
    regions: bool = flag(True, "pretrain: use region texts (--no-regions: Table 3's w/o region)")
    seed: int = flag(0, "seed of the model's init, the data order and every random draw (default: 0)")
    log_every: int = flag(25, "steps between progress lines (default: 25)")
    eval_every: int = flag(0, "steps between evaluations, 0: only at the end (default: 0)")
    save_every: int = flag(250, "steps between checkpoints; one is always written at the end (default: 250)")
    workers: int = flag(1, "data-loading processes per training process (default: 1)")
    compile: bool = flag(False, "torch.compile the model")
    max_regions: int = flag(5, "pretrain: most texts per box-annotated image, its caption included, as the authors' (default: 5)")
    crop_scale: list = flag(None, f"random resized crop's area range LO HI {RECIPE}", nargs=2, type=float)
    rerank_k: int = flag(None, f"re-rank the top k by ITM in retrieval, by full likelihood in VQA (paper: 256 COCO, 128 Flickr) {RECIPE}")
    device: str = flag(None, "cpu, cuda or cuda:N (default: cuda when available; under torchrun cuda:LOCAL_RANK)")


# Flags that may differ on --resume: they change how a run is watched, not what it computes.
RESUME_FREE = {"resume", "out", "overwrite", "log_every", "eval_every", "save_every", "workers", "device", "compile"}
MODEL_FLAGS = [f.name for f in fields(XVLMConfig)]


def build_parser():
    p = argparse.ArgumentParser(description="Pre-train X-VLM or fine-tune it on a downstream task.")
    for f in fields(TrainConfig):
        meta = dict(f.metadata)
        add_flag(p, f.name, meta.pop("type", f.type), f.default, **meta)
    p.add_argument("--debug", action="store_true", help="show the traceback of an error (or set XVLM_DEBUG=1)")
    model = p.add_argument_group("model", "override any field of the --config preset (XVLMConfig)")
    tiny, base = XVLMConfig.tiny(), XVLMConfig()
    for f in fields(XVLMConfig):
        add_flag(model, f.name, type(f.default), None,
                 help=f"XVLMConfig.{f.name} (tiny: {getattr(tiny, f.name)!r}, base: {getattr(base, f.name)!r})")
    return p


def add_flag(parser, name, kind, default, help, **kwargs):
    option = "--" + name.replace("_", "-")
    if kind is bool:
        parser.add_argument(option, action=argparse.BooleanOptionalAction, default=default, help=help)
    else:
        parser.add_argument(option, type=str if kind is list else kind, default=default, help=help, **kwargs)


def parse_args(argv=None):
    """(the flags as a namespace, the names of those given on the command line)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    given = build_parser()  # the same flags, defaulting to absent: what the command line gave
    for action in given._actions:
        action.default = argparse.SUPPRESS
    explicit = set(vars(given.parse_args(argv))) - {"debug"}
    finite = lambda v: v is None or math.isfinite(v)
    problems = [
        (args.steps is not None and args.steps < 1, f"--steps must be >= 1, got {args.steps}"),
        (not finite(args.epochs) or (args.epochs is not None and args.epochs <= 0), f"--epochs must be a number > 0, got {args.epochs}"),
        (args.steps is not None and args.epochs is not None, "give --steps or --epochs, not both"),
        (args.batch_size is not None and args.batch_size < 2, f"--batch-size must be >= 2, got {args.batch_size}"),
        (not finite(args.lr) or (args.lr is not None and args.lr <= 0), f"--lr must be a number > 0, got {args.lr}"),
        (not finite(args.lr_mult) or (args.lr_mult is not None and args.lr_mult <= 0), f"--lr-mult must be a number > 0, got {args.lr_mult}"),
        (not finite(args.weight_decay) or (args.weight_decay is not None and args.weight_decay < 0), f"--weight-decay must be a number >= 0, got {args.weight_decay}"),
        (not finite(args.grad_clip) or (args.grad_clip is not None and args.grad_clip < 0), f"--grad-clip must be a number >= 0, got {args.grad_clip}"),
        (args.warmup is not None and not 0 <= args.warmup < 1, f"--warmup must lie in [0, 1), got {args.warmup}"),
        (args.lr_ends is not None and not 0 <= args.lr_ends <= 1, f"--lr-ends must lie in [0, 1], got {args.lr_ends}"),
        (min(args.log_every, args.save_every, args.eval_every, args.workers) < 0, "--log-every, --save-every, --eval-every and --workers must be >= 0"),
        (args.max_regions < 1, f"--max-regions must be >= 1, got {args.max_regions}"),
        (args.data is not None and args.image_root is None, "--data needs --image-root"),
        (args.data is not None and args.vocab is None, "--data needs --vocab"),
        (args.crop_scale is not None and not 0 < args.crop_scale[0] <= args.crop_scale[1] <= 1, f"--crop-scale needs 0 < LO <= HI <= 1, got {args.crop_scale}"),
        (args.rerank_k is not None and args.rerank_k < 1, f"--rerank-k must be >= 1, got {args.rerank_k}"),
        (args.resume and args.overwrite, "give --resume or --overwrite, not both"),
        (args.ablation != "none" and args.task != "pretrain", f"--ablation {args.ablation} is a pre-training switch (--task pretrain)"),
    ]
    for bad, message in problems:
        if bad:
            parser.error(message)
    return args, explicit


# -----------------------------------------------------------------------------
# Settings: what a run computes, resolved once


def resolve(args, explicit):
    """The run's TrainConfig: the recipe of (--config, --task), the ablation's flags, then the flags
    the user gave. Returns (settings, model overrides {XVLMConfig field: value})."""
    recipe = dict(RECIPES[args.config][args.task])
    image_res = recipe.pop("image_res")  # a model setting: fine-tuning at 384 (base)
    if args.steps is not None or args.epochs is not None:
        recipe["steps"], recipe["epochs"] = args.steps, args.epochs
    ablation = ABLATIONS[args.ablation]
    given = {k: getattr(args, k) for k in explicit if k in {f.name for f in fields(TrainConfig)}}
    clash = [k for k, v in ablation.items() if k in explicit and getattr(args, k) != v]
    if clash:
        raise UsageError(f"--ablation {args.ablation} sets --{clash[0].replace('_', '-')} {ablation[clash[0]]}; drop one of the two")
    settings = {**{f.name: getattr(args, f.name) for f in fields(TrainConfig)}, **recipe,
                **{k: v for k, v in ablation.items() if k in ("objects", "regions")}, **given}
    if settings["crop_scale"] is not None:
        settings["crop_scale"] = list(settings["crop_scale"])
    overrides = {k: getattr(args, k) for k in MODEL_FLAGS if getattr(args, k) is not None}
    if image_res and "image_res" not in overrides:
        overrides["image_res"] = image_res
    overrides.update({k: v for k, v in ablation.items() if k in MODEL_FLAGS and k not in overrides})
    return TrainConfig(**settings), overrides


def model_config(settings, overrides, tokenizer):
    """The preset (or, with --init, the config stored in that checkpoint: fine-tuning keeps the
    pre-trained architecture), the vocabulary's size and special ids, then the overrides: the
    user's flags and the recipe's image_res ("all" local layers: every layer, Table 3's w/o mixed attn)."""
    cfg = (XVLMConfig() if settings.config == "base" else XVLMConfig.tiny()).to_dict()
    stored = xvlm.stored_config(*xvlm.read_file(settings.init)) if settings.init else None
    vocab = dict(vocab_size=tokenizer.vocab_size, pad_token_id=tokenizer.pad_id, cls_token_id=tokenizer.cls_id,
                 sep_token_id=tokenizer.sep_id, mask_token_id=tokenizer.mask_id)
    if overrides.get("vocab_size", tokenizer.vocab_size) < tokenizer.vocab_size:
        raise UsageError(f"--vocab-size {overrides['vocab_size']} is smaller than the vocabulary ({tokenizer.vocab_size} tokens in {tokenizer.vocab_file})")
    merged = {**cfg, **(stored or {}), **vocab, **overrides}
    if merged.get("local_layers") == "all":
        merged["local_layers"] = merged["vision_layers"]
    return XVLMConfig(**merged)


def check_resume(stored, stored_cfg, args, explicit, overrides):
    """Refuse a --resume whose flags would change what the run computes; name every such flag."""
    flag_name = lambda k: "--" + k.replace("_", "-")
    changed = [f"{flag_name(k)} {getattr(args, k)!r} (the run: {stored.get(k)!r})" for k in sorted(explicit)
               if k in stored and k not in RESUME_FREE and getattr(args, k) != stored.get(k)
               and not (k == "crop_scale" and list(getattr(args, k)) == stored.get(k))]
    changed += [f"{flag_name(k)} {v!r} (the run: {stored_cfg.get(k)!r})" for k, v in overrides.items()
                if k in explicit and stored_cfg.get(k) != v]
    if changed:
        raise UsageError(f"--resume continues the run with its own settings, and these flags differ: {', '.join(changed)}; "
                         f"drop them to continue it, or start a new run with --out DIR")


# -----------------------------------------------------------------------------
# Optimizer and schedule


def lr_factor(step, total, schedule="cosine", warmup=0.2, ends=0.1):
    """Learning rate at `step` (0-based) as a fraction of the peak. cosine (paper 4.2): linear from
    `ends` to 1 over the first `warmup` of the steps, then cosine down to `ends` at the last step.
    linear (the authors' scheduler.py): from 0 to 1 over the warm-up, then linear down to 0."""
    warm = int(total * warmup)
    if schedule == "linear":
        return step / max(1, warm) if step < warm else max(0.0, (total - step) / max(1, total - warm))
    if step < warm:
        return ends + (1 - ends) * step / warm
    progress = min(1.0, (step - warm) / max(1, total - 1 - warm))
    return ends + (1 - ends) * 0.5 * (1 + math.cos(math.pi * progress))


def param_groups(model, weight_decay, lr, fresh=(), lr_mult=1.0):
    """AdamW groups: decay on matrices (linear, conv, embeddings), not on biases, norms, the
    temperature and other 1-d vectors; parameters named in `fresh` at lr * lr_mult."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in named if (p.dim() >= 2) == decay and (n in fresh) == new],
               "weight_decay": weight_decay if decay else 0.0, "lr": lr * (lr_mult if new else 1.0)}
              for new in (False, True) for decay in (True, False)]
    return [g for g in groups if g["params"]]


# -----------------------------------------------------------------------------
# Checkpoints: atomic, resumable step-exactly


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
    """The inverse of rng_state(): every generator continues where it was saved (CUDA's where there is CUDA)."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, mt, gauss_next = state["python"]
    random.setstate((version, tuple(mt), gauss_next))


def save_checkpoint(path, model, optimizer=None, scheduler=None, step=0, extra=None, rng=None):
    """Write {"model", "optimizer", "scheduler", "step", "config", "rng", "extra"} to `path`: plain
    data (it loads with torch.load(weights_only=True)), `model` the unwrapped module with a `cfg`.
    Atomic: written to a temporary file beside `path`, then renamed over it, so a crash mid-write
    leaves the previous file whole (a killed process leaves the temporary file: remove_partial_saves).

    To resume: rebuild the model, build the optimizer and the scheduler as at the start, then load
    their states and set_rng_state(checkpoint["rng"]). Footgun: a scheduler built after the
    optimizer's state is loaded resets the learning rate to its step-0 value. Bit-exact resumption
    also needs torch.use_deterministic_algorithms(True): index backward may accumulate in any order."""
    path = Path(path)
    checkpoint = {"model": model.state_dict(),
                  "optimizer": None if optimizer is None else optimizer.state_dict(),
                  "scheduler": None if scheduler is None else scheduler.state_dict(),
                  "step": step, "config": model.cfg.to_dict(), "rng": rng or rng_state(), "extra": extra or {}}
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


def remove_partial_saves(out):
    """Temporary files of checkpoint writes that a killed process left behind; returns their names."""
    stale = glob.glob(str(Path(out) / ".*.tmp"))
    for path in stale:
        os.unlink(path)
    return stale


def write_json(path, value):
    """Atomically: a crash never leaves half a metrics file."""
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(value, indent=2) + "\n")
    os.replace(tmp, path)


def claim_out(out, settings):
    """Make OUT ready for this run and return the checkpoint to resume from (or None). A directory
    holding a run is refused unless --resume (continue it) or --overwrite (delete it) says what to do."""
    checkpoint, metrics, log = out / "checkpoint.pt", out / "metrics.json", out / "log.txt"
    if settings.overwrite:
        for path in (checkpoint, metrics, log, out / "losses.png"):
            path.unlink(missing_ok=True)
    held = [p.name for p in (checkpoint, metrics) if p.exists()]  # a log alone: a start that failed, appended to
    if settings.resume:
        if not checkpoint.exists():
            raise UsageError(f"--resume: {checkpoint} does not exist" + (f" ({out} holds {', '.join(held)})" if held else ""))
        return xvlm.read_file(checkpoint)[0]
    if held:
        what = "a finished run" if metrics.exists() else "a run"
        raise UsageError(f"{out} holds {what} ({', '.join(held)}): --resume continues it, --overwrite deletes it, "
                         f"--out DIR writes elsewhere")
    out.mkdir(parents=True, exist_ok=True)
    return None


# -----------------------------------------------------------------------------
# Logging and the loss plot


class Log:
    """Prints on rank 0 and appends to OUT/log.txt; other ranks stay quiet."""

    def __init__(self, path, rank):
        self.file = open(path, "a", encoding="utf-8") if rank == 0 else None

    def __call__(self, message):
        if self.file is not None:
            print(message, flush=True)
            self.file.write(message + "\n")
            self.file.flush()

    def close(self):
        if self.file is not None:
            self.file.close()


def plot_losses(history, path, title):
    """One small panel per loss term, drawn with PIL: step on x, the term on y (its own scale)."""
    names = [k for k in history[0] if k != "step"] if history else []
    cols, w, h, pad = 3, 300, 200, 40
    rows = max(1, math.ceil(len(names) / cols))
    img = Image.new("RGB", (cols * w, rows * h + 30), "white")
    draw = ImageDraw.Draw(img)
    draw.text((10, 8), title, fill="black")
    steps = [r["step"] for r in history]
    for n, name in enumerate(names):
        x0, y0 = (n % cols) * w + pad, (n // cols) * h + 30 + 20
        x1, y1 = x0 + w - pad - 15, y0 + h - 20 - pad
        values = [r[name] for r in history]
        lo, hi = min(values), max(values)
        hi = hi if hi > lo else lo + 1e-6
        draw.rectangle([x0, y0, x1, y1], outline="gray")
        draw.text((x0, y0 - 16), f"{name}  (last {values[-1]:.3f})", fill="black")
        draw.text((x0 - pad + 2, y0), f"{hi:.2f}", fill="gray")
        draw.text((x0 - pad + 2, y1 - 10), f"{lo:.2f}", fill="gray")
        draw.text((x0, y1 + 4), f"{steps[0]}", fill="gray")
        draw.text((x1 - 30, y1 + 4), f"{steps[-1]}", fill="gray")
        span = max(1, steps[-1] - steps[0])
        points = [(x0 + (s - steps[0]) / span * (x1 - x0), y1 - (v - lo) / (hi - lo) * (y1 - y0)) for s, v in zip(steps, values)]
        if len(points) > 1:
            draw.line(points, fill=(31, 119, 180), width=2)
        else:
            draw.ellipse([points[0][0] - 2, points[0][1] - 2, points[0][0] + 2, points[0][1] + 2], fill=(31, 119, 180))
    tmp = Path(str(path) + ".tmp.png")
    img.save(tmp)
    os.replace(tmp, path)


def flat(metrics, prefix=""):
    """{"retrieval": {"r_mean": 1}} -> {"retrieval.r_mean": 1}, for one log line."""
    out = {}
    for k, v in metrics.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def fmt_time(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


# -----------------------------------------------------------------------------
# Distributed, devices, interruption


def setup_distributed(device_name=None):
    """Rank, world size and device from torchrun's environment; NCCL on CUDA, gloo on CPU."""
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    name = device_name or ("cuda" if torch.cuda.is_available() else "cpu")
    kind, _, index = name.partition(":")
    if kind not in ("cpu", "cuda") or (index and not index.isdigit()) or (kind == "cpu" and index):
        raise UsageError(f"--device {name}: use cpu, cuda or cuda:N")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: no CUDA device is available")
        if index and world_size > 1:
            raise UsageError(f"--device {name}: under torchrun each process takes cuda:LOCAL_RANK; give --device cuda")
        device = torch.device("cuda", int(index) if index else local_rank)
        if device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1:
        dist.init_process_group("nccl" if kind == "cuda" else "gloo")
    return rank, world_size, device


def everywhere(ok, world_size, device):
    """Whether `ok` holds on every rank: all ranks must skip a step together, or DDP hangs."""
    if world_size == 1:
        return bool(ok)
    flag = torch.tensor(float(ok), device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def gather_rng_states(world_size):
    """Every rank's RNG state, so a resumed DDP run continues each rank's own random stream."""
    state = rng_state()
    if world_size == 1:
        return [state]
    states = [None] * world_size
    dist.all_gather_object(states, state)
    return states


class StopRequest:
    """Ctrl-C (SIGINT) asks the loop to stop after the current step and save; a second one stops at once."""

    def __init__(self, log):
        self.log, self.requested, self.previous = log, False, None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signal handlers live there only
            self.previous = signal.signal(signal.SIGINT, self.handle)
        return self

    def handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.log("interrupt: stopping after this step and saving a checkpoint (Ctrl-C again stops at once, unsaved)")

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


# -----------------------------------------------------------------------------
# The run


def main(argv=None):
    # 1. Flags; the directory the run writes to (refused if it holds another run); the settings:
    #    the recipe and the flags, or on --resume the stored run's own.
    args, explicit = parse_args(argv)
    rank, world_size, device = setup_distributed(args.device)
    out = Path(args.out or f"runs/{args.task}")
    previous = claim_out(out, args) if rank == 0 else None
    if world_size > 1:
        dist.barrier()
        if rank != 0 and args.resume:
            previous = xvlm.read_file(out / "checkpoint.pt")[0]
    settings, overrides = run_settings(args, explicit, previous, device)
    log = Log(out / "log.txt", rank)
    log("$ train.py " + " ".join(sys.argv[1:] if argv is None else argv))
    for path in (remove_partial_saves(out) if rank == 0 else []):
        log(f"removed {path}: a checkpoint write that a killed run left half done")

    # 2. Data, and every input the evaluation will need, checked before any compute.
    settings, tokenizer = prepare_data(settings, rank, world_size, log)
    task = TASKS[settings.task]
    cfg = XVLMConfig(**previous["config"]) if previous is not None else model_config(settings, overrides, tokenizer)
    if settings.batch_size < task.min_images:
        raise UsageError(f"--task {settings.task} needs --batch-size >= {task.min_images}, got {settings.batch_size}")
    loader = train_loader(settings, tokenizer, cfg, rank, world_size)
    if settings.steps is None:
        settings = dataclasses.replace(settings, steps=max(1, round(settings.epochs * len(loader))))
    evaluate_task = evaluation(settings, tokenizer, cfg, log)
    if evaluate_task is None:
        log("no evaluation data (--eval-data): training only, no evaluation at the end")

    # 3. Model: the same init on every rank (DDP broadcasts rank 0's anyway), then public weights;
    #    what the task's loss never reaches is frozen, so that DDP waits for no gradient.
    torch.manual_seed(settings.seed)
    model = task.model(cfg)
    counts = model.param_counts()
    log(f"XVLM: {counts['vision'] / 1e6:.1f}M vision, {counts['text+fusion'] / 1e6:.1f}M text+fusion, "
        f"{counts['total'] / 1e6:.1f}M parameters in all")
    fresh = load_weights(model, settings, task, log) if previous is None else set(previous["extra"]["fresh"])
    frozen = task.frozen + (("bbox_head",) if settings.task == "pretrain" and not cfg.use_bbox_loss else ())
    for name, p in model.named_parameters():
        p.requires_grad_(not name.startswith(frozen))

    # 4. Optimizer, schedule, and where the run stands; then train, evaluate, write the results.
    run = Run(settings, task, model.to(device), fresh, loader, evaluate_task, out, log, rank, world_size, device)
    if previous is not None:
        run.restore(previous)
        if run.step >= run.total:
            log(f"the run finished at step {run.step}; its metrics are in {out / 'metrics.json'}")
            return json.loads((out / "metrics.json").read_text()).get("eval", {}) if (out / "metrics.json").exists() else {}
    else:
        torch.manual_seed(settings.seed + rank)  # ranks draw different negatives and dropout
    run.train()
    metrics = run.finish()
    log.close()
    if world_size > 1:
        dist.destroy_process_group()
    return metrics


def run_settings(args, explicit, previous, device):
    """(settings, model overrides): resolve()'s, or the resumed run's own, refusing flags that differ."""
    settings, overrides = resolve(args, explicit)
    if previous is not None:
        stored = previous["extra"]["settings"]
        check_resume(stored, previous["config"], args, explicit, overrides)
        settings = TrainConfig(**{**stored, **{k: getattr(args, k) for k in RESUME_FREE}})
    if settings.precision == "fp16" and device.type != "cuda":
        raise UsageError("--precision fp16 needs CUDA (use bf16 on CPU)")
    return settings, overrides


def prepare_data(settings, rank, world_size, log):
    """The synthetic world written if the run needs it; the settings with every data path; the tokenizer."""
    if settings.data is None and rank == 0 and not data.synth_ready(settings.synth_dir):
        log(f"writing the synthetic world to {settings.synth_dir}/ (once, ~30 s)")
        data.synthesize(settings.synth_dir, seed=0)
    if world_size > 1:
        dist.barrier()
    settings = data_files(settings)
    return settings, data.Tokenizer(settings.vocab)


class Run:
    """A training run's state: the model, AdamW (the authors' betas) with the recipe's schedule, the
    data position, the logged history and the skip counters; train() runs it to its last step."""

    def __init__(self, settings, task, model, fresh, loader, evaluate_task, out, log, rank, world_size, device):
        self.settings, self.task, self.model, self.fresh, self.loader = settings, task, model, fresh, loader
        self.evaluate_task, self.out, self.log = evaluate_task, out, log
        self.rank, self.world_size, self.device = rank, world_size, device
        s = settings
        self.optimizer = torch.optim.AdamW(param_groups(model, s.weight_decay, s.lr, fresh, s.lr_mult),
                                           lr=s.lr, betas=(0.9, 0.98), eps=1e-8)
        self.total = s.steps
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(step, self.total, s.schedule, s.warmup, s.lr_ends))
        self.scaler = torch.amp.GradScaler("cuda", enabled=s.precision == "fp16")
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(s.precision)
        self.autocast = torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()
        self.step, self.history, self.skipped_steps, self.skipped_images = 0, [], 0, 0

    def restore(self, previous):
        """Continue a checkpoint: weights, optimizer, schedule, scaler, data position, history, RNG."""
        self.model.load_state_dict(previous["model"])
        self.optimizer.load_state_dict(previous["optimizer"])
        self.schedule.load_state_dict(previous["scheduler"])
        extra = previous["extra"]
        self.step, self.history = previous["step"], extra["history"]
        self.skipped_steps, self.skipped_images = extra["skipped_steps"], extra["skipped_images"]
        self.loader.load_state_dict(extra["data"])
        self.scaler.load_state_dict(extra["scaler"])
        rngs = extra["rng_all"]
        set_rng_state(rngs[self.rank] if len(rngs) == self.world_size else rngs[0])
        self.log(f"resumed {self.out / 'checkpoint.pt'} at step {self.step} of {self.total}, data position {extra['data']}")

    def save(self):
        rngs = gather_rng_states(self.world_size)
        if self.rank == 0:
            save_checkpoint(self.out / "checkpoint.pt", self.model, self.optimizer, self.schedule, self.step, rng=rngs[0], extra={
                "settings": dataclasses.asdict(self.settings), "fresh": sorted(self.fresh), "data": self.loader.state_dict(),
                "scaler": self.scaler.state_dict(), "history": self.history, "skipped_steps": self.skipped_steps,
                "skipped_images": self.skipped_images, "rng_all": rngs})

    def evaluate(self):
        metrics = {}
        if self.rank == 0 and self.evaluate_task is not None:
            self.model.eval()
            metrics = self.evaluate_task(self.model)
            self.model.train()
            self.log("eval " + "  ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in flat(metrics).items()))
        if self.world_size > 1:
            dist.barrier()
        return metrics

    def train_step(self, module, batch):
        """One optimizer step on the batch; returns why it was skipped, or None. Every rank decides alike."""
        s, ws, device = self.settings, self.world_size, self.device
        why = None
        if not everywhere(len(batch["images"]) >= self.task.min_images, ws, device):
            why = f"only {len(batch['images'])} readable image(s), fewer than the {self.task.min_images} the loss needs"
        else:
            with self.autocast:
                losses = module(tasks.to_device(batch, device))
            loss = losses["loss"].detach()
            if not everywhere(torch.isfinite(loss).item(), ws, device):
                why = f"loss is not finite ({loss.item()})"
            elif not optimizer_step(losses["loss"], self.optimizer, self.scaler, self.model, s.grad_clip):
                why = "the gradient is not finite"
            else:
                for k, v in losses.items():
                    self.sums[k] = self.sums.get(k, 0.0) + v.detach().float()
                self.count += 1
        self.optimizer.zero_grad(set_to_none=True)
        self.schedule.step()  # a skipped step counts: the run keeps its length and learning rates
        self.step += 1
        if why:
            self.skipped_steps += 1
            self.log(f"step {self.step}: {why}, step skipped ({self.skipped_steps} so far)")
        return why

    def log_progress(self):
        """One line of every loss term's mean since the last line (over ranks), lr, speed and eta."""
        means = {k: (v / max(self.count, 1)).item() for k, v in self.sums.items()}
        if self.world_size > 1:
            reduced = torch.tensor(list(means.values()), device=self.device)
            dist.all_reduce(reduced)
            means = dict(zip(means, (reduced / self.world_size).tolist()))
        rate = self.seen / max(time.time() - self.t0, 1e-9)
        eta = (time.time() - self.t_start) / (self.step - self.start_step) * (self.total - self.step)
        if means:
            self.history.append({"step": self.step, **means})
        self.log(f"step {self.step}/{self.total}  " + "  ".join(f"{k} {v:.3f}" for k, v in means.items())
                 + f"  lr {self.schedule.get_last_lr()[0]:.2e}  {rate:.1f} img/s  eta {fmt_time(eta)}"
                 + (f"  skipped images {self.skipped_images}" if self.skipped_images else ""))
        self.sums, self.count, self.seen, self.t0 = {}, 0, 0, time.time()

    def train(self):
        """Steps to the last one: skip what cannot train, log, evaluate and save at their intervals;
        Ctrl-C saves and stops; 20 non-finite steps in a row stop the run."""
        s, out, log = self.settings, self.out, self.log
        # What trains is the model and its loss as one module (DDP syncs what runs inside forward).
        module = TaskLoss(self.model, self.task.loss)
        if s.compile:
            module = torch.compile(module)
        if self.world_size > 1:
            module = DDP(module, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        log(f"{s.task}: {self.total} steps of {s.batch_size} images x {self.world_size} process(es) on {self.device}, "
            f"lr {s.lr:g} ({s.schedule}), {s.precision}, model {s.config} ({xvlm.num_params(self.model) / 1e6:.1f}M parameters)"
            + (f", ablation {s.ablation}" if s.ablation != "none" else ""))
        module.train()
        batches = forever(self.loader)
        self.sums, self.count, self.seen, self.t0, self.t_start, self.start_step = {}, 0, 0, time.time(), time.time(), self.step
        diverged = 0
        with StopRequest(log) as stop:
            try:
                while self.step < self.total:
                    batch = next(batches)
                    for u in batch.pop("skipped"):
                        log(f"skipping unreadable image {u.path}: {u.reason}")
                        self.skipped_images += 1
                    self.seen += len(batch["images"]) * self.world_size
                    why = self.train_step(module, batch)
                    diverged = diverged + 1 if why and "finite" in why else 0
                    if diverged >= 20:
                        raise UsageError(f"the loss or its gradient was not finite for {diverged} steps in a row (to step "
                                         f"{self.step}): the weights have diverged; lower --lr (was {s.lr:g}) or clip (--grad-clip)")
                    if (s.log_every and self.step % s.log_every == 0) or self.step == self.total:
                        self.log_progress()
                    if s.eval_every and self.step % s.eval_every == 0 and self.step < self.total:
                        self.evaluate()
                    if s.save_every and self.step % s.save_every == 0 and self.step < self.total:
                        self.save()
                    if not everywhere(not stop.requested, self.world_size, self.device):
                        self.save()
                        log(f"interrupted at step {self.step}: saved {out / 'checkpoint.pt'}; --resume continues the run")
                        raise KeyboardInterrupt
            except KeyboardInterrupt:
                if not stop.requested:
                    saved = xvlm.read_file(out / "checkpoint.pt")[0]["step"] if (out / "checkpoint.pt").exists() else None
                    log(f"interrupted at step {self.step}: " + (f"the last checkpoint, of step {saved}, is {out / 'checkpoint.pt'}; "
                                                               f"--resume continues from it" if saved else "no checkpoint was saved yet"))
                raise
            except (ValueError, OSError) as e:
                log(f"error at step {self.step}: {e}")
                raise

    def finish(self):
        """The last checkpoint, the final evaluation, metrics.json and the loss plot; returns the metrics."""
        self.save()
        metrics = self.evaluate()
        if self.rank == 0:
            last = self.history[-1] if self.history else {}
            summary = {"task": self.settings.task, "step": self.step, **{k: v for k, v in last.items() if k != "step"},
                       "eval": metrics, "skipped_steps": self.skipped_steps, "skipped_images": self.skipped_images,
                       "minutes": round((time.time() - self.t_start) / 60, 2)}
            write_json(self.out / "metrics.json", summary)
            plot_losses(self.history, self.out / "losses.png", f"X-VLM {self.settings.task} ({self.settings.config})")
            self.log(f"wrote {self.out / 'metrics.json'}, {self.out / 'losses.png'} and {self.out / 'checkpoint.pt'}")
        return metrics


def load_weights(model, settings, task, log):
    """--vit-init, --bert-init and --init into the model; returns the parameter names that get
    lr * lr_mult: those no checkpoint filled (when one was loaded), and the task's new heads."""
    loaded = set()
    if settings.vit_init:
        report = xvlm.load_vit(model, settings.vit_init)
        log(f"--vit-init: {report}")
        loaded |= set(report.loaded)
    if settings.bert_init:
        report = xvlm.load_bert(model, settings.bert_init)
        log(f"--bert-init: {report}")
        loaded |= set(report.loaded)
    names = [n for n, _ in model.named_parameters()]
    if settings.init:
        copied, left = tasks.load_pretrained(model, settings.init)
        log(f"--init: loaded {settings.init}" + (f"; initialised {', '.join(copied)} from it" if copied else ""))
        loaded |= set(names) - set(left)
    fresh = {n for n in names if n not in loaded} if loaded else set()
    return fresh | {n for n in names if n.startswith(task.new_heads)}


def optimizer_step(loss, optimizer, scaler, model, clip):
    """Backward and step; False (nothing updated) when the gradient is not finite. With fp16 the
    GradScaler skips such steps itself and lowers its scale: that is its normal working, not a skip."""
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
    if not scaler.is_enabled() and not torch.isfinite(norm):
        return False
    scaler.step(optimizer)
    scaler.update()
    return True


class TaskLoss(torch.nn.Module):
    """A task model and its loss as one module: TaskLoss(model, task.loss)(batch). DDP syncs
    gradients correctly only for work done inside its forward, and the losses call the model's
    methods, so train.py wraps this in DDP (and saves the unwrapped task model)."""

    def __init__(self, model, loss):
        super().__init__()
        self.model, self.loss = model, loss

    def forward(self, batch):
        return self.loss(self.model, batch)


def forever(loader):
    """The loader's batches epoch after epoch (it keeps its own position for resuming)."""
    while True:
        yield from loader


def cli(argv):
    main(argv)
    return 0


if __name__ == "__main__":
    sys.exit(data.run_cli(cli))
