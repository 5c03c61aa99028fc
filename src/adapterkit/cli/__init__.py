"""The ``adapterkit`` command line."""
