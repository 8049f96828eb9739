import sys

from mcpft.cli import main

sys.exit(main())
