"""The review UI in a real headless Chromium (Debian's chromium + chromedriver, driven by Selenium):
open the queue, label with the keyboard, watch the count go down. With BOUNCER_UPDATE_SCREENSHOT=1 it
refreshes docs/review-ui.png."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import cv2
import pytest
from helpers import REPO, StationProcess, free_port, http_json, publish_all, station_config, wait_until
from msgspec.structs import replace as restruct
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

from bouncer.runtime import backends, schemas
from bouncer.runtime.gates import explain
from bouncer.runtime.gates.bundle import GateBundle
from bouncer.runtime.gates.guard import Guard
from bouncer.runtime.images import read_bgr
from bouncer.sim import simulator


@pytest.fixture()
def browser():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    assert chromium and driver_path, ".ci/run installs Debian's chromium and chromium-driver"
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,860"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(options=opts, service=Service(driver_path))
    yield driver
    driver.quit()


def remaining(driver) -> int:
    return int(driver.find_element(By.ID, "remaining").text)


def flagged_messages(sim_gate: Path, model: Path, folder: Path) -> list[schemas.FrameMessage]:
    """Real decisions of the simulated line's gate on parts it does not know, as a device would send them."""
    guard = Guard(GateBundle.load(sim_gate), backends.load(model))
    msgs = []
    for i, path in enumerate(sorted(folder.rglob("*.png"))):
        frame = read_bgr(path)
        d, outputs, _ = guard.score_frame(frame)
        assert d.decision == "review", "a part the gate never saw is flagged"
        msgs.append(schemas.FrameMessage.of_decision(
            d, id=f"ui{i:04d}", device="cam-ui", ts=time.time(), source=str(path), gate_version=guard.bundle.version,
            backbone_hash=guard.bundle.backbone_hash, jpeg=cv2.imencode(".jpg", frame)[1].tobytes(),
            features={"features": outputs["features"][0]},
            heatmap=explain.heatmap_png(explain.heatmap(guard.bundle, outputs)),
        ))  # fmt: skip
    return msgs


def test_label_the_queue_with_the_keyboard(broker, station_dir, sim_gate, built_models, browser, tmp_path):
    cfg = station_config(tmp_path / "serve.toml", station_dir, broker.url)
    station = StationProcess(cfg, free_port()).start()
    try:
        parts = simulator.write_dataset(tmp_path / "parts", ("giraffe", "bolt"), per_class=3, seed=3)
        msgs = flagged_messages(sim_gate, built_models["onnx_int8"], parts)[:5]
        publish_all(broker.port, [(schemas.topic("cam-ui", "frames"), m.encode()) for m in msgs])
        wait_until(lambda: http_json(f"{station.url}/api/queue")[1]["counts"]["frames"] == 5, 30)

        browser.get(f"{station.url}/queue?view=frames")
        wait = WebDriverWait(browser, 15)
        wait.until(lambda d: d.find_element(By.ID, "image").get_attribute("naturalWidth") not in (None, "0"))
        assert remaining(browser) == 5
        first = msgs[0]
        assert browser.find_element(By.ID, "device").text == "cam-ui"
        assert browser.find_element(By.ID, "reasons").text == ", ".join(first.reasons)
        assert browser.find_element(By.ID, "predicted").text == first.label
        ood = next(d for d in first.details if d["reason"] == "ood")
        assert browser.find_element(By.ID, "why").text.startswith(f"ood: {ood['value']} vs {ood['threshold']}")
        heat = browser.find_element(By.ID, "heat")
        wait.until(lambda d: heat.is_displayed() and heat.get_attribute("naturalWidth") == "14")
        # tests write only to temporary folders; BOUNCER_UPDATE_SCREENSHOT=1 refreshes the README's picture
        shot = tmp_path / "review-ui.png"
        browser.save_screenshot(str(shot))
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
        if os.environ.get("BOUNCER_UPDATE_SCREENSHOT") == "1":
            shutil.copyfile(shot, REPO / "docs" / "review-ui.png")

        body = browser.find_element(By.TAG_NAME, "body")
        body.send_keys("h")  # the heatmap toggles
        assert not heat.is_displayed()
        body.send_keys("h")
        assert heat.is_displayed()
        first = browser.execute_script("return current.id")
        body.send_keys("2")  # the second known class: gear
        wait.until(lambda d: remaining(d) == 4)
        body.send_keys("c")  # correct as predicted
        wait.until(lambda d: remaining(d) == 3)
        body.send_keys("g")  # garbage
        wait.until(lambda d: remaining(d) == 2)
        body.send_keys("n")  # a new defect type, named in the form
        field = wait.until(lambda d: d.find_element(By.ID, "newname") if d.find_element(By.ID, "newname")
                           .is_displayed() else None)  # fmt: skip
        field.send_keys("bent pin", Keys.ENTER)
        wait.until(lambda d: remaining(d) == 1)
        assert http_json(f"{station.url}/api/frames/{first}")[1]["label"] == "gear"
        labels = sorted((f["label_kind"], f["label"]) for f in (http_json(f"{station.url}/api/frames/{m.id}")[1]
                                                                for m in msgs) if f["label_kind"])  # fmt: skip
        assert labels == sorted([("class", "gear"), ("class", msgs[1].label), ("garbage", None), ("new", "bent pin")])

        browser.get(f"{station.url}/gates")
        assert "Gates" in browser.find_element(By.TAG_NAME, "h1").text
        assert browser.find_element(By.ID, "published").text
        when = browser.find_elements(By.CSS_SELECTOR, "#audit time")  # local time, the ISO time in the tooltip
        assert when and when[0].get_attribute("title").endswith("Z") and not when[0].text.replace(".", "").isdigit()
        browser.get(f"{station.url}/fleet")
        assert "Fleet" in browser.find_element(By.TAG_NAME, "h1").text
    finally:
        station.stop()


