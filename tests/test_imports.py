import pkgutil
import subprocess
import sys

import bne


def test_library_imports_no_orchestration():
    mods = [m.name for m in pkgutil.walk_packages(bne.__path__, "bne.")]
    assert "bne.norm.dsbn" in mods and "bne.cli" in mods
    code = (
        "import importlib, sys\n"
        f"for m in {mods!r}: importlib.import_module(m)\n"
        "bad = sorted(n for n in ('prefect', 'dvc', 'great_expectations', 'optuna') if n in sys.modules)\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
