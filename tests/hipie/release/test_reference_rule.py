"""Our implementation of the seeded weight rule reproduces the fixtures' weights bit for bit."""

from __future__ import annotations

import json

import pytest

from tests.hipie.release.reference import FIXTURES, digest, require, rule_state_dict


@pytest.mark.parametrize("config", ["r50", "vit_h"])
def test_rule_digest_matches_fixture(config):
    check = json.loads(require(FIXTURES / config / "weights_check.json").read_text())
    sd = rule_state_dict(config, seed=1)
    assert digest(sd) == check["digest_sha256"]
