"""Command-line interfaces: ``overlayd`` (the daemon) and ``saga`` (sagas in a workspace)."""
