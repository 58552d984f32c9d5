"""What each flow-matching family's training needs beyond the shared loss (flow.py): how its latents are made from
the VAE, how its prompts are encoded, and how its transformer is called on noisy latents. One `FlowModel` per family,
in `FLOW_MODELS` under the family's name (lokr_diffusers/families/); the loss never asks which family it trains.

Every piece works on latents of shape (B, C, h, w) in the space the flow is drawn in, x_σ = (1 − σ) · x + σ · ε, and
returns the transformer's velocity v ≈ ε − x in that same space. Facts read, never copied, from diffusers 0.42.1's
pipelines (FluxPipeline, StableDiffusion3Pipeline, Flux2KleinPipeline, ZImagePipeline, ChromaPipeline,
QwenImagePipeline, QwenImage21Pipeline, Lumina2Pipeline, HiDreamImagePipeline) and its train_dreambooth_lora_* scripts;
tests/test_training_flow*.py hold the encoders equal to the pipelines' `encode_prompt` and the velocities equal to
the pipelines' own denoising step.

    flux   (FLUX.1)   x = (VAE sample − shift) · scale, packed into 2x2 patches (B, h/2 · w/2, 4C) for the
                      transformer; timestep t / 1000; guidance when the model embeds it (dev); CLIP pooled + T5
    sd3    (SD3.x)    x as Flux; the transformer takes x_σ and t as they are; CLIP-L + CLIP-G (+ T5 or zeros);
                      --precondition_outputs compares x_σ − σ · v with x instead of v with ε − x
    flux2  (Klein)    x = the VAE mode patchified 2x2 (B, 4C, h/2, w/2), normalised by the VAE's BatchNorm running
                      statistics; tokens (B, h/2 · w/2, 4C) with (t, h, w, l) position ids; timestep t / 1000;
                      Qwen3 hidden states of --text_encoder_out_layers stacked on the channel axis
    zimage (Z-Image)  x = (VAE mode − shift) · scale; the transformer takes a list of (C, 1, h, w) latents, the
                      timestep (1000 − t) / 1000 = 1 − σ and a list of unpadded Qwen3 caption features, and predicts
                      x − ε (the pipeline negates it)
    chroma (Chroma)   x and packing as FLUX.1; timestep t / 1000; T5 (with its attention mask) and a mask that keeps
                      the caption and its first padding token, extended by the image tokens; no pooled text, no
                      guidance (diffusers has no Chroma script: FLUX.1's defaults)
    qwenimage         x = (VAE sample − latents_mean) / latents_std per channel (a one-frame video VAE), packed 2x2
      (Qwen-Image)    as FLUX.1 with img_shapes (1, h/2, w/2); timestep t / 1000; Qwen2.5-VL's last hidden state of
                      the chat-formatted caption less the template's 34 leading tokens, padded with a mask (None
                      when nothing is padded)
    qwenimage21       x = (VAE mode − latents_mean) / latents_std per channel of the RGBA image (RGB made opaque;
      (Qwen-Image     16x: h = H/16), unpacked: tokens (B, h · w, C) row-major after the text, img_shapes (1, h, w)
       2.1)           and one image slot per 2x2 latent tokens; timestep t / 1000; Qwen3-VL's last decoder layer
                      before its final norm, of the templated caption left-padded, the system turn's tokens dropped,
                      with a mask (None when nothing is padded); its output's last h · w tokens are v ≈ ε − x
    lumina2           x = (VAE sample − shift) · scale, unpacked (B, C, h, w); timestep 1 − σ; Gemma-2's
      (Lumina 2)      penultimate hidden state of "<system prompt> <Prompt Start> <caption>" with its mask; predicts
                      x − ε (the pipeline negates it). diffusers' script draws σ as the data's share (a reversed
                      lerp); here σ is the noise's, as the pipeline's schedule means it and every family here
    hidream           x as FLUX.1 (sampled), unpacked (B, C, h, w); the timestep t as it is; T5 states, every Llama
      (HiDream-I1)    layer's states (layers, B, L, D) and the two CLIPs' projected pooled vectors; predicts x − ε
                      (the pipeline and diffusers' script negate it)
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .flow_common import FlowModel, guidance_tensor, model_config, normalise, pack_2x2, shift_scale, unpack_2x2


def _ids(tokenizer: Any, captions: list[str], length: int, device: torch.device) -> Tensor:
    return tokenizer(captions, padding="max_length", max_length=length, truncation=True,
                     return_tensors="pt").input_ids.to(device)


# ------------------------------------------------------------------------------------------- prompt encoders

def encode_flux(parts: Any, captions: list[str], max_sequence_length: int, device: torch.device
                ) -> tuple[Tensor, Tensor, Tensor]:
    """(T5 sequence (B, L, D_t5), CLIP pooled (B, D_clip), text ids (L, 3) zeros), as FluxPipeline."""
    pooled = parts.text_encoder(_ids(parts.tokenizer, captions, parts.tokenizer.model_max_length, device),
                                output_hidden_states=False).pooler_output
    embeds = parts.text_encoder_2(_ids(parts.tokenizer_2, captions, max_sequence_length, device),
                                  output_hidden_states=False)[0]
    return embeds, pooled, torch.zeros(embeds.shape[1], 3, device=device, dtype=embeds.dtype)


def encode_sd3(parts: Any, captions: list[str], max_sequence_length: int, device: torch.device,
               joint_attention_dim: int) -> tuple[Tensor, Tensor]:
    """(sequence (B, 77 + L, D), pooled (B, P_l + P_g)), as StableDiffusion3Pipeline: CLIP-L and CLIP-G
    penultimate hidden states side by side, zero-padded to T5's width, then the T5 sequence (zeros
    (B, L, joint_attention_dim) without T5)."""
    clip, pooled = [], []
    for tok, te in ((parts.tokenizer, parts.text_encoder), (parts.tokenizer_2, parts.text_encoder_2)):
        out = te(_ids(tok, captions, tok.model_max_length, device), output_hidden_states=True)
        pooled.append(out[0])  # CLIPTextModelWithProjection: the projected pooled vector
        clip.append(out.hidden_states[-2])
    clip_embeds = torch.cat(clip, dim=-1)
    if getattr(parts, "text_encoder_3", None) is None:
        t5 = torch.zeros(len(captions), max_sequence_length, joint_attention_dim, device=device,
                         dtype=clip_embeds.dtype)
    else:
        t5 = parts.text_encoder_3(_ids(parts.tokenizer_3, captions, max_sequence_length, device))[0]
    clip_embeds = F.pad(clip_embeds, (0, t5.shape[-1] - clip_embeds.shape[-1]))
    return torch.cat([clip_embeds, t5.to(clip_embeds.dtype)], dim=-2), torch.cat(pooled, dim=-1)


def _qwen_chat(parts: Any, captions: list[str], max_sequence_length: int, device: torch.device,
               thinking: bool) -> tuple[Tensor, Tensor]:
    """(input ids, attention mask) (B, L) of each caption as one user turn of Qwen3's chat template with the
    generation prompt (`enable_thinking` False for Klein, True for Z-Image), padded to `max_sequence_length`."""
    tok = parts.tokenizer
    texts = [tok.apply_chat_template([{"role": "user", "content": c}], tokenize=False, add_generation_prompt=True,
                                     enable_thinking=thinking) for c in captions]
    enc = tok(texts, padding="max_length", max_length=max_sequence_length, truncation=True, return_tensors="pt")
    return enc.input_ids.to(device), enc.attention_mask.to(device)


def encode_klein(parts: Any, captions: list[str], max_sequence_length: int, device: torch.device,
                 layers: tuple[int, ...] = (9, 18, 27)) -> tuple[Tensor, Tensor]:
    """(text states (B, L, len(layers) · D), text ids (B, L, 4)), as Flux2KleinPipeline.encode_prompt: the Qwen3
    hidden states `layers` of the chat-formatted caption, side by side per token; ids (0, 0, 0, token index)."""
    ids, mask = _qwen_chat(parts, captions, max_sequence_length, device, thinking=False)
    out = parts.text_encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
    embeds = torch.cat([out.hidden_states[k] for k in layers], dim=-1)  # per token: layer 0's D, layer 1's D, ...
    b, n = embeds.shape[:2]
    text_ids = torch.zeros(n, 4, dtype=torch.long, device=device)
    text_ids[:, 3] = torch.arange(n, device=device)
    return embeds, text_ids.unsqueeze(0).expand(b, n, 4)


def encode_zimage(parts: Any, captions: list[str], max_sequence_length: int, device: torch.device) -> list[Tensor]:
    """One (L_i, D) tensor per caption, as ZImagePipeline.encode_prompt: Qwen3's penultimate hidden state of the
    chat-formatted caption (thinking enabled), its padding dropped."""
    ids, mask = _qwen_chat(parts, captions, max_sequence_length, device, thinking=True)
    keep = mask.bool()
    states = parts.text_encoder(input_ids=ids, attention_mask=keep, output_hidden_states=True).hidden_states[-2]
    return [s[k] for s, k in zip(states, keep, strict=True)]


def encode_chroma(parts: Any, captions: list[str], max_sequence_length: int, device: torch.device
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """(T5 sequence (B, L, D), text ids (L, 3) zeros, attention mask (B, L) 0 / 1), as ChromaPipeline.encode_prompt:
    T5 run with its padding masked, and a mask that keeps each caption's tokens and its first padding token."""
    enc = parts.tokenizer(captions, padding="max_length", max_length=max_sequence_length, truncation=True,
                          return_tensors="pt")
    mask = enc.attention_mask.to(device)
    embeds = parts.text_encoder(enc.input_ids.to(device), output_hidden_states=False, attention_mask=mask)[0]
    keep = torch.arange(mask.shape[1], device=device).unsqueeze(0) <= mask.sum(dim=1, keepdim=True)
    return embeds, torch.zeros(embeds.shape[1], 3, device=device, dtype=embeds.dtype), keep.to(embeds.dtype)


