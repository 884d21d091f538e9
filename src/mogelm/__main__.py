import sys

from mogelm.cli import main

sys.exit(main())
