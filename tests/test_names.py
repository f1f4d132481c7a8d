"""Cluster names (names=) from YAML or CSV, and the label-free evaluate result and NaN-free metrics."""

import pytest

from transfgu_dist.inference.names import read_names
from transfgu_dist.io.stage_output import StageOutput
from transfgu_dist.pipeline.stages.evaluate import evaluate_result


@pytest.mark.parametrize(
    "name,text",
    [
        ("n.yaml", "0: sky\n3: person\n"),
        ("n.yml", "{3: person, 0: sky}"),
        ("n.csv", "cluster,name\n0,sky\n3,person\n"),
        ("n.csv", "3, person\n0,sky\n\n"),
    ],
)
def test_names_from_yaml_or_csv(tmp_path, name, text):
    (tmp_path / name).write_text(text)
    assert read_names(str(tmp_path / name), 4) == ["sky", "cluster 1", "cluster 2", "person"]


def test_names_as_a_list_and_mistakes(tmp_path):
    (tmp_path / "l.yaml").write_text("[sky, grass]")
    assert read_names(str(tmp_path / "l.yaml"), 3) == ["sky", "grass", "cluster 2"]
    (tmp_path / "big.csv").write_text("0,sky\n9,person\n")
    with pytest.raises(ValueError, match=r"big.csv: cluster id 9: the model has clusters 0 to 7"):
        read_names(str(tmp_path / "big.csv"), 8)
    (tmp_path / "bad.yaml").write_text("sky: 0\n")
    with pytest.raises(ValueError, match=r"bad.yaml: expected a YAML mapping of cluster id -> name .* 'sky'"):
        read_names(str(tmp_path / "bad.yaml"), 8)
    with pytest.raises(ValueError, match="none.csv: does not exist"):
        read_names(str(tmp_path / "none.csv"), 8)


def test_evaluate_result_never_carries_nan_or_none(tmp_path):
    manifest = {
        "metrics": {
            "miou": 0.25,
            "pixel_accuracy": 0.5,
            "per_class_iou": {"sky": 0.5, "cat (pet)": 0.0, "boat": None},
            "table3": {"pseudo_labels": None, "round0_student": float("nan"), "student": 0.25},
        }
    }
    result = evaluate_result(StageOutput(str(tmp_path)), manifest, 3)
    assert result.metrics == {
        "miou": 0.25,
        "pixel_accuracy": 0.5,
        "iou/sky": 0.5,
        "iou/cat _pet_": 0.0,
        "table3/student": 0.25,
    }
    unscored = {
        "metrics": {
            "scored": False,
            "clusters": [{"cluster": 0, "pixel_share": 0.75}, {"cluster": 1, "pixel_share": 0.25}],
        }
    }
    result = evaluate_result(StageOutput(str(tmp_path)), unscored, 3)
    assert result.metrics == {"pixel_share/cluster_0": 0.75, "pixel_share/cluster_1": 0.25}
    assert result.tags == {"scored": "no labels"}
