"""ArbNet hash functions: each maps every virtual weight of a layer to a table entry.

A hash is a small function registered by name. It receives the layer's virtual weight shape, the
table size, a seeded NumPy generator and its own keyword options, and returns a `Hashed` index.
Indices are computed once, before training (ArbNet section 1.1), so speed matters less than
reproducibility: every hash draws only from the generator it is given. A hash registered with
`deterministic=True` promises that (same shape, table size, seed and options: same index), so an
ArbNet layer saves only its recipe and recomputes the index at load; any other hash's index is saved.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

import numpy as np

HashFn = Callable[..., "Hashed"]
_HASHES: dict[str, HashFn] = {}
_OPTIONS: dict[str, dict[str, object]] = {}  # each hash's keyword options and their defaults, read from its signature once
_DETERMINISTIC: set[str] = set()


@dataclass
class Hashed:
    index: np.ndarray  # int64 table entry per virtual weight (row-major over the weight shape)
    sign: np.ndarray | None = None  # optional +-1 per virtual weight (HashedNets' sign hash)


def register_hash(name: str, *, deterministic: bool = False) -> Callable[[HashFn], HashFn]:
    """Register `fn(shape, table_size, rng, **options) -> Hashed` under `name`. `deterministic`: the
    index depends only on the arguments and draws only from `rng`, so checkpoints need not store it."""

    def wrap(fn: HashFn) -> HashFn:
        _HASHES[name] = fn
        _OPTIONS[name] = {p.name: None if p.default is inspect.Parameter.empty else p.default
                          for p in inspect.signature(fn).parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY}
        (_DETERMINISTIC.add if deterministic else _DETERMINISTIC.discard)(name)
        return fn

    return wrap


def is_deterministic(name: str) -> bool:
    """Whether `name`'s index can be recomputed from its recipe instead of stored."""
    return name in _DETERMINISTIC


def hash_names() -> list[str]:
    return sorted(_HASHES)


def hash_options(name: str) -> list[str]:
    """Keyword options a hash accepts (e.g. `alpha` for dirichlet)."""
    return list(hash_defaults(name))


def hash_defaults(name: str) -> dict[str, object]:
    """Each keyword option of a hash and its default (None where it has none): the one place they are set."""
    get_hash(name)  # an unknown name: its one-line error
    return dict(_OPTIONS[name])


def hashes_taking(option: str) -> list[str]:
    """The hashes that declare `option` (alpha: dirichlet; radius: neighborhood). A hash's signature is
    the one definition of which setting applies to it: validation and the search space read it here."""
    return [name for name in hash_names() if option in hash_options(name)]


def get_hash(name: str) -> HashFn:
    try:
        return _HASHES[name]
    except KeyError:
        raise ValueError(f"hash: unknown hash {name!r}; allowed: {', '.join(hash_names())}") from None


def compute_hash(
    name: str, shape: tuple[int, ...], table_size: int, seed: int = 0, **options: object
) -> Hashed:
    """Run hash `name`, passing only the options it declares; a declared option left as None is an error."""
    if table_size < 1:
        raise ValueError(f"table_size: must be >= 1, got {table_size}")
    wanted = hash_options(name)
    given = {k: v for k, v in options.items() if v is not None}
    unknown = sorted(set(given) - set(wanted))
    if unknown:
        raise ValueError(
            f"{unknown[0]}: not an option of hash {name!r}; it takes: {', '.join(wanted) or 'no options'}"
        )
    rng = np.random.default_rng(seed)
    hashed = get_hash(name)(tuple(shape), table_size, rng, **given)
    n = int(np.prod(shape))
    if hashed.index.shape != (n,) or hashed.index.min(initial=0) < 0 or hashed.index.max(initial=0) >= table_size:
        raise ValueError(f"hash {name!r} returned an index outside [0, {table_size}) or of the wrong length")
    return hashed


