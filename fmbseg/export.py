"""``fmbseg export --format onnx``: a trained model for runtimes without torch.

The export folder holds the image side as one ONNX graph (float RGB windows in [0, 1], any batch
and any size in whole patches -> unit embeddings per patch in the text space), the text
embeddings of one vocabulary, and ``export.json`` (method, patch size, the inference protocol,
the vocabulary, weight provenance, each file's sha256). :mod:`fmbseg.onnx_runtime` segments
with it on onnxruntime and numpy alone.

Only methods whose scores are a cosine between image and text embeddings can be split this way;
their scorers provide ``image_embedder()``. The graph is checked against torch on a random batch
before the folder is written, so a folder that exists is a verified export.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fmbseg.config import Params
from fmbseg.errors import FmbsegError, InputError
from fmbseg.io.atomic import sha256_file, write_text_atomic
from fmbseg.models.vocabulary import validate_vocabulary
from fmbseg.onnx_runtime import EXPORT_FILE, EXPORT_FORMAT, IMAGE_FILE, TEXT_FILE

# Largest difference allowed between onnxruntime and torch on the check batch.
PARITY_TOLERANCE = 1e-4


def export_onnx(
    params: Params,
    model: str | Path,
    class_names: Sequence[str],
    out_dir: str | Path,
    *,
    max_side: int = 4096,
) -> dict[str, Any]:
    """Export ``model`` (a trained folder/file or MLflow URI) with ``class_names`` into
    ``out_dir``, replacing it whole; returns the export record."""
    from fmbseg.methods import read_model_record
    from fmbseg.predict import open_model
    from fmbseg.registry import resolve_model

    names = validate_vocabulary(class_names)
    folder = resolve_model(model)
    method = read_model_record(folder).method
    segmenter, params = open_model(params, folder)  # a registered model brings its own params
    scorer = segmenter.scorer
    if not hasattr(scorer, "image_embedder"):
        raise InputError(
            f"export: method {method!r} scores windows with more than a cosine of image and "
            "text embeddings; ONNX export supports methods whose scorer has image_embedder()"
        )
    embedder = scorer.image_embedder().eval()
    patch = scorer.patch_size
    text = scorer.prepare(names).detach().float().cpu()
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        export_image_graph(embedder, patch, building / IMAGE_FILE, max_side)
        error = _parity(embedder, building / IMAGE_FILE, patch)
        if error > PARITY_TOLERANCE:
            raise FmbsegError(
                f"export: onnxruntime differs from torch by {error:.3g} (> {PARITY_TOLERANCE}); "
                "the graph was not written"
            )
        _save_text(building / TEXT_FILE, text, names)
        record = {
            "format": EXPORT_FORMAT,
            "method": method,
            "patch_size": patch,
            "embed_dim": int(text.shape[1]),
            "vocabulary": list(names),
            "inference": params.inference.model_dump(mode="json"),
            "provenance": {role: item.tag for role, item in scorer.provenance.items()},
            "max_abs_difference_vs_torch": error,
            "files": {name: sha256_file(building / name) for name in (IMAGE_FILE, TEXT_FILE)},
        }
        write_text_atomic(building / EXPORT_FILE, json.dumps(record, indent=2, ensure_ascii=False))
        if out.exists():
            shutil.rmtree(out)
        building.rename(out)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return record


def export_image_graph(embedder: Any, patch: int, path: Path, max_side: int = 4096) -> None:
    """``embedder`` (windows -> embeddings) as ONNX with free batch size and sides in whole
    patches up to ``max_side`` pixels."""
    import torch

    # Batch 2 and sides of 3 and 4 patches: torch.export would fix dimensions of size 1.
    example = torch.rand(2, 3, 3 * patch, 4 * patch, generator=torch.Generator().manual_seed(0))
    rows = torch.export.Dim("rows", min=1, max=max_side // patch)
    cols = torch.export.Dim("cols", min=1, max=max_side // patch)
    batch = torch.export.Dim("batch", min=1, max=1024)
    # The exporter prints its progress; a CLI command reports the result instead.
    with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
        torch.onnx.export(
            embedder,
            (example.to(next(embedder.parameters()).device),),
            str(path),
            dynamo=True,
            dynamic_shapes={"windows": {0: batch, 2: patch * rows, 3: patch * cols}},
            input_names=["windows"],
            output_names=["embeddings"],
            verbose=False,
        )


def _parity(embedder: Any, path: Path, patch: int) -> float:
    """Largest |onnxruntime - torch| on a batch of another size and shape than the example."""
    import numpy as np
    import onnxruntime
    import torch

    windows = torch.rand(3, 3, 5 * patch, 2 * patch, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = embedder(windows).numpy()
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"windows": windows.numpy()})[0]
    return float(np.abs(got - expected).max())


def _save_text(path: Path, text: Any, names: tuple[str, ...]) -> None:
    from safetensors.numpy import save

    from fmbseg.io.atomic import atomic_write

    metadata = {"vocabulary": json.dumps(list(names), ensure_ascii=False)}
    with atomic_write(path) as handle:
        handle.write(save({"text_embeddings": text.numpy()}, metadata))
