"""SimMIM: the mask, the loss against the paper's formula, and the mask token at the encoder's input."""

from __future__ import annotations

import pytest
import torch

from pretrain.config import ConfigError
from pretrain.objectives.simmim import masked_l1, random_block_mask
from tests.conftest import TINY_SWIN, TINY_VIT
from tests.helpers import tiny_config, tiny_objective


def tiny(tmp_path, model, *extra):
    return tiny_objective(tiny_config(tmp_path, *model, "objective.name=simmim", "data.num_classes=10",
                                      "objective.mask_patch_size=8", *extra), steps_per_epoch=5)


def test_mask_has_the_ratio_and_is_constant_over_each_block():
    torch.manual_seed(0)
    # 192 px, 32-px blocks, Swin's 4-px patches: 6 x 6 blocks of 8 x 8 patches; ceil(0.6 * 36) = 22 masked.
    mask = random_block_mask(16, 192, 32, 4, 0.6)
    assert mask.shape == (16, 48, 48)
    assert set(mask.unique().tolist()) == {0.0, 1.0}
    blocks = mask.view(16, 6, 8, 6, 8)
    assert torch.equal(blocks.amax(dim=(2, 4)), blocks.amin(dim=(2, 4)))  # constant over each block
    assert blocks[:, :, 0, :, 0].sum(dim=(1, 2)).tolist() == [22.0] * 16
    assert not torch.equal(mask[0], mask[1])  # each image draws its own blocks
    # Every block is masked about 60% of the time over many images (not always the same ones).
    many = random_block_mask(2000, 64, 16, 16, 0.6)  # 4 x 4 blocks, 10 masked
    assert torch.allclose(many.mean(0), torch.full((4, 4), 10 / 16), atol=0.05)


def test_loss_is_the_papers_formula():
    torch.manual_seed(0)
    reconstruction, target = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    mask = (torch.rand(2, 1, 4, 4) < 0.5).float()
    # The paper: (1 / Omega(x_M)) * || y_M - x_M ||_1, Omega the number of masked pixel values (pixels x channels).
    masked_values = [(reconstruction[n, c, i, j] - target[n, c, i, j]).abs().item()
                     for n in range(2) for c in range(3) for i in range(4) for j in range(4) if mask[n, 0, i, j]]
    expected = sum(masked_values) / len(masked_values)
    assert masked_l1(reconstruction, target, mask).item() == pytest.approx(expected, rel=1e-5)


def test_only_masked_pixels_count():
    torch.manual_seed(0)
    reconstruction, target = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    mask = (torch.rand(2, 1, 8, 8) < 0.5).float()
    changed = reconstruction + (1 - mask) * 100 * torch.randn_like(reconstruction)  # visible pixels only
    assert masked_l1(changed, target, mask) == masked_l1(reconstruction, target, mask)
    changed_masked = reconstruction + mask * torch.randn_like(reconstruction)
    assert masked_l1(changed_masked, target, mask) != masked_l1(reconstruction, target, mask)


@pytest.mark.parametrize("model", [TINY_VIT, [*TINY_VIT, "model.kwargs.dynamic_img_size=true"], TINY_SWIN],
                         ids=["vit", "vit-dynamic-size", "swin"])  # ViT's patch grid as tokens or as NHWC
