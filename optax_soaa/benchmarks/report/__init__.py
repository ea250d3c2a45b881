"""The benchmark's reports: a run's table and plots, the summary, BENCHMARKS.md.

* `tables`: one run's Markdown (its table, notes and record);
* `summary`: the table across tasks that opens BENCHMARKS.md and the README;
* `plots`: one run's curves, diagnostics and sweep plots;
* `document`: BENCHMARKS.md and the full protocol page.
"""

from optax_soaa.benchmarks.report.document import benchmarks_md
from optax_soaa.benchmarks.report.document import PROTOCOL_PAGE
from optax_soaa.benchmarks.report.document import protocol_text
from optax_soaa.benchmarks.report.document import README_MARKS
from optax_soaa.benchmarks.report.document import with_summary
from optax_soaa.benchmarks.report.plots import PLOT_FILES
from optax_soaa.benchmarks.report.plots import write_plots
from optax_soaa.benchmarks.report.summary import summary_table
from optax_soaa.benchmarks.report.tables import diagnostics_summary
from optax_soaa.benchmarks.report.tables import markdown_report
from optax_soaa.benchmarks.report.tables import table_rows

TABLE_FILE = "results.md"

__all__ = ("PLOT_FILES", "PROTOCOL_PAGE", "README_MARKS", "TABLE_FILE",
           "benchmarks_md", "diagnostics_summary", "markdown_report",
           "protocol_text", "summary_table", "table_rows", "with_summary",
           "write_plots")
