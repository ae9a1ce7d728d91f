"""Requests and their scheduling: the sequence, the scheduler and the step it describes. Plain Python,
no torch (generated from Chapter 5)."""
