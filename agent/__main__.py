"""`python -m agent` runs the agent, the same as `gpu-agent`."""

import sys

from agent.cli import main

sys.exit(main())
