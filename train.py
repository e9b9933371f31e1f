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
OUT/checkpoint.pt; `--resume` continues a stopped run exactly where it stopped.

Wired in a fixed order: flags, distributed setup, data, model and weights, optimizer and
schedule, compile then DDP, the loop (autocast, skip non-finite, step, log, evaluate, save), and
the final evaluation, metrics.json and the loss plot.
"""

import argparse
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
import torch.distributed as dist
from PIL import Image, ImageDraw
from torch.nn.parallel import DistributedDataParallel as DDP

import data
import tasks
import xvlm
from xvlm import XVLMConfig


# -----------------------------------------------------------------------------
# Flags: one dataclass, one argparse flag per field (and one per XVLMConfig field)


def flag(default, help, **kwargs):
    return field(default=default, metadata=dict(help=help, **kwargs))


@dataclass
class TrainConfig:
    task: str = flag("pretrain", "what to train", choices=list(tasks.TASKS))
    config: str = flag("tiny", "model preset: 'base' is the paper's X-VLM-base, 'tiny' a CPU-sized one", choices=["tiny", "base"])
    data: list = flag(None, "training files (JSON list or JSON lines); default: the synthetic world's split for --task", nargs="+")
    eval_data: list = flag(None, "evaluation files (pretrain: retrieval val/test records); default: the synthetic world's validation split, none with --data", nargs="+")
    image_root: str = flag(None, "directory the records' image paths are relative to (default: the synthetic world's)")
    vocab: str = flag(None, "BERT vocab.txt (default: the synthetic world's)")
    answer_list: str = flag(None, "vqa: the candidate answers, a JSON list (default: the synthetic world's)")
    proposals: str = flag(None, "grounding_weak: proposal boxes per image, {image: [[x, y, w, h], ...]} (default: the synthetic world's)")
    synth_dir: str = flag("synth", "where the synthetic world lives; written on first use")
    steps: int = flag(None, "optimizer steps (default: --epochs, else the task's default for the preset)")
    epochs: float = flag(None, "epochs of the training data, instead of --steps")
    batch_size: int = flag(None, "images per process and step (default: the task's for the preset)")
    lr: float = flag(None, "peak learning rate (default: the paper's 1e-4 for base, the task's for tiny)")
    weight_decay: float = flag(0.02, "AdamW weight decay, not on biases, norms and other 1-d parameters")
    warmup: float = flag(0.2, "fraction of the steps spent warming up from lr * lr_ends to lr (paper: 1/5)")
    lr_ends: float = flag(0.1, "start and end learning rate as a fraction of the peak (paper: 1e-5 / 1e-4)")
    precision: str = flag("fp32", "autocast precision; fp16 (with a GradScaler) needs CUDA", choices=["fp32", "bf16", "fp16"])
    vit_init: str = flag(None, "DeiT/timm ViT weights (file or directory) for the image encoder")
    bert_init: str = flag(None, "Hugging Face BERT weights (file or directory) for the text and cross-modal encoders")
    init: str = flag(None, "one of our checkpoints to start from (e.g. a pre-trained one for a downstream task); "
                           "its architecture comes along, flags override it")
    out: str = flag(None, "output directory (default: runs/TASK)")
    resume: bool = flag(False, "continue from OUT/checkpoint.pt: model, optimizer, schedule, step, RNG and data position")
    seed: int = flag(0, "seed of the model's init, the data order and every random draw")
    log_every: int = flag(25, "steps between progress lines")
    eval_every: int = flag(0, "steps between evaluations (0: only at the end)")
    save_every: int = flag(250, "steps between checkpoints (one is always written at the end)")
    workers: int = flag(1, "data-loading processes per training process")
    grad_clip: float = flag(0.0, "clip the gradient norm to this value (0: off, as the paper)")
    compile: bool = flag(False, "torch.compile the model")
    max_regions: int = flag(5, "most region texts per box-annotated image in a pre-training batch")
    crop_scale: float = flag(None, "random resized crop's area range LO HI (default: the authors', 0.2-1 pre-training and 0.5-1 fine-tuning; 0.8-1 on the synthetic world, whose captions name every shape)", nargs=2)
    rerank_k: int = flag(None, "re-rank the top k by ITM in retrieval, by full likelihood in VQA (paper: 256 COCO, 128 Flickr)")
    device: str = flag(None, "cuda or cpu (default: cuda when available)")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Pre-train X-VLM or fine-tune it on a downstream task.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in fields(TrainConfig):
        add_flag(p, f.name, f.type, f.default, **f.metadata)
    model = p.add_argument_group("model", "override any field of the --config preset (XVLMConfig)")
    for f in fields(XVLMConfig):
        add_flag(model, f.name, type(f.default), None, help=f"XVLMConfig.{f.name} (preset: {f.default!r} in base)")
    args = p.parse_args(argv)
    problems = [
        (args.steps is not None and args.steps < 1, f"--steps must be >= 1, got {args.steps}"),
        (args.epochs is not None and args.epochs <= 0, f"--epochs must be > 0, got {args.epochs}"),
        (args.steps is not None and args.epochs is not None, "give --steps or --epochs, not both"),
        (args.batch_size is not None and args.batch_size < 2, f"--batch-size must be >= 2, got {args.batch_size}"),
        (args.lr is not None and args.lr <= 0, f"--lr must be > 0, got {args.lr}"),
        (not 0 <= args.warmup < 1, f"--warmup must lie in [0, 1), got {args.warmup}"),
        (not 0 < args.lr_ends <= 1, f"--lr-ends must lie in (0, 1], got {args.lr_ends}"),
        (min(args.log_every, args.save_every, args.eval_every, args.workers) < 0, "--log-every, --save-every, --eval-every and --workers must be >= 0"),
        (args.data is not None and args.image_root is None, "--data needs --image-root"),
        (args.data is not None and args.vocab is None, "--data needs --vocab"),
        (args.crop_scale is not None and not 0 < args.crop_scale[0] <= args.crop_scale[1] <= 1, f"--crop-scale needs 0 < LO <= HI <= 1, got {args.crop_scale}"),
        (args.rerank_k is not None and args.rerank_k < 1, f"--rerank-k must be >= 1, got {args.rerank_k}"),
    ]
    for bad, message in problems:
        if bad:
            p.error(message)
    return args


def add_flag(parser, name, kind, default, help, **kwargs):
    option = "--" + name.replace("_", "-")
    if kind is bool:
        parser.add_argument(option, action=argparse.BooleanOptionalAction, default=default, help=help)
    else:
        parser.add_argument(option, type=str if kind is list else kind, default=default, help=help, **kwargs)


def model_config(args, tokenizer):
    """The preset (or, with --init, the config stored in that checkpoint: fine-tuning keeps the
    pre-trained architecture), the vocabulary's size and special ids, then the user's overrides."""
    cfg = (XVLMConfig() if args.config == "base" else XVLMConfig.tiny()).to_dict()
    stored = xvlm.stored_config(*xvlm.read_file(args.init)) if args.init else None
    vocab = dict(vocab_size=tokenizer.vocab_size, pad_token_id=tokenizer.pad_id, cls_token_id=tokenizer.cls_id,
                 sep_token_id=tokenizer.sep_id, mask_token_id=tokenizer.mask_id)
    overrides = {f.name: getattr(args, f.name) for f in fields(XVLMConfig) if getattr(args, f.name) is not None}
    return XVLMConfig(**{**cfg, **(stored or {}), **vocab, **overrides})


# -----------------------------------------------------------------------------
# Schedule: the paper's (4.2), linear warm-up then cosine decay


def lr_factor(step, total, warmup=0.2, ends=0.1):
    """Learning rate at `step` (0-based) as a fraction of the peak: linear from `ends` to 1 over
    the first `warmup` of the steps, then cosine from 1 down to `ends` at the last step."""
    warm = int(total * warmup)
    if step < warm:
        return ends + (1 - ends) * step / warm
    progress = min(1.0, (step - warm) / max(1, total - 1 - warm))
    return ends + (1 - ends) * 0.5 * (1 + math.cos(math.pi * progress))


def param_groups(model, weight_decay):
    """Decay matrices (linear, conv, embeddings); not biases, norms, the temperature, 1-d vectors."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


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


