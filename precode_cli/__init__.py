"""precode: gradient-leakage attacks and defenses as file-connected command-line stages.

This package holds the Typer app (`app`, `commands/`) and the shared core (file formats,
models, data, training, metrics, reports). The core never imports `attacks` or `defenses`;
the commands wire the three together.
"""

__version__ = "0.1.0"
