"""``python -m klotski VERB ...``: the ``klotski`` command line (:mod:`klotski.cli`)."""
import sys

from klotski.cli import main

sys.exit(main())
