"""`bouncer station [serve] CONFIG`, `bouncer station init CONFIG ...`, `bouncer station retrain CONFIG`,
`bouncer station audit verify CONFIG`, `bouncer station user add|remove|list|token CONFIG ...`,
`bouncer station device add|remove|list CONFIG ...` (broker identities),
`bouncer station drain CONFIG --worker W`, `bouncer station migrate CONFIG [--check]`."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bouncer.station.service import Station

ACTIONS = ("serve", "init", "retrain", "audit", "user", "device", "drain", "migrate")


def _station(
    config: Path | None,
    data_dir: Path | None = None,
    port: int | None = None,
    broker: str | None = None,
    existing: bool = False,
):
    """The station of a config; `existing`: refuse one that was never set up instead of creating it."""
    from bouncer.runtime.errors import BouncerError

    try:
        from bouncer.station.config import StationConfig
        from bouncer.station.service import Station
    except ImportError as exc:
        raise BouncerError(f"the station needs the [station] extra: pip install 'bouncer[station]' ({exc})") from None
    from bouncer.runtime.config import load_config

    overrides = {"station.data_dir": str(data_dir) if data_dir else None, "http.port": port, "mqtt.broker": broker}
    cfg = load_config(config, overrides, root=StationConfig)
    db = Path(cfg.station.data_dir) / "station.sqlite"
    if existing and not cfg.station.database and not db.is_file():
        raise BouncerError(f"{db}: no station database here (run `bouncer station init` first)")
    return Station(cfg)


@contextmanager
def _existing(args: argparse.Namespace) -> Iterator[Station]:
    """The station of an existing setup (`args.config`, `args.data_dir`), stopped when done with."""
    station = _station(args.config, args.data_dir, existing=True)
    try:
        yield station
    finally:
        station.stop()


def cmd_station_init(args: argparse.Namespace) -> int:
    from bouncer.cli.main import default_model
    from bouncer.runtime.gates.loading import open_guard

    station = _station(args.config, args.data_dir)
    # a broken bundle is reported before any model is loaded or built
    guard = open_guard(args.gate, args.model, args.sidecar, threads=args.threads, default=default_model)
    out = station.init(args.gate, guard.backend, args.train, args.calib, args.group)
    print(
        f"station ready in {station.root}, group {out['group']}: {out['train']} training and {out['calib']} "
        f"calibration frames as base features; gate published; give devices {out['root']} as ota.root"
    )
    return 0


def cmd_station_retrain(args: argparse.Namespace) -> int:
    station = _station(args.config, args.data_dir, broker=args.broker)
    station.start_mqtt()  # to announce a published gate
    try:
        result = station.retrain(args.group, log_fn=lambda m: print(m, file=sys.stderr))
        if station.consumer is not None:
            station.consumer.connected.wait(5)
    finally:
        station.stop()
    pending = result.publish and station.cfg.retrain.approval == "manual"
    verdict = (
        f"{result.challenger.version} awaits approval" if pending
        else f"published {result.challenger.version}" if result.publish else "not published"
    )  # fmt: skip
    print(f"{verdict}: {result.reason}")
    print(json.dumps({"published": result.publish, "reason": result.reason, **result.metrics}))
    return 0


def cmd_station_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from bouncer.station.web import create_app, resolve_token

    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format='{"ts": "%(asctime)s", "level": "%(levelname)s", "logger": "%(name)s", "msg": "%(message)s"}',
    )
    station = _station(args.config, args.data_dir, args.port, args.broker)
    token = resolve_token(station)
    app = create_app(station, token)
    roles = station.cfg.station.roles
    station.start_mqtt()
    if station.consumer is not None and "ingest" in roles and not station.consumer.subscribed.wait(15):
        logging.getLogger("bouncer.station").warning("not subscribed yet: the broker has not answered in 15 s")
    server = uvicorn.Server(
        uvicorn.Config(app, host=station.cfg.http.host, port=station.cfg.http.port, log_level="warning")
    )
    if "retrain" in roles:
        threading.Thread(target=station.maintain_loop, name="tuf-refresh", daemon=True).start()
        if station.cfg.retrain.every_s or station.cfg.retrain.min_new_labels:
            threading.Thread(target=station.retrain_loop, name="retrain", daemon=True).start()
    groups = ", ".join(station.groups)
    where = f"on http://{station.cfg.http.host}:{station.cfg.http.port}/ " if "web" in roles else ""
    print(f"station {where}(groups {groups}; roles {', '.join(roles)})", flush=True)
    stop = threading.Event()

    def handle(*_: object) -> None:
        server.should_exit = True
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handle)
    try:
        if "web" in roles:
            server.run()
        else:
            stop.wait()
    finally:
        station.stop()
    return 0


def cmd_station_audit_verify(args: argparse.Namespace) -> int:
    """Exit 0 when the audit chain is intact, 1 with what is wrong otherwise."""
    with _existing(args) as station:
        report = station.store.verify_audit()
    for problem in report["problems"]:
        print(problem, file=sys.stderr)
    state = "intact" if report["ok"] else f"BROKEN ({len(report['problems'])} problems)"
    print(f"audit log {state}: {report['records']} records, head {report['head'][:16] or '-'}")
    print(json.dumps(report))
    return 0 if report["ok"] else 1


def _password(args: argparse.Namespace) -> str:
    """From stdin (`--password-stdin`, for scripts) or typed twice at a terminal."""
    import getpass

    from bouncer.runtime.errors import BouncerError

    if args.password_stdin:
        return sys.stdin.readline().rstrip("\n")
    if not sys.stdin.isatty():
        raise BouncerError("user add: no terminal to type the password at; give it on stdin with --password-stdin")
    first = getpass.getpass(f"password for {args.name}: ")
    if getpass.getpass("again: ") != first:
        raise BouncerError("user add: the two passwords differ")
    return first


def cmd_station_drain(args: argparse.Namespace) -> int:
    """Retire an ingest worker: store what the broker queued for its session, then end the session."""
    from bouncer.station.consumer import Consumer

    with _existing(args) as station:
        cfg = station.cfg
        worker = args.worker or cfg.station.worker
        consumer = Consumer(cfg.mqtt, station.store, cfg.station.share_group, worker, station.groups)
        counts = consumer.drain(idle_s=args.idle_s, connect_s=max(cfg.station.wait_s, 1.0))
    what = ", ".join(f"{counts[k]} {k}" for k in ("frames", "duplicates", "events", "quarantined"))
    print(f"worker {worker or '(host name)'} drained and its session ended: {what}")
    return 0


def cmd_station_migrate(args: argparse.Namespace) -> int:
    """The database to the newest schema revision (every station start does it too), or `--check`: exit 1 if it
    is not there yet, changing nothing."""
    from bouncer.runtime.config import load_config
    from bouncer.runtime.errors import BouncerError

    try:
        from bouncer.station import schema
        from bouncer.station.config import StationConfig
    except ImportError as exc:
        raise BouncerError(f"the station needs the [station] extra: pip install 'bouncer[station]' ({exc})") from None
    overrides = {"station.data_dir": str(args.data_dir) if args.data_dir else None}
    cfg = load_config(args.config, overrides, root=StationConfig)
    root, database = Path(cfg.station.data_dir), cfg.station.database
    if not database and not (root / "station.sqlite").is_file():
        raise BouncerError(f"{root / 'station.sqlite'}: no station database here (run `bouncer station init` first)")
    if database:
        from bouncer.station.db import connect

        connect(database, root, cfg.station.wait_s).close()  # waits for a PostgreSQL that is starting
    if args.check:
        now, newest = schema.current(database, root), schema.head()
        print(f"station database at schema revision {now or '(none)'}; this bouncer's newest is {newest}")
        return 0 if now == newest else 1
    before, now = schema.upgrade(database, root)
    print(f"station database at schema revision {now}" + (f" (was {before or '(none)'})" if before != now else ""))
    return 0


def cmd_station_user(args: argparse.Namespace) -> int:
    with _existing(args) as station:
        accounts = station.accounts
        if args.user_command == "add":
            accounts.add(args.name, args.role, _password(args))
            print(f"user {args.name} ({args.role}) added; `bouncer station user token` gives it an API token")
        elif args.user_command == "remove":
            accounts.remove(args.name)
            print(f"user {args.name} removed, with its API tokens and sessions")
        elif args.user_command == "token":
            print(accounts.new_token(args.name))
        else:
            for u in accounts.list():
                print(f"{u['name']}\t{u['role']}\t{u['api_tokens']} API token(s)")
    return 0


def cmd_station_device(args: argparse.Namespace) -> int:
    with _existing(args) as station:
        ids = station.broker_identities
        where = ids.out_dir
        if args.device_command == "add":
            kind = "station" if args.station else "device"
            password = ids.add(args.name, kind)
            print(f"broker identity {args.name} ({kind}) added; its password (shown once):\n{password}")
            print(f"{where}/passwd and {where}/acl rewritten: reload the broker (systemctl reload mosquitto)")
        elif args.device_command == "remove":
            ids.remove(args.name)
            print(f"broker identity {args.name} removed; {where}/passwd and acl rewritten: reload the broker")
        else:
            for i in ids.list():
                print(f"{i['name']}\t{i['kind']}")
    return 0


def add_station(sub, add, existing_dir) -> None:
    st = sub.add_parser("station", help="the review station: store, review UI, retraining, signed gate updates")
    ssub = st.add_subparsers(dest="station_command", required=True, parser_class=type(st))

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("config", type=Path, nargs="?", help="station TOML config (docs/config.md)")
        p.add_argument("--data-dir", type=Path, help="override station.data_dir")

    s = add("serve", cmd_station_serve, "consume flagged frames over MQTT and serve the review UI and TUF repo", ssub)
    common(s)
    s.add_argument("--port", type=int, help="override http.port")
    s.add_argument("--broker", help="override mqtt.broker")
    s.add_argument("--verbose", action="store_true")
    i = add("init", cmd_station_init, "signing keys, TUF repository, base features, first gate published", ssub)
    common(i)
    i.add_argument("--gate", type=Path, required=True, help="the gate bundle devices start with")
    i.add_argument("--train", type=existing_dir, required=True, help="the gate's training folder")
    i.add_argument("--calib", type=existing_dir, required=True, help="the gate's calibration folder")
    i.add_argument("--model", type=Path, help="the gate's model (default: cached int8 EfficientNet-Lite0)")
    i.add_argument("--sidecar", type=Path, help="the gate's sidecar backbone, if it has one (default: cached)")
    i.add_argument("--threads", type=int, default=2)
    i.add_argument("--group", help="the group this gate is for (default: the first of station.groups)")
    r = add("retrain", cmd_station_retrain, "refit the gate with the labels; publish if not worse", ssub)
    common(r)
    r.add_argument("--broker", help="override mqtt.broker (announces a published gate)")
    r.add_argument("--group", help="the group to retrain (default: the first of station.groups)")
    d = add("drain", cmd_station_drain, "retire an ingest worker: store what its session holds, end the session", ssub)
    common(d)
    d.add_argument("--worker", help="the worker's id (default: station.worker of the config)")
    d.add_argument("--idle-s", type=float, default=3.0, help="done after this long with nothing new")
    m = add("migrate", cmd_station_migrate, "bring the station database to the newest schema revision", ssub)
    common(m)
    m.add_argument("--check", action="store_true", help="only say where it is; exit 1 if not at the newest")
    au = ssub.add_parser("audit", help="the gate audit log")
    asub = au.add_subparsers(dest="audit_command", required=True, parser_class=type(st))
    v = add("verify", cmd_station_audit_verify, "check the audit log's hash chain (exit 1 if broken)", asub)
    common(v)
    us = ssub.add_parser("user", help="accounts: operators label, approvers also approve gates, admins manage users")
    usub = us.add_subparsers(dest="user_command", required=True, parser_class=type(st))
    ua = add("add", cmd_station_user, "add an account (password on stdin with --password-stdin, else typed)", usub)
    common(ua)
    ua.add_argument("name")
    ua.add_argument("--role", required=True, choices=("operator", "approver", "admin"))
    ua.add_argument("--password-stdin", action="store_true", help="read the password from the first line of stdin")
    ur = add("remove", cmd_station_user, "remove an account with its API tokens and sessions", usub)
    common(ur)
    ur.add_argument("name")
    ut = add("token", cmd_station_user, "print a new API token for an account (scripts: Authorization: Bearer)", usub)
    common(ut)
    ut.add_argument("name")
    ul = add("list", cmd_station_user, "list the accounts and their roles", usub)
    common(ul)
    dv = ssub.add_parser("device", help="broker identities: each device's (and the station's) MQTT user and ACL")
    dsub = dv.add_subparsers(dest="device_command", required=True, parser_class=type(st))
    da = add("add", cmd_station_device, "issue a broker identity; prints its password once", dsub)
    common(da)
    da.add_argument("name", help="the device id (its MQTT user name), or the station's user with --station")
    da.add_argument("--station", action="store_true", help="an identity for a station worker, not a device")
    dr = add("remove", cmd_station_device, "revoke a broker identity (reload the broker after)", dsub)
    common(dr)
    dr.add_argument("name")
    dl = add("list", cmd_station_device, "list the broker identities", dsub)
    common(dl)


def normalise_argv(argv: list[str]) -> list[str]:
    """`bouncer station CONFIG` means `bouncer station serve CONFIG`."""
    if len(argv) >= 2 and argv[0] == "station" and argv[1] not in (*ACTIONS, "-h", "--help"):
        return ["station", "serve", *argv[1:]]
    return argv