# Qwen-Image's prompt: its chat template with this system turn; the encoder's states of the template's first
# QWEN_DROP tokens (the system turn and the user turn's opening) are dropped (QwenImagePipeline, diffusers 0.42.1)
QWEN_TEMPLATE = ("<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, "
                 "text, spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}"
                 "<|im_end|>\n<|im_start|>assistant\n")
QWEN_DROP = 34
QWEN_TOKENS = 1024  # the most caption tokens the pipeline encodes


def encode_qwenimage(parts: Any, captions: list[str], max_sequence_length: int, device: torch.device
                     ) -> tuple[Tensor, Tensor | None]:
    """(states (B, L, D), mask (B, L) or None when no caption is padded), as QwenImagePipeline.encode_prompt: the
    Qwen2.5-VL last hidden state of each templated caption, its padding and the template's first QWEN_DROP tokens
    removed, the captions zero-padded to the longest and cut at `max_sequence_length`."""
    enc = parts.tokenizer([QWEN_TEMPLATE.format(c) for c in captions], max_length=QWEN_TOKENS + QWEN_DROP,
                          padding=True, truncation=True, return_tensors="pt")
    ids, mask = enc.input_ids.to(device), enc.attention_mask.to(device)
    states = parts.text_encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
    kept = [s[m.bool()][QWEN_DROP:] for s, m in zip(states, mask, strict=True)]
    n = max(k.shape[0] for k in kept)
    embeds = torch.stack([F.pad(k, (0, 0, 0, n - k.shape[0])) for k in kept])[:, :max_sequence_length]
    keep = torch.stack([(torch.arange(n, device=device) < k.shape[0]).long() for k in kept])[:, :max_sequence_length]
    return embeds, None if bool(keep.all()) else keep


