"""Packaging a user can trust: declared dependencies, the diffusers bounds, and the diffusers API we touch.

- every third-party module lokr_diffusers (or an example script) imports is declared in pyproject.toml;
- the installed diffusers is inside the declared specifier, whose lower bound is the oldest known-good
  version (lokr_diffusers.compat) and whose upper bound excludes untested minors;
- the diffusers functions and attributes we call or wrap exist and take the arguments we pass;
- docs/compatibility.md's table lists exactly compat.KNOWN_GOOD_DIFFUSERS;
- the lock (constraints.txt) pins each declared requirement inside its range on every supported Python, its
  diffusers is known good, docs/compatibility.md lists its pins, and every install the Makefile and the
  packaging checks make goes through it;
- LICENSE and py.typed are there and declared.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import logging
import re
import sys
from importlib import metadata
from pathlib import Path
from typing import NamedTuple

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
PROJECT = PYPROJECT["project"]
NAME = canonicalize_name(PROJECT["name"])


def _load_compat():
    """lokr_diffusers/compat.py as a standalone module (without running lokr_diffusers/__init__)."""
    spec = importlib.util.spec_from_file_location("_lokr_compat_under_test", ROOT / "lokr_diffusers" / "compat.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


compat = _load_compat()


def _requirements(extra: str | None = None) -> list[Requirement]:
    lines = PROJECT["dependencies"] if extra is None else PROJECT["optional-dependencies"][extra]
    return [Requirement(line) for line in lines]


def _declared(extra: str | None = None, seen: frozenset[str] = frozenset()) -> set[str]:
    """Distribution names (canonical) of the runtime dependencies, or of an extra (its self-references expanded)."""
    out: set[str] = set()
    for req in _requirements(extra):
        name = canonicalize_name(req.name)
        if name == NAME:
            for sub in req.extras - seen:
                out |= _declared(sub, seen | {sub})
        else:
            out.add(name)
    return out


def _diffusers_specifier():
    (req,) = [r for r in _requirements() if canonicalize_name(r.name) == "diffusers"]
    return req.specifier


# ------------------------------------------------------------------------------------ dependencies

def _imported_modules(path: Path) -> set[str]:
    """Top-level names of the absolute imports in a file, wherever they are (module level or in a function)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.split(".")[0])
    return out


def _distribution(module: str) -> str:
    dists = metadata.packages_distributions().get(module)
    return canonicalize_name(dists[0] if dists else module)  # not installed: the module's own name (tqdm, datasets)


def _third_party(paths: list[Path]) -> dict[str, set[str]]:
    """{distribution: files importing it} for the imports that are neither stdlib nor lokr_diffusers."""
    out: dict[str, set[str]] = {}
    for path in paths:
        for module in _imported_modules(path):
            if module in sys.stdlib_module_names or module in ("__future__", "lokr_diffusers"):
                continue
            out.setdefault(_distribution(module), set()).add(str(path.relative_to(ROOT)))
    return out


def test_every_import_of_the_package_is_a_declared_dependency():
    """The library proper (training aside) needs only the runtime dependencies."""
    files = [p for p in (ROOT / "lokr_diffusers").rglob("*.py") if "training" not in p.relative_to(ROOT).parts]
    undeclared = {d: f for d, f in _third_party(files).items() if d not in _declared()}
    assert not undeclared, f"imported but not in [project].dependencies: {undeclared}"


def test_training_imports_are_declared_in_the_train_extra():
    """[train] or an optional extra the scripts name when it is missing (PyAV for video files, [video]; torchao and
    bitsandbytes for --base_precision int8 / nf4, [quant])."""
    files = list((ROOT / "lokr_diffusers" / "training").rglob("*.py")) + list((ROOT / "examples").glob("*.py"))
    allowed = _declared() | _declared("train") | _declared("video") | _declared("quant")
    undeclared = {d: f for d, f in _third_party(files).items() if d not in allowed}
    assert not undeclared, f"imported by the training code but in neither the dependencies nor [train]: {undeclared}"


