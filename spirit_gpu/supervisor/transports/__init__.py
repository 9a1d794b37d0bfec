"""How the supervisor reaches the platform: the plain agent protocol and the link."""
