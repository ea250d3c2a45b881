"""Moved to `optax_soaa.benchmarks.micro.baseline_costs`; this path still runs it."""

from optax_soaa.benchmarks.micro.baseline_costs import *  # pylint: disable=wildcard-import,unused-wildcard-import
from optax_soaa.benchmarks.micro.baseline_costs import main

if __name__ == "__main__":
  main()
