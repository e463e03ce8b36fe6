"""Tools on top of the service: the `faceverify` command, the Python client, and
development certificates."""
