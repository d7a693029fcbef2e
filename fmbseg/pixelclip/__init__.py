"""PixelCLIP (Shin et al., NeurIPS 2024): CLIP's image tower fine-tuned on unlabelled masks,
clustered online onto learnable class prompts (spec: docs/pixelclip.md)."""
