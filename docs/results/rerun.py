"""
The README's "Results on the synthetic world", rerun: every task with its defaults, one after another (never two
PyTorch jobs at once on 2 cores), each from the run the README's table names, then this folder's files.

    python docs/results/rerun.py              # from the repository root: ~20 minutes on 2 cores; resumes
    python docs/results/rerun.py --table      # the README's table from the files here, without running

Runs go to runs/results/ (not committed); what the README cites is copied here, per row: ROW/metrics.json
(with its settings and config) and ROW/log.txt, and machine.json (the CPU, torch, the commit). A row whose
metrics.json exists here is not run again: delete it (or the folder) to rerun it.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
RUNS = ROOT / "runs" / "results"

# (row, task, the row it starts from): appendix B's order, nlvr2 after its pre-step, grounding after its own
ROWS = [("pretrain", "pretrain", None), ("grounding_pretrain", "grounding_pretrain", "pretrain"),
        ("retrieval", "retrieval", "pretrain"), ("vqa", "vqa", "pretrain"), ("nlvr2_pretrain", "nlvr2_pretrain", "pretrain"),
        ("nlvr2", "nlvr2", "nlvr2_pretrain"), ("grounding", "grounding", "grounding_pretrain"),
        ("grounding_from_pretrain", "grounding", "pretrain"), ("grounding_weak", "grounding_weak", "pretrain")]
# The main job again, its pre-training records read from tar shards (synth/shards, data.py shards), evaluated alike
SHARDS = "synth/shards"
FLAGS = {"pretrain_shards": ["--data", SHARDS + "/{00000..00019}.tar", "--vocab", "synth/vocab.txt", "--image-root",
                             "synth/images", "--eval-data", "synth/retrieval_val.json", "--grounding-data",
                             "synth/grounding_val.json", "--proposals", "synth/grounding_proposals.json"]}
ROWS.append(("pretrain_shards", "pretrain", None))


def machine():
    """train.machine() and the commit (train.commit(): +dirty when the tree differs from it)."""
    sys.path.insert(0, str(ROOT))
    import train
    return {**train.machine(), "commit": train.commit()}


def run_all():
    for row, task, parent in ROWS:
        if (HERE / row / "metrics.json").exists():
            continue
        out = RUNS / row
        if row in FLAGS and not (ROOT / SHARDS).exists():
            subprocess.run([sys.executable, "data.py", "shards", "--data", "synth/pretrain_captions.json",
                            "synth/pretrain_regions.jsonl", "--image-root", "synth/images", "--out", SHARDS,
                            "--per-shard", "200"], cwd=ROOT, check=True)
        argv = [sys.executable, "train.py", "--task", task, "--out", str(out), *FLAGS.get(row, [])]
        argv += ["--init", str(RUNS / parent / "checkpoint.pt")] if parent else []
        argv += ["--resume"] if (out / "checkpoint.pt").exists() and not (out / "metrics.json").exists() else []
        if not (out / "metrics.json").exists():
            print("$", " ".join(argv[1:]), flush=True)
            subprocess.run(argv, cwd=ROOT, check=True)
        (HERE / row).mkdir(parents=True, exist_ok=True)
        for name in ("metrics.json", "log.txt"):
            shutil.copy(out / name, HERE / row / name)
        (HERE / row / "machine.json").write_text(json.dumps(machine(), indent=1) + "\n")


def kinds(metrics):
    order = ("name", "attribute", "position", "relation")
    return ", ".join(f"{k} {metrics['by_kind'][k]:.1f}" for k in order if k in metrics.get("by_kind", {}))


def table():
    """The README's table, every figure read from the files here."""
    m = {row: json.loads((HERE / row / "metrics.json").read_text()) for row, _, _ in ROWS if (HERE / row).exists()}
    e = {row: v["eval"] for row, v in m.items()}
    pre = e["pretrain"]
    rows = [
        ("`pretrain`, zero-shot", "retrieval `r_mean` (ITC, then ITM re-ranking)", pre["retrieval"]["r_mean"], pre["retrieval"]["chance"], "pretrain"),
        ("", f"grounding by ranking proposal boxes as visual concepts (region-text ITC; {kinds(pre['grounding_regions'])})",
         pre["grounding_regions"]["acc"], pre["grounding_regions"]["chance"], None),
        ("", f"grounding by the bbox head ({kinds(pre['grounding'])})", pre["grounding"]["acc"], pre["grounding"]["chance"], None),
        ("`grounding_pretrain` (L_bbox alone, appendix B)", f"zero-shot grounding by the bbox head ({kinds(e['grounding_pretrain'])})",
         e["grounding_pretrain"]["acc"], e["grounding_pretrain"]["chance"], "grounding_pretrain"),
        ("`retrieval`", f"`r_mean` (TR R@1 {e['retrieval']['txt_r1']:.1f}, IR R@1 {e['retrieval']['img_r1']:.1f})",
         e["retrieval"]["r_mean"], e["retrieval"]["chance"], "retrieval"),
        ("`vqa`", "VQA accuracy, official (" + ", ".join(f"{t} {e['vqa'][t]:.1f}" for t in ("yes/no", "number", "other") if t in e["vqa"]) + ")",
         e["vqa"]["vqa_acc"], e["vqa"]["chance"], "vqa"),
        ("`nlvr2_pretrain`", "text assignment accuracy", e["nlvr2_pretrain"]["acc"], e["nlvr2_pretrain"]["chance"], "nlvr2_pretrain"),
        ("`nlvr2`, from `nlvr2_pretrain`", "accuracy", e["nlvr2"]["acc"], e["nlvr2"]["chance"], "nlvr2"),
        ("`grounding`, from `grounding_pretrain`", f"accuracy, IoU >= 0.5 ({kinds(e['grounding'])})", e["grounding"]["acc"],
         e["grounding"]["chance"], "grounding"),
        ("`grounding`, from `pretrain` directly", f"accuracy, IoU >= 0.5 ({kinds(e['grounding_from_pretrain'])})",
         e["grounding_from_pretrain"]["acc"], e["grounding_from_pretrain"]["chance"], "grounding_from_pretrain"),
        ("`grounding_weak`", f"accuracy, Grad-CAM ranks the proposals ({kinds(e['grounding_weak'])})", e["grounding_weak"]["acc"],
         e["grounding_weak"]["chance"], "grounding_weak"),
    ]
    if "pretrain_shards" in e:
        sh = e["pretrain_shards"]
        rows[3:3] = [("`pretrain` from tar shards, zero-shot", "retrieval `r_mean`; grounding by proposals; by the bbox head",
                      f"{sh['retrieval']['r_mean']:.1f}; {sh['grounding_regions']['acc']:.1f}; {sh['grounding']['acc']:.1f}",
                      f"{sh['retrieval']['chance']:.1f}; {sh['grounding_regions']['chance']:.1f}; {sh['grounding']['chance']:.1f}",
                      "pretrain_shards")]
    lines = ["| task | metric | result | chance | minutes |", "| --- | --- | --- | --- | --- |"]
    for task, metric, value, chance, row in rows:
        minutes = f"{m[row]['minutes']:.1f}" if row else ""
        value, chance = (f"{x:.1f}" if isinstance(x, float) else x for x in (value, chance))
        lines.append(f"| {task} | {metric} | {value} | {chance} | {minutes} |")
    where = json.loads((HERE / "pretrain" / "machine.json").read_text())
    return "\n".join(lines) + f"\n\n(docs/results/*/metrics.json; {where['cpu']}, torch {where['torch']}, commit {where['commit'][:7]})"


if __name__ == "__main__":
    if "--table" not in sys.argv[1:]:
        run_all()
    print(table())
