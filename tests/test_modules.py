"""Each module on its own: shapes, gradients, and the properties DESIGN.md asks for."""

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.fft import dctn

import rine_plus_ssca as rps
from conftest import clip_pixels


def assert_all_params_get_gradient(module, loss):
    """Every parameter of `module` receives a finite, non-zero gradient from `loss`."""
    module.zero_grad(set_to_none=True)
    loss.backward()
    for name, p in module.named_parameters():
        assert p.grad is not None, f"no gradient reached {name}"
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"zero gradient at {name}"


def random_projection_loss(output, seed=1):
    # A random weighting: a plain .sum() gives exactly zero gradient to BatchNorm's affine
    # weight in training mode, which would hide real problems.
    weights = torch.randn(output.shape, generator=torch.Generator().manual_seed(seed))
    return (output * weights).sum()


# --------------------------------------------------------------------------- BlockDCT

def test_block_dct_shape_and_gradients():
    dct = rps.BlockDCT()
    out = dct(clip_pixels(2))
    assert out.shape == (2, 192, 28, 28)
    assert out.dtype == torch.float32
    assert_all_params_get_gradient(dct, random_projection_loss(out))


def _dct_magnitudes(dct, pixels):
    """|DCT coefficient| recovered from BlockDCT's output (log1p then BatchNorm).

    A fresh BatchNorm in eval mode is the identity up to sqrt(1 + eps) (running mean 0,
    variance 1, weight 1, bias 0), so expm1 undoes the log exactly.
    """
    dct.eval()
    with torch.no_grad():
        out = dct(pixels.double().float()).double()
    return torch.expm1(out * math.sqrt(1 + dct.norm.eps))


def test_block_dct_is_an_orthonormal_transform():
    # The DCT is of 0-255 pixels (the CLIP normalisation undone). Energy of every 8x8 block and
    # colour is preserved (Parseval), and each coefficient matches an independent orthonormal
    # 2-D DCT-II (scipy) at channel c*64 + 8u + v.
    pixels = clip_pixels(2, seed=3, size=32)
    magnitudes = _dct_magnitudes(rps.BlockDCT(), pixels)  # [2,192,4,4]
    assert magnitudes.shape == (2, 192, 4, 4)
    std, mean = torch.tensor(rps.CLIP_STD).view(1, 3, 1, 1), torch.tensor(rps.CLIP_MEAN).view(1, 3, 1, 1)
    pixels_255 = (pixels.double() * std + mean) * 255
    blocks = pixels_255.unfold(2, 8, 8).unfold(3, 8, 8)  # [B,3,4,4,8,8]
    energy_in = (blocks ** 2).sum(dim=(-1, -2))  # [B,3,4,4]
    energy_out = (magnitudes.reshape(2, 3, 64, 4, 4) ** 2).sum(dim=2)
    torch.testing.assert_close(energy_out, energy_in, rtol=1e-4, atol=1e-2)

    reference = dctn(blocks.numpy(), type=2, norm="ortho", axes=(-2, -1))  # [B,3,4,4,u,v]
    reference = np.abs(reference).transpose(0, 1, 4, 5, 2, 3).reshape(2, 192, 4, 4)
    np.testing.assert_allclose(magnitudes.numpy(), reference, rtol=1e-4, atol=1e-3)


def test_block_dct_stays_float32_under_bf16_autocast():
    dct = rps.BlockDCT()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = dct(clip_pixels(2).bfloat16())
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


# --------------------------------------------------------------------------- DCTConvBlock

@pytest.mark.parametrize("height,width", [(28, 28), (13, 17)])
def test_dct_conv_block_keeps_spatial_size(height, width):
    block = rps.speed_settings(rps.DCTConvBlock(192, 16))
    x = torch.randn(2, 192, height, width)
    out = block(x)
    assert out.shape == (2, 16, height, width)
    assert out.is_contiguous()  # NCHW again after the channels-last convolutions on the CPU
    assert_all_params_get_gradient(block, random_projection_loss(out))


