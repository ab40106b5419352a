"""Benchmarks behind ``mopt bench``: results are printed as a table and written as JSON."""
