"""For tests, benchmarks and the book: the benchmark workload and a model stand-in that runs the
scheduler without a GPU (generated from Chapter 5)."""
