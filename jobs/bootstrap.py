"""Stage 4: teacher-student bootstrapping of the Segmenter decoder on Ray Train (Eqs 9-16)."""

from transfgu_dist.pipeline.cli import run

if __name__ == "__main__":
    run(["bootstrap"], __doc__)
