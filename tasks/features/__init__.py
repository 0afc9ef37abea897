"""Feature stage: frozen-backbone features of training passes and val/test patches, stored in zarr.

- ``weights``: backbone names, offline weight resolution and digest (torch-free);
- ``extractor``: architectures, preprocessing, :class:`FeatureExtractor`; ``export``: TorchScript/ONNX;
- ``listing``: the train list and val/test listing; ``sampler``: drawing and cropping training patches;
- ``plans``: what a store holds (row plans) and reading its patches; ``shards``: the sharded, resumable
  filling of a store; ``store``: store jobs (prepare, fill, finalize);
- ``params``: what a store depends on, from the config; ``stage``: content keys and the Prefect tasks;
- ``run``: the feature stage inside the train flow (every pass and the val split, sharded on Dask).
"""