def test_test_extra_holds_the_train_extra_and_pins_the_oracles():
    assert _declared("train") <= _declared("test")
    pins = {canonicalize_name(r.name): str(r.specifier) for r in _requirements("test")}
    assert pins["peft"].startswith("==") and pins["lycoris-lora"].startswith("==")


# ------------------------------------------------------------------------------- diffusers bounds

def test_installed_diffusers_is_inside_the_declared_specifier():
    spec = _diffusers_specifier()
    installed = metadata.version("diffusers")
    assert spec.contains(installed, prereleases=True), f"diffusers {installed} is outside {spec} (pyproject.toml)"


def test_diffusers_bounds_are_the_known_good_range():
    spec = _diffusers_specifier()
    lower = [s.version for s in spec if s.operator == ">="]
    upper = [Version(s.version) for s in spec if s.operator == "<"]
    assert lower == [compat.KNOWN_GOOD_DIFFUSERS[0]], "the lower bound is the oldest known-good diffusers"
    assert upper, "diffusers needs an upper bound: we touch its private functions"
    newest = Version(compat.KNOWN_GOOD_DIFFUSERS[-1])
    assert upper[0] <= Version(f"{newest.major}.{newest.minor + 1}"), "the upper bound lets in an untested minor"
    assert all(spec.contains(v) for v in compat.KNOWN_GOOD_DIFFUSERS)


def test_known_good_versions_are_sorted_and_distinct():
    versions = [Version(v) for v in compat.KNOWN_GOOD_DIFFUSERS]
    assert versions == sorted(set(versions))


def _docs_table() -> dict[str, str]:
    """{diffusers version: result} from docs/compatibility.md's known-good table."""
    text = (ROOT / "docs" / "compatibility.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\|\s*(\d+\.\d+\.\d+)\s*\|[^\n]*?\|\s*([a-zA-Z][^|]*?)\s*\|\s*$", text, flags=re.M)
    assert rows, "no version rows found in docs/compatibility.md"
    return dict(rows)


def test_docs_table_matches_compat():
    table = _docs_table()
    passing = {v for v, result in table.items() if result.lower().startswith("pass")}
    assert passing == set(compat.KNOWN_GOOD_DIFFUSERS)


# ------------------------------------------------------------------------------- the lock

LOCK = ROOT / "constraints.txt"
COMPAT_LOCK = ROOT / "constraints-compat.txt"  # the oldest declared diffusers' set (.ci/compat.sh)
_spec = importlib.util.spec_from_file_location("_lockdiff_under_test", ROOT / ".ci" / "lockdiff.py")
assert _spec and _spec.loader
lockdiff = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lockdiff)
LOWEST = Version(PROJECT["requires-python"].removeprefix(">="))
PYTHONS = [f"3.{m}" for m in range(LOWEST.minor, 14)]


def _linux(python: str) -> dict[str, str]:
    """Marker variables of CPython `python` on x86-64 Linux (CI's platform)."""
    return {"python_version": python, "python_full_version": f"{python}.0", "sys_platform": "linux",
            "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
            "platform_python_implementation": "CPython"}


@pytest.mark.parametrize("lock", [LOCK, COMPAT_LOCK], ids=["lock", "compat lock"])
@pytest.mark.parametrize("python", PYTHONS)
def test_the_lock_pins_every_declared_requirement_inside_its_range(python: str, lock: Path) -> None:
    pins = lockdiff.pins(lock, _linux(python))  # raises on two pins of one package
    for req in [Requirement(r) for r in PROJECT["dependencies"]] + _requirements("test") + _requirements("train"):
        name = canonicalize_name(req.name)
        if name == NAME or (req.marker is not None and not req.marker.evaluate(_linux(python))):
            continue
        assert name in pins, f"{name}: declared in pyproject.toml, not in constraints.txt (make lock)"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"{name}=={pins[name]} in constraints.txt is outside pyproject.toml's {req.specifier} (make lock)")


