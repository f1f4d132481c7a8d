"""Each equation of the paper on tiny tensors, against values worked out by hand in the comments."""

import math

import pytest
import torch

from transfgu_dist.config import DecoderConfig, PseudoLabelConfig
from transfgu_dist.method.decoder import MaskTransformer
from transfgu_dist.method.gradcam import concept_similarity, response_maps, top_mass_mask
from transfgu_dist.method.losses import cross_entropy, diversity_loss, peer_loss, total_loss, uncertainty_loss
from transfgu_dist.method.targets import bootstrapped, hard_labels, minmax, soft_targets, split_fg_bg, with_background


def test_eq5_similarity_dot_and_cosine():
    x = torch.tensor([[1.0, 2.0, 0.0, 0.0]])
    s = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 1.0, 0.0]])
    # dot / sqrt(d=4): [1/2, 2/2]
    assert torch.allclose(concept_similarity(x, s, "dot"), torch.tensor([[0.5, 1.0]]))
    # cosine: 1/sqrt(5), 2/(sqrt(5) sqrt(2))
    assert torch.allclose(concept_similarity(x, s, "cosine"), torch.tensor([[0.447214, 0.632456]]), atol=1e-6)


def test_top_mass_mask():
    # [4,3,2,1]/10 sorted ascending 1,2,3,4 -> cumulative .1,.3,.6,1.0; keep where > 0.2: drops only the 1
    x = torch.tensor([[4.0, 3.0], [2.0, 1.0]])
    assert top_mass_mask(x, 0.8).tolist() == [[True, True], [True, False]]
    # [6,3,.5,.5]/10: cumulative .05,.10,.40,1.0 -> keep 3 and 6
    y = torch.tensor([[0.5, 6.0], [3.0, 0.5]])
    assert top_mass_mask(y, 0.8).tolist() == [[False, True], [True, False]]


ATTN = torch.tensor([[[0.2, 0.4], [0.1, 0.3]]])  # A_L^cls, (B=1, 2, 2)
GRAD = torch.tensor([[[[-0.3, 0.1], [-0.1, 0.0]]]])  # d loss / dA for K=1, (1, 1, 2, 2)


def test_eq7_paper_response():
    # M = A - dL/dA = [[.2+.3, .4-.1], [.1+.1, .3-0]]
    m = response_maps(ATTN, GRAD, PseudoLabelConfig(response="paper"))
    assert torch.allclose(m, torch.tensor([[[[0.5, 0.3], [0.2, 0.3]]]]))


def test_eq7_reference_response():
    # A/max = [[.5, 1], [.25, .75]]; evidence relu(-g) = [[.3, 0], [.1, 0]]; its top-80% mass: sorted 0,0,.1,.3
    # -> cumulative 0,0,.25,1 -> both .1 and .3 kept. Sum [[.8, 1], [.35, .75]], zeroed where g > 0 (top right).
    m = response_maps(ATTN, GRAD, PseudoLabelConfig(response="reference", top_mass=0.8))
    assert torch.allclose(m, torch.tensor([[[[0.8, 0.0], [0.35, 0.75]]]]))


def test_eq8_background_channel():
    maps = torch.tensor([[[[0.05, 0.3]], [[0.02, 0.1]]]])  # (1, K=2, 1, 2)
    # max over k: [.05, .3] -> ReLU(.1 - max) = [.05, 0]
    out = with_background(maps, 0.1)
    assert out.shape == (1, 3, 1, 2)
    assert torch.allclose(out[0, 0], torch.tensor([[0.05, 0.0]]))
    assert torch.equal(out[:, 1:], maps)


def test_minmax_and_fg_bg_split():
    maps = torch.tensor([[[[0.0, 2.0]], [[4.0, 8.0]]]])
    assert torch.allclose(minmax(maps), torch.tensor([[[[0.0, 0.25]], [[0.5, 1.0]]]]))
    fg = torch.tensor([[[True, False]]])
    is_fg = torch.tensor([True, False])  # concept 0 foreground, concept 1 background
    out = split_fg_bg(maps, fg, is_fg)
    # pixel 0 is foreground: the background concept is excluded; pixel 1 is background: the fg concept is
    assert out[0, 1, 0, 0] == float("-inf") and out[0, 0, 0, 1] == float("-inf")
    assert out[0, 0, 0, 0] == 0.0 and out[0, 1, 0, 1] == 8.0
    assert hard_labels(out).tolist() == [[[0, 1]]]
    # soft_targets chains min-max then the background channel: max_k of [0,.5] and [.25,1] -> bg [.1, 0]
    st = soft_targets(maps, norm="minmax", t_bg=0.6)
    assert torch.allclose(st[0, 0], torch.tensor([[0.1, 0.0]]))


def test_eq6_eq11_argmax_and_upsample():
    scores = torch.tensor([[[[0.9, 0.1]], [[0.2, 0.7]]]])  # (1, 2, 1, 2): labels [0, 1]
    assert hard_labels(scores, size=(2, 4)).tolist() == [[[0, 0, 1, 1], [0, 0, 1, 1]]]


