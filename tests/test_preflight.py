"""First contact: each wrong invocation is one line on stderr and exit 2, before Ray or MLflow start."""

import json
import os
import subprocess
import sys

from conftest import ROOT, SMALL

# Run in a fresh interpreter: every case goes through the command line's preflight (cli.run's first step), and it
# must end without ray or mlflow ever imported (so no Ray session and no MLflow run can exist).
SCRIPT = r"""
import contextlib, io, json, sys, time
import numpy as np
from PIL import Image
from transfgu_dist.pipeline import cli
from transfgu_dist.config import load_config
from transfgu_dist.io.datasets import ensure_synthetic

out, small = sys.argv[1], json.loads(sys.argv[2])
data = f"{out}/data"
cfg = load_config(overrides=[f"data.root={data}", *small])
ensure_synthetic(cfg)
Image.fromarray(np.zeros((32, 64), np.uint8)).save(f"{data}/labels/val/000013.png")   # not its image's size
rgb = f"{out}/rgb"
ensure_synthetic(load_config(overrides=[f"data.root={rgb}", *small]))
Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(f"{rgb}/labels/val/000014.png")  # an RGB label
open(f"{out}/file", "w").close()
cases = json.loads(sys.argv[3])
results = []
for case in cases:
    args = small + [a.replace("OUT", out) for a in case]
    err = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stderr(err):
        try:
            cli.preflight(cli.parse_args("test", args), ["extract", "pseudo_label", "bootstrap", "evaluate"])
            code = 0  # a case that passed: the test fails on it without having started Ray
        except SystemExit as e:
            code = e.code
    results.append({"code": code, "stderr": err.getvalue(), "seconds": time.perf_counter() - start})
print(json.dumps({"results": results, "loaded": [m for m in ("ray", "mlflow") if m in sys.modules]}))
"""

CASES = {
    "data.layout=vocx output=OUT/a": "key 'data.layout' = 'vocx': expected one of synthetic, folder, cocostuff",
    "data.layout=voc data.root=OUT/nope output=OUT/b": "data.root=OUT/nope: does not exist (expected a 'voc'",
    "output=OUT/file/run": "output=OUT/file/run: not writable",
    "encoder.weights=OUT/missing.pth output=OUT/c": "OUT/missing.pth: encoder checkpoint not found",
    "crops.crop_size=30 output=OUT/d": "key 'crops.crop_size' = 30: expected multiples of 8",
    "train.image_size=[72,72] output=OUT/d": "key 'train.image_size' = (72, 72): expected multiples of 16",
    "encoder.arch=vit_huge output=OUT/e": "key 'encoder.arch' = 'vit_huge': expected one of vit_small_patch8",
    "train.lr=fast output=OUT/f": "command line: key 'train.lr': expected float, got 'fast'",
    "--config OUT/none.yaml": "config file OUT/none.yaml does not exist",
    "data.root=OUT/data output=OUT/g": "OUT/data/labels/val/000013.png: label is 64x32 but its image",
    "data.root=OUT/rgb output=OUT/h": "OUT/rgb/labels/val/000014.png: expected a single-channel label map",
}


def test_each_mistake_is_one_line_exit_2_before_ray_and_mlflow(tmp_path):
    out = str(tmp_path)
    small = SMALL
    cases = [c.split() for c in CASES]
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, out, json.dumps(small), json.dumps(cases)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.splitlines()[-1])
    assert report["loaded"] == []  # neither Ray nor MLflow was ever imported
    for (case, expected), r in zip(CASES.items(), report["results"]):
        assert r["code"] == 2, (case, r)
        lines = r["stderr"].strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (case, r["stderr"])
        assert expected.replace("OUT", out) in lines[0], (case, lines[0])
        assert r["seconds"] < 10, (case, r["seconds"])
    assert not any(f.endswith(".db") for _, _, files in os.walk(out) for f in files)  # no MLflow store
