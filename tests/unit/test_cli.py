"""The command line refuses bad values by name, before doing anything, and tells what the user must fix in one line."""
from __future__ import annotations

import pytest

from corolla.cli.main import build_parser, main


def _refused(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(argv)
    assert exited.value.code == 2
    return capsys.readouterr().err


PEERS = ["--initial-peers", "/ip4/127.0.0.1/tcp/1/p2p/QmNotARealPeer"]


@pytest.fixture
def quiet_logging(monkeypatch):
    """``main`` configures the process's logging (the root logger's handlers): leave pytest's alone."""
    import corolla.core.status

    monkeypatch.setattr(corolla.core.status, "configure_logging", lambda level, log_format: None)


@pytest.mark.parametrize("argv, message", [
    (["serve", "--new-swarm", "--num-blocks", "0"], "argument --num-blocks: must be at least 1, got 0"),
    (["serve", "--new-swarm", "--blocks", "5:2"], "argument --blocks: blocks must look like START:END"),
    (["serve", "--new-swarm", "--blocks", "-1:3"], "argument --blocks: blocks must look like START:END with 0 <= START"),
    (["serve", "--new-swarm", "--num-threads", "two"], "argument --num-threads: int expected, got 'two'"),
    (["serve", "--new-swarm", "--port", "70000"], "argument --port: must be at most 65535, got 70000"),
    (["generate", "hi", *PEERS, "--top-p", "2"], "argument --top-p: must be at most 1.0, got 2"),
    (["generate", "hi", *PEERS, "--top-p", "0"], "argument --top-p: must be above 0.0, got 0"),
    (["generate", "hi", *PEERS, "--temperature", "-1"], "argument --temperature: must be at least 0.0, got -1"),
    (["generate", "hi", *PEERS, "--max-new-tokens", "0"], "argument --max-new-tokens: must be at least 1"),
    (["chat", *PEERS, "--max-context", "-1"], "argument --max-context: must be at least 1, got -1"),
    (["generate", "hi", *PEERS, "--temperature", "nan"], "argument --temperature: a finite number expected"),
    (["api", *PEERS, "--max-sessions", "0"], "argument --max-sessions: must be at least 1, got 0"),
    (["api", *PEERS, "--max-waiting", "-1"], "argument --max-waiting: must be at least 0, got -1"),
    (["health", *PEERS, "--port", "-5"], "argument --port: must be at least 0, got -5"),
    (["swarm", "--servers", "0"], "argument --servers: must be at least 1, got 0"),
    (["--log-level", "FOO", "dht"], "argument --log-level: one of DEBUG, INFO, WARNING, ERROR expected"),
])
def test_bad_values_are_refused_naming_the_flag_and_the_bound(capsys, argv, message):
    assert message in _refused(capsys, argv)


def test_logging_flags_work_before_and_after_the_subcommand():
    assert build_parser().parse_args(["dht", "--log-level", "info"]).log_level == "INFO"
    args = build_parser().parse_args(["--log-level", "debug", "--log-format", "json", "dht"])
    assert (args.log_level, args.log_format) == ("DEBUG", "json")
    args = build_parser().parse_args(["--log-level", "ERROR", "dht", "--log-format", "json"])
    assert (args.log_level, args.log_format) == ("ERROR", "json")
    assert build_parser().parse_args(["dht"]).log_level == "WARNING"


def test_what_the_user_must_fix_is_told_in_one_line_without_a_traceback(capsys, tmp_path, quiet_logging):
    assert main(["health", str(tmp_path / "no-such-model"), *PEERS]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [f"corolla health: model directory '{tmp_path / 'no-such-model'}' does not exist"]
    (tmp_path / "short.key").write_text("short")
    assert main(["health", *PEERS, "--swarm-key", str(tmp_path / "absent.key")]) == 2
    assert "cannot read the swarm key" in capsys.readouterr().err
    assert main(["health", *PEERS, "--swarm-key", str(tmp_path / "short.key")]) == 2
    assert "is too short" in capsys.readouterr().err


def test_a_stale_address_file_is_removed_before_a_command_runs(tmp_path, quiet_logging):
    stale = tmp_path / "peers.txt"
    stale.write_text("/ip4/127.0.0.1/tcp/1/p2p/QmOld\n")
    assert main(["health", str(tmp_path / "no-such-model"), *PEERS, "--address-file", str(stale)]) == 2
    assert not stale.exists()  # a reader waiting for the file will not take the old one for this run's


def test_a_device_this_machine_lacks_is_named(capsys, quiet_logging):
    import torch

    assert main(["serve", "--new-swarm", "--device", "gpu"]) == 2
    assert "device 'gpu' is not one torch knows" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["serve", "--new-swarm", "--device", "cuda"]) == 2
        assert "no CUDA device" in capsys.readouterr().err
    assert main(["serve", "--new-swarm", "--throughput", "nan"]) == 2  # a bad combination: one line, exit 2
    assert "--throughput must be above 0" in capsys.readouterr().err


def test_a_missing_adapter_is_called_an_adapter(tmp_path):
    from corolla.core.errors import CorollaError
    from corolla.models.checkpoint import resolve_model

    with pytest.raises(CorollaError, match=f"adapter directory '{tmp_path / 'none'}' does not exist"):
        resolve_model(str(tmp_path / "none"), "adapter")


def test_a_port_an_initial_peer_uses_on_this_host_is_refused(capsys, quiet_logging):
    """libp2p binds a port another local peer holds, then fails to reach that peer and says only "failed to connect
    to bootstrap peers": the clash is named before anything starts."""
    peer = "/ip4/127.0.0.1/tcp/34525/p2p/QmNotARealPeer"
    assert main(["serve", "--initial-peers", peer, "--port", "34525"]) == 2
    assert f"--port 34525 is the port of initial peer {peer} on this host" in capsys.readouterr().err