def test_dct_conv_block_hands_an_nchw_gradient_back_to_the_batchnorm_before_it():
    # speed_settings (applied by build_model) runs the block channels-last on the CPU; the stem's
    # BatchNorm must still get an NCHW gradient (its backward is much slower on a channels-last
    # one), the block's own BatchNorm an NCHW input, and the values must be the plain block's.
    torch.manual_seed(0)
    plain, stem = rps.DCTConvBlock(192, 16), torch.nn.BatchNorm2d(192)
    block = rps.speed_settings(copy.deepcopy(plain))
    formats = []
    block.depthwise7.register_forward_pre_hook(lambda module, inputs: formats.append(inputs[0].is_contiguous()))
    block.norm.register_forward_pre_hook(lambda module, inputs: formats.append(inputs[0].is_contiguous()))
    stem_out = stem(torch.randn(2, 192, 28, 28))
    seen = []
    out = block(stem_out)
    assert formats == [False, True]  # channels-last inside, NCHW for the block's BatchNorm
    stem_out.register_hook(seen.append)  # runs after the block's own hook
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    assert seen[0].is_contiguous()
    reference_input = stem_out.detach().requires_grad_()
    reference_out = plain(reference_input)
    reference_out.backward(grad_out)
    torch.testing.assert_close(out, reference_out)
    torch.testing.assert_close(seen[0], reference_input.grad)


def test_build_model_applies_the_speed_settings(make_cfg):
    model = rps.build_model(make_cfg(), torch.device("cpu"))
    assert model.dct_conv._forward_pre_hooks and model.dct_conv.pointwise._forward_hooks


# --------------------------------------------------------------------------- SSCA

def test_ssca_keeps_shape_and_all_parameters_learn():
    torch.manual_seed(0)
    ssca = rps.SpectrumSpatialCollaborativeAttention(16, 28, 28)
    x = torch.randn(2, 16, 28, 28)
    out = ssca(x)
    assert out.shape == x.shape
    assert_all_params_get_gradient(ssca, random_projection_loss(out))
    assert ssca.spatial_path(x).shape == x.shape
    assert ssca.frequency_path(x).shape == x.shape


def test_ssca_forward_is_residual_plus_weighted_spatial_and_frequency_paths():
    # forward() folds the two weights into the small gate and filter for speed; the result
    # must still be x + w_s * spatial_path(x) + w_f * frequency_path(x), gradients included.
    torch.manual_seed(0)
    ssca = rps.SpectrumSpatialCollaborativeAttention(6, 12, 10)
    with torch.no_grad():
        ssca.spatial_weight.fill_(0.7)
        ssca.frequency_weight.fill_(-1.3)
    x = torch.randn(3, 6, 12, 10, requires_grad=True)
    reference = x + ssca.spatial_weight * ssca.spatial_path(x) + ssca.frequency_weight * ssca.frequency_path(x)
    loss_weights = torch.randn(reference.shape)
    reference_grads = torch.autograd.grad((reference * loss_weights).sum(), [x, *ssca.parameters()])
    out = ssca(x)
    grads = torch.autograd.grad((out * loss_weights).sum(), [x, *ssca.parameters()])
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    for got, expected in zip(grads, reference_grads):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_ssca_runs_in_bf16_autocast_on_a_non_power_of_two_map():
    # Half-precision FFTs only support power-of-two sizes; 28 is not one.
    torch.manual_seed(0)
    ssca = rps.SpectrumSpatialCollaborativeAttention(8, 28, 28)
    x = torch.randn(2, 8, 28, 28)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ssca(x.bfloat16())
    assert out.shape == x.shape and torch.isfinite(out.float()).all()
    with torch.no_grad():
        reference = ssca(x)
    torch.testing.assert_close(out.float(), reference, rtol=0.05, atol=0.05)


def _cosine_inputs(channels=4, size=28, low=1, high=11):
    """Two maps with the SAME per-channel mean (a constant per channel) and different frequency content."""
    rows = torch.arange(size, dtype=torch.float32)
    constant = torch.linspace(-0.7, 2.0, channels).view(1, channels, 1, 1)

    def pattern(k):
        return constant + torch.cos(2 * math.pi * k * rows / size).view(1, 1, size, 1).expand(1, channels, size, size)

    return pattern(low), pattern(high)


