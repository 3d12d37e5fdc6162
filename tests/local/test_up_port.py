"""`gpufleet up` checks that the router's port is free before it starts any replica."""

from __future__ import annotations

import socket

from typer.testing import CliRunner

from gpufleet.infra.cli import app

from .conftest import write_fleet


def test_up_refuses_a_taken_router_port_before_starting_anything(tmp_path, monkeypatch):
    started: list[object] = []
    # Were a replica started, this would record it: the check must come first.
    monkeypatch.setattr("gpufleet.infra.cli.up._start", lambda *a, **k: started.append(a))
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        r = CliRunner().invoke(app, ["up", str(write_fleet(tmp_path)), "--port", str(port)])
    assert r.exit_code == 1, r.output
    assert f"router port {port} on 127.0.0.1 is not free" in r.output and "--port 0" in r.output
    assert "Traceback" not in r.output
    assert started == []


def test_up_with_the_fleets_own_port_taken_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(
        "gpufleet.infra.cli.up._start", lambda *a, **k: (_ for _ in ()).throw(AssertionError("started"))
    )
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        fleet = write_fleet(tmp_path, router=f"  port: {port}\n")
        r = CliRunner().invoke(app, ["up", str(fleet)])
    assert r.exit_code == 1, r.output
    assert f"router port {port}" in r.output
