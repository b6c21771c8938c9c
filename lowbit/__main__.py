"""`python -m lowbit ...`: the `lowbit` command (see `lowbit.cli`), runnable without the console script."""
import sys

from lowbit.cli import main

sys.exit(main())
