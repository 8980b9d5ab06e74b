"""nvfp4cal: calibrate a Hugging Face causal LM into an NVFP4 W4A4 checkpoint."""

__version__ = "0.1.0"
