"""``python -m rcfd {train,sample,evaluate,export,report} ...``: the package's command lines behind one name
(each is also ``python -m rcfd.<command>``)."""

from __future__ import annotations

import importlib
import sys
from typing import Sequence

COMMANDS = {"train": "rcfd.cli.train", "sample": "rcfd.cli.sample", "evaluate": "rcfd.cli.evaluate",
            "export": "rcfd.cli.export", "report": "rcfd.cli.report"}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = "usage: python -m rcfd {" + ",".join(COMMANDS) + "} [options]  (--help after a command for its options)"
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        return 0
    if argv[0] not in COMMANDS:
        print(f"{usage}\nerror: unknown command {argv[0]!r}", file=sys.stderr)
        return 2
    return importlib.import_module(COMMANDS[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
