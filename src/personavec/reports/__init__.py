"""Self-contained offline HTML reports of a run folder (see :func:`write_report`)."""

from __future__ import annotations

from personavec.reports.html import REPORT_NAME, write_prevent_report, write_report

__all__ = ["REPORT_NAME", "write_prevent_report", "write_report"]
