"""The `uservalue` command line: app.py assembles the commands of common, data, lifecycle and ops."""