# Qwen-Image 2.1's text-to-image prompt: a raw template (not the processor's chat template) with this system turn;
# the encoder's states of the system turn's tokens, as the processor's chat template tokenizes that turn alone, are
# dropped (QwenImage21Pipeline, diffusers 0.42.1)
QWEN21_SYSTEM = "Comprehend and analyze the provided prompt."
QWEN21_TEMPLATE = (f"<|im_start|>system\n{QWEN21_SYSTEM}<|im_end|>\n<|im_start|>user\n{{}}<|im_end|>\n"
                   "<|im_start|>assistant\n")


def encode_qwenimage21(parts: Any, captions: list[str], max_sequence_length: int, device: torch.device
                       ) -> tuple[Tensor, Tensor | None, Tensor]:
    """(states (B, L, D), mask (B, L) or None when no caption is padded, image slots (B, L) bool, all False), as
    QwenImage21Pipeline.encode_prompt for a text-to-image prompt: the Qwen3-VL last decoder layer's output (before
    the final norm: the pipeline hooks the norm out) for each templated caption, the batch padded on the left as the
    pipeline's processor call does, each caption's padding and system-turn tokens removed, zero-padded on the right
    to the longest; then cut at `max_sequence_length` tokens (the pipeline does not cut: equal for shorter
    captions). The image slots are the `<|image_pad|>` positions the transformer's `img_mask` starts with."""
    processor = parts.processor
    texts = [QWEN21_TEMPLATE.format(c or " ") for c in captions]  # an empty caption is a space, as the pipeline's
    system = [{"role": "system", "content": [{"type": "text", "text": QWEN21_SYSTEM}]}]
    drop = len(processor.apply_chat_template(system, tokenize=True, return_dict=False)[0])
    image_pad = processor.tokenizer.encode("<|image_pad|>")[0]
    enc = processor(text=texts, padding=True, padding_side="left", return_tensors="pt").to(device)
    inputs = {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask, "output_hidden_states": True}
    if "mm_token_type_ids" in enc:  # Qwen3-VL's rope index reads it
        inputs["mm_token_type_ids"] = enc.mm_token_type_ids
    encoder = getattr(parts.text_encoder, "module", parts.text_encoder)
    text_model = getattr(encoder.model, "language_model", encoder.model)
    handle = text_model.norm.register_forward_hook(lambda module, args, output: args[0])  # its input, unnormed
    try:
        states = parts.text_encoder(**inputs).hidden_states[-1]
    finally:
        handle.remove()
    masks = enc.attention_mask.bool()
    kept = [s[m][drop:] for s, m in zip(states, masks, strict=True)]
    slots = [(ids[m] == image_pad)[drop:] for ids, m in zip(enc.input_ids, masks, strict=True)]
    n = max(k.shape[0] for k in kept)
    embeds = torch.stack([F.pad(k, (0, 0, 0, n - k.shape[0])) for k in kept])[:, :max_sequence_length]
    keep = torch.stack([(torch.arange(n, device=device) < k.shape[0]).long() for k in kept])[:, :max_sequence_length]
    image = torch.stack([F.pad(s, (0, n - s.shape[0])) for s in slots])[:, :max_sequence_length]
    return embeds, None if bool(keep.all()) else keep, image


