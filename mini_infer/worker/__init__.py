"""Execution: the model runner that turns one scheduled step into sampled tokens (generated from Chapter 6)."""
