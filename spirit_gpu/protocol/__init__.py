"""Wire formats both sides import (msgspec only; golden-tested in tests/protocol/).

``ipc``: supervisor <-> handler process frames. ``agent``: the plain agent
protocol (paths, headers, bodies). ``link``: the multiplexed worker link.
``proxy``: proxy-worker registration and the proxy link frames.
"""
