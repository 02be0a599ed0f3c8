"""Bad input to every command-line tool: one clear line on stderr, exit status 2, no traceback, nothing left behind.

Each case runs the tool's console script (as a user would) as a real process. Most cases must be refused before
the tool imports torch or starts a DHT node, so they take a fraction of a second; the few that need hivemind's
address parser or a started node are bounded by PROC_TIMEOUT_S and checked for leftover child processes
(netproc.Network records and reaps every descendant). Cases already covered elsewhere are not repeated here:
`lte-peer join` with an unreachable --dht or a non-numeric port in it (test_network), a bad --metrics-port
(test_metrics), load_spec's errors in-process (test_core_config_data), and lte-sim (same parser and checks).
"""
from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from netproc import SMALL_SPEC, Network

BIN = Path(sys.executable).parent  # the venv's console scripts: lte-coordinator, lte-peer, lte-demo
PROC_TIMEOUT_S = 60.0
# A syntactically valid libp2p peer id (a base58 sha256 multihash) that no process here runs.
PEER_ID = "QmNnooDu7bfjPFoTZYxMNLWUQJyrVwtbZg5gBMjTezGAJN"
NOBODY = f"/ip4/127.0.0.1/tcp/1/p2p/{PEER_ID}"


def _variant(*changes: tuple[str, Any]) -> str:
    """SMALL_SPEC with `("lte.rank", 0)`-style changes; a value of `...` deletes the key."""
    spec = yaml.safe_load(SMALL_SPEC)
    for path, value in changes:
        *parents, leaf = path.split(".")
        node = spec
        for p in parents:
            node = node[p]
        if value is ...:
            del node[leaf]
        else:
            node[leaf] = value
    return yaml.safe_dump(spec)


def _renamed(old: str, new: str) -> str:
    assert old in SMALL_SPEC
    return SMALL_SPEC.replace(old, new, 1)


# Config files written into the workspace; argv refers to them as {cfg_<name>}.
CONFIGS: dict[str, str | bytes] = {
    "ok": SMALL_SPEC,
    "not_yaml": "lte: [1, 2\n",
    "tab_indent": "lte:\n\trank: 4\n",
    "list": "- 1\n- 2\n",
    "scalar": "just a sentence\n",
    "empty": "",
    "comments_only": "# nothing here\n",
    "binary": b"\xff\xfe\x00\x81 not text",
    "unknown_top": SMALL_SPEC + "epochs: 3\n",
    "unknown_nested": _renamed("  rank: 8", "  rnak: 8"),
    "rank_text": _variant(("lte.rank", "eight")),
    "rank_fraction": _variant(("lte.rank", 1.5)),
    "lte_scalar": _variant(("lte", 5)),
    "dense_modules_text": _variant(("lte.dense_modules", "head")),
    "rank_zero": _variant(("lte.rank", 0)),
    "heads_zero": _variant(("lte.heads", 0)),
    "merge_every_zero": _variant(("lte.merge_every", 0)),
    "lr_negative": _variant(("optim.lr", -1e-3)),
    "lr_inf": _renamed("lr: 1.0e-3", "lr: .inf"),
    "alpha_nan": _renamed("alpha: 64", "alpha: .nan"),
    "batch_zero": _variant(("data.batch_size", 0)),
    "test_fraction_one": _variant(("data.test_fraction", 1.0)),
    "betas_over_one": _variant(("optim.betas", [0.9, 1.5])),
    "seed_negative": _variant(("seed", -1)),
    "run_empty": _variant(("run", "")),
    "dataset_unknown": _variant(("data.dataset", "mnist")),
    "model_unknown": _variant(("model.name", "vit_does_not_exist")),
    "model_wants_rgb": _renamed("in_chans: 1", "in_chans: 3"),  # the digits are grayscale
    "outer_step": _variant(("lte.outer_momentum", 0.9)),  # the simulator's for now (issue 13)
}


def _coord(config: str, *flags: str) -> list[str]:
    return ["lte-coordinator", "start", "--config", config, "--checkpoint-dir", "{ck}", *flags]


