"""Prefect deployment definitions (prefect.yaml) and the serve entry point (``python -m deployments.serve``)."""
