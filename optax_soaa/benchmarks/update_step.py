"""Moved to `optax_soaa.benchmarks.micro.update_step`; this path still runs it."""

from optax_soaa.benchmarks.micro.update_step import *  # pylint: disable=wildcard-import,unused-wildcard-import
from optax_soaa.benchmarks.micro.update_step import main

if __name__ == "__main__":
  main()
