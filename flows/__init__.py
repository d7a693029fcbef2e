"""Prefect flows: the end-to-end pipeline, sharded pseudo-labelling, evaluation, promotion.

Importing this package first applies the project's quiet defaults (Prefect's home inside the
project, telemetry off, the project's MLflow store): Prefect reads its settings when it is
imported and its temporary server inherits them, so they must be set before any flow module
imports Prefect (``python -m flows.pipeline``, a worker loading a flow).
"""

from flows.common import apply_project_defaults

apply_project_defaults()