def test_screenshot_is_a_real_png():
    """The screenshot the README shows: what the browser test saves with BOUNCER_UPDATE_SCREENSHOT=1."""
    path = Path(REPO / "docs" / "review-ui.png")
    assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_detector_frame_is_labelled_with_a_click_and_a_drag(broker, detection_line, detector, built_models,
                                                               browser, tmp_path):  # fmt: skip
    """A detector group's queue draws each frame's kept boxes over it; one click marks a box wrong, a drag boxes an
    object the camera missed, a number names it, `c` sends the frame's true boxes."""
    from helpers import device_messages, run_cli
    from selenium.webdriver.common.action_chains import ActionChains

    gate = tmp_path / "det.gate"
    res = run_cli("fit", "--model", str(detector), "--train", str(detection_line / "train"), "--calib",
                  str(detection_line / "calib"), "--out", str(gate), "--target-accuracy", "0.9")  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    cfg = station_config(tmp_path / "station.toml", tmp_path / "station", broker.url)
    res = run_cli("station", "init", str(cfg), "--gate", str(gate), "--model", str(detector), "--train",
                  str(detection_line / "train"), "--calib", str(detection_line / "calib"))  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    msgs = [m for m in device_messages(gate, detector, detection_line / "unknown" / "images", "cam-det")
            if m.boxes][:2]  # fmt: skip
    assert len(msgs) == 2 and all(m.size == [320, 240] and m.candidates is not None for m in msgs)
    station = StationProcess(cfg, free_port()).start()
    try:
        publish_all(broker.port, [(schemas.topic("cam-det", "frames"), m.encode()) for m in msgs])
        wait_until(lambda: http_json(f"{station.url}/api/queue")[1]["counts"]["frames"] == 2, 30)
        browser.get(f"{station.url}/queue?view=frames")
        wait = WebDriverWait(browser, 15)
        wait.until(lambda d: d.find_element(By.ID, "image").get_attribute("naturalWidth") not in (None, "0"))
        first = msgs[0]
        svg = browser.find_element(By.ID, "boxes")
        assert svg.is_displayed() and svg.get_dom_attribute("viewBox") == "0 0 320 240"
        rects = svg.find_elements(By.TAG_NAME, "rect")
        assert first.boxes is not None and len(rects) == len(first.boxes)
        assert svg.size["width"] == 480 and abs(svg.size["height"] - 360) <= 2  # drawn over the whole frame
        rects[0].click()  # this box is wrong
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#boxes rect")[0].get_dom_attribute("class") == "wrong")
        # a missed object: drag from near the top-left corner, 45 x 30 screen pixels (30 x 20 frame pixels)
        ActionChains(browser).move_to_element_with_offset(svg, -235, -175).click_and_hold().move_by_offset(45, 30) \
            .release().perform()  # fmt: skip
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#boxes rect.drawn")) == 1)
        body = browser.find_element(By.TAG_NAME, "body")
        body.send_keys("2")  # names the box just drawn: gear
        assert browser.find_element(By.ID, "pen").text == "gear"
        shot = tmp_path / "review-ui-detector.png"
        browser.save_screenshot(str(shot))
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        if os.environ.get("BOUNCER_UPDATE_SCREENSHOT") == "1":
            shutil.copyfile(shot, REPO / "docs" / "review-ui-detector.png")
        body.send_keys("c")
        wait.until(lambda d: remaining(d) == 1)
        frame = http_json(f"{station.url}/api/frames/{first.id}")[1]
        assert frame["label_kind"] == "boxes"
        kept = [{"class": b["class"], "box": [round(v, 1) for v in b["box"]]} for b in (first.box_dicts() or [])[1:]]
        assert frame["label"][: len(kept)] == kept
        drawn = frame["label"][len(kept) :]
        assert len(drawn) == 1 and drawn[0]["class"] == "gear", drawn
        x1, y1, x2, y2 = drawn[0]["box"]
        assert abs(x1 - 3.3) < 2 and abs(y1 - 3.3) < 2 and abs(x2 - x1 - 30) < 2 and abs(y2 - y1 - 20) < 2, drawn
    finally:
        station.stop()


