"""Export a trained segmenter: one self-contained file plus an MLflow (pyfunc) model.

  python jobs/export.py run=TRAINING_OUTPUT [output=FILE] [checkpoint=URI] [metrics=URI] [names=FILE]
                        [torchscript=true] [embed_encoder=false]

Writes output (default <run>/export/segmenter.pt), which `transfgu_dist.inference.segmenter.Segmenter.from_checkpoint`
and `jobs/predict.py checkpoint=...` load without the training config, and logs it to the run's MLflow
experiment as a model (`mlflow models predict -m <model uri>` and `mlflow.pyfunc.load_model` load it, with the
printed mlflow_tracking_uri as MLFLOW_TRACKING_URI). The file holds the encoder's weights, so it loads offline;
embed_encoder=false leaves them out (a smaller file; loading then needs the weights source, e.g. timm's hub).
names: cluster names as for jobs/predict.py.
torchscript=true also writes <output stem>.torchscript.pt: encoder + decoder traced at eval.image_size (float
images (B, 3, H, W) in [0, 1] -> cluster logits (B, n_outputs, H, W); `torch.jit.load` reads it without this package).
"""

from transfgu_dist.pipeline.segmenter_jobs import run_export_job

if __name__ == "__main__":
    run_export_job(__doc__)
