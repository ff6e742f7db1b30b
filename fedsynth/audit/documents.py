"""Self-contained HTML documents (images embedded, no external assets) and their PDF,
rendered by WeasyPrint. Used by the ethics report and the visual Turing test sheet."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import numpy as np
from PIL import Image

from fedsynth.core.files import atomic_open

__all__ = ["PdfError", "array_data_uri", "esc", "png_data_uri", "write_html", "write_pdf"]

# WeasyPrint draws with Pango; these are Debian's package names (present on most desktops)
PDF_SYSTEM_PACKAGES = (
    "libpango-1.0-0 libpangoft2-1.0-0 (Debian/Ubuntu: apt-get install libpango-1.0-0 libpangoft2-1.0-0)"
)


class PdfError(RuntimeError):
    """The PDF could not be rendered (WeasyPrint or its system libraries missing)."""


def esc(value: object) -> str:
    """Text for HTML, escaped."""
    return html.escape(str(value), quote=True)


def png_data_uri(path: str | Path) -> str:
    """A PNG file as a data: URI, so the document carries its images inside."""
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def array_data_uri(image: np.ndarray, scale: int = 1) -> str:
    """A uint8 (H, W) image as a PNG data: URI, enlarged by ``scale`` (nearest neighbour)."""
    picture = Image.fromarray(np.asarray(image, dtype=np.uint8))
    if scale > 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def write_html(path: str | Path, document: str) -> Path:
    """Write the document atomically, as UTF-8 (a crash leaves no half-written report)."""
    path = Path(path)
    with atomic_open(path, "wb") as handle:
        handle.write(document.encode("utf-8"))
    return path


def write_pdf(path: str | Path, document: str) -> Path:
    """Render the HTML document to a PDF with WeasyPrint, atomically.

    Raises
    ------
    PdfError
        WeasyPrint is not installed or cannot load Pango (the message names the packages).
    """
    try:
        import weasyprint
    except (ImportError, OSError) as err:  # OSError: Pango missing, raised at import
        raise PdfError(f"the PDF needs WeasyPrint and Pango: {PDF_SYSTEM_PACKAGES} ({err})") from None
    path = Path(path)
    pdf = weasyprint.HTML(string=document).write_pdf()
    with atomic_open(path, "wb") as handle:
        handle.write(pdf)
    return path
