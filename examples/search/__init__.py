"""The hyper-parameter search of examples/README.md (harness and results)."""
