"""The transformer section refuses templates and URLs it could not honour, naming the key."""

from __future__ import annotations

from typing import Any

import pytest

from common.errors import ConfigError


@pytest.mark.parametrize(
    ("override", "problem"),
    [
        ({"unsubscribe-url": "http://u.test/{{token}}"}, "transformer.unsubscribe-url: must be an https:// URL"),
        ({"unsubscribe-url": "https://u.test/unsubscribe"}, "transformer.unsubscribe-url: must contain {{token}}"),
        ({"unsubscribe-url": "https://u.test/{{uuid}}"}, "transformer.unsubscribe-url: unknown placeholder {{uuid}}"),
        ({"email-headers": {"inject": {"Bad Name": "x"}}}, "'Bad Name' is not a valid header name"),
        ({"email-headers": {"inject": {"X-A": "{{sender}}"}}}, "header X-A: unknown placeholder {{sender}}"),
        ({"email-headers": {"inject": {"dkim-signature": "x"}}}, "header dkim-signature is written by the Transformer"),
        (
            {"domain-settings": [{"selector": "bad selector"}]},
            "domain-settings[0].selector: 'bad selector' is not a DKIM selector",
        ),
        (
            {"domain-settings": [{"beacon-url": "https://t.test/<{{uuid}}>"}]},
            "domain-settings[0].beacon-url: must be a plain ASCII URL",
        ),
        (
            {"domain-settings": [{"unsubscribe-url": "ftp://x/{{token}}"}]},
            "domain-settings[0].unsubscribe-url: must be an https:// URL",
        ),
    ],
)
def test_invalid_transformer_settings_are_refused(
    make_config, customer_dict, override: dict[str, Any], problem: str
) -> None:
    section = dict(customer_dict["transformer"])
    for key, value in override.items():
        if key == "domain-settings":
            section[key] = [{**section[key][0], **value[0]}]
        else:
            section[key] = value
    with pytest.raises(ConfigError) as info:
        make_config({"transformer": section}, service="transformer")
    assert any(problem in line for line in info.value.problems), info.value.problems


def test_the_originals_inject_template_and_templated_urls_load(make_config) -> None:
    config = make_config(
        {
            "transformer": {
                "email-headers": {"inject": {"List-Unsubscribe": "<mailto:unsub-{{uuid}}@{{from-domain}}>"}},
                "unsubscribe-url": "https://mail.example.test/u/{{ token }}",
            }
        },
        service="transformer",
    )
    assert config.transformer.unsubscribe_url == "https://mail.example.test/u/{{ token }}"


def test_ed25519_key_must_be_an_ed25519_key(make_config, customer_dict, tmp_path) -> None:
    section = dict(customer_dict["transformer"])
    rsa_file = section["domain-settings"][0]["dkim-private-key-file"]
    section["domain-settings"] = [
        {**section["domain-settings"][0], "ed25519-private-key-file": rsa_file, "ed25519-selector": "ed"}
    ]
    with pytest.raises(ConfigError) as info:
        make_config({"transformer": section}, service="transformer")
    assert any("domain-settings[0].ed25519-private-key-file" in line for line in info.value.problems)
