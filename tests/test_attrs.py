"""Attribute files: upstream test_template_schema_integration / test_attr_utils, and more."""

import json
import logging
import os
import random
import uuid
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from storage import attrs
from storage.attrs import (
    MAX_ATTR_SIZE,
    V1_KEYS,
    V2_KEYS,
    AttrDoc,
    AttrError,
    AttrTooLarge,
    build,
    check_size,
    detect_version,
    dumps,
    export_v1,
    indent2,
    loads,
    migrate_v1_to_v2,
    read_file,
    validate_custom_attributes,
    write_atomic,
)

FID = uuid.UUID("4a1f049b-06a4-4cfa-a12c-616bbf46d2a5")
CREATED = datetime(2026, 11, 24, 9, 52, 35, 879072, tzinfo=UTC)
CHECKSUM = "ab" * 32


def fields(**overrides):
    base = dict(
        file_id=FID, original_filename="отчёт.pdf",
        storage_filename=f"отчёт_ivan_20261124T095235_{FID}.pdf", file_size=1234,
        content_type="application/pdf", created_at=CREATED, updated_at=CREATED,
        created_by_id="sub-1", created_by_username="ivan", created_by_fullname="Ivan I.",
        description="quarterly", version="1.0", storage_path="2026/11/24/09/",
        checksum=CHECKSUM, custom_attributes={"project": "alpha", "tags": ["a", "b"]},
    )
    return base | overrides


def v1_dict(i: int = 0, metadata=None) -> dict:
    """What upstream's live writer produces (S3 flavour: space-separated datetimes)."""
    fid = uuid.UUID(int=i + 1)
    return {
        "file_id": str(fid), "original_filename": f"f{i}.txt",
        "storage_filename": f"f{i}_ivan_20261124T095428_{fid}.txt", "file_size": 10 + i,
        "content_type": "text/plain", "created_at": "2026-11-24 09:54:28.534044+00:00",
        "updated_at": "2026-11-24T09:54:28.534044+00:00", "created_by_id": "sub-1",
        "created_by_username": "ivan", "created_by_fullname": None, "description": None,
        "version": None, "storage_path": "2026/11/24/09/", "checksum": CHECKSUM,
        "metadata": {} if metadata is None else metadata,
    }


def encode(d) -> bytes:
    return json.dumps(d, ensure_ascii=False).encode()


def temp_leftovers(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir() if p.name.startswith(".tmp_attr_")]


class TestV2AttrFileCreation:
    def test_create_v2_attr_file_on_filesystem(self, tmp_path):
        target = tmp_path / "x.pdf.attr.json"
        write_atomic(target, dumps(AttrDoc(**fields())))
        raw = target.read_bytes()
        on_disk = json.loads(raw)
        assert list(on_disk) == list(V2_KEYS)
        assert on_disk["schema_version"] == "2.0"
        assert on_disk["custom_attributes"] == {"project": "alpha", "tags": ["a", "b"]}
        assert on_disk["metadata"] == on_disk["custom_attributes"]
        assert on_disk["created_at"] == "2026-11-24T09:52:35.879072+00:00"
        assert "отчёт".encode() in raw and b"\\u" not in raw
        assert raw.startswith(b'{\n  "file_id": ')
        assert temp_leftovers(tmp_path) == []

    def test_v2_attr_file_size_limit(self):
        base = len(dumps(AttrDoc(**fields(description=""))))
        fits = AttrDoc(**fields(description="d" * (MAX_ATTR_SIZE - base)))
        assert len(dumps(fits)) == MAX_ATTR_SIZE
        check_size(fits)
        with pytest.raises(AttrTooLarge):
            check_size(AttrDoc(**fields(description="d" * (MAX_ATTR_SIZE - base + 1))))

    def test_datetimes_written_in_utc(self):
        moscow = CREATED.astimezone(timezone(timedelta(hours=3)))
        doc = build(**fields(created_at=moscow, updated_at=moscow.isoformat()))
        assert doc["created_at"] == doc["updated_at"] == "2026-11-24T09:52:35.879072+00:00"


