"""Fine-tune Stable Diffusion (SD1.x/2.x or SDXL, detected) with LoKr on image-caption pairs.

The diffusers example train_text_to_image_lora.py, for LoKr: same argument names, separate LoKr
configs for the UNet and the text encoder(s), accelerate for mixed precision, accumulation and
multi-GPU. Writes pytorch_lokr_weights.safetensors (our layout), a ComfyUI/A1111 file and a model card.

    accelerate launch examples/train_text_to_image_lokr.py \\
        --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --train_data_dir ./my_images --resolution 512 --train_batch_size 1 --max_train_steps 1000 \\
        --rank 8 --use_effective_conv2d --unet_target_modules full --output_dir ./lokr-out
"""

import logging

from lokr_diffusers.training.run import main

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    result = main(__doc__.splitlines()[0], dreambooth=False)  # bad input: one line `error: ...`, exit code 2
    if result.files:
        print(f"done: {result.global_step} steps; files: {result.files}")
