"""
Train X-VLM: pre-training and every downstream task, in one CPU process or on many GPUs.

    python train.py --task pretrain              # tiny X-VLM on the synthetic world: minutes on a laptop CPU
    python train.py --task retrieval --init runs/pretrain/checkpoint.pt
    torchrun --nproc-per-node 8 train.py --task pretrain --config base \\
        --data coco.json vg.jsonl cc3m.json --image-root /data/images --vocab bert-base-uncased/vocab.txt \\
        --vit-init deit_base_patch16_224-b5f2ef4d.pth --bert-init bert-base-uncased --precision bf16
    python train.py ablation --seeds 0 1 2       # the paper's Table 3 on the synthetic world, cell by cell

With no --data, a task trains on the synthetic world (written to --synth-dir on first use) and
evaluates on its validation split. Every run writes OUT/log.txt, OUT/metrics.json (the last
step's losses, the final evaluation next to its chance level, the settings), OUT/losses.png and
OUT/checkpoint.pt. `--resume` continues a stopped run exactly where it stopped, with the settings
it was started with; a run's directory is never overwritten without `--overwrite`.

main() is a fixed sequence: the flags; the run's Settings (the recipe row of --config and --task,
an ablation's switches, then the flags the user gave, validated once; on --resume the stored run's);
distributed setup; data and every evaluation input (checked before any compute); model and weights;
optimizer and schedule; compile then DDP; the loop; the final evaluation, metrics.json and the loss
plot. What a task is (model, loss, data, evaluation) is its row of tasks.TASKS.
"""

import argparse
import dataclasses
import glob
import json
import math
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw
from torch.nn.parallel import DistributedDataParallel as DDP

import checkpoints
import data
import synth
import tasks
import xvlm
from data import DECODINGS, UsageError
from xvlm import XVLMConfig


# A skipped step (non-finite loss, too few images) still advances the schedule, so that the run's
# length and its learning rates stay those of its settings; torch warns of a step before any update.
warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before `optimizer.step\(\)`")


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
# every shape), and 64px throughout. image_res is the model's (XVLMConfig), the rest Settings'.

PRETRAIN = dict(schedule="cosine", warmup=0.2, lr_ends=0.1, weight_decay=0.02, grad_clip=1.0, lr_mult=2.0)
PRESTEP = dict(schedule="linear", warmup=0.1, lr_ends=0.0, weight_decay=0.01, grad_clip=1.0, lr_mult=2.0)
FINETUNE = dict(schedule="linear", warmup=0.1, lr_ends=0.0, weight_decay=0.01, grad_clip=0.0, lr_mult=2.0,
                image_res=384)
BASE_CROP, BASE_FINETUNE_CROP = (0.2, 1.0), (0.5, 1.0)
TINY = dict(crop_scale=(0.8, 1.0), region_crop_scale=(0.8, 1.0), rerank_k=16, image_res=None)

RECIPES = {
    "base": {
        "pretrain": dict(PRETRAIN, epochs=50, batch_size=96, lr=1e-4, crop_scale=BASE_CROP, rerank_k=128),
        "grounding_pretrain": dict(PRESTEP, epochs=1, batch_size=9, lr=3e-5, crop_scale=BASE_CROP, rerank_k=128),
        "nlvr2_pretrain": dict(PRESTEP, epochs=1, batch_size=128, lr=3e-5, crop_scale=BASE_CROP, rerank_k=128),
        "retrieval": dict(FINETUNE, epochs=10, batch_size=20, lr=3e-5, crop_scale=BASE_FINETUNE_CROP, rerank_k=128),
        "vqa": dict(FINETUNE, epochs=8, batch_size=24, lr=5e-5, crop_scale=BASE_FINETUNE_CROP, rerank_k=128),
        "nlvr2": dict(FINETUNE, epochs=10, batch_size=10, lr=3e-5, crop_scale=BASE_FINETUNE_CROP, rerank_k=128),
        "grounding": dict(FINETUNE, epochs=10, batch_size=20, lr=3e-5, crop_scale=BASE_FINETUNE_CROP, rerank_k=128),
        "grounding_weak": dict(FINETUNE, epochs=5, batch_size=20, lr=2e-5, crop_scale=BASE_FINETUNE_CROP, rerank_k=128),
    },
    "tiny": {
        # lr 1e-3 is tuned with XVLMConfig.tiny()'s output_positions=True (docs/bbox-plateau)
        "pretrain": dict(PRETRAIN, **TINY, steps=1200, batch_size=16, lr=1e-3),
        "grounding_pretrain": dict(PRESTEP, **TINY, steps=400, batch_size=16, lr=5e-4),
        "nlvr2_pretrain": dict(PRESTEP, **TINY, steps=300, batch_size=32, lr=5e-4),
        "retrieval": dict(FINETUNE, **TINY, steps=300, batch_size=32, lr=5e-4),
        "vqa": dict(FINETUNE, **dict(TINY, rerank_k=8), steps=1800, batch_size=32, lr=5e-4),
        "nlvr2": dict(FINETUNE, **TINY, steps=1000, batch_size=32, lr=5e-4),
        "grounding": dict(FINETUNE, **TINY, steps=2000, batch_size=32, lr=5e-4),
        "grounding_weak": dict(FINETUNE, **TINY, steps=600, batch_size=32, lr=5e-4),
    },
}

# Table 3's ablations, as the paper defines them: the settings and model fields they set.
ABLATIONS = {
    "none": {},
    "no_object": dict(objects=False),  # w/o object: no object texts
    "no_region": dict(regions=False),  # w/o region: no region texts
    "no_bbox_loss": dict(use_bbox_loss=False),  # w/o bbox loss
    "no_mixed_attn": dict(mixed_attn=False),  # w/o mixed attn: concepts by local attention in every layer
    "no_all": dict(objects=False, regions=False, use_bbox_loss=False, mixed_attn=False),  # image-text pairs only
}


# -----------------------------------------------------------------------------
# Settings: what a run computes, resolved once into one frozen, validated object


def flag(default, help, **kwargs):
    return field(default=default, metadata=dict(help=help, **kwargs))


RECIPE = "(default: RECIPES[--config][--task])"


