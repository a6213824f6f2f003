import sys

from vmthunder.agent.main import main

sys.exit(main())