def _gains(y, x):
    """Per-channel least-squares gain of y on x, of y's AC part on x's AC part, and the misfit of y ~ w*x."""
    gain = (y * x).sum(dim=(2, 3)) / (x * x).sum(dim=(2, 3))
    ac_x, ac_y = x - x.mean(dim=(2, 3), keepdim=True), y - y.mean(dim=(2, 3), keepdim=True)
    ac_gain = (ac_y * ac_x).sum(dim=(2, 3)) / (ac_x * ac_x).sum(dim=(2, 3))
    misfit = (y - gain[..., None, None] * x).norm(dim=(2, 3)) / y.norm(dim=(2, 3))
    return gain[0], ac_gain[0], misfit[0]


def test_ssca_frequency_path_is_frequency_selective_not_a_channel_gate():
    # A per-channel scalar gate (x * w, even a data-dependent one computed from channel means)
    # treats these two inputs identically; a spectral attention must not.
    torch.manual_seed(0)
    ssca = rps.SpectrumSpatialCollaborativeAttention(4, 28, 28)
    x_low, x_high = _cosine_inputs()
    torch.testing.assert_close(x_low.mean(dim=(2, 3)), x_high.mean(dim=(2, 3)))
    with torch.no_grad():
        y_low, y_high = ssca.frequency_path(x_low), ssca.frequency_path(x_high)
    gain_low, ac_gain_low, misfit_low = _gains(y_low, x_low)
    gain_high, ac_gain_high, misfit_high = _gains(y_high, x_high)

    # Same channel, same mean, different frequency -> different gain.
    assert ((gain_low - gain_high).abs() > 0.01).all(), (gain_low, gain_high)
    assert ((ac_gain_low - ac_gain_high).abs() > 0.01).all(), (ac_gain_low, ac_gain_high)
    # Not x * w for any per-channel w, not even per input: the best w leaves a clear residual.
    assert (misfit_low > 0.02).all() and (misfit_high > 0.02).all(), (misfit_low, misfit_high)
    # One w per channel for both inputs fits even worse than that.
    x_both, y_both = torch.cat([x_low, x_high], dim=3), torch.cat([y_low, y_high], dim=3)
    assert (_gains(y_both, x_both)[2] > 0.02).all()


