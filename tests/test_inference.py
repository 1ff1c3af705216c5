"""Loading a run's workdir (gopher/inference.py): a damaged config.json or corpus manifest
is one ValueError naming the file and the fix, never a KeyError or TypeError traceback,
and a damaged candidate does not hide the run's good tokenizer behind it."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from gopher import inference
from gopher.config import DataConfig, get_preset
from gopher.data.tokenizer import Tokenizer

# Enough distinct words for a 300-piece model beside byte fallback's 256.
TEXT = " ".join("".join(w) for w in itertools.product("abcdefgh", repeat=3)) + "\n"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    return Tokenizer.train([TEXT] * 4, 300, str(path), sample_bytes=20_000)


def _config(model=None, **sections):
    cfg = {"model": model or {"preset": "test"}, "train": {}, "data": {}, "parallel": {}}
    return cfg | sections


@pytest.mark.parametrize(
    "content, says",
    [
        (json.dumps({"train": {}, "data": {}}), "no 'model' section"),
        (json.dumps([1, 2]), "is not a JSON object"),
        (json.dumps(_config(model={"preset": "test", "heads": 3})), "unknown ModelConfig field"),
        (json.dumps(_config(train={"steps": 10, "nonsense": 1})), "unknown TrainConfig field"),
        (json.dumps(_config(data=[1])), "'data'"),
        ("{not json", "is unreadable"),
    ],
)
def test_a_damaged_config_json_is_one_line_naming_the_file(tmp_path, content, says):
    (tmp_path / "config.json").write_text(content)
    with pytest.raises(ValueError) as err:
        inference.read_config(str(tmp_path))
    message = str(err.value)
    assert "\n" not in message
    assert str(tmp_path / "config.json") in message, message
    assert says in message, message
    assert "restore it from the run" in message, message


def test_a_good_config_json_reads(tmp_path):
    # The oracle: what the run wrote, read back field by field.
    cfg = _config(train={"steps": 7}, parallel={"model": 2})
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    model, train, data, parallel = inference.read_config(str(tmp_path))
    assert model == get_preset("test") and train.steps == 7 and parallel.model == 2
    assert data == DataConfig()
    del cfg["parallel"]  # runs recorded before the parallel section still read
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert inference.read_config(str(tmp_path))[3].model == 1


def test_a_damaged_manifest_does_not_hide_the_workdirs_tokenizer(tmp_path, tokenizer):
    workdir, corpus = tmp_path / "run", tmp_path / "corpus"
    workdir.mkdir()
    corpus.mkdir()
    (workdir / "tokenizer.model").write_bytes(Path(tokenizer.path).read_bytes())
    (corpus / "manifest.json").write_text("{damaged")
    data = DataConfig(source="embedded", corpus_dir=str(corpus))
    found = inference.find_tokenizer(str(workdir), get_preset("test"), data, tokenizer.sha256)
    assert found.sha256 == tokenizer.sha256


@pytest.mark.parametrize("manifest", ["{damaged", json.dumps({"files": []})])
def test_no_tokenizer_and_a_damaged_manifest_is_one_line_naming_it(tmp_path, manifest):
    workdir, corpus = tmp_path / "run", tmp_path / "corpus"
    workdir.mkdir()
    corpus.mkdir()
    (corpus / "manifest.json").write_text(manifest)
    data = DataConfig(source="embedded", corpus_dir=str(corpus))
    with pytest.raises(ValueError) as err:
        inference.find_tokenizer(str(workdir), get_preset("test"), data, "ab" * 32)
    message = str(err.value)
    assert "\n" not in message
    assert str(corpus / "manifest.json") in message, message
    assert "rebuild its corpus" in message, message


def test_a_damaged_candidate_does_not_hide_a_good_one_after_it(tmp_path, tokenizer):
    """workdir/tokenizer.model damaged, data.tokenizer_path the run's: the good one is
    found, and with no good one the damaged file is named."""
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    data = DataConfig(tokenizer_path=tokenizer.path)
    found = inference.find_tokenizer(str(workdir), get_preset("test"), data, tokenizer.sha256)
    assert found.sha256 == tokenizer.sha256
    with pytest.raises(ValueError) as err:
        inference.find_tokenizer(str(workdir), get_preset("test"), DataConfig(), tokenizer.sha256)
    assert str(workdir / "tokenizer.model") in str(err.value)
    assert "not a SentencePiece model" in str(err.value)


def test_no_step_restoring_names_each_step_and_a_fix_loading_can_take(tmp_path, monkeypatch):
    """evaluate and sample take no --config.train flags: the message a training run gets
    (restart_from_scratch) is replaced by one naming each step's damage and what to do."""
    from gopher import checkpoint

    (tmp_path / "config.json").write_text(json.dumps(_config()))
    (tmp_path / "checkpoints").mkdir()
    tried = "step 4 (damaged: ValueError: bad chunk); step 2 (damaged: OSError: gone)"

    class NoStepRestores:
        def __init__(self, *args, **kwargs):
            pass

        def restore_latest(self, *args, **kwargs):
            raise checkpoint.RestoreFailed(f"... {checkpoint._RESTART_HINT}", tried=tried)

        def close(self):
            pass

    monkeypatch.setattr(checkpoint, "Checkpointer", NoStepRestores)
    with pytest.raises(ValueError) as err:
        inference.restore_state(str(tmp_path))
    message = str(err.value)
    assert "\n" not in message and "restart_from_scratch" not in message, message
    assert tried in message and str(tmp_path / "checkpoints") in message, message
    assert "nothing was moved" in message and "a good copy" in message, message


def test_a_missing_tokenizer_names_where_it_was_looked_for(tmp_path):
    data = DataConfig(tokenizer_path=str(tmp_path / "elsewhere.model"))
    with pytest.raises(ValueError) as err:
        inference.find_tokenizer(str(tmp_path), get_preset("test"), data, "ab" * 32)
    message = str(err.value)
    assert f"{tmp_path / 'tokenizer.model'} (missing)" in message, message
    assert f"{tmp_path / 'elsewhere.model'} (missing)" in message, message
