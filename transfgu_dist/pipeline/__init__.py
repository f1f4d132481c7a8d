"""The distributed pipeline: the stage contract (folders, settings inputs, results), the settings guard, the
output lease, preflight checks, the console, MLflow tracking, the five stages on Ray (extract, cluster,
pseudo_label, bootstrap, evaluate) with what they share (the image-stage driver, scoring, Table 3), the sweep, and
the command line every job uses. Stages import each other never: they meet in the contract and the io layer."""
