"""`lokr-diffusers` (also `python -m lokr_diffusers`): inspect, convert, merge, extract and combine LoKr files.

    lokr-diffusers inspect style.safetensors [--json]
    lokr-diffusers convert in.safetensors out.safetensors --to comfyui [--base sdxl|flux|...] [--dtype fp16]
    lokr-diffusers merge --model ./sd15 --lokr style.safetensors --scale 0.8 --out ./sd15-style
    lokr-diffusers extract --base ./sdxl --tuned ./sdxl-finetune --out style.safetensors [--rank 16]
    lokr-diffusers combine a.safetensors b.safetensors --weights 0.8 0.5 --out ab.safetensors [--lossless]
    lokr-diffusers demo [--out outputs/demo] [--steps 100]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import typing
from collections import Counter
from typing import Any

from . import families

EXAMPLES = """examples:
  lokr-diffusers demo                                  train, export and reload a LoKr on a tiny offline pipeline
  lokr-diffusers inspect style.safetensors            what is in a file: layout, base model, ranks, scales
  lokr-diffusers convert peft_folder style.safetensors --to comfyui --base sd15
  lokr-diffusers convert flux_lokr.safetensors flux_diffusers.safetensors --to diffusers
  lokr-diffusers merge --model ./stable-diffusion-v1-5 --lokr style.safetensors --scale 0.8 --out ./merged
  lokr-diffusers extract --base ./sdxl-base --tuned ./sdxl-finetune --out style.safetensors --rank 16
  lokr-diffusers combine style.safetensors detail.safetensors --weights 0.8 0.5 --out both.safetensors
