"""``python -m curvopt`` (and ``torchrun ... -m curvopt``): the command line (:func:`curvopt.cli.main`)."""

import sys

from curvopt.cli import main

if __name__ == "__main__":
    sys.exit(main())
