import sys

from kubellm.cli import main

sys.exit(main())
