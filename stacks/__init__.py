"""The Pulumi program (`main: stacks/` in Pulumi.yaml). Installed as flambe_iac.stacks."""
