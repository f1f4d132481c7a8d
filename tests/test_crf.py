import numpy as np
import torch

from transfgu_dist.method.crf import CRFConfig, dense_crf


def test_crf_snaps_noisy_labels_to_image_edges_and_keeps_shape():
    image = np.zeros((12, 10, 3), np.uint8)
    image[:, 5:] = 255  # two flat regions
    logits = torch.zeros(2, 12, 10)
    logits[0, :, :5] = logits[1, :, 5:] = 1.0  # weak evidence for the true split
    logits[0, 3, 7] = logits[1, 3, 2] = 3.0  # two isolated wrong pixels
    before = logits.argmax(0)
    q = dense_crf(image, logits, CRFConfig())
    assert q.shape == logits.shape and torch.allclose(q.sum(0), torch.ones(12, 10))
    after = q.argmax(0)
    truth = torch.zeros(12, 10, dtype=torch.long)
    truth[:, 5:] = 1
    assert (before != truth).sum() == 2 and (after != before).any() and torch.equal(after, truth)


def test_crf_without_pairwise_weights_is_the_softmax():
    logits = torch.randn(3, 6, 7)
    q = dense_crf(np.zeros((6, 7, 3), np.uint8), logits, CRFConfig(w_bilateral=0.0, w_spatial=0.0))
    torch.testing.assert_close(q, logits.softmax(0))
