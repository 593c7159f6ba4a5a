"""How any unit of training runs: the one loop (:mod:`~rcfd.training.loop`), its resumable
state (:mod:`~rcfd.training.state`), the run directory (:mod:`~rcfd.training.rundir`),
optimizers, schedules and EMA (:mod:`~rcfd.training.optim`), metric logs
(:mod:`~rcfd.training.logger`) and CPU threads (:mod:`~rcfd.training.threads`). What is
trained, and with which loss, is the business of :mod:`rcfd.methods`."""
