"""patchflow's Hydra config tree, in Quadra's layout (``python -m flows.train experiment=...``).

Data only: :mod:`tasks.compose` composes it with hydra-core's compose API and maps the result onto the flows'
pydantic configs. Groups: ``backbone``, ``model``, ``transforms``, ``task``, ``trainer``, ``core``, ``export``,
``datamodule/base`` and ``experiment/base/classification``.
"""
