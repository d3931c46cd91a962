"""cnnft.hashing: the digests that key caches and done markers keep their values (pinned here
from the helpers they replaced: io.stable_hash, io.files_fingerprint, features.file_digest /
layer_digests / model_digest, regions.files_digest, demo.spec_hash)."""

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cnnft.data.demo import GENERATOR_VERSION, DemoSpec, spec_hash
from cnnft.hashing import (
    file_digest,
    files_and_arrays_digest,
    files_fingerprint,
    layer_digests,
    model_digest,
    stable_hash,
)


def _net() -> nn.Sequential:
    net = nn.Sequential()
    net.add_module("fc1", nn.Linear(2, 3))
    net.add_module("relu1", nn.ReLU())
    net.add_module("fc2", nn.Linear(3, 1))
    with torch.no_grad():
        for i, p in enumerate(net.parameters()):
            p.copy_(torch.arange(p.numel(), dtype=torch.float32).view_as(p) / (i + 1))
    return net


def test_stable_hash_values():
    assert stable_hash({"b": [1, 2.5], "a": "x", "p": Path("/q")}) == "a3974eecf54f814a"
    assert stable_hash([1, 2], length=24) == "3a316d6d3226f84c1e46e444"


def test_model_and_layer_digests_values():
    net = _net()
    assert layer_digests(net) == {
        "fc1": "8077f4f174c4f73bef229f084af42985d95da8d047e8950b91b7724a15c02e38",
        "relu1": "d1f57b9d3036f6ec5ec41580a7ab14c3e38aec72cc0d177bfd235fb6ba2f0124",
        "fc2": "38a3505b5f308384a6cc70df45f238de05048f4f7176a74f6e6ef952576ac4d5",
    }
    digest = "8ea234453d850fed78b4b53cf0eaecf7de5f0e42205c3d234da1d860268f3732"
    assert model_digest(net) == digest and model_digest(net.state_dict()) == digest


def test_file_hashes_values(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = Path("f.txt")
    path.write_bytes(b"abc")
    os.utime(path, ns=(10**18, 10**18))
    assert file_digest(path) == file_digest(path, chunk=1) == hashlib.sha256(b"abc").hexdigest()
    assert files_fingerprint([path]) == files_fingerprint(["f.txt"]) == "f4c37db42e794a3d"
    boxes = [np.array([[0, 1, 2, 3.5]]), np.arange(4.0).reshape(1, 4)]
    assert files_and_arrays_digest([path], boxes) == "b75a11ef9e84636d97c7c217"
    os.utime(path, ns=(10**18, 10**18 + 1))
    assert files_fingerprint([path]) != "f4c37db42e794a3d"


def test_spec_hash_is_the_full_sha256_of_the_sorted_json():
    spec = DemoSpec(seed=3, imagenet_classes=5)
    text = json.dumps({"version": GENERATOR_VERSION, "spec": asdict(spec)}, sort_keys=True)
    assert spec_hash(spec) == hashlib.sha256(text.encode()).hexdigest()


def test_model_digest_hashes_tensors_without_copying_them():
    """The digest feeds each tensor's own buffer to SHA-256 (a bytes copy of VGG16's fc6 weight
    was a 392 MiB transient); same value as hashing the bytes, a 0-d buffer included."""
    import tracemalloc

    state = {"w": torch.randn(2048, 2048), "n": torch.tensor(7), "b": torch.ones(3, dtype=torch.bool)}
    expected = hashlib.sha256()
    for name, tensor in sorted(state.items()):
        expected.update(name.encode())
        expected.update(tensor.numpy().tobytes())
    tracemalloc.start()
    try:
        digest = model_digest(state)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert digest == expected.hexdigest()
    assert peak < 1 << 20  # the 16 MiB weight was never copied
