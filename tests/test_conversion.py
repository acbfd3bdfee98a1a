"""Official Infinity checkpoints -> var_erase (var_erase.conversion.infinity).

The official key layout is built here from the documented names (research/var_models.md, sections 1.2 and 1.3), not
from the converter, so the test checks the converter against the format rather than against itself.
"""

import importlib.util
from pathlib import Path

import pytest
import torch

from var_erase.conversion.infinity import (
    INFINITY_TRANSFORMER_CONFIGS,
    INFINITY_VAE_CONFIGS,
    convert_infinity_transformer,
    convert_infinity_vae,
    load_infinity_transformer,
    load_infinity_transformer_state_dict,
    load_pth,
    save_pretrained_atomic,
)
from var_erase.models.autoencoder_bsq import BSQAutoencoder
from var_erase.models.transformer_var import VARTransformer2DModel, reference_uncond_init

C, HEADS, D_BITS, CT5, TEXT_LEN, DEPTH, FFN = 64, 4, 8, 32, 16, 4, 256
CONFIG = dict(num_layers=DEPTH, hidden_size=C, num_attention_heads=HEADS, codebook_dim=D_BITS, text_dim=CT5,
              max_text_len=TEXT_LEN)
REPO = Path(__file__).resolve().parents[1]


def official_transformer_state_dict(layout="block_chunks", chunks=2, text_len=TEXT_LEN, seed=0):
    """A random state dict with Infinity's key names and shapes for the tiny CONFIG."""
    g = torch.Generator().manual_seed(seed)
    pool_heads = max(1, CT5 // 128)
    shapes = {
        "cfg_uncond": (text_len, CT5), "pos_start": (1, 1, C), "text_norm.weight": (CT5,),
        "text_proj_for_sos.ca.mat_q": (1, pool_heads, C // pool_heads), "text_proj_for_sos.ca.v_bias": (C,),
        "text_proj_for_sos.ca.mat_kv.weight": (2 * C, CT5), "text_proj_for_sos.ca.proj.weight": (C, C),
        "text_proj_for_sos.ca.proj.bias": (C,), "text_proj_for_ca.0.weight": (C, CT5), "text_proj_for_ca.0.bias": (C,),
        "text_proj_for_ca.2.weight": (C, C), "text_proj_for_ca.2.bias": (C,), "lvl_embed.weight": (15, C),
        "word_embed.weight": (C, D_BITS), "word_embed.bias": (C,), "shared_ada_lin.1.weight": (6 * C, C),
        "shared_ada_lin.1.bias": (6 * C,), "head_nm.ada_lin.1.weight": (2 * C, C), "head_nm.ada_lin.1.bias": (2 * C,),
        "head.weight": (2 * D_BITS, C), "head.bias": (2 * D_BITS,),
    }
    block_shapes = {
        "ada_gss": (1, 1, 6, C), "sa.scale_mul_1H11": (1, HEADS, 1, 1), "sa.q_bias": (C,), "sa.v_bias": (C,),
        "sa.mat_qkv.weight": (3 * C, C), "sa.proj.weight": (C, C), "sa.proj.bias": (C,), "ca.v_bias": (C,),
        "ca.mat_q.weight": (C, C), "ca.mat_q.bias": (C,), "ca.mat_kv.weight": (2 * C, C), "ca.proj.weight": (C, C),
        "ca.proj.bias": (C,), "ffn.fc1.weight": (FFN, C), "ffn.fc1.bias": (FFN,), "ffn.fc2.weight": (C, FFN),
        "ffn.fc2.bias": (C,), "ca_norm.weight": (C,), "ca_norm.bias": (C,),
    }
    state = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    state["text_proj_for_sos.ca.zero_k_bias"] = torch.zeros(C)
    per_chunk = DEPTH // chunks
    for n in range(DEPTH):
        prefix = f"blocks.{n}." if layout == "blocks" else f"block_chunks.{n // per_chunk}.module.{n % per_chunk}."
        state.update({prefix + k: torch.randn(s, generator=g) for k, s in block_shapes.items()})
        state[prefix + "sa.zero_k_bias"] = torch.zeros(C)
        state[prefix + "ca.zero_k_bias"] = torch.zeros(C)
    state["lvl_1L"] = torch.zeros(1, 10, dtype=torch.long)  # buffers some versions saved
    state["attn_bias_for_masking"] = torch.zeros(1, 1, 10, 10)
    return state


# ---------------------------------------------------------------------------------------------------------------------
# transformer


@pytest.mark.parametrize("layout", ["block_chunks", "blocks"])
def test_transformer_checkpoint_converts_and_loads_strictly(layout):
    official = official_transformer_state_dict(layout)
    model = VARTransformer2DModel(**CONFIG)
    model.load_state_dict(convert_infinity_transformer(official, CONFIG), strict=True)
    chunked = "block_chunks.1.module.1." if layout == "block_chunks" else "blocks.3."  # block 3 = chunk 1, slot 1
    block = model.transformer_blocks[3]
    qkv = official[chunked + "sa.mat_qkv.weight"]
    torch.testing.assert_close(block.attn1.to_q.weight, qkv[:C])
    torch.testing.assert_close(block.attn1.to_k.weight, qkv[C:2 * C])
    torch.testing.assert_close(block.attn1.to_v.weight, qkv[2 * C:])
    torch.testing.assert_close(block.attn1.to_q.bias, official[chunked + "sa.q_bias"])
    torch.testing.assert_close(block.attn2.to_k.weight, official[chunked + "ca.mat_kv.weight"][:C])
    torch.testing.assert_close(block.attn2.to_v.bias, official[chunked + "ca.v_bias"])
    torch.testing.assert_close(block.scale_shift_table, official[chunked + "ada_gss"])  # chunk order kept
    torch.testing.assert_close(block.ff.net[2].weight, official[chunked + "ffn.fc2.weight"])
    torch.testing.assert_close(model.text_pooler.to_v.weight, official["text_proj_for_sos.ca.mat_kv.weight"][C:])
    torch.testing.assert_close(model.proj_out.bias, official["head.bias"])
    torch.testing.assert_close(model.uncond_text_embeds, official["cfg_uncond"])


def test_split_projections_compute_the_fused_reference_projection():
    """Infinity: qkv = F.linear(x, mat_qkv.weight, cat(q_bias, zero_k_bias, v_bias)); ours: to_q, to_k, to_v."""
    official = official_transformer_state_dict("blocks")
    model = VARTransformer2DModel(**CONFIG)
    model.load_state_dict(convert_infinity_transformer(official, CONFIG), strict=True)
    x = torch.randn(3, C)
    bias = torch.cat([official["blocks.0.sa.q_bias"], torch.zeros(C), official["blocks.0.sa.v_bias"]])
    fused = torch.nn.functional.linear(x, official["blocks.0.sa.mat_qkv.weight"], bias)
    attn = model.transformer_blocks[0].attn1
    with torch.no_grad():
        torch.testing.assert_close(torch.cat([attn.to_q(x), attn.to_k(x), attn.to_v(x)], -1), fused)


def test_uncond_embedding_is_padded_with_the_reference_init_or_truncated():
    short = convert_infinity_transformer(official_transformer_state_dict(text_len=10), CONFIG)["uncond_text_embeds"]
    assert short.shape == (TEXT_LEN, CT5)
    torch.testing.assert_close(short[10:], reference_uncond_init(TEXT_LEN, CT5)[10:])
    official = official_transformer_state_dict(text_len=20)
    long = convert_infinity_transformer(official, CONFIG)["uncond_text_embeds"]
    torch.testing.assert_close(long, official["cfg_uncond"][:TEXT_LEN])


def test_transformer_conversion_errors_list_the_keys():
    official = official_transformer_state_dict()
    del official["block_chunks.0.module.1.ffn.fc1.bias"]
    official["some.new.weight"] = torch.zeros(1)
    with pytest.raises(ValueError) as err:
        convert_infinity_transformer(official, CONFIG)
    message = str(err.value)
    assert "1 missing keys" in message and "transformer_blocks.1.ff.net.0.proj.bias" in message
    assert "1 unexpected keys" in message and "some.new.weight" in message
    with pytest.raises(ValueError, match="shape mismatch"):  # the wrong --model_type
        convert_infinity_transformer(official_transformer_state_dict(), {**CONFIG, "hidden_size": 128})
    bad = official_transformer_state_dict()
    bad["block_chunks.0.module.0.sa.zero_k_bias"] = torch.ones(C)
    with pytest.raises(ValueError, match="not zero"):
        convert_infinity_transformer(bad, CONFIG)


def test_released_configs_match_the_reference_sizes():
    sizes = {}
    for name, config in INFINITY_TRANSFORMER_CONFIGS.items():
        with torch.device("meta"):
            sizes[name] = sum(p.numel() for p in VARTransformer2DModel(**config).parameters())
    assert sizes["infinity-2b"] == 2_204_564_032 and sizes["infinity-125m"] == 125_185_696
    assert 8.37e9 < sizes["infinity-8b"] < 8.39e9  # "8.38B" printed by the reference notebook
    with torch.device("meta"):
        vae = BSQAutoencoder(**INFINITY_VAE_CONFIGS["infinity-2b"])
    assert sum(p.numel() for p in vae.encoder.parameters()) == 45_025_696
    assert sum(p.numel() for p in vae.decoder.parameters()) == 65_092_355


# ---------------------------------------------------------------------------------------------------------------------
# reading files


def test_load_pth_round_trip_and_clear_errors(tmp_path):
    official = official_transformer_state_dict()
    path = tmp_path / "infinity_tiny.pth"
    torch.save(official, path)
    assert load_pth(path).keys() == official.keys()
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_pth(truncated)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"<html>rate limited</html>")
    with pytest.raises(ValueError, match="not a readable PyTorch checkpoint"):
        load_pth(garbage)
    with pytest.raises(FileNotFoundError):
        load_pth(tmp_path / "missing.pth")
    listed = tmp_path / "list.pth"
    torch.save([1, 2], listed)
    with pytest.raises(ValueError, match="not a state dict"):
        load_pth(listed)


def test_training_checkpoints_and_loading_a_model(tmp_path):
    official = official_transformer_state_dict()
    torch.save({"trainer": {"gpt_fsdp": official}, "args": {"lr": 1.0}}, tmp_path / "ar-ckpt.pth")
    assert load_infinity_transformer_state_dict(tmp_path / "ar-ckpt.pth").keys() == official.keys()
    torch.save(official, tmp_path / "model.pth")
    model = load_infinity_transformer(tmp_path / "model.pth", CONFIG, dtype=torch.bfloat16)
    assert not model.training and model.transformer_blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    assert model.proj_out.weight.dtype == torch.float32 and not any(p.is_meta for p in model.parameters())


# ---------------------------------------------------------------------------------------------------------------------
# VAE

VAE_CHANNELS, VAE_LAYERS = (16, 32, 64), 1
VAE_CONFIG = dict(block_out_channels=VAE_CHANNELS, layers_per_block=VAE_LAYERS, norm_num_groups=8,
                  codebook_dim=D_BITS)


def official_vae_checkpoint(wrapped=True, seed=0):
    """Infinity's flux_vqgan Encoder/Decoder names (with the Conv/Normalize wrapper levels if ``wrapped``)."""
    g = torch.Generator().manual_seed(seed)
    conv, norm = (".conv", ".norm") if wrapped else ("", "")
    shapes = {}

    def resnet(prefix, c_in, c_out):
        shapes.update({f"{prefix}.norm1{norm}.weight": (c_in,), f"{prefix}.norm1{norm}.bias": (c_in,),
                       f"{prefix}.conv1{conv}.weight": (c_out, c_in, 3, 3), f"{prefix}.conv1{conv}.bias": (c_out,),
                       f"{prefix}.norm2{norm}.weight": (c_out,), f"{prefix}.norm2{norm}.bias": (c_out,),
                       f"{prefix}.conv2{conv}.weight": (c_out, c_out, 3, 3), f"{prefix}.conv2{conv}.bias": (c_out,)})
        if c_in != c_out:
            shapes.update({f"{prefix}.nin_shortcut{conv}.weight": (c_out, c_in, 1, 1),
                           f"{prefix}.nin_shortcut{conv}.bias": (c_out,)})

    def conv_layer(name, c_out, c_in, k=3):
        shapes.update({f"{name}{conv}.weight": (c_out, c_in, k, k), f"{name}{conv}.bias": (c_out,)})

    levels, top = len(VAE_CHANNELS), VAE_CHANNELS[-1]
    conv_layer("encoder.conv_in", VAE_CHANNELS[0], 3)
    c_in = VAE_CHANNELS[0]
    for i, c_out in enumerate(VAE_CHANNELS):
        for j in range(VAE_LAYERS):
            resnet(f"encoder.down.{i}.block.{j}", c_in, c_out)
            c_in = c_out
        if i < levels - 1:
            conv_layer(f"encoder.down.{i}.downsample.conv", c_out, c_out)
    for name in ("encoder", "decoder"):
        resnet(f"{name}.mid.block_1", top, top)
        resnet(f"{name}.mid.block_2", top, top)
    shapes.update({f"encoder.norm_out{norm}.weight": (top,), f"encoder.norm_out{norm}.bias": (top,)})
    conv_layer("encoder.conv_out", D_BITS, top)
    conv_layer("decoder.conv_in", top, D_BITS)
    c_in = top
    for i in reversed(range(levels)):  # decoder levels are indexed by resolution: up.0 is the finest
        for j in range(VAE_LAYERS + 1):
            resnet(f"decoder.up.{i}.block.{j}", c_in, VAE_CHANNELS[i])
            c_in = VAE_CHANNELS[i]
        if i >= 1:
            conv_layer(f"decoder.up.{i}.upsample.conv", VAE_CHANNELS[i], VAE_CHANNELS[i])
    shapes.update({f"decoder.norm_out{norm}.{p}": (VAE_CHANNELS[0],) for p in ("weight", "bias")})
    conv_layer("decoder.conv_out", 3, VAE_CHANNELS[0])
    weights = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    weights["quantizer.lfq.mask"] = 2 ** torch.arange(D_BITS - 1, -1, -1)
    return {"vae": weights, "epoch": 3}


@pytest.mark.parametrize("wrapped", [True, False])
def test_vae_checkpoint_converts_and_loads_strictly(wrapped):
    checkpoint = official_vae_checkpoint(wrapped)
    converted = convert_infinity_vae(checkpoint, VAE_CONFIG)
    vae = BSQAutoencoder(**VAE_CONFIG)
    vae.load_state_dict(converted, strict=True)
    conv, norm = (".conv", ".norm") if wrapped else ("", "")
    # the finest decoder level (Infinity up.0) is the last diffusers up block
    torch.testing.assert_close(vae.decoder.up_blocks[2].resnets[0].conv1.weight,
                               checkpoint["vae"][f"decoder.up.0.block.0.conv1{conv}.weight"])
    torch.testing.assert_close(vae.encoder.conv_norm_out.weight, checkpoint["vae"][f"encoder.norm_out{norm}.weight"])
    torch.testing.assert_close(vae.encoder.down_blocks[1].resnets[0].conv_shortcut.weight,
                               checkpoint["vae"][f"encoder.down.1.block.0.nin_shortcut{conv}.weight"])
    plain = convert_infinity_vae(checkpoint["vae"], VAE_CONFIG)  # weights not under "vae"
    assert plain.keys() == converted.keys()


def test_vae_state_dict_saved_from_infinitys_autoencoder_with_its_quantize_alias_converts():
    """Infinity's AutoEncoder sets ``self.quantize = self.quantizer``: its state dict lists the quantizer twice."""

    class Aliasing(torch.nn.Module):  # the same registration as Infinity's AutoEncoder
        def __init__(self, mask):
            super().__init__()
            self.quantizer = torch.nn.Module()
            self.quantizer.lfq = torch.nn.Module()
            self.quantizer.lfq.register_buffer("mask", mask)
            self.quantize = self.quantizer

    checkpoint = official_vae_checkpoint()
    aliased = Aliasing(checkpoint["vae"]["quantizer.lfq.mask"]).state_dict()
    assert set(aliased) == {"quantizer.lfq.mask", "quantize.lfq.mask"}
    converted = convert_infinity_vae({**checkpoint["vae"], **aliased}, VAE_CONFIG)
    assert converted.keys() == convert_infinity_vae(checkpoint, VAE_CONFIG).keys()
    BSQAutoencoder(**VAE_CONFIG).load_state_dict(converted, strict=True)
    different = {**checkpoint["vae"], "quantize.lfq.mask": torch.zeros(D_BITS, dtype=torch.long)}
    with pytest.raises(ValueError, match=r"1 'quantize\.\*' entries that are not copies .*quantize\.lfq\.mask"):
        convert_infinity_vae(different, VAE_CONFIG)
    del checkpoint["vae"]["quantizer.lfq.mask"]  # an alias without its twin is not a copy either
    with pytest.raises(ValueError, match="not copies"):
        convert_infinity_vae({**checkpoint["vae"], "quantize.lfq.mask": aliased["quantize.lfq.mask"]}, VAE_CONFIG)


def test_vae_conversion_errors():
    checkpoint = official_vae_checkpoint()
    checkpoint["vae"]["encoder.mid.attn_1.q.conv.weight"] = torch.zeros(64, 64, 1, 1)
    with pytest.raises(ValueError, match="encoder.mid.attn_1.q"):
        convert_infinity_vae(checkpoint)
    with pytest.raises(ValueError, match="shape mismatch"):
        convert_infinity_vae(official_vae_checkpoint(), {**VAE_CONFIG, "codebook_dim": 16})


# ---------------------------------------------------------------------------------------------------------------------
# saving


def test_save_pretrained_atomic_writes_all_or_nothing(tmp_path):
    model = VARTransformer2DModel(**CONFIG)
    out = save_pretrained_atomic(model, tmp_path / "converted" / "transformer")
    assert (out / "config.json").is_file() and (out / "diffusion_pytorch_model.safetensors").is_file()
    with pytest.raises(FileExistsError, match="--overwrite"):
        save_pretrained_atomic(model, out)

    class Failing:
        def save_pretrained(self, directory, safe_serialization):
            (Path(directory) / "half_written.safetensors").write_bytes(b"x")
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_pretrained_atomic(Failing(), tmp_path / "other")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["converted"]


def test_build_pipeline_from_official_files(tmp_path):
    pipeline_var = pytest.importorskip("var_erase.pipelines.pipeline_var", exc_type=ImportError)
    from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

    from var_erase.conversion.infinity import build_infinity_pipeline

    torch.save(official_transformer_state_dict(), tmp_path / "infinity.pth")
    torch.save(official_vae_checkpoint(), tmp_path / "vae.pth")
    ByT5Tokenizer().save_pretrained(tmp_path / "t5")
    T5EncoderModel(T5Config(vocab_size=384, d_model=CT5, d_kv=8, d_ff=64, num_layers=1, num_heads=4)).save_pretrained(
        tmp_path / "t5")
    pipe = build_infinity_pipeline(tmp_path / "infinity.pth", tmp_path / "vae.pth", tmp_path / "t5",
                                   dtype=torch.float32, transformer_config=CONFIG, vae_config=VAE_CONFIG)
    out = save_pretrained_atomic(pipe, tmp_path / "pipe")
    loaded = pipeline_var.VARPipeline.from_pretrained(out)
    torch.testing.assert_close(loaded.transformer.transformer_blocks[1].attn2.to_q.weight,
                               official_transformer_state_dict()["block_chunks.0.module.1.ca.mat_q.weight"])


def test_conversion_script_arguments(capsys):
    path = REPO / "scripts" / "convert_infinity_to_diffusers.py"
    spec = importlib.util.spec_from_file_location("convert_script", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    with pytest.raises(SystemExit) as exit_info:
        script.parse_args(["--help"])
    assert exit_info.value.code == 0
    usage = capsys.readouterr().out
    for flag in ("--transformer_path", "--vae_path", "--model_type", "--text_encoder_path", "--output_dir", "--dtype"):
        assert flag in usage
    args = script.parse_args(["--transformer_path", "t.pth", "--vae_path", "v.pth", "--output_dir", "out",
                              "--model_type", "infinity-125m", "--dtype", "float16"])
    assert (args.model_type, args.dtype, args.text_encoder_path) == ("infinity-125m", "float16", "google/flan-t5-xl")
