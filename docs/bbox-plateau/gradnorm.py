"""Per-loss gradient RMS on shared parameter groups, for a checkpoint (or random init), over a few batches."""
import sys
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2]))
import torch, data, train, tasks, xvlm
torch.set_num_threads(1)
src = sys.argv[1] if len(sys.argv) > 1 else None
s = train.resolve({"synth_dir": __import__("os").environ.get("SYNTH", "synth"), "workers": 0})
tok = data.Tokenizer(s.vocab)
cfg = train.model_config(s, tok)
torch.manual_seed(0)
model = xvlm.XVLM(cfg) if src is None else xvlm.XVLM.from_checkpoint(src)
model.train()
loader = tasks.TASKS["pretrain"].train_loader(train.task_settings(s), tok, cfg, data.Shard(workers=0, seed=1))
groups = {"vision": "vision.", "text": "text.", "fusion.cross": "cross_attn", "fusion.self+mlp": "fusion.", "bbox_head": "bbox_head."}
def group_of(n):
    if n.startswith("fusion.") and "cross_attn" in n: return "fusion.cross"
    for g, pre in groups.items():
        if n.startswith(pre): return g
    return None
tot = {}
it = iter(loader)
for b in range(4):
    batch = next(it); batch.pop("skipped")
    torch.manual_seed(b)
    out = model(batch)
    for k in ("itc", "itm", "mlm", "bbox"):
        model.zero_grad()
        out[k].backward(retain_graph=True)
        for n, p in model.named_parameters():
            g = group_of(n)
            if g and p.grad is not None:
                tot.setdefault((k, g), []).append(p.grad.pow(2).sum().item())
import math
print("loss       " + " ".join(f"{g:>16}" for g in groups))
for k in ("itc", "itm", "mlm", "bbox"):
    print(f"{k:10} " + " ".join(f"{math.sqrt(sum(tot.get((k, g), [0]))/4):16.4f}" for g in groups))
