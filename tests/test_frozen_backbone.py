"""The CLIP backbone is frozen: no gradient, eval mode, not optimised, not checkpointed."""

import pytest
import torch

import rine_plus_ssca as rps
from conftest import clip_pixels, save_tiny_backbone, small_config


@pytest.fixture(scope="module")
def dropout_backbone(tmp_path_factory):
    # Attention dropout makes "the backbone stays in eval mode" observable: in train mode two
    # forward passes of the same images would differ.
    return save_tiny_backbone(tmp_path_factory.mktemp("dropout_backbone") / "clip", seed=1, attention_dropout=0.5)


@pytest.fixture
def model(dropout_backbone):
    torch.manual_seed(0)
    return rps.RINEPlusSSCA(small_config(dropout_backbone))


def backbone_params(model):
    return [p for name, p in model.named_parameters() if name.startswith("backbone.")]


def training_loss(model, pixels):
    labels = torch.tensor([0.0, 1.0, 0.0, 1.0])
    logits, features = model(pixels)
    return rps.bce_loss_sum(logits, labels) + 0.2 * rps.supervised_contrastive_loss(features, labels)


def test_backbone_gets_no_gradient(model):
    assert backbone_params(model), "the model should contain the backbone's parameters"
    assert all(not p.requires_grad for p in backbone_params(model))
    model.train()
    training_loss(model, clip_pixels(4)).backward()
    assert all(p.grad is None for p in backbone_params(model))
    assert all(p.grad is not None for p in model.trainable_parameters())


def test_backbone_stays_in_eval_mode_after_train(model):
    model.train()
    assert model.training and model.classifier.training  # the head does train
    assert not model.backbone.training
    assert all(not m.training for m in model.backbone.modules())
    pixels = clip_pixels(2, seed=4)
    with torch.no_grad():
        first, _ = model.backbone(pixels)
        second, _ = model.backbone(pixels)
    torch.testing.assert_close(first, second)  # no dropout active inside CLIP
    assert not first.requires_grad


def test_optimizer_holds_only_the_head_and_backbone_is_unchanged_by_a_step(model):
    optimizer = torch.optim.Adam(model.trainable_parameters(), lr=1e-2)
    optimised = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert not optimised & {id(p) for p in backbone_params(model)}
    # Everything that can learn is optimised, and nothing else.
    assert optimised == {id(p) for p in model.parameters() if p.requires_grad}

    backbone_before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    head_before = {k: v.clone() for k, v in model.trainable_state_dict().items()}
    model.train()
    optimizer.zero_grad()
    training_loss(model, clip_pixels(4)).backward()
    optimizer.step()
    for key, value in model.backbone.state_dict().items():
        torch.testing.assert_close(value, backbone_before[key], rtol=0, atol=0, msg=key)
    assert not torch.equal(model.classifier.weight.detach(), head_before["classifier.weight"])


def test_trainable_state_dict_excludes_the_backbone(model):
    state = model.trainable_state_dict()
    assert state and not [k for k in state if k.startswith("backbone.")]
    expected = {k for k in model.state_dict() if not k.startswith("backbone.")}
    assert set(state) == expected  # includes BatchNorm statistics, needed to reproduce eval outputs
    assert all(v.device.type == "cpu" and not v.requires_grad for v in state.values())
    n_backbone = sum(p.numel() for p in backbone_params(model))
    n_saved = sum(v.numel() for v in state.values())
    assert n_saved > 0 and "classifier.weight" in state
    assert sum(p.numel() for p in model.trainable_parameters()) <= n_saved
    assert n_backbone > 0