"""
# convert reads every family's files (each family's full-size variants: ModelFamily.variants); inspect checks a
# file against an SD base only (a UNet family's one full-size model)
CONVERT_BASES: dict[str, str] = dict(families.ALIASES)
BASE_ALIASES: dict[str, str] = {a: f for a, f in families.ALIASES.items() if families.get(f).originals is None}
PROG = "lokr-diffusers"


class UsageError(Exception):
    """A bad command line, reported as one line by `main` (argparse would print the usage too)."""

    def __init__(self, prog: str, message: str) -> None:
        super().__init__(message)
        self.prog = prog


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:
        raise UsageError(self.prog, f"{message} (see {self.prog} --help)")


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise ValueError(text)
    return value


_positive_int.__name__ = "positive integer"  # argparse names the type in its message


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(text)
    return value


_finite_float.__name__ = "finite number"


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="LoKr adapters for diffusers: inspect, convert, "
                "merge, extract and combine LoKr files (kohya/LyCORIS, ComfyUI, PEFT, diffusers layouts).",
                epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--traceback", action="store_true", help="on an error, show the full traceback (for bug reports)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    i = sub.add_parser("inspect", help="show what a LoKr file holds")
    i.add_argument("file", help="a .safetensors file, or a PEFT adapter folder")
    i.add_argument("--base", choices=sorted(BASE_ALIASES), help="base model (default: guessed from the file)")
    i.add_argument("--json", action="store_true", help="print JSON instead of text")
    c = sub.add_parser("convert", help="rewrite a LoKr file in another layout")
    c.add_argument("input", help="a LoKr file or PEFT folder in any layout this package reads")
    c.add_argument("output", help="the file (or, for --to peft, the folder) to write")
    c.add_argument("--to", required=True, choices=["comfyui", "kohya", "a1111", "peft", "diffusers", "lokr_diffusers",
                                                   "lora", "lora_peft"],
                   help="a LoKr layout, or the LoKr as a LoRA (by SVD): lora (a file), lora_peft (a PEFT folder)")
    c.add_argument("--base", choices=sorted(CONVERT_BASES), help="base model: an SD base or a DiT family (default: "
                   "guessed from the file)")
    c.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], help="tensor dtype to write (default: as read)")
    lora = c.add_mutually_exclusive_group()
    lora.add_argument("--rank", type=_positive_int, help="--to lora: the LoRA rank of every module (default: full, "
                      "exact)")
    lora.add_argument("--energy", type=_finite_float, help="--to lora: per module the smallest rank keeping this "
                      "share of ΔW's squared singular values (0 < e <= 1)")
    c.add_argument("--model", help="--to lora: a diffusers folder of the model the file is for (its configs; "
                   "default: the full-size model the file fits)")
    d = sub.add_parser("demo", help="offline demo: train a LoKr on a tiny pipeline, export, reload, compare")
    d.add_argument("--out", default="outputs/demo", help="folder for images, loss curve and files")
    d.add_argument("--steps", type=_positive_int, default=None, help="training steps (default 100)")
    d.add_argument("--model", default=None, help="a diffusers SD/SDXL folder instead of the tiny built-in one")
    d.add_argument("--resolution", type=_positive_int, default=None,
                   help="image size (default 48 for the tiny model, the model's own with --model)")
    d.add_argument("--seed", type=int, default=0)
    m = sub.add_parser("merge", help="bake LoKr (or LoRA) files into a diffusers model folder")
    m.add_argument("--model", required=True, help="a diffusers pipeline folder (model_index.json)")
    m.add_argument("--lokr", required=True, nargs="+", help="the adapter file(s): LoKr, or LoRA")
    m.add_argument("--scale", type=_finite_float, nargs="+", default=None,
                   help="strength per file (default 1.0 each; one number for one file)")
    m.add_argument("--out", required=True, help="folder for the merged pipeline")
    m.add_argument("--requantize", action="store_true", help="merge into a quantized model: dequantize, add, "
                   "quantize again (with rounding error)")
    m.add_argument("--single_file", help="also write the merged model as one .safetensors file in the original "
                   "layout: the UNet and CLIP-L text encoder (SD families), the transformer (DiT families)")
    _extract_parser(sub)
    _combine_parser(sub)
    return p


def _combine_parser(sub: Any) -> None:
    c = sub.add_parser("combine", help="several LoKr (or LoRA) files of one model as one LoKr file")
    c.add_argument("files", nargs="+", help="the LoKr or LoRA files (two or more; a LoRA file needs --model)")
    c.add_argument("--out", required=True, help="the file to write; a JSON report is written beside it")
    c.add_argument("--weights", type=_finite_float, nargs="+", help="one strength per file (default 1.0 each)")
    c.add_argument("--lossless", action="store_true", help="keep the files as separate adapters (our own layout, "
                   "exact) instead of fitting their sum as one LoKr")
    c.add_argument("--format", default=None, choices=["comfyui", "kohya", "a1111", "peft", "diffusers",
                                                      "lokr_diffusers"],
                   help="output layout (default comfyui; lokr_diffusers with --lossless)")
    c.add_argument("--model", help="a diffusers folder of the model the files are for (default: the full-size model "
                   "they fit)")
    c.add_argument("--base", choices=sorted(CONVERT_BASES), help="the family, when the files' names do not say")
    c.add_argument("--factor", type=int, default=None, help="W1's split factor for the fit (default -1)")
    c.add_argument("--rank", type=int, default=0, help="W2's rank for the fit (default 0: full)")
    c.add_argument("--budget_per_module", type=_positive_int, help="parameters one module may keep")
    c.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], help="tensor dtype to write")


def _combine(args: argparse.Namespace) -> None:
    from .tools.combine import combine_lokr
    from .tools.report import report_path

    fmt = args.format or ("lokr_diffusers" if args.lossless else "comfyui")
    report = combine_lokr(args.files, args.out, weights=args.weights, lossless=args.lossless, model=args.model,
                          base=CONVERT_BASES.get(args.base) if args.base else None, format=fmt, factor=args.factor,
                          rank=args.rank, budget_per_module=args.budget_per_module, dtype=args.dtype)
    print(report.table())
    print(f"wrote {args.out} ({fmt}) and {report_path(args.out)}")


def _extract_parser(sub: Any) -> None:
    e = sub.add_parser("extract", help="extract a LoKr from a fine-tune (the change between two model folders)")
    e.add_argument("--base", required=True, help="the base model: a diffusers pipeline folder, or a single-file "
                   "checkpoint (.safetensors) in the original layout")
    e.add_argument("--tuned", required=True, help="the fine-tuned model: a diffusers folder or single file of the "
                   "same model")
    e.add_argument("--config", help="for single-file checkpoints: a diffusers folder of the model with its configs "
                   "(default: the other side's folder, or the full-size model the file fits)")
    e.add_argument("--out", required=True, help="the LoKr file to write (a folder for --format peft); a JSON "
                   "report is written beside it")
    e.add_argument("--format", default="comfyui", choices=["comfyui", "kohya", "a1111", "peft", "diffusers",
                                                           "lokr_diffusers"])
    e.add_argument("--components", nargs="+", help="components to compare (default: the denoiser and the text "
                   "encoders)")
    e.add_argument("--target_modules", nargs="+", help="module names or suffixes (default: every Linear and Conv)")
    e.add_argument("--factor", type=int, default=None, help="W1's split factor (LyCORIS' factor; default -1, or "
                   "the best of LyCORIS' usual splits with a budget)")
    e.add_argument("--rank", type=int, default=0, help="W2's rank (default 0: full)")
    e.add_argument("--decompose_both", action="store_true", help="W1 low-rank too, at --rank")
    e.add_argument("--use_tucker", action="store_true", help="a conv's low-rank W2 as a Tucker core")
    budget = e.add_mutually_exclusive_group()
    budget.add_argument("--budget_per_module", type=_positive_int, help="parameters one module may keep: the split "
                        "and rank with the lowest error within it")
    budget.add_argument("--budget", type=_positive_int, help="parameters all modules may keep, shared in proportion "
                        "to each module's weight size")
    e.add_argument("--min_rel_norm", type=_finite_float, default=0.0,
                   help="skip modules whose change is at most this fraction of the weight (default 0: unchanged)")
    e.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], help="tensor dtype to write (default fp32)")


def _extract(args: argparse.Namespace) -> None:
    from .tools.extract import extract_lokr, report_path

    report = extract_lokr(args.base, args.tuned, args.out, format=args.format, components=args.components,
                          target_modules=args.target_modules, factor=args.factor, rank=args.rank,
                          decompose_both=args.decompose_both, tucker=args.use_tucker,
                          budget_per_module=args.budget_per_module, budget=args.budget,
                          min_rel_norm=args.min_rel_norm, dtype=args.dtype, config=args.config)
    print(report.table())
    print(f"wrote {args.out} ({args.format}) and {report_path(args.out)}")


def inspect_file(path: str, base: str | None = None) -> dict[str, Any]:
    """A summary of a LoKr file, as a JSON-ready dict.

    Args:
        path: a LoKr file or folder.
        base: "sd1" | "sd2" | "sdxl" to check it against that full-size base; else the one its structure names.

    Returns:
        layout, base model, module counts, dtypes, the file's own metadata and, per adapter, what a load gives.
        A file that fits no full-size base (another model, a tiny test model) is summarised from its own tensors,
        with base_model "unknown" and, where its names pointed to a base, a `base_note` saying why not.
    """
    from .formats.reader import check_tensors, group_modules, lora_module_count
    from .formats.report import file_base
    from .io import read_lokr_file

    file = read_lokr_file(path)
    state_dict = dict(file.tensors)
    try:
        check_tensors(state_dict)
    except (TypeError, ValueError) as err:
        raise type(err)(f"{path}: {err}") from None
    groups, lora, _ = group_modules(state_dict)
    guessed = base or file_base(state_dict).base
    info: dict[str, Any] = {
        "file": path, "layout": file.layout, "base_model": guessed or "unknown", "modules": len(groups),
        "lora_modules": lora_module_count(lora), "parameters": sum(t.numel() for t in state_dict.values()),
        "dtypes": dict(Counter(str(t.dtype).replace("torch.", "") for t in state_dict.values())),
        "metadata": {k: (v if len(v) < 300 else v[:300] + "...") for k, v in file.metadata.items()},
    }
    adapters: dict[str, Any] | None = {}
    if groups:
        adapters = _placed(file, guessed, info, given=base is not None)
    info["adapters"] = adapters if adapters is not None else _unplaced(file)
    return info


def _placed(file: Any, base: str | None, info: dict[str, Any], given: bool) -> dict[str, Any] | None:
    """{adapter: summary} checked against the full-size `base`; None (and `info` says why) when there is no base
    or, for a guessed one, the file's shapes do not fit it. A base given on the command line must fit."""
    from .convert import parse_for_base
    from .formats.reader import parse_unplaced

    if base is None:
        return None
    try:
        _, parsed = parse_for_base(file, base, strict=False)
    except ValueError as err:
        if given:
            raise
        try:  # a file that does not fit together by itself is damaged: say that, not "another model"
            parse_unplaced(file)
        except ValueError:
            raise err from None
        # the first module that does not fit
        why = " ".join(str(err).split()).removeprefix(f"{file.source}: ").rstrip(".")
        info["base_model"] = "unknown"
        title = families.get(base).title
        info["base_note"] = (f"its names look like {title}, but its shapes fit no full-size {title} ({why}); a LoKr "
                             "for a model of another size, e.g. a tiny test pipeline")
        return None
    return {name: _summary(p) for name, p in parsed.items()}


