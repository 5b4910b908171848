import math
import re

import numpy as np
import pytest

from sharetune.models import hashes
from sharetune.models.hashes import Hashed, categorical, compute_hash, hash_names, register_hash


def usage_entropy(index: np.ndarray, n: int) -> float:
    p = np.bincount(index, minlength=n) / index.size
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def test_entropy_rises_with_alpha_towards_log_n():
    n, shape = 1000, (200, 784)
    entropies = [usage_entropy(compute_hash("dirichlet", shape, n, alpha=a).index, n) for a in (0.01, 0.1, 1.0, 100.0)]
    assert entropies == sorted(entropies)
    assert entropies[0] < 0.7 * math.log(n)
    assert abs(entropies[-1] - math.log(n)) < 0.01


def test_radius_zero_is_modulus():
    shape, n = (30, 70), 97
    assert np.array_equal(compute_hash("neighborhood", shape, n, radius=0).index, compute_hash("modulus", shape, n).index)


def test_large_radius_behaves_as_uniform():
    shape, n = (400, 500), 101  # odd n: the 2r+1 offsets of radius n//2 cover the table exactly once
    offsets = lambda r: (compute_hash("neighborhood", shape, n, radius=r).index - np.arange(200_000)) % n
    wide = np.bincount(offsets(n // 2), minlength=n)
    assert np.all(wide > 0) and wide.max() / wide.min() < 1.3  # every offset, evenly: like uniform
    assert np.count_nonzero(np.bincount(offsets(3), minlength=n)) == 7  # a narrow radius only reaches 2r+1


# The hashes that draw from the generator they are given, with options that make them draw
SEEDED = {"uniform": {}, "dirichlet": {"alpha": 1.0}, "neighborhood": {"radius": 3}, "hashednets": {"sign": True}}


def test_hashes_are_seeded_and_in_range():
    """Every random hash draws from the seed it is given: the seed reproduces its index, another seed changes it."""
    for name, options in SEEDED.items():
        a, b, other = (compute_hash(name, (50, 60), 123, seed=seed, **options) for seed in (7, 7, 8))
        assert np.array_equal(a.index, b.index) and 0 <= a.index.min() and a.index.max() < 123, name
        assert not np.array_equal(a.index, other.index), name
    signs = [compute_hash("hashednets", (50, 60), 123, seed=seed, sign=True).sign for seed in (7, 7, 8)]
    assert np.array_equal(signs[0], signs[1]) and not np.array_equal(signs[0], signs[2])
    # modulus and identity draw nothing, by design: every seed gives the same index
    for name, size in (("modulus", 123), ("identity", 3000)):
        assert np.array_equal(compute_hash(name, (50, 60), size, seed=7).index, compute_hash(name, (50, 60), size, seed=8).index)


def test_hashednets_sign_is_balanced():
    hashed = compute_hash("hashednets", (100, 100), 50, sign=True)
    assert set(np.unique(hashed.sign)) == {-1, 1}
    assert abs(hashed.sign.mean()) < 0.05
    assert compute_hash("hashednets", (100, 100), 50).sign is None


def test_identity_needs_one_entry_per_weight():
    assert np.array_equal(compute_hash("identity", (3, 4), 12).index, np.arange(12))
    with pytest.raises(ValueError, match="table_size"):
        compute_hash("identity", (3, 4), 10)


def test_bad_input_names_the_field():
    with pytest.raises(ValueError, match=r"hash: unknown hash 'nope'; allowed: .*dirichlet"):
        compute_hash("nope", (2, 2), 2)
    with pytest.raises(ValueError, match="alpha"):
        compute_hash("dirichlet", (2, 2), 2, alpha=-1.0)
    with pytest.raises(ValueError, match="radius: not an option of hash 'uniform'"):
        compute_hash("uniform", (2, 2), 2, radius=3)


def test_users_can_register_a_hash():
    @register_hash("test_reverse")
    def reverse(shape, table_size, rng):
        return Hashed(np.arange(int(np.prod(shape)))[::-1] % table_size)

    assert "test_reverse" in hash_names()
    assert compute_hash("test_reverse", (2, 3), 6).index.tolist() == [5, 4, 3, 2, 1, 0]


def test_a_hash_whose_index_leaves_the_table_is_refused():
    """A user's hash is checked where it runs: an entry outside the table would index past it in training."""

    @register_hash("test_shifted")
    def shifted(shape, table_size, rng, *, by: int = 0, drop: int = 0):
        return Hashed((np.arange(int(np.prod(shape))) + by)[drop:])

    try:
        assert compute_hash("test_shifted", (2, 3), 6).index.tolist() == [0, 1, 2, 3, 4, 5]
        refused = re.escape("hash 'test_shifted' returned an index outside [0, 6) or of the wrong length")
        for options in ({"by": 1}, {"by": -1}, {"drop": 1}):  # entry 6, entry -1, an index one weight short
            with pytest.raises(ValueError, match=refused):
                compute_hash("test_shifted", (2, 3), 6, **options)
    finally:
        hashes._HASHES.pop("test_shifted")


@pytest.mark.parametrize("entries, count, alpha", [(1, 5, 1.0), (7, 1000, 0.05), (1000, 3, 1.0), (5000, 20000, 10.0)])
def test_the_dirichlet_draws_are_numpys_choice_value_for_value(entries, count, alpha):
    """The dirichlet hash's index is recomputed when a checkpoint loads: the faster lookup must draw what
    `Generator.choice` drew, and leave the generator where it left it."""
    ours, numpys = np.random.default_rng(3), np.random.default_rng(3)
    probs = ours.dirichlet(np.full(entries, alpha))
    numpys.dirichlet(np.full(entries, alpha))
    probs /= probs.sum()
    assert np.array_equal(categorical(probs, count, ours), numpys.choice(entries, size=count, p=probs))
    assert ours.random() == numpys.random()
