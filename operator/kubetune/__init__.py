"""kubetune: a Kubernetes operator for distributed fine-tuning."""

__version__ = "0.2.0"