def test_an_incident_is_labelled_with_one_key(broker, station_dir, sim_gate, built_models, browser, tmp_path):
    """The queue shows one incident at a time (frames that belong together, as thumbnails); one key labels all
    of them and the count drops by the incident's size; `o` opens an incident's frames one by one."""
    cfg = station_config(tmp_path / "serve.toml", station_dir, broker.url)
    station = StationProcess(cfg, free_port()).start()
    try:
        giraffes = simulator.write_dataset(tmp_path / "g", ("giraffe",), per_class=4, seed=5)
        bolts = simulator.write_dataset(tmp_path / "b", ("bolt",), per_class=3, seed=6)
        msgs = flagged_messages(sim_gate, built_models["onnx_int8"], giraffes)
        msgs += [restruct(m, id=f"ub{i:03d}", ts=m.ts + 5)
                 for i, m in enumerate(flagged_messages(sim_gate, built_models["onnx_int8"], bolts))]  # fmt: skip
        publish_all(broker.port, [(schemas.topic("cam-ui", "frames"), m.encode()) for m in msgs])
        wait_until(lambda: http_json(f"{station.url}/api/queue")[1]["counts"]["frames"] == 7, 30)
        incidents = http_json(f"{station.url}/api/incidents")[1]["incidents"]
        assert [i["count"] for i in incidents] == [4, 3], incidents  # the giraffes, then the bolts
        assert set(incidents[0]["frame_ids"]) == {m.id for m in msgs[:4]}
        # filters: a device, a reason, a decision, a window of time
        api = f"{station.url}/api/incidents"
        assert [i["count"] for i in http_json(f"{api}?reason=ood&device=cam-ui")[1]["incidents"]] == [4, 3]
        assert http_json(f"{api}?device=cam-other")[1]["incidents"] == []
        assert http_json(f"{api}?decision=reject")[1]["incidents"] == []
        assert http_json(f"{api}?until={msgs[0].ts - 1}")[1]["incidents"] == []
        assert http_json(f"{api}?decision=maybe")[0] == 422
        browser.get(f"{station.url}/queue?device=cam-other")
        WebDriverWait(browser, 15).until(lambda d: d.find_element(By.ID, "empty").is_displayed())

        browser.get(f"{station.url}/queue")
        wait = WebDriverWait(browser, 15)
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#thumbs img")) == 4)
        assert remaining(browser) == 7 and browser.find_element(By.ID, "inc-count").text == "4"
        assert browser.find_element(By.ID, "inc-reasons").text.startswith("ood")
        assert browser.find_element(By.ID, "inc-when").get_attribute("title").endswith("Z")  # ISO in the tooltip
        shot = tmp_path / "review-incident.png"
        browser.save_screenshot(str(shot))
        if os.environ.get("BOUNCER_UPDATE_SCREENSHOT") == "1":
            shutil.copyfile(shot, REPO / "docs" / "review-incident.png")
        body = browser.find_element(By.TAG_NAME, "body")
        body.send_keys("g")  # the whole incident: garbage
        wait.until(lambda d: remaining(d) == 3)
        wait.until(lambda d: d.find_element(By.ID, "inc-count").text == "3")
        body.send_keys("o")  # the bolts, one by one
        wait.until(lambda d: d.find_element(By.ID, "card").is_displayed())
        body.send_keys("n")
        field = wait.until(lambda d: d.find_element(By.ID, "newname") if d.find_element(By.ID, "newname")
                           .is_displayed() else None)  # fmt: skip
        field.send_keys("bolt", Keys.ENTER)
        wait.until(lambda d: remaining(d) == 2)
        assert browser.find_element(By.ID, "card").is_displayed()  # still inside the opened incident
        labels = [http_json(f"{station.url}/api/frames/{m.id}")[1] for m in msgs]
        assert [f["label_kind"] for f in labels] == ["garbage"] * 4 + ["new", None, None], labels
        status, done = http_json(f"{station.url}/api/incidents/label", {"frames": [m.id for m in msgs[4:]],
                                                                         "label": "new:bolt"})  # fmt: skip
        assert status == 200 and done["labelled"] == 2 and done["already_labelled"] == 1, done
        assert http_json(f"{station.url}/api/incidents/label", {"frames": ["nope"], "label": "gear"})[0] == 404
        assert http_json(f"{station.url}/api/incidents/label", {"frames": [], "label": "gear"})[0] == 422
    finally:
        station.stop()


