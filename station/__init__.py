"""The review station (extra `[station]`): consumes flagged frames, collects labels, retrains and signs gates."""
