"""The proxy route: forwarding LLM-server requests to proxy-mode workers."""
