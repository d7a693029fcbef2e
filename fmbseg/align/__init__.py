"""Stage 2 alignment: the losses that pull DINOv2 patch embeddings onto CLIP text embeddings."""
