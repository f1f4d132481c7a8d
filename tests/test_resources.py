"""What the stages ask Ray for (the `resources` section, train.num_workers / use_gpu), and the driver's lines on a
failed and restarted worker group."""

from __future__ import annotations

import pytest

from transfgu_dist.config import ConfigError, load_config, worker_range
from transfgu_dist.io.image_pool import actor_pool
from transfgu_dist.pipeline.console import Recoveries
from transfgu_dist.pipeline.stages.bootstrap import scaling_config


def test_real_data_presets_ask_for_gpus_the_demo_for_what_is_there():
    coco = load_config(overrides=["preset=cocostuff27"])
    assert (coco.resources.actor_gpus, coco.resources.cluster_gpu, coco.train.use_gpu) == (1.0, True, True)
    demo = load_config()
    assert (demo.resources.actor_gpus, demo.resources.cluster_gpu, demo.train.use_gpu) == (None, None, None)


def test_encoder_pool_autoscales_between_min_and_max():
    cfg = load_config(overrides=["preset=cocostuff27", "resources.actor_gpus=0.5", "resources.pool_max=6"])
    pool = actor_pool(cfg.resources)
    assert (pool["compute"].min_size, pool["compute"].max_size) == (1, 6)
    assert (pool["num_gpus"], pool["num_cpus"]) == (0.5, 1)
    assert "max_restarts" not in pool  # Ray Data's default for pool actors, -1, applies


def test_elastic_scaling_config():
    fixed = scaling_config(load_config(overrides=["preset=voc", "train.num_workers=2"]))
    assert (fixed.num_workers, fixed.use_gpu, fixed.resources_per_worker) == (2, True, {"CPU": 1.0})
    elastic = scaling_config(load_config(overrides=["preset=voc", "train.num_workers=[2, 4]"]))
    assert elastic.elasticity_enabled and (elastic.min_workers, elastic.max_workers) == (2, 4)
    assert worker_range(3) == (3, 3) and worker_range((1, 4)) == (1, 4)


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.num_workers=[3, 1]", "key 'train.num_workers' = [3, 1]: expected an integer or [min, max] with 1 <="),
        ("train.num_workers=[1, 2, 3]", "key 'train.num_workers' = [1, 2, 3]: expected an integer or [min, max]"),
        ("train.num_workers=0", "key 'train.num_workers' = 0: expected an integer >= 1"),
        ("resources.pool_min=5", "keys 'resources.pool_min' = 5, 'resources.pool_max' = 4: expected 1 <= min <= max"),
        ("resources.actor_gpus=-1", "key 'resources.actor_gpus' = -1.0: expected a number >= 0 (or null: auto)"),
        ("resources.decode_cpus=0", "key 'resources.decode_cpus' = 0.0: expected a number > 0"),
        ("resources.pool_max=many", "key 'resources.pool_max': expected int, got 'many'"),
    ],
)
def test_resource_mistakes_name_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=[override])
    assert message in str(e.value) and "\n" not in str(e.value)


def report(epoch: int, resumed_at: int = 0, started: float = 0.0, size: int = 2) -> dict:
    return {"global_epoch": epoch, "resumed_at": resumed_at, "group_started_at": started, "world_size": size}


def test_recovery_lines_say_what_was_lost_and_redone():
    seen = Recoveries(epochs=6)
    assert seen.see(report(0), 100.0) is None and seen.see(report(1), 110.0) is None
    lost = {"lost": {1: "ActorDiedError: the actor died unexpectedly"}}
    assert seen.see(lost, 120.0) == (
        "bootstrap: worker group failed after epoch 2/6 (rank 1: ActorDiedError: the actor died unexpectedly); "
        "Ray Train restarts it from the last checkpoint"
    )
    # the last checkpoint was epoch 1's (resumed_at 1): epoch 2 (index 1) is trained again
    assert seen.see(report(1, resumed_at=1, started=131.5, size=1), 140.0) == (
        "bootstrap: resumed at epoch 2/6 with 1 workers, 11.5 s after the failure; epochs redone: 1"
    )
    assert seen.see(report(2, resumed_at=1, started=131.5, size=1), 150.0) is None
