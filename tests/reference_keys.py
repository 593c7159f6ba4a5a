"""The reference checkpoints' key layouts (tests/data/reference_*_keys.tsv): name and shape of
every state-dict entry, in file order, as the reference implementation saves them."""

import ast
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"


def read_reference_keys(name: str) -> tuple[list[tuple[str, tuple[int, ...]]], int | None]:
    """``(rows, stated)``: ``(key, shape)`` rows of ``reference_<name>_keys.tsv`` and the
    parameter count its header states (None when it states none)."""
    path = DATA / f"reference_{name}_keys.tsv"
    rows, stated = [], None
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            if "trainable parameters" in line:
                stated = int(line.split(",")[1].split()[0])
            continue
        if line.strip():
            key, shape = line.split("\t")
            rows.append((key, tuple(ast.literal_eval(shape))))
    return rows, stated
