"""Memory for the KV cache: the block manager (plain Python) and the paged pool (generated from the chapters)."""