def test_eq12_bootstrapped_labels():
    scores = torch.tensor([[[[0.2]], [[0.6]]]])
    teacher = torch.log(torch.tensor([[[[1.0]], [[3.0]]]]))  # softmax -> [.25, .75]
    # 0.5 (.2 + .25) = .225, 0.5 (.6 + .75) = .675
    assert torch.allclose(bootstrapped(scores, teacher).flatten(), torch.tensor([0.225, 0.675]))


LOGITS = torch.log(torch.tensor([1.0, 2.0, 5.0])).view(1, 3, 1, 1)  # softmax = [.125, .25, .625]


def test_eq9_cross_entropy():
    assert math.isclose(float(cross_entropy(LOGITS, torch.tensor([[[2]]]))), -math.log(0.625), rel_tol=1e-6)
    # ignored pixels do not count
    two = torch.cat([LOGITS, LOGITS], dim=3)
    assert math.isclose(float(cross_entropy(two, torch.tensor([[[2, -1]]]))), -math.log(0.625), rel_tol=1e-6)


def test_eq13_peer_loss():
    # perm [1,2,0]: M'_0 = M_1, M'_1 = M_2, M'_2 = M_0. argmax M = 2 -> argmax M' = 1.
    # CE(P, 2) - 0.1 CE(P, 1) = -ln .625 + 0.1 ln .25 = 0.470004 - 0.138629
    loss = peer_loss(LOGITS, torch.tensor([[[2]]]), 0.1, torch.tensor([1, 2, 0]))
    assert math.isclose(float(loss), 0.331374, abs_tol=1e-5)


def test_eq14_uncertainty_loss():
    logits = torch.cat([LOGITS, torch.zeros(1, 3, 1, 1)], dim=3)
    # gaps: .625 - .25 = .375 and 0 -> 1 - .1875
    assert math.isclose(float(uncertainty_loss(logits)), 0.8125, rel_tol=1e-6)
    # only the first pixel valid -> 1 - .375
    assert math.isclose(float(uncertainty_loss(logits, valid=torch.tensor([[[True, False]]]))), 0.625, rel_tol=1e-6)
    # background channel dropped: softmax of [ln2, ln5] = [2/7, 5/7], gap 3/7; other pixel 0 -> 1 - 3/14
    assert math.isclose(float(uncertainty_loss(logits, skip_channel0=True)), 1 - 3 / 14, rel_tol=1e-6)


def test_eq15_diversity_loss():
    c = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    # C C^T = [[1,0,1],[0,1,1],[1,1,2]], sum 8 -> 1 + 8 / (9 sqrt 2)
    assert math.isclose(float(diversity_loss(c, "paper")), 1 + 8 / (9 * math.sqrt(2)), rel_tol=1e-6)
    # pair cosines 0, 1/sqrt2, 1/sqrt2 -> mean of (1 + cos) = (1 + 2 (1 + .707107)) / 3
    assert math.isclose(float(diversity_loss(c, "reference")), (1 + 2 * (1 + 1 / math.sqrt(2))) / 3, rel_tol=1e-6)


def test_eq16_total_loss():
    terms = total_loss(torch.tensor(0.5), torch.tensor(1.2), torch.tensor(0.4), omega1=1.0, omega2=0.3)
    assert math.isclose(float(terms.total), 0.5 + 1.2 + 0.3 * 0.4, rel_tol=1e-6)


@pytest.mark.parametrize(
    "head,expected", [("scaled_dot", [2 / math.sqrt(2), -2 / math.sqrt(2)]), ("cosine_ln", [1.0, -1.0])]
)
def test_eq2_masks(head, expected):
    dec = MaskTransformer(2, 2, DecoderConfig(n_layers=0, n_heads=1, dropout=0.0, mask_head=head))
    with torch.no_grad():
        dec.proj_dec.weight.copy_(torch.eye(2)), dec.proj_dec.bias.zero_()
        dec.proj_patch.copy_(torch.eye(2)), dec.proj_classes.copy_(torch.eye(2))
        dec.cls_emb.copy_(torch.tensor([[[2.0, 0.0], [0.0, 2.0]]]))
    # LayerNorm: patch [1,-1] -> [1,-1]; classes [2,0] -> [1,-1], [0,2] -> [-1,1]
    # scaled_dot: [1,-1].[1,-1]/sqrt2 = 2/sqrt2, and -2/sqrt2. cosine: 1, -1; LayerNorm over K=2 keeps [1,-1]
    out = dec(torch.tensor([[[[1.0, -1.0]]]]))
    assert out.logits.shape == (1, 2, 1, 1)
    assert torch.allclose(out.logits.flatten(), torch.tensor(expected), atol=1e-4)
    assert torch.allclose(out.class_emb[0], torch.tensor([[1.0, -1.0], [-1.0, 1.0]]), atol=1e-4)