@dataclass(frozen=True)
class Settings:
    """A run's settings, one field a flag (the model's fields are flags too, collected in `model`).
    Built by resolve() from the recipe row, the ablation and the flags; checks itself."""
    task: str = flag("pretrain", "what to train (default: pretrain)", choices=list(tasks.TASKS))
    config: str = flag("tiny", "model preset and recipe: 'base' is the paper's X-VLM-base, 'tiny' (the default) "
                       "a CPU-sized one", choices=["tiny", "base"])
    data: tuple = flag(None, "training files (JSON list or JSON lines); pretrain also reads tar shards in img2dataset's "
                       "layout, 'cc3m/{00000..00331}.tar' (default: the synthetic world's split for --task)", nargs="+")
    eval_data: tuple = flag(None, "evaluation files (pretrain: retrieval val/test records) (default: the synthetic "
                            "world's validation split; with --data, none: no evaluation)", nargs="+")
    image_root: str = flag(None, "directory the records' image paths are relative to (default: the synthetic world's)")
    vocab: str = flag(None, "BERT vocab.txt (default: the synthetic world's)")
    answer_list: str = flag(None, "vqa: the candidate answers, a JSON list (default: the synthetic world's)")
    proposals: str = flag(None, "grounding_weak (and pretrain's zero-shot grounding): proposal boxes per image, "
                          "{image: [[x, y, w, h], ...]} (default: the synthetic world's)")
    grounding_data: tuple = flag(None, "pretrain: grounding records for the zero-shot grounding evaluation "
                                 "(default: the synthetic world's validation split)", nargs="+")
    synth_dir: str = flag("synth", "where the synthetic world lives; written on first use (default: synth)")
    steps: int = flag(None, f"optimizer steps {RECIPE}; with --epochs, epochs of the training data")
    epochs: float = flag(None, f"epochs of the training data, instead of --steps {RECIPE}")
    batch_size: int = flag(None, f"images per process and step {RECIPE}")
    lr: float = flag(None, f"peak learning rate {RECIPE}")
    lr_mult: float = flag(None, "learning rate factor of parameters no checkpoint filled and of new heads "
                          f"(the authors' lr_mult) {RECIPE}")
    schedule: str = flag(None, "'cosine': warm up from lr * lr_ends, cosine back down (the paper's pre-training); "
                         f"'linear': warm up from 0, linear to 0 (the authors' fine-tuning) {RECIPE}",
                         choices=["cosine", "linear"])
    warmup: float = flag(None, f"fraction of the steps spent warming up {RECIPE}")
    lr_ends: float = flag(None, "cosine: start and end learning rate as a fraction of the peak (paper: 1e-5 / 1e-4) "
                          f"{RECIPE}")
    weight_decay: float = flag(None, f"AdamW weight decay, not on biases, norms and other 1-d parameters {RECIPE}")
    grad_clip: float = flag(None, f"clip the gradient norm to this value, 0: off {RECIPE}")
    crop_scale: tuple = flag(None, f"random resized crop's area range LO HI {RECIPE}", nargs=2, type=float)
    region_crop_scale: tuple = flag(None, "pre-training data's box-annotated images: a window of LO HI of the area "
                                    "widened to hold the chosen box (tiny: 0.8 1; base: none, the authors' window from "
                                    "the box to random edges)", nargs=2, type=float)
    rerank_k: int = flag(None, "re-rank the top k by ITM in retrieval, by full likelihood in VQA (paper: 256 COCO, 128 "
                         f"Flickr) {RECIPE}")
    precision: str = flag("fp32", "autocast precision; fp16 (with a GradScaler) needs CUDA (default: fp32)",
                          choices=["fp32", "bf16", "fp16"])
    vit_init: str = flag(None, "DeiT/timm ViT weights (file or directory) for the image encoder")
    bert_init: str = flag(None, "Hugging Face BERT weights (file or directory) for the text and cross-modal encoders")
    init: str = flag(None, "a checkpoint to start from: one of ours (e.g. a pre-trained one for a downstream task) "
                     "or one of the authors' released files (README: Reproduce the paper's numbers); its "
                     "architecture and conventions come along, flags override them")
    eval_only: bool = flag(False, "evaluate --init on --eval-data without a step of training; writes OUT/metrics.json "
                           "(and for VQA without answers OUT/vqa_result.json)")
    gradcam_layer: int = flag(2, "grounding_weak: the cross-modal layer (from 0) whose cross-attention Grad-CAM "
                              "reads (default: a released file's block_num, else 2, the paper's 3rd; the last of "
                              "smaller models)")
    decode: str = flag("ours", "how image files are read: 'ours' (every mode to 8-bit RGB, transparent pixels on "
                       "white) or 'pil' (PIL's convert('RGB'), as the authors' datasets) (default: pil for a "
                       "released file, else ours)", choices=list(DECODINGS))
    out: str = flag(None, "output directory (default: runs/TASK)")
    resume: bool = flag(False, "continue the run in OUT from its checkpoint, with the settings it was started with")
    overwrite: bool = flag(False, "start over in OUT, deleting the run there")
    ablation: str = flag("none", "one of the paper's Table 3 ablations, for the tasks that train on pre-training data: "
                         "pretrain, grounding_pretrain (default: none)", choices=list(ABLATIONS))
    objects: bool = flag(True, "pretrain, grounding_pretrain: use object texts (--no-objects: Table 3's w/o object)")
    regions: bool = flag(True, "pretrain, grounding_pretrain: use region texts (--no-regions: Table 3's w/o region)")
    mixed_attn: bool = flag(True, "pretrain, grounding_pretrain: mixed attention in the last local_layers ViT layers "
                            "(--no-mixed-attn: Table 3's w/o mixed attn, concepts by local attention in every layer)")
    seed: int = flag(0, "seed of the model's init, the data order and every random draw (default: 0)")
    log_every: int = flag(25, "steps between progress lines (default: 25)")
    eval_every: int = flag(0, "steps between evaluations, 0: only at the end (default: 0)")
    save_every: int = flag(250, "steps between checkpoints; one is always written at the end (default: 250)")
    workers: int = flag(1, "data-loading processes per training process (default: 1)")
    compile: bool = flag(False, "torch.compile the model")
    shuffle_buffer: int = flag(1000, "pretrain from tar shards: samples each reader's shuffle buffer holds (default: 1000)")
    max_regions: int = flag(5, "pretrain: most texts per box-annotated image, its caption included, as the authors' "
                            "(default: 5)")
    device: str = flag(None, "cpu, cuda or cuda:N (default: cuda when available; under torchrun cuda:LOCAL_RANK)")
    model: dict = field(default_factory=dict)  # XVLMConfig fields set by the flags, the recipe or the ablation

    def __post_init__(self):
        for f in fields(self):  # lists from the command line or a stored run: tuples, as a frozen object holds them
            if isinstance(getattr(self, f.name), list):
                object.__setattr__(self, f.name, tuple(getattr(self, f.name)))
        finite = lambda v: v is None or (isinstance(v, (int, float)) and math.isfinite(v))
        positive = lambda v: finite(v) and v is not None and v > 0
        problems = [
            (self.steps is not None and self.epochs is not None, "give --steps or --epochs, not both"),
            (self.steps is None and self.epochs is None and not self.eval_only, "give --steps or --epochs"),
            (self.eval_only and not self.init, "--eval-only evaluates a checkpoint: give --init FILE"),
            (self.eval_only and self.resume, "--eval-only starts no training run to --resume"),
            (self.eval_only and not self.eval_data, "--eval-only needs --eval-data (the files to evaluate)"),
            (self.steps is not None and self.steps < 1, f"--steps must be >= 1, got {self.steps}"),
            (self.epochs is not None and not positive(self.epochs),
             f"--epochs must be a number > 0, got {self.epochs}"),
            (self.batch_size is None or self.batch_size < 2, f"--batch-size must be >= 2, got {self.batch_size}"),
            (not positive(self.lr), f"--lr must be a number > 0, got {self.lr}"),
            (not positive(self.lr_mult), f"--lr-mult must be a number > 0, got {self.lr_mult}"),
            (not finite(self.weight_decay) or not self.weight_decay >= 0,
             f"--weight-decay must be a number >= 0, got {self.weight_decay}"),
            (not finite(self.grad_clip) or not self.grad_clip >= 0,
             f"--grad-clip must be a number >= 0, got {self.grad_clip}"),
            (not (finite(self.warmup) and 0 <= self.warmup < 1), f"--warmup must lie in [0, 1), got {self.warmup}"),
            (not (finite(self.lr_ends) and 0 <= self.lr_ends <= 1),
             f"--lr-ends must lie in [0, 1], got {self.lr_ends}"),
            (min(self.log_every, self.save_every, self.eval_every, self.workers) < 0,
             "--log-every, --save-every, --eval-every and --workers must be >= 0"),
            (self.max_regions < 1, f"--max-regions must be >= 1, got {self.max_regions}"),
            (self.data is not None and self.image_root is None and not all(map(data.is_tar_pattern, self.data)),
             "--data with JSON files needs --image-root"),
            (self.shuffle_buffer < 1, f"--shuffle-buffer must be >= 1, got {self.shuffle_buffer}"),
            (self.eval_data is not None and self.image_root is None, "--eval-data needs --image-root"),
            (self.vocab is None, "--data needs --vocab" if self.data is not None else
             "no vocabulary: give --vocab (the authors' released files name none: bert-base-uncased's vocab.txt)"),
            (not (self.crop_scale and 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1),
             f"--crop-scale needs 0 < LO <= HI <= 1, got {self.crop_scale}"),
            (self.rerank_k is None or self.rerank_k < 1, f"--rerank-k must be >= 1, got {self.rerank_k}"),
            (self.region_crop_scale is not None and not 0 < self.region_crop_scale[0] <= self.region_crop_scale[1] <= 1,
             f"--region-crop-scale needs 0 < LO <= HI <= 1, got {self.region_crop_scale}"),
            (not self.mixed_attn and "local_layers" in self.model,
             f"--no-mixed-attn (which --ablation no_mixed_attn and no_all set) makes every ViT layer local, and "
             f"--local-layers {self.model.get('local_layers')} says how many are: drop one of the two"),
            (self.resume and self.overwrite, "give --resume or --overwrite, not both"),
        ]
        for bad, message in problems:
            if bad:
                raise UsageError(message)

    def total_steps(self, batches_per_epoch):
        return 0 if self.eval_only else self.steps or max(1, round(self.epochs * batches_per_epoch))


SETTINGS = [f.name for f in fields(Settings) if f.name != "model"]
MODEL_FIELDS = [f.name for f in fields(XVLMConfig)]
# Flags that may differ on --resume: they change how a run is watched, not what it computes.
RESUME_FREE = {"resume", "out", "overwrite", "log_every", "eval_every", "save_every", "workers", "device", "compile"}


class FlagParser(argparse.ArgumentParser):
    """A mistake on the command line ends in one line naming it, as every other mistake does."""

    def error(self, message):
        raise UsageError(f"{message} (python train.py --help lists the flags)")


