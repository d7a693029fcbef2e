"""``fmbseg demo``: a local web page that segments an uploaded image with typed class names.

``service`` does the work (samples, loaded segmenters, jobs on a worker thread) and knows no
HTTP; ``app`` puts it behind FastAPI with the static page in ``static/``.
"""
