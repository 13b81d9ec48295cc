"""Who is calling: API keys (static and managed) and JWT bearer tokens."""