def build_parser():
    """Every Settings field and every XVLMConfig field as a flag, defaulting to absent: the parsed
    namespace holds exactly the flags the command line gave."""
    p = FlagParser(description="Pre-train X-VLM or fine-tune it on a downstream task; "
                   "`python train.py ablation --help`: Table 3.", argument_default=argparse.SUPPRESS)
    for f in fields(Settings):
        if f.name != "model":
            meta = dict(f.metadata)
            add_flag(p, f.name, meta.pop("type", f.type), **meta)
    p.add_argument("--debug", action="store_true", help="show the traceback of an error (or set XVLM_DEBUG=1)")
    model = p.add_argument_group("model", "override any field of the --config preset (XVLMConfig)")
    tiny, base = XVLMConfig.tiny(), XVLMConfig()
    for f in fields(XVLMConfig):
        if f.default is None:
            continue  # swin: a released file's group, read from its shapes, not set by flags
        several = dict(nargs="+", type=type(f.default[0])) if isinstance(f.default, tuple) else {}
        presets = f"tiny: {getattr(tiny, f.name)!r}, base: {getattr(base, f.name)!r}"
        add_flag(model, f.name, type(f.default), help=f"XVLMConfig.{f.name} ({presets})", **several)
    return p


def add_flag(parser, name, kind, help, **kwargs):
    option = "--" + name.replace("_", "-")
    if kind is bool:
        parser.add_argument(option, action=argparse.BooleanOptionalAction, help=help)
    else:
        parser.add_argument(option, **{"type": str if kind in (list, tuple) else kind, **kwargs}, help=help)


def parse_args(argv=None):
    """The flags the command line gave, {field: value} (Settings' and XVLMConfig's)."""
    given = vars(build_parser().parse_args(argv))
    given.pop("debug", None)
    return given


def resolve(given, carried=None):
    """The run's Settings: the recipe row of (--config, --task), the --ablation's switches, what the --init
    checkpoint carries (`carried`, checkpoints.carried_settings: its evaluation settings, its preset), then
    the flags the user gave; with no --data, the synthetic world's files for the task's row. With
    --eval-only the recipe sets no model field: the model is the checkpoint's."""
    default = {f: Settings.__dataclass_fields__[f].default for f in SETTINGS}
    carried = carried or {}
    task, preset, ablation = (given.get(k, carried.get(k, default[k])) for k in ("task", "config", "ablation"))
    if ablation not in tasks.TASKS[task].ablations:
        applies = ", ".join(f"{t} ({', '.join(r.ablations)})" for t, r in tasks.TASKS.items() if len(r.ablations) > 1)
        raise UsageError(f"--ablation {ablation} does not apply to --task {task}; it applies to the tasks that "
                         f"train on pre-training data: {applies}")
    switches = ABLATIONS[ablation]
    clash = [k for k, v in switches.items() if k in given and given[k] != v]
    if clash:
        raise UsageError(f"--ablation {ablation} sets --{clash[0].replace('_', '-')} {switches[clash[0]]}; "
                         "drop one of the two")
    recipe = dict(RECIPES[preset][task])
    if "steps" in given or "epochs" in given or given.get("eval_only"):  # the user's length replaces the recipe's
        recipe.update(steps=None, epochs=None)
    if given.get("eval_only"):
        recipe = {k: v for k, v in recipe.items() if k not in MODEL_FIELDS}
    chosen = {**default, **recipe, **switches, **carried, **given}
    model = {k: v for k, v in chosen.items() if k in MODEL_FIELDS and v is not None}
    settings = {k: v for k, v in chosen.items() if k in SETTINGS}
    settings["out"] = settings["out"] or f"runs/{task}"
    return Settings(**data_paths(settings, tasks.TASKS[task].synth), model=model)


def data_paths(settings, files):
    """The settings with every data path filled: the user's files, else the synthetic world's."""
    if settings["data"] is not None or (settings["eval_only"] and settings["eval_data"] is not None):
        return {**settings, "synth_dir": None}  # the user's data: no synthetic world to write
    root = Path(settings["synth_dir"])
    path = lambda key: str(root / synth.SYNTH_FILES[key])
    return {**settings, "data": [path(k) for k in files["train"]], "image_root": path("images"),
            "vocab": settings["vocab"] or path("vocab"),
            "eval_data": settings["eval_data"] or [path(k) for k in files["val"]],
            "answer_list": settings["answer_list"] or (path(files["answer_list"]) if "answer_list" in files else None),
            "proposals": settings["proposals"] or (path(files["proposals"]) if "proposals" in files else None),
            "grounding_data": settings["grounding_data"] or [path(k) for k in files.get("grounding_data", [])] or None}


def check_released(init, settings, task, log):
    """A released --init file: refused at once when the task's model does not read its kind (a VQA file for
    retrieval); else one line says which of its YAML keys the run read and names the others, ignored once."""
    state = checkpoints.state_dict_of(init, settings.init)
    kind = tasks.released_file_kind(task.model, state, f"--init {settings.init}", f"--task {settings.task}")
    config = init.get("config") if isinstance(init.get("config"), dict) else {}
    read = [k for k in checkpoints.RELEASED_CONFIG_KEYS if k in config]
    ignored = sorted(k for k in config if k not in checkpoints.RELEASED_CONFIG_KEYS)
    log(f"--init {settings.init}: the authors' {kind} file; architecture from its tensors' shapes; from its config "
        + (", ".join(f"{k} {config[k]!r}" for k in read) or "nothing") + ("; ignored (their run's own settings): "
        + checkpoints.listed(ignored) if ignored else ""))


def stored_model_config(init, source):
    """XVLMConfig fields of an --init checkpoint: ours as stored, the authors' from their tensors' shapes."""
    if checkpoints.is_released(init):
        state = checkpoints.state_dict_of(init, source)
        kind = checkpoints.released_kind(state, source)
        config = init.get("config") if isinstance(init.get("config"), dict) else {}
        return checkpoints.released_config(state, config, kind, source)
    return checkpoints.stored_config(init)


def resumed(previous, given):
    """The stored run's Settings, with the flags that only change how it is watched; a flag that would
    change what it computes is refused, by name."""
    stored, new = Settings(**previous["extra"]["settings"]), resolve(given)
    changed = [f"--{k.replace('_', '-')} {given[k]!r} (the run: {getattr(stored, k)!r})" for k in sorted(given)
               if k in SETTINGS and k not in RESUME_FREE and getattr(new, k) != getattr(stored, k)]
    changed += [f"--{k.replace('_', '-')} {v!r} (the run: {previous['config'].get(k)!r})"
                for k, v in sorted(given.items()) if k in MODEL_FIELDS and previous["config"].get(k) != v]
    if changed:
        raise UsageError(f"--resume continues the run with its own settings, and these flags differ: "
                         f"{', '.join(changed)}; drop them to continue it, or start a new run with --out DIR")
    return dataclasses.replace(stored, overwrite=False, **{k: v for k, v in given.items() if k in RESUME_FREE})


def task_settings(settings):
    """The part of the Settings a task's row reads (tasks.TaskSettings), field by field: a field the
    Settings lack fails here, at the start of every run."""
    return tasks.TaskSettings(**{f.name: getattr(settings, f.name) for f in fields(tasks.TaskSettings)})


def model_config(settings, tokenizer, init=None):
    """The preset (or, with --init, the config of that checkpoint, `init` as checkpoints.read_file read it:
    fine-tuning keeps the pre-trained architecture; a released file's from its shapes), the vocabulary's size
    and special ids, then settings.model, and with --no-mixed-attn local attention in every layer (Table 3's
    w/o mixed attn). A Swin at another resolution than the checkpoint's gets windows of the same count, as
    the authors' 384 px config has window 12 where their 224 px one has 7."""
    cfg = (XVLMConfig() if settings.config == "base" else XVLMConfig.tiny()).to_dict()
    stored = stored_model_config(init, settings.init) if init is not None else None
    vocab = dict(vocab_size=tokenizer.vocab_size, pad_token_id=tokenizer.pad_id, cls_token_id=tokenizer.cls_id,
                 sep_token_id=tokenizer.sep_id, mask_token_id=tokenizer.mask_id)
    if settings.model.get("vocab_size", tokenizer.vocab_size) < tokenizer.vocab_size:
        raise UsageError(f"--vocab-size {settings.model['vocab_size']} is smaller than the vocabulary "
                         f"({tokenizer.vocab_size} tokens in {tokenizer.vocab_file})")
    if init is not None and checkpoints.is_released(init) and stored["vocab_size"] != tokenizer.vocab_size:
        raise UsageError(f"--vocab {tokenizer.vocab_file} has {tokenizer.vocab_size} tokens, and {settings.init} "
                         f"embeds {stored['vocab_size']}: give the vocabulary it was trained with "
                         "(bert-base-uncased's vocab.txt)")
    merged = {**cfg, **(stored or {}), **vocab, **settings.model}
    res, patch = merged["image_res"], merged["patch_size"]
    if not (isinstance(res, int) and res >= patch and res % patch == 0):
        raise UsageError(f"--image-res {res} must be a positive multiple of the patch size {patch}")
    if stored and stored.get("swin") and merged["image_res"] != stored["image_res"] and "swin" not in settings.model:
        merged["swin"] = {**stored["swin"], "window": merged["image_res"] // merged["patch_size"]}
    if not settings.mixed_attn:  # Table 3's w/o mixed attn: local attention in every ViT layer
        merged["local_layers"] = merged["vision_layers"]
    return xvlm.config_from(merged, settings.init or "the preset and flags")


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
    temperature and other 1-d vectors, nor on the Swin's relative-position bias tables (the authors'
    no_decay names match "bias" in theirs); parameters named in `fresh` at lr * lr_mult."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decays = lambda n, p: p.dim() >= 2 and not n.endswith("bias_table")
    groups = [{"params": [p for n, p in named if decays(n, p) == decay and (n in fresh) == new],
               "weight_decay": weight_decay if decay else 0.0, "lr": lr * (lr_mult if new else 1.0)}
              for new in (False, True) for decay in (True, False)]
    return [g for g in groups if g["params"]]


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