class TestV1ToV2Migration:
    def test_migrate_v1_attr_file_to_v2(self):
        v1 = v1_dict(metadata={"a": 1})
        v2 = migrate_v1_to_v2(v1)
        assert v2["schema_version"] == "2.0"
        assert v2["custom_attributes"] == v2["metadata"] == {"a": 1}
        for key in ("file_id", "original_filename", "file_size", "checksum", "storage_path"):
            assert v2[key] == v1[key]
        assert v2["created_at"] == "2026-11-24T09:54:28.534044+00:00"
        assert "schema_version" not in v1  # migration does not touch its input

    def test_migrate_without_metadata_gives_empty_custom_attributes(self):
        v1 = v1_dict()
        del v1["metadata"]
        assert migrate_v1_to_v2(v1)["custom_attributes"] == {}

    def test_unsupported_version_is_refused(self):
        with pytest.raises(AttrError, match="unsupported schema_version '3.0'"):
            migrate_v1_to_v2(v1_dict() | {"schema_version": "3.0"})

    def test_batch_migrate_v1_files(self, tmp_path):
        paths = [tmp_path / f"f{i}.txt.attr.json" for i in range(10)]
        for i, path in enumerate(paths):
            path.write_bytes(encode(v1_dict(i, {"n": i})))
        for path in paths:
            raw = json.loads(path.read_bytes())
            assert detect_version(raw) == "1.0"
            write_atomic(path, dumps(migrate_v1_to_v2(raw, str(path))))
        for i, path in enumerate(paths):
            doc = json.loads(path.read_bytes())
            assert doc["schema_version"] == "2.0" and doc["custom_attributes"] == {"n": i}
            assert doc["file_id"] == str(uuid.UUID(int=i + 1))
        assert temp_leftovers(tmp_path) == []


class TestV2ToV1BackwardCompatibility:
    def test_convert_v2_to_v1_for_legacy_system(self):
        v1 = export_v1(build(**fields()))
        assert list(v1) == list(V1_KEYS)
        assert v1["file_id"] == str(FID) and v1["checksum"] == CHECKSUM
        assert v1["metadata"] == {"project": "alpha", "tags": ["a", "b"]}

    def test_lossy_conversion_warning(self, caplog):
        doc = AttrDoc(**fields(), extra={"x_future": 1})
        with caplog.at_level(logging.WARNING, logger="storage.attrs"):
            v1 = export_v1(doc)
        assert "schema_version" not in v1 and "custom_attributes" not in v1
        assert "x_future" not in v1
        assert any(r.levelno == logging.WARNING and "schema v1" in r.getMessage()
                   for r in caplog.records)


class TestSchemaVersionDetection:
    def test_detect_v1_schema_from_file(self, tmp_path):
        path = tmp_path / "a.attr.json"
        path.write_bytes(encode(v1_dict()))
        assert detect_version(json.loads(path.read_bytes())) == "1.0"

    def test_detect_v2_schema_from_file(self, tmp_path):
        path = tmp_path / "a.attr.json"
        write_atomic(path, dumps(AttrDoc(**fields())))
        assert detect_version(json.loads(path.read_bytes())) == "2.0"

    def test_detect_schema_batch_files(self, tmp_path):
        for i in range(5):
            (tmp_path / f"v1_{i}.attr.json").write_bytes(encode(v1_dict(i)))
            write_atomic(tmp_path / f"v2_{i}.attr.json",
                         dumps(AttrDoc(**fields(file_id=uuid.UUID(int=100 + i)))))
        found = {p.name: detect_version(json.loads(p.read_bytes()))
                 for p in tmp_path.glob("*.attr.json")}
        assert sorted(found.values()) == ["1.0"] * 5 + ["2.0"] * 5
        assert all(v == ("1.0" if n.startswith("v1_") else "2.0") for n, v in found.items())

    @pytest.mark.parametrize("bad", [{"schema_version": 2.0}, {"schema_version": None}, []])
    def test_malformed_version(self, bad):
        with pytest.raises(AttrError):
            detect_version(bad)


