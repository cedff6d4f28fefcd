"""The Python package against the engine: logits equal `bitnetc logits` exactly, streaming gives
`generate`'s text, errors carry the engine's message."""

import os
import pathlib
import subprocess

import numpy as np
import pytest

import bitnetc

ROOT = pathlib.Path(__file__).resolve().parents[3]
TINY = ROOT / "tests" / "fixtures" / "tiny" / "bitnetcpp-tiny-i2_s.gguf"


def cli():
    """The `bitnetc` binary: BITNETC_BIN, else the workspace's debug or release build."""
    for p in [os.environ.get("BITNETC_BIN"), ROOT / "target/debug/bitnetc", ROOT / "target/release/bitnetc"]:
        if p and pathlib.Path(p).exists():
            return str(p)
    pytest.fail("no bitnetc binary: build it (cargo build) or set BITNETC_BIN")


@pytest.fixture(scope="module")
def model():
    return bitnetc.Model(TINY, threads=2, context=64)


def test_logits_equal_the_cli_exactly(model, tmp_path):
    ids = [0, 370, 1768, 318, 76, 291, 83, 1486]
    out = tmp_path / "logits.npy"
    subprocess.run(
        [cli(), "logits", "-m", str(TINY), "--tokens", " ".join(map(str, ids)), "-o", str(out), "-t", "2"],
        check=True,
        capture_output=True,
    )
    ours = model.logits(ids)
    theirs = np.load(out)
    assert ours.dtype == np.float32 and ours.shape == (8, 2048)
    assert np.array_equal(ours, theirs)


def test_streaming_yields_the_text_of_generate(model):
    whole = model.generate("Once upon a time", max_tokens=12, temperature=0)
    pieces = list(model.stream("Once upon a time", max_tokens=12, temperature=0))
    assert len(pieces) > 1
    assert "".join(pieces) == whole
    # A seeded sample is reproducible.
    a = model.generate("Once upon a time", max_tokens=12, temperature=1.0, seed=7)
    assert a == model.generate("Once upon a time", max_tokens=12, temperature=1.0, seed=7)


def test_tokens_round_trip_and_metrics(model):
    ids = model.tokenize("Hello, world!", add_special=False)
    assert model.detokenize(ids) == "Hello, world!"
    m = model.metrics
    assert m["vocab_size"] == 2048 and m["context"] == 64 and m["weight_bytes"] > 0


def test_errors_carry_the_engine_message(model, tmp_path):
    with pytest.raises(bitnetc.BitnetcError, match="no/such/model.gguf"):
        bitnetc.Model("no/such/model.gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 8)
    with pytest.raises(bitnetc.BitnetcError, match="bad.gguf"):
        bitnetc.Model(bad)
    with pytest.raises(bitnetc.BitnetcError, match="not in the vocabulary"):
        model.detokenize([99999])
    with pytest.raises(bitnetc.BitnetcError, match="context"):
        model.logits(list(range(100)))
