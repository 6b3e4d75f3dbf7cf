"""epg: pixel-space diffusion and consistency models trained with EPG, on fused ops.

``epg.ops`` holds the fused ops (with PyTorch references in ``epg.reference``), ``epg.models``
the EPG networks and their named configs, ``epg.schedules`` the noise schedules and EDM
preconditioning, ``epg.checkpoint`` safe checkpoint I/O and official-checkpoint import.
"""

# torch first: the compiled extension epg._C links against its shared libraries.
import torch  # noqa: F401

__version__ = "0.1.0"
