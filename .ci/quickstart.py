"""Print the command lines of the README's Quick start (the first fenced block under the
"Quick start" heading), one per line, so that CI runs exactly what the README tells users."""

import re
import sys
from pathlib import Path


def quickstart_commands(readme: str) -> list[str]:
    m = re.search(r"^#+\s*quick\s*-?\s*start.*?$(.*?)^```[^\n]*\n(.*?)^```", readme, re.I | re.M | re.S)
    if not m:
        raise SystemExit("README has no 'Quick start' heading followed by a fenced block")
    lines = [line.strip() for line in m.group(2).splitlines()]
    return [line.removeprefix("$ ") for line in lines if line and not line.startswith("#")]


if __name__ == "__main__":
    print("\n".join(quickstart_commands(Path(sys.argv[1]).read_text(encoding="utf-8"))))
