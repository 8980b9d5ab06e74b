"""The package version (written into every checkpoint's producer metadata)."""

__version__ = "0.1.0"
