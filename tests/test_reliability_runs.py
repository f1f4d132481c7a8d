"""An operator's mistakes and accidents on a real local Ray, each on a copy of the shared end-to-end run: a moved or
copied output, images deleted or garbled after extract, a multi-worker resume, damaged files inside a stage, and the
keys that only change speed. Each case prints its figures (exit status, tracebacks, the error line) before asserting.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import E2E, SMALL, job

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("jobs_join_shared_ray")]


def copy(run_dir: Path, dst: Path, *names: str) -> Path:
    for name in names:
        shutil.copytree(run_dir / name, dst / name)
    return dst


def attempt(stage: str, *args: str) -> tuple[int, str]:
    """Run a job; its exit status and stderr."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / f"{stage}.py"), *args],
        cwd=ROOT,
        text=True,
        capture_output=True,
        timeout=900,
    )
    return proc.returncode, proc.stderr


def fails_in_one_line(case: str, stage: str, *args: str) -> str:
    """The job exits 2 with one `error:` line and no traceback; returns the line."""
    rc, err = attempt(stage, *args, *E2E)
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    shown = errors[0] if errors else (err.strip().splitlines() or [""])[-1]
    print(f"\n{case}: exit {rc}, {err.count('Traceback')} tracebacks, {len(err.splitlines())} stderr lines: {shown}")
    assert rc == 2 and len(errors) == 1 and "Traceback" not in err, err[-4000:]
    return errors[0]


def decoder_hash(path: Path) -> str:
    decoder = torch.load(path, weights_only=True)["decoder"]
    return hashlib.sha256(b"".join(decoder[k].numpy().tobytes() for k in sorted(decoder))).hexdigest()[:16]


def test_moved_output_with_deleted_and_garbled_images(e2e_run, tmp_path):
    """Images deleted and garbled after extract are listed with their reasons by pseudo_label; the output moved
    (`mv`) then trains on the bank's images (relative to data.root) and scores its own checkpoint; a copy whose
    images are mostly gone is refused in one line before training."""
    first = copy(e2e_run, tmp_path / "first", "data", "features", "concepts")
    images = sorted((first / "data" / "images" / "train").iterdir())
    images[3].unlink()
    images[4].write_bytes(b"garbage, not a PNG")
    console = job("pseudo_label", f"output={first}", *SMALL)
    listed = (first / "bank" / "bad_images.txt").read_text().splitlines()
    print(f"\npseudo_label bad_images.txt: {listed}")
    assert "skipped 2 unreadable images of 12" in console
    assert listed[0].startswith(f"{images[4]}\texpected an RGB-convertible image")  # the file's path, the reason
    assert listed[1] == f"{images[3].stem}\timage file gone since extract (deleted or moved)" and len(listed) == 2

    moved = tmp_path / "moved"
    first.rename(moved)
    mostly_gone = copy(moved, tmp_path / "mostly-gone", "data", "features", "concepts", "bank")
    for image in sorted((mostly_gone / "data" / "images" / "train").iterdir())[1:]:
        image.unlink()
    line = fails_in_one_line("bank images mostly gone", "bootstrap", f"output={mostly_gone}")
    assert f"{mostly_gone / 'data'}: 9 of the 10 images of the bank {mostly_gone / 'bank'} are not there" in line

    job("run_all", f"output={moved}", *SMALL)
    boot = json.loads((moved / "bootstrap" / "_SUCCESS.json").read_text())["metrics"]
    scored = json.loads((moved / "evaluate" / "metrics.json").read_text())
    print(f"moved output: last epoch {boot['steps']} steps, loss {boot['loss/total']:.3f}; {scored['checkpoint']}")
    # 10 images in batches of 6, the last partial batch dropped (train.drop_last, reference): one step, loss not NaN
    assert boot["steps"] == 1 and boot["loss/total"] == boot["loss/total"]
    assert scored["checkpoint"] == "bootstrap/final.pt"


def test_copied_output_logs_its_own_model(e2e_run, tmp_path):
    """A copy of a finished output whose final.pt is garbage: the rerun scores and logs the copy's checkpoint, so
    it fails in one line naming it (it logged the original output's model before)."""
    copied = Path(shutil.copytree(e2e_run, tmp_path / "copied"))
    (copied / "bootstrap" / "final.pt").write_bytes(b"garbage")
    line = fails_in_one_line("copied output, garbage final.pt", "run_all", f"output={copied}")
    assert line.startswith(f"error: {copied / 'bootstrap' / 'final.pt'}: not a readable PyTorch checkpoint")


