"""The MLflow "model from code" of a trained alignment module (see :mod:`fmbseg.registry`).

MLflow copies this file into the logged model and runs it on load, so no Python object is
pickled: the weights travel as the module's own safetensors + JSON artifacts and are checked
against their sha256 when loaded. Input: frozen-encoder patch features, float32 (B, N, C);
output: the module's unit vectors in CLIP's text space, (B, N, D).
"""

from __future__ import annotations

from typing import Any

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel


class AlignmentModuleModel(PythonModel):
    def load_context(self, context: Any) -> None:
        from fmbseg.align.module import load_module

        self.module, self.info = load_module(context.artifacts["module"])
        self.module.eval()

    # np.ndarray: a hint MLflow accepts without deriving a schema from it; the logged
    # signature states the tensor shapes.
    def predict(
        self, context: Any, model_input: np.ndarray, params: dict[str, Any] | None = None
    ) -> np.ndarray:
        import torch

        features = torch.from_numpy(np.asarray(model_input, dtype=np.float32))
        with torch.no_grad():
            return self.module(features).numpy()


mlflow.models.set_model(AlignmentModuleModel())
