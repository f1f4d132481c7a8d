"""Every stage end to end on the newer backbone families: tiny random DINOv2-reg4-like and DINOv3-like encoders."""

import pytest
from conftest import SMALL, job

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("arch,side", [("dinov2_reg4_tiny_test", 112), ("dinov3_tiny_test", 128)])
def test_run_all_on_newer_backbones(tmp_path, arch, side):
    """Patch 14 / 16 at an 8 x 8 token grid (registers, LayerScale, RoPE in every stage); sizes divide the patch."""
    sizes = {
        "encoder.arch": arch,
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
    log = job("run_all", f"output={tmp_path / 'out'}", *args)
    assert "mIoU" in log and "stage wall times" in log
