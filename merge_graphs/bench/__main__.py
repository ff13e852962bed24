import sys

from merge_graphs.bench import main

sys.exit(main())
