import sys

from merge_graphs.lab.bench import main

sys.exit(main())
