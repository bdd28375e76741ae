"""Evaluation: perplexity, speed, memory, size, generation quality, comparison and reports."""

from .compare import comparison_rows
from .evaluate import EvaluationReport, evaluate
from .report import write_reports

__all__ = ["EvaluationReport", "comparison_rows", "evaluate", "write_reports"]
