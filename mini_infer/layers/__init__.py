"""What runs inside and right after the model's forward in the engine: paged attention and the sampler
(generated from Chapter 6)."""
