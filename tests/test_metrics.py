import json

import numpy as np
import pytest
import torch

from transfgu_dist.io.label_maps import IGNORE
from transfgu_dist.method.metrics import confusion_matrix, hungarian_match, scores_from_confusion


def test_permuted_perfect_prediction_scores_one():
    gt = np.array([[0, 0, 1, 1], [2, 2, 2, 0]])
    cluster_of_class = np.array([2, 0, 1])  # class 0 -> cluster 2, 1 -> 0, 2 -> 1
    pred = cluster_of_class[gt]
    scores = scores_from_confusion(confusion_matrix(gt, pred, n_gt=3, n_pred=3, ignore_index=IGNORE))
    assert scores.miou == 1.0
    assert scores.pixel_accuracy == 1.0
    # cluster 0 <- class 1, cluster 1 <- class 2, cluster 2 <- class 0
    np.testing.assert_array_equal(scores.matching, [1, 2, 0])
    np.testing.assert_array_equal(scores.confusion, np.diag([3, 2, 3]))


def test_hand_worked_3x3():
    conf = np.array(
        [  # p0 p1 p2
            [2, 8, 0],  # g0
            [6, 1, 1],  # g1
            [0, 3, 4],  # g2
        ]
    )
    # All 6 one-to-one assignments (g0,g1,g2 -> clusters):
    #   (p1,p0,p2)=8+6+4=18  (p1,p2,p0)=8+1+0=9  (p0,p1,p2)=2+1+4=7
    #   (p0,p2,p1)=2+1+3=6   (p2,p0,p1)=0+6+3=9  (p2,p1,p0)=0+1+0=1  -> best 18, unique.
    # Per cluster: p0 -> g1, p1 -> g0, p2 -> g2.
    np.testing.assert_array_equal(hungarian_match(conf), [1, 0, 2])
    # Columns reordered to gt ids (class 0 = p1, class 1 = p0, class 2 = p2):
    #   [[8, 2, 0], [1, 6, 1], [3, 0, 4]]
    # IoU0 = 8 / (10 + 12 - 8) = 4/7;  IoU1 = 6 / (8 + 8 - 6) = 3/5;  IoU2 = 4 / (7 + 5 - 4) = 1/2
    # mIoU = (4/7 + 3/5 + 1/2) / 3 = 39/70;  accuracy = (8 + 6 + 4) / 25 = 18/25
    scores = scores_from_confusion(conf)
    np.testing.assert_array_equal(scores.confusion, [[8, 2, 0], [1, 6, 1], [3, 0, 4]])
    np.testing.assert_allclose(scores.per_class_iou, [4 / 7, 3 / 5, 1 / 2])
    assert scores.miou == pytest.approx(39 / 70)
    assert scores.pixel_accuracy == pytest.approx(18 / 25)


def test_ignore_index_and_out_of_range_gt_not_counted():
    gt = torch.tensor([[0, 0, 255], [1, 1, 1], [7, 255, 0]])
    pred = torch.tensor([[2, 2, 0], [0, 0, 1], [1, 1, 2]])
    # counted: g0->p2 (x3), g1->p0 (x2), g1->p1 (x1); the two 255 pixels and the 7 are dropped
    conf = confusion_matrix(gt, pred, n_gt=2, n_pred=3, ignore_index=IGNORE)
    assert conf.dtype == np.int64
    np.testing.assert_array_equal(conf, [[0, 0, 3], [2, 1, 0]])


def test_more_clusters_than_classes():
    conf = np.array(
        [  # p0 p1 p2
            [5, 0, 3],  # g0
            [0, 4, 2],  # g1
        ]
    )
    # best assignment g0->p0, g1->p1 (5+4=9); p2 is unmatched, its 5 pixels count as wrong.
    # IoU0 = 5 / (8 + 5 - 5) = 5/8;  IoU1 = 4 / (6 + 4 - 4) = 2/3;  mIoU = (5/8 + 2/3)/2 = 31/48
    # accuracy = 9 / 14
    scores = scores_from_confusion(conf)
    np.testing.assert_array_equal(scores.matching, [0, 1, -1])
    np.testing.assert_array_equal(scores.confusion, [[5, 0], [0, 4]])
    assert scores.miou == pytest.approx(31 / 48)
    assert scores.pixel_accuracy == pytest.approx(9 / 14)


def test_absent_class_is_nan_and_excluded_from_miou():
    conf = confusion_matrix(np.array([0, 0, 1]), np.array([0, 0, 1]), n_gt=3, n_pred=3, ignore_index=IGNORE)
    scores = scores_from_confusion(conf)
    assert np.isnan(scores.per_class_iou[2])
    assert scores.miou == 1.0
    d = json.loads(json.dumps(scores.to_dict(), allow_nan=False))
    assert d["per_class_iou"] == [1.0, 1.0, None]
    assert d["matching"] == [0, 1, 2]


def test_prediction_out_of_range_rejected():
    with pytest.raises(ValueError, match="pred values"):
        confusion_matrix(np.array([0, 1]), np.array([0, 3]), n_gt=2, n_pred=3, ignore_index=IGNORE)
