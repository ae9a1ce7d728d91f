"""The engine: requests, the scheduler, and the loop that runs them (generated from the chapters)."""
