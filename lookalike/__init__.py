"""The commands of lookalike (self-hosted visual similarity search for product catalogues): the `lookalike` command
and its sub-commands, `lookalike up`, the process stack and the embedded Redis. The top layer: nothing imports it."""

__version__ = "0.1.0"