@pytest.mark.parametrize("python", PYTHONS)
def test_the_locked_diffusers_is_known_good(python: str) -> None:
    assert lockdiff.pins(LOCK, _linux(python))["diffusers"] in compat.KNOWN_GOOD_DIFFUSERS
    assert lockdiff.pins(COMPAT_LOCK, _linux(python))["diffusers"] == compat.KNOWN_GOOD_DIFFUSERS[0]


def test_docs_list_the_locked_set() -> None:
    text = (ROOT / "docs" / "compatibility.md").read_text(encoding="utf-8")
    section = text.split("## The tested set", 1)[1].split("\n## ", 1)[0]
    rows = dict(re.findall(r"^\|\s*([a-z][\w.-]*)\s*\|\s*(\d[^|\s]*)\s*\|\s*$", section, flags=re.M))
    assert len(rows) >= 10, "docs/compatibility.md: no tested-set table"
    pins = lockdiff.pins(LOCK, _linux("3.11"))
    assert {canonicalize_name(n): v for n, v in rows.items()} == {canonicalize_name(n): pins[canonicalize_name(n)]
                                                                    for n in rows}


def test_every_install_of_the_makefile_and_the_packaging_checks_uses_the_lock() -> None:
    """pip installs torch and the package only through constraints.txt (`-c`); pip itself is exempt."""
    for path in ("Makefile", ".ci/wheel.sh", ".ci/compat.sh"):
        lines = [line for line in (ROOT / path).read_text(encoding="utf-8").splitlines()
                 if "pip install" in line and not line.lstrip().startswith("#")
                 and not line.rstrip().endswith("--upgrade pip")]
        assert lines, path
        unpinned = [line.strip() for line in lines if " -c " not in line and "$(PIN)" not in line]
        assert not unpinned, f"{path}: installs without constraints.txt: {unpinned}"


def test_check_diffusers_version_warns_once(monkeypatch, caplog):
    monkeypatch.setattr(compat, "_warned", set())
    monkeypatch.setattr(compat, "installed_diffusers_version", lambda: compat.KNOWN_GOOD_DIFFUSERS[-1])
    with caplog.at_level(logging.WARNING, logger=compat.logger.name):
        assert compat.check_diffusers_version() is True
    assert not caplog.records
    monkeypatch.setattr(compat, "installed_diffusers_version", lambda: "0.0.1")
    with caplog.at_level(logging.WARNING, logger=compat.logger.name):
        assert compat.check_diffusers_version() is False
        assert compat.check_diffusers_version() is False
    assert len(caplog.records) == 1 and "0.0.1" in caplog.records[0].getMessage()


def test_compat_module_does_not_import_diffusers():
    assert _imported_modules(ROOT / "lokr_diffusers" / "compat.py") <= {"__future__", "logging", "importlib"}


def test_installed_diffusers_is_checked_against_the_list():
    assert compat.installed_diffusers_version() == metadata.version("diffusers")
    assert compat.check_diffusers_version() == (metadata.version("diffusers") in compat.KNOWN_GOOD_DIFFUSERS)


# --------------------------------------------------------------------------- the diffusers API we touch
class Touch(NamedTuple):
    """A diffusers callable we call or wrap, and how we call it: `positional` arguments (self included
    for methods), then `keywords` by name; `forwards` = we pass on arbitrary **kwargs."""

    module: str
    qualname: str
    positional: int = 0
    keywords: tuple[str, ...] = ()
    forwards: bool = False


