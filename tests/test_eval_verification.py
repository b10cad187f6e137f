"""`.bin` loading (Python-2 pickles, bytes and uint8-array encodings), embedders, the
10-fold protocol end to end with an ONNX model whose embedding is a known function of
the identity, and `fr-trainer verify`."""

from __future__ import annotations

import json
import pickle
import struct

import numpy as np
import pytest
import torch

from fr_trainer.eval.binset import encode_image, load_bin, read_bin_pickle, write_bin
from fr_trainer.eval.cli import verify_main
from fr_trainer.eval.embedder import (
    OnnxEmbedder,
    TorchEmbedder,
    embed_images,
    load_embedder,
    normalize_images,
    shard_slice,
)
from fr_trainer.eval.synthetic import export_onnx_simple, gray_code_net, gray_image
from fr_trainer.eval.verification import embed_shard, evaluate_embeddings, verify_bin

pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

NUM_IDS = 12


def python2_pickle(bins: list[bytes], issame: list[bool]) -> bytes:
    """What Python 2's cPickle.dump((bins, issame), f, protocol=2) writes: py2 `str`
    objects are BINSTRING / SHORT_BINSTRING opcodes (Python 3 never writes those)."""
    out = bytearray(b"\x80\x02")  # PROTO 2
    out += b"]("  # EMPTY_LIST, MARK
    for data in bins:
        if len(data) < 256:
            out += b"U" + bytes([len(data)]) + data  # SHORT_BINSTRING
        else:
            out += b"T" + struct.pack("<i", len(data)) + data  # BINSTRING
    out += b"e"  # APPENDS
    out += b"]("
    for flag in issame:
        out += b"\x88" if flag else b"\x89"  # NEWTRUE / NEWFALSE
    out += b"e"
    out += b"\x86."  # TUPLE2, STOP
    return bytes(out)


def pair_plan(num_pairs: int = 200, flips_per_fold: int = 2, seed: int = 0):
    """Pairs in 10 folds of 20: 10 same, 10 different per fold; in each fold
    `flips_per_fold` different pairs are labelled "same" (label noise)."""
    rng = np.random.default_rng(seed)
    ids, issame, truly_same = [], [], []
    fold = num_pairs // 10
    for i in range(num_pairs):
        same = i % 2 == 0
        a = int(rng.integers(0, NUM_IDS))
        b = a if same else int((a + rng.integers(1, NUM_IDS)) % NUM_IDS)
        ids += [a, b]
        flipped = (not same) and (i % fold) in (1, 3, 5, 7, 9)[:flips_per_fold]
        issame.append(same or flipped)
        truly_same.append(same)
    images = np.stack([gray_image(k) for k in ids])
    return images, np.array(issame), np.array(truly_same)


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "graycode.onnx"
    return export_onnx_simple(gray_code_net(NUM_IDS), path)


def test_python2_pickle_and_both_encodings_decode_the_same(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 112, 112, 3), dtype=np.uint8)
    issame = [True, False, True]
    pngs = [encode_image(im, "PNG") for im in images]
    py2 = tmp_path / "py2.bin"
    py2.write_bytes(python2_pickle(pngs, issame))
    with pytest.raises(UnicodeDecodeError):  # proves the file really needs encoding="bytes"
        pickle.loads(py2.read_bytes())
    arrays = write_bin(tmp_path / "arr.bin", images, issame, encoding="array", fmt="PNG")
    raw = write_bin(tmp_path / "raw.bin", images, issame, encoding="bytes", fmt="PNG")
    for path in (py2, arrays, raw):
        loaded = load_bin(path)
        np.testing.assert_array_equal(loaded.images, images)
        np.testing.assert_array_equal(loaded.issame, issame)
        assert loaded.num_pairs == 3
    bins, _ = read_bin_pickle(arrays)
    assert isinstance(bins[0], np.ndarray) and bins[0].dtype == np.uint8


def test_jpeg_and_resize(tmp_path):
    small = np.full((4, 96, 96, 3), 128, dtype=np.uint8)
    path = write_bin(tmp_path / "j.bin", small, [True, False], fmt="JPEG")
    loaded = load_bin(path)
    assert loaded.images.shape == (4, 112, 112, 3)
    assert np.abs(loaded.images.astype(int) - 128).max() <= 2


def test_bad_bin_files_name_the_file_and_what_was_expected(tmp_path):
    pngs = [encode_image(gray_image(0), "PNG")] * 5
    path = tmp_path / "odd.bin"
    with open(path, "wb") as f:
        pickle.dump((pngs, [True, False, True]), f)
    with pytest.raises(ValueError, match=r"odd\.bin.*5 images and 3 pair labels.*\(6 images\)"):
        load_bin(path)
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match=r"garbage\.bin.*pickle"):
        load_bin(garbage)
    wrong = tmp_path / "wrong.bin"
    wrong.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(ValueError, match=r"wrong\.bin.*\(bins, issame_list\)"):
        load_bin(wrong)
    broken = tmp_path / "broken.bin"
    broken.write_bytes(pickle.dumps(([b"xx", b"yy"], [True])))
    with pytest.raises(ValueError, match=r"broken\.bin: image 0"):
        load_bin(broken)
    with pytest.raises(FileNotFoundError, match="missing.bin"):
        load_bin(tmp_path / "missing.bin")


