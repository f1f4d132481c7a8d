"""The five stages, one module each, in run order: extract, cluster, pseudo_label, bootstrap, evaluate. Each
exposes `run_<stage>(cfg) -> StageResult` and reads its inputs through the contract (pipeline.contract)."""
