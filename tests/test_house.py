"""The house keeps its two kinds apart: the rules bench/house.py reports, asserted; the README's
map names every module."""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("house", ROOT / "bench" / "house.py")
house = importlib.util.module_from_spec(spec)
spec.loader.exec_module(house)


def test_no_import_circles_and_no_upward_arrows():
    assert house.broken_rules(house.graph()) == []


def test_the_rules_catch_a_circle_and_an_engine_that_imports_a_room():
    edges = {
        "trainlab.engine.a": {"trainlab.engine.b", "trainlab.models.m"},
        "trainlab.engine.b": {"trainlab.engine.a"},
        "trainlab.models.m": {"trainlab.engine.module"},
    }
    broken = house.broken_rules(edges)
    assert "circle: trainlab.engine.a -> trainlab.engine.b -> trainlab.engine.a" in broken
    assert any("the engine's trainlab.engine.a imports the forker's" in b for b in broken)
    assert any("not the engine's public surface" in b for b in broken)


def test_the_engine_public_surface_loads_each_name_when_asked():
    # a fresh interpreter: the light names load without torch (the command line starts so)
    code = "import sys; from trainlab.engine import UserError; assert 'torch' not in sys.modules"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    import trainlab.engine

    for name in trainlab.engine.__all__:  # each name of the surface is there when asked
        assert getattr(trainlab.engine, name) is not None, name


def test_the_readme_map_names_every_module():
    readme = (ROOT / "README.md").read_text()
    block = readme.split("### Where things are", 1)[1].split("```text", 1)[1].split("```", 1)[0]
    for module, path in house.modules().items():
        if path.name == "__init__.py":
            assert f"{path.parent.name}/" in block, f"{module} is not in the README's map"
        else:
            assert re.search(rf"\b{path.stem}\b", block), f"{module} is not in the README's map"
