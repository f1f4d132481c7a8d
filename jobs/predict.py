"""Segment your own images with a trained model.

  python jobs/predict.py run=TRAINING_OUTPUT|--config CONFIG input=FOLDER|s3://PREFIX|LIST.txt output=DEST
                         [checkpoint=URI] [metrics=URI] [names=FILE] [crf=true] [stride=PIXELS] [probs=true]

checkpoint: bootstrap final.pt (default <config output>/bootstrap/final.pt), best.pt, an s3:// copy, or an artifact
of jobs/export.py. metrics: an evaluate metrics.json whose Hungarian matching names the clusters (default
<config output>/evaluate/metrics.json when it scored; without one the label PNGs hold raw cluster ids).
names: a YAML (`3: person`, or a list) or CSV (`id,name` lines) naming the clusters, e.g. after a label-free
(data.layout=folder) run from its contact sheets evaluate/clusters/: label PNGs then hold cluster ids, legends
these names. names.json in the output gives the name of each label value.
crf=true: dense-CRF refinement. stride=N: sliding windows of train.image_size every N pixels at each image's own
resolution, logits averaged over overlaps (default: resized to eval.image_size, as evaluation and the paper do).
probs=true: also the per-pixel cluster probabilities (fp16, original resolution) in Parquet parts under probs/.
Other section.key=value arguments override the config (e.g. eval.batch_size=8).
"""

from transfgu_dist.pipeline.segmenter_jobs import run_predict_job

if __name__ == "__main__":
    run_predict_job(__doc__)