DIFFUSERS_API = [
    # hooks.py: LoKr files given to load_lora_weights are routed to us; the rest goes on to diffusers
    Touch("diffusers.loaders.lora_pipeline", "StableDiffusionLoraLoaderMixin.load_lora_weights", 2,
          ("adapter_name",), True),
    Touch("diffusers.loaders.lora_pipeline", "StableDiffusionXLLoraLoaderMixin.load_lora_weights", 2,
          ("adapter_name",), True),
    # diffusers_lora.py: offload hooks removed while layers change, then put back on the same device
    Touch("diffusers.loaders.lora_base", "_func_optionally_disable_offloading", 1),
    Touch("diffusers", "DiffusionPipeline.enable_model_cpu_offload", 1, ("device",)),
    Touch("diffusers", "DiffusionPipeline.enable_sequential_cpu_offload", 1, ("device",)),
    # saving.py: save_pretrained wrapped; components' config entries put back
    Touch("diffusers", "DiffusionPipeline.save_pretrained", 2, (), True),
    Touch("diffusers", "DiffusionPipeline.register_to_config", 1, (), True),
    # scaling.py: the per-call LoRA scale (encode_prompt is wrapped only when it takes lora_scale)
    Touch("diffusers", "StableDiffusionPipeline.encode_prompt", 1, ("lora_scale",)),
    Touch("diffusers", "StableDiffusionXLPipeline.encode_prompt", 1, ("lora_scale",)),
    Touch("diffusers", "UNet2DConditionModel.forward", 4, ("cross_attention_kwargs", "added_cond_kwargs")),
    # diffusers_api.py / weights.py: set_adapters with LoRA and LoKr adapters mixed
    Touch("diffusers.utils.peft_utils", "set_weights_and_activate_adapters", 3),
    # hooks.py: diffusers' verbosity followed by our loggers
    Touch("diffusers.utils.logging", "set_verbosity", 1),
    Touch("diffusers.utils.logging", "get_verbosity", 0),
    # training
    Touch("diffusers.training_utils", "compute_snr", 2),
    Touch("diffusers.optimization", "get_scheduler", 2, ("num_warmup_steps", "num_training_steps")),
]
# private names that are not callables, checked by their own test below
PRIVATE_DATA = {("diffusers.loaders.peft", "_SET_ADAPTER_SCALE_FN_MAPPING")}


def _resolve(module: str, qualname: str):
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def assert_accepts(fn, positional: int, keywords: tuple[str, ...] = (), forwards: bool = False) -> None:
    signature = inspect.signature(fn)
    try:
        signature.bind_partial(*[None] * positional, **dict.fromkeys(keywords))
    except TypeError as e:
        raise AssertionError(f"{fn.__qualname__}{signature}: we call it with {positional} positional "
                             f"arguments and keywords {list(keywords)}: {e}") from e
    if forwards:
        kinds = [p.kind for p in signature.parameters.values()]
        assert inspect.Parameter.VAR_KEYWORD in kinds, f"{fn.__qualname__}{signature} takes no **kwargs"


@pytest.mark.parametrize("touch", DIFFUSERS_API, ids=[t.qualname for t in DIFFUSERS_API])
def test_diffusers_api_we_touch(touch):
    assert_accepts(_resolve(touch.module, touch.qualname), touch.positional, touch.keywords, touch.forwards)