class TestCustomAttributesPersistence:
    def test_custom_attributes_preserved_across_writes(self, tmp_path):
        path = tmp_path / "a.attr.json"
        custom = {"nested": {"list": [1, 2.5, True, None, "ж"]}, "empty": {}}
        write_atomic(path, dumps(AttrDoc(**fields(custom_attributes=custom))))
        doc = read_file(path)
        doc.description = "edited"
        write_atomic(path, dumps(doc))
        again = read_file(path)
        assert again.custom_attributes == custom and again.description == "edited"

    def test_unknown_keys_preserved_and_appended(self, tmp_path):
        raw = v1_dict() | {"x_added_later": {"k": [1]}, "retention_days": 30}
        doc = loads(encode(raw))
        assert doc.extra == {"x_added_later": {"k": [1]}, "retention_days": 30}
        path = tmp_path / "a.attr.json"
        write_atomic(path, dumps(doc))
        out = json.loads(path.read_bytes())
        assert list(out) == [*V2_KEYS, "x_added_later", "retention_days"]
        assert loads(path.read_bytes()).extra == doc.extra

    def test_custom_attributes_wins_over_differing_metadata(self, caplog):
        raw = v1_dict(metadata={"old": 1}) | {"schema_version": "2.0",
                                               "custom_attributes": {"new": 2}}
        with caplog.at_level(logging.WARNING, logger="storage.attrs"):
            assert loads(encode(raw), "p.attr.json").custom_attributes == {"new": 2}
        assert "p.attr.json" in caplog.text

    def test_upstream_migrated_file_keeps_its_metadata(self):
        raw = v1_dict(metadata={"old": 1}) | {"schema_version": "2.0", "custom_attributes": {}}
        assert loads(encode(raw)).custom_attributes == {"old": 1}

    def test_custom_attributes_validation(self):
        with pytest.raises(ValueError):
            validate_custom_attributes(["not", "a", "dict"])
        assert validate_custom_attributes({"a": [1, {"b": None}]}) == {"a": [1, {"b": None}]}

    @pytest.mark.parametrize(
        ("bad", "message"),
        [
            ({1: "x"}, "non-string key"),
            ({"a": "x\x00y"}, r"custom_attributes\['a'\] contains a NUL"),
            ({"a\x00": 1}, "NUL"),
            ({"a": ["\ud800"]}, r"custom_attributes\['a'\]\[0\] contains a lone surrogate"),
            ({"a": {1, 2}}, "set, not a JSON value"),
            ({"a": float("nan")}, "JSON cannot represent"),
            ({"a": (1, 2)}, "tuple"),
            (None, "must be a JSON object"),
        ],
    )
    def test_custom_attributes_rejected(self, bad, message):
        with pytest.raises(AttrError, match=message):
            validate_custom_attributes(bad)

    def test_nesting_depth_limit(self):
        def nested(levels):
            obj: dict = {}
            for _ in range(levels - 1):
                obj = {"k": obj}
            return obj

        validate_custom_attributes(nested(32))
        with pytest.raises(AttrError, match="deeper than 32"):
            validate_custom_attributes(nested(33))
        with pytest.raises(AttrError, match="deeper than 32"):
            validate_custom_attributes({"a": json.loads("[" * 32 + "]" * 32)})


class TestRealWorldScenarios:
    def test_new_deployment_creates_v2_only(self):
        assert detect_version(build(**fields())) == "2.0"
        assert list(build(**fields(custom_attributes={}))) == list(V2_KEYS)

    def test_mixed_v1_v2_environment(self):
        v1 = loads(encode(v1_dict(0, {"a": 1})))
        v2 = loads(dumps(migrate_v1_to_v2(v1_dict(0, {"a": 1}))))
        assert v1 == v2
        assert json.loads(dumps(v1)) == json.loads(dumps(v2))
        assert json.loads(dumps(v1))["schema_version"] == "2.0"


