"""The flow-matching pieces (flow_models.FlowModel) of the video families: Wan (WanPipeline), LTX-Video
(LTXPipeline), LTX-2 (LTX2Pipeline), HunyuanVideo (HunyuanVideoPipeline) and HunyuanVideo 1.5
(HunyuanVideo15Pipeline, text to video). Their latents are clips, (B, C, F, h, w) in the space the flow is drawn in;
the shared loss (flow.py) draws x_σ = (1 − σ) · x + σ · ε over all five axes and compares the transformer's velocity
with ε − x.

Facts read, never copied, from diffusers 0.42.1's pipelines/wan/pipeline_wan.py, pipelines/ltx/pipeline_ltx.py,
pipelines/ltx2/pipeline_ltx2.py and connectors.py, models/transformers/transformer_ltx2.py,
pipelines/hunyuan_video/pipeline_hunyuan_video.py and pipelines/hunyuan_video1_5/pipeline_hunyuan_video1_5.py (+
_image2video.py for how it encodes pixels); tests/test_training_flow_video.py, test_training_flow_ltx2.py and
test_training_flow_hunyuanvideo15.py hold the encoders equal to the pipelines' `encode_prompt` and the velocities equal
to one denoising step of each pipeline.

    wan       x = (VAE mode − latents_mean) / latents_std (the VAE config's per-channel statistics; the pipeline
              undoes them before decoding); UMT5 states of the caption (cleaned by diffusers' Wan prompt_clean),
              zero past its last token, padded to --max_sequence_length; timestep t as it is ((B,), or one per token
              for Wan 2.2 TI2V's expand_timesteps); the transformer takes (B, C, F, h, w) and predicts ε − x.
              Wan 2.2 A14B's two experts: `transformer` denoises t ≥ boundary_ratio · 1000 and trains on those
              timesteps only.
    ltxvideo  x = (VAE sample − latents_mean) · scaling_factor / latents_std (the VAE's buffers); the transformer
              takes x packed into tokens (B, F/p_t · h/p · w/p, C · p_t · p · p), the T5 states and their mask,
              timestep t, the latent frame / height / width counts and the rope scale (VAE temporal factor /
              --frame_rate, spatial factor, spatial factor), and predicts ε − x.
    hunyuanvideo  x = VAE sample · scaling_factor; the transformer takes (B, C, F, h, w), timestep t, the Llama
              states of the templated caption (the template's head cut off) with their mask, CLIP-L's pooled
              vector and the embedded guidance · 1000 (--guidance_scale, default 1: musubi-tuner's), and predicts
              ε − x.
    hunyuanvideo15
              x = VAE mode · scaling_factor (the I2V pipeline's encoding of its image; both pipelines divide by
              scaling_factor before decoding); the transformer takes (B, 2C + 1, F, h, w): x_σ, then the T2V
              pipeline's all-zero condition latent (C channels) and mask (1), an all-zero image embedding
              (B, 729, image_embed_dim: the transformer masks it out), timestep t as it is (cast to the latents'
              dtype, as the pipeline does); text: the Qwen2.5-VL third-to-last hidden state of the chat of the
              pipeline's system message and the caption, padded to --max_sequence_length + 108 and cut by the 108
              tokens of the chat's head, with its mask; and ByT5's states of the caption's quoted text ('Text "…". '),
              zeros and a zero mask for a caption without quotes, padded to 256. It predicts ε − x.

    ltx2      (LTX-2, audio + video; trained on video only) x = (VAE mode − latents_mean) · scaling_factor /
              latents_std, as the pipeline's _normalize_latents; Gemma-3's hidden states of every layer stacked
              (B, L, D · (layers + 1)), the caption left-padded to --max_sequence_length, through the pipeline's
              `connectors` (LTX2TextConnectors) into the video and the audio caption states and their mask, as
              LTX2Pipeline.__call__; the transformer takes x packed as LTX-Video's, the timestep t (also as `sigma`),
              the latent frame / height / width counts and --frame_rate (its video rope is in seconds), and
              predicts ε − x. The audio-video cross attention is off (isolate_modalities) and the audio stream gets
              one silent token: the video prediction is then the one the pipeline's modality-isolation pass makes,
              independent of any audio. This is how Lightricks' own trainer trains video without audio
              (packages/ltx-trainer, the `flexible` strategy with no `audio` block: ltx-core's transformer then
              runs no audio and no audio-to-video attention; its training-modes guide, "video-only"); its loss is on
              the video alone. --lora_layers default / attn: the video stream's modules only (that document's
              video-only targets), the audio stream getting no gradient.

`frames_factor`: clips come in 1 + k · factor frames (the VAEs encode the first frame alone, then groups of
`factor`): 4 for Wan and both HunyuanVideos, 8 for LTX-Video and LTX-2. `default_frames`: the pipelines' num_frames
default.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .flow_common import FlowModel, guidance_tensor, model_config, normalise


def encode_wan(parts: Any, captions: list[str], max_sequence_length: int, device: torch.device) -> Tensor:
    """UMT5 last hidden states (B, L, D) of the captions cleaned by Wan's own prompt_clean, zero after each caption's
    tokens, as WanPipeline.encode_prompt."""
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean  # ftfy's fixes when installed, HTML, spaces

    enc = parts.tokenizer([prompt_clean(c) for c in captions], padding="max_length", max_length=max_sequence_length,
                          truncation=True, add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
    mask = enc.attention_mask.to(device)
    states = parts.text_encoder(enc.input_ids.to(device), mask).last_hidden_state
    return torch.where(mask.bool().unsqueeze(-1), states, torch.zeros((), dtype=states.dtype, device=device))


def encode_ltx(parts: Any, captions: list[str], max_sequence_length: int, device: torch.device
               ) -> tuple[Tensor, Tensor]:
    """(T5 states (B, L, D), attention mask (B, L) bool), as LTXPipeline.encode_prompt."""
    enc = parts.tokenizer(captions, padding="max_length", max_length=max_sequence_length, truncation=True,
                          add_special_tokens=True, return_tensors="pt")
    states = parts.text_encoder(enc.input_ids.to(device))[0]
    return states, enc.attention_mask.bool().to(device)


def encode_hunyuanvideo(parts: Any, captions: list[str], max_sequence_length: int, device: torch.device
                        ) -> tuple[Tensor, Tensor, Tensor]:
    """(Llama states (B, L, D), their mask (B, L), CLIP pooled (B, P)), as HunyuanVideoPipeline.encode_prompt: each
    caption in the pipeline's DEFAULT_PROMPT_TEMPLATE, padded to crop_start + `max_sequence_length` tokens, the
    Llama's third-to-last hidden state with the template's first crop_start tokens cut off; CLIP-L's pooled output of
    the bare caption (77 tokens)."""
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

    template, crop = str(DEFAULT_PROMPT_TEMPLATE["template"]), int(str(DEFAULT_PROMPT_TEMPLATE["crop_start"]))
    enc = parts.tokenizer([template.format(c) for c in captions], max_length=crop + max_sequence_length,
                          padding="max_length", truncation=True, return_tensors="pt")
    mask = enc.attention_mask.to(device)
    states = parts.text_encoder(input_ids=enc.input_ids.to(device), attention_mask=mask,
                                output_hidden_states=True).hidden_states[-3]
    clip = parts.tokenizer_2(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    pooled = parts.text_encoder_2(clip.input_ids.to(device), output_hidden_states=False).pooler_output
    return states[:, crop:], mask[:, crop:], pooled
# HunyuanVideo15Pipeline's prompt encoding: the chat's first HV15_CROP tokens (the system turn and the user turn's
# opening) dropped off the Qwen2.5-VL states, its third-to-last hidden state (2 layers skipped), ByT5 padded to
# HV15_BYT5_TOKENS; T2V's image embedding: HV15_IMAGE_TOKENS zero rows (diffusers 0.42.1's
# prompt_template_encode_start_idx, num_hidden_layers_to_skip, tokenizer_2_max_length, vision_num_semantic_tokens)
HV15_CROP, HV15_SKIP, HV15_BYT5_TOKENS, HV15_IMAGE_TOKENS = 108, 2, 256, 729


def encode_hunyuanvideo15(parts: Any, captions: list[str], max_sequence_length: int, device: torch.device
                          ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(Qwen states (B, L, D), their mask (B, L), ByT5 states (B, 256, D_2), their mask (B, 256)), as
    HunyuanVideo15Pipeline.encode_prompt (L = --max_sequence_length; the pipeline's 1000): masks 0 / 1 integers."""
    from diffusers.pipelines.hunyuan_video1_5.pipeline_hunyuan_video1_5 import extract_glyph_texts

    system = getattr(parts, "pipeline", parts).system_message  # the pipeline's (its __init__ sets it)
    chats = [[{"role": "system", "content": system}, {"role": "user", "content": c or " "}] for c in captions]
    enc = parts.tokenizer.apply_chat_template(chats, add_generation_prompt=True, tokenize=True, return_dict=True,
                                              padding="max_length", max_length=max_sequence_length + HV15_CROP,
                                              truncation=True, return_tensors="pt")
    ids, mask = enc.input_ids.to(device), enc.attention_mask.to(device)
    states = parts.text_encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    embeds = states.hidden_states[-(HV15_SKIP + 1)][:, HV15_CROP:]
    glyph_states, glyph_masks = [], []
    byt5 = parts.text_encoder_2
    width, dtype = model_config(byt5).d_model, next(byt5.parameters()).dtype
    for caption in captions:  # one at a time, as the pipeline: the quoted text of each, or nothing
        glyphs = extract_glyph_texts(caption)
        if glyphs is None:
            glyph_states.append(torch.zeros(1, HV15_BYT5_TOKENS, width, device=device, dtype=dtype))
            glyph_masks.append(torch.zeros(1, HV15_BYT5_TOKENS, device=device, dtype=torch.long))
            continue
        tok = parts.tokenizer_2(glyphs, padding="max_length", max_length=HV15_BYT5_TOKENS, truncation=True,
                                add_special_tokens=True, return_tensors="pt")
        glyph_mask = tok.attention_mask.to(device)
        glyph_states.append(byt5(input_ids=tok.input_ids.to(device), attention_mask=glyph_mask.float())[0])
        glyph_masks.append(glyph_mask)
    return embeds, mask[:, HV15_CROP:], torch.cat(glyph_states), torch.cat(glyph_masks)
