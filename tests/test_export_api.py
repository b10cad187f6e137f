"""export_onnx's own parity check, report, failure modes, wrong-shape models, fp16, the
missing-extra error, and the `fr-trainer export` command."""

from __future__ import annotations

import json
import sys
import types
import warnings

import pytest
import torch
from torch import nn

from fr_trainer.backbones import TwoHeadBackbone, create_backbone
from fr_trainer.export import (
    OnnxModelError,
    ParityError,
    check_onnx_model,
    export_onnx,
    export_onnx_with_report,
    load_onnx_session,
    random_face_batch,
)
from fr_trainer.export.cli import main as export_main


@pytest.fixture(scope="module")
def mbf() -> nn.Module:
    torch.manual_seed(0)
    model = create_backbone("mobilefacenet", embedding_size=128)
    with torch.no_grad():  # a few train-mode batches: realistic running statistics
        for seed in range(2):
            model(random_face_batch(8, seed=100 + seed))
    return model


def test_report_matches_an_independent_comparison_and_restores_the_model(mbf, tmp_path):
    mbf.train()
    wrapped = TwoHeadBackbone(mbf, second_dim=32)  # exports the embedding head only
    report = export_onnx_with_report(wrapped, tmp_path / "m.onnx", latency_runs=2)
    assert mbf.training, "export must leave the model's mode as it was"
    assert report.passed and report.checked and sorted(report.parity) == [1, 7]
    assert report.embedding_size == 128 and report.model == "mobilefacenet"
    assert report.size_bytes == (tmp_path / "m.onnx").stat().st_size
    assert set(report.latency_ms) == {1, 7} and all(v > 0 for v in report.latency_ms.values())
    assert report.tolerance == 1e-4 and "parity batch 7" in report.summary()
    json.dumps(report.to_dict())

    session, _ = load_onnx_session(tmp_path / "m.onnx")
    x = random_face_batch(7, seed=0)  # the library's default check inputs
    mbf.eval()
    with torch.no_grad():
        ref = mbf(x).double()
    got = torch.from_numpy(session.run(None, {"input": x.numpy()})[0]).double()
    diff = (got - ref).abs().max().item()
    assert diff == pytest.approx(report.parity[7].max_abs_diff, rel=1e-6, abs=1e-12)
    mbf.train()


def test_export_returns_path_and_copies_non_fp32_models(mbf, tmp_path):
    model = create_backbone("mobilefacenet", embedding_size=32).double().eval()
    out = export_onnx(model, tmp_path / "d.onnx", latency_runs=0)
    assert out == tmp_path / "d.onnx" and out.is_file()
    assert next(model.parameters()).dtype == torch.float64


def test_fp16_weights_halve_the_file_and_keep_fp32_io(mbf, tmp_path):
    report = export_onnx_with_report(mbf, tmp_path / "h.onnx", fp16=True, latency_runs=0)
    assert report.passed and report.tolerance == 2e-2
    assert report.size_bytes < 2.4 * report.num_parameters  # ~2 bytes per parameter
    info = check_onnx_model(tmp_path / "h.onnx")  # input is still float32
    assert info.embedding_size == 128


class Drifting(nn.Module):
    """Python-side state the tracer freezes: torch and the exported graph disagree."""

    num_features = 4

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=16)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return torch.flatten(self.conv(x).mean((2, 3)), 1) * self.calls


def test_parity_failure_raises_and_keeps_no_output_file(tmp_path):
    out = tmp_path / "bad.onnx"
    with pytest.raises(ParityError, match=r"does not match torch.*bad\.onnx\.rejected"):
        export_onnx(Drifting(), out, latency_runs=0)
    assert not out.exists() and (tmp_path / "bad.onnx.rejected").is_file()


def _export_plain(module: nn.Module, shape, path, outputs=("embedding",)):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the legacy exporter, on purpose
        torch.onnx.export(module, (torch.zeros(shape),), str(path), input_names=["input"],
                          output_names=list(outputs), opset_version=17, dynamo=False)


class Tiny(nn.Module):
    def forward(self, x):
        return torch.flatten(x.mean((2, 3)), 1)


