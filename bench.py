"""
Benchmarks for the X-VLM reference implementation: each fast path against its reference, side by
side in one process, on the machine at hand. Prints a table; --json writes the figures.

    python bench.py --smoke                    # tiny shapes, one repeat: seconds (the test suite runs it)
    python bench.py --quick --json bench.json  # the README's table (docs/performance.md: how long)
    python bench.py                            # full: the base config at larger batches, on CUDA when present
    python bench.py --smoke --compile          # also torch.compile's step (compiling takes minutes on a CPU)

Footgun: two PyTorch processes on the same cores slow each other down ~10x (their OpenMP threads
spin); benchmark on an otherwise idle machine, or the ratios measure the neighbour.

Every ratio comes from its two contenders run alternately in the same process (A B, then B A, ...),
after warm-up rounds, as the median of several timed repeats. "Base" is the paper's X-VLM-base
(XVLMConfig()); --smoke runs every benchmark on XVLMConfig.tiny() instead.

The figures (ratios > 1 favour our code):
  mixed_attention_speedup       image encoder forward + backward, 4 regions per image, each a quarter of
                                the image (8x8 of the 16x16 patches, random grid-aligned positions):
                                time of the literal form (a full copy of the image per region through the
                                mixed layers under eq. (1)'s mask, as the authors' ViT runs it) / time of
                                the packed fast path (VisionTransformer.forward). mixed_layers_speedup is
                                the same for a ViT of only the L2 mixed layers; *_ideal are their FLOP
                                ratios (the literal form also pays for its dense masks, beyond FLOPs).
  mixed_attention_memory_saving 1 - packed / literal memory, where memory is the peak bytes allocated
                                above the starting point during forward + backward (CUDA), or on a CPU the
                                "tracked activations": the bytes of the tensors autograd saves for backward
                                during the forward, each storage counted once, parameters excluded.
  vit_vs_torch_encoder          our ViT blocks (base: 12 of ViT-B/16) against as many torch.nn.TransformerEncoderLayer
                                (pre-norm, GELU, the same weights) on the same input, forward + backward:
                                torch's time / ours. _inference: forward only under inference_mode, where
                                torch takes its fused fast path.
  mfu_fp32                      model FLOP/s of one pre-training step of the base config (all four losses,
                                regions included; forward, backward and the AdamW step) / the FLOP/s of a
                                large fp32 square matmul (matmul_n) timed alternately with it. Step FLOPs =
                                3 x the forward's matmul FLOPs (backward = 2 x forward), counted analytically
                                from the shapes by pretrain_forward_flops: 2*m*n*k per matmul (linear layers,
                                patch convolution, attention QK^T and AV at the padded lengths the model
                                computes, the MLM output layer at the expected number of masked tokens,
                                similarity matrices); elementwise work, softmax and norms are not counted.
  bf16_speedup                  the same step in fp32 / under bf16 autocast. Where the device has no bf16
                                matrix instructions (an AVX2 CPU) the target does not apply and the step is
                                the tiny config's, so that it finishes; bf16_matmul_ratio is bf16 / fp32
                                matmul FLOP/s at bf16_matmul_n, measured alongside.
  itm_rerank_speedup            retrieval's top-k ITM re-ranking (tasks.itm_rerank, pairs fused in chunks,
                                keys/values once per image per chunk) against tasks.itm_rerank_one_by_one,
                                one pair at a time; eval mode, no gradient.
  images_per_s_tiny/_base       images per second of the fp32 pre-training step (as mfu_fp32 times it).
  pipeline_images_per_s         the main job's pre-training (`python train.py --task pretrain`: tiny config, batch 16,
                                the synthetic world read, decoded, cropped and masked by its loader worker) in
                                images/s, data loading included; pipeline_vs_model is it / the same steps on one
                                batch held in memory (the model alone), timed alternately: 1.0 means loading is free.
  files_/shards_images_per_s    the main job's pre-training loader alone (its worker, batch 16), images/s: the
                                synthetic world as loose image files, and the same records as tar shards
                                (data.write_shards, 40 shards, shuffle buffer 1000); shards_vs_files is files /
                                shards seconds, timed alternately. On a local disk with the files cached, it
                                measures the readers' own cost, not a shared file system's.
  params_tiny/_base             parameter counts.
  compile_speedup               with --compile only: the base step eager / under torch.compile (after
                                its compilation, which the warm-up rounds absorb).
Each figure also records its contenders' median seconds in "details" of the JSON.
"""

