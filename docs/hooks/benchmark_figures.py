"""MkDocs hook: publish the benchmark plots where the included results files point to them.

``docs/benchmarks/quality.md`` includes ``benchmarks/results/full/quality.md`` and
``benchmarks/results/copy_detection/copy_detection.md`` as they are (pymdownx.snippets),
and those files link their plots by bare name (``fidelity_arms.png``, ``strength.png``).
This hook adds each ``*.png`` of those result folders to the site beside that page, read
straight from ``benchmarks/results/``, so the plots are never copied into ``docs/`` by hand.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

RESULTS = (Path("benchmarks/results/full"), Path("benchmarks/results/copy_detection"))
PAGE_DIR = "benchmarks"


def on_files(files: Files, config: Any, **kwargs: Any) -> Files:
    """MkDocs event: add the plots as files of the site."""
    root = Path(config["config_file_path"]).parent
    for folder in RESULTS:
        for plot in sorted((root / folder).glob("*.png")):
            files.append(File.generated(config, f"{PAGE_DIR}/{plot.name}", abs_src_path=str(plot)))
    return files
