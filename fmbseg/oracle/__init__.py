"""The oracle world: procedural scenes with exact labels, and fake models that read them.

No pretrained CLIP, SAM or DINOv2 weights are needed to test the pipeline's logic: scenes
(:mod:`fmbseg.oracle.scenes`) paint every class in its own colour, and the fakes
(:mod:`fmbseg.oracle.fakes`) recover classes from colours, so every stage's right answer is
known in advance. Select them with ``backend: oracle`` in the models configuration.
"""
