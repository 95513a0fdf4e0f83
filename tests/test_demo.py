"""`bouncer demo` end to end: embedded broker, station, two simulated cameras through the incident schedule."""

from __future__ import annotations

import json

from helpers import run_cli


def test_demo_catches_every_incident_and_the_station_gets_every_flagged_frame(built_models, tmp_path):
    res = run_cli("demo", "--devices", "2", "--warmup", "200", "--duration", "0", "--data-dir", str(tmp_path))
    assert res.returncode == 0, res.stderr[-4000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert not out["errors"]
    kinds = [i["kind"] for i in out["incidents"]]
    assert kinds == ["new_defect", "foreign_object", "lens_smear", "frozen", "lens_cap", "light_bulb"]
    for dev in out["devices"]:
        assert dev["missed"] == [], dev
        assert dev["silent_failures"] == {}, dev
        assert dev["false_drift"] == [], dev
        normal = dev["frames"] - sum(i["frames"] for i in out["incidents"] if i["kind"] != "light_bulb")
        assert dev["false_flags"] <= 0.05 * normal, dev  # the OOD threshold alone lets about 1% through
        assert dev["caught"]["light_bulb"] < 300, "the +2 grey-level light change is noticed within 300 frames"
        assert all(dev["caught"][k] == 0 for k in kinds[:-1]), "each visible incident is flagged at its first frame"
    st = out["station"]
    assert st["frames_stored"] == st["flagged_sent"] > 0
    assert "incidents: caught after how many frames" in res.stderr
