"""Prediction on raw images with a deployment bundle."""
