"""`.bin` sets never run code: the restricted unpickler refuses crafted files (the payload is
proven live with plain pickle first), every genuine encoding still loads, and training opens
only the sets eval.bins names."""

from __future__ import annotations

import builtins
import io
import os
import pickle
import struct

import numpy as np
import pytest
from test_train_support import config_dict, make_trainer

from fr_trainer.eval.binset import encode_image, load_bin, read_bin_pickle
from fr_trainer.train.config import ConfigError
from fr_trainer.train.periodic_eval import PeriodicVerifier, find_bins


def python2_pickle(bins: list[bytes], issame: list[bool]) -> bytes:
    """What Python 2's cPickle.dump((bins, issame), f, protocol=2) writes (py2 `str` images)."""
    out = bytearray(b"\x80\x02](")  # PROTO 2, EMPTY_LIST, MARK
    for data in bins:
        out += b"T" + struct.pack("<i", len(data)) + data  # BINSTRING
    out += b"e](" + b"".join(b"\x88" if flag else b"\x89" for flag in issame) + b"e\x86."
    return bytes(out)


class _CreatesFile:
    """Unpickling this calls `function(*args)`, which creates a file."""

    def __init__(self, function, *args) -> None:
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


def _crafted(path, marker, how: str) -> None:
    payload = (
        _CreatesFile(os.system, f"touch {marker}")
        if how == "system"
        else _CreatesFile(builtins.open, str(marker), "w")
    )
    path.write_bytes(pickle.dumps(([payload, b"x"], [True]), protocol=2))


@pytest.mark.parametrize("how", ["system", "open"])
def test_crafted_bin_is_refused_and_runs_nothing(tmp_path, how) -> None:
    live, marker = tmp_path / "live_marker", tmp_path / "marker"
    _crafted(tmp_path / "live.bin", live, how)
    pickle.loads((tmp_path / "live.bin").read_bytes())  # plain pickle runs it: the payload is live
    assert live.exists()
    crafted = tmp_path / "lfw.bin"
    _crafted(crafted, marker, how)
    function = os.system if how == "system" else builtins.open
    name = f"{function.__module__}.{function.__name__}"  # posix.system, io.open
    with pytest.raises(ValueError, match=rf"lfw\.bin: refused to load: it asks for {name}.*nothing in it was run"):
        load_bin(crafted)
    assert not marker.exists()


def test_every_genuine_encoding_still_loads(tmp_path) -> None:
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (4, 112, 112, 3), dtype=np.uint8)
    pngs = [encode_image(image, "PNG") for image in images]
    arrays = [np.frombuffer(data, dtype=np.uint8) for data in pngs]
    cases = {"py2.bin": python2_pickle(pngs, [True, False])}
    for protocol in (2, 4, 5):
        cases[f"arrays{protocol}.bin"] = pickle.dumps((arrays, np.array([True, False])), protocol=protocol)
        cases[f"scalars{protocol}.bin"] = pickle.dumps((pngs, [np.bool_(True), np.bool_(False)]), protocol=protocol)
    # numpy < 2 spelled its reconstructor numpy.core.multiarray (protocol 2 names it in text)
    old = pickle.dumps((arrays, np.array([True, False])), protocol=2).replace(b"numpy._core", b"numpy.core")
    assert b"numpy.core.multiarray" in old
    cases["numpy1.bin"] = old
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        loaded = load_bin(tmp_path / name)
        np.testing.assert_array_equal(loaded.images, images, err_msg=name)
        assert loaded.issame.tolist() == [True, False], name
    bins, _ = read_bin_pickle(tmp_path / "arrays5.bin")
    assert isinstance(bins[0], np.ndarray) and bins[0].dtype == np.uint8


def test_pickled_object_arrays_are_refused(tmp_path) -> None:
    """An object array pickles its items: a crafted item inside is refused too."""
    marker = tmp_path / "marker"
    items = np.empty(2, dtype=object)
    items[0], items[1] = _CreatesFile(builtins.open, str(marker), "w"), b"x"
    buffer = io.BytesIO()
    pickle.dump((items, [True]), buffer, protocol=4)
    (tmp_path / "obj.bin").write_bytes(buffer.getvalue())
    with pytest.raises(ValueError, match="refused to load"):
        load_bin(tmp_path / "obj.bin")
    assert not marker.exists()


