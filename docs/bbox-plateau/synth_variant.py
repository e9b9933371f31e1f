"""Write a variant of the synthetic world: MIN_SHAPES env (default 2)."""
import os, sys
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2]))
import numpy as np
import synth
lo = int(os.environ.get("MIN_SHAPES", 2))
orig = synth.make_scene
def make_scene(rng):
    real_integers = rng.integers
    calls = {"n": 0}
    class R:  # intercept the first draw after the size: the shape count
        def __getattr__(self, k): return getattr(rng, k)
        def integers(self, a, b=None, *args, **kw):
            calls["n"] += 1
            if calls["n"] == 3 and (a, b) == (2, 5):
                return real_integers(lo, 5)
            return real_integers(a, b, *args, **kw)
    return orig(R())
synth.make_scene = make_scene
synth.synthesize(sys.argv[1], seed=0)
