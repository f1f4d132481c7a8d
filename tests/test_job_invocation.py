"""predict, export and sweep answer a wrong invocation as run_all does: one `error:` line, exit 2, before Ray."""

import json
import os
import subprocess
import sys

from conftest import ROOT, SMALL

# One fresh interpreter runs every case through the jobs' own entry points; Ray must never be started.
SCRIPT = r"""
import contextlib, dataclasses, io, json, runpy, sys, time
import torch
from transfgu_dist.config import ARCHS, dump_yaml, load_config
from transfgu_dist.method.decoder import MaskTransformer
from transfgu_dist.pipeline.segmenter_jobs import run_export_job, run_predict_job

out, small = sys.argv[1], json.loads(sys.argv[2])
cfg = load_config(overrides=[f"output={out}/run", *small])
import pathlib
(pathlib.Path(out) / "run" / "bootstrap").mkdir(parents=True)
(pathlib.Path(out) / "run" / "config.yaml").write_text(dump_yaml(cfg))
decoder = MaskTransformer(ARCHS[cfg.encoder.arch][1], cfg.n_outputs, cfg.decoder)
torch.save({"decoder": decoder.state_dict(), "n_outputs": cfg.n_outputs, "encoder": dataclasses.asdict(cfg.encoder),
            "round": 0}, f"{out}/run/bootstrap/final.pt")
(pathlib.Path(out) / "photos").mkdir()
(pathlib.Path(out) / "names.yaml").write_text("0: sky\nx: person\n")
(pathlib.Path(out) / "space.yaml").write_text("preset: synthetic\nspace: {loss.alpha: {uniform: [0.01, 0.1]}}\n")
sweep = runpy.run_path(f"{sys.argv[4]}/jobs/sweep.py", run_name="sweep_job")["main"]
jobs = {"predict": run_predict_job, "export": run_export_job, "sweep": sweep}
results = []
for job, args in json.loads(sys.argv[3]):
    err = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            jobs[job](*(("",) if job != "sweep" else ()), [a.replace("OUT", out) for a in args])
            code = 0
        except SystemExit as e:
            code = e.code
    results.append({"code": code, "stderr": err.getvalue(), "seconds": time.perf_counter() - start})
ray = sys.modules.get("ray")
print(json.dumps({"results": results, "ray_started": bool(ray and ray.is_initialized())}))
"""

RUN = "run=OUT/run"
CASES = [
    (("predict", f"{RUN} output=OUT/p"), "give input= (see --help)"),
    (("predict", f"{RUN} input=OUT/nope output=OUT/p"), "OUT/nope: expected a folder / s3:// prefix holding images"),
    (("predict", f"{RUN} input=OUT/photos output=OUT/p"), "OUT/photos: expected a folder / s3:// prefix holding"),
    (
        ("predict", f"{RUN} input=OUT/photos output=OUT/p stide=64"),
        "unknown key 'stide': predict takes run=, checkpoint=, metrics=, names=, output=, input=, crf=, stride=",
    ),
    (("predict", "run=OUT/none input=OUT/photos output=OUT/p"), "OUT/none/config.yaml"),
    (("predict", f"{RUN} input=OUT/photos output=OUT/p stride=0"), "stride=0: expected the sliding-window step"),
    (("predict", f"{RUN} input=OUT/photos output=OUT/p train.lrr=1"), "unknown key 'train.lrr'"),
    (("export", f"{RUN} names=OUT/names.yaml"), "names=OUT/names.yaml: expected a YAML mapping of cluster id"),
    (("export", f"{RUN} names=OUT/none.csv"), "names=OUT/none.csv: does not exist"),
    (("export", f"{RUN} torchscrpt=true"), "unknown key 'torchscrpt': export takes run="),
    (("export", f"{RUN} checkpoint=OUT/run/config.yaml"), "OUT/run/config.yaml: not a readable PyTorch checkpoint"),
    (("sweep", "OUT/nope.yaml"), "search space OUT/nope.yaml does not exist"),
    (("sweep", "OUT/space.yaml --source OUT/run"), "--source OUT/run: no committed pseudo-label bank"),
    (("sweep", "OUT/space.yaml loss.alpah=1"), "unknown key 'loss.alpah'"),
    (("sweep", "OUT/space.yaml data.layout=folder"), "data.layout=folder: a sweep ranks trials by val mIoU"),
]


def test_predict_export_sweep_mistakes_are_one_line_exit_2_without_ray(tmp_path):
    out = str(tmp_path)
    cases = [(job, args.split()) for (job, args), _ in CASES]
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, out, json.dumps(SMALL), json.dumps(cases), ROOT],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.splitlines()[-1])
    assert not report["ray_started"]
    for ((job, args), expected), r in zip(CASES, report["results"]):
        lines = r["stderr"].strip().splitlines()
        assert r["code"] == 2, (job, args, r)
        assert len(lines) == 1 and lines[0].startswith("error: "), (job, args, r["stderr"])
        assert expected.replace("OUT", out) in lines[0], (job, args, lines[0])
    assert not any(f.endswith(".db") for _, _, files in os.walk(out) for f in files)  # no MLflow store


def test_help_of_each_job_lists_the_config_keys():
    for job in ("predict", "export", "sweep"):
        proc = subprocess.run(
            [sys.executable, f"{ROOT}/jobs/{job}.py", "--help"], capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 0 and "config keys" in proc.stdout and "encoder: arch=" in proc.stdout, job
