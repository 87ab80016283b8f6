"""Which device the model runs on: ``auto`` (a CUDA GPU when there is one, else the CPU) or one named.

The command lines' ``--device`` and ``Pipeline(device=...)`` go through :func:`resolve_device`, so they accept
and refuse the same names with the same messages.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")
"""What ``--device`` takes (``cuda:N`` names one GPU of several)."""


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto`` (or ``None``): ``cuda`` when torch sees a CUDA GPU, else ``cpu`` (Apple's ``mps`` only when asked
    for). A named device is checked: ``cuda`` or ``mps`` that this torch cannot use is a ``ValueError`` that says
    why and what to do.
    """
    import torch

    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}; use one of {', '.join(DEVICE_CHOICES)} (or cuda:N)") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise ValueError(
                f"device {device!r}: torch {torch.__version__} ({build}) sees no CUDA GPU; use cpu, or install a "
                "CUDA build of torch on a machine with an NVIDIA driver"
            )
        count = torch.cuda.device_count()
        if resolved.index is not None and resolved.index >= count:
            raise ValueError(f"device {device!r}: there are {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")
    elif resolved.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r}: Apple's Metal backend is not available here; use cpu")
    elif resolved.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device {device!r}: minillava runs on {', '.join(DEVICE_CHOICES[1:])}")
    return resolved