# -----------------------------------------------------------------------------
# Files: checkpoints, JSON and plots, each written atomically; checkpoints resume step-exactly


def write_atomically(path, write):
    """write(f) into a temporary file beside `path`, then rename it over `path`: readers see the old
    file or the new one, never half of one (a killed process leaves the temporary file behind, which
    remove_partial_saves deletes at the next start)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_json(path, value):
    write_atomically(path, lambda f: f.write((json.dumps(value, indent=1) + "\n").encode()))


def remove_partial_saves(out):
    """Temporary files of writes that a killed process left behind; returns their names."""
    stale = glob.glob(str(Path(out) / ".*.tmp"))
    for path in stale:
        os.unlink(path)
    return stale


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
    """Write {"model", "optimizer", "scheduler", "step", "config", "rng", "extra"} to `path`, atomically:
    plain data (it loads with torch.load(weights_only=True)), `model` the unwrapped module with a `cfg`.

    To resume: rebuild the model, build the optimizer and the scheduler as at the start, then load
    their states and set_rng_state(checkpoint["rng"]). Footgun: a scheduler built after the
    optimizer's state is loaded resets the learning rate to its step-0 value. Bit-exact resumption
    also needs torch.use_deterministic_algorithms(True): index backward may accumulate in any order."""
    checkpoint = {"model": model.state_dict(),
                  "optimizer": None if optimizer is None else optimizer.state_dict(),
                  "scheduler": None if scheduler is None else scheduler.state_dict(),
                  "step": step, "config": model.cfg.to_dict(), "rng": rng or rng_state(), "extra": extra or {}}
    write_atomically(path, lambda f: torch.save(checkpoint, f))


RUN_FILES = ("checkpoint.pt", "metrics.json", "losses.png", "vqa_result.json")  # what a run writes to OUT, with log.txt


def claim_out(settings):
    """Make OUT ready for this run and return the checkpoint to resume from (or None). A directory
    holding a run is refused unless --resume (continue it) or --overwrite (delete it, but only once
    everything this run needs has been checked: discard_previous) says what to do."""
    out = Path(settings.out)
    checkpoint, metrics = out / "checkpoint.pt", out / "metrics.json"
    # a log alone (a start that failed) is appended to; with --overwrite the run there is deleted later
    held = [p.name for p in (checkpoint, metrics) if p.exists()] if not settings.overwrite else []
    if settings.resume:
        if not checkpoint.exists():
            raise UsageError(f"--resume: {checkpoint} does not exist" + (f" ({out} holds {', '.join(held)})" if held else ""))
        return checkpoints.read_file(checkpoint)[0]
    if held:
        what = "a finished run" if metrics.exists() else "a run"
        raise UsageError(f"{out} holds {what} ({', '.join(held)}): --resume continues it, --overwrite deletes it, "
                         f"--out DIR writes elsewhere")
    out.mkdir(parents=True, exist_ok=True)
    return None


# -----------------------------------------------------------------------------
# Logging and plots (drawn with PIL: no plotting library)


class Log:
    """Prints on rank 0 and appends to OUT/log.txt; other ranks stay quiet."""

    def __init__(self, path, rank):
        self.path, self.lines = Path(path), []
        self.file = open(path, "a", encoding="utf-8") if rank == 0 else None

    def __call__(self, message):
        if self.file is not None:
            print(message, flush=True)
            self.lines.append(message)
            self.file.write(message + "\n")
            self.file.flush()

    def restart(self):
        """log.txt holding this run's lines alone (--overwrite, once the old run is deleted)."""
        if self.file is not None:
            self.file.close()
            write_atomically(self.path, lambda f: f.write("".join(m + "\n" for m in self.lines).encode("utf-8")))
            self.file = open(self.path, "a", encoding="utf-8")

    def close(self):
        if self.file is not None:
            self.file.close()


def axes(draw, box, x_range, y_range, title):
    """A framed panel at box (x0, y0, x1, y1) with its title and both ranges' ends written beside it;
    returns the map from data (x, y) to pixels."""
    (x0, y0, x1, y1), (xlo, xhi), (ylo, yhi) = box, x_range, y_range
    xhi, yhi = max(xhi, xlo + 1e-6), max(yhi, ylo + 1e-6)
    draw.rectangle(box, outline="gray")
    draw.text((x0, y0 - 16), title, fill="black")
    draw.text((x0 - 38, y0), f"{yhi:.4g}", fill="gray")
    draw.text((x0 - 38, y1 - 10), f"{ylo:.4g}", fill="gray")
    return lambda x, y: (x0 + (x - xlo) / (xhi - xlo) * (x1 - x0), y1 - (y - ylo) / (yhi - ylo) * (y1 - y0))


def save_png(img, path):
    write_atomically(path, lambda f: img.save(f, format="PNG"))


