"""kubetune.handlers."""
