"""The OpenAI-compatible API: wire models, errors, the gateway ingress and its admin routes."""