def write_json(path, value):
    """Atomically: a crash never leaves half a metrics file."""
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(value, indent=2) + "\n")
    os.replace(tmp, path)


# -----------------------------------------------------------------------------
# Distributed


def setup_distributed(device_name=None):
    """Rank, world size and device from torchrun's environment; NCCL on CUDA, gloo on CPU."""
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = torch.cuda.is_available() if device_name is None else device_name == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world_size > 1:
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return rank, world_size, device


def to_device(batch, device):
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def all_finite(loss, world_size):
    """Whether the loss is finite on every rank: all ranks must skip a step together, or DDP hangs."""
    ok = torch.isfinite(loss.detach()).float()
    if world_size > 1:
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())


def gather_rng_states(world_size):
    """Every rank's RNG state, so a resumed DDP run continues each rank's own random stream."""
    state = xvlm.rng_state()
    if world_size == 1:
        return [state]
    states = [None] * world_size
    dist.all_gather_object(states, state)
    return states


# -----------------------------------------------------------------------------
# The run


def resolve_files(args, task):
    """The run's data: the user's files, else the synthetic world's for the task."""
    if args.data is not None:
        return tasks.Files(args.data, args.eval_data or [], args.image_root, args.vocab, args.answer_list, args.proposals)
    root = Path(args.synth_dir)
    path = lambda key: str(root / data.SYNTH_FILES[key])
    keys = task.synth
    return tasks.Files(train=[path(k) for k in keys["train"]], val=[path(k) for k in keys["val"]],
                       image_root=path("images"), vocab=path("vocab"),
                       answer_list=args.answer_list or (path(keys["answer_list"]) if "answer_list" in keys else None),
                       proposals=args.proposals or (path(keys["proposals"]) if "proposals" in keys else None),
                       grounding_val=[path(k) for k in keys.get("grounding_val", [])])


