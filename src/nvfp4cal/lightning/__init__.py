"""The Lightning glue: the LightningModule (delegates to the schedule), the DataModule, the one callback
(ordered, timed post-calibration steps) and the FSDP2 strategy. The only users of Lightning."""
