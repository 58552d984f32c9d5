"""DreamBooth with LoKr for FLUX.1 (dev or schnell), flow matching, with prior preservation.

An alias of examples/train_dreambooth_lokr_flow.py (`lokr-diffusers-train-flow`), which trains every flow family
told from the model folder; kept under its old name.

diffusers' examples/dreambooth/train_dreambooth_lora_flux.py, for LoKr: the same argument names
(--guidance_scale, --weighting_scheme, --max_sequence_length, --lora_layers, ...) plus the LoKr ones
(--rank, --alpha, --decompose_factor, ...). --train_text_encoder trains CLIP, never T5.

    accelerate launch examples/train_dreambooth_lokr_flux.py \\
        --pretrained_model_name_or_path black-forest-labs/FLUX.1-dev \\
        --instance_data_dir ./dog --instance_prompt "a photo of sks dog" \\
        --resolution 512 --train_batch_size 1 --gradient_accumulation_steps 4 --max_train_steps 500 \\
        --mixed_precision bf16 --gradient_checkpointing --rank 16 --guidance_scale 1 --output_dir ./sks-dog-flux
"""

import logging

from lokr_diffusers.training.run import main

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    result = main(__doc__.splitlines()[0], dreambooth=True, family="flow")  # bad input: `error: ...`, exit 2
    if result.files:
        print(f"done: {result.global_step} steps; files: {result.files}")
