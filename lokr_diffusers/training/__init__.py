"""LoKr fine-tuning for Stable Diffusion (SD1.x/2.x, SDXL) on accelerate: arguments, data, loop, checkpoints."""