import argparse
import contextlib
import json
import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn as nn

import data
import synth
import tasks
import train
import xvlm
from train import param_groups
from xvlm import XVLM, XVLMConfig

TARGETS = {  # the house targets on a 2-core CPU; ratios
    "mixed_attention_speedup": 2.0, "mixed_attention_memory_saving": 0.4, "vit_vs_torch_encoder": 0.95,
    "mfu_fp32": 0.5, "bf16_speedup": 2.0, "itm_rerank_speedup": 3.0,
}


@dataclass
class Mode:
    config: str  # the config of the "base" benchmarks: "base", or "tiny" for --smoke
    warmup: int  # untimed rounds of every contender
    repeats: int  # timed rounds; the median is reported
    mixed_images: int  # images through the image encoder, 4 regions each
    encoder_batch: int  # sequences through the 12 ViT blocks
    step_images: int  # images per pre-training step of the base config (half of them with regions)
    tiny_step_images: int
    regions_per_image: int  # region texts per box-annotated image in a step
    rerank_images: int  # retrieval: images, 2 texts each, re-ranking the top k
    rerank_k: int
    matmul_n: int  # fp32 matmul size for the MFU denominator
    bf16_matmul_n: int  # matmul size for the bf16 / fp32 ratio (small: bf16 is slow without bf16 units)
    pipeline_steps: int  # steps of the main job per timed round, data loading included
    pipeline_world: int  # pre-training images of the synthetic world it reads (an epoch: world / 16 steps; each
    #                     starts the loader's worker afresh, as in train.py)


MODES = {
    "smoke": Mode("tiny", warmup=0, repeats=1, mixed_images=2, encoder_batch=2, step_images=4, tiny_step_images=4,
                  regions_per_image=2, rerank_images=4, rerank_k=3, matmul_n=256, bf16_matmul_n=128, pipeline_steps=2,
                  pipeline_world=12),
    "quick": Mode("base", warmup=1, repeats=5, mixed_images=2, encoder_batch=1, step_images=4, tiny_step_images=16,
                  regions_per_image=2, rerank_images=4, rerank_k=4, matmul_n=4096, bf16_matmul_n=512, pipeline_steps=25,
                  pipeline_world=2000),
    "full": Mode("base", warmup=2, repeats=5, mixed_images=4, encoder_batch=4, step_images=16, tiny_step_images=64,
                 regions_per_image=4, rerank_images=16, rerank_k=16, matmul_n=8192, bf16_matmul_n=1024, pipeline_steps=50,
                 pipeline_world=4000),
}


