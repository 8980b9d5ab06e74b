"""nvfp4cal: calibrate a Hugging Face causal LM into an NVFP4 checkpoint.

The Python API (imported on first use, so that ``import nvfp4cal`` stays light)::

    nvfp4cal.quantize(model, tokenizer, recipe="nvfp4_mse", data=texts, export_dir="out")
    nvfp4cal.export(model, "out2", format="compressed_tensors", tokenizer=tokenizer)
    nvfp4cal.verify("out").ok
    nvfp4cal.set_mode(model, "quant")    # the calibrated model computes what the export computes
"""

from .version import __version__

__all__ = ["__version__", "export", "quantize", "set_mode", "verify"]


def __getattr__(name: str):
    if name in ("quantize", "export", "verify", "set_mode"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'nvfp4cal' has no attribute {name!r}")
