"""docs/design-notes.md's layout map names every module of the package."""

from __future__ import annotations

import re

from tests.conftest import ROOT


def test_every_module_is_in_the_layout_map() -> None:
    notes = (ROOT / "docs" / "design-notes.md").read_text()
    block = notes.split("## Layout map", 1)[1].split("```", 2)[1]
    listed = set(re.findall(r"^\s+(\S+\.py)\b", block, re.M))
    package = ROOT / "spirit_gpu"
    modules = {str(p.relative_to(package)) for p in package.rglob("*.py")
               if p.name != "__init__.py" and "templates" not in p.parts}
    assert modules - listed == set(), "modules missing from the layout map"
    assert listed - modules - {"__init__.py"} == set(), "the map names modules that are gone"
