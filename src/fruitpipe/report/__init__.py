"""The run's visual report: one self-contained OUT/report.html (images inlined, no network)."""

from fruitpipe.report.html import build_report, write_report

__all__ = ["build_report", "write_report"]
