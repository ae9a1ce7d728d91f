"""Tensor parallelism: parallel layers, sharding a model, and a runner over one process per GPU
(generated from the chapters)."""
