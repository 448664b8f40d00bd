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
    data.wikitext2.cache_clear()
    yield tmp_path
    data.wikitext2.cache_clear()


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
    data.wikitext2.cache_clear()

    def unreachable(split):
        raise ConnectionError("no route to huggingface.co")

    monkeypatch.setattr(data, "_hub", unreachable)
    with pytest.raises(RuntimeError, match=r"Hub is unreachable.*LABKIT_DATA_DIR is not set"):
        data.wikitext2("test")
    data.wikitext2.cache_clear()


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
    data.wikitext2.cache_clear()
    t = data.wikitext2("test")
    assert t.source.startswith("local:") and 1_200_000 < len(t.text) < 1_400_000
    assert t.text.startswith(" = Robert Boulter = ")
