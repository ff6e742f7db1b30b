"""The package's layout: every folder of code is a package saying what it owns, so an
ordinary (non-editable) install ships it. A folder without ``__init__.py`` imports from a
checkout but is left out of a wheel (setuptools finds packages by their ``__init__.py``)."""

from __future__ import annotations

import ast

from setuptools import find_packages

from .conftest import REPO


def test_every_folder_of_code_is_a_package_with_a_docstring() -> None:
    package = REPO / "fedsynth"
    folders = sorted({p.parent for p in package.rglob("*.py") if "__pycache__" not in p.parts})
    found = set(find_packages(str(REPO), include=["fedsynth*"]))
    for folder in folders:
        name = ".".join(folder.relative_to(REPO).parts)
        assert name in found, f"{name} is not a package: add {folder / '__init__.py'}"
        doc = ast.get_docstring(ast.parse((folder / "__init__.py").read_text()))
        assert doc, f"{folder / '__init__.py'} needs a docstring saying what the package owns"


def test_the_cli_and_a_hospital_without_dp_do_not_load_opacus_or_scikit_learn() -> None:
    """Every `fedsynth` command and every round's ClientApp process imports these modules;
    Opacus, scikit-learn and SciPy's statistics cost about 5 s of that on 2 cores, and only
    DP and the audit need them, so they load there, on first use."""
    import subprocess
    import sys

    probe = (
        "import sys, fedsynth.cli, fedsynth.client.client_app; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'opacus', 'sklearn', 'skimage'} "
        "| {'scipy.stats'} & set(sys.modules)))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", f"loaded at start-up: {done.stdout.strip()}"
