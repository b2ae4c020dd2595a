import sys

from deepkern.bench.harness import main

sys.exit(main())
