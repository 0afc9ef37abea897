"""Evaluation stage: the one inferer (grid -> patch probabilities -> merger -> class map -> polygons), mergers,
region measures, scoring of a stored split (validation and evaluation alike), figures and the report."""
