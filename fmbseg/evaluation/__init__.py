"""Evaluation: segmentation metrics over the benchmarks' folder datasets."""

from fmbseg.evaluation.metrics import ConfusionMatrix

__all__ = ["ConfusionMatrix"]
