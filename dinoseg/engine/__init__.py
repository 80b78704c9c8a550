"""The engine every dense task shares: configs (`config`), processes (`distributed`), the run directory
(`rundir`), checkpoints, resume and a run's best / last checkpoints (`checkpoint`), the loop's set-up, training data
streams and DDP (`training`, `sampling`), optimisation (`optim`, `schedulers`) and reporting, the training loss
included (`reporting`). Tasks build their loops from these parts."""
