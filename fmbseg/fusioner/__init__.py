"""Fusioner (Ma et al., BMVC 2022) built from its spec: module, loss, trainer."""
