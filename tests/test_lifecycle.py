"""The drain protocol between the launcher and the models that hold open streams."""

from __future__ import annotations

from mimo.serving.lifecycle import draining


def test_draining_follows_the_drain_file(monkeypatch, tmp_path):
    monkeypatch.delenv("MIMO_DRAIN_FILE", raising=False)
    assert not draining()
    drain_file = tmp_path / "draining"
    monkeypatch.setenv("MIMO_DRAIN_FILE", str(drain_file))
    assert not draining()
    drain_file.touch()
    assert draining()
    monkeypatch.setenv("MIMO_DRAIN_FILE", "")
    assert not draining()
