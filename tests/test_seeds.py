"""The one seed derivation (rcfd.core.seeds) and the streams keyed by it: their values are
pinned, because every run's numbers (and the committed results) depend on them."""

import pytest

from rcfd.core.seeds import derive_seed
from rcfd.data.loader import epoch_seed
from rcfd.samplers.generate import RENOISE_STREAM, chunk_seed
from rcfd.training.state import stage_seed


def test_derive_seed_values_are_pinned():
    assert derive_seed(0) == 2033344993903900207
    assert derive_seed(0, "pd", "T16", 3) == 3457395989937966265
    assert derive_seed(12345, "base", "model", "rank", 0) == 7094788396642946350
    assert chunk_seed(0, 0) == 710254677135984553 and chunk_seed(1, 99) == 5313960641077408525
    assert epoch_seed(0, 0) == 6956993988634818902 and epoch_seed(1, 99) == 3552892307700188240


def test_every_stream_is_derive_seed_of_its_key():
    for seed in (0, 1, 2**40, -3):
        for k in (0, 1, 99):
            assert stage_seed(seed, "pd", k) == derive_seed(seed, "pd", k)
            assert epoch_seed(seed, k) == derive_seed(seed, k)
            assert chunk_seed(seed, k) == derive_seed("rcfd-noise", seed, k)
            assert chunk_seed(seed, k, RENOISE_STREAM) == derive_seed("rcfd-consistency-noise", seed, k)
            assert 0 <= chunk_seed(seed, k) < 2**63 and chunk_seed(seed, k) != epoch_seed(seed, k)
            assert chunk_seed(seed, k) != chunk_seed(seed, k, RENOISE_STREAM)


def test_derive_seed_needs_a_part():
    with pytest.raises(ValueError, match="at least one part"):
        derive_seed()
