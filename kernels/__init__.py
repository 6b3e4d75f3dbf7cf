"""Triton kernels behind ``epg.ops``; this folder installs as the package ``epg_kernels``.

Plain launchers over tensors, one op family per module (``layer_norm``: LayerNorm and LayerNorm +
adaLN modulation, forward and backward). Each launcher has the signature and return convention
of the function of the same name in ``epg.reference``, which defines the math. The package
knows nothing of EPG models, autograd or ``torch.library``: the op layer wires these in.

The op layer reads two names:

* ``IMPLEMENTATIONS``: op name -> launcher; empty when Triton cannot be imported.
* ``UNAVAILABLE_REASON``: why ``IMPLEMENTATIONS`` is empty, or ``None`` when Triton imported.

Importing this package never fails for lack of Triton. On a CPU-only machine the kernels run
only under the Triton interpreter (``TRITON_INTERPRET=1`` set before Triton is imported).
"""

from __future__ import annotations

from typing import Callable

IMPLEMENTATIONS: dict[str, Callable] = {}
UNAVAILABLE_REASON: str | None

try:
    import triton  # noqa: F401
except Exception as exc:  # ImportError, or a broken install raising something else
    UNAVAILABLE_REASON = f"triton could not be imported: {type(exc).__name__}: {exc}"
else:
    UNAVAILABLE_REASON = None
    from .layer_norm import layer_norm, layer_norm_backward, ln_modulate, ln_modulate_backward

    IMPLEMENTATIONS.update(
        {
            "layer_norm": layer_norm,
            "layer_norm_backward": layer_norm_backward,
            "ln_modulate": ln_modulate,
            "ln_modulate_backward": ln_modulate_backward,
        }
    )

__all__ = ["IMPLEMENTATIONS", "UNAVAILABLE_REASON"]
