"""Figures for people (MLflow artifacts, reports): matplotlib without a display."""

from __future__ import annotations


def pyplot():
    """matplotlib's pyplot on the Agg backend (no display on workers or in CI)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png_bytes(fig) -> bytes:
    """The figure as PNG bytes, laid out tight; the figure is closed."""
    import io

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    pyplot().close(fig)
    return buf.getvalue()
