"""Schedules: how the model is cut into units for calibration, and where each unit's changes are kept.

One interface, two schedules (the ``calibration`` config group):

* :class:`~nvfp4cal.schedule.whole.WholeModel` - the whole model is one unit, held by the strategy.
* :class:`~nvfp4cal.schedule.layerwise.Layerwise` - one decoder layer at a time, read from the checkpoint
  (or from the model held in memory), its inputs cached, its state persisted (resumable).

Both calibrate each unit with :mod:`nvfp4cal.calibration` and run the same per-unit steps. A schedule
has ``context`` (the run context it gives the steps), ``start`` / ``observe`` (the Trainer's pass over
the data), ``finish`` (calibrate, run the steps and persist every unit), ``report``, ``abort`` and ``done``.
"""

from .layerwise import Layerwise, LayerwiseSchedule
from .whole import WholeModel, WholeModelSchedule

__all__ = ["Layerwise", "LayerwiseSchedule", "WholeModel", "WholeModelSchedule"]
