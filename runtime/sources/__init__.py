"""Frame sources: image folders, video/cameras, and the production-line simulator."""
