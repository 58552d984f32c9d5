"""DreamBooth with LoKr for the flow-matching models: FLUX.1, SD3.x, FLUX.2 [klein], Z-Image, with prior preservation.

One script for every flow family, told from the model folder (model_index.json: the pipeline class, else the
transformer's); installed as the `lokr-diffusers-train-flow` command. diffusers' train_dreambooth_lora_flux.py /
_sd3.py / _flux2_klein.py / _z_image.py argument names (--weighting_scheme, --max_sequence_length, --guidance_scale,
--precondition_outputs, --no_t5, --text_encoder_out_layers, --lora_layers, ...; the defaults that differ, the
family's) plus the LoKr ones (--rank, --alpha, --decompose_factor, ...). docs/training.md.

    accelerate launch examples/train_dreambooth_lokr_flow.py \\
        --pretrained_model_name_or_path black-forest-labs/FLUX.2-klein-base-4B \\
        --instance_data_dir ./dog --instance_prompt "a photo of sks dog" \\
        --resolution 1024 --train_batch_size 1 --gradient_accumulation_steps 4 --max_train_steps 500 \\
        --mixed_precision bf16 --gradient_checkpointing --rank 16 --output_dir ./sks-dog-klein
"""

import sys

from lokr_diffusers.training.run import flow_cli

if __name__ == "__main__":
    sys.exit(flow_cli())
