"""Console entry points besides ``nvfp4cal-calibrate`` (:mod:`nvfp4cal.calibrate`): ``nvfp4cal-verify``
(:mod:`.verify`) and ``nvfp4cal-tabulate`` (:mod:`.tabulate`)."""
