import sys

from loramux.cli import main

sys.exit(main())
