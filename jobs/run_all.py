"""TransFGU end to end: extract -> cluster -> pseudo_label -> bootstrap -> evaluate.

With no arguments: the embedded default (a local Ray started in-process, synthetic scenes, local outputs).
On a cluster: ray job submit --working-dir . -- python jobs/run_all.py --preset cocostuff27 output=s3://...
A rerun with the same output resumes: committed stages are skipped, interrupted ones continue.
"""

from transfgu_dist.pipeline.cli import run

STAGES = ["extract", "cluster", "pseudo_label", "bootstrap", "evaluate"]

if __name__ == "__main__":
    run(STAGES, __doc__)
