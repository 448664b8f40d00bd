"""WikiText-2 text for evaluation and calibration.

Source order: if the environment variable LABKIT_DATA_DIR is set, read the files there (no
network); otherwise read the Hugging Face Hub through `datasets` ('wikitext',
'wikitext-2-raw-v1'). The two copies differ slightly (the local raw test file dropped the
blank lines), so every result records which source produced it.
"""

from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch

SPLITS = ("test", "validation")
# Files under LABKIT_DATA_DIR: the raw test split, and the tokenized validation split (the raw
# validation split is not shipped offline; calibration only needs plausible text).
LOCAL_FILES = {"test": "wikitext-2-raw/wiki.test.raw", "validation": "wikitext-2/valid.txt"}
# The copies this course ships (listed in the data folder's README): path -> (bytes, sha256). A
# truncated or edited copy would give a perplexity over fewer or other windows without a word.
KNOWN_COPIES = {
    "wikitext-2-raw/wiki.test.raw": (1_290_547, "4f3e427e4aff23acff917a8a51aeae21bf12832256e26914c8fc250dcef4103c"),
    "wikitext-2/valid.txt": (1_121_681, "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8"),
    "wikitext-2/test.txt": (1_256_449, "d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0"),
}
# Any other copy (the Hub's) must hold at least this many characters: both splits have 1.1-1.3 million.
MIN_CHARS = 1_000_000


@dataclass(frozen=True)
class Text:
    split: str
    source: str  # e.g. "hub:wikitext-2-raw-v1" or "local:/path/wiki.test.raw"
    text: str


def wikitext2(split: str = "test") -> Text:
    """WikiText-2 `split` ('test' or 'validation') as one string, documents joined by blank lines.

    Read once per process for each split and LABKIT_DATA_DIR (clear_cache() forgets it)."""
    if not isinstance(split, str) or split not in SPLITS:
        raise ValueError(f"split={split!r}: allowed splits are {SPLITS}.")
    return _wikitext2(split, os.environ.get("LABKIT_DATA_DIR") or None)


def copy_kind() -> str:
    """Which copy of WikiText-2 this process reads: "local" (LABKIT_DATA_DIR is set) or "hub".

    The two copies differ (the local raw test file has no blank lines), so a result's protocol names it
    (labkit.profiles.Protocol.copy); it is the part of Text.source before the colon."""
    return "local" if os.environ.get("LABKIT_DATA_DIR") else "hub"


def clear_cache() -> None:
    """Forget the texts and token streams read so far (after changing the files in place)."""
    _wikitext2.cache_clear()
    _token_cache.clear()


@functools.lru_cache(maxsize=8)
def _wikitext2(split: str, data_dir: str | None) -> Text:
    if data_dir:
        return _local(split, Path(data_dir))
    try:
        return _hub(split)
    except Exception as err:  # offline, hub down, `datasets` missing: all end here
        raise RuntimeError(
            f"Could not read WikiText-2 {split!r}: the Hugging Face Hub is unreachable ({type(err).__name__}: "
            f"{str(err)[:200]}) and LABKIT_DATA_DIR is not set. Either connect to the internet, or set "
            f"LABKIT_DATA_DIR to a folder holding {LOCAL_FILES[split]} (this project's CI uses ../shared/data)."
        ) from err


def _hub(split: str) -> Text:
    from datasets import load_dataset

    rows = load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
    text = "\n\n".join(rows["text"])  # as the GPTQ code does
    check_length(text, f"the Hub's WikiText-2 {split!r} split (wikitext-2-raw-v1)")
    return Text(split, "hub:wikitext-2-raw-v1", text)


