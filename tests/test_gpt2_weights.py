"""GPT-2 weights in Hugging Face's format: import, export and download, checked against transformers.

transformers runs in its own process (tests/transformers_side.py, under python -I), as in a user's
environment: there the repository is not on sys.path, so transformers imports Hugging Face's `kernels`
package, not our kernels/ folder. Tensors go back and forth as safetensors files.

No network: the models are tiny random GPT-2s, and the hub is a local HTTP server."""
import hashlib
import http.server
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tritongpt import fileio
from tritongpt.fileio import DownloadError
from tritongpt.hf import GPT2_NAMES
from model import GPT, GPTConfig, gelu_approximate, set_gelu_approximate

if importlib.util.find_spec("transformers") is None:
    pytest.skip("needs transformers (pip install -r tests/requirements.txt)", allow_module_level=True)

TRANSFORMERS_SIDE = Path(__file__).parent / "transformers_side.py"
TOL = 1e-4
INIT_STD = 0.1  # as transformers_side.py's: big enough that the exact and tanh GELUs differ by more than TOL


def tokens(vocab_size: int = 100, block_size: int = 32) -> torch.Tensor:
    return torch.randint(0, vocab_size, (2, block_size), generator=torch.Generator().manual_seed(1))


def run_transformers(jobs: list[dict], workdir: Path) -> None:
    """Run transformers_side.py's jobs in one isolated process started outside the repository."""
    jobs_file = workdir / "jobs.json"
    jobs_file.write_text(json.dumps(jobs))
    out = subprocess.run([sys.executable, "-I", str(TRANSFORMERS_SIDE), str(jobs_file)], cwd=workdir,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=600)
    if out.returncode:
        pytest.fail(f"transformers_side.py failed:\n{out.stdout}\n{out.stderr}")


@dataclass
class HFModel:
    directory: Path  # as GPT2LMHeadModel.save_pretrained wrote it
    logits: torch.Tensor  # its logits for tokens(), computed by transformers


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory) -> dict[str, HFModel]:
    """Random tiny GPT-2s made by transformers in one process: seed 0, the same model saved in shards of
    100KB, and another one (seed 1)."""
    root = tmp_path_factory.mktemp("transformers")
    save_file({"tokens": tokens()}, root / "tokens.safetensors")
    made = {"seed0": dict(seed=0), "sharded": dict(seed=0, max_shard_size="100KB"), "seed1": dict(seed=1)}
    run_transformers([{"op": "make", "dir": str(root / name), "tokens": str(root / "tokens.safetensors"),
                       "logits": str(root / f"{name}.logits.safetensors"), **spec} for name, spec in made.items()],
                     root)
    return {name: HFModel(root / name, load_file(root / f"{name}.logits.safetensors")["logits"]) for name in made}


def transformers_logits(directory: Path, workdir: Path) -> torch.Tensor:
    """GPT2LMHeadModel.from_pretrained(directory)'s logits for tokens(), in a stock transformers process."""
    save_file({"tokens": tokens()}, workdir / "tokens.safetensors")
    run_transformers([{"op": "logits", "dir": str(directory), "tokens": str(workdir / "tokens.safetensors"),
                       "logits": str(workdir / "logits.safetensors")}], workdir)
    return load_file(workdir / "logits.safetensors")["logits"]


@torch.no_grad()
def our_logits(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    model.eval()
    logits, _ = model(idx, targets=idx)  # with targets: the logits of every position
    return logits


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@torch.no_grad()
def random_gpt(bias: bool = True) -> GPT:
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=100, n_layer=2, n_head=4, n_embd=64, bias=bias), "sdpa", "torch")
    for param in model.parameters():
        param.add_(torch.randn_like(param) * INIT_STD)
    return model


@pytest.fixture
def hf_dir(hf_models, tmp_path) -> tuple[Path, torch.Tensor]:
    """A copy of the seed-0 model's directory (tests may edit it) and its logits."""
    shutil.copytree(hf_models["seed0"].directory, tmp_path / "hf")
    return tmp_path / "hf", hf_models["seed0"].logits


