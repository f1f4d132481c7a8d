"""Benchmarks of the hot paths against ceilings measured in the same run (run by jobs/bench.py); outside the
package: no library code imports them."""
