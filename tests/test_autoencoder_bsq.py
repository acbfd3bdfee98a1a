import pytest
import torch

from var_erase.models.autoencoder_bsq import BSQAutoencoder
from var_erase.models.quantizer import MultiScaleBSQ
from var_erase.schedules import ScaleSchedule

TINY_CONFIG = dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, codebook_dim=8)


@pytest.fixture
def vae() -> BSQAutoencoder:
    torch.manual_seed(0)
    return BSQAutoencoder(**TINY_CONFIG).eval()


@pytest.fixture
def schedule() -> ScaleSchedule:
    return ScaleSchedule(((1, 1), (2, 3), (4, 6), (8, 12)), vae_stride=2)  # 16x24 images


def random_images(batch: int = 2, height: int = 16, width: int = 24) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.rand(batch, 3, height, width, generator=generator) * 2 - 1


def test_encode_quantize_decode_round_trip(vae, schedule):
    images_B3HW = random_images()
    assert vae.vae_stride == 2

    with torch.no_grad():
        f_BdHW = vae.encode(images_B3HW)
        f_hat_BdHW, bits = vae.quantizer.quantize(f_BdHW, schedule)
        decoded_B3HW = vae.decode(f_hat_BdHW)

        assert f_BdHW.shape == (2, 8, 8, 12)
        assert [b.shape for b in bits] == [(2, h * w, 8) for h, w in schedule.grids]
        assert decoded_B3HW.shape == images_B3HW.shape
        assert decoded_B3HW.abs().max() <= 1
        # decoding the bits a transformer would emit gives the same image
        rebuilt_BdHW = None
        for k, bits_Bld in enumerate(bits):
            rebuilt_BdHW = vae.quantizer.accumulate(
                rebuilt_BdHW, vae.quantizer.bits_to_codes(bits_Bld, schedule.grids[k]), k, schedule
            )
        assert torch.equal(vae.decode(rebuilt_BdHW), decoded_B3HW)


def test_forward_trains_the_encoder_through_the_quantizer(vae, schedule):
    images_B3HW = random_images()
    reconstruction_B3HW, bits = vae(images_B3HW, schedule)
    assert reconstruction_B3HW.shape == images_B3HW.shape and len(bits) == schedule.num_scales

    (reconstruction_B3HW - images_B3HW).abs().mean().backward()
    assert vae.encoder.conv_in.weight.grad.abs().sum() > 0  # straight through the binary quantizer
    assert vae.decoder.conv_out.weight.grad.abs().sum() > 0


def test_save_and_load_round_trip(vae, schedule, tmp_path):
    vae.save_pretrained(tmp_path)
    loaded = BSQAutoencoder.from_pretrained(tmp_path).eval()

    assert tuple(loaded.config.block_out_channels) == tuple(vae.config.block_out_channels)  # json gives a list
    assert loaded.quantizer.codebook_dim == 8 and loaded.vae_stride == 2
    images_B3HW = random_images()
    with torch.no_grad():
        expected, expected_bits = vae(images_B3HW, schedule)
        actual, actual_bits = loaded(images_B3HW, schedule)
    assert torch.equal(actual, expected)
    assert all(torch.equal(a, b) for a, b in zip(actual_bits, expected_bits, strict=True))


def test_weights_live_only_in_encoder_and_decoder(vae):
    # the Infinity converter maps onto exactly these names; the quantizer must add nothing
    assert {key.split(".")[0] for key in vae.state_dict()} == {"encoder", "decoder"}
    assert isinstance(vae.quantizer, MultiScaleBSQ)


def test_default_config_is_infinity_vae_architecture():
    with torch.device("meta"):
        vae = BSQAutoencoder()
    assert vae.vae_stride == 16
    assert vae.encoder.conv_out.out_channels == 32 and vae.decoder.conv_in.in_channels == 32
    assert len(vae.decoder.up_blocks[0].resnets) == 3  # Infinity's decoder has num_res_blocks + 1 per level
    assert not any("attention" in name for name, _ in vae.named_parameters())  # Infinity's cnn_attention="no"
    assert sum(p.numel() for p in vae.parameters()) == 110_118_051  # = the reference AutoEncoder's encoder + decoder


def test_clear_errors_for_bad_images(vae, schedule):
    with pytest.raises(ValueError, match="not divisible by the VAE stride 2; resize or crop to 16x24"):
        vae.encode(random_images(height=17))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        vae.encode(random_images()[:, :1])
    with pytest.raises(ValueError, match="build the schedule"):
        vae(random_images(height=8), schedule)
    with pytest.raises(ValueError, match="codebook_dim channels"):
        vae.decode(torch.zeros(1, 4, 8, 12))
