"""Pages people read: the run report and offline rendering of third-party HTML."""
