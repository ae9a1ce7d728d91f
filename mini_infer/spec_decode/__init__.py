"""Speculative decoding's plain-Python side: its configuration and metrics, and the n-gram proposer
(generated from Chapter 10). The rejection sampler, which needs torch, is `mini_infer.layers.rejection_sampler`."""
