import this_module_does_not_exist  # noqa: F401

from spirit_gpu import start

start({"handler": lambda request, env: {}})
