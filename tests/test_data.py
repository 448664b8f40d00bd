import shutil
import sys
import types

import pytest
import torch

from labkit import data


@pytest.fixture
def local_copy(tmp_path, monkeypatch):
    (tmp_path / "wikitext-2-raw").mkdir()
    (tmp_path / "wikitext-2").mkdir()
    (tmp_path / "wikitext-2-raw" / "wiki.test.raw").write_bytes(
        b" = Title = \r\n Some text here .\r\n\r\n More text .\r\n"
    )
    (tmp_path / "wikitext-2" / "valid.txt").write_text(" = V = \n\n " + "valid words go here . " * 200 + "\n")
    monkeypatch.setenv("LABKIT_DATA_DIR", str(tmp_path))
    monkeypatch.setattr(data, "KNOWN_COPIES", {})  # a hand-made copy: no size or hash to match
    monkeypatch.setattr(data, "MIN_CHARS", 10)
    data.clear_cache()
    yield tmp_path
    data.clear_cache()


def test_local_test_split_joins_lines_with_blank_lines(local_copy):
    t = data.wikitext2("test")
    assert t.text == " = Title = \n\n Some text here .\n\n More text ."
    assert t.source == f"local:{local_copy / 'wikitext-2-raw' / 'wiki.test.raw'}"


def test_missing_local_file_names_the_file(local_copy):
    (local_copy / "wikitext-2" / "valid.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"wikitext-2/valid.txt.*LABKIT_DATA_DIR"):
        data.wikitext2("validation")


def test_offline_without_data_dir_names_both_sources(monkeypatch):
    monkeypatch.delenv("LABKIT_DATA_DIR", raising=False)
    data.clear_cache()

    def unreachable(split):
        raise ConnectionError("no route to huggingface.co")

    monkeypatch.setattr(data, "_hub", unreachable)
    with pytest.raises(RuntimeError, match=r"Hub is unreachable.*LABKIT_DATA_DIR is not set"):
        data.wikitext2("test")
    data.clear_cache()


def test_bad_split():
    with pytest.raises(ValueError, match=r"split='train'.*\('test', 'validation'\)"):
        data.wikitext2("train")


def test_calibration_windows_are_seeded_slices_of_validation(local_copy, tiny_tokenizer):
    tok = tiny_tokenizer
    stream = data.tokens(tok, "validation")[0]
    a = data.calibration(tok, 5, 64, seed=0)
    assert a.shape == (5, 64) and a.dtype == torch.long
    assert torch.equal(a, data.calibration(tok, 5, 64, seed=0))  # deterministic
    assert not torch.equal(a, data.calibration(tok, 5, 64, seed=1))
    for row in a:  # every sample is a contiguous window of the validation stream
        starts = (stream.unfold(0, 64, 1) == row).all(1).nonzero()
        assert len(starts) >= 1


def test_calibration_bad_arguments(local_copy, tiny_tokenizer):
    tok = tiny_tokenizer
    with pytest.raises(ValueError, match="n_samples=0"):
        data.calibration(tok, 0, 64)
    with pytest.raises(ValueError, match="seqlen=1"):
        data.calibration(tok, 2, 1)
    with pytest.raises(ValueError, match="longer than the validation split"):
        data.calibration(tok, 2, 10**7)


def test_offline_copy_in_ci_matches_its_readme(data_dir):
    """The shared copy is the raw test split: ~1.29 M characters of Wikipedia text."""
    data.clear_cache()
    t = data.wikitext2("test")
    assert t.source.startswith("local:") and 1_200_000 < len(t.text) < 1_400_000
    assert t.text.startswith(" = Robert Boulter = ")


@pytest.fixture
def copied_data(tmp_path, monkeypatch, data_dir):
    """A copy of the course's data folder in tmp_path, read through LABKIT_DATA_DIR."""
    shutil.copytree(data_dir / "wikitext-2-raw", tmp_path / "wikitext-2-raw")
    monkeypatch.setenv("LABKIT_DATA_DIR", str(tmp_path))
    data.clear_cache()
    yield tmp_path
    data.clear_cache()


def test_truncated_local_copy_is_refused(copied_data):
    path = copied_data / "wikitext-2-raw" / "wiki.test.raw"
    path.write_bytes(path.read_bytes()[:20_000])
    with pytest.raises(
        ValueError, match=r"wiki\.test\.raw is not the WikiText-2 copy.*expected 1,290,547 bytes.*20,000"
    ):
        data.wikitext2("test")


def test_edited_local_copy_of_the_right_size_is_refused(copied_data):
    path = copied_data / "wikitext-2-raw" / "wiki.test.raw"
    raw = bytearray(path.read_bytes())
    raw[1000] ^= 1
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"wiki\.test\.raw.*sha256 4f3e427e.*found 1,290,547 bytes with sha256"):
        data.wikitext2("test")


def test_intact_copy_is_hashed_once_per_process(copied_data):
    data._sha256.cache_clear()
    assert data.wikitext2("test").source.startswith("local:")
    data.clear_cache()
    data.wikitext2("test")
    info = data._sha256.cache_info()
    assert (info.misses, info.hits) == (1, 1)


def test_short_hub_text_is_refused(monkeypatch):
    monkeypatch.delenv("LABKIT_DATA_DIR", raising=False)
    fake = types.ModuleType("datasets")
    fake.load_dataset = lambda *args, split: {"text": [" = Title = ", " a few words ."]}
    monkeypatch.setitem(sys.modules, "datasets", fake)
    with pytest.raises(ValueError, match=r"Hub's WikiText-2 'test' split.*has 27 characters.*over 1,000,000"):
        data._hub("test")


def test_unlisted_local_copy_needs_a_minimum_length(local_copy, monkeypatch):
    monkeypatch.setattr(data, "MIN_CHARS", 1000)
    with pytest.raises(ValueError, match=r"wiki\.test\.raw has 44 characters"):
        data.wikitext2("test")
