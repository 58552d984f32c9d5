"""Extraction at full size: a LoKr extracted from the change between two UNets, its time and peak memory.

The UNet is built from its published config (lokr_diffusers.architectures: SDXL's or SD1.5's) with random weights in
fp16 and saved as a pipeline folder holding the UNet alone (BASE); a random LoKr (r 8, the family's default targets)
is fused into it and saved again (TUNED). `lokr-diffusers extract` then runs in a fresh process, which is timed and
reports its own peak resident memory (VmHWM): the claim is that it holds one module at a time, far below two models.

    python benchmarks/bench_extract.py [--model sdxl|sd15] [--rank 8] [--keep DIR] [--json out.json]
    python benchmarks/bench_extract.py --tiny     # the same steps on the tiny SDXL UNet (seconds; tests use it)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

# The extraction's own peak: VmHWM of its process after exec (Linux), else ru_maxrss. A child's ru_maxrss as the
# parent reads it would include the parent's memory at fork time (this script held the UNet before).
CHILD = """
import resource, sys
from lokr_diffusers.cli import main
rc = main(sys.argv[1:])
try:
    with open("/proc/self/status") as fh:
        peak = next(int(line.split()[1]) for line in fh if line.startswith("VmHWM"))
except OSError:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print("PEAK_KIB", peak)
sys.exit(rc)
"""


def build(model: str, tiny: bool) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    if tiny:
        from lokr_diffusers import families

        return families.build_tiny("sdxl").unet.half()
    from lokr_diffusers.architectures import VARIANTS

    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)  # built in fp16: half the memory of an fp32 build
    try:
        return UNet2DConditionModel(**VARIANTS[model].config)
    finally:
        torch.set_default_dtype(previous)


def save_folder(unet: torch.nn.Module, folder: str, pipeline: str) -> None:
    unet.save_pretrained(os.path.join(folder, "unet"))
    with open(os.path.join(folder, "model_index.json"), "w", encoding="utf-8") as fh:
        json.dump({"_class_name": pipeline, "unet": ["diffusers", "UNet2DConditionModel"]}, fh)


def folder_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(folder) for f in files)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="sdxl", choices=["sdxl", "sd15"])
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--keep", help="a folder for BASE, TUNED and the file (default: a temporary one)")
    ap.add_argument("--json")
    args = ap.parse_args()
    from lokr_diffusers import LoKrConfig, LoKrModel

    root = args.keep or tempfile.mkdtemp(prefix="bench_extract_")
    base, tuned, out = (os.path.join(root, n) for n in ("base", "tuned", "lokr.safetensors"))
    pipeline = "StableDiffusionXLPipeline" if args.model == "sdxl" else "StableDiffusionPipeline"
    t0 = time.perf_counter()
    unet = build(args.model, args.tiny)
    save_folder(unet, base, pipeline)
    torch.manual_seed(1)
    cfg = LoKrConfig(r=args.rank, alpha=args.rank, init_weights=False)  # the UNet's default targets (attn + ff)
    model = LoKrModel(unet, cfg, "known")
    model.merge_and_unload()
    save_folder(unet, tuned, pipeline)
    weights = sum(p.numel() for p in unet.parameters())
    del unet, model
    prepared = time.perf_counter() - t0
    cmd = [sys.executable, "-c", CHILD, "extract", "--base", base, "--tuned", tuned, "--out", out,
           "--rank", str(args.rank)]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"extract failed:\n{done.stderr}")
    peak_kib = int(done.stdout.rsplit("PEAK_KIB", 1)[1].split()[0])
    with open(out[:-len(".safetensors")] + ".json", encoding="utf-8") as fh:
        report = json.load(fh)
    row = {"model": "tiny sdxl" if args.tiny else args.model, "weights": weights,
           "model_bytes_fp16": folder_bytes(os.path.join(base, "unet")), "extract_seconds": round(seconds, 1),
           "peak_rss_bytes": peak_kib * 1024, "modules": report["modules"],
           "skipped_unchanged": report["skipped_unchanged"], "error": report["error"],
           "parameters": report["parameters"], "prepare_seconds": round(prepared, 1),
           "threads": torch.get_num_threads(), "torch": torch.__version__}
    print(f"{row['model']}: {weights / 1e6:.0f}M weights ({row['model_bytes_fp16'] / 2**30:.2f} GiB per model in "
          f"fp16); extract {seconds:.1f} s, peak RSS {peak_kib / 2**20:.2f} GiB; {report['modules']} modules "
          f"extracted, {report['skipped_unchanged']} unchanged, total relative error {report['error']:.3g}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(row, fh, indent=1)


if __name__ == "__main__":
    main()