def test_an_operator_logs_in_and_labels_an_incident_as_herself(broker, station_dir, sim_gate, built_models, browser,
                                                               tmp_path):  # fmt: skip
    """With accounts, the queue asks who you are; labels carry the person logged in; a change without the
    session's CSRF token is refused; an operator cannot approve gates."""
    from helpers import station_user

    cfg = station_config(tmp_path / "serve.toml", station_dir, broker.url)
    station_user(cfg, "olga", "operator", "olga-password-1")
    admin = station_user(cfg, "root", "admin")
    station = StationProcess(cfg, free_port()).start()
    try:
        parts = simulator.write_dataset(tmp_path / "g", ("giraffe",), per_class=3, seed=8)
        msgs = flagged_messages(sim_gate, built_models["onnx_int8"], parts)
        publish_all(broker.port, [(schemas.topic("cam-ui", "frames"), m.encode()) for m in msgs])
        wait_until(lambda: http_json(f"{station.url}/api/queue", token=admin)[1]["counts"]["frames"] == 3, 30)

        browser.get(f"{station.url}/queue")
        wait = WebDriverWait(browser, 15)
        wait.until(lambda d: "/login" in d.current_url)
        browser.find_element(By.ID, "name").send_keys("olga")
        browser.find_element(By.ID, "password").send_keys("wrong-password", Keys.ENTER)
        wait.until(lambda d: d.find_element(By.ID, "login-status").text == "wrong name or password")
        browser.find_element(By.ID, "password").clear()
        browser.find_element(By.ID, "password").send_keys("olga-password-1", Keys.ENTER)
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#thumbs img")) == 3)
        assert browser.find_element(By.ID, "who").text == "olga (operator)"
        refused = browser.execute_async_script(
            "const done = arguments[0]; plainFetch('/api/incidents/label', {method: 'POST', headers: "
            "{'Content-Type': 'application/json'}, body: JSON.stringify({frames: ['x'], label: 'garbage'})})"
            ".then((r) => done(r.status));"
        )
        assert refused == 403  # the session alone is not enough: the page's CSRF token must come with it
        browser.find_element(By.TAG_NAME, "body").send_keys("g")
        wait.until(lambda d: remaining(d) == 0)
        frames = [http_json(f"{station.url}/api/frames/{m.id}", token=admin)[1] for m in msgs]
        assert {(f["label_kind"], f["labelled_by"]) for f in frames} == {("garbage", "olga")}
        approve = browser.execute_async_script(
            "const done = arguments[0]; fetch('/api/gates/any/approve', {method: 'POST'}).then((r) => done(r.status));"
        )
        assert approve == 403
        browser.find_element(By.ID, "logout").click()
        wait.until(lambda d: "/login" in d.current_url)
        assert http_json(f"{station.url}/api/queue")[0] == 401
    finally:
        station.stop()


