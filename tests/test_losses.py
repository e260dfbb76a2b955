"""The losses against straightforward reference implementations."""

import math

import pytest
import torch
import torch.nn.functional as F

import rine_plus_ssca as rps


def supcon_reference(features, labels, temperature, base_temperature=0.07):
    """Khosla et al. single-view SupCon written as a plain loop (float64).

    For anchor i with positives P(i) = {p != i: y_p = y_i}:
        l_i = -(T / T_base) * mean_{p in P(i)} log( exp(s_ip / T) / sum_{a != i} exp(s_ia / T) )
    anchors without positives give 0 but count in the mean over all anchors.
    """
    z = F.normalize(features.double(), dim=1)
    n = z.shape[0]
    total = z.new_zeros(())
    for i in range(n):
        positives = [p for p in range(n) if p != i and labels[p] == labels[i]]
        if not positives:
            continue
        denominator = sum(torch.exp(z[i] @ z[a] / temperature) for a in range(n) if a != i)
        terms = [torch.log(torch.exp(z[i] @ z[p] / temperature) / denominator) for p in positives]
        total = total - (temperature / base_temperature) * sum(terms) / len(terms)
    return total / n


LABEL_PATTERNS = {
    "balanced": [0, 1, 0, 1, 0, 1, 0, 1],
    "imbalanced": [0, 0, 0, 0, 0, 0, 1, 1],
    "singleton_class": [0, 0, 1, 1, 2, 0, 1],
    "all_same": [1, 1, 1, 1, 1],
    "no_positives_at_all": [0, 1, 2, 3],
}


@pytest.mark.parametrize("pattern", list(LABEL_PATTERNS))
@pytest.mark.parametrize("temperature", [0.07, 0.1, 0.5])
def test_supcon_matches_reference_loop(pattern, temperature):
    labels = torch.tensor(LABEL_PATTERNS[pattern])
    seed = list(LABEL_PATTERNS).index(pattern) * 10 + int(temperature * 100)  # deterministic per case
    features = torch.randn(len(labels), 16, generator=torch.Generator().manual_seed(seed)) * 3.0

    got_features = features.clone().requires_grad_(True)
    got = rps.supervised_contrastive_loss(got_features, labels, temperature=temperature)
    ref_features = features.double().requires_grad_(True)
    expected = supcon_reference(ref_features, labels, temperature)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected.detach(), rtol=1e-4, atol=1e-5)

    # The gradients agree too (what training actually uses).
    got.backward()
    if expected.requires_grad:
        expected.backward()
        torch.testing.assert_close(got_features.grad.double(), ref_features.grad, rtol=1e-3, atol=1e-5)
    else:  # no anchor has a positive: the loss is the constant 0
        assert got.item() == 0.0 and torch.count_nonzero(got_features.grad) == 0


def test_supcon_ignores_feature_scale_and_label_dtype():
    labels = torch.tensor([0, 1, 1, 0, 1])
    features = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))
    base = rps.supervised_contrastive_loss(features, labels)
    torch.testing.assert_close(rps.supervised_contrastive_loss(features * 37.0, labels), base)
    # Training passes float labels (from the loader); the loss must not depend on that.
    torch.testing.assert_close(rps.supervised_contrastive_loss(features, labels.float()), base)


@pytest.mark.parametrize("batch,labels", [
    ("one_class", [1, 1, 1, 1]),
    ("one_image", [0]),
    ("identical_features", [0, 0, 1, 1]),
])
def test_supcon_is_finite_in_degenerate_batches(batch, labels):
    labels = torch.tensor(labels)
    features = torch.randn(len(labels), 8, generator=torch.Generator().manual_seed(1))
    if batch == "identical_features":
        features = features[:1].repeat(len(labels), 1)
    features.requires_grad_(True)
    loss = rps.supervised_contrastive_loss(features, labels)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()  # must keep the graph (a constant without grad_fn would raise here)
    assert features.grad is not None and torch.isfinite(features.grad).all()
    if batch == "one_image":
        assert loss.item() == 0.0


def test_supcon_is_float32_under_bf16_autocast():
    labels = torch.tensor([0, 1, 0, 1, 1, 0])
    features = torch.randn(6, 16, generator=torch.Generator().manual_seed(2)).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = rps.supervised_contrastive_loss(features, labels)
    assert loss.dtype == torch.float32
    expected = supcon_reference(features.float(), labels, 0.07)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-4, atol=1e-5)


def test_bce_loss_is_summed_not_averaged():
    logits = torch.randn(7, generator=torch.Generator().manual_seed(3)) * 2
    labels = torch.tensor([0, 1, 1, 0, 1, 0, 0], dtype=torch.float32)
    p = torch.sigmoid(logits.double())
    manual = -(labels * torch.log(p) + (1 - labels) * torch.log(1 - p)).sum()
    got = rps.bce_loss_sum(logits, labels)
    assert got.dim() == 0
    torch.testing.assert_close(got.double(), manual, rtol=1e-5, atol=1e-5)
    mean = F.binary_cross_entropy_with_logits(logits, labels)
    torch.testing.assert_close(got, mean * len(labels))  # sum = batch * mean, as in RINE's code


def test_bce_loss_is_float32_for_bf16_logits():
    logits = torch.randn(4).bfloat16()
    labels = torch.tensor([0, 1, 1, 0])
    got = rps.bce_loss_sum(logits, labels)
    assert got.dtype == torch.float32
    p = torch.sigmoid(logits.double())
    manual = -(labels * torch.log(p) + (1 - labels) * torch.log(1 - p)).sum()
    assert math.isclose(float(got), float(manual), rel_tol=1e-5)
