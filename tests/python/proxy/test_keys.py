"""spendgate.proxy.keys: virtual keys are stored hashed, in a 0600 file, and found again after changes."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from spendgate.proxy.keys import KEY_PREFIX, KeyStore, KeyStoreError


def test_a_key_maps_to_its_customer_and_only_its_hash_is_stored(tmp_path: Path) -> None:
    store = KeyStore(tmp_path)
    key, record = store.create("cus_1")
    assert key.startswith(KEY_PREFIX) and len(key) > 40
    assert store.customer_of(key) == "cus_1" and store.customer_of(key + "x") is None
    text = store.path.read_text()
    assert key not in text and record.sha256 in text
    assert stat.S_IMODE(os.stat(store.path).st_mode) == 0o600


def test_a_running_reader_sees_keys_created_and_revoked_by_another_writer(tmp_path: Path) -> None:
    reader, writer = KeyStore(tmp_path), KeyStore(tmp_path)
    assert reader.customer_of("sgk_nothing") is None
    first, record = writer.create("cus_1")
    second, _ = writer.create("cus_2")
    assert reader.customer_of(first) == "cus_1" and reader.customer_of(second) == "cus_2"
    assert [r.key_id for r in writer.revoke(record.key_id)] == [record.key_id]
    assert reader.customer_of(first) is None and reader.customer_of(second) == "cus_2"
    assert len(writer.revoke("cus_2")) == 1 and reader.customer_of(second) is None


def test_a_damaged_file_is_an_error_that_names_it(tmp_path: Path) -> None:
    store = KeyStore(tmp_path)
    store.path.write_text("{not json")
    with pytest.raises(KeyStoreError, match="proxy-keys.json"):
        store.customer_of("sgk_x")
    with pytest.raises(KeyStoreError, match="1..=128"):
        KeyStore(tmp_path / "other").create("")
