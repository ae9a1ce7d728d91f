"""Model architectures (generated from the chapters)."""
