"""flambe-iac: Flambé's cluster security model as infrastructure as code."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # `from flambe_iac import Runnable` without loading anything at `import flambe_iac` (the CLIs start fast).
    if name == "Runnable":
        from flambe_iac.runnable import Runnable

        return Runnable
    raise AttributeError(f"module 'flambe_iac' has no attribute {name!r}")
