"""Pipeline helpers shared by train.py, test.py and converter.py: metrics, checkpoints, logging,
distributed set-up, configuration and command-line error handling."""