def test_known_identity_function_gives_expected_accuracy(tmp_path, onnx_model):
    images, issame, _ = pair_plan()
    path = write_bin(tmp_path / "synthetic.bin", images, issame, fmt="PNG")
    embedder = OnnxEmbedder(onnx_model, batch_size=64)
    assert embedder.providers[-1] == "CPUExecutionProvider"
    result = verify_bin(embedder, path, batch_size=32)
    # Same identity -> distance 0, different -> 2; 2 of the 20 pairs of every fold are
    # mislabelled "same": the best threshold separates 0 from 2, every fold scores 18/20.
    assert result["accuracy"] == pytest.approx(0.9)
    assert result["accuracy_std"] == pytest.approx(0.0, abs=1e-12)
    assert result["fold_accuracies"] == pytest.approx([0.9] * 10)
    assert result["thresholds"] == pytest.approx([1.0] * 10, abs=1e-5)
    # genuine labels: 100 true + 20 mislabelled (cosine 0, like the 80 impostors):
    # no impostor may pass, so TAR = 100 / 120 at both FARs.
    assert result["tar_at_far"] == pytest.approx({1e-3: 100 / 120, 1e-4: 100 / 120})
    assert result["num_pairs"] == 200


def test_onnx_and_torch_embedders_agree_and_flip_adds(onnx_model):
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (5, 112, 112, 3), dtype=np.uint8)
    module = gray_code_net(NUM_IDS)
    onnx_out = embed_images(OnnxEmbedder(onnx_model), images, batch_size=2)
    torch_out = embed_images(TorchEmbedder(module), images, batch_size=3)
    np.testing.assert_allclose(onnx_out, torch_out, atol=1e-5)
    batch = torch.from_numpy(normalize_images(images))
    with torch.no_grad():
        expected = module(batch) + module(torch.flip(batch, dims=[3]))
    np.testing.assert_allclose(torch_out, expected.numpy(), atol=1e-6)
    no_flip = embed_images(TorchEmbedder(module), images, flip=False)
    np.testing.assert_allclose(no_flip, module(batch).detach().numpy(), atol=1e-6)


def test_normalisation_convention():
    images = np.array([[[[0, 255, 127]]]], dtype=np.uint8)  # [1,1,1,3]
    batch = normalize_images(images)
    assert batch.shape == (1, 3, 1, 1)
    np.testing.assert_allclose(batch.reshape(-1), [-1.0, 1.0, (127 / 255 - 0.5) / 0.5], atol=1e-6)


def test_onnx_with_wrong_input_shape_is_rejected(tmp_path):
    path = tmp_path / "small_input.onnx"
    torch.onnx.export(
        torch.nn.Flatten().eval(),
        (torch.zeros(1, 3, 64, 64),),
        str(path),
        input_names=["x"],
        dynamo=False,
    )
    with pytest.raises(ValueError, match=r"small_input\.onnx.*\[1, 3, 64, 64\].*\[N,3,112,112\]"):
        OnnxEmbedder(path)


def test_fixed_batch_onnx_is_padded(tmp_path):
    path = tmp_path / "fixed.onnx"
    torch.onnx.export(
        gray_code_net(NUM_IDS), (torch.zeros(4, 3, 112, 112),), str(path), dynamo=False
    )
    embedder = OnnxEmbedder(path, batch_size=100)
    assert embedder.batch_size == 4
    images = np.stack([gray_image(k) for k in range(7)])
    out = embed_images(embedder, images, batch_size=7, flip=False)
    assert out.shape == (7, NUM_IDS)
    np.testing.assert_allclose(out.argmax(1), np.arange(7))


def test_load_embedder_seam(tmp_path, onnx_model):
    assert isinstance(load_embedder(onnx_model), OnnxEmbedder)
    with pytest.raises(FileNotFoundError, match="nope.onnx"):
        load_embedder(tmp_path / "nope.onnx")
    ckpt = tmp_path / "model.pt"
    ckpt.write_bytes(b"")
    try:
        import fr_trainer.train.checkpoint  # noqa: F401
    except ImportError:
        with pytest.raises(NotImplementedError, match=r"model\.pt.*load_backbone"):
            load_embedder(ckpt)


def test_sharded_embedding_gathers_to_the_whole(onnx_model):
    images, issame, _ = pair_plan(num_pairs=50)
    embedder = OnnxEmbedder(onnx_model)
    whole = embed_images(embedder, images, batch_size=16)
    for world in (1, 3, 4):
        slices = [shard_slice(len(images), r, world) for r in range(world)]
        assert sum(s.stop - s.start for s in slices) == len(images)
        gathered = np.concatenate(
            [embed_images(embedder, images[s], batch_size=16) for s in slices]
        )
        np.testing.assert_allclose(gathered, whole, atol=1e-6)
    parts = [embed_shard(embedder, images, r, 3, batch_size=8) for r in range(3)]
    np.testing.assert_allclose(np.concatenate(parts), whole, atol=1e-6)
    result = evaluate_embeddings(whole, issame, nfolds=5)
    assert result["num_pairs"] == 50
    with pytest.raises(ValueError, match="out of|outside"):
        shard_slice(10, 3, 3)


def test_verify_cli(tmp_path, onnx_model, capsys):
    images, issame, _ = pair_plan()
    a = write_bin(tmp_path / "a.bin", images, issame, fmt="PNG")
    b = write_bin(tmp_path / "b.bin", images[:100], issame[:50], encoding="array", fmt="PNG")
    out = tmp_path / "res.json"
    code = verify_main([str(onnx_model), "--bin", str(a), str(b), "--json", str(out), "--quiet"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "a: accuracy 90.00" in printed and "[max]" in printed
    results = json.loads(out.read_text())["results"]
    assert [r["name"] for r in results] == ["a", "b"]
    assert results[0]["accuracy"] == pytest.approx(0.9)
    code = verify_main([str(onnx_model), "--bin", str(tmp_path / "absent.bin"), "--quiet"])
    assert code == 2
    assert "absent.bin" in capsys.readouterr().err
