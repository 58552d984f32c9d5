"""`import lokr_diffusers` imports neither torch nor diffusers, attaches when diffusers is imported
(before or after), is idempotent, and `detach()` undoes all of it. Each case runs in a fresh
interpreter: what a module import does can only be seen once per process."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def run(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300,
                         env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_import_is_lazy() -> None:
    assert run("""
        import sys, lokr_diffusers
        heavy = sorted(m for m in ("torch", "diffusers", "peft", "transformers", "safetensors") if m in sys.modules)
        print(heavy, lokr_diffusers.__version__ != "")
    """) == "[] True"


def test_attaches_when_diffusers_comes_later_and_detaches() -> None:
    assert run("""
        import lokr_diffusers
        from diffusers import StableDiffusionPipeline as P
        from diffusers.loaders.peft import PeftAdapterMixin as M
        before = (hasattr(P, "load_lokr_weights"), hasattr(P.set_adapters, "__lokr_original__"),
                  hasattr(M.set_adapters, "__lokr_original__"))
        n = len(lokr_diffusers.detach())
        after = (hasattr(P, "load_lokr_weights"), hasattr(P.set_adapters, "__lokr_original__"),
                 hasattr(M.set_adapters, "__lokr_original__"))
        lokr_diffusers.attach(); lokr_diffusers.attach()
        again = hasattr(P, "load_lokr_weights") and not hasattr(P.set_adapters.__lokr_original__, "__lokr_original__")
        print(before, after, n > 20, again)
    """) == "(True, True, True) (False, False, False) True True"


def test_attaches_when_diffusers_came_first() -> None:
    assert run("""
        import diffusers.loaders.lora_pipeline, diffusers.loaders.peft
        from diffusers import DiffusionPipeline
        import lokr_diffusers
        from diffusers.loaders.lora_base import LoraBaseMixin
        print(hasattr(DiffusionPipeline, "fuse_lokr"), hasattr(LoraBaseMixin.fuse_lora, "__lokr_original__"))
    """) == "True True"


def test_public_names_load_on_use() -> None:
    assert run("""
        import lokr_diffusers
        from lokr_diffusers import LoKrConfig, LoKrModel, add_lokr
        lokr_diffusers.logs.set_verbosity_info()  # submodules by attribute, as the README writes them
        print(sorted(set(lokr_diffusers.__all__) - set(dir(lokr_diffusers))), LoKrConfig(r=4).r,
              hasattr(lokr_diffusers, "no_such_thing"))
    """) == "[] 4 False"