def plot_losses(history, path, title):
    """One small panel per loss term: step on x, the term on y (its own scale)."""
    names = [k for k in history[0] if k != "step"] if history else []
    cols, w, h = 3, 300, 200
    img = Image.new("RGB", (cols * w, max(1, math.ceil(len(names) / cols)) * h + 30), "white")
    draw = ImageDraw.Draw(img)
    draw.text((10, 8), title, fill="black")
    steps = [r["step"] for r in history]
    for n, name in enumerate(names):
        values = [r[name] for r in history]
        x0, y0 = (n % cols) * w + 40, (n // cols) * h + 50
        at = axes(draw, (x0, y0, x0 + w - 55, y0 + h - 60), (steps[0], steps[-1]), (min(values), max(values)),
                  f"{name}  (last {values[-1]:.3f}; steps {steps[0]}-{steps[-1]})")
        points = [at(s, v) for s, v in zip(steps, values)]
        if len(points) > 1:
            draw.line(points, fill=(31, 119, 180), width=2)
        else:
            draw.ellipse([points[0][0] - 2, points[0][1] - 2, points[0][0] + 2, points[0][1] + 2], fill=(31, 119, 180))
    save_png(img, path)


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


class Place(NamedTuple):
    """Where this process runs: rank of world_size processes, on device."""
    rank: int
    world_size: int
    device: torch.device

    def shard(self, settings):
        return data.Shard(self.rank, self.world_size, settings.workers, settings.seed)


def setup_distributed(device_name=None):
    """The Place from torchrun's environment; NCCL on CUDA, gloo on CPU."""
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
    return Place(rank, world_size, device)


def everywhere(ok, place):
    """Whether `ok` holds on every rank: all ranks must skip a step together, or DDP hangs."""
    if place.world_size == 1:
        return bool(ok)
    flag = torch.tensor(float(ok), device=place.device)
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
    """Train one task (the steps of the module docstring); returns the final evaluation's metrics."""
    settings, init, previous, place, log = start(argv)
    task = tasks.TASKS[settings.task]
    if init is not None and checkpoints.is_released(init):
        check_released(init, settings, task, log)

    # 2. Data, and every input the evaluation will need, checked before any compute.
    tokenizer = prepare_data(settings, place, log)
    cfg = (xvlm.config_from(checkpoints.stored_config(previous), settings.out) if previous is not None
           else model_config(settings, tokenizer, init))
    tokenizer = tokenizer.with_sep(cfg.text_sep)  # texts end as the model reads them
    if settings.batch_size < task.min_images:
        raise UsageError(f"--task {settings.task} needs --batch-size >= {task.min_images}, got {settings.batch_size}")
    view = task_settings(settings)  # what the task's row reads of the settings
    if settings.eval_only:
        return evaluate_only(settings, task, cfg, task.evaluation(view, tokenizer, cfg, log), init, place, log)
    loader = task.train_loader(view, tokenizer, cfg, place.shard(settings))
    evaluate = task.evaluation(view, tokenizer, cfg, log)
    if evaluate is None:
        log("no evaluation data (--eval-data): training only, no evaluation at the end")

    # 3. Model, weights, and what the task's loss never reaches frozen (DDP waits for no gradient).
    model, fresh = build_model(task, cfg, settings, init, previous, log)

    # 4. Optimizer, schedule, and where the run stands; then train, evaluate, write the results.
    run = Run(settings, task, model.to(place.device), fresh, loader, evaluate, place, log)
    discard_previous(settings, place, log)
    if previous is not None:
        run.restore(previous)
        if run.step >= run.total and (run.out / "metrics.json").exists():
            log(f"the run finished at step {run.step}; its metrics are in {run.out / 'metrics.json'}")
            return json.loads((run.out / "metrics.json").read_text()).get("eval", {})
        if run.step >= run.total:  # killed between its last checkpoint and metrics.json: finish it now
            log(f"the run reached its last step {run.step} but wrote no metrics.json: evaluating it now")
            metrics = run.finish()
            log.close()
            return metrics
    else:
        torch.manual_seed(settings.seed + place.rank)  # ranks draw different negatives and dropout
    run.train()
    metrics = run.finish()
    log.close()
    if place.world_size > 1:
        dist.destroy_process_group()
    return metrics


def evaluate_only(settings, task, cfg, evaluate, init, place, log):
    """--eval-only: the --init checkpoint (ours, or one of the authors' released files) evaluated on
    --eval-data, no step of training; writes OUT/metrics.json (a run with no checkpoint of its own)."""
    began = time.time()
    model, _ = build_model(task, cfg, settings, init, None, log)
    discard_previous(settings, place, log)
    if place.rank == 0:
        log(f"{settings.task}: evaluating {settings.init} on {', '.join(settings.eval_data)} ({place.device})")
        metrics = Run.evaluate_model(model.to(place.device), evaluate, log)
        summary = {"task": settings.task, "eval_only": True, "init": settings.init, "eval": metrics,
                   "minutes": round((time.time() - began) / 60, 2), "settings": dataclasses.asdict(settings),
                   "config": model.cfg.to_dict()}
        write_json(Path(settings.out) / "metrics.json", summary)
        log(f"wrote {Path(settings.out) / 'metrics.json'}")
    log.close()
    if place.world_size > 1:
        dist.barrier()
        dist.destroy_process_group()
    return metrics if place.rank == 0 else {}


def discard_previous(settings, place, log):
    """--overwrite: delete the run in OUT, now that the data, the evaluation inputs, the model and its weights
    have all been checked (a mistake in any of them leaves the old run as it was)."""
    if settings.overwrite and place.rank == 0:
        gone = [p for p in (Path(settings.out) / name for name in RUN_FILES) if p.exists()]
        for path in gone:
            path.unlink()
        log.restart()
        if gone:
            log(f"--overwrite: deleted {', '.join(p.name for p in gone)} of the run that was in {settings.out}")


def start(argv):
    """1. The flags, the Place, the --init checkpoint (read once), the run's Settings (on --resume the stored
    run's) and the directory it writes to (refused if it holds another run), the log. Returns (settings, the
    --init checkpoint or None, checkpoint to resume or None, place, log)."""
    given = parse_args(argv)
    place = setup_distributed(given.get("device"))
    init = checkpoints.read_file(given["init"])[0] if given.get("init") and not given.get("resume") else None  # once
    settings = resolve(given, checkpoints.carried_settings(init, given.get("task", "pretrain"), given.get("init")))
    previous = claim_out(settings) if place.rank == 0 else None
    if place.world_size > 1:
        dist.barrier()
        if place.rank != 0 and settings.resume:
            previous = checkpoints.read_file(Path(settings.out) / "checkpoint.pt")[0]
    if previous is not None:
        settings = resumed(previous, given)
    if settings.precision == "fp16" and place.device.type != "cuda":
        raise UsageError("--precision fp16 needs CUDA (use bf16 on CPU)")
    log = Log(Path(settings.out) / "log.txt", place.rank)
    log("$ train.py " + " ".join(sys.argv[1:] if argv is None else argv))
    for path in (remove_partial_saves(settings.out) if place.rank == 0 else []):
        log(f"removed {path}: a write that a killed run left half done")
    return settings, init if previous is None else None, previous, place, log


def prepare_data(settings, place, log):
    """The synthetic world written if the run reads it and it is not there yet; the tokenizer."""
    if settings.synth_dir is not None and place.rank == 0 and not synth.synth_ready(settings.synth_dir):
        log(f"writing the synthetic world to {settings.synth_dir}/ (once)")
        synth.synthesize(settings.synth_dir, seed=0)
    if place.world_size > 1:
        dist.barrier()
    return data.Tokenizer(settings.vocab)


def build_model(task, cfg, settings, init, previous, log):
    """The task's model: the same random init on every rank (DDP broadcasts rank 0's anyway), then
    --vit-init, --bert-init and --init (a resumed run's weights come later, with its optimizer).
    Returns (model, the parameter names that train at lr * lr_mult)."""
    torch.manual_seed(settings.seed)
    model = task.model(cfg)
    counts = model.param_counts()
    log(f"XVLM: {counts['vision'] / 1e6:.1f}M vision, {counts['text+fusion'] / 1e6:.1f}M text+fusion, "
        f"{counts['total'] / 1e6:.1f}M parameters in all")
    fresh = load_weights(model, settings, task, init, log) if previous is None else set(previous["extra"]["fresh"])
    frozen = task.frozen + (() if cfg.use_bbox_loss else task.frozen_without_bbox_loss)
    for name, p in model.named_parameters():
        p.requires_grad_(not name.startswith(frozen))
    return model, fresh


def load_weights(model, settings, task, init, log):
    """--vit-init, --bert-init and --init (`init`, read once) into the model; returns the parameter
    names that get lr * lr_mult: those no checkpoint filled (when one was loaded), and the task's new heads."""
    loaded = set()
    for name, load, source in (("--vit-init", xvlm.load_vit, settings.vit_init), ("--bert-init", xvlm.load_bert, settings.bert_init)):
        if source:
            report = load(model, source)
            log(f"{name}: {report}")
            loaded |= set(report.loaded)
    names = [n for n, _ in model.named_parameters()]
    if init is not None:
        copied, left = tasks.load_pretrained(model, init, name=settings.init)
        log(f"--init: loaded {settings.init}" + (f"; initialised {', '.join(copied)} from it" if copied else ""))
        loaded |= set(names) - set(left)
    fresh = {n for n in names if n not in loaded} if loaded else set()
    return fresh | {n for n in names if n.startswith(task.new_heads)}


class TaskLoss(torch.nn.Module):
    """A task model and its loss as one module: TaskLoss(model, task.loss)(batch). DDP syncs
    gradients correctly only for work done inside its forward, and the losses call the model's
    methods, so train.py wraps this in DDP (and saves the unwrapped task model)."""

    def __init__(self, model, loss):
        super().__init__()
        self.model, self.loss = model, loss

    def forward(self, batch):
        return self.loss(self.model, batch)


class Run:
    """A training run's state: the model, AdamW (the authors' betas) with the recipe's schedule, the
    data position, the logged history and the skip counters; train() runs it to its last step."""

    def __init__(self, settings, task, model, fresh, loader, evaluate, place, log):
        self.settings, self.task, self.model, self.fresh, self.loader = settings, task, model, fresh, loader
        self.evaluate_task, self.place, self.log, self.out = evaluate, place, log, Path(settings.out)
        s = settings
        self.optimizer = torch.optim.AdamW(param_groups(model, s.weight_decay, s.lr, fresh, s.lr_mult),
                                           lr=s.lr, betas=(0.9, 0.98), eps=1e-8)
        self.total = s.total_steps(len(loader))
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(step, self.total, s.schedule, s.warmup, s.lr_ends))
        self.scaler = torch.amp.GradScaler("cuda", enabled=s.precision == "fp16")
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(s.precision)
        self.autocast = torch.autocast(place.device.type, dtype=dtype) if dtype else nullcontext()
        self.step, self.history, self.skipped_steps, self.skipped_images, self.saved = 0, [], 0, 0, None
        # Since the last progress line: the loss terms' sums, the steps summed, the images seen, its time;
        # since train() began: its time and step (restore() moves the step, train() starts the clocks).
        self.sums, self.count, self.seen, self.t0, self.t_start, self.start_step = {}, 0, 0, time.time(), time.time(), 0

    def restore(self, previous):
        """Continue a checkpoint: weights, optimizer, schedule, scaler, data position, history, RNG."""
        self.model.load_state_dict(previous["model"])
        self.optimizer.load_state_dict(previous["optimizer"])
        self.schedule.load_state_dict(previous["scheduler"])
        extra = previous["extra"]
        self.step = self.saved = previous["step"]
        self.history, self.skipped_steps = extra["history"], extra["skipped_steps"]
        self.skipped_images = extra["skipped_images"]
        self.loader.load_state_dict(extra["data"])
        self.scaler.load_state_dict(extra["scaler"])
        rngs = extra["rng_all"]
        set_rng_state(rngs[self.place.rank] if len(rngs) == self.place.world_size else rngs[0])
        self.log(f"resumed {self.out / 'checkpoint.pt'} at step {self.step} of {self.total}, "
                 f"data position {extra['data']}")

    def save(self):
        rngs = gather_rng_states(self.place.world_size)
        if self.place.rank == 0:
            extra = {"settings": dataclasses.asdict(self.settings), "vocab_file": str(Path(self.settings.vocab).resolve()),
                     "fresh": sorted(self.fresh),
                     "data": self.loader.state_dict(), "scaler": self.scaler.state_dict(), "history": self.history,
                     "skipped_steps": self.skipped_steps, "skipped_images": self.skipped_images, "rng_all": rngs}
            save_checkpoint(self.out / "checkpoint.pt", self.model, self.optimizer, self.schedule, self.step,
                            rng=rngs[0], extra=extra)
        self.saved = self.step

    def evaluate(self):
        metrics = {}
        if self.place.rank == 0 and self.evaluate_task is not None:
            metrics = self.evaluate_model(self.model, self.evaluate_task, self.log)
            self.model.train()
        if self.place.world_size > 1:
            dist.barrier()
        return metrics

    @staticmethod
    def evaluate_model(model, evaluate, log):
        """evaluate(model) in eval mode, its metrics logged on one line."""
        model.eval()
        metrics = evaluate(model)
        shown = (f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in flat(metrics).items())
        log("eval " + "  ".join(shown))
        return metrics

    def train_step(self, module, batch):
        """One optimizer step on the batch; returns why it was skipped, or None. Every rank decides alike."""
        why = None
        if not everywhere(len(batch["images"]) >= self.task.min_images, self.place):
            why = f"only {len(batch['images'])} readable image(s), fewer than the {self.task.min_images} the loss needs"
        else:
            with self.autocast:
                losses = module(tasks.to_device(batch, self.place.device))
            loss = losses["loss"].detach()
            if not everywhere(torch.isfinite(loss).item(), self.place):
                why = f"loss is not finite ({loss.item()})"
            elif not optimizer_step(losses["loss"], self.optimizer, self.scaler, self.model, self.settings.grad_clip):
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
        if self.place.world_size > 1:
            reduced = torch.tensor(list(means.values()), device=self.place.device)
            dist.all_reduce(reduced)
            means = dict(zip(means, (reduced / self.place.world_size).tolist()))
        rate = self.seen / max(time.time() - self.t0, 1e-9)
        eta = (time.time() - self.t_start) / (self.step - self.start_step) * (self.total - self.step)
        if means:
            self.history.append({"step": self.step, **means})
        self.log(f"step {self.step}/{self.total}  " + "  ".join(f"{k} {v:.3f}" for k, v in means.items())
                 + f"  lr {self.schedule.get_last_lr()[0]:.2e}  {rate:.1f} img/s  eta {fmt_time(eta)}"
                 + (f"  skipped images {self.skipped_images}" if self.skipped_images else ""))
        self.sums, self.count, self.seen, self.t0 = {}, 0, 0, time.time()

    def module(self):
        """What trains: the model and its loss as one module, compiled, then wrapped in DDP."""
        module = TaskLoss(self.model, self.task.loss)
        if self.settings.compile:
            module = torch.compile(module)
        if self.place.world_size > 1:
            module = DDP(module, device_ids=[self.place.device.index] if self.place.device.type == "cuda" else None)
        return module.train()

    def train(self):
        """Steps to the last one: skip what cannot train, log, evaluate and save at their intervals;
        Ctrl-C saves and stops; 20 non-finite steps in a row stop the run."""
        s, log = self.settings, self.log
        module = self.module()
        log(f"{s.task}: {self.total} steps of {s.batch_size} images x {self.place.world_size} process(es) on "
            f"{self.place.device}, lr {s.lr:g} ({s.schedule}), {s.precision}, model {s.config} "
            f"({xvlm.num_params(self.model) / 1e6:.1f}M parameters)"
            + (f", ablation {s.ablation}" if s.ablation != "none" else ""))
        batches = forever(self.loader)
        self.sums, self.count, self.seen = {}, 0, 0
        self.t0, self.t_start, self.start_step = time.time(), time.time(), self.step
        diverged = 0
        with StopRequest(log) as stop:
            try:
                while self.step < self.total:
                    batch = next(batches)
                    self.skipped_images += tasks.log_skipped(batch, log)
                    self.seen += len(batch["images"]) * self.place.world_size
                    why = self.train_step(module, batch)
                    diverged = diverged + 1 if why and "finite" in why else 0
                    if diverged >= 20:
                        raise UsageError(f"the loss or its gradient was not finite for {diverged} steps in a row (to "
                                         f"step {self.step}): the weights have diverged; lower --lr (was {s.lr:g}) "
                                         "or clip (--grad-clip)")
                    self.at_intervals()
                    if not everywhere(not stop.requested, self.place):
                        self.save()
                        log(f"interrupted at step {self.step}: saved {self.out / 'checkpoint.pt'}; "
                            "--resume continues the run")
                        raise KeyboardInterrupt
            except KeyboardInterrupt:
                if not stop.requested:
                    log(f"interrupted at step {self.step}: " + (
                        f"the last checkpoint, of step {self.saved}, is {self.out / 'checkpoint.pt'}; "
                        "--resume continues from it" if self.saved else "no checkpoint was saved yet"))
                raise
            except (ValueError, OSError) as e:
                log(f"error at step {self.step}: {e}")
                raise

    def at_intervals(self):
        """Log, evaluate and save when their intervals come round (the last step's are finish()'s)."""
        s = self.settings
        if (s.log_every and self.step % s.log_every == 0) or self.step == self.total:
            self.log_progress()
        if s.eval_every and self.step % s.eval_every == 0 and self.step < self.total:
            self.evaluate()
        if s.save_every and self.step % s.save_every == 0 and self.step < self.total:
            self.save()

    def finish(self):
        """The last checkpoint, the final evaluation, metrics.json and the loss plot; returns the metrics."""
        self.save()
        metrics = self.evaluate()
        if self.place.rank == 0:
            last = self.history[-1] if self.history else {}
            summary = {"task": self.settings.task, "step": self.step, **{k: v for k, v in last.items() if k != "step"},
                       "eval": metrics, "skipped_steps": self.skipped_steps, "skipped_images": self.skipped_images,
                       "minutes": round((time.time() - self.t_start) / 60, 2),
                       "settings": dataclasses.asdict(self.settings), "config": self.model.cfg.to_dict()}
            write_json(self.out / "metrics.json", summary)
            plot_losses(self.history, self.out / "losses.png", f"X-VLM {self.settings.task} ({self.settings.config})")
            self.log(f"wrote {self.out / 'metrics.json'}, {self.out / 'losses.png'} and {self.out / 'checkpoint.pt'}")
        return metrics


