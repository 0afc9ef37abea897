"""Dataset stage: raw images and masks -> a Quadra-layout patch dataset.

- ``association``: images paired with their masks (``get_image_mask_association``);
- ``config``: the stage's config sections; ``params``: one build's parameters (``DatasetParams``);
- ``generate``: ``generate_patch_dataset`` = ``checks`` -> plan (``state``) -> ``shards`` of per-image work
  (``images``: ``labelling``, ``regions``, ``triangulation``) -> ``publish``; ``split``: the seeded split;
  ``output``: where a dataset may be written;
- ``stage``: the content key and the Prefect tasks of ``flows/dataset.py``.
"""
