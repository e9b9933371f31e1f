"""
The synthetic world: a small multi-grained world in the authors' formats, so that everything runs
with no download.

Images of 2-4 flat shapes, and texts about them at every grain X-VLM learns from: captions of the
whole image, object and region texts with their boxes, VQA questions, NLVR2 sentences about image
pairs, referring expressions of RefCOCO+'s kinds. data.py reads these files as it reads the public
ones; train.py writes the world on first use.

    python synth.py --out synth                      # write the synthetic world (--images N >= 12, --seed S)
    python data.py check synth/*.json* --image-root synth/images   # validate it as any data

From Python (train.py / bench.py):

    import synth
    synth.synthesize("synth", images=4000, seed=0)   # layout: synth.SYNTH_FILES
    synth.synth_ready("synth")                       # whether a complete world of this version is there

Contents, top to bottom:
  world     shapes and scenes (make_scene, draw_scene), their texts (captions, region_elems,
            vqa_questions, nlvr2_statement, referring_expression), synth_vocab, synthesize, synth_ready
  cli       python synth.py
"""

import argparse
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

import data
from data import REFERRING_KINDS, pick, read_records, write_records


# -----------------------------------------------------------------------------
# The synthetic world
#
# Images of 2-4 flat shapes (kind, colour, size) on a lightly mottled background, 96-128 px a side,
# and texts at three granularities: captions listing the shapes, object texts ("red circle") with
# their boxes, and region texts relating two shapes ("red circle left of blue square") with the
# union box. Shapes often share a colour or a kind with another shape of the image, so a bag of
# words does not identify an object: only binding colour to shape to place does.

# What synthesize() writes, relative to its output directory. Images live under images/, and
# every "image" field is relative to it (pass image_root = OUT/images).
SYNTH_FILES = {
    "vocab": "vocab.txt",                               # BERT special ids + the world's words
    "images": "images",                                 # images/{pretrain,train,val,test}/NNNNN.png
    "pretrain_captions": "pretrain_captions.json",      # image-text records (JSON list)
    "pretrain_regions": "pretrain_regions.jsonl",       # region records (JSON lines), other images
    "retrieval_train": "retrieval_train.json",          # one caption a record, with image_id
    "retrieval_val": "retrieval_val.json",              # five captions per image
    "retrieval_test": "retrieval_test.json",
    "vqa_train": "vqa_train.json",                      # three questions per image, ten answers each
    "vqa_val": "vqa_val.json",
    "vqa_test": "vqa_test.json",
    "answer_list": "answer_list.json",                  # every possible answer
    "nlvr2_train": "nlvr2_train.json",                  # image pairs with a true/false sentence
    "nlvr2_val": "nlvr2_val.json",
    "nlvr2_test": "nlvr2_test.json",
    "grounding_train": "grounding_train.json",          # unambiguous expressions with their box
    "grounding_val": "grounding_val.json",
    "grounding_test": "grounding_test.json",
    "grounding_proposals": "grounding_proposals.json",  # all shape boxes + 2 decoys per image
    "done": "synth.done",                               # written last: {"version", "images", "seed"} (JSON)
}
SYNTH_VERSION = 3  # 2: element kinds, NLVR2 sentences naming an image; 3: look-alikes, RefCOCO+ kinds; an older world is rewritten
MIN_SYNTH_IMAGES = 12

COLOURS = {"red": (215, 35, 35), "orange": (245, 140, 20), "yellow": (230, 205, 30),
           "green": (40, 160, 60), "blue": (35, 85, 215), "purple": (140, 55, 185)}
KINDS = ("circle", "square", "triangle", "cross")
SIZES = {"small": (22, 26), "large": (32, 38)}  # side in pixels: a small one covers ~2 patches at 64 px
RELATIONS = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight")


def plural(kind):
    return kind + ("es" if kind.endswith("s") else "s")


