"""Tiny random-weight diffusers pipelines built from configs (no network): a Stable-Diffusion-style
UNet pipeline and a PixArt-style DiT pipeline (the full test matrix), plus SD3 and Flux (MM-DiT, joint
attention; presets and apply checks), each with in-memory char-level tokenizers."""

from __future__ import annotations

import torch

PIPELINES = ["sd", "pixart"]
MMDIT = ["sd3", "flux"]


def _tokenizer(max_length: int = 16):
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 127)]
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                  unk_token="<pad>", model_max_length=max_length)
    return tok


def _vae(**kw):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         layers_per_block=1, norm_num_groups=4, sample_size=16, **kw).eval()


def _clip(with_projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                         num_attention_heads=4, max_position_embeddings=16, pad_token_id=0, bos_token_id=1,
                         eos_token_id=2, projection_dim=32)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(cfg).eval()


def _t5(d_model: int = 32):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=128, d_model=d_model, d_kv=8, d_ff=48, num_layers=1, num_heads=4,
                                   pad_token_id=0, eos_token_id=2, decoder_start_token_id=0)).eval()


def tiny_sd(seed: int = 0):
    """StableDiffusionPipeline: UNet2DConditionModel (2 resolutions, cross-attention) + VAE + CLIP."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=24, attention_head_dim=4, norm_num_groups=4)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=128, hidden_size=24, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, max_position_embeddings=16, pad_token_id=0,
                                        bos_token_id=1, eos_token_id=2))
    pipe = StableDiffusionPipeline(vae=_vae(), text_encoder=text, tokenizer=_tokenizer(), unet=unet,
                                   scheduler=DDIMScheduler(steps_offset=1, clip_sample=False), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    _perturb_norms(pipe.unet, pipe.text_encoder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_pixart(seed: int = 0):
    """PixArtAlphaPipeline: PixArtTransformer2DModel (DiT blocks, AdaLN-single) + VAE + T5 encoder."""
    from diffusers import DDIMScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(
        sample_size=8, num_layers=2, attention_head_dim=8, num_attention_heads=2, in_channels=4, out_channels=8,
        patch_size=2, cross_attention_dim=16, caption_channels=24, norm_num_groups=4)
    text = T5EncoderModel(T5Config(vocab_size=128, d_model=24, d_kv=6, d_ff=48, num_layers=2, num_heads=4,
                                   pad_token_id=0, eos_token_id=2, decoder_start_token_id=0))
    pipe = PixArtAlphaPipeline(tokenizer=_tokenizer(), text_encoder=text, vae=_vae(), transformer=transformer,
                               scheduler=DDIMScheduler(steps_offset=1, clip_sample=False))
    _perturb_norms(pipe.transformer, pipe.text_encoder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sd3(seed: int = 0):
    """StableDiffusion3Pipeline: SD3Transformer2DModel (joint attention; the last block context-pre-only)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=8,
                                        num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16,
                                        pooled_projection_dim=64, out_channels=4)
    pipe = StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae(use_quant_conv=False, use_post_quant_conv=False,
                                                              shift_factor=0.0, scaling_factor=1.0),
        text_encoder=_clip(True), tokenizer=_tokenizer(), text_encoder_2=_clip(True), tokenizer_2=_tokenizer(),
        text_encoder_3=_t5(), tokenizer_3=_tokenizer(), transformer=transformer)
    _perturb_norms(pipe.transformer, pipe.text_encoder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_flux(seed: int = 0):
    """FluxPipeline: FluxTransformer2DModel (double-stream joint blocks + single-stream blocks), no CFG."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, axes_dims_rope=[2, 2, 4])
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae(use_quant_conv=False,
                        use_post_quant_conv=False, shift_factor=0.0, scaling_factor=1.0), text_encoder=_clip(),
                        tokenizer=_tokenizer(), text_encoder_2=_t5(), tokenizer_2=_tokenizer(), transformer=transformer)
    _perturb_norms(pipe.transformer, pipe.text_encoder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_pipeline(kind: str, seed: int = 0):
    return {"sd": tiny_sd, "pixart": tiny_pixart, "sd3": tiny_sd3, "flux": tiny_flux}[kind](seed)


def _perturb_norms(*modules):
    """Norm weights off their 1/0 init, so folds are non-trivial; eval mode, as from_pretrained leaves them."""
    with torch.no_grad():
        for m in modules:
            m.eval()
            for name, p in m.named_parameters():
                if "norm" in name:
                    p.add_(0.1 * torch.randn_like(p))
