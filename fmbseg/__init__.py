"""fmbseg: annotation-free, open-vocabulary semantic segmentation with vision foundation models.

Importing the package does no work beyond installing a cheap import hook that repairs
torchvision on CPU-only torch builds (see :mod:`fmbseg.compat`) the moment torchvision is
imported; heavy libraries are imported lazily by the modules that need them.
"""

from fmbseg.compat import install_torchvision_hook

__version__ = "0.1.0"

install_torchvision_hook()
