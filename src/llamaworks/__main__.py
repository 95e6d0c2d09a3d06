"""`python -m llamaworks ...` (and `torchrun ... -m llamaworks pretrain ...`): the same CLI as `llamaworks`."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