def _join(*flags: str, dht: str = NOBODY) -> list[str]:
    return ["lte-peer", "join", "--dht", dht, "--no-progress", "--host", "127.0.0.1", *flags]


def _download(*flags: str, dht: str = NOBODY) -> list[str]:
    return ["lte-peer", "download", "--dht", dht, "--out", "{out}", "--no-progress", *flags]


def _demo(*flags: str) -> list[str]:
    return ["lte-demo", "--config", "{cfg_ok}", "--checkpoint-dir", "{ck}", "--logs", "{logs}", *flags]


P = pytest.param
CASES = [
    # ----- lte-coordinator start: the config file ----------------------------------------------------------
    P(_coord("{cfg_ok}", "--shard-mib", "0"), "--shard-mib: 0 is not a positive number", id="coord-shard-size-0"),
    P(_coord("{missing}/run.yaml"), "lte-coordinator: error: config file {missing}/run.yaml does not exist",
      id="coord-config-missing"),
    P(_coord("{workdir}"), "lte-coordinator: error: config file {workdir} is not a file", id="coord-config-is-dir"),
    P(_coord("{cfg_not_yaml}"), "not valid YAML at line 2", id="coord-not-yaml"),
    P(_coord("{cfg_tab_indent}"), "not valid YAML at line 2", id="coord-tab-indent"),
    P(_coord("{cfg_list}"), "expected a mapping at the top level", id="coord-top-list"),
    P(_coord("{cfg_scalar}"), "expected a mapping at the top level", id="coord-top-scalar"),
    P(_coord("{cfg_empty}"), "is empty", id="coord-empty-file"),
    P(_coord("{cfg_comments_only}"), "is empty", id="coord-comments-only"),
    P(_coord("{cfg_binary}"), "cannot read", id="coord-binary-file"),
    P(_coord("{cfg_unknown_top}"), "epochs: Extra inputs are not permitted", id="coord-unknown-key"),
    P(_coord("{cfg_unknown_nested}"), "lte.rnak: Extra inputs are not permitted", id="coord-unknown-nested-key"),
    P(_coord("{cfg_rank_text}"), "lte.rank: Input should be a valid integer", id="coord-rank-text"),
    P(_coord("{cfg_rank_fraction}"), "lte.rank: Input should be a valid integer", id="coord-rank-fraction"),
    P(_coord("{cfg_lte_scalar}"), "lte: Input should be a valid dictionary", id="coord-section-scalar"),
    P(_coord("{cfg_dense_modules_text}"), "lte.dense_modules: Input should be a valid list", id="coord-list-text"),
    P(_coord("{cfg_rank_zero}"), "lte.rank: Input should be greater than 0", id="coord-rank-zero"),
    P(_coord("{cfg_heads_zero}"), "lte.heads: Input should be greater than 0", id="coord-heads-zero"),
    P(_coord("{cfg_merge_every_zero}"), "lte.merge_every: Input should be greater than 0", id="coord-merge-every-0"),
    P(_coord("{cfg_lr_negative}"), "optim.lr: Input should be greater than 0", id="coord-lr-negative"),
    P(_coord("{cfg_lr_inf}"), "optim.lr: Input should be a finite number", id="coord-lr-inf"),
    P(_coord("{cfg_alpha_nan}"), "lte.alpha: Input should be a finite number", id="coord-alpha-nan"),
    P(_coord("{cfg_batch_zero}"), "data.batch_size: Input should be greater than 0", id="coord-batch-zero"),
    P(_coord("{cfg_test_fraction_one}"), "data.test_fraction: Input should be less than 1", id="coord-test-frac-1"),
    P(_coord("{cfg_betas_over_one}"), "optim.betas.1: Input should be less than 1", id="coord-betas"),
    P(_coord("{cfg_seed_negative}"), "seed: Input should be greater than or equal to 0", id="coord-seed-negative"),
    P(_coord("{cfg_run_empty}"), "run: String should have at least 1 character", id="coord-run-empty"),
    P(_coord("{cfg_dataset_unknown}"), "data.dataset: Input should be 'digits', 'imagefolder' or 'cifar10'",
      id="coord-dataset-unknown"),
    P(_coord("{cfg_outer_step}"), "lte.outer_lr and lte.outer_momentum run in the simulator only so far",
      id="coord-outer-step-not-on-the-network"),
    # ----- lte-coordinator start: flags and paths ---------------------------------------------------------
    P(["lte-coordinator"], "lte-coordinator: error: the following arguments are required: command", id="coord-no-cmd"),
    P(["lte-coordinator", "start", "--config", "{cfg_ok}"], "required: --checkpoint-dir", id="coord-no-ckdir"),
    P(_coord("{cfg_ok}", "--rounds", "3"), "unrecognized arguments: --rounds 3", id="coord-unknown-flag"),
    P(_coord("{cfg_ok}", "--round-seconds", "0"), "--round-seconds: 0 is not a positive number of seconds",
      id="coord-round-seconds-0"),
    P(_coord("{cfg_ok}", "--round-seconds", "-2"), "--round-seconds: -2 is not a positive", id="coord-round-s-neg"),
    P(_coord("{cfg_ok}", "--round-seconds", "nan"), "--round-seconds: nan is not a positive", id="coord-round-s-nan"),
    P(_coord("{cfg_ok}", "--round-seconds", "soon"), "--round-seconds: 'soon' is not a number", id="coord-round-s-txt"),
    P(_coord("{cfg_ok}", "--fetch-timeout", "0"), "--fetch-timeout: 0 is not a positive", id="coord-fetch-timeout-0"),
    P(_coord("{cfg_ok}", "--max-rounds", "-1"), "--max-rounds: -1 is out of range (must be at least 1)",
      id="coord-max-rounds-neg"),
    P(_coord("{cfg_ok}", "--max-rounds", "0"), "--max-rounds: 0 is out of range", id="coord-max-rounds-0"),
    P(_coord("{cfg_ok}", "--keep-last", "0"), "--keep-last: 0 is out of range (must be at least 1)", id="coord-keep-0"),
    P(_coord("{cfg_ok}", "--keep-every", "-1"), "--keep-every: -1 is out of range (must be at least 0)",
      id="coord-keep-every-neg"),
    P(_coord("{cfg_ok}", "--eval-every", "0"), "--eval-every: 0 is out of range", id="coord-eval-every-0"),
    P(_coord("{cfg_ok}", "--checkpoint-every", "0"), "--checkpoint-every: 0 is out of range", id="coord-ck-every-0"),
    P(_coord("{cfg_ok}", "--min-peers", "0"), "--min-peers: 0 is out of range", id="coord-min-peers-0"),
    P(_coord("{cfg_ok}", "--min-peers", "two"), "--min-peers: 'two' is not an integer", id="coord-min-peers-text"),
    P(_coord("{cfg_ok}", "--wire", "zip"), "argument --wire: invalid choice: 'zip'", id="coord-wire"),
    P(_coord("{cfg_ok}", "--port", "70000"), "--port: 70000 is out of range (must be in 0..65535)",
      id="coord-port-range"),
    P(_coord("{cfg_ok}", "--http-port", "-1"), "--http-port: -1 is out of range", id="coord-http-port-range"),
    P(_coord("{cfg_ok}", "--port", "{busy}"), "--port {busy}: cannot listen on 127.0.0.1:{busy}: Address already in",
      id="coord-port-busy"),
    P(_coord("{cfg_ok}", "--http-port", "{busy}"), "--http-port {busy}: cannot listen on 127.0.0.1:{busy}",
      id="coord-http-port-busy"),
    P(_coord("{cfg_ok}", "--host", "localhost"), "--host: 'localhost' is not an IPv4 or IPv6 address",
      id="coord-host-name"),
    P(_coord("{cfg_ok}", "--host", "999.1.1.1"), "--host: '999.1.1.1' is not an IPv4", id="coord-host-bad-ip"),
    P(["lte-coordinator", "start", "--config", "{cfg_ok}", "--checkpoint-dir", "{a_file}"],
      "--checkpoint-dir {a_file} is not a directory", id="coord-ckdir-is-file"),
    P(_coord("{cfg_ok}", "--identity", "{missing}/coordinator.key"), "--identity {missing}/coordinator.key: "
      "directory {missing} does not exist", id="coord-identity-dir-missing"),
    P(_coord("{cfg_ok}", "--identity", "{workdir}"), "--identity {workdir} is not a file", id="coord-identity-is-dir"),
    # these get as far as reading a key or building the model (seconds: torch, timm, hivemind imports)
    P(_coord("{cfg_ok}", "--allow-peers", "{missing}/ids.txt"), "--allow-peers {missing}/ids.txt: cannot read",
      id="coord-allowlist-missing"),
    P(_coord("{cfg_ok}", "--allow-peers", "{no_ids}"), "--allow-peers {no_ids}: lists no peer id",
      id="coord-allowlist-empty"),
    P(_coord("{cfg_ok}", "--allow-peers", "{garbage}"), "--allow-peers {garbage}, line 1: 'this is not a key' is not a "
      "peer id", id="coord-allowlist-garbage"),
    P(_coord("{cfg_ok}", "--identity", "{garbage}"), "cannot read RSA key from {garbage}", id="coord-identity-garbage"),
    P(_coord("{cfg_model_unknown}"), "model.name: unknown timm model 'vit_does_not_exist'", id="coord-model-unknown"),
    P(_coord("{cfg_model_wants_rgb}"), "model.kwargs: data.dataset=digits gives images of shape (1, 8, 8), which "
      "this model cannot take: ", id="coord-model-data-mismatch"),
    # ----- lte-peer join ------------------------------------------------------------------------------------
    P(["lte-peer", "join"], "lte-peer join: error: the following arguments are required: --dht", id="join-no-dht"),
    P(_join("--shard", "a/b"), "--shard: 'a/b' is not I/N with 0 <= I < N", id="join-shard-text"),
    P(_join("--shard", "1"), "--shard: '1' is not I/N", id="join-shard-no-slash"),
    P(_join("--shard", "2/2"), "--shard: '2/2' is not I/N", id="join-shard-index-too-big"),
    P(_join("--shard", "0/0"), "--shard: '0/0' is not I/N", id="join-shard-zero-shards"),
    P(_join("--shard=-1/2"), "--shard: '-1/2' is not I/N", id="join-shard-negative"),
    P(_join("--batch-size", "0"), "--batch-size: 0 is out of range (must be at least 1)", id="join-batch-0"),
    P(_join("--max-rounds", "-1"), "--max-rounds: -1 is out of range", id="join-max-rounds-neg"),
    P(_join("--threads", "0"), "--threads: 0 is out of range", id="join-threads-0"),
    P(_join("--port", "65536"), "--port: 65536 is out of range (must be in 0..65535)", id="join-port-range"),
    P(_join("--port", "{busy}"), "lte-peer: error: --port {busy}: cannot listen on 127.0.0.1:{busy}",
      id="join-port-busy"),
    P(_join("--host", "my-laptop"), "--host: 'my-laptop' is not an IPv4 or IPv6 address", id="join-host-name"),
    P(_join("--dataset", "mnist"), "--dataset: invalid choice: 'mnist'", id="join-dataset-unknown"),
    P(_join("--device", "tpu"), "--device: invalid choice: 'tpu'", id="join-device-unknown"),
    P(_join("--data", "{missing}"), "lte-peer: error: --data {missing} does not exist", id="join-data-missing"),
    P(_join("--cache-dir", "{a_file}/cache"), "lte-peer: error: --cache-dir {a_file}/cache: not a writable directory",
      id="join-cache-dir-under-file"),
    P(["lte-peer", "data", "--dht", NOBODY, "--cache-dir", "{a_file}"], "lte-peer: error: --cache-dir {a_file}: not "
      "a writable directory", id="data-cache-dir-is-file"),
    P(_join("--identity", "{missing}/p.id"), "--identity {missing}/p.id: directory {missing} does not exist",
      id="join-identity-dir-missing"),
    P(_join("--identity", "{workdir}"), "--identity {workdir} is not a file", id="join-identity-is-dir"),
    # these need hivemind's address parser or its identity check (seconds), but start no process that stays
    P(_join(dht="not-a-multiaddr"), "lte-peer: error: malformed peer address 'not-a-multiaddr'", id="join-dht-text"),
    P(_join(dht="/ip4/127.0.0.1/tcp/31337"), "must end with /p2p/<peer id>", id="join-dht-no-p2p"),
    P(_join(dht="/ip4/127.0.0.1/tcp/31337/p2p/notapeerid"), "malformed peer address", id="join-dht-bad-peer-id"),
    P(_join(dht=f"/ip4/127.0.0.1/sctp2/31337/p2p/{PEER_ID}"), "malformed peer address", id="join-dht-unknown-proto"),
    P(_join("--announce-maddrs", "1.2.3.4:31337"), "malformed announce address '1.2.3.4:31337'",
      id="join-announce-malformed"),
    P(_join("--identity", "{garbage}"), "lte-peer: error: {garbage} is not a libp2p identity file",
      id="join-identity-garbage"),
    # ----- lte-peer download --------------------------------------------------------------------------------
    P(["lte-peer", "download", "--dht", NOBODY], "required: --out", id="download-no-out"),
    P(["lte-peer", "download", "--dht", NOBODY, "--out", "{a_file}"], "lte-peer: error: --out {a_file} is not a "
      "directory", id="download-out-is-file"),
    P(_download("--round", "-1"), "--round: -1 is out of range (must be at least 0)", id="download-round-neg"),
    P(_download("--timeout", "0"), "--timeout: 0 is not a positive number of seconds", id="download-timeout-0"),
    P(_download("--host", "::1::"), "--host: '::1::' is not an IPv4 or IPv6 address", id="download-host"),
    P(_download(dht="/dns4/example.org/tcp/31337"), "must end with /p2p/<peer id>", id="download-dht-no-p2p"),
    # the one case here that starts a DHT node (and its p2pd): nobody answers at --dht
    P(_download(), f"lte-peer: error: cannot start DHT node via {NOBODY}", id="download-dht-unreachable"),
    # ----- lte-demo -----------------------------------------------------------------------------------------
    P(_demo("--peers", "0"), "lte-demo: error: argument --peers: 0 is out of range (must be at least 1)",
      id="demo-peers-0"),
    P(_demo("--rounds", "-1"), "--rounds: -1 is out of range", id="demo-rounds-neg"),
    P(_demo("--round-seconds", "0"), "--round-seconds: 0 is not a positive", id="demo-round-seconds-0"),
    P(_demo("--timeout", "-5"), "--timeout: -5 is not a positive", id="demo-timeout-neg"),
    P(_demo("--paths", "both"), "--paths: invalid choice: 'both'", id="demo-paths"),
    P(["lte-demo", "--config", "{missing}/run.yaml"], "lte-demo: error: config file {missing}/run.yaml does not exist",
      id="demo-config-missing"),
    P(["lte-demo", "--config", "{cfg_unknown_nested}"], "lte.rnak: Extra inputs are not permitted",
      id="demo-config-unknown-key"),
    P(["lte-demo", "--config", "{cfg_not_yaml}"], "not valid YAML", id="demo-config-not-yaml"),
    P(_demo()[:3] + ["--checkpoint-dir", "{a_file}"], "--checkpoint-dir {a_file} is not a directory",
      id="demo-ckdir-is-file"),
    P(_demo()[:3] + ["--logs", "{a_file}"], "--logs {a_file} is not a directory", id="demo-logs-is-file"),
]
# The model is built after the checkpoint directory and its key are made (so that a directory of another run is
# refused before anything slow); a model that cannot be built leaves that new run directory, with only its key.
WRITES_BEFORE_REFUSING = {"coord-model-unknown", "coord-model-data-mismatch"}
if not torch.cuda.is_available():
    CASES += [
        P(_join("--device", "cuda"), "lte-peer: error: --device cuda: no CUDA device is available", id="join-cuda"),
    ]