# -----------------------------------------------------------------------------
# Timing and memory


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def alternate(contenders, mode, device):
    """Median seconds of each contender (name -> function), run in turn in this process: `warmup`
    untimed rounds, then `repeats` timed rounds whose order alternates (A B, B A, ...) so that
    neither always runs on the caches and clocks the other left behind."""
    names, times = list(contenders), {name: [] for name in contenders}
    for r in range(mode.warmup + mode.repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            sync(device)
            t0 = time.perf_counter()
            contenders[name]()
            sync(device)
            if r >= mode.warmup:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def saved_activation_bytes(forward, params):
    """Run forward() and return (its output, the bytes autograd saved for backward meanwhile): each
    storage counted once, parameters (and views of them, such as a transposed weight) left out."""
    exclude = {p.untyped_storage().data_ptr() for p in params}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in exclude:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    return out, sum(saved.values())


def activation_memory(forward, params, device):
    """Memory of forward() + backward as mixed_attention_memory_saving defines it: peak bytes
    allocated above the start on CUDA, tracked activations (saved_activation_bytes) on a CPU."""
    for p in params:
        p.grad = None
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        forward().backward()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - start
    loss, saved = saved_activation_bytes(forward, params)
    loss.backward()
    return saved


def matmul_contender(n, dtype, device):
    """A function multiplying two n x n matrices of `dtype`, and its FLOPs."""
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    return (lambda: a @ b), 2 * n ** 3


def has_bf16_matmul(device):
    """Whether the device multiplies bf16 matrices in hardware: CUDA that supports bf16, or a CPU with
    AVX512-BF16 / AMX (x86) or BF16 (Arm). Without, bf16 is emulated and far slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(f.read().split())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def machine(device):
    """One line naming the hardware and software the figures come from."""
    if device.type == "cuda":
        hardware = torch.cuda.get_device_name(device)
    else:
        hardware = platform.processor() or platform.machine()
        with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
            hardware = names[0] if names else hardware
    return (f"{hardware}, {os.cpu_count()} cores ({torch.get_num_threads()} torch threads), "
            f"torch {torch.__version__}, {device.type}")


# -----------------------------------------------------------------------------
# Inputs


def quarter_boxes(images, per_image, grid, generator):
    """`per_image` boxes on each image, each a quarter of it: half the side, at random positions on
    the patch grid, so that each covers exactly (grid/2)^2 patches. (R, 4) cxcywh, (R,) image."""
    half = grid // 2
    corner = torch.randint(0, grid - half + 1, (images * per_image, 2), generator=generator) / grid
    side = torch.full_like(corner, half / grid)
    return torch.cat([corner + side / 2, side], 1), torch.arange(images).repeat_interleave(per_image)


def random_texts(cfg, n, generator):
    """n texts of random lengths in [L/2, L], L = max_tokens: [CLS] words [SEP] [PAD]..."""
    L = cfg.max_tokens
    lengths = torch.randint(L // 2, L + 1, (n,), generator=generator)
    mask = torch.arange(L)[None] < lengths[:, None]
    ids = torch.randint(1000, cfg.vocab_size, (n, L), generator=generator)
    ids[:, 0] = cfg.cls_token_id
    ids[torch.arange(n), lengths - 1] = cfg.sep_token_id
    return ids.masked_fill(~mask, cfg.pad_token_id), mask


def pretrain_batch(cfg, images, regions_per_image, generator):
    """A pre-training batch as XVLM.forward documents it: one caption per image, and the second half
    of the images carry `regions_per_image` boxed region texts each (paper 4.2: half the images);
    MLM corruption by data.mask_text, every token a word of its own."""
    boxed = images // 2
    boxes, box_image = quarter_boxes(boxed, regions_per_image, cfg.grid, generator)
    box_image += images - boxed
    R = len(boxes)
    ids, mask = random_texts(cfg, images + R, generator)
    rng, is_piece = np.random.default_rng(int(torch.randint(2**31, (1,), generator=generator))), np.zeros(cfg.vocab_size, bool)
    corrupted = [data.mask_text(row[m].tolist(), is_piece, rng, cfg.vocab_size, cfg.mask_token_id, cfg.mask_prob, cfg.max_masks,
                                (cfg.mask_span_prob, cfg.mask_span_max)) for row, m in zip(ids, mask)]
    pad = lambda rows, value: torch.tensor([r + [value] * (ids.shape[1] - len(r)) for r in rows])
    return {"images": torch.randn(images, 3, cfg.image_res, cfg.image_res, generator=generator),
            "text_ids": ids, "text_mask": mask,
            "text_image": torch.cat([torch.arange(images), box_image]),
            "text_box": torch.cat([torch.full((images,), -1), torch.arange(R)]),
            "boxes": boxes, "box_image": box_image,
            "mlm_ids": pad([m for m, _ in corrupted], cfg.pad_token_id), "mlm_labels": pad([y for _, y in corrupted], -100),
            "concept_ids": torch.arange(images + R), "text_keys": torch.arange(images + R)}


def build(cfg, device):
    return XVLM(cfg).to(device)


# -----------------------------------------------------------------------------
# FLOPs, counted from the shapes (2*m*n*k per matmul; backward = 2 x forward)


def block_flops(tokens, length, width, mlp):
    """A transformer block on `tokens` sequences of `length`: qkv, output projection, MLP, and
    attention's QK^T and AV."""
    return 2 * tokens * length * (4 * width * width + 2 * width * mlp) + 4 * tokens * length * length * width


def vision_flops(cfg, images, regions, region_length):
    """The image encoder: patch embedding, L1 full blocks, and the L2 mixed blocks, each on the
    images and on `regions` copies of `region_length` tokens (1+M packed, 1+N literal)."""
    S, D, mlp = 1 + cfg.grid ** 2, cfg.vision_width, int(cfg.vision_width * cfg.vision_mlp_ratio)
    patches = 2 * images * cfg.grid ** 2 * D * 3 * cfg.patch_size ** 2
    L1, L2 = cfg.vision_layers - cfg.local_layers, cfg.local_layers
    return (patches + (L1 + L2) * block_flops(images, S, D, mlp)
            + (L2 * block_flops(regions, region_length, D, mlp) if regions else 0))


def text_flops(cfg, texts, L):
    return cfg.text_layers * block_flops(texts, L, cfg.text_width, cfg.text_mlp_dim)


def fusion_flops(cfg, texts, L, S):
    """The cross-modal encoder: `texts` of length L, each attending to S visual tokens whose
    keys/values are projected beforehand (fusion_kv_flops)."""
    d, per_layer = cfg.text_width, block_flops(texts, L, cfg.text_width, cfg.text_mlp_dim)
    cross = 2 * texts * L * 2 * d * d + 4 * texts * L * S * d  # query and output projections, attention
    return cfg.fusion_layers * (per_layer + cross)


def fusion_kv_flops(cfg, concepts, S):
    """Every cross-modal layer's keys/values of `concepts` x S visual tokens (projected once per concept)."""
    return cfg.fusion_layers * 2 * concepts * S * cfg.vision_width * 2 * cfg.text_width


def pretrain_forward_flops(cfg, batch):
    """Matmul FLOPs of XVLM.forward(batch), counted from the shapes as the model computes them."""
    B, T, L = len(batch["images"]), *batch["text_ids"].shape
    R, S, d, E = len(batch["boxes"]), 1 + cfg.grid ** 2, cfg.text_width, cfg.embed_dim
    M = int(xvlm.patch_mask(batch["boxes"], cfg.grid).sum(1).max()) if R else 0
    located = T if cfg.bbox_whole_image else int((batch["text_box"] >= 0).sum())
    head = lambda n, out: 2 * n * (d * 2 * d + 2 * d * out)  # the ITM and bbox MLPs
    masked = int((batch["mlm_labels"] != -100).sum())
    return (vision_flops(cfg, B, R, 1 + M)
            + 2 * text_flops(cfg, T, L)  # the texts, and again the MLM-masked texts
            + 2 * (B + R) * cfg.vision_width * E + 2 * T * d * E  # g_v on every concept, g_w
            + 3 * 2 * T * T * E  # itc both ways, the ITM hard-negative similarities
            + fusion_kv_flops(cfg, B + R, S)  # every concept's keys/values, once for the one fusion pass
            + fusion_flops(cfg, 3 * T, L, S) + head(3 * T, 2)  # itm: pairs and 2 negatives per text
            + fusion_flops(cfg, T, L, S) + 2 * masked * (d * d + d * cfg.vocab_size)  # mlm
            + fusion_flops(cfg, located, L, S) + head(located, 4))  # bbox, on the full images


# -----------------------------------------------------------------------------
# The benchmarks. Each returns ({figure: value}, {detail: value}).


def bench_mixed_attention(cfg, mode, device, generator):
    """The image encoder with 4 quarter-image regions per image: packed fast path against the literal
    eq. (1) form, forward + backward, and the same for the L2 mixed layers alone."""
    figures, details = {}, {}
    B, per_image = mode.mixed_images, 4
    images = torch.randn(B, 3, cfg.image_res, cfg.image_res, generator=generator).to(device)
    boxes, box_index = quarter_boxes(B, per_image, cfg.grid, generator)
    patch_mask, box_index = xvlm.patch_mask(boxes, cfg.grid).to(device), box_index.to(device)
    M = int(patch_mask.sum(1).max())
    direction = torch.randn(cfg.vision_width, generator=generator).to(device)
    for name, layers in (("mixed_attention", cfg.vision_layers), ("mixed_layers", cfg.local_layers)):
        vit_cfg = replace(cfg, vision_layers=layers, drop_path=0.0)
        vit = xvlm.VisionTransformer(vit_cfg).to(device)

        def loss(forward):  # of the image tokens and the regions' in-region tokens: equal for both forms
            def run():
                image, regions, keep = forward(images, patch_mask, box_index)
                return (image @ direction).sum() + ((regions @ direction) * keep).sum()
            return run

        packed, literal = loss(vit.forward_mixed), loss(vit.forward_literal)
        times = alternate({"packed": lambda: packed().backward(), "literal": lambda: literal().backward()}, mode, device)
        figures[f"{name}_speedup"] = times["literal"] / times["packed"]
        figures[f"{name}_ideal_speedup"] = (vision_flops(vit_cfg, B, len(boxes), 1 + cfg.grid ** 2)
                                            / vision_flops(vit_cfg, B, len(boxes), 1 + M))
        details.update({f"{name}_packed_s": times["packed"], f"{name}_literal_s": times["literal"]})
        if name == "mixed_attention":
            params = list(vit.parameters())
            memory = {form: activation_memory(f, params, device) for form, f in (("packed", packed), ("literal", literal))}
            figures["mixed_attention_memory_saving"] = 1 - memory["packed"] / memory["literal"]
            details.update(mixed_attention_packed_bytes=memory["packed"], mixed_attention_literal_bytes=memory["literal"])
            with torch.no_grad():  # the two forms compute the same loss
                a, b = packed().item(), literal().item()
                details["mixed_attention_loss_rel_diff"] = abs(a - b) / max(abs(b), 1e-12)
        del vit
    details["mixed_attention_regions"] = f"{B} image(s) x {per_image} regions of {M} patches"
    return figures, details


def torch_encoder_like(blocks):
    """torch.nn.TransformerEncoderLayer copies of our VisionBlocks: pre-norm, GELU, eps 1e-6, the
    same weights, so that both compute the same function."""
    layers = []
    for b in blocks:
        width, heads, mlp = b.norm1.weight.shape[0], b.attn.heads, b.mlp.fc1.out_features
        layer = nn.TransformerEncoderLayer(width, heads, mlp, dropout=0.0, activation="gelu", layer_norm_eps=1e-6,
                                           batch_first=True, norm_first=True).to(b.norm1.weight.device)
        pairs = [(layer.self_attn.in_proj_weight, b.attn.qkv.weight), (layer.self_attn.in_proj_bias, b.attn.qkv.bias),
                 (layer.self_attn.out_proj.weight, b.attn.proj.weight), (layer.self_attn.out_proj.bias, b.attn.proj.bias),
                 (layer.linear1.weight, b.mlp.fc1.weight), (layer.linear1.bias, b.mlp.fc1.bias),
                 (layer.linear2.weight, b.mlp.fc2.weight), (layer.linear2.bias, b.mlp.fc2.bias),
                 (layer.norm1.weight, b.norm1.weight), (layer.norm1.bias, b.norm1.bias),
                 (layer.norm2.weight, b.norm2.weight), (layer.norm2.bias, b.norm2.bias)]
        with torch.no_grad():
            for theirs, ours in pairs:
                theirs.copy_(ours)
        layers.append(layer)
    return nn.Sequential(*layers)


def bench_encoder_layers(model, mode, device, generator):
    """Our ViT blocks against torch's TransformerEncoderLayer, forward + backward and inference."""
    cfg = model.cfg
    ours = model.vision.blocks.eval()  # eval: no stochastic depth, so both compute the same function
    theirs = torch_encoder_like(ours).eval()
    ours = nn.Sequential(*ours)
    x = torch.randn(mode.encoder_batch, 1 + cfg.grid ** 2, cfg.vision_width, generator=generator).to(device)
    run = lambda layers: lambda: layers(x).sum().backward()
    fwd = lambda layers: lambda: layers(x)
    times = alternate({"ours": run(ours), "torch": run(theirs)}, mode, device)
    with torch.inference_mode():
        inference = alternate({"ours": fwd(ours), "torch": fwd(theirs)}, mode, device)
        diff = (ours(x) - theirs(x)).abs().max().item()
    model.zero_grad(set_to_none=True)
    model.train()
    return ({"vit_vs_torch_encoder": times["torch"] / times["ours"],
             "vit_vs_torch_encoder_inference": inference["torch"] / inference["ours"]},
            {"encoder_ours_s": times["ours"], "encoder_torch_s": times["torch"],
             "encoder_inference_ours_s": inference["ours"], "encoder_inference_torch_s": inference["torch"],
             "encoder_max_abs_diff": diff, "encoder_shape": f"{len(ours)} layers on {tuple(x.shape)}"})


def step_function(model, batch, dtype=None):
    """One pre-training step as train.py takes it: forward (under autocast for bf16), backward, AdamW."""
    optimizer = torch.optim.AdamW(param_groups(model, 0.02, 1e-5), lr=1e-5)
    device = batch["images"].device
    autocast = torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()

    def step():
        with autocast:
            loss = model(batch)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def bench_step(model, images, mode, device, generator, matmul=None):
    """The fp32 pre-training step's images/s and, against a square matmul timed alternately, MFU."""
    cfg = model.cfg
    batch = tasks.to_device(pretrain_batch(cfg, images, mode.regions_per_image, generator), device)
    contenders = {"step": step_function(model.train(), batch)}
    if matmul:
        contenders["matmul"] = matmul[0]
    times = alternate(contenders, mode, device)
    flops = 3 * pretrain_forward_flops(cfg, batch)
    out = {"images_per_s": images / times["step"], "step_s": times["step"], "step_flops": flops}
    if matmul:
        out.update(matmul_flops_per_s=matmul[1] / times["matmul"], step_flops_per_s=flops / times["step"])
        out["mfu_fp32"] = out["step_flops_per_s"] / out["matmul_flops_per_s"]
    return out


def bench_steps(model, tiny, mode, device, generator):
    """The base step's images/s and MFU, and the tiny step's images/s."""
    step = bench_step(model, mode.step_images, mode, device, generator, matmul_contender(mode.matmul_n, torch.float32, device))
    tiny_step = bench_step(tiny, mode.tiny_step_images, mode, device, generator)
    return ({"mfu_fp32": step["mfu_fp32"], "images_per_s_base": step["images_per_s"], "images_per_s_tiny": tiny_step["images_per_s"]},
            {"step_images": mode.step_images, "step_s": step["step_s"], "step_flops": step["step_flops"],
             "step_flops_per_s": step["step_flops_per_s"], "matmul_fp32_flops_per_s": step["matmul_flops_per_s"],
             "matmul_n": mode.matmul_n, "tiny_step_images": mode.tiny_step_images, "tiny_step_s": tiny_step["step_s"]})


def bench_bf16(model, images, mode, device, generator):
    """The step in fp32 against bf16 autocast, and bf16 against fp32 matmul FLOP/s."""
    batch = tasks.to_device(pretrain_batch(model.cfg, images, mode.regions_per_image, generator), device)
    model.train()
    times = alternate({"fp32": step_function(model, batch), "bf16": step_function(model, batch, torch.bfloat16)}, mode, device)
    (f32, flops), (b16, _) = (matmul_contender(mode.bf16_matmul_n, dt, device) for dt in (torch.float32, torch.bfloat16))
    mm = alternate({"fp32": f32, "bf16": b16}, mode, device)
    return ({"bf16_speedup": times["fp32"] / times["bf16"], "bf16_matmul_ratio": mm["fp32"] / mm["bf16"]},
            {"bf16_step_fp32_s": times["fp32"], "bf16_step_bf16_s": times["bf16"],
             "bf16_matmul_fp32_flops_per_s": flops / mm["fp32"], "bf16_matmul_bf16_flops_per_s": flops / mm["bf16"]})


def bench_compile(model, images, mode, device, generator):
    """The fp32 step eager against torch.compile (the first rounds compile: keep warm-up >= 1)."""
    batch = tasks.to_device(pretrain_batch(model.cfg, images, mode.regions_per_image, generator), device)
    compiled = torch.compile(model)
    times = alternate({"eager": step_function(model.train(), batch), "compiled": step_function(compiled, batch)},
                      replace(mode, warmup=max(mode.warmup, 1)), device)
    return {"compile_speedup": times["eager"] / times["compiled"]}, {"compile_eager_s": times["eager"], "compile_s": times["compiled"]}


def main_job(root):
    """train.py's tiny pre-training settings over the synthetic world in `root`, its tokenizer and model config."""
    settings = train.resolve({"synth_dir": root})
    tokenizer = data.Tokenizer(settings.vocab)
    return settings, tokenizer, train.model_config(settings, tokenizer)


def bench_shards(mode, device, root):
    """Data loading alone, train.py's tiny pre-training loader (its worker processes): the synthetic world's
    records in `root` as loose image files against the same records packed into tar shards (data.write_shards)."""
    settings, tokenizer, cfg = main_job(root)
    paths = data.write_shards(settings.data, settings.image_root, os.path.join(root, "shards"),
                              per_shard=max(1, mode.pipeline_world // 40), say=lambda line: None)
    view = train.task_settings(settings)
    streams = {}
    for name, files in (("files", view.data), ("shards", [str(p) for p in paths])):
        loader = tasks.TASKS["pretrain"].train_loader(replace(view, data=tuple(files)), tokenizer, cfg,
                                                      data.Shard(workers=settings.workers))
        streams[name] = train.forever(loader)
    read = lambda batches: [next(batches) for _ in range(mode.pipeline_steps)]
    times = alternate({name: (lambda b=b: read(b)) for name, b in streams.items()}, mode, device)
    images = mode.pipeline_steps * settings.batch_size
    return ({"files_images_per_s": images / times["files"], "shards_images_per_s": images / times["shards"],
             "shards_vs_files": times["files"] / times["shards"]},
            {"shards_files_s": times["files"], "shards_s": times["shards"],
             "shards_setup": f"{mode.pipeline_steps} batches of {settings.batch_size} images, {settings.workers} loader "
                             f"worker(s), {mode.pipeline_world} images in {len(paths)} shards, shuffle buffer "
                             f"{settings.shuffle_buffer}"})


def bench_pipeline(mode, device, root):
    """The main job's loop, data loading included, against its model alone: train.py's tiny pre-training
    settings and loader (its worker processes) over the small synthetic world in `root`; the same model steps
    on one batch held in memory."""
    settings, tokenizer, cfg = main_job(root)
    loader = tasks.TASKS["pretrain"].train_loader(train.task_settings(settings), tokenizer, cfg,
                                                  data.Shard(workers=settings.workers))
    batches = train.forever(loader)
    model = build(cfg, device).train()
    optimizer = torch.optim.AdamW(param_groups(model, settings.weight_decay, settings.lr), lr=settings.lr)
    held = tasks.to_device(next(batches), device)

    def steps(next_batch):
        for _ in range(mode.pipeline_steps):
            batch = next_batch()
            model(batch)["loss"].backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    def read():
        batch = next(batches)
        batch.pop("skipped")
        return tasks.to_device(batch, device)
    times = alternate({"pipeline": lambda: steps(read), "model": lambda: steps(lambda: held)}, mode, device)
    images = mode.pipeline_steps * settings.batch_size
    return ({"pipeline_images_per_s": images / times["pipeline"], "pipeline_vs_model": times["model"] / times["pipeline"]},
            {"pipeline_s": times["pipeline"], "pipeline_model_s": times["model"],
             "pipeline_setup": f"{mode.pipeline_steps} steps of {settings.batch_size} images, {settings.workers} loader worker(s), "
                               f"{mode.pipeline_world} pre-training images"})


def bench_rerank(model, mode, device, generator):
    """Top-k ITM re-ranking over a small retrieval set: batched against one pair at a time."""
    cfg, I = model.cfg, mode.rerank_images
    images = torch.randn(I, 3, cfg.image_res, cfg.image_res, generator=generator)
    ids, mask = random_texts(cfg, 2 * I, generator)
    with tasks.evaluating(model), torch.no_grad():
        f = tasks.retrieval_features(model, [images], [(ids, mask)])
        sims = f.image_feat @ f.text_feat.T
        args = (model, sims, f.image_embeds, f.text_embeds, f.text_mask, mode.rerank_k)
        times = alternate({"batched": lambda: tasks.itm_rerank(*args), "one_by_one": lambda: tasks.itm_rerank_one_by_one(*args)},
                          mode, device)
        fast, ref = tasks.itm_rerank(*args)[0], tasks.itm_rerank_one_by_one(*args)[0]
        finite = torch.isfinite(ref)
        diff = (fast[finite] - ref[finite]).abs().max().item()
    return ({"itm_rerank_speedup": times["one_by_one"] / times["batched"]},
            {"rerank_batched_s": times["batched"], "rerank_one_by_one_s": times["one_by_one"],
             "rerank_max_abs_diff": diff, "rerank_set": f"{I} images, {2 * I} texts, top {mode.rerank_k}"})


# -----------------------------------------------------------------------------
# The table


ROWS = [  # (figure, format, what it compares)
    ("mixed_attention_speedup", "{:.2f}x", "literal / packed image encoder, fwd+bwd"),
    ("mixed_attention_ideal_speedup", "{:.2f}x", "the same as a FLOP ratio"),
    ("mixed_layers_speedup", "{:.2f}x", "literal / packed, the L2 mixed layers alone"),
    ("mixed_layers_ideal_speedup", "{:.2f}x", "the same as a FLOP ratio"),
    ("mixed_attention_memory_saving", "{:.2f}", "1 - packed / literal activation memory"),
    ("vit_vs_torch_encoder", "{:.2f}x", "nn.TransformerEncoderLayer / our ViT blocks, fwd+bwd"),
    ("vit_vs_torch_encoder_inference", "{:.2f}x", "the same, inference (torch's fast path)"),
    ("mfu_fp32", "{:.2f}", "base step model FLOP/s / fp32 matmul FLOP/s"),
    ("bf16_speedup", "{:.2f}x", "fp32 / bf16-autocast step"),
    ("bf16_matmul_ratio", "{:.3f}x", "bf16 / fp32 matmul FLOP/s"),
    ("itm_rerank_speedup", "{:.2f}x", "one-by-one / batched ITM re-ranking"),
    ("images_per_s_base", "{:.2f}", "fp32 pre-training step, base config"),
    ("images_per_s_tiny", "{:.1f}", "fp32 pre-training step, tiny config"),
    ("pipeline_images_per_s", "{:.1f}", "the main job's pre-training, data loading included"),
    ("pipeline_vs_model", "{:.2f}", "it / the same steps on a batch in memory"),
    ("files_images_per_s", "{:.1f}", "pre-training loader alone, loose image files"),
    ("shards_images_per_s", "{:.1f}", "the same records from tar shards"),
    ("shards_vs_files", "{:.2f}x", "loose files / shards, seconds per batch"),
    ("params_base", "{:,}", "parameters, base config"),
    ("params_tiny", "{:,}", "parameters, tiny config"),
]


def table(figures, details, bf16_applies):
    lines = [f"{'figure':32} {'value':>12} {'target':>8}  {'met':4} compares"]
    rows = ROWS + ([("compile_speedup", "{:.2f}x", "eager / torch.compile base step")] if "compile_speedup" in figures else [])
    for name, fmt, what in rows:
        target = TARGETS.get(name)
        met = "" if target is None else "n/a" if name == "bf16_speedup" and not bf16_applies else (
            "yes" if figures[name] >= target else "NO")
        lines.append(f"{name:32} {fmt.format(figures[name]):>12} {'' if target is None else f'>= {target:g}':>8}  {met:4} {what}")
    lines.append("")
    lines += [f"  {k}: {v:.4g}" if isinstance(v, float) else f"  {k}: {v}" for k, v in details.items()]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description="X-VLM benchmarks: fast paths against their references, in one run.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--smoke", action="store_true", help="tiny config, one repeat: seconds; checks that the benchmark runs")
    size.add_argument("--quick", action="store_true", help="base config at small batches (minutes on a CPU)")
    p.add_argument("--json", metavar="FILE", default=None, help="also write the figures, details and machine to FILE")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the random inputs")
    p.add_argument("--compile", action="store_true", help="also time the base step under torch.compile (compiles for minutes on a CPU)")
    args = p.parse_args(argv)
    name = "smoke" if args.smoke else "quick" if args.quick else "full"
    mode = MODES[name]
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    generator = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    print(f"bench.py --{name} on {machine(device)}", flush=True)

    figures, details = {}, {}
    tiny_cfg = XVLMConfig.tiny()
    base_cfg = XVLMConfig() if mode.config == "base" else tiny_cfg
    model = build(base_cfg, device)
    tiny = model if mode.config == "tiny" else build(tiny_cfg, device)
    figures["params_base"], figures["params_tiny"] = xvlm.num_params(model), xvlm.num_params(tiny)

    def run(what, bench, *a):
        t0 = time.perf_counter()
        f, d = bench(*a)
        figures.update(f)
        details.update(d)
        print(f"  {what}: {time.perf_counter() - t0:.0f} s", flush=True)

    run("mixed attention", bench_mixed_attention, base_cfg, mode, device, generator)
    run("encoder layers", bench_encoder_layers, model, mode, device, generator)

    run("pre-training steps", bench_steps, model, tiny, mode, device, generator)

    bf16_applies = has_bf16_matmul(device)
    bf16_model, bf16_images = (model, mode.step_images) if bf16_applies else (tiny, mode.tiny_step_images)
    details["bf16_step"] = (f"{'base' if bf16_applies else 'tiny'} config, {bf16_images} images"
                            + ("" if bf16_applies else ": no bf16 matrix instructions, target n/a"))
    run("bf16", bench_bf16, bf16_model, bf16_images, mode, device, generator)
    run("ITM re-ranking", bench_rerank, model, mode, device, generator)
    with tempfile.TemporaryDirectory() as root:  # one synthetic world for both
        synth.synthesize(root, images=mode.pipeline_world, seed=0)
        run("the main job's pipeline", bench_pipeline, mode, device, root)
        run("shards against loose files", bench_shards, mode, device, root)
    if args.compile:
        run("torch.compile", bench_compile, model, mode.step_images, mode, device, generator)

    print(table(figures, details, bf16_applies))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"mode": name, "config": mode.config, "machine": machine(device), "bf16_applies": bf16_applies,
                       **figures, "details": details}, f, indent=1)
    return figures


if __name__ == "__main__":
    main()
