"""Export a trained segmenter: one self-contained file plus an MLflow (pyfunc) model.

  python jobs/export.py run=TRAINING_OUTPUT [output=FILE] [checkpoint=URI] [metrics=URI] [torchscript=true]

Writes output (default <run>/export/segmenter.pt), which `transfgu_dist.inference.segmenter.Segmenter.from_checkpoint`
and `jobs/predict.py checkpoint=...` load without the training config, and logs it to the run's MLflow
experiment as a model (`mlflow models predict -m <model uri>` and `mlflow.pyfunc.load_model` load it).
torchscript=true also writes <output stem>.torchscript.pt: encoder + decoder traced at eval.image_size (float
images (B, 3, H, W) in [0, 1] -> cluster logits (B, n_outputs, H, W); `torch.jit.load` reads it without this package).
"""

from transfgu_dist.pipeline.segmenter_jobs import run_export_job

if __name__ == "__main__":
    run_export_job(__doc__)
