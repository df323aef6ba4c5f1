"""``radvlm_tools.evaluate`` makes no network contact unless asked: model-based metrics load local weights only
(``metrics.base.hub_access``: downloads need ``RADVLM_ALLOW_DOWNLOADS=1``) and GREEN calls an endpoint only when
one is configured. Every DNS lookup and connection is recorded and refused here."""

from __future__ import annotations

import json
import socket

import pytest

from radvlm_tools.evaluate import main

ROWS = [
    {"id": "r1", "task": "report_generation", "answer": "The heart is normal.", "reference": "Normal heart size."},
    {"id": "g1", "task": "abnormality_grounding", "answer": "[0.1, 0.1, 0.3, 0.3]", "reference": "[0.1, 0.1, 0.3, 0.3]"},
]


@pytest.fixture
def no_network(monkeypatch):
    """Record and refuse every name lookup and connection (IPv4/IPv6 sockets; AF_UNIX is left alone)."""
    contacts: list[tuple] = []

    def lookup(host, *args, **kwargs):
        contacts.append(("getaddrinfo", host))
        raise socket.gaierror(f"network contact refused by the test: {host}")

    real_connect = socket.socket.connect

    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            contacts.append(("connect", address))
            raise OSError(f"network contact refused by the test: {address}")
        return real_connect(self, address)

    monkeypatch.setattr(socket, "getaddrinfo", lookup)
    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect)
    monkeypatch.delenv("RADVLM_ALLOW_DOWNLOADS", raising=False)
    return contacts


def evaluate(tmp_path, *flags):
    path = tmp_path / "preds.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return main([str(path), "--bootstrap", "20", *flags])


def test_default_settings_make_no_network_contact_with_the_hub_offline(tmp_path, no_network, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as every test run sets it (tests/conftest.py)
    result = evaluate(tmp_path)
    assert no_network == []
    metrics = result["tasks"]["report_generation"]["metrics"]
    assert metrics["bertscore"]["value"] is None and "could not be loaded" in metrics["bertscore"]["unavailable"]
    assert "no GREEN judge configured" in metrics["green"]["unavailable"]  # no endpoint: none contacted


def test_offline_flag_makes_no_network_contact(tmp_path, no_network, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    evaluate(tmp_path, "--offline")
    assert no_network == []


def test_default_settings_make_no_network_contact(tmp_path, no_network, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    evaluate(tmp_path)
    assert no_network == []
