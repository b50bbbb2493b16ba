"""Storage file names and layout (upstream tests/unit/test_file_naming.py, plus safety)."""

import unicodedata
import uuid
from datetime import UTC, datetime, timedelta, timezone

import pytest

from storage.domain.naming import (
    MAX_BYTES,
    MAX_CHARS,
    NamingError,
    extract_file_id,
    parse_storage_filename,
    sanitize,
    storage_filename,
    storage_path,
)

FID = uuid.UUID("4a1f049b-06a4-4cfa-a12c-616bbf46d2a5")
WHEN = datetime(2025, 1, 10, 15, 30, 45, tzinfo=UTC)
TAIL = f"_20250110T153045_{FID}"


def name(original: str, user: str = "ivan", when: datetime = WHEN) -> str:
    return storage_filename(original, user, when, FID)


def assert_safe_component(result: str) -> None:
    assert result not in ("", ".", "..")
    assert "/" not in result and "\\" not in result
    assert not any(unicodedata.category(ch) in ("Cc", "Cs") for ch in result)
    assert len(result) <= MAX_CHARS
    assert len(result.encode("utf-8")) <= MAX_BYTES
    assert len((result + ".attr.json").encode("utf-8")) <= 255
    assert not result.startswith(".tmp")
    assert extract_file_id(result) == FID
    assert parse_storage_filename(result)[3] == FID


class TestSanitize:
    def test_basic_text_unchanged(self):
        assert sanitize("report-2025.final") == "report-2025.final"

    @pytest.mark.parametrize("ch", list('<>:"/\\|?*'))
    def test_invalid_characters_become_underscore(self, ch):
        assert sanitize(f"a{ch}b") == "a_b"

    @pytest.mark.parametrize("ch", ["\x00", "\x01", "\n", "\t", "\x1f", "\x7f", "\x85", "\ud800"])
    def test_control_characters_and_lone_surrogates_become_underscore(self, ch):
        assert sanitize(f"a{ch}b") == "a_b"

    def test_unicode_and_spaces_kept(self):
        assert sanitize("Отчёт за май 😀") == "Отчёт за май 😀"

    def test_runs_of_underscores_collapse(self):
        assert sanitize("a__b???c") == "a_b_c"

    def test_edges_stripped(self):
        assert sanitize("__a_b__") == "a_b"
        assert sanitize("?a?") == "a"

    def test_empty_and_all_invalid(self):
        assert sanitize("") == ""
        assert sanitize('<>:"/\\|?*') == ""


class TestGenerate:
    def test_basic(self):
        assert name("report.pdf") == f"report_ivan{TAIL}.pdf"

    def test_reference_example(self):
        assert name("dir/my report?.tar.gz", "ivan ov") == f"my report_.tar_ivan ov{TAIL}.gz"

    def test_unicode_name(self):
        assert name("отчёт.txt") == f"отчёт_ivan{TAIL}.txt"

    @pytest.mark.parametrize(
        ("original", "stem", "ext"),
        [
            ("x.tar.gz", "x.tar", ".gz"),
            ("photo.JPEG", "photo", ".JPEG"),
            ("noext", "noext", ""),
            (".bashrc", ".bashrc", ""),
            ("a.", "a.", ""),
            ("a.tar_gz", "a", ".tar_gz"),
            ("a.p$f", "a.p$f", ""),  # unsafe ext stays in the (sanitised) stem
            ("a.pdf ", "a.pdf ", ""),
            ("a.тхт", "a.тхт", ""),
            ("a." + "x" * 15, "a", "." + "x" * 15),
            ("a." + "x" * 16, "a." + "x" * 16, ""),
            ("a.p?f", "a.p_f", ""),
        ],
    )
    def test_various_extensions(self, original, stem, ext):
        assert name(original) == f"{stem}_ivan{TAIL}{ext}"

    def test_timestamp_is_utc(self):
        moscow = WHEN.astimezone(timezone(timedelta(hours=3)))
        assert name("a.txt", when=moscow) == f"a_ivan{TAIL}.txt"

    def test_naive_datetime_is_taken_as_utc(self):
        assert name("a.txt", when=WHEN.replace(tzinfo=None)) == f"a_ivan{TAIL}.txt"

    def test_uuid_is_canonical_lowercase(self):
        upper = uuid.UUID(str(FID).upper())
        assert storage_filename("a", "u", WHEN, upper).endswith(str(FID))

    def test_empty_username_is_an_error(self):
        for user in ("", "   "):
            with pytest.raises(NamingError):
                name("a.txt", user)

    def test_username_only_invalid_characters_is_an_error(self):
        with pytest.raises(NamingError, match="username"):
            name("a.txt", '<>:"|?*')

    def test_username_trimmed_and_sanitised(self):
        assert name("a.txt", "  Ingester Svc/x  ") == f"a_Ingester Svc_x{TAIL}.txt"

    def test_filename_only_invalid_characters_becomes_file(self):
        assert name("???.txt") == f"file_ivan{TAIL}.txt"

    def test_staging_prefix_is_never_produced(self):
        assert name(".tmp_attr_x.json") == f"tmp_attr_x_ivan{TAIL}.json"
        assert name(".tmp") == f"tmp_ivan{TAIL}"


