"""What a run leaves for people to read: ``results.json`` / ``results.md``
(:mod:`~rcfd.report.results`), the figures (:mod:`~rcfd.report.plots`), the paired
statistics of a multi-seed study (:mod:`~rcfd.report.stats`) and its report
(:mod:`~rcfd.report.study`). Pure functions of plain data plus the files they write."""
