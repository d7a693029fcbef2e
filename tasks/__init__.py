"""Prefect tasks: thin wrappers that run fmbseg's DVC stages and registry operations."""