# Paper 4.2 and appendix B: epochs of each task, and per-GPU batches of X-VLM-base.
PAPER_EPOCHS = {"pretrain": 50, "retrieval": 10, "vqa": 8, "nlvr2_pretrain": 1, "nlvr2": 10, "grounding": 10,
                "grounding_weak": 5}
BASE_BATCH = {"pretrain": 96}  # 3072 images over 32 GPUs; fine-tuning: 32


def main(argv=None):
    args = parse_args(argv)
    rank, world_size, device = setup_distributed(args.device)
    task = tasks.TASKS[args.task]
    out = Path(args.out or f"runs/{args.task}")
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    if world_size > 1:
        dist.barrier()
    log = Log(out / "log.txt", rank)
    log("$ train.py " + " ".join(sys.argv[1:] if argv is None else argv))

    # Data: the synthetic world unless the user brings files (records checked before any compute).
    synthetic = args.data is None
    if synthetic and rank == 0 and not data.synth_ready(args.synth_dir):
        log(f"writing the synthetic world to {args.synth_dir}/ (once, ~30 s)")
        data.synthesize(args.synth_dir, seed=0)
    if world_size > 1:
        dist.barrier()
    files = resolve_files(args, task)
    tiny = args.config == "tiny" and synthetic  # the defaults tuned for the demo
    args.crop_scale = args.crop_scale or ((0.8, 1.0) if synthetic else None)
    args.rerank_k = args.rerank_k or (task.tiny["rerank_k"] if tiny else 128)
    tokenizer = data.Tokenizer(files.vocab)
    cfg = model_config(args, tokenizer)
    batch_size = args.batch_size or (task.tiny["batch_size"] if tiny else BASE_BATCH.get(args.task, 32))
    loader = tasks.train_loader(task, files, tokenizer, cfg, batch_size, args, rank, world_size)
    if args.steps is not None:
        total = args.steps
    elif args.epochs is not None or not tiny:
        total = max(1, round((args.epochs or PAPER_EPOCHS[args.task]) * len(loader)))
    else:
        total = task.tiny["steps"]
    lr = args.lr or (task.tiny["lr"] if tiny else 1e-4 if args.task == "pretrain" else 3e-5)

    # Model: the same init on every rank (DDP broadcasts rank 0's anyway), then public weights.
    torch.manual_seed(args.seed)
    model = task.build(cfg)
    if args.vit_init:
        log(f"--vit-init: {xvlm.load_vit(model, args.vit_init)}")
    if args.bert_init:
        log(f"--bert-init: {xvlm.load_bert(model, args.bert_init)}")
    if args.init:
        fresh = tasks.load_pretrained(model, args.init)
        log(f"--init: loaded {args.init}" + (f"; initialised {', '.join(fresh)} from it" if fresh else ""))
    for name, p in model.named_parameters():
        if name.startswith(task.unused):  # what this task's loss never reaches: frozen, so DDP waits for nothing
            p.requires_grad_(False)
    model.to(device)
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=lr, betas=(0.9, 0.999))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, args.warmup, args.lr_ends))
    if args.precision == "fp16" and device.type != "cuda":
        raise SystemExit("--precision fp16 needs CUDA (use bf16 on CPU)")
    scaler = torch.amp.GradScaler("cuda", enabled=args.precision == "fp16")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()

    step, history, skipped_steps, skipped_images = 0, [], 0, 0
    checkpoint = out / "checkpoint.pt"
    if args.resume:
        if not checkpoint.exists():
            raise SystemExit(f"--resume: {checkpoint} does not exist")
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["scheduler"])
        step, extra = state["step"], state["extra"]
        loader.load_state_dict(extra["data"])
        scaler.load_state_dict(extra["scaler"])
        history, skipped_steps, skipped_images = extra["history"], extra["skipped_steps"], extra["skipped_images"]
        rngs = extra["rng"]
        xvlm.set_rng_state(rngs[rank] if len(rngs) == world_size else rngs[0])
        log(f"resumed from {checkpoint} at step {step}, data position {extra['data']}")
    else:
        torch.manual_seed(args.seed + rank)  # ranks draw different masks and negatives

    raw_model = model  # saved and evaluated; what trains is the model and its loss as one module
    model = tasks.TaskLoss(model, task.loss)
    if args.compile:
        model = torch.compile(model)
    if world_size > 1:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    def save():
        rngs = gather_rng_states(world_size)
        if rank == 0:
            xvlm.save_checkpoint(checkpoint, raw_model, optimizer, schedule, step, extra={
                "data": loader.state_dict(), "scaler": scaler.state_dict(), "history": history,
                "skipped_steps": skipped_steps, "skipped_images": skipped_images, "rng": rngs, "vocab": files.vocab,
                "args": {k: v for k, v in vars(args).items() if v is not None}})

    def evaluate():
        metrics = {}
        if rank == 0:
            raw_model.eval()
            metrics = task.evaluate(raw_model, files, tokenizer, cfg, args)
            raw_model.train()
            log("eval " + "  ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in flat(metrics).items()))
        if world_size > 1:
            dist.barrier()
        return metrics

    log(f"{args.task}: {total} steps of {batch_size} images x {world_size} process(es) on {device}, "
        f"lr {lr:g}, {args.precision}, model {args.config} ({xvlm.num_params(raw_model) / 1e6:.1f}M parameters)")
    model.train()
    batches = forever(loader)
    sums, count, seen, t0, t_start, start_step = {}, 0, 0, time.time(), time.time(), step
    while step < total:
        batch = next(batches)
        skipped_images += batch.pop("skipped", 0)
        seen += len(batch["images"]) * world_size
        batch = to_device(batch, device)
        with autocast:
            losses = model(batch)
        loss = losses["loss"]
        if all_finite(loss, world_size):
            scaler.scale(loss).backward()
            if args.grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(raw_model.parameters(), args.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + v.detach().float()
            count += 1
        else:
            skipped_steps += 1
            log(f"step {step + 1}: loss is not finite ({loss.item()}), step skipped ({skipped_steps} so far)")
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        step += 1

        if (args.log_every and step % args.log_every == 0) or step == total:
            means = {k: (v / max(count, 1)).item() for k, v in sums.items()}
            if world_size > 1:
                reduced = torch.tensor(list(means.values()), device=device)
                dist.all_reduce(reduced)
                means = dict(zip(means, (reduced / world_size).tolist()))
            elapsed = time.time() - t0
            rate = seen / max(elapsed, 1e-9)
            eta = (time.time() - t_start) / (step - start_step) * (total - step)
            if means:
                history.append({"step": step, **means})
            log(f"step {step}/{total}  " + "  ".join(f"{k} {v:.3f}" for k, v in means.items())
                + f"  lr {schedule.get_last_lr()[0]:.2e}  {rate:.1f} img/s  eta {fmt_time(eta)}"
                + (f"  skipped images {skipped_images}" if skipped_images else ""))
            sums, count, seen, t0 = {}, 0, 0, time.time()
        if args.eval_every and step % args.eval_every == 0 and step < total:
            evaluate()
        if args.save_every and step % args.save_every == 0 and step < total:
            save()

    save()
    metrics = evaluate()
    if rank == 0:
        last = history[-1] if history else {}
        summary = {"task": args.task, "step": step, **{k: v for k, v in last.items() if k != "step"},
                   "eval": metrics, "skipped_steps": skipped_steps, "skipped_images": skipped_images,
                   "minutes": round((time.time() - t_start) / 60, 2)}
        write_json(out / "metrics.json", summary)
        plot_losses(history, out / "losses.png", f"X-VLM {args.task} ({args.config})")
        log(f"wrote {out / 'metrics.json'}, {out / 'losses.png'} and {checkpoint}")
    log.close()
    if world_size > 1:
        dist.destroy_process_group()
    return metrics


def forever(loader):
    """The loader's batches epoch after epoch (it keeps its own position for resuming)."""
    while True:
        yield from loader


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


if __name__ == "__main__":
    main()