class TestLoads:
    def test_round_trip(self):
        doc = AttrDoc(**fields(), extra={"z": 1})
        assert loads(dumps(doc)) == doc

    def test_text_is_not_bytes(self):
        with pytest.raises(AttrError, match="/p: expected bytes, not str"):
            loads(dumps(AttrDoc(**fields())).decode(), "/p")

    def test_extra_must_be_a_dict(self):
        with pytest.raises(AttrError, match="extra must be a dict"):
            AttrDoc(**fields(), extra=[("k", 1)])

    @pytest.mark.parametrize(
        "text",
        ["2026-11-24T09:52:35.879072+00:00", "2026-11-24 09:52:35.879072+00:00",
         "2026-11-24T09:52:35.879072", "2026-11-24 09:52:35.879072",
         "2026-11-24T12:52:35.879072+03:00", "2026-11-24T09:52:35.879072Z"],
    )
    def test_both_datetime_forms(self, text):
        doc = loads(encode(v1_dict() | {"created_at": text}))
        assert doc.created_at == CREATED and doc.created_at.tzinfo is UTC

    def test_zero_byte_file_allowed(self):
        assert loads(encode(v1_dict() | {"file_size": 0})).file_size == 0

    def test_optional_keys_may_be_absent(self):
        raw = {k: v for k, v in v1_dict().items() if k not in attrs.OPTIONAL_KEYS}
        doc = loads(encode(raw))
        assert doc.description is None and doc.custom_attributes == {}

    @pytest.mark.parametrize(
        ("change", "message"),
        [
            ({"file_size": -1}, "file_size must be >= 0"),
            ({"file_size": "10"}, "file_size must be an integer"),
            ({"file_size": True}, "file_size must be an integer"),
            ({"file_size": 1.5}, "file_size must be an integer"),
            ({"checksum": "ab" * 31}, "checksum"),
            ({"checksum": "zz" * 32}, "checksum"),
            ({"checksum": None}, "checksum"),
            ({"file_id": "nope"}, "file_id is not a UUID"),
            ({"file_id": 5}, "file_id is not a UUID"),
            ({"created_at": 5}, "created_at is not an ISO-8601"),
            ({"updated_at": "yesterday"}, "updated_at"),
            ({"created_at": "0001-01-01T00:00:00+23:59"}, "out of range"),
            ({"description": 5}, "description must be a string"),
            ({"original_filename": "a\x00b"}, "original_filename contains a NUL"),
            ({"content_type": None}, "content_type must be a string"),
            ({"storage_filename": "../x"}, "storage_filename"),
            ({"storage_filename": ".."}, "storage_filename"),
            ({"storage_path": "2026/../../etc/"}, "storage_path"),
            ({"storage_path": "/etc/"}, "storage_path"),
            ({"metadata": "x"}, "metadata must be a JSON object"),
            ({"custom_attributes": [1], "schema_version": "2.0"}, "custom_attributes must be"),
            ({"schema_version": "9"}, "unsupported"),
            ({"extra_key": {"a": "\x00"}}, "unknown keys"),
        ],
    )
    def test_bad_values_name_the_path_and_problem(self, change, message):
        with pytest.raises(AttrError, match=message) as info:
            loads(encode(v1_dict() | change), "/data/x.attr.json")
        assert str(info.value).startswith("/data/x.attr.json: ")
        assert info.value.path == "/data/x.attr.json"

    def test_missing_key(self):
        raw = v1_dict()
        del raw["checksum"], raw["created_at"]
        with pytest.raises(AttrError, match="/p: missing key.*created_at, checksum"):
            loads(encode(raw), "/p")

    @pytest.mark.parametrize(
        "data",
        [b"", b"{", b"not json", b"\xff\xfe{}", b"[]", b'"x"', b"1", b"null",
         "\ufeff{}".encode(), b'{"a": NaN}', b"[" * 4000, b'{"a":' * 2000],
    )
    def test_corrupt_input(self, data):
        with pytest.raises(AttrError, match="^/p: "):
            loads(data, "/p")

    def test_truncated(self):
        data = dumps(AttrDoc(**fields()))
        for cut in (1, len(data) // 2, len(data) - 1):
            with pytest.raises(AttrError, match="corrupt or truncated"):
                loads(data[:cut], "/p")

    def test_oversized_bytes(self):
        data = encode(v1_dict() | {"pad": "x" * MAX_ATTR_SIZE})
        with pytest.raises(AttrError, match=f"/p: attribute file is {len(data)} bytes"):
            loads(data, "/p")

    def test_fuzz_random_bytes(self):
        rng = random.Random(1234)
        valid = dumps(AttrDoc(**fields()))
        for _ in range(2000):
            if rng.random() < 0.5:
                data = rng.randbytes(rng.randrange(0, 300))
            else:
                data = bytearray(valid)
                for _ in range(rng.randrange(1, 6)):
                    data[rng.randrange(len(data))] = rng.randrange(256)
            try:
                loads(bytes(data), "/fuzz")
            except AttrError as exc:
                assert exc.path == "/fuzz"

    def test_fuzz_random_json_values(self):
        rng = random.Random(99)
        weird = [None, True, -1, 0, 2**70, 1e308, "", "\x00", "\ud800", "2026-13-01", [], {},
                 [1, {"a": None}], "../..", "ab" * 32, str(FID), "x" * 500]
        for _ in range(2000):
            raw = v1_dict() | ({"schema_version": "2.0"} if rng.random() < 0.5 else {})
            for _ in range(rng.randrange(1, 4)):
                key = rng.choice([*V2_KEYS, "other"])
                if rng.random() < 0.2:
                    raw.pop(key, None)
                else:
                    raw[key] = rng.choice(weird)
            data = json.dumps(raw).encode()  # ASCII escapes, so "\ud800" survives encoding
            try:
                doc = loads(data, "/fuzz")
            except AttrError:
                continue
            assert loads(dumps(doc)) == doc


class TestCheckSize:
    def test_names_the_biggest_field(self):
        doc = AttrDoc(**fields(description="d" * 5000))
        with pytest.raises(AttrTooLarge) as info:
            check_size(doc)
        size = len(dumps(doc))
        assert info.value.field == "description" and info.value.size == size
        assert str(info.value) == (
            f"description is too long: the attribute file would be {size} bytes, limit 4096")
        assert isinstance(info.value, AttrError)

    def test_metadata_counts_both_copies(self):
        with pytest.raises(AttrTooLarge, match="^metadata is too long"):
            check_size(fields(custom_attributes={"k": "v" * 1500}, description="d" * 1600))

    def test_other_field(self):
        with pytest.raises(AttrTooLarge, match="^original_filename is too long"):
            check_size(AttrDoc(**fields(original_filename="я" * 3000)))

    def test_small_document_passes(self):
        assert check_size(AttrDoc(**fields())) is None


class TestFiles:
    def test_read_file_round_trip(self, tmp_path):
        path = tmp_path / "a.attr.json"
        write_atomic(path, dumps(AttrDoc(**fields())))
        assert read_file(path) == AttrDoc(**fields())

    def test_read_oversized_file(self, tmp_path):
        path = tmp_path / "big.attr.json"
        path.write_bytes(b" " * (MAX_ATTR_SIZE + 1))
        with pytest.raises(AttrError, match=f"^{path}: file is 4097 bytes, limit 4096"):
            read_file(path)

    def test_read_corrupt_file_names_the_path(self, tmp_path):
        path = tmp_path / "bad.attr.json"
        path.write_bytes(b'{"file_id": ')
        with pytest.raises(AttrError) as info:
            read_file(path)
        assert info.value.path == str(path) and str(path) in str(info.value)

    def test_read_directory(self, tmp_path):
        with pytest.raises(AttrError, match="not a regular file"):
            read_file(tmp_path)

    def test_read_missing_file(self, tmp_path):
        with pytest.raises(FileNotFoundError):
            read_file(tmp_path / "missing.attr.json")

    def test_write_overwrites_without_leftovers(self, tmp_path):
        path = tmp_path / "a.attr.json"
        path.write_bytes(b"old")
        write_atomic(path, b"new")
        assert path.read_bytes() == b"new"
        assert temp_leftovers(tmp_path) == []

    def test_write_into_a_file_instead_of_a_directory(self, tmp_path):
        blocker = tmp_path / "blocker"
        blocker.write_bytes(b"")
        with pytest.raises(NotADirectoryError):
            write_atomic(blocker / "a.attr.json", b"{}")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker"]

    def test_unserialisable_data_leaves_no_temp(self, tmp_path):
        path = tmp_path / "a.attr.json"
        path.write_bytes(b"old")
        with pytest.raises(TypeError):
            write_atomic(path, {"not": "bytes"})
        assert path.read_bytes() == b"old"
        assert temp_leftovers(tmp_path) == []

    def test_failed_rename_leaves_no_temp(self, tmp_path, monkeypatch):
        path = tmp_path / "a.attr.json"
        path.write_bytes(b"old")

        def boom(src, dst):
            assert Path(src).name.startswith(".tmp_attr_") and str(src).endswith(".json")
            assert Path(src).parent == tmp_path and Path(src).read_bytes() == b"new"
            raise OSError("disk on fire")

        monkeypatch.setattr(os, "replace", boom)
        with pytest.raises(OSError, match="disk on fire"):
            write_atomic(path, b"new")
        assert path.read_bytes() == b"old"
        assert temp_leftovers(tmp_path) == []

    def test_directory_is_fsynced(self, tmp_path, monkeypatch):
        synced = []
        real_fsync = os.fsync
        monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.fstat(fd)) or real_fsync(fd))
        write_atomic(tmp_path / "a.attr.json", b"{}")
        assert len(synced) == 2 and synced[-1].st_ino == tmp_path.stat().st_ino


