"""Prediction on raw images with a deployment bundle: the in-process :class:`~tasks.predict.predictor.Predictor`
(no Prefect), config, stage (``flows.predict``, through the Predictor on the evaluation's inferer), outputs."""
