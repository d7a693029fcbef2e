"""Prefect flows: the end-to-end pipeline, sharded pseudo-labelling, evaluation, promotion."""