@pytest.fixture(scope="module")
def busy_port():
    """A port some other program listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The files the cases read: CONFIGS as {cfg_<name>}, a file where a directory belongs, a garbage key file."""
    where = tmp_path_factory.mktemp("inputs")
    names = {"workdir": where, "a_file": where / "a-file", "garbage": where / "garbage.key"}
    names["a_file"].write_text("a file where a directory is expected\n")
    names["garbage"].write_bytes(b"this is not a key\n")
    names["no_ids"] = where / "no-ids.txt"
    names["no_ids"].write_text("# nobody yet\n\n")
    for name, text in CONFIGS.items():
        names[f"cfg_{name}"] = where / f"{name}.yaml"
        names[f"cfg_{name}"].write_bytes(text if isinstance(text, bytes) else text.encode())
    return {k: str(v) for k, v in names.items()}


@pytest.fixture
def workspace(inputs: dict[str, str], tmp_path: Path, busy_port: int) -> dict[str, str]:
    """`inputs`, and where this case's outputs would go (in an empty directory of its own)."""
    outputs = {"missing": tmp_path / "no-such-dir", "ck": tmp_path / "ck", "out": tmp_path / "out",
               "logs": tmp_path / "logs"}
    return {**inputs, **{k: str(v) for k, v in outputs.items()}, "busy": str(busy_port)}


