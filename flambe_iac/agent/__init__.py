"""The autostop agent on every member (standard library only): idle members stop, the orchestrator last."""