def test_masked_patches_enter_the_encoder_as_the_mask_token(tmp_path, model):
    objective = tiny(tmp_path, model).eval()
    encoder = objective.encoder
    after_embedding = []
    # What the first transformer stage receives: ViT's tokens before the position embedding is
    # added are seen as the patch embedding's output (the hook runs after the objective's).
    first = encoder.blocks[0] if hasattr(encoder, "blocks") else encoder.layers[0]
    first.register_forward_pre_hook(lambda _m, args: after_embedding.append(args[0]))
    images = torch.randn(2, 3, 32, 32)
    mask = random_block_mask(2, 32, 8, objective.patch_size, 0.6)
    with torch.no_grad():
        features = objective.encode(images, mask)
        clean = encoder.patch_embed(images)
    tokens = after_embedding[0]
    if hasattr(encoder, "pos_embed"):  # ViT: undo the position embedding and drop the class token
        tokens = (tokens - encoder.pos_embed)[:, encoder.num_prefix_tokens:]
    tokens = tokens.reshape(2, -1, tokens.shape[-1])
    clean = clean.reshape(2, -1, clean.shape[-1])
    flat = mask.flatten(1).bool()
    token = objective.mask_token.token.reshape(-1)
    assert flat.any() and (~flat).any()
    assert torch.allclose(tokens[flat], token.expand(int(flat.sum()), -1), atol=1e-6)
    assert torch.allclose(tokens[~flat], clean[~flat], atol=1e-6)
    assert not torch.allclose(clean[flat], token.expand(int(flat.sum()), -1))  # the check can fail
    # The unpooled feature map has the stride the decoder expands back to 32 x 32 pixels.
    assert features.shape == (2, encoder.num_features, 32 // objective.stride, 32 // objective.stride)
    assert objective.decoder(features).shape == (2, 3, 32, 32)


@pytest.mark.parametrize("model", [TINY_VIT, [*TINY_VIT, "model.kwargs.dynamic_img_size=true",
                                              "model.pos_embed_interpolation=dino"],
                                   [*TINY_VIT, "model.grad_checkpointing=true"], TINY_SWIN],
                         ids=["vit", "vit-dino-pos-embed", "vit-grad-checkpointing", "swin"])
def test_the_masked_forward_unmasked_is_timms(tmp_path, model):
    """The encoder's masked forward writes timm's forward_features out: unmasked, it must be timm's
    (a timm release that changes forward_features fails here), and called plainly it is timm's forward."""
    torch.manual_seed(0)
    encoder = tiny(tmp_path, model).encoder.train()
    images = torch.randn(2, 3, 32, 32)

    def seeded(forward):  # the same drop-path draws for both
        torch.manual_seed(1)
        return forward()

    features = seeded(lambda: encoder(images, unpooled=True))
    features.square().mean().backward()
    grads = [p.grad.clone() for p in encoder.parameters()]
    encoder.zero_grad()
    timms = seeded(lambda: type(encoder).forward_features(encoder, images))
    timms.square().mean().backward()
    torch.testing.assert_close(features, timms, rtol=0, atol=0)
    for ours, theirs in zip(grads, [p.grad for p in encoder.parameters()]):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(seeded(lambda: encoder(images)),
                                   seeded(lambda: type(encoder).forward(encoder, images)), rtol=0, atol=0)


@pytest.mark.parametrize("model", [TINY_VIT, TINY_SWIN], ids=["vit", "swin"])
def test_forward_trains_mask_token_decoder_and_encoder_only_through_masked_pixels(tmp_path, model):
    torch.manual_seed(0)
    objective = tiny(tmp_path, model)
    batch = {"image": torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)}
    loss, metrics = objective(batch, 0)
    assert torch.isfinite(loss) and set(metrics) == {"recon_masked", "recon_visible"}
    assert metrics["recon_masked"] == loss.detach()
    loss.backward()
    assert objective.mask_token.token.grad.abs().sum() > 0
    assert objective.decoder[0].weight.grad.abs().sum() > 0
    assert objective.encoder.patch_embed.proj.weight.grad.abs().sum() > 0
    # The export is the plain timm model: no mask token, no decoder in it.
    names = set(objective.backbone().state_dict())
    assert not any("mask" in n and "token" in n for n in names) and not any(n.startswith("decoder") for n in names)
    assert "mask_token.token" in objective.no_decay_names()


def test_mask_patch_size_must_fit_image_and_patches(tmp_path):
    with pytest.raises(ConfigError, match="objective.mask_patch_size=12.*data.image_size=32"):
        tiny(tmp_path, TINY_VIT, "objective.mask_patch_size=12")
    with pytest.raises(ConfigError, match="objective.mask_patch_size=2: must be a multiple of the patch size 4"):
        tiny(tmp_path, TINY_VIT, "objective.mask_patch_size=2")
