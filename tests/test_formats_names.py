"""Key coverage on full-size architectures (built on the meta device: no memory, no time).

For SD1.5, SD2.1 and SDXL, a file naming every Linear / Conv1d / Conv2d of the UNet and text
encoder(s) in each layout (names written by tests/helpers/writers.py from docs/formats.md §Key layouts) must map 100% of
its modules, each to the module it names.
"""

from __future__ import annotations

import pytest
from helpers.fullsize_sd import meta_sd_components
from helpers.writers import LAYOUTS, module_name
from torch import nn

from lokr_diffusers.formats.names import ModuleRef, build_index, iter_adaptable


@pytest.fixture(scope="module", params=["sd15", "sd21", "sdxl"])
def full_size(request: pytest.FixtureRequest) -> tuple[str, dict[str, nn.Module]]:
    return request.param, meta_sd_components(request.param)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_module_of_a_full_size_file_maps(full_size, layout: str) -> None:
    base, comps = full_size
    index = build_index(comps)
    sdxl = base == "sdxl"
    named, total = 0, 0
    for component, model in comps.items():
        modules = dict(iter_adaptable(model))
        assert len(modules) == sum(isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)) for m in model.modules())
        total += len(modules)
        for path in modules:
            name = module_name(layout, component, path, comps["unet"].config, sdxl)
            if name is None:  # only SimpleTuner's layout lacks names, and only for text encoders
                assert layout == "lycoris" and component != "unet", (layout, path)
                continue
            assert index.lookup(name) is not None, name
            assert index.lookup(name)[1] == ModuleRef(component, path), name
            named += 1
    unet_modules = len(dict(iter_adaptable(comps["unet"])))
    assert named == (unet_modules if layout == "lycoris" else total)  # 100% of what the file names
    assert not index.ambiguous


def test_module_counts_are_the_real_ones() -> None:
    comps = meta_sd_components("sd15")
    counts = {c: len(dict(iter_adaptable(m))) for c, m in comps.items()}
    assert counts == {c: sum(isinstance(m, (nn.Linear, nn.Conv2d)) for m in comps[c].modules()) for c in comps}
    assert counts["text_encoder"] == 12 * 6