def _unplaced(file: Any) -> dict[str, Any]:
    """{adapter: summary} read off the file's own tensors (no model to check them against)."""
    from .formats.reader import parse_unplaced
    from .loader import split_file

    out: dict[str, Any] = {}
    for name, part in split_file(file).items():
        try:
            parsed = parse_unplaced(part)
        except ValueError as err:
            raise ValueError(file.named(str(err))) from None
        out[name or "default"] = _summary(parsed, placed=False)
    return out


def _summary(parsed: Any, placed: bool = True) -> dict[str, Any]:
    entries = parsed.entries
    scales = [e.scale for e in entries]
    example = entries[0] if entries else None
    return {
        "scale_rule": parsed.rule,
        "modules_per_component": dict(Counter(e.ref.component for e in entries)) if placed else None,
        "ranks": dict(Counter(str(e.plan.rank or "full") for e in entries)),
        "tucker": sum(e.plan.tucker for e in entries), "dora": sum(e.dora_scale is not None for e in entries),
        "both_full": sum(e.plan.both_full for e in entries),
        "alphas": sorted({round(e.alpha, 6) for e in entries if e.alpha is not None}),
        "scale_min": min(scales, default=None), "scale_max": max(scales, default=None),
        "example": None if example is None else {
            "module": f"{example.ref.component}.{example.ref.path}" if placed else example.ref.path,
            "factors": {k: list(v.shape) for k, v in example.factors.items()}},
        "unmatched_keys": len(parsed.unmatched),
    }