def test_find_bins_names_only(tmp_path) -> None:
    marker = tmp_path / "marker"
    _crafted(tmp_path / "evil.bin", marker, "open")
    png = encode_image(np.zeros((112, 112, 3), np.uint8), "PNG")
    (tmp_path / "lfw.bin").write_bytes(python2_pickle([png, png], [True]))
    assert find_bins(tmp_path, []) == []
    assert find_bins(tmp_path, ["lfw", "evil.bin"]) == [tmp_path / "lfw.bin", tmp_path / "evil.bin"]
    with pytest.raises(ConfigError, match=r"eval.bins names 'cfp_fp' but .*cfp_fp\.bin does not exist.*evil, lfw"):
        find_bins(tmp_path, ["cfp_fp"])
    with pytest.raises(ConfigError, match=r"eval.bins entry '\*' is not a set name"):
        find_bins(tmp_path, ["*"])
    with pytest.raises(ConfigError, match=r"eval.bins: .*evil\.bin: refused to load.*remove 'evil' from eval.bins"):
        PeriodicVerifier(find_bins(tmp_path, ["lfw", "evil"]), 8, 0, 1)
    assert not marker.exists()


def test_training_opens_only_the_named_sets(tmp_path, pairs_data) -> None:
    data = tmp_path / "data"
    data.mkdir()
    for name in ("train.rec", "train.idx", "synth_val.bin"):
        (data / name).symlink_to(pairs_data / name)
    marker = tmp_path / "marker"
    _crafted(data / "planted.bin", marker, "system")
    cfg = config_dict(data, tmp_path / "out", train={"max_steps": 1}, eval={"every_steps": 0, "at_end": True})
    trainer = make_trainer(0, 1, cfg)  # eval.bins left at its default: no set
    assert trainer.verifier is None
    trainer.fit()
    named = config_dict(data, tmp_path / "named", train={"max_steps": 1},
                        eval={"every_steps": 0, "at_end": True, "bins": ["synth_val"]})
    summary = make_trainer(0, 1, named).fit()
    assert set(summary["verification"]) == {"synth_val"}
    with pytest.raises(ConfigError, match=r"eval.bins: .*planted\.bin: refused to load"):
        make_trainer(0, 1, {**named, "eval": {**named["eval"], "bins": ["planted"]}})
    assert not marker.exists()


def test_verify_command_refuses_a_crafted_bin(tmp_path, capsys, pairs_data) -> None:
    """The issue's case: `fr-trainer verify MODEL --bin crafted.bin` ran the payload."""
    from fr_trainer.eval.cli import verify_main

    make_trainer(0, 1, config_dict(pairs_data, tmp_path / "out", train={"max_steps": 1})).fit()
    marker = tmp_path / "marker"
    _crafted(tmp_path / "crafted.bin", marker, "system")
    code = verify_main([str(tmp_path / "out" / "t"), "--bin", str(tmp_path / "crafted.bin"), "--quiet"])
    assert code == 2  # bad input
    assert "crafted.bin: refused to load: it asks for posix.system" in capsys.readouterr().err
    assert not marker.exists()


def test_demo_configs_name_the_sets_synth_writes() -> None:
    """eval.bins no longer defaults to every .bin: the demo configs (main job, loss
    comparison) must name the synthetic sets, or they would silently verify nothing."""
    from pathlib import Path

    from fr_trainer.data.synthetic import DEFAULT_VAL_SETS
    from fr_trainer.train.config import load_config

    configs = Path(__file__).resolve().parents[1] / "configs"
    demos = sorted([configs / "demo.toml", *configs.glob("losses/*_demo.toml")])
    assert len(demos) > 1
    for path in demos:
        assert load_config(path).eval.bins == [name for name, _ in DEFAULT_VAL_SETS], path
