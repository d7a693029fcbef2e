"""Test-wide settings: offline, quiet, and state kept out of the user's home."""

from __future__ import annotations

import os

os.environ.setdefault("FMBSEG_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import fmbseg  # noqa: E402,F401  (installs the torchvision repair before any test imports it)
