"""The benches behind `bouncer bench ...` (each prints its figures, ratios against a baseline measured in the same
run) and the launchers of the real servers (Mosquitto, PostgreSQL, SeaweedFS) that the benches, the demo and the
tests start on free loopback ports. Nothing on a camera or the station imports this layer."""
