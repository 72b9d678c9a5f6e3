"""Every jaxtyping annotation in lenskit names its axes from the glossary in lenskit.typing."""

from __future__ import annotations

import re
from pathlib import Path

from lenskit.typing import AXES

ROOT = Path(__file__).resolve().parents[1] / "lenskit"
ANNOTATION = re.compile(r'(?:Float|Int|Bool|Shaped)\[Tensor, "([^"]*)"\]')


def test_every_axis_name_is_in_the_glossary():
    unknown = {}
    for path in sorted(ROOT.rglob("*.py")):
        for spec in ANNOTATION.findall(path.read_text(encoding="utf-8")):
            for axis in spec.split():
                name = axis.lstrip("*#")
                if name and not name.isdigit() and name != "..." and name not in AXES:
                    unknown.setdefault(name, []).append(path.name)
    assert not unknown, f"axes missing from lenskit.typing.AXES: {unknown}"


def test_public_aliases_use_glossary_axes():
    import lenskit.typing as typing_module

    for name in typing_module.__all__:
        if name == "AXES":
            continue
        spec = getattr(typing_module, name).dim_str
        assert all(axis.lstrip("*") in AXES for axis in spec.split()), name
