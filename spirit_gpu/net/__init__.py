"""aiohttp-facing pieces both sides use: WebSocket writes, batching, HTTP relaying."""
