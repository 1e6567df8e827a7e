"""The Python package against the crate: same batches, exact resume, ranks, errors, fork safety, zero copy."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tarfile

import numpy as np
import pytest
import torch

import juicer
from juicer import _juicer
from conftest import FIXTURE_SHARDS, ROOT, SMALL, run_python

MOBILENET = ROOT / "fixtures" / "mobilenet_v2" / "mobilenet_v2.safetensors"


def digest(batch) -> tuple:
    """Keys plus a hash of every array's bytes."""
    h = hashlib.sha256()
    for name in ("patches", "positions", "patch_mask", "tokens", "token_mask"):
        h.update(np.ascontiguousarray(batch[name].numpy() if torch.is_tensor(batch[name]) else batch[name]).tobytes())
    return tuple(batch["keys"]), h.hexdigest()


def test_batches_equal_the_rust_iterator_bit_for_bit(synthetic):
    options = dict(SMALL, seed=3, shuffle_buffer=9, shuffle_shards=True)
    reference = _juicer._reference_batches(synthetic, **options)
    batches = list(juicer.Loader(synthetic, **options))
    assert len(batches) == len(reference) == 10  # 38 samples, batches of 4, the last one short
    for got, (keys, patches, positions, patch_mask, tokens, token_mask) in zip(batches, reference):
        assert got["keys"] == keys
        assert got["patches"].numpy().tobytes() == patches
        assert got["positions"].numpy().tobytes() == positions
        assert got["patch_mask"].numpy().tolist() == np.array(patch_mask).reshape(got["patch_mask"].shape).tolist()
        assert got["tokens"].numpy().tobytes() == tokens
        assert got["token_mask"].numpy().ravel().tolist() == token_mask
    assert sorted(k for b in batches for k in b["keys"]) == [f"s{i:05d}" for i in range(38)]


def test_fixture_photos_dtypes_shapes_lists_and_summary():
    loader = juicer.Loader(FIXTURE_SHARDS, batch_size=8, device="cpu", limit=16)
    assert len(loader) == 2
    batches = list(loader)
    assert len(batches) == 2
    b = batches[0]
    n, k, d = b["patches"].shape
    assert (n, d) == (8, 3 * 16 * 16) and 1 <= k <= 196
    assert b["patches"].dtype == torch.float32
    assert b["positions"].dtype == torch.int64 and b["positions"].shape == (n, k)
    assert b["patch_mask"].dtype == torch.bool and b["patch_mask"].shape == (n, k)
    assert b["tokens"].dtype == torch.int64 and b["tokens"].shape == (n, 77)
    assert b["token_mask"].dtype == torch.bool and b["token_mask"].shape == (n, 77)
    assert b["tokens"][:, 0].eq(49406).all()  # <|startoftext|>
    assert len(b["keys"]) == len(b["captions"]) == len(b["enriched"]) == len(b["classes"]) == n
    assert all(isinstance(c, dict) and {"name", "wnid", "id", "prob"} <= c.keys() for row in b["classes"] for c in row)
    assert any(row for row in b["classes"]), "the photos show classes"
    # Real patches are masked, padding is zero.
    for i in range(n):
        m = int(b["patch_mask"][i].sum())
        assert m == len(b["kept"][i]) and bool(b["patch_mask"][i, :m].all())
        assert b["patches"][i, m:].abs().sum().item() == 0
    s = loader.summary()
    assert s["read"] == s["emitted"] + sum(s["dropped"].values()) == 16
    assert s["batches"] == 2


