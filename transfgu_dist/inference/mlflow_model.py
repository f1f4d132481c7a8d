"""The model file MLflow runs to build the pyfunc of export.log_mlflow_model (MLflow's "models from code": the
model is this code plus the Segmenter artifact, nothing pickled)."""

import mlflow

from transfgu_dist.inference.export import SegmenterModel

mlflow.models.set_model(SegmenterModel())
