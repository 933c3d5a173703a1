"""API keys: loading the keys file, authenticating requests, and who may act for whom."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import pytest

from agent.api_keys import ApiKey, ApiKeyError, ApiKeyring, extract_presented_key, hash_key
from agent.config_checks import ConfigError

TRAINER_KEY = "trainer-secret-0123456789"
OPS_KEY = "ops-secret-9876543210"
INFERENCE_KEY = "inference-secret-plain"

KEYS_FILE = f"""
[keys.trainer]
sha256 = "{hash_key(TRAINER_KEY)}"
service = "training"

[keys.ops]
sha256 = "{hash_key(OPS_KEY).upper()}"
admin = true

[keys.inference]
key = "{INFERENCE_KEY}"
service = "inference"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "api-keys.toml"
    path.write_text(text)
    return path


@pytest.fixture
def keyring(tmp_path: Path) -> ApiKeyring:
    return ApiKeyring.load(write(tmp_path, KEYS_FILE))


def test_hash_key_is_the_hex_sha256_of_the_utf8_key() -> None:
    assert hash_key("abc") == hashlib.sha256(b"abc").hexdigest()
    assert hash_key("ключ") == hashlib.sha256("ключ".encode()).hexdigest()


def test_load_reads_every_entry(keyring: ApiKeyring) -> None:
    assert len(keyring) == 3


def test_authenticate_by_digest_entry(keyring: ApiKeyring) -> None:
    assert keyring.authenticate(TRAINER_KEY) == ApiKey(name="trainer", service="training", admin=False)


def test_authenticate_accepts_an_uppercase_digest_in_the_file(keyring: ApiKeyring) -> None:
    assert keyring.authenticate(OPS_KEY) == ApiKey(name="ops", service=None, admin=True)


def test_authenticate_by_plaintext_entry(keyring: ApiKeyring) -> None:
    key = keyring.authenticate(INFERENCE_KEY)
    assert key is not None and key.name == "inference"


def test_wrong_or_empty_key_authenticates_as_nobody(keyring: ApiKeyring) -> None:
    assert keyring.authenticate(TRAINER_KEY + "x") is None
    assert keyring.authenticate(hash_key(TRAINER_KEY)) is None  # the digest is not the key
    assert keyring.authenticate("") is None


def test_plaintext_entries_are_logged_as_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="agent.api_keys"):
        ApiKeyring.load(write(tmp_path, KEYS_FILE))
    assert [r.getMessage() for r in caplog.records if "[keys.inference]" in r.getMessage()]
    assert not [r for r in caplog.records if INFERENCE_KEY in r.getMessage()]


# --- who may act for whom -----------------------------------------------------------------


def test_service_key_may_act_only_for_its_service(keyring: ApiKeyring) -> None:
    trainer = keyring.authenticate(TRAINER_KEY)
    assert trainer is not None
    assert trainer.may_act_for("training")
    assert not trainer.may_act_for("inference")
    assert not trainer.may_act_for("")


def test_admin_key_may_act_for_every_service(keyring: ApiKeyring) -> None:
    ops = keyring.authenticate(OPS_KEY)
    assert ops is not None
    assert ops.may_act_for("training") and ops.may_act_for("anything-else")


# --- headers -----------------------------------------------------------------------------


def test_key_from_the_named_header_any_case(keyring: ApiKeyring) -> None:
    presented = extract_presented_key({"x-api-key": f"  {TRAINER_KEY} "}, "X-API-Key")
    assert presented == TRAINER_KEY
    assert keyring.authenticate(presented) is not None


def test_key_from_authorization_bearer(keyring: ApiKeyring) -> None:
    presented = extract_presented_key({"AUTHORIZATION": f"bearer {OPS_KEY}"}, "X-API-Key")
    assert presented == OPS_KEY
    key = keyring.authenticate(presented)
    assert key is not None and key.admin


def test_named_header_wins_over_bearer() -> None:
    headers = {"Authorization": "Bearer from-bearer", "X-API-Key": "from-header"}
    assert extract_presented_key(headers, "X-API-Key") == "from-header"


def test_custom_header_name() -> None:
    assert extract_presented_key({"X-Gpu-Token": "t"}, "x-gpu-token") == "t"
    assert extract_presented_key({"X-API-Key": "t"}, "X-Gpu-Token") is None


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Basic dXNlcjpwYXNz"},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer   "},
        {"X-API-Key": ""},
        {"Content-Type": "application/json"},
    ],
)
def test_no_key_presented(headers: dict[str, str]) -> None:
    assert extract_presented_key(headers, "X-API-Key") is None


# --- bad files ---------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ApiKeyError, match=r"api-keys\.toml \(\[auth\] keys_file\) does not exist"):
        ApiKeyring.load(tmp_path / "api-keys.toml")


def test_api_key_errors_are_config_errors() -> None:
    assert issubclass(ApiKeyError, ConfigError)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[keys.a\n", r"not valid TOML"),
        ("", r"defines no keys"),
        ("[keys]\n", r"defines no keys"),
        ('[key.a]\nkey = "k"\nadmin = true\n', r"unknown top-level key 'key'"),
        ("[keys]\na = 1\n", r"\[keys\.a\] must be a table"),
        ('[keys.a]\nkey = "k"\n', r"\[keys\.a\] may act for nothing"),
        ('[keys.a]\nkey = "k"\nadmin = false\n', r"\[keys\.a\] may act for nothing"),
        ('[keys.a]\nservice = "s"\n', r"\[keys\.a\] needs exactly one of sha256 \(preferred\) or key"),
        (f'[keys.a]\nkey = "k"\nsha256 = "{hash_key("k")}"\nadmin = true\n', r"needs exactly one of"),
        ('[keys.a]\nsha256 = "abc"\nadmin = true\n', r"\[keys\.a\]: sha256 must be 64 hex digits"),
        ('[keys.a]\nkey = ""\nadmin = true\n', r"\[keys\.a\]: key must be a non-empty string"),
        ('[keys.a]\nkey = "k"\nservice = ""\n', r"\[keys\.a\]: service must be a non-empty string"),
        ('[keys.a]\nkey = "k"\nadmin = "yes"\n', r"\[keys\.a\]: admin must be true or false"),
        ('[keys.a]\nkey = "k"\nservce = "s"\n', r"unknown key 'servce'; did you mean 'service'\?"),
        (
            f'[keys.a]\nkey = "k"\nadmin = true\n[keys.b]\nsha256 = "{hash_key("k")}"\nservice = "s"\n',
            r"\[keys\.b\] has the same key as \[keys\.a\]",
        ),
    ],
)
def test_bad_keys_file(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ApiKeyError, match=message):
        ApiKeyring.load(write(tmp_path, text))


def test_a_key_may_name_the_queue_its_requests_count_against(tmp_path: Path) -> None:
    path = write(tmp_path, f'[keys.nightly]\nsha256 = "{hash_key("n")}"\nservice = "etl"\nqueue = "batch"\n')
    keyring = ApiKeyring.load(path)
    assert keyring.authenticate("n") == ApiKey(name="nightly", service="etl", admin=False, queue="batch")
    assert keyring.queues() == {"batch"}


@pytest.mark.parametrize("queue", ['""', "3", '"two words"'])
def test_a_queue_that_is_no_queue_name_is_refused(tmp_path: Path, queue: str) -> None:
    path = write(tmp_path, f'[keys.nightly]\nsha256 = "{hash_key("n")}"\nservice = "etl"\nqueue = {queue}\n')
    with pytest.raises(ApiKeyError, match=r"\[keys\.nightly\]: queue must be a queue name"):
        ApiKeyring.load(path)
