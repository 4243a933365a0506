"""Training: supernets, routers, evaluation and the accuracy-compute report.

pipeline (`dynaroute.train`: any data set, by kind) -> tabular / text (the two pipelines) ->
stages (run folder, resumable stages), distill, textdata, supernet, router; recipes (digits,
sst2) give their own splits; evaldata and report are `dynaroute eval`. The package is named
`training` so that `dynaroute.train`, the function, is not shadowed by a subpackage.
"""
