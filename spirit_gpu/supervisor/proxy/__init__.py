"""Proxy mode on the worker side: listener, registration, link, upstream client."""
