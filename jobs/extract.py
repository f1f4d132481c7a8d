"""Stage 1: sliding-window crops with the foreground prior, encoded by the frozen DINO ViT, written to Parquet."""

from transfgu_dist.pipeline.cli import run

if __name__ == "__main__":
    run(["extract"], __doc__)
