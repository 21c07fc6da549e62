"""kubetune: a Kubernetes operator for distributed fine-tuning."""

__version__ = "0.1.0"
