"""The applications on top of the library: the command line (:mod:`.cli`), the mislabel-detection
demo and its data (:mod:`.demo`, ``data/``) and the batched-HVP benchmark of ``twicediff bench``
(:mod:`.bench`)."""