def test_numpy_without_torch_and_zero_copy():
    loader = juicer.Loader(FIXTURE_SHARDS[:1], batch_size=4, image_size=64, device="cpu", limit=4, as_torch=False)
    (b,) = list(loader)
    assert isinstance(b["patches"], np.ndarray) and b["patches"].dtype == np.float32
    assert b["patches"].flags.writeable and b["patches"].flags.c_contiguous

    # Pointer identity through the layers: the Rust allocation, numpy's view of it, torch's view of that.
    core = _juicer.Loader(FIXTURE_SHARDS[:1], batch_size=4, image_size=64, device="cpu", limit=4)
    raw = next(core.iter())
    arrays = raw.take_arrays()
    for array in arrays:
        view = np.asarray(array)
        assert view.ctypes.data == array.address
        assert torch.from_numpy(view).data_ptr() == array.address
    with pytest.raises(RuntimeError, match="taken already"):
        raw.take_arrays()
    # The Rust buffer outlives the objects that lent it, as long as a view holds it.
    view = np.asarray(arrays[0])
    total = float(view.sum())
    del arrays, raw, core
    assert float(view.sum()) == total


def test_state_dict_resumes_exactly_in_a_fresh_process(synthetic, tmp_path):
    options = dict(SMALL, seed=11, shuffle_buffer=7, shuffle_shards=True)
    whole = [digest(b) for b in juicer.Loader(synthetic, **options)]

    loader = juicer.Loader(synthetic, **options)
    it = iter(loader)
    head = [digest(next(it)) for _ in range(3)]
    state = loader.state_dict()
    assert state["batches"] == 3
    (tmp_path / "state.json").write_text(json.dumps(state))
    del it

    code = f"""
import json, sys
sys.path.insert(0, {os.path.dirname(__file__)!r})
import juicer
from test_loader import digest
loader = juicer.Loader({synthetic!r}, **{options!r})
loader.load_state_dict(json.load(open({str(tmp_path / "state.json")!r})))
loader.set_epoch(0)  # what a trainer calls every epoch: the loaded position survives it
print(json.dumps([digest(b) for b in loader]))
"""
    out = run_python(code)
    assert out.returncode == 0, out.stderr
    tail = [tuple((tuple(k), h)) for k, h in json.loads(out.stdout.strip().splitlines()[-1])]
    assert head + tail == whole


def test_state_of_another_seed_is_refused_naming_the_field(synthetic):
    a = juicer.Loader(synthetic, **dict(SMALL, seed=1))
    state = a.state_dict()
    b = juicer.Loader(synthetic, **dict(SMALL, seed=2))
    with pytest.raises(juicer.JuicerError, match="seed 1"):
        b.load_state_dict(state)
    state["cursor"]["index"] = -5
    with pytest.raises(juicer.JuicerError, match="cursor.index"):
        a.load_state_dict(state)


def test_two_ranks_from_the_environment_are_disjoint_and_equal(synthetic):
    code = f"""
import json, juicer
loader = juicer.Loader({synthetic!r}, **{SMALL!r})
keys = [b["keys"] for b in loader]
print(json.dumps({{"rank": loader.rank, "world": loader.world_size, "len": len(loader), "keys": keys}}))
"""
    ranks = []
    for rank in (0, 1):
        out = run_python(code, env={"RANK": str(rank), "WORLD_SIZE": "2"})
        assert out.returncode == 0, out.stderr
        ranks.append(json.loads(out.stdout.strip().splitlines()[-1]))
    assert [(r["rank"], r["world"]) for r in ranks] == [(0, 2), (1, 2)]
    assert len(ranks[0]["keys"]) == len(ranks[1]["keys"]) == ranks[0]["len"] == ranks[1]["len"] > 0
    k0 = {k for b in ranks[0]["keys"] for k in b}
    k1 = {k for b in ranks[1]["keys"] for k in b}
    assert k0 and k1 and not k0 & k1


def test_set_epoch_and_len(synthetic):
    loader = juicer.Loader(synthetic, **dict(SMALL, shuffle_buffer=5, shuffle_shards=True))
    assert len(loader) == 10
    first = [b["keys"] for b in loader]
    loader.set_epoch(0)
    assert [b["keys"] for b in loader] == first
    assert [b["keys"] for b in loader] != first  # epoch 1 shuffles differently
    loader.set_epoch(0)
    assert [b["keys"] for b in loader] == first


