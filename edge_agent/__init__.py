"""The edgefed agent daemon: runs on each edge server, trains locally, pushes updates."""
