"""``python -m rcfd.report``: the paired study of finished seed runs, from their results alone.
The command line lives in :mod:`rcfd.cli.report`; this module only gives it its short name."""

import sys

from rcfd.cli import stop_cleanly_on_sigterm

if __name__ == "__main__":
    stop_cleanly_on_sigterm()
    from rcfd.cli.report import main  # after the handler: a SIGTERM while importing stops cleanly

    sys.exit(main())
