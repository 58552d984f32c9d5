"""LoKr fine-tuning on accelerate: Stable Diffusion (SD1.x/2.x, SDXL) and the flow-matching transformers (FLUX.1,
SD3.x, FLUX.2 [klein], Z-Image): arguments, data, loop, checkpoints."""
