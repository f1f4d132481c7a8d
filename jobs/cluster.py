"""Stage 2: FAISS k-means of the crop CLS features into K concepts (foreground and background pools apart)."""

from transfgu_dist.pipeline.cli import run

if __name__ == "__main__":
    run(["cluster"], __doc__)
