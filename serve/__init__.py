"""slimserve serving layer: config, OpenAI API gateway, router, engines, metrics, CLI."""
