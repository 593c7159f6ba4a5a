"""``python -m rcfd.evaluate``: IS / FID / KID of a diffusion checkpoint. The command line lives in
:mod:`rcfd.cli.evaluate`; this module only gives it its short name."""

import sys

from rcfd.cli import stop_cleanly_on_sigterm

if __name__ == "__main__":
    stop_cleanly_on_sigterm()
    from rcfd.cli.evaluate import main  # after the handler: a SIGTERM while importing stops cleanly

    sys.exit(main())
