"""MkDocs hook: publish the benchmark plots where the included results files point to them.

``docs/benchmarks/quality.md`` includes ``benchmarks/results/full/quality.md`` as it is
(pymdownx.snippets), and that file links its plots by bare name (``fidelity_arms.png``).
This hook adds each ``benchmarks/results/full/*.png`` to the site beside that page, read
straight from ``benchmarks/results/``, so the plots are never copied into ``docs/`` by hand.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

RESULTS = Path("benchmarks/results/full")
PAGE_DIR = "benchmarks"


def on_files(files: Files, config: Any, **kwargs: Any) -> Files:
    """MkDocs event: add the plots as files of the site."""
    root = Path(config["config_file_path"]).parent
    for plot in sorted((root / RESULTS).glob("*.png")):
        files.append(File.generated(config, f"{PAGE_DIR}/{plot.name}", abs_src_path=str(plot)))
    return files
