"""Comparison reports (`qlora-bench report`): Markdown plus one self-contained HTML file with embedded plots.

data.py gathers every table from the results, the estimator and validation; plots.py draws them with matplotlib;
claims.py checks what fine-tuning guides say; render.py writes Markdown and HTML. Everything is sorted and
formatted deterministically, PNGs carry no timestamps, so the same inputs give the same bytes.
"""

from .render import build_report

__all__ = ["build_report"]
