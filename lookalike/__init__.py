"""lookalike: self-hosted visual similarity search for product catalogues."""

__version__ = "0.1.0"
