"""The OpenAI-compatible API: wire models and errors, one router module per endpoint, the gateway
core they share, and its Ray Serve deployment."""
