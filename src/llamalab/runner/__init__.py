"""What ``src/train.py`` drives: one stage run, from a composed Hydra config to its export.

- :mod:`~llamalab.runner.run`: the run itself: check the config and the inputs (read from
  :mod:`llamalab.pipeline`), plan the memory, build data + stage + trainer, fit, export, link.
- :mod:`~llamalab.runner.paths`: the run directory, ``<outputs_root>/<run>/latest``, ``export/``.
- :mod:`~llamalab.runner.callbacks`: the callbacks every run gets (W&B, preemption checkpoint,
  RNG states) and the fit that ends a preempted run with ``128 + signal``.
- :mod:`~llamalab.runner.checkpoints`: the runner's checkpoint I/O: crash-safe writes, finding
  and checking the checkpoint to resume, the end-of-stage Hugging Face export.
- :mod:`~llamalab.runner.reshard`: resuming on another world size (ZeRO checkpoints converted
  to DeepSpeed's universal format, Lightning's per-rank counters rescaled).
- :mod:`~llamalab.runner.tracking`: W&B (online or offline), tags, groups, reading runs back.
- :mod:`~llamalab.runner.cli`: the command-line wrapper: one clear message for user errors.

Imports run one way: ``run`` -> ``callbacks`` -> ``tracking``, ``paths``; ``run`` ->
``checkpoints``, ``reshard``; ``reshard`` -> ``checkpoints``; ``cli`` imports none of them.
"""
