"""Dataset stage: image/mask association, labelling, split, sampling regions, patch dataset generation."""
