"""patchflow Prefect flows: wiring of the stages in ``tasks``, no logic."""

import storage.settings  # noqa: F401  (project Prefect defaults, before prefect is imported)
