"""``python -m command``: the ``tunepipe`` command."""
import sys

from command.main import main

sys.exit(main())
