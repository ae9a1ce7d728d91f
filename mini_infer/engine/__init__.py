"""The engine: prompts in (the input processor), the step loop, outputs out (the output processor)
(generated from Chapter 6)."""
