"""The MLflow "model from code" of a registered fmbseg model (see :mod:`fmbseg.registry`).

MLflow copies this file into the logged model and runs it on load, so no Python object is
pickled: the model travels as its own files (``artifacts/model``) with ``serving.json``, and
loading rebuilds it through :func:`fmbseg.serving.load_registered`, which checks every file's
sha256 and every model role's weight provenance.

Input: a DataFrame with an ``image`` column (encoded PNG/JPEG; base64 text in JSON requests;
in Python also (H, W, 3) uint8 arrays) and request params ``classes`` (list of names),
``background`` (optional: the class that stands for background) and ``return_scores``.
Output: one row per image with ``labels`` (H, W) indices into ``classes`` and, when asked,
``score`` (H, W), the winning score per pixel.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
from mlflow.pyfunc import PythonModel


class SegmenterModel(PythonModel):
    def load_context(self, context: Any) -> None:
        from fmbseg.serving import load_registered

        self.segmenter, self.params = load_registered(Path(context.artifacts["model"]))

    # No type hints on the input: the logged signature states the schema.
    def predict(self, context: Any, model_input, params: dict[str, Any] | None = None):
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        from fmbseg.errors import InputError
        from fmbseg.serving import segment_request

        try:
            return segment_request(self.segmenter, self.params, model_input, params or {})
        except InputError as exc:  # the request's fault: HTTP 400 with the one-line reason
            raise MlflowException(str(exc), error_code=INVALID_PARAMETER_VALUE) from None


mlflow.models.set_model(SegmenterModel())
