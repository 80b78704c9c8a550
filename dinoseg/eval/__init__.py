"""Dense tasks, one package each (`eval/<task>/`), chosen by a config's `task` key.

A task's `run` module gives the command line what it needs: `NAME`, `SCHEMA` (its config dataclass),
`DEMO_CONFIG`, `config_from_layers(layers, require)` and `main(command, cfg, args)`, and optionally `OFFICIAL`
(an `engine.official_config.OfficialSchema`: its keys of the official DINOv3 config schema).
"""

import importlib

TASKS = {"segmentation": "dinoseg.eval.segmentation.run", "depth": "dinoseg.eval.depth.run",
         "detection": "dinoseg.eval.detection.run"}


def task_runner(name: str):
    """The `run` module of task `name`."""
    if name not in TASKS:
        raise KeyError(name)
    return importlib.import_module(TASKS[name])
