"""Seeds derived from a run's seed: the one hash every random stream of a run is keyed by.

Each stream (a stage's initialisation, an epoch's order, a batch of sampling noise) gets its
own seed ``derive_seed(seed, *what)``, so streams never share numbers and none depends on
how many draws another made. The value is fixed by the text ``":".join(map(str, parts))``:
changing this function changes every run's numbers.
"""

from __future__ import annotations

import hashlib
from typing import Any


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed: the first 8 bytes (little-endian) of ``sha256(":".join(map(str,
    parts)))``, shifted right by one so it is a non-negative int64 that
    ``torch.Generator.manual_seed`` takes. E.g. ``derive_seed(seed, "pd", "T16", rank)``."""
    if not parts:
        raise ValueError("derive_seed needs at least one part (the run's seed)")
    text = ":".join(map(str, parts))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1
