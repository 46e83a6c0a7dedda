"""``python -m lorafind_utils.dryrun``: the paper profile's dry run on CPU (see :mod:`lorafind_utils.dryrun`)."""
import sys

from lorafind_utils.dryrun import main

sys.exit(main())