def _print_text(info: dict[str, Any]) -> None:
    unknown = info["base_model"] == "unknown"
    print(f"{info['file']}: {info['layout']} layout, base model {info['base_model']}")
    if "base_note" in info:
        print(f"  base model unknown: {info['base_note']}")
    print(f"  {info['modules']} LoKr modules, {info['lora_modules']} LoRA modules, "
          f"{info['parameters']:,} parameters, dtypes {info['dtypes']}")
    for name, a in info["adapters"].items():
        print(f"  adapter {name!r} (scale rule: {a['scale_rule']})")
        if a["modules_per_component"] is not None:
            print(f"    modules per component: {a['modules_per_component']}")
        print(f"    ranks: {a['ranks']}; Tucker {a['tucker']}, DoRA {a['dora']}, both factors full {a['both_full']}")
        if a["scale_min"] is not None:
            print(f"    alphas: {a['alphas'][:8]}; scale {a['scale_min']:.6g} .. {a['scale_max']:.6g}")
        if a["example"]:
            print(f"    e.g. {a['example']['module']}: {a['example']['factors']}")
        if a["unmatched_keys"]:
            where = "belong to no LoKr module (no factors)" if unknown else \
                f"match no module of a {info['base_model']} model"
            print(f"    {a['unmatched_keys']} keys {where}")
    if not info["modules"] and info["lora_modules"]:
        print("  no LoKr modules: a LoRA file, load it with pipe.load_lora_weights")
    elif unknown and info["modules"]:
        print("  (ranks and scales read from the file alone; pass --base sd15|sd2|sdxl to check it against a "
              "full-size model)")
    for k, v in info["metadata"].items():
        print(f"  metadata {k}: {v}")


