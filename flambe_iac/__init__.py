"""flambe-iac: Flambé's cluster security model as infrastructure as code.

The package map: `deploys/` (what a deploy pushes to each host, as pyinfra operations) and `stacks/` (the Pulumi
program) sit at the top of the repository, beside this folder, and install as `flambe_iac.deploys` and
`flambe_iac.stacks` (pyproject.toml's `package-dir`). They stay at the top because the layout names them there
(`Pulumi.yaml`'s `main: stacks/`, the deploys a reader looks for first); inside the code they are imported by their
installed names, so grep for `flambe_iac.deploys`, not `deploys`."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # `from flambe_iac import Runnable` without loading anything at `import flambe_iac` (the CLIs start fast).
    if name == "Runnable":
        from flambe_iac.runnable import Runnable

        return Runnable
    raise AttributeError(f"module 'flambe_iac' has no attribute {name!r}")