def test_two_worker_resume_is_bit_identical(e2e_run, tmp_path):
    """train.num_workers=2: a worker crashes after epoch 0's checkpoint and the group resumes from it (every rank
    its own RNG streams); every decoder equals an uninterrupted 2-worker run's bit for bit."""
    runs = {}
    fail_once = {"TRANSFGU_FAIL_ONCE_AT_EPOCH": f"1:{tmp_path / 'm'}"}  # read by its own Ray's Train workers
    for name, env in (("uninterrupted", {}), ("resumed", fail_once)):
        out = copy(e2e_run, tmp_path / name, "data", "features", "concepts", "bank")
        job(
            "bootstrap",
            f"output={out}",
            *SMALL,
            "train.num_workers=2",
            "train.cpus_per_worker=0.5",
            env={**env, "RAY_ADDRESS": None},
        )
        runs[name] = out
    assert (tmp_path / "m").exists()
    assert json.loads((runs["resumed"] / "bootstrap" / "_SUCCESS.json").read_text())["metrics"]["resumed_at"] == 1
    hashes = {
        f: (decoder_hash(runs["uninterrupted"] / "bootstrap" / f), decoder_hash(runs["resumed"] / "bootstrap" / f))
        for f in ("round-0.pt", "round-1.pt", "final.pt", "best.pt")
    }
    print("\n2 workers, decoder sha256 (uninterrupted | killed at epoch 1 and resumed):")
    print("\n".join(f"  {f:<11} {a} | {b}" for f, (a, b) in hashes.items()))
    assert all(a == b for a, b in hashes.values())


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_failures_inside_a_stage_are_one_line(e2e_run, tmp_path):
    """Damaged files met inside a stage (in the driver or a Ray worker): exit 2 and one line naming the file."""
    bank = copy(e2e_run, tmp_path / "truncated", "data", "features", "concepts", "bank")
    part = sorted((bank / "bank").glob("part-*.parquet"))[0]
    truncate(part)
    assert part.name in fails_in_one_line("truncated committed part", "bootstrap", f"output={bank}")

    bank = copy(e2e_run, tmp_path / "deleted", "data", "features", "concepts", "bank")
    part = sorted((bank / "bank").glob("part-*.parquet"))[0]
    part.unlink()
    assert f"{part}: part recorded in the committed manifest is missing" in fails_in_one_line(
        "deleted committed part", "bootstrap", f"output={bank}"
    )

    trained = copy(e2e_run, tmp_path / "final", "data", "features", "concepts", "bank", "bootstrap")
    (trained / "bootstrap" / "final.pt").write_bytes(b"garbage")
    line = fails_in_one_line("garbage final.pt", "evaluate", f"output={trained}")
    assert line.startswith(f"error: {trained / 'bootstrap' / 'final.pt'}: not a readable PyTorch checkpoint")

    concepts = copy(e2e_run, tmp_path / "concepts", "data", "features", "concepts")
    (concepts / "concepts" / "concepts.npz").write_bytes(b"garbage")
    line = fails_in_one_line("garbage concepts.npz", "pseudo_label", f"output={concepts}")
    assert line.startswith(f"error: {concepts / 'concepts' / 'concepts.npz'}: expected the cluster stage's .npz")
    assert "not an .npz (zip) archive" in line and "pickled" not in line

    state = copy(e2e_run, tmp_path / "state", "data", "features", "concepts", "bank", "ray_train")
    for path in (state / "ray_train" / "bootstrap").glob("checkpoint_*/state.pt"):
        path.write_bytes(b"garbage")
    line = fails_in_one_line("garbage Ray Train state.pt", "bootstrap", f"output={state}", "train.max_failures=0")
    assert "/state.pt: not a readable Ray Train checkpoint file (UnpicklingError" in line

    uncommitted = copy(e2e_run, tmp_path / "uncommitted", "data", "features")
    (uncommitted / "features" / "_SUCCESS.json").unlink()
    part = sorted((uncommitted / "features").glob("part-*.parquet"))[0]
    truncate(part)
    line = fails_in_one_line("truncated uncommitted part", "extract", f"output={uncommitted}")
    assert line.startswith(f"error: {part}: part footer unreadable")


@pytest.mark.parametrize("record", ["[]", "{}"])
def test_commit_record_of_another_form_is_one_line(e2e_run, tmp_path, record):
    out = copy(e2e_run, tmp_path / "out", "data", "features")
    (out / "features" / "_SUCCESS.json").write_text(record)
    line = fails_in_one_line(f"_SUCCESS.json of {record}", "cluster", f"output={out}")
    assert line.startswith(f"error: {out / 'features' / '_SUCCESS.json'}: expected a stage's commit record")


def test_speed_only_keys_leave_the_outputs_unchanged(e2e_run, tmp_path):
    """Every key of contract.RESOURCE_KEYS at another value, on bootstrap and evaluate: decoders and scores equal
    the shared run's bit for bit. eval.checkpoint and eval.crf write to another folder; train.use_gpu needs a GPU
    (not run here). (The crops batch and part sizes, run so on a fresh extract, changed 202 of 872 crop features by
    up to 1.1e-6: they are settings inputs.)"""
    from transfgu_dist.config import load_config
    from transfgu_dist.pipeline.contract import RESOURCE_KEYS, folder_uri

    changed = {"train.cpus_per_worker": "0.5", "train.max_failures": "0", "eval.batch_size": "4"}
    folders = {"eval.checkpoint": "best", "eval.crf": "true"}
    assert set(changed) | set(folders) | {"train.use_gpu"} == RESOURCE_KEYS
    for key, value in folders.items():
        assert folder_uri(load_config(overrides=[f"{key}={value}"]), "evaluate") != folder_uri(
            load_config(), "evaluate"
        )

    out = copy(e2e_run, tmp_path / "train", "data", "features", "concepts", "bank")
    job("run_all", f"output={out}", *E2E, *(f"{k}={v}" for k, v in changed.items()))
    for name in ("final.pt", "best.pt"):
        assert decoder_hash(out / "bootstrap" / name) == decoder_hash(e2e_run / "bootstrap" / name), name
    scored, clean = (json.loads((d / "evaluate" / "metrics.json").read_text()) for d in (out, e2e_run))
    print(f"\nspeed-only keys at other values: mIoU {scored['miou']} (shared run {clean['miou']})")
    assert scored == clean
