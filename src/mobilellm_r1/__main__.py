import sys

from mobilellm_r1.cli import main

sys.exit(main())
