"""A study: the whole pipeline of a run directory (:mod:`~rcfd.study.pipeline`), its typed
configuration (:mod:`~rcfd.study.config`) and named presets (:mod:`~rcfd.study.presets`),
the evaluation stage that measures every method's rows (:mod:`~rcfd.study.evaluation`),
and what a run records of its machine (:mod:`~rcfd.study.runinfo`). It sits on top of the
methods, the evaluation library and the report; only the command lines sit above it."""
