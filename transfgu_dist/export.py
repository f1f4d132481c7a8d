"""Export a trained Segmenter as one self-contained file and as an MLflow model.

The artifact (Segmenter.artifact: decoder weights and config, the encoder's arch and weights source, the eval
size, class names and matching) reloads with `Segmenter.from_checkpoint(uri)` without the training config. The
MLflow model is a pyfunc wrapping that file: `mlflow.pyfunc.load_model(uri).predict(image)` gives label maps.
"""
from __future__ import annotations

import io
import os
import tempfile
from typing import Any

import numpy as np
import torch

from transfgu_dist import storage
from transfgu_dist.segmenter import Segmenter

try:
    from mlflow.pyfunc import PythonModel
except ImportError:  # MLflow is only needed for log_mlflow_model
    PythonModel = object


def export(seg: Segmenter, uri: str) -> str:
    """Write the artifact to `uri` (local or s3://) atomically; returns `uri`."""
    buf = io.BytesIO()
    torch.save(seg.artifact(), buf)
    storage.write_bytes(uri, buf.getvalue())
    return uri


class SegmenterModel(PythonModel):
    """MLflow pyfunc: input one HWC uint8 image or a list of them; output a list of uint8 label maps."""

    def load_context(self, context: Any) -> None:
        self.seg = Segmenter.from_checkpoint(context.artifacts["segmenter"])

    def predict(self, context, model_input, params=None):  # untyped: MLflow infers no schema from hints
        return self.seg.segment(model_input)


def log_mlflow_model(seg: Segmenter, name: str = "segmenter") -> str:
    """Log the artifact as a pyfunc model (with this package as code) to the active MLflow run; the model URI."""
    import mlflow

    package = os.path.dirname(os.path.abspath(__file__))
    with tempfile.TemporaryDirectory() as d:
        path = export(seg, os.path.join(d, "segmenter.pt"))
        info = mlflow.pyfunc.log_model(name=name, python_model=SegmenterModel(), artifacts={"segmenter": path},
                                       code_paths=[package], pip_requirements=["torch", "timm", "numpy", "pillow"])
    return info.model_uri
