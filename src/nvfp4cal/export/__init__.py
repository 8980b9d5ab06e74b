"""Checkpoint export: layout objects, the checkpoint check, planning and streaming writes.

``nvfp4cal.export`` is this package once it is imported (Python sets the package attribute to the
subpackage), so the package is callable: ``nvfp4cal.export(model, dir, format=...)`` writes a
calibrated model's checkpoint (:func:`nvfp4cal.export.targets.export_model`).
"""

import sys
import types


class _CallableExport(types.ModuleType):
    def __call__(self, model, dir, format="modelopt", tokenizer=None, overwrite=False):
        from .targets import export_model

        return export_model(model, dir, format, tokenizer, overwrite)


sys.modules[__name__].__class__ = _CallableExport