@pytest.mark.timeout(PROC_TIMEOUT_S + 30)
@pytest.mark.parametrize("argv, expected", CASES)
def test_bad_input_is_one_line_and_exit_2(workspace: dict[str, str], tmp_path: Path, request: pytest.FixtureRequest,
                                          argv: list[str], expected: str) -> None:
    argv = [a.format(**workspace) for a in argv]
    with Network(tmp_path / "procs") as net:  # reaps the process and anything it started, fails on leftovers
        proc = net.start(argv[0], argv[1:], exe=str(BIN / argv[0]))
        rc = net.wait_exit(proc, PROC_TIMEOUT_S)
        net.wait_until(lambda: proc.eof or None, 10, "the end of its stdout")
        stderr = proc.stderr_text()
        stdout = "\n".join(proc.lines + [str(e) for e in proc.events])
    assert "Traceback" not in stderr + stdout, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{stderr}"
    assert rc == 2, (rc, lines[0])
    assert expected.format(**workspace) in lines[0], lines[0]
    # refused before it wrote anything: no checkpoint, log, download or identity file appeared
    made = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if not p.is_relative_to(tmp_path / "procs"))
    assert made == (["ck", "ck/coordinator.key"] if request.node.callspec.id in WRITES_BEFORE_REFUSING else []), made


