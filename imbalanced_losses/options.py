"""What a loss author declares a new loss's options with (see ``docs/ddp.md``).

``BASE_OPTIONS`` are every queued ranking loss's; ``TEMPERATURE`` and ``POSITIVES`` are served
by the base to the losses that declare them; the factories build a loss's own options.
"""

from ._base import BASE_OPTIONS, POSITIVES, TEMPERATURE
from ._options import Option, arguments, choice, flag, integer, local, real

__all__ = [
    "BASE_OPTIONS",
    "POSITIVES",
    "TEMPERATURE",
    "Option",
    "arguments",
    "choice",
    "flag",
    "integer",
    "local",
    "real",
]