def _named(fn, skip: int) -> list[str]:
    """The named parameters of `fn` after the first `skip`, in order (no *args / **kwargs)."""
    params = list(inspect.signature(fn, follow_wrapped=False).parameters.values())[skip:]
    return [p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def test_wrapped_adapter_methods_take_the_parameters_of_diffusers_own():
    """diffusers_api.py wraps LoraBaseMixin's and PeftAdapterMixin's adapter methods and passes its
    named parameters on, positionally, in its own order: diffusers' must start with the same ones."""
    from diffusers.loaders.lora_base import LoraBaseMixin
    from diffusers.loaders.peft import PeftAdapterMixin

    from lokr_diffusers.diffusers_api import MODEL_METHODS, PIPELINE_METHODS

    wrong = []
    for name, make in PIPELINE_METHODS.items():
        original = inspect.unwrap(getattr(LoraBaseMixin, name))  # diffusers' own, if ours is installed
        ours = _named(make(original), 1)  # (self, ...)
        if _named(original, 1)[:len(ours)] != ours:
            wrong.append(f"LoraBaseMixin.{name}{inspect.signature(original)} vs ours {ours}")
    for name, part in MODEL_METHODS.items():
        original = inspect.unwrap(getattr(PeftAdapterMixin, name))
        ours = _named(part, 2)  # (model, original, ...)
        if _named(original, 1)[:len(ours)] != ours:
            wrong.append(f"PeftAdapterMixin.{name}{inspect.signature(original)} vs ours {ours}")
    assert not wrong, wrong


def test_unet_block_weights_expander_is_where_weights_py_reads_it():
    """weights.py expands {'down': ..., 'mid': ..., 'up': ...} with diffusers' own function, called (unet, [dict])."""
    from diffusers.loaders.peft import _SET_ADAPTER_SCALE_FN_MAPPING

    assert_accepts(_SET_ADAPTER_SCALE_FN_MAPPING["UNet2DConditionModel"], 2)
    from lokr_diffusers import weights
    from lokr_diffusers.tiny import make_sd_pipeline

    unet = make_sd_pipeline().unet  # the expansion reaches every transformer block by its module prefix
    spec = weights.expand(unet, {"down": 0.25, "mid": 0.5, "up": 0.75}, "test")
    assert isinstance(spec, dict) and spec["mid_block.attentions.0"] == 0.5
    assert {k: v for k, v in spec.items() if k.startswith("down_blocks.")} and \
        all(v == 0.25 for k, v in spec.items() if k.startswith("down_blocks."))


def _diffusers_imports() -> list[tuple[str, str, str]]:
    """(file, module, name) of every `from diffusers... import name` in lokr_diffusers."""
    out = []
    for path in sorted((ROOT / "lokr_diffusers").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                    and node.module.split(".")[0] == "diffusers":
                out += [(str(path.relative_to(ROOT)), node.module, a.name) for a in node.names]
    return out


def test_every_diffusers_import_resolves():
    """Each name lokr_diffusers imports from diffusers exists in the installed version (guarded ones too)."""
    missing = []
    for file, module, name in _diffusers_imports():
        try:
            getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            missing.append(f"{file}: from {module} import {name}")
    assert not missing, missing


def test_private_diffusers_imports_are_checked_here():
    """A private diffusers name newly imported must get a check here (DIFFUSERS_API or its own test)."""
    checked = {(t.module, t.qualname) for t in DIFFUSERS_API} | PRIVATE_DATA
    private = {(m, n) for _, m, n in _diffusers_imports() if n.startswith("_")}
    assert private <= checked, f"add to DIFFUSERS_API (and docs/compatibility.md): {sorted(private - checked)}"


def test_func_optionally_disable_offloading_returns_three_flags():
    """diffusers_lora.offloading_paused unpacks (model offload, sequential offload, group offload)."""
    from diffusers.loaders.lora_base import _func_optionally_disable_offloading

    result = _func_optionally_disable_offloading(None)
    assert len(result) == 3 and not any(result)


def test_offloading_records_its_device_where_the_loader_reads_it():
    """diffusers_lora.offloading_paused re-enables offloading on `pipe._offload_device`."""
    from diffusers import DiffusionPipeline

    for method in (DiffusionPipeline.enable_model_cpu_offload, DiffusionPipeline.enable_sequential_cpu_offload):
        assert "self._offload_device = " in inspect.getsource(method), method.__qualname__


def test_scheduler_type_is_an_enum_of_names():
    from diffusers.optimization import SchedulerType

    assert "constant" in [s.value for s in SchedulerType]


# -------------------------------------------------------------------------------- files shipped

def test_license_file_is_the_declared_licence():
    assert PROJECT["license"] == "Apache-2.0" and PROJECT["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text


def test_py_typed_is_package_data_and_the_build_backend_knows_pep_639():
    assert (ROOT / "lokr_diffusers" / "py.typed").is_file()
    assert "py.typed" in PYPROJECT["tool"]["setuptools"]["package-data"]["lokr_diffusers"]
    (backend,) = [Requirement(r) for r in PYPROJECT["build-system"]["requires"] if r.startswith("setuptools")]
    assert backend.specifier.contains("77") and not backend.specifier.contains("76.1")
