"""`python -m lokr_diffusers` = the `lokr-diffusers` command."""

import sys

from .cli import main

sys.exit(main())
