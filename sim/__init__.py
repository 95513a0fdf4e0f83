"""The simulated production line: parts, incidents and their camera sources (offline; the camera reaches
it only as a source plug-in)."""
