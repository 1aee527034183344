"""flambe-iac: Flambé's cluster security model as infrastructure as code."""

__version__ = "0.1.0"
