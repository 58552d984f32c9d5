"""logs.py: diffusers' logging conventions, warnings once per cause, progress bars that honour every
switch diffusers users know, and no print() in the library."""

from __future__ import annotations

import ast
import copy
import logging
import pathlib

import pytest
from helpers.state_sources import COMPS, base_pipe, lokr_files
from torch import nn

import lokr_diffusers
from lokr_diffusers import LoKrConfig, LoKrModel, logs

PACKAGE = pathlib.Path(lokr_diffusers.__file__).parent
USER_FACING = {"cli.py", "demo.py", "__main__.py"}  # the command line may print; nothing else may


@pytest.fixture
def _levels():
    import diffusers.utils.logging as dlog

    saved = (logs.ROOT.level, dict(logs._state), dlog.get_verbosity())
    yield dlog
    logs.ROOT.setLevel(saved[0])
    logs._state.clear()
    logs._state.update(saved[1])
    dlog.set_verbosity(saved[2])
    logs.ROOT.setLevel(saved[0])


def test_no_print_in_the_library() -> None:
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.name in USER_FACING:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert offenders == []


def test_verbosity_follows_diffusers_until_set_here(_levels) -> None:
    dlog = _levels
    dlog.set_verbosity_info()
    assert logs.get_verbosity() == logging.INFO
    dlog.set_verbosity_error()
    assert logs.get_verbosity() == logging.ERROR
    logs.set_verbosity_debug()
    dlog.set_verbosity_warning()
    assert logs.get_verbosity() == logging.DEBUG  # ours now, no longer diffusers'


def test_warn_once_per_cause(caplog) -> None:
    log = logging.getLogger("lokr_diffusers.test_once")
    with caplog.at_level(logging.WARNING, logger="lokr_diffusers"):
        for _ in range(3):
            logs.warn_once(log, "cause A")
        logs.warn_once(log, "cause B")
    assert [r.getMessage() for r in caplog.records if r.name == log.name] == ["cause A", "cause B"]


def test_negative_weight_warned_once(caplog) -> None:
    pipe = copy.copy(base_pipe())
    pipe.load_lokr_weights(dict(lokr_files()["a"]), adapter_name="neg")
    with caplog.at_level(logging.WARNING, logger="lokr_diffusers"):
        for _ in range(3):
            pipe.set_lokr_adapters("neg", -0.5)
    assert sum("negative weights" in r.getMessage() for r in caplog.records) == 1


def _bar(capsys, **kwargs) -> str:
    list(logs.progress(range(5), desc="work", **kwargs))
    return capsys.readouterr().err


def test_progress_switches(capsys, monkeypatch, _levels) -> None:
    dlog = _levels
    monkeypatch.setattr(logs, "PROGRESS_MIN_ITEMS", 1)
    assert "work" in _bar(capsys)
    assert "work" in _bar(capsys, disable=False)
    assert _bar(capsys, disable=True) == ""
    dlog.disable_progress_bar()
    try:
        assert _bar(capsys) == ""
        assert _bar(capsys, disable=False) == ""  # diffusers' bars off: ours too, whatever the caller says
    finally:
        dlog.enable_progress_bar()
    logs.disable_progress_bar()
    try:
        assert _bar(capsys) == "" and _bar(capsys, disable=False) == ""
    finally:
        logs._state["bars"] = None


@pytest.mark.parametrize(("items", "work", "shown"), [
    (5, None, False), (999, None, False), (1000, None, True),  # by count: about 1 ms an item
    (5, 10**8, True), (5000, 10**8 - 1, False),  # by size, where the caller knows it: about 1e8 elements a second
])
def test_a_bar_only_for_about_a_second_of_work(capsys, items: int, work: int | None, shown: bool) -> None:
    list(logs.progress(range(items), desc="work", work=work))
    assert ("work" in capsys.readouterr().err) == shown


def test_no_bar_for_adding_or_fusing_many_small_layers(capsys, monkeypatch) -> None:
    """200 small layers: no bar to add or fuse them; the fuse's bar comes with the elements it rewrites."""
    model = LoKrModel(nn.Sequential(*[nn.Linear(8, 8) for _ in range(200)]),
                      LoKrConfig(r=2, target_modules=[str(i) for i in range(200)], init_weights=False), "a")
    model.merge_adapter()
    model.unmerge_adapter()
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(logs, "PROGRESS_MIN_WORK", 200 * 64)  # the fuse rewrites 200 weights of 64
    model.merge_adapter()
    assert "LoKr" in capsys.readouterr().err
    monkeypatch.setattr(logs, "PROGRESS_MIN_WORK", 200 * 64 + 1)
    model.unmerge_adapter()
    assert capsys.readouterr().err == ""


def test_load_and_fuse_bars_honour_the_pipeline(capsys, monkeypatch) -> None:
    monkeypatch.setattr(logs, "PROGRESS_MIN_ITEMS", 1)
    monkeypatch.setattr(logs, "PROGRESS_MIN_WORK", 1)
    base = base_pipe()
    pipe = copy.copy(base)
    for c in COMPS:
        setattr(pipe, c, copy.deepcopy(getattr(base, c)))
    pipe.set_progress_bar_config()  # the tiny pipelines are built with bars off
    pipe.load_lokr_weights(dict(lokr_files()["a"]), adapter_name="a")
    pipe.fuse_lokr()
    err = capsys.readouterr().err
    assert "loading LoKr 'a'" in err and "fusing LoKr" in err
    pipe.unfuse_lokr()
    capsys.readouterr()
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lokr_weights(dict(lokr_files()["c"]), adapter_name="c")
    pipe.fuse_lokr()
    assert "LoKr" not in capsys.readouterr().err