def encode_ltx2(parts: Any, captions: list[str], max_sequence_length: int, device: torch.device
                ) -> tuple[Tensor, Tensor, Tensor]:
    """(video caption states (B, L, D), audio caption states (B, L, D), mask (B, L) 0 / 1), as LTX2Pipeline:
    encode_prompt (Gemma-3's embeddings and every layer's hidden state, stacked on a last axis and flattened into
    (B, L, D_gemma · (layers + 1)), of the stripped captions left-padded to L) then its `connectors` (the per-layer
    masked normalisation, the projection and one connector per stream, which also zero the video states and the mask
    past the caption). L must be a multiple of the connectors' learnable registers (128 for LTX-2)."""
    tokenizer = parts.tokenizer
    if tokenizer.pad_token is None:  # as the pipeline: Gemma's pad token, else its end token
        tokenizer.pad_token = tokenizer.eos_token
    enc = tokenizer([c.strip() for c in captions], padding="max_length", max_length=max_sequence_length,
                    truncation=True, add_special_tokens=True, padding_side="left", return_tensors="pt")
    ids, mask = enc.input_ids.to(device), enc.attention_mask.to(device)
    hidden = parts.text_encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    states = torch.stack(hidden, dim=-1).flatten(2, 3)
    video, audio, keep = parts.connectors(states.to(_dtype(parts.connectors)), mask, padding_side="left")
    return video, audio, keep


