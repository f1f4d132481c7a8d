"""Export a trained Segmenter as one self-contained file and as an MLflow model.

The artifact (Segmenter.artifact: decoder weights and config, the encoder's arch, weights source and, unless opted
out, its weights, the eval size, class names and matching) reloads with `Segmenter.from_checkpoint(uri)` without the
training config, offline. The MLflow model is a pyfunc wrapping that file: `mlflow.pyfunc.load_model(uri)
.predict(image)` gives label maps. Optionally encoder + decoder are traced to TorchScript at the eval size
(export_torchscript).
"""

from __future__ import annotations

import io
import logging
import os
import tempfile
import warnings
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from transfgu_dist.inference.segmenter import Segmenter
from transfgu_dist.io import storage
from transfgu_dist.method.encoder import normalize

try:
    from mlflow.pyfunc import PythonModel
except ImportError:  # MLflow is only needed for log_mlflow_model
    PythonModel = object


def export(seg: Segmenter, uri: str, embed_encoder: bool = True) -> str:
    """Write the artifact (Segmenter.artifact, the encoder weights embedded unless `embed_encoder` is False) to
    `uri` (local or s3://) atomically; returns `uri`."""
    buf = io.BytesIO()
    torch.save(seg.artifact(embed_encoder), buf)
    storage.write_bytes(uri, buf.getvalue())
    return uri


class SegmenterNet(nn.Module):
    """Encoder + decoder as one float32 module: float (B, 3, H, W) in [0, 1] at the eval size -> cluster logits
    (B, n_outputs, H, W) at that size (Eq. 2, upsampled bilinearly); argmax over the channels gives the cluster ids."""

    def __init__(self, seg: Segmenter):
        super().__init__()
        self.encoder, self.decoder, self.size = seg.encoder, seg.decoder, tuple(seg.image_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.decoder(self.encoder(normalize(images)).patch).logits
        return F.interpolate(logits, size=self.size, mode="bilinear", align_corners=False)


def export_torchscript(seg: Segmenter, uri: str) -> str:
    """Trace SegmenterNet on CPU at the eval size (the input size is then fixed; the batch size is not) and
    write it to `uri` (torch.jit.load reads it without this package); returns `uri`."""
    net = SegmenterNet(seg).cpu().eval()
    example = torch.rand(2, 3, *seg.image_size)
    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings (the shape-dependent branches are constant at this size)
        torch.jit.save(torch.jit.trace(net, example, check_trace=False), buf)  # and torch.jit's deprecation
    storage.write_bytes(uri, buf.getvalue())
    seg.to(seg.device)
    return uri


class SegmenterModel(PythonModel):
    """MLflow pyfunc: input one HWC uint8 image or a list of them; output a list of uint8 label maps."""

    def load_context(self, context: Any) -> None:
        self.seg = Segmenter.from_checkpoint(context.artifacts["segmenter"])

    def predict(self, context: Any, model_input: np.ndarray, params: dict[str, Any] | None = None) -> list[np.ndarray]:
        # np.ndarray: a hint MLflow infers no schema from and checks nothing against (see log_mlflow_model)
        return self.seg.segment(model_input)


class NoSignatureNotice(logging.Filter):
    """While in use (a context manager): `logger` drops MLflow's "model signature cannot be inferred" notice."""

    def __init__(self, logger: logging.Logger):
        super().__init__()
        self.logger = logger

    def filter(self, record: logging.LogRecord) -> bool:
        return "cannot be used to infer model signature" not in record.getMessage()

    def __enter__(self) -> None:
        self.logger.addFilter(self)

    def __exit__(self, *exc: object) -> None:
        self.logger.removeFilter(self)


def log_mlflow_model(seg: Segmenter, name: str = "segmenter", embed_encoder: bool = True) -> str:
    """Log the artifact as a pyfunc model (mlflow_model.py, with this package as code) to the active MLflow run;
    the model URI. No signature on purpose: the input is an image of any size or a list of them, which no MLflow
    schema describes, so MLflow's notice that it inferred none is not shown."""
    import mlflow

    package = os.path.dirname(os.path.abspath(__file__))
    notices = logging.getLogger("mlflow.pyfunc")
    with tempfile.TemporaryDirectory() as d, NoSignatureNotice(notices):
        path = export(seg, os.path.join(d, "segmenter.pt"), embed_encoder)
        info = mlflow.pyfunc.log_model(
            name=name,
            python_model=os.path.join(package, "mlflow_model.py"),
            artifacts={"segmenter": path},
            code_paths=[package],
            pip_requirements=["torch", "timm", "numpy", "pillow"],
        )
    return info.model_uri