def test_tools_check_input_before_importing_torch_or_hivemind() -> None:
    """Why most cases above take a fraction of a second: the CLI modules import neither at the top (an import of
    torch, timm and hivemind takes seconds), so a typo is answered before them."""
    code = ("import sys, coordinator.cli, coordinator.demo, peer.cli; "
            "print(sorted(m for m in ('torch', 'timm', 'hivemind') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_join_needs_no_flag_but_the_address():
    """`lte-peer join --dht ADDR` alone: every interface, the GPU if there is one, shards dealt by the run."""
    from lte.net.node import announceable
    from peer.cli import parse_args, resolve_device

    args = parse_args(["join", "--dht", NOBODY])
    assert (args.host, args.device, args.shard, args.cache_dir, args.upnp) == ("0.0.0.0", "auto", None, None, False)
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    addrs = ["/ip4/127.0.0.1/tcp/5/p2p/x", "/ip4/192.0.2.7/tcp/5/p2p/x"]
    assert announceable(addrs, "/ip4/198.51.100.1/tcp/9/p2p/c") == addrs[1:]  # loopback means nothing elsewhere
    assert announceable(addrs, "/ip4/127.0.0.1/tcp/9/p2p/c") == addrs  # one machine: loopback is the way
    assert announceable(addrs[:1], "/ip4/198.51.100.1/tcp/9/p2p/c") == addrs[:1]  # nothing better: keep it