def _merge(args: argparse.Namespace) -> None:
    from .tools.merge import merge_lokr

    scales = args.scale if args.scale is not None else [1.0] * len(args.lokr)
    merge_lokr(args.model, args.lokr, args.out, scales=scales, requantize=args.requantize,
               single_file=args.single_file)
    done = ", ".join(f"{f} at {s:g}" for f, s in zip(args.lokr, scales, strict=False))
    single = f" and {args.single_file} (the original single-file layout)" if args.single_file else ""
    print(f"merged {done} into {args.out}{single}")


def _run(args: argparse.Namespace) -> None:
    if args.command == "inspect":
        info = inspect_file(args.file, BASE_ALIASES.get(args.base) if args.base else None)
        if args.json:
            print(json.dumps(info, indent=2, default=str))
        else:
            _print_text(info)
    elif args.command == "convert" and args.to in ("lora", "lora_peft"):
        from .tools.lora import lokr_to_lora

        report = lokr_to_lora(args.input, args.output, to=args.to, rank=args.rank, energy=args.energy, model=args.model,
                              base=CONVERT_BASES.get(args.base) if args.base else None, dtype=args.dtype)
        print(report.table())
        print(f"wrote {args.output} ({args.to}) and its report {args.output.removesuffix('.safetensors')}.json")
    elif args.command == "convert":
        from .convert import convert_lokr_file

        if args.rank is not None or args.energy is not None or args.model is not None:
            raise UsageError(f"{PROG} convert", "--rank, --energy and --model are for --to lora / lora_peft")
        out = convert_lokr_file(args.input, args.output, to=args.to,
                                base=CONVERT_BASES.get(args.base) if args.base else None, dtype=args.dtype)
        print(f"wrote {out} ({args.to})")
    elif args.command == "demo":
        from .demo import run_demo

        paths = run_demo(args.out, args.steps, args.model, args.resolution, args.seed)
        with open(paths["summary_text"], encoding="utf-8") as fh:
            print(fh.read(), end="")
    elif args.command == "extract":
        _extract(args)
    elif args.command == "combine":
        _combine(args)
    else:
        _merge(args)


EXPECTED_ERRORS = (OSError, ValueError, TypeError, KeyError, UsageError)


def describe_error(err: BaseException) -> str:
    """One line for an error: its message, and for an unexpected kind its class and what to do."""
    text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    if not isinstance(err, EXPECTED_ERRORS):
        text = f"unexpected {type(err).__name__}: {text} (rerun with --traceback and report it, please)"
    elif isinstance(err, KeyError):
        text = f"missing key {text}"
    return " ".join(text.split()) or type(err).__name__


def main(argv: list[str] | None = None) -> int:
    """Run the command; every error is one line on stderr (`lokr-diffusers <cmd>: error: ...`), exit code 2."""
    try:
        args = _parser().parse_args(argv)
    except UsageError as err:
        print(f"{err.prog}: error: {describe_error(err)}", file=sys.stderr)
        return 2
    except SystemExit as done:  # --help
        return done.code if isinstance(done.code, int) else 0
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        _run(args)
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if args.traceback:
            raise
        print(f"{PROG} {args.command}: error: {describe_error(err)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
