"""Model stage: training configuration, classifier fit, deployment bundle export."""
