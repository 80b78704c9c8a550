"""The engine every dense task shares: configs (`config`), processes (`distributed`), the run directory
(`rundir`), checkpoints and resume (`checkpoint`), training data streams and DDP (`training`, `sampling`),
optimisation (`optim`, `schedulers`) and reporting (`reporting`). Tasks build their loops from these parts."""