def test_ssca_learned_filter_can_suppress_high_frequencies_only():
    # The learned per-frequency filter can act as a low-pass: the high-frequency cosine is
    # removed while the low-frequency one passes; a channel gate could not separate them.
    torch.manual_seed(0)
    ssca = rps.SpectrumSpatialCollaborativeAttention(4, 28, 28)
    with torch.no_grad():
        rows = torch.arange(28)
        row_freq = torch.minimum(rows, 28 - rows).view(28, 1)
        col_freq = torch.arange(28 // 2 + 1).view(1, -1)
        low_pass = ((row_freq <= 3) & (col_freq <= 3)).float()
        ssca.frequency_filter.zero_()
        ssca.frequency_filter[..., 0] = low_pass  # real part; imaginary part 0
        x_low, x_high = _cosine_inputs()
        ac_gain_low = _gains(ssca.frequency_path(x_low), x_low)[1]
        ac_gain_high = _gains(ssca.frequency_path(x_high), x_high)[1]
    assert (ac_gain_low > 0.05).all(), ac_gain_low
    assert (ac_gain_high.abs() < 1e-4).all(), ac_gain_high


# --------------------------------------------------------------------------- fusion, gated MLP

def test_cross_attention_combination_shape_gradients_and_dependence_on_both_branches():
    torch.manual_seed(0)
    fusion = rps.CrossAttentionCombination(clip_dim=32, spectral_dim=16, n_blocks=4, dim=32, heads=4)
    z_clip, block_tokens = torch.randn(3, 32), torch.randn(3, 4, 32)
    z_dct, spectral_tokens = torch.randn(3, 16), torch.randn(3, 28 * 28, 16)
    out = fusion(z_clip, block_tokens, z_dct, spectral_tokens)
    assert out.shape == (3, 32)
    assert_all_params_get_gradient(fusion, random_projection_loss(out))
    with torch.no_grad():
        base = fusion(z_clip, block_tokens, z_dct, spectral_tokens)
        # It attends over the tokens, so changing one token of either branch changes the result.
        tokens = spectral_tokens.clone()
        tokens[:, 5] += 3.0
        assert not torch.allclose(fusion(z_clip, block_tokens, z_dct, tokens), base)
        blocks = block_tokens.clone()
        blocks[:, 2] += 3.0
        assert not torch.allclose(fusion(z_clip, blocks, z_dct, spectral_tokens), base)


@pytest.mark.parametrize("n_tokens", [1, 24, 784])
def test_one_query_attention_equals_torch_multihead_attention(n_tokens):
    # OneQueryAttention never projects the tokens (the key projection is folded into the query,
    # the value projection applied after the weighted sum); it must still compute exactly what
    # nn.MultiheadAttention computes with the same weights, whatever the key bias.
    torch.manual_seed(0)
    dim, kv_dim, heads, batch = 32, 24, 4, 3
    ours = rps.OneQueryAttention(dim, kv_dim, heads)
    reference = torch.nn.MultiheadAttention(dim, heads, kdim=kv_dim, vdim=kv_dim, batch_first=True)
    with torch.no_grad():
        reference.q_proj_weight.copy_(ours.query.weight)
        reference.k_proj_weight.copy_(ours.key.weight)
        reference.v_proj_weight.copy_(ours.value.weight)
        reference.in_proj_bias.copy_(torch.cat([ours.query.bias, 5 * torch.randn(dim), ours.value.bias]))
        reference.out_proj.weight.copy_(ours.out.weight)
        reference.out_proj.bias.copy_(ours.out.bias)
    query = torch.randn(batch, dim, requires_grad=True)
    tokens = (3 * torch.randn(batch, n_tokens, kv_dim)).requires_grad_()
    expected = reference(query.unsqueeze(1), tokens, tokens, need_weights=False)[0].squeeze(1)
    got = ours(query, tokens)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    loss_weights = torch.randn(batch, dim)
    torch.testing.assert_close(torch.autograd.grad((got * loss_weights).sum(), [query, tokens]),
                               torch.autograd.grad((expected * loss_weights).sum(), [query, tokens]), rtol=1e-4, atol=1e-5)


def test_gated_mlp_shape_gradients_and_residual():
    torch.manual_seed(0)
    mlp = rps.GatedMLP(32, 64, dropout=0.0)
    x = torch.randn(5, 32)
    out = mlp(x)
    assert out.shape == (5, 32)
    assert_all_params_get_gradient(mlp, random_projection_loss(out))
    with torch.no_grad():
        for p in mlp.out.parameters():  # with the output layer at zero only the residual remains
            p.zero_()
        torch.testing.assert_close(mlp(x), x)


# --------------------------------------------------------------------------- Q1/Q2 and TIE

def test_projection_mlp_structure_and_sharing_over_blocks():
    torch.manual_seed(0)
    q = rps.projection_mlp(64, 32, n_layers=3, dropout=0.5)
    layers = list(q)
    assert isinstance(layers[0], torch.nn.Dropout)
    linears = [m for m in layers if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 3 and linears[0].in_features == 64 and linears[-1].out_features == 32
    q.eval()
    tokens = torch.randn(2, 4, 64)
    together = q(tokens)
    one_by_one = torch.stack([q(tokens[:, i]) for i in range(4)], dim=1)  # one network for all blocks
    assert together.shape == (2, 4, 32)
    torch.testing.assert_close(together, one_by_one)


def test_tie_softmax_over_blocks_separately_for_each_channel():
    torch.manual_seed(0)
    alpha = torch.randn(1, 5, 7, requires_grad=True)
    tokens = torch.randn(3, 5, 7)
    weights = torch.softmax(alpha[0].detach(), dim=0)  # [blocks, channels]
    assert not torch.allclose(weights[:, 0], weights[:, 1])  # channels have their own weights
    expected = torch.einsum("nd,bnd->bd", weights, tokens)
    out = rps.importance_weighted_sum(tokens, alpha)
    torch.testing.assert_close(out, expected)
    random_projection_loss(out).backward()
    assert alpha.grad is not None and alpha.grad.abs().sum() > 0


def test_tie_off_is_a_plain_mean_over_blocks_which_alpha_zero_gives():
    tokens = torch.randn(3, 5, 7)
    torch.testing.assert_close(rps.importance_weighted_sum(tokens, None), tokens.mean(dim=1))
    torch.testing.assert_close(rps.importance_weighted_sum(tokens, torch.zeros(1, 5, 7)), tokens.mean(dim=1))


# --------------------------------------------------------------------------- frozen CLIP blocks

def _manual_clip_pass(folder, pixels):
    """Run a separately loaded CLIP vision tower layer by layer with hand-written attention.

    Returns per block: the layer_norm2 output (LN2(x + attn(LN1(x)))) and the block output,
    plus the model's own hidden_states for comparison.
    """
    from transformers import CLIPVisionModel

    model = CLIPVisionModel.from_pretrained(folder).eval()
    vision = getattr(model, "vision_model", model)
    heads = model.config.num_attention_heads
    ln2_outputs, block_outputs = [], []
    with torch.no_grad():
        h = vision.pre_layrnorm(vision.embeddings(pixels))
        for layer in vision.encoder.layers:
            attn = layer.self_attn
            x = layer.layer_norm1(h)
            batch, tokens, width = x.shape

            def split(t):
                return t.view(batch, tokens, heads, width // heads).transpose(1, 2)

            q, k, v = split(attn.q_proj(x)), split(attn.k_proj(x)), split(attn.v_proj(x))
            scores = (q @ k.transpose(-1, -2)) / math.sqrt(width // heads)
            mixed = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(batch, tokens, width)
            mid = h + attn.out_proj(mixed)
            ln2 = layer.layer_norm2(mid)
            h = mid + layer.mlp(ln2)
            ln2_outputs.append(ln2)
            block_outputs.append(h)
        hidden_states = model(pixel_values=pixels, output_hidden_states=True).hidden_states
    return ln2_outputs, block_outputs, hidden_states


def test_block_tokens_are_layer_norm2_outputs_not_hidden_states(tiny_backbone):
    pixels = clip_pixels(2, seed=5)
    ln2_outputs, block_outputs, hidden_states = _manual_clip_pass(tiny_backbone, pixels)
    # The manual pass is right: its block outputs are HuggingFace's hidden_states.
    for i, out in enumerate(block_outputs):
        torch.testing.assert_close(out, hidden_states[i + 1], rtol=1e-4, atol=1e-4)

    frozen = rps.FrozenCLIPBlocks(tiny_backbone, blocks="all", patch_block=2)
    cls_tokens, patch_tokens = frozen(pixels)
    assert cls_tokens.shape == (2, 4, 64)
    for i in range(4):
        torch.testing.assert_close(cls_tokens[:, i], ln2_outputs[i][:, 0], rtol=1e-4, atol=1e-4)
        # ... and not what hidden_states would give (before or after the block).
        assert not torch.allclose(cls_tokens[:, i], hidden_states[i + 1][:, 0], atol=1e-2)
        assert not torch.allclose(cls_tokens[:, i], hidden_states[i][:, 0], atol=1e-2)

    # Patch tokens of PATCH_BLOCK as a [B,width,7,7] map: token 1 + r*7 + c sits at (r, c).
    assert patch_tokens.shape == (2, 64, 7, 7)
    expected = ln2_outputs[2][:, 1:].transpose(1, 2).reshape(2, 64, 7, 7)
    torch.testing.assert_close(patch_tokens, expected, rtol=1e-4, atol=1e-4)


def test_block_selection_keeps_order_and_values(tiny_backbone):
    pixels = clip_pixels(2, seed=6)
    ln2_outputs, _, _ = _manual_clip_pass(tiny_backbone, pixels)
    frozen = rps.FrozenCLIPBlocks(tiny_backbone, blocks="1,3")
    cls_tokens, patch_tokens = frozen(pixels)
    assert frozen.blocks == [1, 3] and patch_tokens is None
    torch.testing.assert_close(cls_tokens, torch.stack([ln2_outputs[1][:, 0], ln2_outputs[3][:, 0]], dim=1),
                               rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- full model, every ablation

ABLATIONS = {
    "full": {},
    "no_spectral": dict(USE_SPECTRAL=False),
    "no_tie": dict(USE_TIE=False),
    "concat": dict(FUSION="concat"),
    "clip_patches": dict(SPECTRAL_INPUT="clip_patches", PATCH_BLOCK=2),
    "xi_zero": dict(XI=0.0),
}


@pytest.mark.parametrize("ablation", list(ABLATIONS))
def test_full_model_forward_shapes_and_gradients(make_cfg, ablation):
    cfg = make_cfg(**ABLATIONS[ablation])
    torch.manual_seed(0)
    model = rps.RINEPlusSSCA(cfg).train()
    pixels = clip_pixels(4, seed=2)
    labels = torch.tensor([0.0, 1.0, 0.0, 1.0])
    logits, features = model(pixels)
    feature_dim = cfg.FUSION_DIM if cfg.USE_SPECTRAL else cfg.PROJ_DIM  # RINE: SupCon on z [B,d']
    assert logits.shape == (4,) and features.shape == (4, feature_dim)
    assert torch.isfinite(logits).all() and torch.isfinite(features).all()

    # The loss as training weights it: with XI=0 SupCon is left out, so its projection gets no gradient.
    loss = rps.bce_loss_sum(logits, labels)
    if cfg.XI > 0:
        loss = loss + cfg.XI * rps.supervised_contrastive_loss(features, labels)
    loss.backward()
    for name, p in model.named_parameters():
        if name.startswith("backbone."):
            continue
        if cfg.XI == 0 and name.startswith("supcon_projection."):
            assert p.grad is None, f"{ablation}: SupCon's projection has a gradient with XI=0"
            continue
        assert p.grad is not None, f"{ablation}: no gradient at {name}"
        assert p.grad.abs().sum() > 0, f"{ablation}: zero gradient at {name}"

    names = {name for name, _ in model.named_parameters()}
    has_spectral = any(n.startswith(("ssca.", "dct_conv.")) for n in names)
    assert has_spectral == cfg.USE_SPECTRAL
    assert ("alpha" in names) == cfg.USE_TIE
    importance = model.block_importance()
    assert importance.shape == (4,)
    torch.testing.assert_close(importance.sum(), torch.tensor(1.0))


@pytest.mark.parametrize("ablation", ["full", "clip_patches"])
def test_full_model_trains_under_cpu_bf16_autocast(make_cfg, ablation):
    # AMP="bf16" is allowed on the CPU; the FFT/DCT parts must cope (28 is not a power of two).
    torch.manual_seed(0)
    model = rps.RINEPlusSSCA(make_cfg(**ABLATIONS[ablation])).train()
    labels = torch.tensor([0.0, 1.0, 0.0, 1.0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, features = model(clip_pixels(4, seed=7))
    loss = rps.bce_loss_sum(logits, labels) + 0.2 * rps.supervised_contrastive_loss(features, labels)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.trainable_parameters())


def test_bad_backbone_settings_are_user_errors(tiny_backbone, tmp_path):
    with pytest.raises(rps.UserError, match="BLOCKS"):
        rps.FrozenCLIPBlocks(tiny_backbone, blocks="9")  # the tiny backbone has blocks 0-3
    with pytest.raises(rps.UserError, match="BLOCKS"):
        rps.FrozenCLIPBlocks(tiny_backbone, blocks="two")
    with pytest.raises(rps.UserError, match="PATCH_BLOCK"):
        rps.FrozenCLIPBlocks(tiny_backbone, patch_block=4)
    with pytest.raises(rps.UserError, match="no_backbone_here"):
        rps.FrozenCLIPBlocks(str(tmp_path / "no_backbone_here"))


def test_clip_patches_ablation_reads_clip_patch_tokens_not_pixels(make_cfg):
    # With SPECTRAL_INPUT="clip_patches" the spectral branch starts from PATCH_BLOCK's tokens
    # (width 64, 7x7 grid), not from the 192-channel DCT.
    model = rps.RINEPlusSSCA(make_cfg(SPECTRAL_INPUT="clip_patches", PATCH_BLOCK=2))
    assert model.backbone.patch_block == 2
    assert not isinstance(model.spectral_stem, rps.BlockDCT)
    assert model.dct_conv.pointwise.in_channels == 64
    dct_model = rps.RINEPlusSSCA(make_cfg())
    assert isinstance(dct_model.spectral_stem, rps.BlockDCT)
    assert dct_model.dct_conv.pointwise.in_channels == 192
