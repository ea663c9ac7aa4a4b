"""mass-exp: Hydra-configured experiments for merging fine-tuned CLIP image encoders (MASS and baselines)."""

__version__ = "0.1.0"