# --- fast serialisation (issue 16) ---------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.text(max_size=20)
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=4),
    max_leaves=12)


@settings(deadline=None)
@given(st.dictionaries(st.text(max_size=10), json_values, min_size=1, max_size=6))
def test_indent2_is_json_dumps_indent_2_byte_for_byte(doc):
    assert indent2(doc) == json.dumps(doc, indent=2, ensure_ascii=False)


def test_serialize_equals_dumps_of_the_checked_document():
    doc = AttrDoc(**fields(custom_attributes={"a": [1, {"b": "é"}], "c": {}}))
    assert doc.serialize() == json.dumps(doc.to_dict(), indent=2,
                                         ensure_ascii=False).encode("utf-8")
    assert dumps(doc) == doc.serialize()


@settings(deadline=None)
@given(st.text(min_size=1, max_size=400), st.text(max_size=600), st.text(max_size=60))
def test_a_document_said_to_fit_always_fits(name, description, username):
    from storage.domain import attrmeta
    from storage.domain.naming import NamingError
    from storage.domain.uploads import UploadSpec, attr_surely_fits, build_meta
    from storage.models import Identity, utcnow

    who = Identity(sub="s" * 30, name=username, role="user", token_type="user",
                   is_service_account=False)
    spec = UploadSpec(original_filename=name, description=description or None)
    try:
        meta = build_meta(spec, who, uuid.uuid4(), utcnow())
    except (NamingError, ValueError, attrs.AttrError):
        return  # a name the naming rules refuse
    except Exception as exc:  # noqa: BLE001
        if getattr(exc, "status", None) == 400:
            return
        raise
    meta.file_size, meta.checksum = 10**15, "f" * 64
    try:
        doc = attrmeta.to_doc(meta)
    except attrs.AttrError:
        return  # a text the document refuses (NUL, lone surrogate): a 400 anyway
    if attr_surely_fits(meta):
        assert len(doc.serialize()) <= MAX_ATTR_SIZE


def test_the_fixed_part_of_a_document_is_within_its_allowance():
    from storage.domain.uploads import ATTR_FIXED_PART

    empty = AttrDoc(**fields(original_filename="a", storage_filename="a",
                             content_type="", created_by_id="", created_by_username="",
                             created_by_fullname=None, description=None, version=None,
                             storage_path="", custom_attributes={}, file_size=10**15))
    assert len(empty.serialize()) < ATTR_FIXED_PART
