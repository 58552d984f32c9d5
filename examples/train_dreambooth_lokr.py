"""DreamBooth with LoKr for Stable Diffusion (SD1.x/2.x or SDXL, detected), with prior preservation.

The diffusers examples train_dreambooth_lora.py / train_dreambooth_lora_sdxl.py, for LoKr.

    accelerate launch examples/train_dreambooth_lokr.py \\
        --pretrained_model_name_or_path stabilityai/stable-diffusion-xl-base-1.0 \\
        --instance_data_dir ./dog --instance_prompt "a photo of sks dog" \\
        --with_prior_preservation --class_data_dir ./dogs --class_prompt "a photo of dog" \\
        --resolution 1024 --train_batch_size 1 --gradient_accumulation_steps 4 --max_train_steps 500 \\
        --mixed_precision bf16 --gradient_checkpointing --rank 16 --output_dir ./sks-dog-lokr
"""

import logging

from lokr_diffusers.training.run import main

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    result = main(__doc__.splitlines()[0], dreambooth=True)  # bad input: one line `error: ...`, exit code 2
    if result.files:
        print(f"done: {result.global_step} steps; files: {result.files}")
