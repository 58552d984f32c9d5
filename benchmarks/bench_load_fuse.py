"""Load / fuse / unfuse time on a full-size SD1.5 UNet + text encoder (random weights): a rank-8 LoKr
on every attention/ff/proj module with lokr_diffusers, against a rank-8 LoRA on the same modules with
diffusers' own loader (PEFT backend), in one process. Medians of --repeats. Also checks that unfusing
the LoKr gives the base weights back bit for bit.

    python benchmarks/bench_load_fuse.py [--repeats 3] [--threads 2] [--device cuda] [--dtype fp16]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable

import torch
from safetensors.torch import save_file

TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
           "q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def _pipeline(device: str, dtype: torch.dtype):
    from diffusers import StableDiffusionPipeline

    from lokr_diffusers.architectures import meta_components

    comps = meta_components("sd1")
    for m in comps.values():
        m.to_empty(device="cpu")
        with torch.no_grad():
            for p in m.parameters():
                p.normal_(0, 0.02)
        m.to(device=device, dtype=dtype)
    return StableDiffusionPipeline(unet=comps["unet"], text_encoder=comps["text_encoder"], vae=None, tokenizer=None,
                                   scheduler=None, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def _files(pipe, folder: str) -> tuple[str, str, int]:
    """A kohya LoKr file and a kohya LoRA file naming the same modules (rank 8, random)."""
    from lokr_diffusers import functional as LF
    from lokr_diffusers.formats.names import iter_adaptable

    g = torch.Generator().manual_seed(0)
    lokr, lora, n = {}, {}, 0
    for comp, prefix in (("unet", "lora_unet_"), ("text_encoder", "lora_te_")):
        for path, module in iter_adaptable(getattr(pipe, comp)):
            if not path.endswith(TARGETS):
                continue
            name = prefix + (("text_model." if comp == "text_encoder" else "") + path).replace(".", "_")
            shape = tuple(module.weight.shape)
            for k, s in LF.plan_lokr(shape, 8).shapes().items():
                lokr[f"{name}.{k}"] = torch.randn(s, generator=g) * 0.01
            lokr[f"{name}.alpha"] = torch.tensor(8.0)
            lora[f"{name}.lora_down.weight"] = torch.randn(8, *shape[1:], generator=g) * 0.01
            lora[f"{name}.lora_up.weight"] = torch.randn(shape[0], 8, *([1] * (len(shape) - 2)), generator=g) * 0.01
            lora[f"{name}.alpha"] = torch.tensor(8.0)
            n += 1
    paths = os.path.join(folder, "lokr.safetensors"), os.path.join(folder, "lora.safetensors")
    save_file(lokr, paths[0])
    save_file(lora, paths[1])
    return paths[0], paths[1], n


def _time(fn: Callable[[], object], device: str) -> float:
    """Wall time of fn, the device's queue drained before and after (GPU work counts)."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import lokr_diffusers  # noqa: F401  (attaches the pipeline methods)

    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    pipe = _pipeline(args.device, dtype)
    exact = True
    times: dict[str, list[float]] = {k: [] for k in ("lokr load", "lokr fuse", "lokr unfuse", "lokr unload",
                                                     "lora load", "lora fuse", "lora unfuse", "lora unload")}
    with tempfile.TemporaryDirectory() as tmp:
        lokr_file, lora_file, n = _files(pipe, tmp)
        dev = args.device
        for _ in range(args.repeats):
            # diffusers' LoRA unfuse subtracts (not bit-exact): take the weights as each round starts
            before = {k: p.detach().clone() for k, p in pipe.unet.named_parameters()}
            times["lokr load"].append(_time(lambda: pipe.load_lokr_weights(lokr_file, adapter_name="k"), dev))
            times["lokr fuse"].append(_time(pipe.fuse_lokr, dev))
            times["lokr unfuse"].append(_time(pipe.unfuse_lokr, dev))
            times["lokr unload"].append(_time(pipe.unload_lokr_weights, dev))
            after = dict(pipe.unet.named_parameters())
            exact = exact and all(torch.equal(after[k], v) for k, v in before.items())
            times["lora load"].append(_time(lambda: pipe.load_lora_weights(lora_file, adapter_name="l"), dev))
            times["lora fuse"].append(_time(pipe.fuse_lora, dev))
            times["lora unfuse"].append(_time(pipe.unfuse_lora, dev))
            times["lora unload"].append(_time(pipe.unload_lora_weights, dev))
    med = {k: statistics.median(v) for k, v in times.items()}
    where = torch.cuda.get_device_name(dev) if dev.startswith("cuda") else f"CPU, {args.threads} threads"
    print(f"SD1.5 UNet + CLIP-L, {n} modules, rank 8, {args.dtype}, {where}, median of {args.repeats}; "
          f"LoKr unfuse bit-exact: {exact}")
    for op in ("load", "fuse", "unfuse", "unload"):
        ratio = med[f"lokr {op}"] / med[f"lora {op}"]
        print(f"  {op:7s} LoKr (lokr_diffusers) {med[f'lokr {op}']:.2f} s   LoRA (diffusers) "
              f"{med[f'lora {op}']:.2f} s   ratio {ratio:.2f}")


if __name__ == "__main__":
    main()
