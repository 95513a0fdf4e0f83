"""Connecting to the broker, the one way devices and the station both do it: the broker URL, credentials
from the environment, TLS with client certificates (paho-mqtt 2.x)."""

from __future__ import annotations

import os
import ssl
from typing import Any
from urllib.parse import urlparse

import paho.mqtt.client as mqtt

from bouncer.runtime.config import MqttSection
from bouncer.runtime.errors import BouncerError


def broker_address(broker: str) -> tuple[str, int, bool]:
    """mqtt://HOST[:PORT] or mqtts://HOST[:PORT] -> (host, port, tls)."""
    url = urlparse(broker)
    if url.scheme not in ("mqtt", "mqtts") or not url.hostname:
        raise BouncerError(f"mqtt.broker: expected mqtt://HOST:PORT or mqtts://HOST:PORT, got {broker!r}")
    tls = url.scheme == "mqtts"
    return url.hostname, url.port or (8883 if tls else 1883), tls


def new_client(cfg: MqttSection, client_id: str, **kwargs: Any) -> tuple[mqtt.Client, str, int]:
    """A paho client for `cfg` (protocol, credentials, TLS), and the host and port to connect it to."""
    host, port, tls = broker_address(cfg.broker)
    protocol = mqtt.MQTTv5 if cfg.protocol == "v5" else mqtt.MQTTv311
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol, **kwargs)
    client.reconnect_delay_set(0.2, 5)  # type: ignore[arg-type]  # paho sleeps on floats; its hint says int
    if cfg.username:
        client.username_pw_set(cfg.username, os.environ.get(cfg.password_env))
    if tls:
        try:
            client.tls_set(
                ca_certs=cfg.ca or None,
                certfile=cfg.cert or None,
                keyfile=cfg.key or None,
                cert_reqs=ssl.CERT_REQUIRED,
                tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
        except (OSError, ssl.SSLError) as exc:
            raise BouncerError(f"mqtt TLS setup: {exc}") from None
    return client, host, port
