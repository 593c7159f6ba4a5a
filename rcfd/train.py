"""``python -m rcfd.train``: the study: train every method, then evaluate. The command line lives in
:mod:`rcfd.cli.train`; this module only gives it its short name."""

import sys

from rcfd.cli import stop_cleanly_on_sigterm

if __name__ == "__main__":
    stop_cleanly_on_sigterm()
    from rcfd.cli.train import main  # after the handler: a SIGTERM while importing stops cleanly

    sys.exit(main())