def _dtype(model: Any) -> torch.dtype:
    return next(getattr(model, "module", model).parameters()).dtype


class VideoFlowModel(FlowModel):
    """A FlowModel (flow_common.py) for clips: its latents are (B, C, F, h, w), with the clips' frame counts and the
    timesteps its transformer trains on."""

    frames_factor = 4
    default_frames = 81

    def latents(self, vae: Any, pixels: Tensor, g: torch.Generator) -> Tensor:
        """x (B, C, F, h, w): the clips (B, 3, F, H, W) in the space the flow is drawn in."""
        raise NotImplementedError

    def timestep_range(self, parts: Any, args: Any) -> tuple[float, float] | None:
        """(low, high): the transformer trains on low <= t < high only; None: every timestep."""
        return None


class Wan(VideoFlowModel):
    family, pipelines = "wan", ("WanPipeline",)
    frames_factor, default_frames = 4, 81

    def latents(self, vae: Any, pixels: Tensor, g: torch.Generator) -> Tensor:
        x = vae.encode(pixels).latent_dist.mode()  # the mean, as Wan's own VAE encodes and the I2V pipeline
        return normalise(x, vae.config.latents_mean, vae.config.latents_std)

    def encode(self, parts: Any, captions: list[str], args: Any, device: torch.device) -> Any:
        return encode_wan(parts, captions, args.max_sequence_length, device)

    def timestep_range(self, parts: Any, args: Any) -> tuple[float, float] | None:
        """Wan 2.2 A14B: the high-noise `transformer` denoises t ≥ boundary_ratio · num_train_timesteps, the
        low-noise `transformer_2` (--train_transformer_2) the timesteps below."""
        config = getattr(parts, "config", None)
        ratio = getattr(config, "boundary_ratio", None) if config is not None else None
        if ratio is None or getattr(parts, "transformer_2", None) is None:
            return None
        if getattr(args, "train_transformer_2", False):
            return 0.0, ratio * 1000.0
        return ratio * 1000.0, float("inf")

    def velocity(self, parts: Any, noisy: Tensor, timesteps: Tensor, cond: Any, args: Any,
                 device: torch.device) -> Tensor:
        b, _, f, h, w = noisy.shape
        config = getattr(parts, "config", None)
        t = timesteps.to(device)
        if config is not None and getattr(config, "expand_timesteps", False):  # Wan 2.2 TI2V: one per token
            _, ph, pw = model_config(parts.transformer).patch_size
            t = t.view(b, 1).expand(b, f * (h // ph) * (w // pw))
        return parts.transformer(hidden_states=noisy, timestep=t, encoder_hidden_states=cond.to(noisy.dtype),
                                 return_dict=False)[0]


class LTXVideo(VideoFlowModel):
    family, pipelines = "ltxvideo", ("LTXPipeline",)
    frames_factor, default_frames = 8, 161

    def latents(self, vae: Any, pixels: Tensor, g: torch.Generator) -> Tensor:
        x = vae.encode(pixels).latent_dist.sample(generator=g)
        return normalise(x, vae.latents_mean, vae.latents_std, vae.config.scaling_factor)

    def encode(self, parts: Any, captions: list[str], args: Any, device: torch.device) -> Any:
        return encode_ltx(parts, captions, args.max_sequence_length, device)

    def velocity(self, parts: Any, noisy: Tensor, timesteps: Tensor, cond: Any, args: Any,
                 device: torch.device) -> Tensor:
        from diffusers import LTXPipeline

        states, mask = cond
        _, _, f, h, w = noisy.shape
        config = model_config(parts.transformer)
        p, pt = config.patch_size, config.patch_size_t
        vae = parts.vae
        scale = (vae.temporal_compression_ratio / getattr(args, "frame_rate", 25), vae.spatial_compression_ratio,
                 vae.spatial_compression_ratio)
        pred = parts.transformer(hidden_states=LTXPipeline._pack_latents(noisy, p, pt),
                                 encoder_hidden_states=states.to(noisy.dtype), timestep=timesteps.to(device),
                                 encoder_attention_mask=mask, num_frames=f, height=h, width=w,
                                 rope_interpolation_scale=scale, return_dict=False)[0]
        return LTXPipeline._unpack_latents(pred, f // pt, h // p, w // p, p, pt)


class HunyuanVideo(VideoFlowModel):
    """HunyuanVideo text-to-video (HunyuanVideoPipeline; its image-to-video pipelines condition on an image too)."""

    family, pipelines = "hunyuanvideo", ("HunyuanVideoPipeline",)
    frames_factor, default_frames = 4, 129
    guidance = 1.0  # the embedded guidance trained at: musubi-tuner's default (its pipeline samples at 6)

    def latents(self, vae: Any, pixels: Tensor, g: torch.Generator) -> Tensor:
        return vae.encode(pixels).latent_dist.sample(generator=g) * vae.config.scaling_factor

    def encode(self, parts: Any, captions: list[str], args: Any, device: torch.device) -> Any:
        return encode_hunyuanvideo(parts, captions, args.max_sequence_length, device)

    def velocity(self, parts: Any, noisy: Tensor, timesteps: Tensor, cond: Any, args: Any,
                 device: torch.device) -> Tensor:
        states, mask, pooled = cond
        guidance = guidance_tensor(self, parts, args, noisy.shape[0], device, scale=1000.0)  # the pipeline's · 1000
        return parts.transformer(hidden_states=noisy, timestep=timesteps.to(device),
                                 encoder_hidden_states=states.to(noisy.dtype), encoder_attention_mask=mask,
                                 pooled_projections=pooled.to(noisy.dtype), guidance=guidance, return_dict=False)[0]


class HunyuanVideo15(VideoFlowModel):
    """HunyuanVideo 1.5 text to video. Its image-to-video pipeline conditions on a first frame and a SigLIP image
    embedding: not here."""

    family, pipelines = "hunyuanvideo15", ("HunyuanVideo15Pipeline",)
    frames_factor, default_frames = 4, 121  # the VAE's temporal_compression_ratio; the pipeline's num_frames

    def latents(self, vae: Any, pixels: Tensor, g: torch.Generator) -> Tensor:
        # the mode, as the I2V pipeline encodes its image; one clip at a time: diffusers 0.42.1's
        # HunyuanVideo15AttnBlock expands its causal mask to (B, S, S), which its (B, 1, S, d) attention cannot take
        # for B > 1
        x = torch.cat([vae.encode(clip.unsqueeze(0)).latent_dist.mode() for clip in pixels])
        return x * vae.config.scaling_factor

    def encode(self, parts: Any, captions: list[str], args: Any, device: torch.device) -> Any:
        return encode_hunyuanvideo15(parts, captions, args.max_sequence_length, device)

    def velocity(self, parts: Any, noisy: Tensor, timesteps: Tensor, cond: Any, args: Any,
                 device: torch.device) -> Tensor:
        embeds, mask, glyphs, glyph_mask = cond
        b, c, f, h, w = noisy.shape
        dtype = noisy.dtype
        # text to video: a zero condition latent and a zero mask channel after the noisy latents
        model_input = torch.cat([noisy, noisy.new_zeros(b, c + 1, f, h, w)], dim=1)
        image_embeds = noisy.new_zeros(b, HV15_IMAGE_TOKENS, model_config(parts.transformer).image_embed_dim)
        return parts.transformer(
            hidden_states=model_input, image_embeds=image_embeds, timestep=timesteps.to(device=device, dtype=dtype),
            encoder_hidden_states=embeds.to(dtype), encoder_attention_mask=mask.to(dtype),
            encoder_hidden_states_2=glyphs.to(dtype), encoder_attention_mask_2=glyph_mask.to(dtype),
            return_dict=False)[0]


class LTX2(VideoFlowModel):
    family, pipelines = "ltx2", ("LTX2Pipeline",)
    frames_factor, default_frames = 8, 121
    # Lightricks' video-only targets (ltx-trainer's training-modes guide): the video self / text attention and
    # feed-forward; `audio_attn1.to_k` and `audio_ff.net.2` do not end in `.attn1.to_k` / `.ff.net.2`
    attention = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
                 "attn2.to_v", "attn2.to_out.0")
    targets = (*attention, "ff.net.0.proj", "ff.net.2")

    def latents(self, vae: Any, pixels: Tensor, g: torch.Generator) -> Tensor:
        x = vae.encode(pixels).latent_dist.mode()  # the mean, as LTX2ImageToVideoPipeline encodes ("argmax")
        return normalise(x, vae.latents_mean, vae.latents_std, vae.config.scaling_factor)

    def encode(self, parts: Any, captions: list[str], args: Any, device: torch.device) -> Any:
        return encode_ltx2(parts, captions, args.max_sequence_length, device)

    def velocity(self, parts: Any, noisy: Tensor, timesteps: Tensor, cond: Any, args: Any,
                 device: torch.device) -> Tensor:
        from diffusers import LTX2Pipeline

        video_states, audio_states, mask = (c.to(noisy.dtype) if c.is_floating_point() else c for c in cond)
        b, _, f, h, w = noisy.shape
        config = model_config(parts.transformer)
        p, pt = config.patch_size, config.patch_size_t
        t = timesteps.to(device)
        # ltx-core's audio=None: with the cross attention off the video never reads the audio stream, which gets one
        # silent token (not none: attention kernels on empty sequences are not a given on every device)
        no_audio = noisy.new_zeros(b, 1, config.audio_in_channels)
        pred = parts.transformer(
            hidden_states=LTX2Pipeline._pack_latents(noisy, p, pt), audio_hidden_states=no_audio,
            encoder_hidden_states=video_states, audio_encoder_hidden_states=audio_states,
            timestep=t, sigma=t, encoder_attention_mask=mask, audio_encoder_attention_mask=mask, num_frames=f,
            height=h, width=w, fps=getattr(args, "frame_rate", 25.0), audio_num_frames=1, isolate_modalities=True,
            use_cross_timestep=True, return_dict=False)[0]
        return LTX2Pipeline._unpack_latents(pred, f // pt, h // p, w // p, p, pt)


VIDEO_FLOW_MODELS: tuple[VideoFlowModel, ...] = (Wan(), LTXVideo(), LTX2(), HunyuanVideo(), HunyuanVideo15())
