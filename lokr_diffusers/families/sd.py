"""Stable Diffusion 1.x, 2.x and XL: one UNet class (UNet2DConditionModel), told apart by its cross-attention width
(768, 1024, 2048), CLIP text encoders. The UNet's original (ldm) names are computed from its config
(formats/ldm.py), so these records have no original-name table.

A file is told to be for one of them by its names (a second text encoder, SDXL's added embedding, transformer
stacks deeper than one block, ldm block numbers only one of the two UNet layouts has: SDXL has no attention in
input block 1 nor output blocks 6-11) and by widths read off its factors (in = in_m · in_n): the cross-attention
width of an `attn2.to_k`, a text encoder's width (1024 SD2.x, 1280 SDXL's second); a 1x1-conv `proj_in` /
`proj_out` (a 4-D factor): only SD1.x has conv projections. SD1.x and SD2.x share the UNet's block layout and its
names: a file may name both.
"""

from __future__ import annotations

from .record import Detection, Kohya, ModelFamily, Sign, Training

# the default targets of the UNet: attention and feed-forward, as the diffusers docs example and kohya's LoRA
UNET_TARGETS: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj",
                                 "ff.net.2")
UNET = Sign(r"down_blocks|up_blocks|mid_block|input_blocks|output_blocks|middle_block", "UNet blocks")

# names only SDXL files have
SDXL_NAMES: tuple[Sign, ...] = (
    Sign(r"lora_te2_|text_encoder_2\.|clip_g", "a second text encoder"),
    Sign(r"label_emb|add_embedding", "SDXL's added embedding"),
    Sign(r"transformer_blocks[._][1-9]", "transformer stacks deeper than one block"),
    Sign(r"output_blocks[._][0-2][._]1[._](transformer_blocks|proj_in|proj_out|norm)",
         "attention in ldm output blocks 0-2"),
)
# names only SD1.x / SD2.x files have
SD12_NAMES: tuple[Sign, ...] = (
    Sign(r"down_blocks[._]0[._]attentions|down_blocks[._]3[._]|up_blocks[._]3[._]attentions",
         "the SD1.x/SD2.x UNet's block layout"),
    Sign(r"input_blocks[._][12][._]1[._]|output_blocks[._]([6-9]|1[01])[._]1[._]",
         "attention in ldm blocks SDXL does not have"),
    Sign(r"^lora_te_", "one text encoder (kohya's lora_te_; SDXL files have lora_te1_/lora_te2_)"),
)
_TO_K = r"attn2[._]to_k$"
_TE_Q = r"(lora_te[12]?_|text_encoder(_2)?\.|text_encoders\.).*self_attn[._]q_proj$"
CONV_PROJ = Sign(r"[._]proj_(in|out)$", "a 1x1-conv proj_in/proj_out, which only SD1.x has", conv=True)


def _cross_attention(width: int) -> Sign:
    return Sign(_TO_K, f"cross-attention width {width}", in_width=width)


def _text_encoder(width: int) -> Sign:
    # 768 is CLIP-L: SD1's encoder and SDXL's first one alike, so it names no family
    return Sign(_TE_Q, f"text-encoder width {width}", in_width=width)


# the UNet scripts train SD1.x, SD2.x and SDXL alike (prediction type from the scheduler's config)
TRAINING = Training("sd", ("text_encoder", "text_encoder_2"))

SD1 = ModelFamily(
    name="sd1", title="SD1.x", pipelines=("StableDiffusionPipeline",), denoiser="unet",
    denoiser_class="UNet2DConditionModel", text_encoders=("text_encoder",),
    components=("unet", "vae", "text_encoder", "tokenizer"), variants=("sd1",), prediction=("epsilon",),
    detect=Detection(config={"cross_attention_dim": 768}, kind=(UNET,),
                     base=(*SD12_NAMES, _cross_attention(768), CONV_PROJ)),
    kohya=Kohya("sd_v1"), targets=UNET_TARGETS, training=TRAINING, aliases=("sd15",),
    tiny="lokr_diffusers.tiny:make_sd_pipeline",
)
# no tiny SD2.x pipeline: its UNet is SD1.x's with other sizes and linear projections
SD2 = ModelFamily(
    name="sd2", title="SD2.x", pipelines=("StableDiffusionPipeline",), denoiser="unet",
    denoiser_class="UNet2DConditionModel", text_encoders=("text_encoder",),
    components=("unet", "vae", "text_encoder", "tokenizer"), variants=("sd2",),
    prediction=("epsilon", "v_prediction"),  # 2.x-base predicts noise, the 768 models v
    detect=Detection(config={"cross_attention_dim": 1024}, kind=(UNET,),
                     base=(*SD12_NAMES, _cross_attention(1024), _text_encoder(1024))),
    kohya=Kohya("sd_v2", openclip=("text_encoder",), v2=True),  # OpenCLIP-H
    targets=UNET_TARGETS, training=TRAINING, aliases=("sd21",),
)
SDXL = ModelFamily(
    name="sdxl", title="SDXL", pipelines=("StableDiffusionXLPipeline",), denoiser="unet",
    denoiser_class="UNet2DConditionModel", text_encoders=("text_encoder", "text_encoder_2"),
    components=("unet", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"), variants=("sdxl",),
    prediction=("epsilon",),
    detect=Detection(config={"cross_attention_dim": 2048}, kind=(UNET,),
                     base=(*SDXL_NAMES, _cross_attention(2048), _text_encoder(1280))),
    kohya=Kohya("sdxl_base_v1-0", ldm_unet=True, openclip=("text_encoder_2",)),  # OpenCLIP-G
    targets=UNET_TARGETS, training=TRAINING, tags=("stable-diffusion-xl",),
    tiny="lokr_diffusers.tiny:make_sdxl_pipeline",
)
FAMILIES: tuple[ModelFamily, ...] = (SD1, SD2, SDXL)
