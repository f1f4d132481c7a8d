"""Every stage end to end on a newer backbone family: a tiny random DINOv3-like encoder (patch 16, 4 registers,
LayerScale, RoPE), on the session's Ray. The DINOv2 families' encoder and Grad-CAM paths are checked at patch 14 in
test_encoder.py and test_bench.py."""

import pytest
from conftest import SMALL, job
from figures import check, run_figures

pytestmark = pytest.mark.slow


def test_run_all_on_a_newer_backbone(tmp_path, shared_ray):
    """An 8 x 8 token grid at patch 16 (sizes divide the patch); its losses, mIoU and Table 3 are pinned."""
    side = 128
    sizes = {
        "encoder.arch": "dinov3_tiny_test",
        "data.synthetic_size": side,
        "crops.image_size": [side, side],
        "crops.crop_size": side // 2,
        "pseudo.image_size": [side, side],
        "train.image_size": [side, side],
        "eval.image_size": [side, side],
        "train.round_epochs": [1],
        "data.synthetic_train": 8,
        "data.synthetic_val": 4,
    }  # one round on few images: the stages' code paths, not the training
    args = [a for a in SMALL if a.split("=")[0] not in sizes] + [f"{k}={v}" for k, v in sizes.items()]
    out = tmp_path / "out"
    log = job("run_all", f"output={out}", *args, env={"RAY_ADDRESS": shared_ray})
    assert "stage wall times" in log
    check("dinov3_run", run_figures(out))
