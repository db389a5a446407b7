"""The task behind scripts/serve.py: load the model, check the options, run uvicorn."""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket

from src.utils.errors import AutoclsError

log = logging.getLogger(__name__)


def serve(cfg) -> None:
    """Serve `cfg.ckpt_path` (a train.py checkpoint) or `cfg.model_path` (an exported .onnx) on
    `cfg.host`:`cfg.port` until interrupted."""
    import uvicorn

    from src.deploy.predictor import Predictor, resolve_model_path
    from src.serve.app import create_app

    model_path = resolve_model_path(cfg.get("ckpt_path"), cfg.get("model_path"), cfg.paths.log_dir)
    _check_positive("max_batch_size", cfg.max_batch_size, integer=True)
    _check_positive("max_upload_mb", cfg.max_upload_mb)
    if not isinstance(cfg.max_wait_ms, int | float) or cfg.max_wait_ms < 0:
        raise AutoclsError(f"max_wait_ms={cfg.max_wait_ms!r} must be a number >= 0 (milliseconds a request waits for a batch).")
    host, port = str(cfg.host), cfg.port
    check_port_free(host, port)
    if not is_loopback(host):
        log.warning(f"Binding {host}: the server is reachable from other machines, without authentication.")

    predictor = Predictor.load(model_path, device=cfg.get("device", "cpu"), threads=cfg.get("threads", 0))
    app = create_app(
        predictor, topk=cfg.topk, max_batch_size=cfg.max_batch_size, max_wait_ms=cfg.max_wait_ms,
        max_upload_mb=cfg.max_upload_mb,
    )
    # log_config=None: uvicorn's loggers go through the run's logging (console + run-dir log file)
    uvicorn.run(app, host=host, port=port, log_config=None, access_log=cfg.access_log, timeout_graceful_shutdown=5)


def is_loopback(host: str) -> bool:
    """Whether every address `host` resolves to is a loopback address (127.0.0.0/8, ::1)."""
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror:
        return False
    addresses = {info[4][0] for info in infos}
    return bool(addresses) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)


def check_port_free(host: str, port) -> None:
    """One sentence instead of uvicorn's bind error when the port is taken or invalid."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise AutoclsError(f"port={port!r} is not a port number; pass port=8000 or another in 1..65535 (0: any free port).")
    try:
        family = socket.getaddrinfo(host, port)[0][0]
    except socket.gaierror as err:
        raise AutoclsError(f"host={host} does not resolve ({err.strerror}); pass host=127.0.0.1 or this machine's address.") from err
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            sock.bind((host, port))
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise AutoclsError(f"Port {port} on {host} is already in use; pass port=<another port> or stop the other server.") from err
            raise AutoclsError(f"Cannot listen on {host}:{port} ({err.strerror}); pass another host or port.") from err


def _check_positive(name: str, value, integer: bool = False) -> None:
    kinds = int if integer else int | float
    if isinstance(value, bool) or not isinstance(value, kinds) or value <= 0:
        raise AutoclsError(f"{name}={value!r} must be a positive {'integer' if integer else 'number'}.")