def test_bad_option_bad_value_bad_weights_and_a_missing_shard(synthetic, tmp_path):
    with pytest.raises(TypeError, match="bacth_size"):
        juicer.Loader(synthetic, bacth_size=4)
    with pytest.raises(ValueError, match="option `keep_ratio`"):
        juicer.Loader(synthetic, keep_ratio="half")
    with pytest.raises(ValueError, match="(?s)option `classifier`.*lite_weights.py"):
        juicer.Loader(synthetic, classifier="efficientnet-lite0")
    with pytest.raises(ValueError, match="(?s)option `classifier`.*unknown classifier"):
        juicer.Loader(synthetic, classifier="resnet50")
    with pytest.raises(ValueError, match="option `scorer`"):
        juicer.Loader(synthetic, scorer="clip")
    with pytest.raises(ValueError, match="option `batch_size`"):
        juicer.Loader(synthetic, batch_size=0)
    with pytest.raises(juicer.JuicerError, match="keep ratio|keep_ratio"):
        juicer.Loader(synthetic, keep_ratio=1.5, device="cpu")

    # The real weights with one tensor of the wrong shape: the error names the tensor.
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(MOBILENET))
    tensors["features.0.0.weight"] = np.zeros((3, 3), dtype=np.float32)
    weights = tmp_path / "bad.safetensors"
    save_file(tensors, str(weights))
    with pytest.raises(juicer.JuicerError, match="features.0.0.weight"):
        juicer.Loader(synthetic, classifier_weights=str(weights), device="cpu")

    missing = str(tmp_path / "nowhere-000000.tar")
    with pytest.raises(juicer.JuicerError, match="nowhere-000000.tar"):
        list(juicer.Loader([missing], **SMALL))


def test_a_forked_child_raises_instead_of_hanging(synthetic):
    loader = juicer.Loader(synthetic, **SMALL)
    it = iter(loader)
    next(it)
    pid = os.fork()
    if pid == 0:  # the child: building or iterating must raise RuntimeError at once
        code = 0
        try:
            juicer.Loader(synthetic, **SMALL)
            code = 3
        except RuntimeError as e:
            code = 0 if "fork" in str(e) and "num_workers=0" in str(e) else 4
        try:
            next(it)
            code = code or 5
        except RuntimeError:
            pass
        os._exit(code)
    import time

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.05)
    else:
        os.kill(pid, 9)
        pytest.fail("the forked child hung")
    assert os.waitstatus_to_exitcode(status) == 0
    # The parent goes on.
    assert sum(len(b["keys"]) for b in it) == 38 - 4


def test_through_a_torch_dataloader(synthetic):
    from torch.utils.data import DataLoader

    loader = juicer.Loader(synthetic, **SMALL)
    got = [b["keys"] for b in DataLoader(loader, batch_size=None, num_workers=0)]
    assert got == [b["keys"] for b in juicer.Loader(synthetic, **SMALL)]


def test_juice_matches_the_loader_for_the_same_samples():
    options = dict(batch_size=6, image_size=64, device="cpu", limit=6)
    (from_shard,) = list(juicer.Loader(FIXTURE_SHARDS[:1], **options))
    members = {}
    with tarfile.open(FIXTURE_SHARDS[0]) as tar:
        for m in tar.getmembers():
            key, ext = m.name.split(".", 1)
            members.setdefault(key, {})[ext] = tar.extractfile(m).read()
    keys = from_shard["keys"]
    images = [members[k]["webp"] for k in keys] + [b"not an image"]
    captions = [members[k]["txt"].decode() for k in keys] + ["broken"]
    out = juicer.juice(images, captions, keys + ["bad"], image_size=64, device="cpu")
    assert out["keys"] == keys
    assert out["dropped"] == [("bad", "undecodable_image", out["dropped"][0][2])]
    assert out["enriched"] == from_shard["enriched"]
    assert torch.equal(out["patches"], from_shard["patches"])
    assert torch.equal(out["tokens"], from_shard["tokens"])
    with pytest.raises(ValueError, match="2 images but 1 captions"):
        juicer.juice([b"a", b"b"], ["x"])
