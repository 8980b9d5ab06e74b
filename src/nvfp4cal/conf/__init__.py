"""The packaged Hydra configs (found as pkg://nvfp4cal.conf): config groups under model/, data/, recipe/, trainer/, export/, experiment/."""
