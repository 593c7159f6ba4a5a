"""``python -m rcfd.export``: a checkpoint out to a diffusers folder or an ``.npz`` of samples.
The command line lives in :mod:`rcfd.cli.export`; this module only gives it its short name."""

import sys

from rcfd.cli import stop_cleanly_on_sigterm

if __name__ == "__main__":
    stop_cleanly_on_sigterm()
    from rcfd.cli.export import main  # after the handler: a SIGTERM while importing stops cleanly

    sys.exit(main())
