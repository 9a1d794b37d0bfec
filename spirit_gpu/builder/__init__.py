"""`spirit-gpu-builder`: scaffold a worker project from a description of the request input."""