@functools.lru_cache(maxsize=16)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    """sha256 of a file, once per process for each (path, size, modification time)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def check_file(path: Path, relative: str) -> None:
    """A local data file must be the copy KNOWN_COPIES lists for `relative` (size, then sha256);
    a file not listed there is checked for MIN_CHARS when read."""
    if relative not in KNOWN_COPIES:
        return
    size, digest = KNOWN_COPIES[relative]
    stat = path.stat()
    got = _sha256(str(path), stat.st_size, stat.st_mtime_ns) if stat.st_size == size else None
    if stat.st_size != size or got != digest:
        found = f"{stat.st_size:,} bytes" + (f" with sha256 {got}" if got else "")
        raise ValueError(
            f"{path} is not the WikiText-2 copy this course uses: expected {size:,} bytes with sha256 {digest}, "
            f"found {found}. A truncated or edited file changes every perplexity; copy {relative} again from "
            f"the course's data folder (its README lists each file), or unset LABKIT_DATA_DIR to read the Hub."
        )


def check_length(text: str, what: str) -> None:
    if len(text) < MIN_CHARS:
        raise ValueError(
            f"{what} has {len(text):,} characters; a whole WikiText-2 split has over {MIN_CHARS:,}. "
            f"The copy is truncated or empty: download it again."
        )


def _local(split: str, data_dir: Path) -> Text:
    path = data_dir / LOCAL_FILES[split]
    if not path.is_file():
        raise FileNotFoundError(
            f"LABKIT_DATA_DIR={str(data_dir)!r} has no {LOCAL_FILES[split]} (needed for WikiText-2 {split!r}). "
            f"Point LABKIT_DATA_DIR at a folder with that layout, or unset it to read the Hugging Face Hub."
        )
    check_file(path, LOCAL_FILES[split])
    lines = path.read_text(encoding="utf-8").replace("\r\n", "\n").split("\n")
    # Blank lines were dropped from the raw test copy; joining non-empty lines with "\n\n"
    # approximates "\n\n".join(dataset["text"]).
    text = "\n\n".join(line for line in lines if line.strip())
    if LOCAL_FILES[split] not in KNOWN_COPIES:
        check_length(text, str(path))
    return Text(split, f"local:{path}", text)


_token_cache: dict[tuple[str, str, int], torch.Tensor] = {}


def tokens(tokenizer, split: str = "test") -> torch.Tensor:
    """The whole split tokenized as one stream: LongTensor [1, n_tokens] (cached per tokenizer)."""
    if not callable(tokenizer) or not hasattr(tokenizer, "__len__"):
        raise ValueError(
            f"tokenizer must be a Hugging Face tokenizer (the second value of labkit.models.load); "
            f"got {type(tokenizer).__name__}."
        )
    corpus = wikitext2(split)
    key = (corpus.source, getattr(tokenizer, "name_or_path", ""), len(tokenizer))
    if key not in _token_cache:
        _token_cache[key] = tokenizer(corpus.text, return_tensors="pt").input_ids
    return _token_cache[key]


def test_tokens(tokenizer) -> torch.Tensor:
    """WikiText-2 test split as LongTensor [1, n_tokens]: the evaluation stream."""
    return tokens(tokenizer, "test")


test_tokens.__test__ = False  # not a pytest test, despite its name


def calibration(tokenizer, n_samples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """`n_samples` random windows of `seqlen` tokens from the validation split: LongTensor [n, seqlen].

    As in the GPTQ/SparseGPT code: each window starts at a uniformly random token position.
    Calibration never uses the test split, so it cannot leak into the perplexity.
    """
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"n_samples={n_samples!r}: need a positive integer.")
    if isinstance(seqlen, bool) or not isinstance(seqlen, int) or seqlen < 2:
        raise ValueError(f"seqlen={seqlen!r}: need an integer of at least 2.")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValueError(f"seed={seed!r}: need an integer in [0, 2**63).")
    stream = tokens(tokenizer, "validation")[0]
    if stream.numel() <= seqlen:
        raise ValueError(f"seqlen={seqlen} is longer than the validation split ({stream.numel()} tokens).")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, stream.numel() - seqlen, (n_samples,), generator=generator)
    return torch.stack([stream[s : s + seqlen] for s in starts.tolist()])