# Lumina 2's system prompt before every caption (Lumina2Pipeline's default, diffusers 0.42.1)
LUMINA2_SYSTEM = ("You are an assistant designed to generate superior images with the superior degree of image-text "
                  "alignment based on textual prompts or user prompts.")


def encode_lumina2(parts: Any, captions: list[str], max_sequence_length: int, device: torch.device
                   ) -> tuple[Tensor, Tensor]:
    """(states (B, L, D), mask (B, L)), as Lumina2Pipeline.encode_prompt: Gemma-2's penultimate hidden state of
    "<system prompt> <Prompt Start> <caption>", padded to `max_sequence_length`, and its attention mask."""
    enc = parts.tokenizer([f"{LUMINA2_SYSTEM} <Prompt Start> {c}" for c in captions], padding="max_length",
                          max_length=max_sequence_length, truncation=True, return_tensors="pt")
    mask = enc.attention_mask.to(device)
    states = parts.text_encoder(enc.input_ids.to(device), attention_mask=mask, output_hidden_states=True)
    return states.hidden_states[-2], mask


def encode_hidream(parts: Any, captions: list[str], max_sequence_length: int, device: torch.device
                   ) -> tuple[Tensor, Tensor, Tensor]:
    """(T5 states (B, L, D_t5), Llama states (layers, B, L, D_llama), pooled (B, P_l + P_g)), as
    HiDreamImagePipeline.encode_prompt: T5 with its padding masked; every Llama layer's hidden state past the
    embeddings, stacked in front; the projected pooled vectors of both CLIPs side by side (their prompts cut at
    min(max_sequence_length, 218) tokens, T5's and the Llama's at their tokenizers' limit)."""
    pooled = []
    for tok, te in ((parts.tokenizer, parts.text_encoder), (parts.tokenizer_2, parts.text_encoder_2)):
        pooled.append(te(_ids(tok, captions, min(max_sequence_length, 218), device))[0])
    t5 = parts.tokenizer_3(captions, padding="max_length", truncation=True, return_tensors="pt",
                           max_length=min(max_sequence_length, parts.tokenizer_3.model_max_length))
    t5_states = parts.text_encoder_3(t5.input_ids.to(device), attention_mask=t5.attention_mask.to(device))[0]
    llama = parts.tokenizer_4(captions, padding="max_length", truncation=True, return_tensors="pt",
                              max_length=min(max_sequence_length, parts.tokenizer_4.model_max_length))
    out = parts.text_encoder_4(llama.input_ids.to(device), attention_mask=llama.attention_mask.to(device),
                               output_hidden_states=True)
    return t5_states, torch.stack(out.hidden_states[1:], dim=0), torch.cat(pooled, dim=-1)