def test_hf_to_ours_same_logits(hf_dir):
    directory, expected = hf_dir
    model = GPT.from_pretrained(str(directory), attn_impl="sdpa", ln_impl="torch")
    assert (model.config.n_layer, model.config.n_head, model.config.n_embd) == (2, 4, 64)
    assert (model.config.block_size, model.config.vocab_size, model.config.bias) == (32, 100, True)
    assert gelu_approximate(model) == "tanh"  # HF's gelu_new
    idx = tokens()
    assert max_diff(our_logits(model, idx), expected) < TOL
    # The test can tell the two GELUs apart: with nanoGPT's exact GELU the logits are off.
    set_gelu_approximate(model, "none")
    assert max_diff(our_logits(model, idx), expected) > TOL


def test_eager_attention_and_dropout_override(hf_dir):
    directory, expected = hf_dir
    model = GPT.from_pretrained(str(directory), dict(dropout=0.1), attn_impl="eager", ln_impl="torch")
    assert model.config.dropout == 0.1
    assert max_diff(our_logits(model, tokens()), expected) < TOL  # eval(): dropout is off


def test_ours_to_hf_same_logits(tmp_path):
    model = random_gpt()
    model.save_pretrained(tmp_path / "export")
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["model_type"] == "gpt2" and config["architectures"] == ["GPT2LMHeadModel"]
    assert config["n_positions"] == config["n_ctx"] == 32 and config["activation_function"] == "gelu"
    assert not list((tmp_path / "export").glob("*.tmp"))
    assert max_diff(transformers_logits(tmp_path / "export", tmp_path), our_logits(model, tokens())) < TOL


def test_round_trip_keeps_tanh_gelu(hf_dir, tmp_path):
    directory, expected = hf_dir
    model = GPT.from_pretrained(str(directory), attn_impl="sdpa", ln_impl="torch")
    model.save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "config.json").read_text())["activation_function"] == "gelu_new"
    assert max_diff(transformers_logits(tmp_path / "again", tmp_path), expected) < TOL


def test_bias_false_exports_zero_biases(tmp_path):
    model = random_gpt(bias=False)
    model.save_pretrained(tmp_path / "nobias")
    expected = our_logits(model, tokens())
    assert max_diff(transformers_logits(tmp_path / "nobias", tmp_path), expected) < TOL
    back = GPT.from_pretrained(str(tmp_path / "nobias"), attn_impl="sdpa", ln_impl="torch")
    assert back.config.bias and gelu_approximate(back) == "none"
    assert max_diff(our_logits(back, tokens()), expected) < TOL


def test_hub_layout_and_pytorch_bin(hf_models, tmp_path):
    """The hub's files were saved from GPT2Model: no `transformer.` prefix, and causal-mask buffers."""
    made = hf_models["seed0"]
    saved = load_file(made.directory / "model.safetensors")
    state = {k.removeprefix("transformer."): v.contiguous() for k, v in saved.items() if k != "lm_head.weight"}
    mask = torch.tril(torch.ones(32, 32)).view(1, 1, 32, 32)
    for layer in range(2):
        state[f"h.{layer}.attn.bias"] = mask.clone()
        state[f"h.{layer}.attn.masked_bias"] = torch.tensor(-1e4)
    for name, write in (("safetensors", save_file), ("bin", torch.save)):
        directory = tmp_path / name
        directory.mkdir()
        shutil.copy(made.directory / "config.json", directory)
        write(state, directory / ("model.safetensors" if name == "safetensors" else "pytorch_model.bin"))
        model = GPT.from_pretrained(str(directory), attn_impl="sdpa", ln_impl="torch")
        assert max_diff(our_logits(model, tokens()), made.logits) < TOL, name


