"""Stage 1: pseudo-labels from CLIP and SAM (routes 1.1 and 1.2), subsampled and merged."""
