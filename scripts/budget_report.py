"""Best compression configuration within a size budget, from budget sweeps' results.json:

    python scripts/budget_report.py outputs/multirun/<sweep dir> [more sweep dirs]

See recsys_compress/reporting/budget.py (exit status 1 when no trial fits the budget).
"""

import sys

from recsys_compress.reporting.budget import main

if __name__ == "__main__":
    sys.exit(main())
