"""Test oracles and fixtures shared by the test modules (import them as `from helpers.<module> import ...`).

Oracles, written from the formulas and the consumers' rules, never from the package's code:
- `references.py`: ComfyUI's and A1111's weight rules per module (scale, DoRA), written from docs/formats.md.
- `sd_export.py`: the SD1.x / SDXL export tests' references: ComfyUI's, A1111's and LyCORIS' weight rules on
  whole modules (at strengths, DoRA on either axis) and the kohya / ldm names built forward from the model.
- `comfyui_dit.py`: ComfyUI's loading of DiT files (its key maps, fused originals, the adaLN swap).
- `writers.py`: LoKr files in each layout as the trainers write them (kohya, LyCORIS, SimpleTuner, ...).
- `lycoris_files.py`: real files written by LyCORIS itself.
- `dit_files.py`: files in the DiT families' original layouts (fused originals as rows of diffusers' modules,
  tables by hand from diffusers' single-file converters and ComfyUI's key maps) and ComfyUI's result for them.

Fixtures:
- `tiny_dit.py`: tiny Flux.1 / SD3 / Flux.2 Klein / Z-Image pipelines built in code (tokenizers included).
- `generic_dit.py`: tiny transformers no family names (CogView4, Sana, Mochi, Cosmos), inputs, pipelines.
- `dit_models.py`: tiny DiT transformers and their inputs; `fullsize_dit.py` / `fullsize_files.py`:
  full-size configs on the meta device and files covering them.
- `state_sources.py`: pipelines and files for the adapter-state and diffusers-API tests.
- `sd_adapters.py`: a tiny SD1.x / SDXL pipeline holding an adapter of every factor kind, and its outputs.
- `sd_export.py` (also): the export tests' source pipeline (`export_source`, `cached_sources`).
- `bad_files.py`: valid LoKr files and the bad inputs made from them, the state a failed load must leave.
- `training_faults.py`: image folders, a tiny model and its checkpoints, damage to a checkpoint's files.
- `fullsize_sd.py`: full-size SD1.5 / SD2.1 / SDXL components on the meta device, from published configs.
- `flow_loss.py`: the flow-matching loss on a fixed batch, for the Flux.1 / SD3 training tests.
- `file_memory.py`: weights read from safetensors in memory of their own, files rewritten in place.
- `permissions.py`: read-only folders that root obeys too.
- `shared_fixtures.py`: the pytest fixtures of modules split by concern (`sources`, `env`, `template`, `ctx`),
  registered in tests/conftest.py.
"""
