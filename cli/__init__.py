"""The `bouncer` command line: the one place that knows every layer."""
