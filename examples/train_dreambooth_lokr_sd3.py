"""DreamBooth with LoKr for Stable Diffusion 3 / 3.5, flow matching, with prior preservation.

An alias of examples/train_dreambooth_lokr_flow.py (`lokr-diffusers-train-flow`), which trains every flow family
told from the model folder; kept under its old name.

diffusers' examples/dreambooth/train_dreambooth_lora_sd3.py, for LoKr: the same argument names
(--weighting_scheme, --precondition_outputs, --max_sequence_length, --lora_layers, ...) plus the LoKr
ones. --train_text_encoder trains both CLIP encoders; --no_t5 loads the pipeline without T5.

    accelerate launch examples/train_dreambooth_lokr_sd3.py \\
        --pretrained_model_name_or_path stabilityai/stable-diffusion-3.5-medium \\
        --instance_data_dir ./dog --instance_prompt "a photo of sks dog" \\
        --resolution 1024 --train_batch_size 1 --gradient_accumulation_steps 4 --max_train_steps 500 \\
        --mixed_precision bf16 --gradient_checkpointing --rank 16 --output_dir ./sks-dog-sd3
"""

import logging

from lokr_diffusers.training.run import main

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    result = main(__doc__.splitlines()[0], dreambooth=True, family="flow")  # bad input: `error: ...`, exit 2
    if result.files:
        print(f"done: {result.global_step} steps; files: {result.files}")
