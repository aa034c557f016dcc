"""Small components built from configs for test-size pipelines of every family (random weights)."""

from __future__ import annotations


def tiny_vae(image_channels: int, latent_channels: int, vae_channels: tuple[int, ...], latent_size: int, **config):
    """An `AutoencoderKL` with one resnet per level; `latent_size * 2 ** (levels - 1)` pixel images.

    Extra keyword arguments go to the config (e.g. `shift_factor`, `use_quant_conv` as a family expects).
    """
    from diffusers import AutoencoderKL

    n_levels = len(vae_channels)
    return AutoencoderKL(
        in_channels=image_channels,
        out_channels=image_channels,
        down_block_types=("DownEncoderBlock2D",) * n_levels,
        up_block_types=("UpDecoderBlock2D",) * n_levels,
        block_out_channels=vae_channels,
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=min(8, vae_channels[0]),
        sample_size=latent_size * 2 ** (n_levels - 1),
        **({"scaling_factor": 1.0} | config),
    )
