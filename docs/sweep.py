"""
The bad-input sweep: every command line a user can type, given every kind of bad file in every place that
takes a file. Each case must end with exit status 1 and one line on stderr naming the bad file (or its flag, or
an image its records name), no traceback
(README, "When something is wrong"); `data.py check` reports on stdout instead. Prints one line per case that does not, and a count.

    python docs/sweep.py            # from the repository root: ~5 minutes on 2 cores (a process per case)
    python docs/sweep.py --list     # the cases, without running them

It writes the synthetic world of 24 images and its bad files to a temporary directory.
"""

import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def bad_files(root, world):
    """{name: path} of the bad files: empty, truncated, binary, another kind, huge, a directory, missing."""
    out = {}
    (root / "empty.json").write_bytes(b"")
    (root / "truncated.json").write_text((world / "retrieval_val.json").read_text()[:200])
    (root / "binary.json").write_bytes(bytes(range(256)) * 4)
    (root / "image.json").write_bytes(next((world / "images" / "val").iterdir()).read_bytes())
    (root / "list.json").write_text("[1, 2, 3]")
    (root / "huge.json").write_text("[" + ",".join(['{"image": "x.png", "caption": "a"}'] * 200000) + "]")
    (root / "dir").mkdir()
    for name in ("empty.json", "truncated.json", "binary.json", "image.json", "list.json", "huge.json"):
        out[name] = root / name
    out["a directory"], out["missing"] = root / "dir", root / "missing.json"
    return out


def cases(root, world):
    """(what, argv) for every command and every place a file goes."""
    files = bad_files(root, world)
    synth = ["--synth-dir", str(world), "--steps", "1", "--device", "cpu", "--workers", "0"]
    run = lambda name: ["--out", str(root / "runs" / name.replace(" ", "_").replace("/", "_"))]
    out = []
    for kind, path in files.items():
        p = str(path)
        for flag in ("--eval-data", "--vocab", "--init", "--vit-init", "--bert-init", "--grounding-data", "--proposals"):
            out.append((f"train.py pretrain {flag} {kind}", ["train.py", "--task", "pretrain", *synth, flag, p,
                                                                *run(f"p{flag}{kind}")]))
        out.append((f"train.py pretrain --data {kind}", ["train.py", "--task", "pretrain", *synth, "--data", p,
                                                          "--image-root", str(world / "images"), "--vocab",
                                                          str(world / "vocab.txt"), *run(f"pd{kind}")]))
        out.append((f"train.py vqa --answer-list {kind}", ["train.py", "--task", "vqa", *synth, "--answer-list", p,
                                                            *run(f"v{kind}")]))
        out.append((f"train.py retrieval --data {kind}", ["train.py", "--task", "retrieval", *synth, "--data", p,
                                                           "--image-root", str(world / "images"), "--vocab",
                                                           str(world / "vocab.txt"), *run(f"r{kind}")]))
        out.append((f"data.py check {kind}", ["data.py", "check", p, "--image-root", str(world / "images")]))
        out.append((f"data.py shards --data {kind}", ["data.py", "shards", "--data", p, "--image-root",
                                                       str(world / "images"), "--out", str(root / "shards" / kind)]))
        for command, flag in (("convert-coco", "--captions"), ("convert-vg", "--objects")):
            out.append((f"data.py {command} {flag} {kind}", ["data.py", command, flag, p, "--out", str(root / "c.json")]))
        out.append((f"tasks.py predict --checkpoint {kind}", ["tasks.py", "predict", "--checkpoint", p, "--image",
                                                               str(next((world / "images" / "val").iterdir())),
                                                               "--text", "a red circle", "--out", str(root / "p.png")]))
        if kind != "image.json":  # an image file under another name is an image
            out.append((f"tasks.py predict --image {kind}", ["tasks.py", "predict", "--checkpoint", str(root / "ckpt.pt"),
                                                              "--image", p, "--text", "a red circle", "--out", str(root / "p.png")]))
        tar = root / "tars" / (kind.replace(" ", "_") + ".tar")  # the same bytes as a tar shard
        tar.parent.mkdir(exist_ok=True)
        if path.is_dir():
            tar.mkdir()
        elif path.exists():
            tar.write_bytes(path.read_bytes())
        out.append((f"train.py pretrain --data {kind} as .tar", ["train.py", "--task", "pretrain", *synth, "--data", str(tar),
                                                                 "--vocab", str(world / "vocab.txt"), *run(f"t{kind}")]))
        out.append((f"data.py check {kind} as .tar", ["data.py", "check", str(tar)]))
        out.append((f"train.py ablation --synth-dir {kind}", ["train.py", "ablation", "--table-only", "--out", p]))
    return out


def main():
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        import synth
        import train
        world = root / "world"
        synth.synthesize(world, images=24, seed=0)
        listed = cases(root, world)
        if "--list" in sys.argv:
            for what, _ in listed:
                print(what)
            return 0
        # one good checkpoint for the predict cases whose bad file is the image
        train.main(["--synth-dir", str(world), "--steps", "1", "--device", "cpu", "--workers", "0", "--batch-size", "4",
                    "--out", str(root / "good"), "--log-every", "1"])
        (root / "ckpt.pt").symlink_to(root / "good" / "checkpoint.pt")
        wrong = 0
        bad = {str(p) for p in (root / "tars").iterdir()} | {str(p) for p in root.iterdir() if p.suffix == ".json" or p.name == "dir"}
        for what, argv in listed:
            done = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True)
            lines = done.stderr.strip().splitlines()
            reported = argv[1] == "check" and not lines and done.stdout.strip()  # check's report goes to stdout
            said = lines[0] if lines else done.stdout
            # the message names the bad file, its flag, or an image its records name that cannot be read
            named = all(any(w in said for w in (Path(a).name, argv[i - 1], str(world / "images")))
                        for i, a in enumerate(argv) if a in bad)
            if done.returncode != 1 or not (len(lines) == 1 or reported) or "Traceback" in done.stderr or not named:
                wrong += 1
                print(f"{what}: exit {done.returncode}, stderr: {done.stderr.strip()[-300:]!r}")
        print(f"{len(listed)} cases, {wrong} not ending in one line with exit status 1")
        return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