def forever(loader):
    """The loader's batches epoch after epoch (it keeps its own position for resuming)."""
    while True:
        yield from loader


# -----------------------------------------------------------------------------
# The paper's Table 3 on the synthetic world: `python train.py ablation`
#
# A cell is one variant (ABLATIONS) and one seed: the variant's pre-training, its zero-shot
# evaluation, then the paper's fine-tunes (appendix B's order, ABLATION_RUNS), each initialised from
# the run before it and kept in a directory under that run's: a run's path says what it started from.
# The runs that train on pre-training data (pre-training, the grounding pre-step) carry the variant's
# switches; a variant without the bbox loss has no grounding pre-step and no supervised grounding ("-",
# as the paper). A finished cell is a JSON file under OUT/cells holding the commit, the world, every
# run's settings, initialisation, final losses and minutes; a rerun skips it, an unfinished train run
# resumes, and cells of other settings or another world are refused before any training.

ABLATION_VARIANTS = {"X-VLM": "none", "w/o object": "no_object", "w/o region": "no_region",
                     "w/o bbox loss": "no_bbox_loss", "w/o mixed attn": "no_mixed_attn", "w/o all": "no_all"}
ABLATION_RUNS = [  # (task, the run it starts from, steps): fewer fine-tuning steps than the task defaults
    ("pretrain", None, 1200),
    ("retrieval", "pretrain", 200),
    ("vqa", "pretrain", 400),
    ("nlvr2_pretrain", "pretrain", 200),
    ("nlvr2", "nlvr2_pretrain", 200),
    ("grounding_pretrain", "pretrain", 300),
    ("grounding", "grounding_pretrain", 400),
    ("grounding_weak", "pretrain", 400),
]


class Column(NamedTuple):
    name: str
    task: str
    metric: str  # a path into the run's evaluation, "retrieval.r_mean"
    chance: str  # the same for its chance level
    meta_sum: bool  # summed in Meta-Sum (the fine-tuned scores, as the paper's Table 3)
    meta_sum_star: bool  # and in Meta-Sum* (without supervised grounding, the paper's *)


