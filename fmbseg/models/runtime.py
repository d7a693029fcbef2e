"""Device and precision as configuration, never hard-coded."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fmbseg.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from fmbseg.config import ModelsConfig, Precision


@dataclass(frozen=True)
class Runtime:
    device: str = "cpu"
    precision: Precision = "fp32"

    @classmethod
    def from_config(cls, models: ModelsConfig) -> Runtime:
        return cls(models.device, models.precision)

    def torch_device(self) -> torch.device:
        import torch

        try:
            device = torch.device(self.device)
        except RuntimeError:
            raise ConfigError(f"models.device: {self.device!r} is not a torch device") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"models.device: {self.device!r} requested but CUDA is unavailable")
        return device

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """Mixed precision on CUDA when configured; plain fp32 everywhere else."""
        import torch

        if self.precision == "fp32" or self.torch_device().type != "cuda":
            yield
            return
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        with torch.autocast("cuda", dtype=dtype):
            yield
