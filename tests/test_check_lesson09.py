"""Lesson 09's exercise checks: the right answer passes, typical mistakes get their own message."""

import math

from labkit import check


def kv_bytes_per_token(config, dtype_bytes):
    head_dim = config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * dtype_bytes


def test_kv_bytes_per_token(capsys):
    assert check.lesson09.kv_bytes_per_token(kv_bytes_per_token)
    assert capsys.readouterr().out.startswith("✓ kv_bytes_per_token")

    assert not check.lesson09.kv_bytes_per_token(lambda config, b: kv_bytes_per_token(config, b) // 2)
    assert "forgot the factor 2" in capsys.readouterr().out

    assert not check.lesson09.kv_bytes_per_token(
        lambda config, b: 2 * config.num_hidden_layers * config.hidden_size * b
    )
    assert "used the query heads" in capsys.readouterr().out


def slot(block_table, block_size, t):
    return block_table[t // block_size] * block_size + t % block_size


def test_slot(capsys):
    assert check.lesson09.slot(slot)
    assert capsys.readouterr().out.startswith("✓ slot")

    assert not check.lesson09.slot(lambda table, block_size, t: t)
    assert "returned the logical position t" in capsys.readouterr().out

    assert not check.lesson09.slot(lambda table, block_size, t: table[t // block_size] + t % block_size)
    assert "forgot to multiply the physical block by the block size" in capsys.readouterr().out


def paged_waste(lengths, block_size):
    return 1 - sum(lengths) / sum(math.ceil(n / block_size) * block_size for n in lengths)


def test_paged_waste(capsys):
    assert check.lesson09.paged_waste(paged_waste)
    assert capsys.readouterr().out.startswith("✓ paged_waste")

    assert not check.lesson09.paged_waste(lambda lengths, b: 1 - sum(lengths) / sum(n // b * b for n in lengths))
    assert "rounded the blocks down" in capsys.readouterr().out

    def per_request(lengths, b):
        return sum(1 - n / (math.ceil(n / b) * b) for n in lengths) / len(lengths)

    assert not check.lesson09.paged_waste(per_request)
    assert "averaged each request's waste" in capsys.readouterr().out
