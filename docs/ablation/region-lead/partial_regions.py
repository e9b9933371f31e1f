"""The synthetic world's box-annotated pre-training records without the region texts whose box holds
every shape of the image (27% of them: in a 2-shape image every region text does), so that no region
text describes nearly the whole image (experiment B of README.md); with --whole, without the others
(experiment F).

    python docs/ablation/region-lead/partial_regions.py synth/pretrain_regions.jsonl OUT.jsonl [--whole]
"""
import json
import sys


def inside(box, outer, slack=1):
    x, y, w, h = box
    X, Y, W, H = outer
    return x >= X - slack and y >= Y - slack and x + w <= X + W + slack and y + h <= Y + H + slack


def holds_every_shape(elem, objects):
    return all(inside(o["bb"], elem["bb"]) for o in objects)


def main(src, dst, whole=False):
    kept = dropped = 0
    with open(src) as f, open(dst, "w") as out:
        for line in f:
            rec = json.loads(line)
            objects = [e for e in rec["elems"] if e["kind"] == "object"]
            elems = [e for e in rec["elems"] if e["kind"] == "object" or holds_every_shape(e, objects) == whole]
            dropped += len(rec["elems"]) - len(elems)
            kept += sum(e["kind"] == "region" for e in elems)
            out.write(json.dumps({**rec, "elems": elems}) + "\n")
    print(f"{dst}: {kept} region texts kept, {dropped} dropped")


if __name__ == "__main__":
    main(*sys.argv[1:3], whole="--whole" in sys.argv[3:])
