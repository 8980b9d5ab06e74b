"""Checkpoints: the layout objects (modelopt, compressed-tensors), planning and streaming writes, the
check every export runs before its rename, and reading a checkpoint back.

From Python, ``nvfp4cal.export(result, dir)`` and ``nvfp4cal.verify(dir)`` (:mod:`nvfp4cal.api`)."""
