"""Stage 5: Hungarian-matched mIoU and pixel accuracy over the whole val split, with pictures."""

from transfgu_dist.pipeline.cli import run

if __name__ == "__main__":
    run(["evaluate"], __doc__)