# ------------------------------------------------------------------------------------------------ the pieces

class Flux1(FlowModel):
    family, pipelines = "flux", ()

    def encode(self, parts: Any, captions: list[str], args: Any, device: torch.device) -> Any:
        return encode_flux(parts, captions, args.max_sequence_length, device)

    def velocity(self, parts: Any, noisy: Tensor, timesteps: Tensor, cond: Any, args: Any,
                 device: torch.device) -> Tensor:
        from diffusers import FluxPipeline

        embeds, pooled, text_ids = cond
        b, c, h, w = noisy.shape
        packed = FluxPipeline._pack_latents(noisy, b, c, h, w)  # (B, h/2 · w/2, 4C)
        image_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, device, noisy.dtype)
        guidance = guidance_tensor(self, parts, args, b, device)
        pred = parts.transformer(hidden_states=packed, timestep=timesteps / 1000, guidance=guidance,
                                 pooled_projections=pooled.to(noisy.dtype),
                                 encoder_hidden_states=embeds.to(noisy.dtype), txt_ids=text_ids, img_ids=image_ids,
                                 return_dict=False)[0]
        vae_scale = 2 ** (len(parts.vae.config.block_out_channels) - 1)
        return FluxPipeline._unpack_latents(pred, h * vae_scale, w * vae_scale, vae_scale)


class SD3(FlowModel):
    family, pipelines = "sd3", ()

    def encode(self, parts: Any, captions: list[str], args: Any, device: torch.device) -> Any:
        return encode_sd3(parts, captions, args.max_sequence_length, device,
                          model_config(parts.transformer).joint_attention_dim)

    def velocity(self, parts: Any, noisy: Tensor, timesteps: Tensor, cond: Any, args: Any,
                 device: torch.device) -> Tensor:
        embeds, pooled = cond
        return parts.transformer(hidden_states=noisy, timestep=timesteps, encoder_hidden_states=embeds.to(noisy.dtype),
                                 pooled_projections=pooled.to(noisy.dtype), return_dict=False)[0]

    def objective(self, pred: Tensor, noisy: Tensor, sigmas: Tensor, latents: Tensor, noise: Tensor,
                  args: Any) -> tuple[Tensor, Tensor]:
        if args.precondition_outputs:  # diffusers' SD3 script: the denoised latents against x
            return noisy - sigmas * pred, latents
        return pred, noise - latents