def test_wrong_input_shape_is_a_clear_error_naming_the_file(tmp_path):
    path = tmp_path / "small.onnx"
    _export_plain(Tiny(), (1, 3, 96, 96), path)
    for check in (check_onnx_model, lambda p: load_onnx_session(p)):
        with pytest.raises(OnnxModelError) as error:
            check(path)
        msg = str(error.value)
        assert str(path) in msg and "[1, 3, 96, 96]" in msg and "[N, 3, 112, 112]" in msg

    nhwc = tmp_path / "nhwc.onnx"
    _export_plain(Tiny(), (1, 112, 112, 3), nhwc)
    with pytest.raises(OnnxModelError, match="NHWC"):
        check_onnx_model(nhwc)


def test_other_bad_models(tmp_path):
    class TwoOut(nn.Module):
        def forward(self, x):
            return x.mean((2, 3)), x.amax((2, 3))

    two = tmp_path / "two.onnx"
    _export_plain(TwoOut(), (1, 3, 112, 112), two, outputs=("a", "b"))
    with pytest.raises(OnnxModelError, match="2 outputs"):
        check_onnx_model(two)
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    with pytest.raises(OnnxModelError, match="junk.onnx"):
        check_onnx_model(junk)
    with pytest.raises(FileNotFoundError, match="missing.onnx"):
        check_onnx_model(tmp_path / "missing.onnx")


def test_missing_extra_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ImportError, match=r"pip install 'fr_trainer\[onnx\]'"):
        export_onnx(Tiny(), tmp_path / "x.onnx")


# -- the command ----------------------------------------------------------------------

def test_cli_backbone_and_weights(mbf, tmp_path, capsys):
    weights = tmp_path / "sd.pt"
    torch.save({"state_dict": {"module." + k: v for k, v in mbf.state_dict().items()}}, weights)
    out = tmp_path / "cli.onnx"
    report = tmp_path / "r.json"
    rc = export_main(["--backbone", "mobilefacenet", "--weights", str(weights), str(out),
                      "--latency-runs", "1", "--json", str(report)])
    assert rc == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "parity batch 7" in printed and "latency batch 1" in printed
    assert json.loads(report.read_text())["passed"] is True
    session, info = load_onnx_session(out)
    assert info.embedding_size == 128  # read from the weights
    x = random_face_batch(2, seed=5)
    mbf.eval()
    with torch.no_grad():
        ref = mbf(x)
    mbf.train()
    got = torch.from_numpy(session.run(None, {"input": x.numpy()})[0])
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_cli_errors(tmp_path, capsys, monkeypatch):
    from fr_trainer.cli import main as dispatcher

    missing = tmp_path / "nope.pt"
    assert dispatcher(["export", str(missing), str(tmp_path / "o.onnx")]) == 2
    assert f"checkpoint {missing} does not exist" in capsys.readouterr().err
    assert export_main(["--backbone", "iresnet18", "--weights", str(missing), "o.onnx"]) == 2
    assert str(missing) in capsys.readouterr().err

    bad = tmp_path / "bad.pt"
    torch.save({"conv1.weight": torch.zeros(1)}, bad)
    assert export_main(["--backbone", "iresnet18", str(bad), str(tmp_path / "o.onnx")]) == 2
    err = capsys.readouterr().err
    assert "does not fit backbone 'iresnet18'" in err and "missing: " in err and "wrong shape" in err

    # without --backbone the file must be a training checkpoint (or a run directory)
    assert export_main([str(bad), str(tmp_path / "o.onnx")]) == 2
    assert f"{bad} holds no backbone recipe" in capsys.readouterr().err
    assert export_main([str(tmp_path), str(tmp_path / "o.onnx")]) == 2
    assert f"no complete checkpoint at {tmp_path}" in capsys.readouterr().err
    assert export_main(["only-one-path.onnx"]) == 2


def test_cli_uses_the_trainer_checkpoint_loader_when_present(tmp_path, monkeypatch, capsys):
    ckpt = tmp_path / "step_100.pt"
    ckpt.write_bytes(b"opaque to the exporter")
    seen = []

    def load_backbone(path):
        seen.append(path)
        return create_backbone("mobilefacenet", embedding_size=16), {"step": 100}

    fake = types.ModuleType("fr_trainer.train.checkpoint")
    fake.load_backbone = load_backbone
    monkeypatch.setitem(sys.modules, "fr_trainer.train.checkpoint", fake)
    out = tmp_path / "ck.onnx"
    rc = export_main([str(ckpt), str(out), "--latency-runs", "0", "--batch-sizes", "2"])
    assert rc == 0, capsys.readouterr().err
    assert seen == [ckpt] and check_onnx_model(out).embedding_size == 16
