"""The server: an asynchronous engine loop and an OpenAI-compatible HTTP API (generated from Chapter 8)."""