@register_hash("identity", deterministic=True)
def identity_hash(shape: tuple[int, ...], table_size: int, rng: np.random.Generator) -> Hashed:
    """No sharing: a plain dense layer (ArbNet section 2.1)."""
    n = int(np.prod(shape))
    if table_size != n:
        raise ValueError(f"table_size: the identity hash needs one entry per weight ({n}), got {table_size}")
    return Hashed(np.arange(n, dtype=np.int64))


@register_hash("modulus", deterministic=True)
def modulus_hash(shape: tuple[int, ...], table_size: int, rng: np.random.Generator) -> Hashed:
    """Eq. 1: w_i = table[i mod n]; an RNN's reuse across unrolled steps (section 2.3)."""
    return Hashed(np.arange(int(np.prod(shape)), dtype=np.int64) % table_size)


@register_hash("uniform", deterministic=True)
def uniform_hash(shape: tuple[int, ...], table_size: int, rng: np.random.Generator) -> Hashed:
    """Eq. 2: every weight picks an entry uniformly at random."""
    return Hashed(rng.integers(0, table_size, int(np.prod(shape)), dtype=np.int64))


@register_hash("dirichlet", deterministic=True)
def dirichlet_hash(
    shape: tuple[int, ...], table_size: int, rng: np.random.Generator, *, alpha: float = 1.0
) -> Hashed:
    """Eq. 9: entry probabilities from a symmetric Dirichlet(alpha); low alpha means unbalanced sharing."""
    if not alpha > 0:
        raise ValueError(f"alpha: must be > 0 for the dirichlet hash, got {alpha}")
    probs = rng.dirichlet(np.full(table_size, float(alpha)))
    return Hashed(categorical(probs / probs.sum(), int(np.prod(shape)), rng))


def categorical(probs: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` draws of an entry by `probs`: what `rng.choice(len(probs), count, p=probs)` draws, value for
    value (its inverse CDF of `rng.random`), so saved indices stay valid. It looks the draws up in sorted
    order: into a large table, NumPy's lookups in draw order miss the cache (41 s against 12 s for 30 M
    weights over 15 M entries)."""
    cdf = probs.cumsum()
    cdf /= cdf[-1]
    draws = rng.random(count)
    order = np.argsort(draws)
    draws = draws[order]  # at most three arrays of `count` at once (preflight's HASHING_BYTES)
    found = cdf.searchsorted(draws, side="right")
    del draws
    index = np.empty_like(found)
    index[order] = found
    return index


@register_hash("neighborhood", deterministic=True)
def neighborhood_hash(
    shape: tuple[int, ...], table_size: int, rng: np.random.Generator, *, radius: int = 0
) -> Hashed:
    """Eq. 10: (i + U[-radius, radius]) mod n; radius 0 is the modulus hash, >= n/2 acts as uniform."""
    if radius < 0 or int(radius) != radius:
        raise ValueError(f"radius: must be an integer >= 0, got {radius}")
    n = int(np.prod(shape))
    noise = rng.integers(-int(radius), int(radius) + 1, n, dtype=np.int64)
    return Hashed((np.arange(n, dtype=np.int64) + noise) % table_size)


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser: a fast, well-mixed integer hash (wrap-around arithmetic is intended)."""
    x = x.astype(np.uint64)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


@register_hash("hashednets", deterministic=True)
def hashednets_hash(
    shape: tuple[int, ...], table_size: int, rng: np.random.Generator, *, sign: bool = False
) -> Hashed:
    """Chen et al. 2015: a seeded hash of (row, col), with an optional independent +-1 sign hash."""
    rows, cols = (shape[0], int(np.prod(shape[1:]))) if len(shape) > 1 else (1, shape[0])
    salt = rng.integers(0, 2**62, 2, dtype=np.int64).astype(np.uint64)
    key = np.arange(rows, dtype=np.uint64)[:, None] * np.uint64(cols) + np.arange(cols, dtype=np.uint64)[None]
    key = key.ravel()
    with np.errstate(over="ignore"):
        index = (_mix64(key + salt[0]) % np.uint64(table_size)).astype(np.int64)
        signs = None
        if sign:
            signs = np.where(_mix64(key + salt[1]) & np.uint64(1), 1, -1).astype(np.int8)
    return Hashed(index, signs)
