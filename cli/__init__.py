"""The ``seftkit`` command line: a thin skin over the Python API (one module per command)."""
