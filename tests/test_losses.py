import math

import torch

import pytest

from training.losses import contrastive_loss, distill_loss, keep_rank_loss, pair_loss


def test_contrastive_loss_known_values():
    e = torch.eye(3)
    zero = torch.tensor(0.0)  # logit scale exp(0) = 1
    # Logits are the identity: each row's cross-entropy is log(e + 2) - 1.
    expected = math.log(math.e + 2) - 1
    assert contrastive_loss(e, e, zero).item() == pytest_approx(expected)
    # A hard negative equal to the true caption adds one more logit of 1 on the image side only.
    with_hard = contrastive_loss(e, e, zero, hard_text=e)
    i2t = math.log(2 * math.e + 4) - 1  # the hard row adds e + 1 + 1
    assert with_hard.item() == pytest_approx(0.5 * (i2t + expected))


def test_pair_loss_scores_each_image_against_its_own_hard_negatives_only():
    # Two images in 2-D, K = 2 negatives each, laid out as fresh_hard_negatives does: negative j of image i
    # at row j * B + i.
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    hard = torch.tensor([[0.0, 1.0], [1.0, 0.0], [-1.0, 0.0], [0.6, 0.8]])  # j=0: i=0, i=1; j=1: i=0, i=1
    scale = torch.tensor(math.log(2.0))  # logits are twice the cosines
    # image 0: true 1, its negatives 0 and -1; image 1: true 1, negatives 0 and 0.8
    row0 = math.log(math.exp(2) + math.exp(0) + math.exp(-2)) - 2
    row1 = math.log(math.exp(2) + math.exp(0) + math.exp(1.6)) - 2
    assert pair_loss(img, txt, scale, hard).item() == pytest_approx(0.5 * (row0 + row1))
    # An image's own negatives form a set; handing image 0 image 1's negatives changes the loss.
    assert pair_loss(img, txt, scale, hard[[2, 3, 0, 1]]).item() == pytest_approx(0.5 * (row0 + row1))
    assert pair_loss(img, txt, scale, hard[[1, 0, 3, 2]]).item() != pytest_approx(0.5 * (row0 + row1))
    with pytest.raises(ValueError, match="hard negatives"):
        pair_loss(img, txt, scale, hard[:3])


def test_distill_loss():
    a = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    assert distill_loss(a, a).item() == pytest_approx(0.0)
    assert distill_loss(a, -a).item() == pytest_approx(2.0)


def test_keep_rank_loss_is_cross_entropy_to_the_normalised_saliency():
    saliency = torch.tensor([[1.0, 3.0, 0.0, 4.0]])
    q = saliency / 8
    logits = torch.tensor([[0.2, -0.1, 0.5, 1.0]])
    expected = -(q * torch.log_softmax(logits, 1)).sum().item()
    assert keep_rank_loss(logits, saliency).item() == pytest_approx(expected)
    # Its minimum is at logits = log(saliency) + c: the predictor learns the ranking, not a scale.
    best = keep_rank_loss(torch.log(torch.tensor([[1.0, 3.0, 1e-9, 4.0]])) + 7, saliency)
    assert best.item() < keep_rank_loss(logits, saliency).item()
    assert best.item() == pytest_approx(-(q[q > 0] * q[q > 0].log()).sum().item())


def pytest_approx(x):
    import pytest

    return pytest.approx(x, abs=1e-5)
