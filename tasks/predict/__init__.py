"""Prediction on raw images with a deployment bundle: config, stage (through the evaluation inferer), outputs."""
