"""What a pre-trained checkpoint's box pathway does on the grounding split (docs/bbox-plateau/README.md):

    SYNTH=synth python docs/bbox-plateau/probes.py runs/pretrain/checkpoint.pt

predictions: the spread of the predicted boxes against the targets', and their correlation;
position: how well a linear probe reads each patch's (row, column) from the image tokens and from
the last cross-modal layer's values; attention: where the fused [CLS] and the words of each
expression look; readout: whether the fused [CLS] holds the referred box's centre at all.
"""
import math
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import torch  # noqa: E402

import data  # noqa: E402
import tasks  # noqa: E402
import train  # noqa: E402
import xvlm  # noqa: E402


def predictions(model, b):
    with torch.no_grad():
        pred = tasks.predict_boxes(model, b["images"], b["text_ids"], b["text_mask"])
    target = b["boxes"]
    corr = [torch.corrcoef(torch.stack([pred[:, j], target[:, j]]))[0, 1].item() for j in range(4)]
    print("predicted (cx, cy, w, h) std", pred.std(0).numpy().round(3), "targets'", target.std(0).numpy().round(3),
          "correlation", [round(c, 3) for c in corr])


def position(model, b):
    g = model.cfg.grid
    with torch.no_grad():
        x = model.encode_image(b["images"])[:, 1:]  # (B, N, D)
        values = model.fusion.layers[-1].cross_attn.kv(x)[..., model.cfg.text_width:]  # as the last cross-attention reads them
    rows, cols = torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij")
    target = torch.stack([rows.flatten(), cols.flatten()], 1).float() / (g - 1)
    for name, feats in (("image tokens", x), ("cross-attention values", values)):
        X, Y = feats.reshape(-1, feats.shape[-1]), target.repeat(len(feats), 1)
        X = torch.cat([X, torch.ones(len(X), 1)], 1)
        n = len(X) // 2  # fit on half the patches, score on the other half
        pred = X[n:] @ torch.linalg.lstsq(X[:n], Y[:n]).solution
        r2 = 1 - ((pred - Y[n:]) ** 2).sum(0) / ((Y[n:] - Y[n:].mean(0)) ** 2).sum(0)
        print(f"{name}: R^2 of (row, column) from a linear probe", r2.numpy().round(3))


def attention(model, b):
    """Per cross-modal layer and head: the share of attention in the referred box of the fused [CLS]
    and of the expression's best word, and the fused [CLS]'s share on the image [CLS] token."""
    kept = []
    for layer in model.fusion.layers:
        def literal(q, k, v, mask):
            p = (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).softmax(-1)
            kept.append(p)  # (B, heads, L, 1 + N): every text token over the image [CLS] and the patches
            return p @ v
        layer.cross_attn.attend = literal
    with torch.no_grad():
        tasks.predict_boxes(model, b["images"], b["text_ids"], b["text_mask"])
    inside = xvlm.patch_mask(b["boxes"], model.cfg.grid).float()  # (B, N)
    words = b["text_mask"].float()
    words[:, 0] = 0
    print(f"attention, per head (the referred box holds {inside.mean().item():.2f} of the grid):")
    for i, p in enumerate(kept):
        in_box = (p[..., 1:] * inside[:, None, None]).sum(-1)  # (B, heads, L)
        best_word = (in_box * words[:, None] - (1 - words[:, None])).amax(-1)
        print(f"  cross-modal layer {i}: [CLS] in the box {in_box[:, :, 0].mean(0).numpy().round(2)}, "
              f"best word in the box {best_word.mean(0).numpy().round(2)}, [CLS] on the image [CLS] {p[:, :, 0, 0].mean(0).numpy().round(2)}")


def readout(model, b):
    """How much of the referred box's centre a ridge probe reads from the fused [CLS] the box head sees."""
    got = {}
    hook = model.bbox_head.register_forward_hook(lambda module, inputs, output: got.update(cls=inputs[0]))
    with torch.no_grad():
        tasks.predict_boxes(model, b["images"], b["text_ids"], b["text_mask"])
    hook.remove()
    X = torch.cat([got["cls"], torch.ones(len(got["cls"]), 1)], 1)
    Y, n = b["boxes"][:, :2], len(X) // 2  # fit on half the expressions, score on the other half
    W = torch.linalg.solve(X[:n].T @ X[:n] + torch.eye(X.shape[1]), X[:n].T @ Y[:n])
    r2 = 1 - ((X[n:] @ W - Y[n:]) ** 2).sum(0) / ((Y[n:] - Y[n:].mean(0)) ** 2).sum(0)
    print("fused [CLS]: R^2 of the box's (cx, cy) from a ridge probe", r2.numpy().round(2))


if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 2)))
    model = xvlm.XVLM.from_checkpoint(sys.argv[1]).eval()
    s = train.resolve({"synth_dir": os.environ.get("SYNTH", "synth"), "task": "grounding"})
    dataset = data.GroundingDataset(s.eval_data, s.image_root, data.Tokenizer(s.vocab), model.cfg.max_tokens, model.cfg.image_res)
    batch = next(iter(data.eval_loader(dataset, 200)))
    for probe in (predictions, position, attention):
        probe(model, batch)
    train_split = data.GroundingDataset(s.data, s.image_root, data.Tokenizer(s.vocab), model.cfg.max_tokens, model.cfg.image_res)
    readout(model, next(iter(data.eval_loader(train_split, 2000))))  # 97 features: the probe needs many expressions
