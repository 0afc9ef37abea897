"""Evaluation stage: reconstruction, scoring, region metrics and the report."""