class TestTruncate:
    def test_short_name_unchanged(self):
        assert name("short.txt") == f"short_ivan{TAIL}.txt"

    def test_exact_length_unchanged(self):
        fixed = len(f"_ivan{TAIL}.txt")
        stem = "s" * (MAX_CHARS - fixed)
        assert name(stem + ".txt") == f"{stem}_ivan{TAIL}.txt"
        assert len(name(stem + ".txt")) == MAX_CHARS

    def test_long_name_gets_ellipsis(self):
        result = name("s" * 300 + ".txt")
        assert len(result) == MAX_CHARS
        stem = result.removesuffix(f"_ivan{TAIL}.txt")
        assert stem == "s" * (len(stem) - 3) + "..."

    def test_one_over_is_truncated(self):
        fixed = len(f"_ivan{TAIL}.txt")
        result = name("s" * (MAX_CHARS - fixed + 1) + ".txt")
        assert len(result) == MAX_CHARS and "s..._ivan" in result

    def test_200_cyrillic_chars_fit_245_bytes(self):
        result = name("я" * 200 + ".txt")
        assert result == "я" * 90 + "..." + f"_ivan{TAIL}.txt"
        assert len(result.encode()) == MAX_BYTES

    def test_emoji_cut_on_code_point_boundary(self):
        result = name("😀" * 100 + ".png")
        assert result == "😀" * 45 + "..." + f"_ivan{TAIL}.png"
        assert_safe_component(result)

    def test_huge_username_is_truncated_not_rejected(self):
        result = name("report.pdf", "u" * 300)
        assert_safe_component(result)
        stem, user, _, _, ext = parse_storage_filename(result)
        assert stem == "report" and ext == ".pdf"
        assert set(user) == {"u"} and 100 < len(user) < 300

    def test_truncated_username_does_not_end_in_underscore(self):
        result = name("report", "a" * 129 + "_" + "b" * 50)
        assert "__" not in result
        assert parse_storage_filename(result)[:2] == ("report", "a" * 129)

    def test_huge_multibyte_username_keeps_room_for_the_stem(self):
        result = name("я" * 50 + ".txt", "ж" * 300)
        assert_safe_component(result)
        stem = parse_storage_filename(result)[0]
        assert stem.endswith("...") and len(stem) > 3


@pytest.mark.parametrize(
    "original",
    ["..", ".", "/", "", "a/../../etc/passwd", "/etc/passwd", "\x00", "a\x00b.txt",
     "x" * 1000, "..\\..\\windows\\system32", "dir/", "a\nb\r.txt", "\ud800.txt",
     "я" * 200, "😀" * 200, "👨‍👩‍👧" * 40 + ".txt"],
)
def test_hostile_names_give_one_safe_component(original):
    assert_safe_component(name(original))


def test_traversal_keeps_only_the_last_component():
    assert name("a/../../etc/passwd") == f"passwd_ivan{TAIL}"
    assert name("..") == f".._ivan{TAIL}"
    assert name("/") == f"file_ivan{TAIL}"
    assert name("..\\..\\x.txt") == f".._.._x_ivan{TAIL}.txt"


class TestPath:
    def test_layout(self):
        assert storage_path(WHEN) == "2025/01/10/15/"

    def test_converted_to_utc(self):
        local = datetime(2025, 1, 1, 1, 0, tzinfo=timezone(timedelta(hours=3)))
        assert storage_path(local) == "2024/12/31/22/"

    def test_different_hours_give_different_paths(self):
        assert storage_path(WHEN) != storage_path(WHEN + timedelta(hours=1))
        assert storage_path(WHEN) == storage_path(WHEN + timedelta(minutes=10))


class TestParse:
    def test_valid(self):
        assert parse_storage_filename(f"report_ivan{TAIL}.pdf") == (
            "report", "ivan", WHEN, FID, ".pdf")

    def test_underscores_in_stem(self):
        stem, user, *_ = parse_storage_filename(f"my_big_report_ivan{TAIL}.pdf")
        assert (stem, user) == ("my_big_report", "ivan")

    def test_unicode(self):
        assert parse_storage_filename(f"отчёт_Иван{TAIL}.txt")[:2] == ("отчёт", "Иван")

    def test_no_extension(self):
        assert parse_storage_filename(f"README_ivan{TAIL}")[4] == ""

    @pytest.mark.parametrize(
        "bad",
        ["report.pdf", f"ivan{TAIL}.pdf", f"_ivan{TAIL}.pdf",
         "a_u_20251399T999999_4a1f049b-06a4-4cfa-a12c-616bbf46d2a5.pdf",
         "a_u_20250110T153045_not-a-uuid.pdf", f"a_u{TAIL}.p df"],
    )
    def test_invalid(self, bad):
        with pytest.raises(NamingError):
            parse_storage_filename(bad)

    def test_round_trip(self):
        original = "Годовой отчёт (final).tar.gz"
        stem, user, when, fid, ext = parse_storage_filename(name(original, "svc-ingester"))
        assert (stem, user, when, fid, ext) == (
            "Годовой отчёт (final).tar", "svc-ingester", WHEN, FID, ".gz")

    def test_filename_and_path_together(self):
        relative = storage_path(WHEN) + name("a.txt")
        assert relative == f"2025/01/10/15/a_ivan{TAIL}.txt"


class TestExtractFileId:
    def test_first_uuid_case_insensitive(self):
        assert extract_file_id(f"prefix-{str(FID).upper()}.attr.json") == FID

    def test_none_without_uuid(self):
        assert extract_file_id("notes.txt.attr.json") is None

    def test_uuid_in_original_name_does_not_win(self):
        decoy = uuid.UUID("00000000-1111-2222-3333-444444444444")
        attr_name = name(f"{decoy}.pdf") + ".attr.json"
        assert attr_name.startswith(str(decoy))
        assert extract_file_id(attr_name) == FID