# Every word the world's texts use (test_synth_vocab_keeps_bert_ids_and_spells_every_text keeps this honest).
WORDS = sorted(set(" ".join([
    *COLOURS, *KINDS, *SIZES, *NUMBERS, *map(plural, KINDS),
    "a an the and of with picture shapes shape object objects from to left right above below",
    "what color is are there how many in total both images image contains contain exactly",
    "one on at top bottom yes no or shows more than",
]).split()))


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    size: str
    box: tuple  # (x, y, w, h) in pixels

    @property
    def name(self):
        return f"{self.colour} {self.kind}"


def with_article(phrase):
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def join_words(items):
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def relations(a, b):
    """The relations that strictly hold of shape a to shape b (boxes separated along that axis)."""
    (ax, ay, aw, ah), (bx, by, bw, bh) = a.box, b.box
    return [r for r, holds in (("left of", ax + aw <= bx), ("right of", bx + bw <= ax),
                               ("above", ay + ah <= by), ("below", by + bh <= ay)) if holds]


def union_box(a, b):
    x0, y0 = min(a.box[0], b.box[0]), min(a.box[1], b.box[1])
    x1 = max(a.box[0] + a.box[2], b.box[0] + b.box[2])
    y1 = max(a.box[1] + a.box[3], b.box[1] + b.box[3])
    return [x0, y0, x1 - x0, y1 - y0]


def make_scene(rng):
    """(width, height, shapes): 2-4 non-overlapping shapes. Each after the first is a look-alike of an
    earlier one (its colour and kind: only size, place or a relation tells them apart) 15% of the time,
    and shares only its colour 25%, only its kind 25%: colour, kind and place must be bound."""
    width, height = int(rng.integers(96, 129)), int(rng.integers(96, 129))
    shapes = []
    for _ in range(int(rng.integers(2, 5))):
        colour, kind = str(rng.choice(list(COLOURS))), str(rng.choice(KINDS))
        r, model = rng.random(), pick(rng, shapes) if shapes else None
        if model and r < 0.15:
            colour, kind = model.colour, model.kind
        elif model and r < 0.4:
            colour = model.colour
        elif model and r < 0.65:
            kind = model.kind
        size = str(rng.choice(list(SIZES)))
        side = int(rng.integers(SIZES[size][0], SIZES[size][1] + 1))
        for _ in range(100):  # rejection sampling of a free spot, 4 px clear of the others
            x, y = int(rng.integers(2, width - side - 1)), int(rng.integers(2, height - side - 1))
            if all(x + side + 4 <= s.box[0] or s.box[0] + s.box[2] + 4 <= x or
                   y + side + 4 <= s.box[1] or s.box[1] + s.box[3] + 4 <= y for s in shapes):
                shapes.append(Shape(kind, colour, size, (x, y, side, side)))
                break
    return width, height, shapes