class Flux2Klein(FlowModel):
    """FLUX.2 [klein]. FLUX.2 [dev] (Flux2Pipeline) encodes its prompts with Mistral-3 in another way: not here."""

    family, pipelines = "flux2", ("Flux2KleinPipeline",)

    def latents(self, vae: Any, pixels: Tensor, g: torch.Generator) -> Tensor:
        x = vae.encode(pixels).latent_dist.mode()  # diffusers' Klein script and pipeline: the mode
        b, c, h, w = x.shape
        x = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2)
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(x)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(x)
        return (x - mean) / std

    def encode(self, parts: Any, captions: list[str], args: Any, device: torch.device) -> Any:
        return encode_klein(parts, captions, args.max_sequence_length, device,
                            tuple(getattr(args, "text_encoder_out_layers", None) or (9, 18, 27)))

    def velocity(self, parts: Any, noisy: Tensor, timesteps: Tensor, cond: Any, args: Any,
                 device: torch.device) -> Tensor:
        embeds, text_ids = cond
        b, c, h, w = noisy.shape
        tokens = noisy.reshape(b, c, h * w).permute(0, 2, 1)  # row-major over (h, w)
        grid = torch.cartesian_prod(torch.arange(h, device=device), torch.arange(w, device=device))  # (h · w, 2)
        image_ids = F.pad(grid, (1, 1)).unsqueeze(0).expand(b, h * w, 4)  # (t=0, row, column, l=0)
        guidance = guidance_tensor(self, parts, args, b, device)
        pred = parts.transformer(hidden_states=tokens, encoder_hidden_states=embeds.to(noisy.dtype),
                                 timestep=timesteps / 1000, img_ids=image_ids, txt_ids=text_ids, guidance=guidance,
                                 return_dict=False)[0]
        return pred.permute(0, 2, 1).reshape(b, c, h, w)


class ZImage(FlowModel):
    family, pipelines = "zimage", ()
    attention = ("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0")  # no `attn.` modules

    def latents(self, vae: Any, pixels: Tensor, g: torch.Generator) -> Tensor:
        return shift_scale(vae, vae.encode(pixels).latent_dist.mode())  # diffusers' Z-Image script: the mode

    def encode(self, parts: Any, captions: list[str], args: Any, device: torch.device) -> Any:
        return encode_zimage(parts, captions, args.max_sequence_length, device)

    def velocity(self, parts: Any, noisy: Tensor, timesteps: Tensor, cond: Any, args: Any,
                 device: torch.device) -> Tensor:
        frames = list(noisy.unsqueeze(2).unbind(0))  # B tensors (C, 1, h, w): one frame each
        out = parts.transformer(frames, (1000 - timesteps) / 1000, [c.to(noisy.dtype) for c in cond],
                                return_dict=False)[0]
        return -torch.stack(out).squeeze(2)  # it predicts x − ε


