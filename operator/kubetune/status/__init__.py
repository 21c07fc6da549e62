"""kubetune.status."""