def test_a_pytorch_bin_that_would_run_code_is_refused(hf_models, tmp_path):
    """Weights downloaded from someone else: pytorch_model.bin is read with weights_only=True."""
    from tritongpt.checkpoint import CheckpointError
    from test_checkpoint import CreatesAFile

    shutil.copy(hf_models["seed0"].directory / "config.json", tmp_path)
    marker = tmp_path / "created_by_unpickling"
    torch.save({"wte.weight": CreatesAFile(marker)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"refusing to load .*pytorch_model\.bin"):
        GPT.from_pretrained(str(tmp_path), attn_impl="sdpa", ln_impl="torch")
    assert not marker.exists()


def test_sharded_safetensors(hf_models):
    sharded = hf_models["sharded"]
    assert (sharded.directory / "model.safetensors.index.json").is_file()
    model = GPT.from_pretrained(str(sharded.directory), attn_impl="sdpa", ln_impl="torch")
    assert max_diff(our_logits(model, tokens()), sharded.logits) < TOL


# -----------------------------------------------------------------------------
# Download from the hub (a local server)


COMMIT = "a" * 40
MOVED = "b" * 40  # what main names once upstream has moved on


class Server:
    """A local HTTP server answering GET from `routes` (path -> (status, headers, body)); `fail` queues answers
    given before the route's (path -> [(status, headers)]); every request's path and Authorization header is
    recorded."""

    def __init__(self):
        self.routes: dict[str, tuple[int, dict, bytes]] = {}
        self.fail: dict[str, list[tuple[int, dict]]] = {}
        self.seen: list[tuple[str, str | None]] = []
        state = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                state.seen.append((self.path, self.headers.get("Authorization")))
                status, headers, body = state.routes.get(self.path, (404, {}, b"not found"))
                if state.fail.get(self.path):
                    (status, headers), body = state.fail[self.path].pop(0), b""
                self.send_response(status)
                for key, value in {**headers, "Content-Length": str(len(body))}.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def paths(self) -> list[str]:
        return [path for path, _ in self.seen]

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def serve_gpt2(hub: "Server", cdn: "Server", files: dict[str, bytes], commit: str = COMMIT, listed: dict | None = None):
    """openai-community/gpt2 at `commit` as the hub serves it: main names the commit, the tree lists each
    file's size (and the weights' sha256, as an LFS file), config.json comes from the hub itself and the
    weights through a redirect to the CDN. `listed` overrides what the tree says of a file."""
    repo = "/openai-community/gpt2"
    hub.routes[f"/api/models{repo}/revision/main"] = (200, {}, json.dumps({"sha": commit}).encode())
    tree = []
    for name, body in files.items():
        entry = {"type": "file", "path": name, "size": len(body)}
        if name.endswith(".safetensors"):
            entry["lfs"] = {"oid": hashlib.sha256(body).hexdigest(), "size": len(body)}
        tree.append({**entry, **(listed or {}).get(name, {})})
    hub.routes[f"/api/models{repo}/tree/{commit}"] = (200, {}, json.dumps(tree).encode())
    for name, body in files.items():
        if name.endswith(".safetensors"):
            hub.routes[f"{repo}/resolve/{commit}/{name}"] = (302, {"Location": f"{cdn.url}/blob/{commit}/{name}"}, b"")
            cdn.routes[f"/blob/{commit}/{name}"] = (200, {}, body)
        else:
            hub.routes[f"{repo}/resolve/{commit}/{name}"] = (200, {}, body)


@pytest.fixture
def hub(hf_models, tmp_path, monkeypatch):
    """A local stand-in for huggingface.co (and the CDN it redirects LFS files to) serving a tiny model as
    openai-community/gpt2; yields (hub, cdn, files, the model's logits, the cache directory)."""
    made = hf_models["seed0"]
    files = {name: (made.directory / name).read_bytes() for name in ("config.json", "model.safetensors")}
    hub_server, cdn = Server(), Server()
    serve_gpt2(hub_server, cdn, files)
    monkeypatch.delenv("TRITONGPT_HF_ENDPOINT", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", hub_server.url)
    monkeypatch.setenv("TRITONGPT_CACHE", str(tmp_path / "cache"))
    yield hub_server, cdn, files, made.logits, tmp_path / "cache"
    hub_server.close()
    cdn.close()


def test_download_then_cache(hub):
    hub_server, cdn, _, expected, cache = hub
    idx = tokens()
    model = GPT.from_pretrained("gpt2", dict(dropout=0.0), attn_impl="sdpa", ln_impl="torch")
    assert hub_server.paths() == [
        "/api/models/openai-community/gpt2/revision/main",
        f"/api/models/openai-community/gpt2/tree/{COMMIT}",
        f"/openai-community/gpt2/resolve/{COMMIT}/config.json",
        f"/openai-community/gpt2/resolve/{COMMIT}/model.safetensors",
    ]
    assert cdn.paths() == [f"/blob/{COMMIT}/model.safetensors"]
    assert sorted(p.name for p in (cache / "gpt2").iterdir()) == ["config.json", "model.safetensors"]
    assert max_diff(our_logits(model, idx), expected) < TOL
    again = GPT.from_pretrained("gpt2", attn_impl="sdpa", ln_impl="torch")
    assert len(hub_server.seen) == 4 and len(cdn.seen) == 1  # the second load reads the cache only
    assert max_diff(our_logits(again, idx), expected) < TOL


def test_token_goes_to_the_hub_and_never_to_the_cdn(hub, monkeypatch):
    hub_server, cdn, *_ = hub
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    GPT.from_pretrained("gpt2")
    assert {auth for _, auth in hub_server.seen} == {"Bearer hf_secret"}
    assert {auth for _, auth in cdn.seen} == {None}


def test_project_endpoint_overrides_hf_endpoint(hub, monkeypatch):
    hub_server, *_ = hub
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("TRITONGPT_HF_ENDPOINT", hub_server.url)
    GPT.from_pretrained("gpt2")
    assert len(hub_server.seen) == 4


@pytest.mark.parametrize("listed,message", [
    ({"lfs": {"oid": "0" * 64}}, "its sha256 is"),  # the hub's sha256 for the weights differs
    ({"size": 123}, r"it has [\d,]+ bytes, expected 123"),
])
def test_weights_that_do_not_match_the_listing_are_refused(hub, listed, message):
    hub_server, cdn, files, expected, cache = hub
    serve_gpt2(hub_server, cdn, files, listed={"model.safetensors": listed})
    with pytest.raises(DownloadError, match=f"model.safetensors is corrupt: {message}"):
        GPT.from_pretrained("gpt2")
    assert not (cache / "gpt2" / "model.safetensors").exists()
    assert not (cache / "gpt2" / "model.safetensors.part").exists()  # deleted: a rerun starts afresh
    serve_gpt2(hub_server, cdn, files)  # the hub fixed: the rerun succeeds
    assert max_diff(our_logits(GPT.from_pretrained("gpt2"), tokens()), expected) < TOL


def test_config_size_is_checked(hub):
    hub_server, cdn, files, *_ = hub
    serve_gpt2(hub_server, cdn, files, listed={"config.json": {"size": 5}})
    with pytest.raises(DownloadError, match="config.json is corrupt: it has"):
        GPT.from_pretrained("gpt2")


def test_rate_limits_and_server_errors_are_waited_out(hub, monkeypatch, capsys):
    """A 429 with Retry-After on the first API call, a 503 on the listing, a 429 with the hub's RateLimit
    header on the weights: the download waits as asked, says why, and finishes."""
    hub_server, cdn, files, expected, _ = hub
    waits = []
    monkeypatch.setattr(fileio.time, "sleep", waits.append)
    repo = "/openai-community/gpt2"
    hub_server.fail[f"/api/models{repo}/revision/main"] = [(429, {"Retry-After": "7"})]
    hub_server.fail[f"/api/models{repo}/tree/{COMMIT}"] = [(503, {})]
    cdn.fail[f"/blob/{COMMIT}/model.safetensors"] = [(429, {"RateLimit": '"api";r=0;t=12'})]
    model = GPT.from_pretrained("gpt2")
    assert waits == [7.0, 1.0, 12.0]
    err = capsys.readouterr().err
    assert "HTTP 429" in err and "waiting 7s as the server asks" in err and "HTTP 503" in err
    assert max_diff(our_logits(model, tokens()), expected) < TOL


def test_waiting_is_bounded(hub, monkeypatch):
    hub_server, *_ = hub
    monkeypatch.setattr(fileio.time, "sleep", lambda seconds: None)
    hub_server.fail["/api/models/openai-community/gpt2/revision/main"] = [(429, {"Retry-After": "3600"})]
    with pytest.raises(DownloadError, match=r"(?s)Could not get .*revision/main \(waiting 3600s more would pass "
                                            r"the 600s.*HTTP 429.*HF_ENDPOINT"):
        GPT.from_pretrained("gpt2")


def test_a_moving_main_cannot_mix_versions(hub, hf_models):
    """main names COMMIT when the download starts; upstream then moves to another model. Every file comes
    from COMMIT, so the weights match the config they were listed with."""
    hub_server, cdn, files, expected, _ = hub
    other = hf_models["seed1"].directory
    serve_gpt2(hub_server, cdn, {name: (other / name).read_bytes() for name in files}, commit=MOVED)
    hub_server.routes["/api/models/openai-community/gpt2/revision/main"] = (200, {}, json.dumps({"sha": COMMIT}).encode())
    model = GPT.from_pretrained("gpt2")
    assert max_diff(our_logits(model, tokens()), expected) < TOL
    assert not any(MOVED in path or "/resolve/main/" in path for path in hub_server.paths() + cdn.paths())


def test_download_missing_on_server(hub):
    with pytest.raises(DownloadError, match="gpt2-medium/revision/main answered HTTP 404"):
        GPT.from_pretrained("gpt2-medium")


# -----------------------------------------------------------------------------
# Clear errors


def test_unknown_name():
    with pytest.raises(ValueError, match="gpt3") as error:
        GPT.from_pretrained("gpt3")
    assert all(name in str(error.value) for name in GPT2_NAMES) and "directory" in str(error.value)


def test_override_other_than_dropout(hf_dir):
    with pytest.raises(ValueError, match=r"only override dropout.*\['n_layer'\]"):
        GPT.from_pretrained(str(hf_dir[0]), dict(dropout=0.1, n_layer=3))


def test_directory_missing_files(hf_dir, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        GPT.from_pretrained(str(empty))
    (hf_dir[0] / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        GPT.from_pretrained(str(hf_dir[0]))


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(model_type="llama"), "model_type is 'llama'"),
        (dict(activation_function="relu"), "activation_function is 'relu'"),
        (dict(layer_norm_epsilon=1e-6), "layer_norm_epsilon"),
        (dict(n_inner=100), "n_inner"),
        (dict(scale_attn_by_inverse_layer_idx=True), "scaled"),
    ],
)
def test_not_gpt2_config(hf_dir, change, message):
    config_path = hf_dir[0] / "config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), **change}))
    with pytest.raises(ValueError, match=message):
        GPT.from_pretrained(str(hf_dir[0]))


def test_weights_not_matching_config(hf_dir):
    config_path = hf_dir[0] / "config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "n_embd": 128}))
    with pytest.raises(ValueError, match="has shape"):
        GPT.from_pretrained(str(hf_dir[0]))


@pytest.mark.parametrize("change, message", [
    (dict(n_layer=1_000_000), "config.json says n_layer=1000000, but the weights hold 2 layers"),
    (dict(vocab_size=10**10), r"wte\.weight has shape \(100, 64\), but config\.json implies \(10000000000, 64\)"),
    (dict(n_embd=4096, n_head=4), r"c_attn\.bias has shape \(192,\), but config\.json implies \(12288,\)"),
])
def test_a_config_that_does_not_fit_its_weights_fails_before_allocating(hf_dir, change, message):
    """Huge sizes in config.json are checked against the weights' headers before the model is built: 10^10
    embeddings would ask for 2.5 TB (a RuntimeError from the allocator, not this ValueError)."""
    config_path = hf_dir[0] / "config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), **change}))
    with pytest.raises(ValueError, match=message):
        GPT.from_pretrained(str(hf_dir[0]))


def test_an_index_that_points_outside_its_folder_is_refused(hf_models, tmp_path):
    directory = tmp_path / "model"
    directory.mkdir()
    shutil.copy(hf_models["seed0"].directory / "config.json", directory)
    shutil.copy(hf_models["seed0"].directory / "model.safetensors", tmp_path / "elsewhere.safetensors")
    index = {"metadata": {}, "weight_map": {"transformer.wte.weight": "../elsewhere.safetensors"}}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"names files outside .*'\.\./elsewhere\.safetensors'"):
        GPT.from_pretrained(str(directory))
    (directory / "model.safetensors.index.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="is not a safetensors index"):
        GPT.from_pretrained(str(directory))
