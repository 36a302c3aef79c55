"""The one masker: every form a secret takes in output is hidden, wherever layerkeep prints."""

from __future__ import annotations

import base64
from pathlib import Path
from urllib.parse import quote

from layerkeep.core.ci_vars import GitFacts
from layerkeep.core.secrets import MASK, Masker, is_secret_name
from layerkeep.core.settings import describe_settings, load_settings

SECRET = "s3cr/t:p@ss"  # noqa: S105 - a throwaway value to mask


def test_a_masker_hides_a_secret_containing_another_whole() -> None:
    masker = Masker.of(["abc", "xxabcxx"])
    assert masker.mask("1 xxabcxx 2 abc") == f"1 {MASK} 2 {MASK}"
    assert masker.plus(["2"]).mask("1 2") == f"1 {MASK}"


def test_a_masker_hides_each_form_a_secret_takes() -> None:
    masker = Masker.of([SECRET], logins=[("alice", SECRET)])
    basic = base64.b64encode(f"alice:{SECRET}".encode()).decode()
    text = f"{SECRET} {quote(SECRET, safe='')} {quote(SECRET)} Basic {basic} alice"
    assert masker.mask(text) == f"{MASK} {MASK} {MASK} Basic {MASK} alice"
    # More values keep the forms found before, and add their own.
    plus = masker.plus(["tok en"])
    assert plus.mask(f"{quote(SECRET)} tok%20en") == f"{MASK} {MASK}"


def test_secret_names() -> None:
    assert is_secret_name("API_TOKEN", ())
    assert is_secret_name("django_secret_key", ())
    assert is_secret_name("STRIPE", ("STRIPE",))
    assert not is_secret_name("DEBUG", ("STRIPE",))


def test_the_settings_view_masks_a_secret_in_each_form(tmp_path: Path) -> None:
    # The view masks with the job's masker: a URL-quoted secret is hidden too.
    setup = f"curl -fs https://ci:{quote(SECRET, safe='')}@example.invalid/seed"
    settings = load_settings(
        tmp_path,
        {"LAYERKEEP_SECRETS": "SEED_PASS", "SEED_PASS": SECRET, "LAYERKEEP_TEST_SETUP": setup},
        git_facts=lambda _: GitFacts("", ""),
    )
    rows = {row.name: row.value for row in describe_settings(settings)}
    assert rows["LAYERKEEP_TEST_SETUP"] == f"curl -fs https://ci:{MASK}@example.invalid/seed"
    assert quote(SECRET, safe="") not in repr(settings)
