"""Route ``sam3``: SAM 3 segments each candidate class from its name, no CLIP points involved.

The candidates are the whole vocabulary or the classes CLIP's crop votes found
(``pseudolabel.sam3.candidates``); the image is embedded once and the class names are prompted
in batches against that embedding. Every instance above ``pseudolabel.sam3.score_threshold``
(SAM 3's query score times its presence score) becomes a mask of its class, scored by SAM 3.
With ``pseudolabel.sam3.present_from: sam3`` the classes SAM 3 found replace CLIP's vote for
routes 1.1 and 1.2. The merge stage keeps a ``merge.sam3_fraction`` share of these masks and
paints them per ``merge.priority``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fmbseg.config import TextPromptedRouteConfig
from fmbseg.models.base import TextPromptedSegmenter
from fmbseg.pseudolabel.routes import ROUTE_TEXT, LabelledMask


def route_text_prompted(
    image: np.ndarray,
    segmenter: TextPromptedSegmenter,
    class_names: Sequence[str],
    candidates: Sequence[int],
    config: TextPromptedRouteConfig,
) -> list[LabelledMask]:
    """SAM 3's instances of each candidate class on one (H, W, 3) uint8 image."""
    if not candidates:
        return []
    embedding = segmenter.embed_image(image)
    prompts = [class_names[class_id] for class_id in candidates]
    detections = segmenter.segment_prompts(
        embedding, prompts, config.score_threshold, config.mask_threshold
    )
    return [
        LabelledMask(candidates[d.prompt], ROUTE_TEXT, d.score, d.mask)
        for d in detections
        if d.mask.any()
    ]