def test_the_fleet_page_draws_the_runs_data_over_time(broker, station_dir, sim_gate, built_models, browser, tmp_path):
    """A real camera sends its statistics every half second; the fleet page charts its flag rate, the review
    backlog and each drift statistic against its alarm line on a time axis, from that run's data."""
    import subprocess
    import sys

    from helpers import device_toml

    cfg = station_config(tmp_path / "serve.toml", station_dir, broker.url)
    station = StationProcess(cfg, free_port()).start()
    dev = device_toml(tmp_path / "device.toml", device={"id": "cam-f", "data_dir": str(tmp_path / "dev")},
                      source={"uri": "sim:3", "max_fps": 40.0}, gate={"bundle": str(sim_gate)},
                      mqtt={"broker": broker.url}, metrics={"stats_every_s": 0.5})  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "bouncer", "run", str(dev)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        series = wait_until(lambda: (s := http_json(f"{station.url}/api/series")[1])["devices"].get("cam-f") and
                            len(s["devices"]["cam-f"]["ts"]) >= 6 and s, timeout=90)  # fmt: skip
        cam = series["devices"]["cam-f"]
        assert sum(r is not None for r in cam["flag_rate"]) >= 4 and all(0 <= r <= 1 for r in cam["flag_rate"] if r)
        assert {"brightness", "ood_score", "review_rate"} <= set(cam["drift"]) and cam["alarm"]["brightness"] == 20
        assert all(len(v) == len(cam["ts"]) for v in cam["drift"].values())
        assert len(series["backlog"]["ts"]) == len(series["backlog"]["unlabelled"]) == 60
        browser.get(f"{station.url}/fleet")
        wait = WebDriverWait(browser, 15)
        charts = wait.until(lambda d: d.execute_script("return Object.keys(CHARTS).length === 4 && "
                                                       "Object.fromEntries(Object.entries(CHARTS).map(([k, v]) => "
                                                       "[k, v.points]))"))  # fmt: skip
        drawn = {k.split(" (")[0]: v for k, v in charts.items()}
        assert drawn["flag rate"] >= 4 and drawn["drift statistics"] >= 12 and drawn["review backlog"] == 60, drawn
        assert len(browser.find_elements(By.CSS_SELECTOR, "#charts canvas")) == 4
        labels = browser.execute_script("return CHARTS[Object.keys(CHARTS)[2]].chart.series.map((s) => s.label)")
        assert any(str(x).startswith("alarm line") for x in labels) and "cam-f brightness" in labels, labels
        shot = tmp_path / "fleet.png"
        browser.save_screenshot(str(shot))
        if os.environ.get("BOUNCER_UPDATE_SCREENSHOT") == "1":
            shutil.copyfile(shot, REPO / "docs" / "fleet-ui.png")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        station.stop()
