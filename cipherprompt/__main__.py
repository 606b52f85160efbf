import sys

from cipherprompt.cli import main

sys.exit(main())
