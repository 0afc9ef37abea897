"""Feature stage: frozen backbones, training-pass sampling, zarr feature stores."""
