"""Stage 3: the pseudo-label bank of Grad-CAM response maps of all K concepts (Eqs 5-8)."""

from transfgu_dist.pipeline.cli import run

if __name__ == "__main__":
    run(["pseudo_label"], __doc__)
