from av import __getattr__  # noqa: F401  (GPU-check stand-in; see av/__init__.py)
