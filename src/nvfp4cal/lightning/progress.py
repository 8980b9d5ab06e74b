"""The progress bar of the calibration pass: Lightning's TQDM bar, labelled for what the pass does."""

from __future__ import annotations

from lightning.pytorch.callbacks import TQDMProgressBar


class CalibrationProgress(TQDMProgressBar):
    """``Trainer.validate`` runs max calibration: its bar says so instead of "Validation"."""

    @property
    def validation_description(self) -> str:
        return "Calibration (max)"