class Chroma(FlowModel):
    family, pipelines = "chroma", ()  # its three pipelines encode prompts alike

    def encode(self, parts: Any, captions: list[str], args: Any, device: torch.device) -> Any:
        return encode_chroma(parts, captions, args.max_sequence_length, device)

    def velocity(self, parts: Any, noisy: Tensor, timesteps: Tensor, cond: Any, args: Any,
                 device: torch.device) -> Tensor:
        from diffusers import FluxPipeline

        embeds, text_ids, mask = cond
        b, _, h, w = noisy.shape
        image_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, device, noisy.dtype)
        # the text mask, then every image token attended
        mask = torch.cat([mask.to(noisy.dtype), mask.new_ones(b, (h // 2) * (w // 2)).to(noisy.dtype)], dim=1)
        pred = parts.transformer(hidden_states=pack_2x2(noisy), timestep=timesteps / 1000,
                                 encoder_hidden_states=embeds.to(noisy.dtype), txt_ids=text_ids, img_ids=image_ids,
                                 attention_mask=mask, return_dict=False)[0]
        return unpack_2x2(pred, h, w)


class QwenImage(FlowModel):
    """Qwen-Image. Its edit / layered / ControlNet pipelines condition on images too: not here."""

    family, pipelines = "qwenimage", ("QwenImagePipeline", "QwenImageImg2ImgPipeline", "QwenImageInpaintPipeline")

    def latents(self, vae: Any, pixels: Tensor, g: torch.Generator) -> Tensor:
        x = vae.encode(pixels.unsqueeze(2)).latent_dist.sample(generator=g).squeeze(2)  # one frame
        return normalise(x, vae.config.latents_mean, vae.config.latents_std)

    def encode(self, parts: Any, captions: list[str], args: Any, device: torch.device) -> Any:
        return encode_qwenimage(parts, captions, args.max_sequence_length, device)

    def velocity(self, parts: Any, noisy: Tensor, timesteps: Tensor, cond: Any, args: Any,
                 device: torch.device) -> Tensor:
        embeds, mask = cond
        b, _, h, w = noisy.shape
        guidance = guidance_tensor(self, parts, args, b, device)
        pred = parts.transformer(hidden_states=pack_2x2(noisy), timestep=timesteps / 1000, guidance=guidance,
                                 encoder_hidden_states=embeds.to(noisy.dtype), encoder_hidden_states_mask=mask,
                                 img_shapes=[[(1, h // 2, w // 2)]] * b, return_dict=False)[0]
        return unpack_2x2(pred, h, w)


class QwenImage21(FlowModel):
    """Qwen-Image 2.1, text to image. Its condition images (the pipeline's `image`) are not trained here."""

    family, pipelines = "qwenimage21", ("QwenImage21Pipeline",)
    attention = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0")  # one stream: no add_* projections
    latent_multiple = 2  # each image slot of the text sequence stands for 2x2 latent tokens

    def latents(self, vae: Any, pixels: Tensor, g: torch.Generator) -> Tensor:
        # the VAE reads RGBA: an RGB image is opaque (alpha 1 in [-1, 1]), as the pipeline's convert("RGBA"); the
        # posterior's mode, normalised per channel (the pipeline's _encode_vae_image, its only image encoding)
        channels = vae.config.in_channels // (vae.config.patch_size or 1) ** 2
        if pixels.shape[1] < channels:
            pixels = torch.cat([pixels, pixels.new_ones(pixels.shape[0], channels - pixels.shape[1],
                                                        *pixels.shape[2:])], dim=1)
        x = vae.encode(pixels.unsqueeze(2)).latent_dist.mode().squeeze(2)  # one frame
        return normalise(x, vae.config.latents_mean, vae.config.latents_std)

    def encode(self, parts: Any, captions: list[str], args: Any, device: torch.device) -> Any:
        return encode_qwenimage21(parts, captions, args.max_sequence_length, device)

    def velocity(self, parts: Any, noisy: Tensor, timesteps: Tensor, cond: Any, args: Any,
                 device: torch.device) -> Tensor:
        embeds, mask, image = cond
        b, c, h, w = noisy.shape
        tokens = noisy.reshape(b, c, h * w).transpose(1, 2)  # (B, h · w, C), row-major: no patches
        # the text's image slots, then one slot per 2x2 group of the target's latent tokens, appended
        slots = torch.cat([image, image.new_ones(b, h * w // 4)], dim=1)
        pred = parts.transformer(hidden_states=tokens, timestep=timesteps / 1000,
                                 encoder_hidden_states=embeds.to(noisy.dtype), encoder_hidden_states_mask=mask,
                                 img_shapes=[[(1, h, w)]] * b, img_mask=slots, return_dict=False)[0]
        return pred[:, -h * w:].transpose(1, 2).reshape(b, c, h, w)  # the target's tokens end the joint sequence


class Lumina2(FlowModel):
    family, pipelines = "lumina2", ()

    def latents(self, vae: Any, pixels: Tensor, g: torch.Generator) -> Tensor:
        return shift_scale(vae, vae.encode(pixels).latent_dist.sample(generator=g))  # diffusers' script: a sample

    def encode(self, parts: Any, captions: list[str], args: Any, device: torch.device) -> Any:
        return encode_lumina2(parts, captions, args.max_sequence_length, device)

    def velocity(self, parts: Any, noisy: Tensor, timesteps: Tensor, cond: Any, args: Any,
                 device: torch.device) -> Tensor:
        embeds, mask = cond
        pred = parts.transformer(hidden_states=noisy, timestep=1 - timesteps / 1000,
                                 encoder_hidden_states=embeds.to(noisy.dtype), encoder_attention_mask=mask,
                                 return_dict=False)[0]
        return -pred  # it predicts x − ε


class HiDream(FlowModel):
    """HiDream-I1 (diffusers' train_dreambooth_lora_hidream.py: x as FLUX.1's, sampled; the timestep as it is)."""

    family, pipelines = "hidream", ()
    attention = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out", "attn1.to_q_t", "attn1.to_k_t",
                 "attn1.to_v_t", "attn1.to_out_t")  # the image stream's, then the text stream's (double blocks)

    missing_hint = "HiDream-I1's Llama-3.1: --pretrained_text_encoder_4_name_or_path"

    def supplies(self, args: Any) -> set[str]:
        llama = {"text_encoder_4", "tokenizer_4"} if getattr(args, "pretrained_text_encoder_4_name_or_path", None) \
            else set()
        return {"transformer", *llama}

    def load_components(self, args: Any) -> dict[str, Any]:
        """The transformer loaded with force_inference_output=True, as diffusers' script loads it: in train mode it
        would otherwise return tokens (B, C, h/2 · w/2, 4) and route its mixture of experts through the
        load-balancing loss, whose gradient reaches the layers below. The Llama-3.1 text encoder and tokenizer from
        --pretrained_text_encoder_4_name_or_path when given (HiDream's own folders leave them out; Llama 3's
        tokenizer, which has no padding token, pads with its end token, as diffusers' script)."""
        from diffusers import HiDreamImageTransformer2DModel

        transformer = HiDreamImageTransformer2DModel.from_pretrained(
            args.pretrained_model_name_or_path, subfolder="transformer", revision=args.revision, variant=args.variant,
            force_inference_output=True)
        encoder = getattr(args, "pretrained_text_encoder_4_name_or_path", None)
        if not encoder:
            return {"transformer": transformer}
        from transformers import AutoTokenizer, LlamaForCausalLM

        tokenizer = AutoTokenizer.from_pretrained(getattr(args, "pretrained_tokenizer_4_name_or_path", None) or encoder)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return {"transformer": transformer, "text_encoder_4": LlamaForCausalLM.from_pretrained(encoder),
                "tokenizer_4": tokenizer}

    def encode(self, parts: Any, captions: list[str], args: Any, device: torch.device) -> Any:
        return encode_hidream(parts, captions, args.max_sequence_length, device)

    def velocity(self, parts: Any, noisy: Tensor, timesteps: Tensor, cond: Any, args: Any,
                 device: torch.device) -> Tensor:
        t5, llama, pooled = cond
        dtype = noisy.dtype
        pred = parts.transformer(hidden_states=noisy, timesteps=timesteps, encoder_hidden_states_t5=t5.to(dtype),
                                 encoder_hidden_states_llama3=llama.to(dtype), pooled_embeds=pooled.to(dtype),
                                 return_dict=False)[0]
        return -pred  # it predicts x − ε


FLOW_MODELS: dict[str, FlowModel] = {m.family: m for m in (Flux1(), SD3(), Flux2Klein(), ZImage(), Chroma(),
                                                           QwenImage(), QwenImage21(), Lumina2(), HiDream())}


def flow_model(family: str) -> FlowModel:
    """The piece of `family`; ValueError naming the families that have one."""
    if family not in FLOW_MODELS:
        raise ValueError(f"no flow-matching training for the model family {family!r}; one of {tuple(FLOW_MODELS)}")
    return FLOW_MODELS[family]


# the video families (Wan, LTX-Video, HunyuanVideo, HunyuanVideo 1.5): their own module, registered here
from .flow_video import VIDEO_FLOW_MODELS  # noqa: E402

FLOW_MODELS.update({m.family: m for m in VIDEO_FLOW_MODELS})
