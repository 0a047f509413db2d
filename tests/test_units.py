import pytest

from memwarden.units import SettingError, format_size, parse_bool, parse_duration, parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("512MB", 512_000_000),
        ("512MiB", 512 * 1024**2),
        ("1.5GB", 1_500_000_000),
        ("1.5GiB", int(1.5 * 1024**3)),
        ("524288", 524288 * 1024),  # bare integers are KiB, like Sidekiq memory killers' MAX_RSS
        (" 2 gib ", 2 * 1024**3),
        ("100b", 100),
        (1024, 1024 * 1024),
    ],
)
def test_sizes(text, expected):
    assert parse_size(text, "MEMWARDEN_SOFT_LIMIT") == expected


def test_percent_of_quota():
    assert parse_size("85%", "MEMWARDEN_SOFT_LIMIT", quota=1000) == 850


def test_percent_without_quota_names_setting_and_example():
    with pytest.raises(SettingError) as err:
        parse_size("85%", "MEMWARDEN_SOFT_LIMIT")
    assert "MEMWARDEN_SOFT_LIMIT" in str(err.value) and "MEMWARDEN_QUOTA" in str(err.value)


@pytest.mark.parametrize("bad", ["lots", "12XB", "-5MB", "1.5", "", "85 %%", 1.5, True])
def test_bad_sizes_name_the_setting_and_give_an_example(bad):
    with pytest.raises(SettingError) as err:
        parse_size(bad, "MEMWARDEN_HARD_LIMIT")
    text = str(err.value)
    assert text.startswith("MEMWARDEN_HARD_LIMIT=") and "for example" in text


@pytest.mark.parametrize(
    ("text", "expected"),
    [("120", 120.0), ("90s", 90.0), ("2m", 120.0), ("1h", 3600.0), ("250ms", 0.25), (5, 5.0)],
)
def test_durations(text, expected):
    assert parse_duration(text, "MEMWARDEN_GRACE") == expected


@pytest.mark.parametrize("bad", ["soon", "2 weeks", "-1", -1, float("nan")])
def test_bad_durations(bad):
    with pytest.raises(SettingError, match="MEMWARDEN_GRACE"):
        parse_duration(bad, "MEMWARDEN_GRACE")


def test_bools():
    assert parse_bool("yes") and parse_bool("1") and not parse_bool("off")
    with pytest.raises(SettingError, match="MEMWARDEN_DRY_RUN"):
        parse_bool("maybe", "MEMWARDEN_DRY_RUN")


def test_format_size():
    assert format_size(1536) == "1.5 KiB"
    assert format_size(3 * 1024**3) == "3.0 GiB"
    assert format_size(None) == "-"