ABLATION_COLUMNS = [
    Column("zero-shot r_mean", "pretrain", "retrieval.r_mean", "retrieval.chance", False, False),
    Column("zero-shot box grounding", "pretrain", "grounding.acc", "grounding.chance", False, False),
    Column("zero-shot region grounding", "pretrain", "grounding_regions.acc", "grounding_regions.chance", False, False),
    Column("TR R@1", "retrieval", "txt_r1", "chance_txt_r1", True, True),
    Column("IR R@1", "retrieval", "img_r1", "chance_img_r1", True, True),
    Column("VQA", "vqa", "vqa_acc", "chance", True, True),
    Column("NLVR2", "nlvr2", "acc", "chance", True, True),
    Column("grounding", "grounding", "acc", "chance", True, False),
    Column("weak grounding", "grounding_weak", "acc", "chance", True, True),
]
# Fields of a run's settings that say where and how it ran, not what it computed, or that the
# variant sets, or that the table's runs never use (shuffle_buffer: tar shards): left out when cells are compared.
NOT_PROTOCOL = RESUME_FREE | {"init", "seed", "ablation", "objects", "regions", "mixed_attn", "synth_dir", "data",
                              "eval_data", "image_root", "vocab", "answer_list", "proposals", "grounding_data",
                              "shuffle_buffer"}
# The model fields a variant sets, itself or by its switches (--no-mixed-attn sets local_layers;
# cells run before that switch existed hold local_layers "all"): left out of the model compared.
NOT_PROTOCOL_MODEL = {k for a in ABLATIONS.values() for k in a if k in MODEL_FIELDS} | {"local_layers"}


def lookup(metrics, path):
    for part in path.split("."):
        if not isinstance(metrics, dict) or part not in metrics:
            return None
        metrics = metrics[part]
    return metrics


def ablation_plan(variant, seed, workdir, synth_dir, pretrain_steps):
    """The train runs of one cell, in order: [(task, out directory, argv of train.main)]."""
    key, made, plan = ABLATION_VARIANTS[variant], {}, []
    root = Path(workdir) / f"{key}-seed{seed}"
    for task, parent, steps in ABLATION_RUNS:
        steps = pretrain_steps if task == "pretrain" else steps
        row = tasks.TASKS[task]
        if (parent and parent not in made) or (len(row.ablations) > 1 and key not in row.ablations):
            continue  # trains on pre-training data without this variant's losses, or starts from such a run
        out = (made[parent] if parent else root) / f"{task}-{steps}"
        argv = ["--task", task, "--out", str(out), "--seed", str(seed), "--steps", str(steps),
                "--synth-dir", str(synth_dir), "--log-every", "100"]
        argv += ["--ablation", key] if key in row.ablations and key != "none" else []
        argv += ["--init", str(made[parent] / "checkpoint.pt")] if parent else []
        made[task] = out
        plan.append((task, out, argv))
    return plan


def protocol(settings):
    """What a run computed, from its settings (a dict): comparable between cells and variants."""
    model = {k: v for k, v in settings["model"].items() if k not in NOT_PROTOCOL_MODEL}
    kept = {**{k: v for k, v in settings.items() if k not in NOT_PROTOCOL and k != "model"}, "model": model}
    return json.loads(json.dumps(kept))  # as a cell file holds it: tuples are lists there


def machine():
    """Where a figure was measured: the CPU (and whether it has AVX-512 BF16 and AMX), threads, torch, Python."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    cpu = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
               platform.processor())
    return {"cpu": cpu, "cores": torch.get_num_threads(), "avx512_bf16": "avx512_bf16" in info,
            "amx": "amx_tile" in info, "torch": torch.__version__, "python": platform.python_version()}


def commit():
    """The code a cell ran: the git commit, marked +dirty when the working tree differs from it."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=here).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, cwd=here).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def texts_per_boxed_image(variant, synth_dir, samples=200):
    """How many object and region texts a box-annotated pre-training image brings on average under the
    variant's switches (max_regions caps them with the caption): {"object": x, "region": y}."""
    key = ABLATION_VARIANTS[variant]
    s = resolve({"synth_dir": str(synth_dir), **({"ablation": key} if key != "none" else {})})
    elements = tuple(k for k, on in (("object", s.objects), ("region", s.regions)) if on)
    tokenizer = data.Tokenizer(s.vocab)
    dataset = data.PretrainDataset(s.data, s.image_root, tokenizer, XVLMConfig.tiny(vocab_size=tokenizer.vocab_size),
                                   s.max_regions, data.Crops(s.crop_scale, s.region_crop_scale), elements, mlm=False)
    n = min(samples, len(dataset.regions))
    kinds = [k for i in range(n) for k in dataset[(1, i, (0, 1, i))]["kinds"]]
    return {k: round(kinds.count(k) / max(n, 1), 2) for k in data.ELEMENT_KINDS}


def ablation_cell(variant, seed, args, say):
    """Run (or finish) one cell: every train run of its plan that has no metrics.json yet, resuming an
    unfinished one. Returns the cell: provenance, scores and chance levels."""
    began, runs, evals, code = time.time(), {}, {}, commit()  # the code the cell starts with
    for task, out, argv in ablation_plan(variant, seed, args.workdir, args.synth_dir, args.pretrain_steps):
        if not (out / "metrics.json").exists():
            say(f"  {task} ({variant}, seed {seed}) -> {out}")
            main(argv + (["--resume"] if (out / "checkpoint.pt").exists() else []))
        metrics = data.read_json(out / "metrics.json")[0]
        made_in = Path(metrics.get("settings", {}).get("synth_dir") or "")
        if made_in.resolve() != Path(args.synth_dir).resolve():
            raise UsageError(f"{out / 'metrics.json'}: a run on the world in {made_in}, not --synth-dir "
                             f"{args.synth_dir}: give this table its own --workdir")
        runs[task] = {"out": str(out), "init": metrics["settings"]["init"], "settings": metrics["settings"],
                      "config": metrics.get("config"),  # the resolved model (output_positions, local_layers, ...)
                      "final": {k: v for k, v in metrics.items() if k not in ("task", "eval", "settings", "config")}}
        evals[task] = metrics["eval"]
    scores = {c.name: lookup(evals.get(c.task), c.metric) for c in ABLATION_COLUMNS}
    fine = [c.name for c in ABLATION_COLUMNS if c.meta_sum]
    scores["Meta-Sum"] = sum(scores[n] for n in fine) if all(scores[n] is not None for n in fine) else None
    scores["Meta-Sum*"] = sum(scores[c.name] for c in ABLATION_COLUMNS if c.meta_sum_star)
    by_kind = {c.name: lookup(evals.get(c.task), "by_kind") for c in ABLATION_COLUMNS if c.task.startswith("grounding")}
    chance = {c.name: lookup(evals.get(c.task), c.chance) for c in ABLATION_COLUMNS}
    return {"variant": variant, "seed": seed, "commit": code, "machine": machine(), "world": world_of(args.synth_dir),
            "scores": scores,
            "by_kind": by_kind, "chance": chance,
            "texts_per_boxed_image": texts_per_boxed_image(variant, args.synth_dir),
            "runs": runs, "minutes": round((time.time() - began) / 60, 1)}


def world_of(synth_dir):
    return json.loads((Path(synth_dir) / synth.SYNTH_FILES["done"]).read_text())


def planned_protocol(variant, args):
    """The protocol each run of a cell will compute (its Settings, resolved without running anything)."""
    return {task: protocol(dataclasses.asdict(resolve(parse_args(argv))))
            for task, _, argv in ablation_plan(variant, 0, args.workdir, args.synth_dir, args.pretrain_steps)}


def check_cells(cells, args):
    """Refuse cells of another world, or whose runs computed something else than this plan would."""
    world = world_of(args.synth_dir) if synth.synth_ready(args.synth_dir) else None
    for cell in cells:
        want = planned_protocol(cell["variant"], args)
        # a cell run before a setting existed holds none: it ran with the setting's default, as --resume reads it
        got = {task: protocol(dataclasses.asdict(Settings(**run["settings"]))) for task, run in cell["runs"].items()}
        if got != want or (world is not None and cell["world"] != world):
            differ = sorted(k for t in set(want) | set(got) for k in set(want.get(t, {})) | set(got.get(t, {}))
                            if want.get(t, {}).get(k) != got.get(t, {}).get(k))
            what = f"settings ({', '.join(differ[:5])})" if got != want else f"world ({cell['world']}, here {world})"
            raise UsageError(f"{args.out}/cells/{cell_name(cell['variant'], cell['seed'])} was run with other {what} "
                             f"than this table's: give the table its own --out and --workdir")


def cell_name(variant, seed):
    return f"{ABLATION_VARIANTS[variant]}-seed{seed}.json"


def spread(values, digits=1):
    """'mean ± sd' over seeds (sample standard deviation), or '-' where a variant has no such score."""
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    return f"{np.mean(values):.{digits}f}" + (f" ± {np.std(values, ddof=1):.{digits}f}" if len(values) > 1 else "")


