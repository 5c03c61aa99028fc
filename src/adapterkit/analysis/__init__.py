"""What an adapter learned, where, and what it cost: ``analyze`` and its report (``adapterkit analyze``)."""

from adapterkit.analysis.api import analyze, write_report

__all__ = ["analyze", "write_report"]