# Each kind has its own fill as well as its outline: light bands 4 px wide, counted from the shape's
# corner (u, v), on the shape's colour. A ViT sees an outline only through how it crosses the patch
# grid, at whatever offset the shape happens to sit; a fill shows in every patch the shape covers
# (measured: docs/history.md).
FILLS = {
    "circle": lambda u, v: np.zeros(u.shape, dtype=bool),  # solid
    "square": lambda u, v: (v // 4) % 2 == 1,              # horizontal stripes
    "triangle": lambda u, v: (u // 4 + v // 4) % 2 == 1,   # checks
    "cross": lambda u, v: (u // 4) % 2 == 1,               # vertical stripes
}


def draw_scene(width, height, shapes, rng):
    """The scene as an RGB image: a soft mottled background, each shape in a slightly jittered
    colour with its kind's fill (FILLS) in a lighter tint of it."""
    base = rng.integers(195, 241, 3)
    blotches = (base + rng.integers(-12, 13, (4, 4, 3))).clip(0, 255).astype(np.uint8)
    pixels = np.array(Image.fromarray(blotches).resize((width, height), Image.BILINEAR))
    v, u = np.mgrid[0:height, 0:width]
    for s in shapes:
        colour = np.clip(np.array(COLOURS[s.colour]) + rng.integers(-12, 13, 3), 0, 255)
        x, y, w, h = s.box
        silhouette = Image.new("1", (width, height))
        draw = ImageDraw.Draw(silhouette)
        if s.kind == "circle":
            draw.ellipse((x, y, x + w - 1, y + h - 1), fill=1)
        elif s.kind == "square":
            draw.rectangle((x, y, x + w - 1, y + h - 1), fill=1)
        elif s.kind == "triangle":
            draw.polygon([(x + w / 2, y), (x + w - 1, y + h - 1), (x, y + h - 1)], fill=1)
        else:  # cross: two bars a third of the side thick
            t = w // 3
            draw.rectangle((x, y + (h - t) // 2, x + w - 1, y + (h + t) // 2 - 1), fill=1)
            draw.rectangle((x + (w - t) // 2, y, x + (w + t) // 2 - 1, y + h - 1), fill=1)
        inside = np.array(silhouette)
        light = FILLS[s.kind](u - x, v - y)
        pixels[inside & ~light] = colour
        pixels[inside & light] = (colour + 255) // 2
    return Image.fromarray(pixels)


def sentence(text, end="."):
    return text[0].upper() + text[1:] + end


def listing(shapes, sized=False):
    """'two red circles, a blue square and a green cross' (identical shapes counted together)."""
    names = [f"{s.size} {s.name}" if sized else s.name for s in shapes]
    groups = sorted(set(names), key=names.index)
    return join_words([with_article(n) if names.count(n) == 1 else f"{NUMBERS[names.count(n)]} {plural_name(n)}"
                       for n in groups])


def plural_name(name):
    *adjectives, kind = name.split()
    return " ".join(adjectives + [plural(kind)])


def caption_templates(shapes, rng):
    """Every caption this scene allows, one per template, in template order."""
    order = [shapes[i] for i in rng.permutation(len(shapes))]
    out = [listing(order), "a picture of " + listing(order), f"{NUMBERS[len(shapes)]} shapes: " + listing(order),
           listing(order, sized=True)]
    by_x = sorted(shapes, key=lambda s: s.box[0])
    if all("left of" in relations(a, b) for a, b in zip(by_x, by_x[1:])):
        out.append("from left to right: " + join_words([with_article(s.name) for s in by_x]))
    pairs = [(a, b, r) for a in order for b in order if a is not b for r in relations(a, b)]
    if pairs:
        a, b, r = pick(rng, pairs)
        rest = [s for s in order if s is not a and s is not b]
        out.append(f"{with_article(a.name)} {r} {with_article(b.name)}" + (f", with {listing(rest)}" if rest else ""))
    return out


def captions(shapes, rng, k):
    """k captions from distinct templates (fewer if the scene allows fewer), as sentences."""
    options = caption_templates(shapes, rng)
    return [sentence(options[i]) for i in sorted(rng.permutation(len(options))[:k].tolist())]


def unique_shapes(shapes):
    """Shapes that their name ('red circle') alone picks out in the scene."""
    names = [s.name for s in shapes]
    return [s for s in shapes if names.count(s.name) == 1]


def region_elems(shapes, rng, max_relations=3):
    """Object texts (attributes + caption, as Visual Genome's objects), and region texts as Visual
    Genome's region descriptions, phrases about a part of the image boxed around what they name: up
    to max_relations relating two uniquely named shapes (the union box), and each group of
    look-alikes ("two red circles", their union box)."""
    elems = [{"caption": s.kind, "attributes": f"{s.size} {s.colour}" if rng.random() < 0.3 else s.colour,
              "bb": list(s.box), "kind": "object"} for s in shapes]
    named = unique_shapes(shapes)
    pairs = [(a, b) for i, a in enumerate(named) for b in named[i + 1:]]
    for i in rng.permutation(len(pairs))[:max_relations].tolist():
        a, b = pairs[i] if rng.random() < 0.5 else pairs[i][::-1]
        # shapes are placed apart along at least one axis, so some relation always holds
        elems.append({"caption": f"{a.name} {pick(rng, relations(a, b))} {b.name}", "bb": union_box(a, b), "kind": "region"})
    for name in sorted({s.name for s in shapes} - {s.name for s in named}):
        group = [s for s in shapes if s.name == name]
        box = group[0].box
        for s in group[1:]:
            box = union_box(Shape(s.kind, s.colour, s.size, box), s)
        elems.append({"caption": f"{NUMBERS[len(group)]} {plural_name(name)}", "bb": list(box), "kind": "region"})
    return elems


def vqa_questions(shapes, rng, k):
    """k (question, answer) pairs of distinct types among those the scene allows."""
    kinds, colours, named = [s.kind for s in shapes], [s.colour for s in shapes], unique_shapes(shapes)
    options = []
    if any(kinds.count(s.kind) == 1 for s in shapes):
        s = pick(rng, [s for s in shapes if kinds.count(s.kind) == 1])
        options.append((f"what color is the {s.kind}", s.colour))
    if any(colours.count(s.colour) == 1 for s in shapes):
        s = pick(rng, [s for s in shapes if colours.count(s.colour) == 1])
        options.append((f"what shape is the {s.colour} object", s.kind))
    kind = str(rng.choice(KINDS))
    options.append((f"how many {plural(kind)} are there", str(kinds.count(kind))))
    colour = pick(rng, colours) if rng.random() < 0.5 else str(rng.choice(list(COLOURS)))
    options.append((f"how many {colour} objects are there", str(colours.count(colour))))
    options.append(("how many objects are there", str(len(shapes))))
    present = {s.name for s in shapes}
    if rng.random() < 0.5:
        options.append((f"is there {with_article(pick(rng, shapes).name)}", "yes"))
    else:  # prefer a decoy whose colour and kind are both in the image, on different shapes
        decoys = [f"{c} {k}" for c in sorted(set(colours)) for k in sorted(set(kinds)) if f"{c} {k}" not in present]
        decoys = decoys or [f"{c} {k}" for c in COLOURS for k in KINDS if f"{c} {k}" not in present]
        options.append((f"is there {with_article(pick(rng, decoys))}", "no"))
    pairs = [(a, b, r) for a in named for b in named if a is not b for r in relations(a, b)]
    if pairs:
        a, b, r = pick(rng, pairs)
        asked, answer = (r, "yes") if rng.random() < 0.5 else (RELATIONS[r], "no")
        options.append((f"is the {a.name} {asked} the {b.name}", answer))
        a, b, r = pick(rng, pairs)
        axis = "left or right of" if r in ("left of", "right of") else "above or below"
        options.append((f"is the {a.name} {axis} the {b.name}", r.split()[0]))
    return [(sentence(q, "?"), a) for q, a in (options[i] for i in sorted(rng.permutation(len(options))[:k].tolist()))]


VQA_ANSWERS = [*COLOURS, *KINDS, *(str(n) for n in range(5)), "yes", "no", "left", "right", "above", "below"]


def nlvr2_statement(pair, rng, want):
    """A sentence about two scenes (the left image, the right image) whose truth is `want`, or None if
    none was found in 200 tries. Some name an image by its side, as NLVR2's often do ("the left image
    contains ..."); others a relation within an image ("one image shows a red circle left of ...")."""
    everything = pair[0] + pair[1]
    for _ in range(200):
        template = int(rng.integers(7))
        s = pick(rng, everything)
        has = [any(t.name == s.name for t in shapes) for shapes in pair]
        if template == 0:
            text, truth = f"both images contain {with_article(s.name)}", all(has)
        elif template == 1:
            text, truth = f"exactly one image contains {with_article(s.name)}", has[0] != has[1]
        elif template in (2, 3):
            attribute = "kind" if template == 2 else "colour"
            total = sum(getattr(t, attribute) == getattr(s, attribute) for t in everything)
            n = min(len(NUMBERS) - 1, max(2, total + int(rng.integers(-1, 2))))
            what = plural(s.kind) if template == 2 else f"{s.colour} shapes"
            text, truth = f"there are {NUMBERS[n]} {what} in total", n == total
        elif template == 4:
            shapes = pick(rng, list(pair))
            if len(shapes) < 2:
                continue
            a, b = (shapes[i] for i in rng.permutation(len(shapes))[:2])
            r = str(rng.choice(list(RELATIONS)))
            truth = any(x.name == a.name and y.name == b.name and r in relations(x, y)
                        for shapes in pair for x in shapes for y in shapes if x is not y)
            text = f"one image shows {with_article(a.name)} {r} {with_article(b.name)}"
        elif template == 5:
            side = int(rng.integers(2))
            text, truth = f"the {('left', 'right')[side]} image contains {with_article(s.name)}", has[side]
        else:
            side = int(rng.integers(2))
            text = f"the {('left', 'right')[side]} image shows more shapes than the {('right', 'left')[side]} image"
            truth = len(pair[side]) > len(pair[1 - side])
        if truth == want:
            return sentence(text)
    return None


def referring_expressions(shapes, target):
    """Every expression that picks out `target` alone, by kind: {kind: [texts]}. name: its name, or
    its kind or colour alone when unique; attribute: its size and name, when no look-alike (a shape
    of its colour and kind) shares its size; position: where it lies among its look-alikes; relation:
    how it lies to a uniquely named shape, when none of its look-alikes lies so. Each is boxed on
    `target`, the subject, as RefCOCO+'s."""
    alike = [s for s in shapes if s.name == target.name and s is not target]
    out = {}
    if not alike:
        out["name"] = [target.name] + ([target.kind] if [s.kind for s in shapes].count(target.kind) == 1 else []) \
            + ([f"{target.colour} shape"] if [s.colour for s in shapes].count(target.colour) == 1 else [])
    if all(s.size != target.size for s in alike):
        out["attribute"] = [f"{target.size} {target.name}"]
    places = [p for p, r in (("on the left", "left of"), ("on the right", "right of"), ("at the top", "above"),
                             ("at the bottom", "below")) if alike and all(r in relations(target, o) for o in alike)]
    if places:
        out["position"] = [f"{target.name} {p}" for p in places]
    related = [f"{target.name} {r} the {o.name}" for o in unique_shapes(shapes) if o.name != target.name
               for r in relations(target, o) if not any(r in relations(a, o) for a in alike)]
    if related:
        out["relation"] = related
    return out


def referring_expression(shapes, target, rng, kind=None):
    """(kind, text): one expression that picks out `target` alone, of `kind` or of a kind drawn among
    those the scene allows; None when there is none."""
    options = referring_expressions(shapes, target)
    if kind is None and options:
        kind = pick(rng, sorted(options, key=REFERRING_KINDS.index))
    if kind not in options:
        return None
    return kind, ("the " if rng.random() < 0.5 else "") + pick(rng, options[kind])


def synth_vocab():
    """[PAD], [unused0-98], [UNK], [CLS], [SEP], [MASK] at BERT's ids, then punctuation, digits,
    letters, the world's words and the letters as word pieces (so any text can be spelled)."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    tokens = ["[PAD]", *(f"[unused{i}]" for i in range(99)), "[UNK]", "[CLS]", "[SEP]", "[MASK]",
              *".,?!'\"-:;/()", *"0123456789", *letters]
    tokens += [w for w in WORDS if w not in tokens] + [f"##{c}" for c in letters]
    return tokens


def synthesize(out_dir, images=4000, seed=0):
    """Write the synthetic world under out_dir (layout: SYNTH_FILES); return how many records each file holds.

    `images` pre-training images (half with captions only, half with boxes), plus downstream image
    pools train = images // 2, val = test = images // 20 (at least 8 / 6), shared by the tasks as
    COCO's are. The training splits take more from each image (three NLVR2 pairs, every shape a
    referring expression) than the evaluation splits do: the tiny model overfits the fine-tuning
    data long before it tires of pre-training. Every file is a function of (images, seed) alone.
    """
    if not isinstance(images, int) or images < MIN_SYNTH_IMAGES:
        raise ValueError(f"synthesize: images must be an integer >= {MIN_SYNTH_IMAGES}, got {images!r}")
    out = Path(out_dir)
    (out / SYNTH_FILES["done"]).unlink(missing_ok=True)  # incomplete until the end
    pools = {"pretrain": images, "train": max(8, images // 2), "val": max(6, images // 20), "test": max(6, images // 20)}
    scenes = {}
    for p, (pool, n) in enumerate(pools.items()):
        (out / "images" / pool).mkdir(parents=True, exist_ok=True)
        scenes[pool] = []
        for i in range(n):
            rng = np.random.default_rng((seed, p, i))
            width, height, shapes = make_scene(rng)
            path = f"{pool}/{i:05d}.png"
            draw_scene(width, height, shapes, rng).save(out / "images" / path, compress_level=1)
            scenes[pool].append((path, shapes))

    def rng(task, pool, i):  # one stream per (task, pool, image): the tasks do not shift each other
        return np.random.default_rng((seed, 1000 + task, list(pools).index(pool), i))

    pre = scenes["pretrain"]
    half = len(pre) // 2
    write_records(out / SYNTH_FILES["pretrain_captions"],
               [{"image": path, "caption": captions(shapes, rng(0, "pretrain", i), 3)} for i, (path, shapes) in enumerate(pre[:half])])
    write_records(out / SYNTH_FILES["pretrain_regions"],
               [{"image": path, "caption": captions(shapes, rng(0, "pretrain", i), 1)[0],
                 "elems": region_elems(shapes, rng(1, "pretrain", i))} for i, (path, shapes) in enumerate(pre[half:], half)],
               lines=True)
    write_records(out / SYNTH_FILES["retrieval_train"],
               [{"image": path, "caption": c, "image_id": f"train_{i}"}
                for i, (path, shapes) in enumerate(scenes["train"]) for c in captions(shapes, rng(2, "train", i), 3)])
    for split in ("val", "test"):
        write_records(out / SYNTH_FILES[f"retrieval_{split}"],
                   [{"image": path, "caption": captions(shapes, rng(2, split, i), 5)} for i, (path, shapes) in enumerate(scenes[split])])
    write_records(out / SYNTH_FILES["answer_list"], VQA_ANSWERS)
    for split in ("train", "val", "test"):
        # ten annotators who all agree, as VQA's ten answers per question
        write_records(out / SYNTH_FILES[f"vqa_{split}"],
                   [{"question_id": i * 10 + j, "question": q, "answer": [a] * 10, "image": path, "dataset": "vqa"}
                    for i, (path, shapes) in enumerate(scenes[split]) for j, (q, a) in enumerate(vqa_questions(shapes, rng(3, split, i), 3))])
        write_records(out / SYNTH_FILES[f"nlvr2_{split}"], synth_nlvr2(scenes[split], split == "train", lambda i: rng(4, split, i)))
        write_records(out / SYNTH_FILES[f"grounding_{split}"], synth_grounding(scenes[split], split == "train", lambda i: rng(5, split, i)))
    proposals = {path: synth_proposals(shapes, out / "images" / path, rng(6, split, i))
                 for split in ("train", "val", "test") for i, (path, shapes) in enumerate(scenes[split])}
    (out / SYNTH_FILES["grounding_proposals"]).write_text(json.dumps(proposals) + "\n")
    (out / SYNTH_FILES["vocab"]).write_text("\n".join(synth_vocab()) + "\n")
    counts = {key: len(read_records(out / name)[0]) for key, name in SYNTH_FILES.items()
              if name.endswith((".json", ".jsonl")) and key not in ("grounding_proposals", "done")}
    (out / SYNTH_FILES["done"]).write_text(json.dumps({"version": SYNTH_VERSION, "images": images, "seed": seed}) + "\n")
    return counts


def synth_nlvr2(pool, train, rng):
    """NLVR2 records over random pairs of the pool's (path, shapes); rng(i) draws pair i."""
    records = []
    for i in range((3 if train else 2) * len(pool)):  # pairs: more than images
        r = rng(i)
        a, b = (pool[j] for j in r.choice(len(pool), 2, replace=False))
        label = bool(r.random() < 0.5)
        text = nlvr2_statement((a[1], b[1]), r, label)
        if text is not None:
            records.append({"images": [a[0], b[0]], "sentence": text, "label": str(label)})
    return records


def synth_grounding(pool, train, rng):
    """Referring expressions, each with its kind: one of every kind a shape allows for every shape of a
    training image; one of a random kind for two shapes of an evaluation image."""
    records = []
    for i, (path, shapes) in enumerate(pool):
        r = rng(i)
        for target in [shapes[j] for j in r.permutation(len(shapes))[:None if train else 2]]:
            for kind in (REFERRING_KINDS if train else [None]):
                found = referring_expression(shapes, target, r, kind)
                if found is not None:
                    records.append({"image": path, "text": found[1], "bbox": list(target.box), "kind": found[0]})
    return records


def synth_proposals(shapes, image_path, r):
    """Weak grounding's proposals of one image: its shapes' boxes and two decoys, shuffled."""
    with Image.open(image_path) as img:
        W, H = img.size
    decoys = []
    for _ in range(2):  # boxes of shape size in random places: a proposal need not hold a shape
        side = int(r.integers(SIZES["small"][0], SIZES["large"][1] + 1))
        decoys.append([int(r.integers(0, W - side)), int(r.integers(0, H - side)), side, side])
    boxes = [list(s.box) for s in shapes] + decoys
    return [boxes[j] for j in r.permutation(len(boxes))]


def synth_ready(out_dir):
    """Whether out_dir holds a complete synthetic world of this version (train.py writes one when not)."""
    try:
        done = json.loads((Path(out_dir) / SYNTH_FILES["done"]).read_text())
    except (OSError, ValueError):
        return False
    return done.get("version") == SYNTH_VERSION and all((Path(out_dir) / name).exists() for name in SYNTH_FILES.values())


# -----------------------------------------------------------------------------
# Command line

def main(argv=None):
    parser = argparse.ArgumentParser(description="Write the synthetic multi-grained world. Layout (synth.SYNTH_FILES): "
                                     + ", ".join(SYNTH_FILES.values()) + ". Image paths are relative to OUT/images.")
    parser.add_argument("--out", default="synth", help="output directory (created; files in it are overwritten)")
    parser.add_argument("--images", type=int, default=4000,
                        help=f"pre-training images (at least {MIN_SYNTH_IMAGES}); the downstream pools get images/2 (train) and "
                             "images/20 (val, test)")
    parser.add_argument("--seed", type=int, default=0, help="the world is a function of this seed alone")
    parser.add_argument("--shards", action="store_true", help="also write the pre-training records as tar shards of 200 "
                        "samples, OUT/shards/{00000..000NN}.tar (img2dataset's layout; python data.py shards --help)")
    args = parser.parse_args(argv)
    if args.images < MIN_SYNTH_IMAGES:
        parser.error(f"--images must be at least {MIN_SYNTH_IMAGES}, got {args.images}")
    counts = synthesize(args.out, images=args.images, seed=args.seed)
    print(f"wrote the synthetic world to {args.out}/ (images under {args.out}/{SYNTH_FILES['images']}/):")
    for key, n in counts.items():
        print(f"  {SYNTH_FILES[key]:26s} {n:6d} records")
    if args.shards:
        shutil.rmtree(Path(args.out) / "shards", ignore_errors=True)  # the world was rewritten: so are its shards
        data.write_shards([Path(args.out) / SYNTH_FILES[k] for k in ("pretrain_captions", "pretrain_regions")],
                          Path(args.out) / SYNTH_FILES["images"], Path(args.out) / "shards", per_shard=200)
    return 0


if __name__ == "__main__":
    sys.exit(data.run_cli(main))