def ablation_table(cells):
    """table.md: the scores (mean ± standard deviation over seeds), grounding by kind of expression,
    and what each variant's pre-training saw and ended at."""
    names = [c.name for c in ABLATION_COLUMNS] + ["Meta-Sum", "Meta-Sum*"]
    rows = {v: [c for c in cells if c["variant"] == v] for v in ABLATION_VARIANTS
            if any(c["variant"] == v for c in cells)}
    line = lambda items: "| " + " | ".join(map(str, items)) + " |"
    out = [line(["variant", "seeds", *names]), "|" + " --- |" * (len(names) + 2)]
    out += [line([v, len(r), *(spread([c["scores"][n] for c in r]) for n in names)]) for v, r in rows.items()]
    chance = chance_levels(cells)
    parts = [[chance[c.name] for c in ABLATION_COLUMNS if getattr(c, key)] for key in ("meta_sum", "meta_sum_star")]
    shown = lambda v: "-" if v is None else f"{v:.1f}"  # a column no cell has (only variants without grounding)
    out.append(line(["chance", "", *(shown(chance[c.name]) for c in ABLATION_COLUMNS),
                     *(shown(None if None in p else sum(p)) for p in parts)]))
    kinds = [(column, kind) for column in ("grounding", "weak grounding") for kind in data.REFERRING_KINDS]
    out += ["", line(["variant", *(f"{c}: {k}" for c, k in kinds)]), "|" + " --- |" * (len(kinds) + 1)]
    out += [line([v, *(spread([lookup(c["by_kind"], f"{col}.{k}") for c in r]) for col, k in kinds)])
            for v, r in rows.items()]
    finals = ["bbox", "itc", "itm", "mlm"]
    out += ["", line(["variant", "object texts / boxed image", "region texts / boxed image",
                      *(f"final {k} loss" for k in finals), "minutes / cell"]), "|" + " --- |" * (len(finals) + 4)]
    trains = lambda v, k: k != "bbox" or ABLATIONS[ABLATION_VARIANTS[v]].get("use_bbox_loss", True)  # else logged as 0
    out += [line([v, r[0]["texts_per_boxed_image"]["object"], r[0]["texts_per_boxed_image"]["region"],
                  *(spread([c["runs"]["pretrain"]["final"].get(k) for c in r] if trains(v, k) else [], 2)
                    for k in finals),
                  spread([c["minutes"] for c in r])])
            for v, r in rows.items()]
    return "\n".join(out) + "\n"


def chance_levels(cells):
    """Each column's chance level, from the cells that have the column (the same world: the same split); None
    for a column no cell has."""
    return {c.name: next((cell["chance"][c.name] for cell in cells if cell["chance"][c.name] is not None), None)
            for c in ABLATION_COLUMNS}


def ablation_plot(cells, path):
    """Meta-Sum* of each variant: a bar at the seeds' mean, a dot per seed, the axis from chance."""
    variants = [v for v in ABLATION_VARIANTS if any(c["variant"] == v for c in cells)]
    sums = {v: [c["scores"]["Meta-Sum*"] for c in cells if c["variant"] == v] for v in variants}
    floor = sum(chance_levels(cells)[c.name] for c in ABLATION_COLUMNS if c.meta_sum_star)
    top = max(max(s) for s in sums.values()) + 5
    img = Image.new("RGB", (max(120 * len(variants) + 100, 460), 380), "white")
    draw = ImageDraw.Draw(img)
    at = axes(draw, (60, 40, 120 * len(variants) + 80, 320), (0, len(variants)), (floor, top),
              "Meta-Sum*, the axis from chance (bars: means; dots: seeds)")
    for i, v in enumerate(variants):
        x0, mean = at(i + 0.2, 0)[0], at(0, float(np.mean(sums[v])))[1]
        draw.rectangle([x0, mean, x0 + 70, at(0, floor)[1]], fill=(31, 119, 180) if v == "X-VLM" else (150, 170, 190))
        for k, s in enumerate(sums[v]):
            y = at(0, s)[1]
            draw.ellipse([x0 + 20 + 10 * k, y - 4, x0 + 28 + 10 * k, y + 4], fill="black")
        draw.text((x0, 330), v, fill="black")
    save_png(img, path)


def ablation_args(argv):
    p = FlagParser(prog="train.py ablation", description=(
        "The paper's Table 3 on the synthetic world: pre-train X-VLM and its five ablations for each seed, "
        "evaluate zero-shot, run the paper's fine-tunes, and write OUT/table.md and OUT/metasum.png. Each finished "
        "cell is kept as OUT/cells/*.json (a rerun skips it; an unfinished train run resumes). Run it in the "
        "background (nohup ... &)."))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of every variant (default: 0 1 2)")
    p.add_argument("--variants", nargs="+", default=list(ABLATION_VARIANTS), choices=list(ABLATION_VARIANTS),
                   metavar="VARIANT", help=f"a subset of the rows: {', '.join(ABLATION_VARIANTS)}")
    p.add_argument("--out", default="docs/ablation",
                   help="where the cells, the table and the plot go (default: docs/ablation)")
    p.add_argument("--workdir", default="runs/ablation", help="the train runs' directories (default: runs/ablation)")
    p.add_argument("--synth-dir", default="synth", help="the synthetic world (default: synth; written on first use)")
    p.add_argument("--pretrain-steps", type=int, default=ABLATION_RUNS[0][2],
                   help=f"pre-training steps of every cell (default: {ABLATION_RUNS[0][2]}, the recipe's)")
    p.add_argument("--table-only", action="store_true",
                   help="write the table and the plot from the cells there are; train nothing")
    args = p.parse_args(argv)
    if min(args.seeds) < 0 or len(set(args.seeds)) < len(args.seeds):
        raise UsageError(f"--seeds must be distinct and >= 0, got {args.seeds}")
    if len(set(args.variants)) < len(args.variants):
        raise UsageError(f"--variants must be distinct, got {args.variants}")
    if args.pretrain_steps < 1:
        raise UsageError(f"--pretrain-steps must be >= 1, got {args.pretrain_steps}")
    return args


def ablation(argv=None):
    """`python train.py ablation`: run (or finish) every cell not yet in OUT/cells, then the table and the plot."""
    args = ablation_args(argv)
    cells_dir = Path(args.out) / "cells"
    cells_dir.mkdir(parents=True, exist_ok=True)
    check_cells(read_cells(cells_dir), args)
    if args.table_only and not read_cells(cells_dir):
        raise UsageError(f"--table-only: {cells_dir} holds no cells to make a table of")
    todo = [] if args.table_only else [(v, s) for s in args.seeds for v in args.variants
                                       if not (cells_dir / cell_name(v, s)).exists()]
    say = lambda message: print(f"[ablation {time.strftime('%H:%M:%S')}] {message}", flush=True)
    say(f"{len(todo)} cells to run")
    for n, (variant, seed) in enumerate(todo):
        say(f"cell {n + 1}/{len(todo)}: {variant}, seed {seed}")
        cell = ablation_cell(variant, seed, args, say)
        write_json(cells_dir / cell_name(variant, seed), cell)
        say(f"cell done in {cell['minutes']} min: Meta-Sum* {cell['scores']['Meta-Sum*']:.1f}")
    cells = read_cells(cells_dir)
    if cells:
        write_atomically(Path(args.out) / "table.md", lambda f: f.write(ablation_table(cells).encode()))
        ablation_plot(cells, Path(args.out) / "metasum.png")
        say(f"wrote {args.out}/table.md and {args.out}/metasum.png from {len(cells)} cells")


def read_cells(cells_dir):
    """The cells in OUT/cells, each a file named for its variant and seed (cell_name); a file that cannot be
    parsed, lacks a cell's fields, or whose name is not its own cell's is refused, by name."""
    cells = []
    for path in sorted(Path(cells_dir).glob("*.json")):
        cell = data.read_json(path)[0]
        fields_ok = isinstance(cell, dict) and cell.get("variant") in ABLATION_VARIANTS
        fields_ok = fields_ok and isinstance(cell.get("seed"), int)
        if not (fields_ok and isinstance(cell.get("runs"), dict) and isinstance(cell.get("scores"), dict)):
            raise UsageError(f"{path}: not a Table 3 cell (variant, seed, runs, scores): move it out of {cells_dir}")
        if path.name != cell_name(cell["variant"], cell["seed"]):
            own = cell_name(cell["variant"], cell["seed"])
            raise UsageError(f"{path}: holds the cell {own} ({cell['variant']}, seed {cell['seed']}): a cell counts "
                             "under its own name only; rename or remove it")
        cells.append(cell)
    return cells


def cli(argv):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["ablation"]:
        ablation(argv[1:])
    else:
        main(argv)
    return 0


if __name__ == "__main__":
    sys.exit(data.run_cli(cli))
