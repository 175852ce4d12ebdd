"""Tests for brain_ldm_nodes.demographics against the upstream facts (UPSTREAM.md section 1)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from brain_ldm_nodes.demographics import (
    BUNDLE_DEFAULTS,
    CONDITIONING_ORDER,
    Conditioning,
    DemographicsError,
    DemographicsPolicy,
    conditioning_from_normalised,
    normalise_demographics,
    parse_age_years,
    parse_sex,
)


def _raw(**overrides):
    raw = {"sex": "M", "age": 63, "ventricular_volume": 0.25, "brain_volume": 0.75}
    raw.update(overrides)
    return raw


# --------------------------------------------------------------------------- order / vector


def test_conditioning_order_is_sex_age_ventricular_brain():
    assert CONDITIONING_ORDER == ("sex", "age", "ventricular_volume", "brain_volume")


def test_as_array_is_float32_shape_4_in_upstream_order():
    conditioning = normalise_demographics(_raw())
    array = conditioning.as_array()
    assert array.dtype == np.float32 and array.shape == (4,)
    np.testing.assert_array_equal(array, [1.0, 0.5, 0.25, 0.75])
    assert conditioning.as_dict() == {
        "sex": 1.0, "age": 0.5, "ventricular_volume": 0.25, "brain_volume": 0.75
    }


def test_conditioning_is_frozen():
    conditioning = conditioning_from_normalised(0, 0, 0, 0)
    with pytest.raises(AttributeError):
        conditioning.values = (1.0, 1.0, 1.0, 1.0)  # type: ignore[misc]


# --------------------------------------------------------------------------- sex


@pytest.mark.parametrize(
    "code, expected",
    [("male", 1.0), ("M", 1.0), (" Man ", 1.0), ("F", 0.0), ("female", 0.0), ("Woman", 0.0),
     ("w", 0.0)],
)
def test_sex_female_is_0_and_male_is_1_case_insensitively(code, expected):
    assert parse_sex(code, DemographicsPolicy()) == expected


def test_numeric_sex_code_is_rejected_by_default_with_the_accepted_codes():
    with pytest.raises(DemographicsError) as info:
        parse_sex("2", DemographicsPolicy())
    assert str(info.value) == (
        "sex: unknown code '2' (accepted: f, female, m, male, man, w, woman; "
        "numeric codes need an explicit sex_codes mapping)"
    )


def test_numeric_sex_codes_work_with_an_explicit_mapping_as_text_int_or_float():
    policy = DemographicsPolicy(sex_codes={"1": 1, "2": 0})
    assert parse_sex("2", policy) == 0.0
    assert parse_sex(2, policy) == 0.0
    assert parse_sex("1.0", policy) == 1.0
    assert parse_sex(1.0, policy) == 1.0
    with pytest.raises(DemographicsError, match="sex: unknown code 'male'"):
        parse_sex("male", policy)


@pytest.mark.parametrize("cell", [None, "", "  ", "n/a", "N/A", "NaN", float("nan")])
def test_missing_tokens_parse_as_missing(cell):
    assert parse_sex(cell, DemographicsPolicy()) is None
    assert parse_age_years(cell, DemographicsPolicy()) is None


def test_boolean_sex_is_rejected():
    with pytest.raises(DemographicsError, match="sex"):
        parse_sex(True, DemographicsPolicy())


# --------------------------------------------------------------------------- age


@pytest.mark.parametrize("age_years, expected", [(44, 0.0), (82, 1.0), (63, 0.5), ("63.0", 0.5)])
def test_age_is_normalised_over_uk_biobank_range_44_to_82(age_years, expected):
    conditioning = normalise_demographics(_raw(age=age_years))
    assert conditioning.values[1] == pytest.approx(expected, abs=1e-12)
    assert conditioning.record["age"]["formula"] == "(age_years - 44) / (82 - 44)"


@pytest.mark.parametrize(
    "cell, expected",
    [(63, (63.0, "value")), (" 63.5 ", (63.5, "value")), ("35-40", (37.5, "range_midpoint")),
     ("35 \u2013 40", (37.5, "range_midpoint")), ("89+", (89.0, "open_ended_lower_bound"))],
)
def test_parse_age_years_accepts_numbers_ranges_and_open_ended(cell, expected):
    assert parse_age_years(cell, DemographicsPolicy()) == expected


def test_age_range_with_error_policy_is_rejected():
    with pytest.raises(DemographicsError, match="age: range '35-40'.*age_range_policy"):
        parse_age_years("35-40", DemographicsPolicy(age_range_policy="error"))


def test_open_ended_age_with_error_policy_is_rejected():
    with pytest.raises(DemographicsError, match=r"age: open-ended '89\+'"):
        parse_age_years("89+", DemographicsPolicy(age_open_ended_policy="error"))


@pytest.mark.parametrize("cell", [-3, "-3", "sixty", "63 months", "6M", "inf", True, [63]])
def test_negative_or_non_numeric_age_is_an_error_naming_the_field(cell):
    with pytest.raises(DemographicsError, match="^age: "):
        parse_age_years(cell, DemographicsPolicy())


def test_age_outside_training_range_is_an_error_by_default():
    with pytest.raises(DemographicsError) as info:
        normalise_demographics(_raw(age=30))
    message = str(info.value)
    assert message.startswith("age: 30 years")
    assert "outside [0, 1]" in message and "out_of_range" in message


def test_age_outside_training_range_is_clipped_with_clip_policy_and_recorded():
    policy = DemographicsPolicy(out_of_range="clip")
    young = normalise_demographics(_raw(age=30), policy)
    old = normalise_demographics(_raw(age="89+"), policy)
    assert young.values[1] == 0.0 and old.values[1] == 1.0
    assert young.record["age"]["clipped"] is True
    assert young.record["age"]["unclipped_value"] == pytest.approx((30 - 44) / 38)
    assert old.record["age"]["how"] == "open_ended_lower_bound"


def test_age_outside_training_range_is_extrapolated_with_allow_policy_and_recorded():
    conditioning = normalise_demographics(_raw(age=30), DemographicsPolicy(out_of_range="allow"))
    assert conditioning.values[1] == pytest.approx((30 - 44) / 38)
    assert conditioning.record["age"]["extrapolated"] is True
    assert conditioning.record["age"]["clipped"] is False


# --------------------------------------------------------------------------- volumes


def test_volumes_already_in_unit_range_pass_through_unchanged():
    conditioning = normalise_demographics(_raw(ventricular_volume="0.7", brain_volume=0.5))
    assert conditioning.values[2:] == (0.7, 0.5)
    assert conditioning.record["ventricular_volume"]["how"] == "already_normalised"


def test_volume_in_mm3_without_reference_range_is_an_error_asking_for_one():
    with pytest.raises(DemographicsError) as info:
        normalise_demographics(_raw(ventricular_volume=31250.0))
    message = str(info.value)
    assert message.startswith("ventricular_volume: 31250")
    assert "ventricular_volume_range_mm3" in message and "unpublished" in message


def test_volume_in_mm3_with_reference_range_is_min_max_scaled_and_flagged_approximate():
    policy = DemographicsPolicy(
        ventricular_volume_range_mm3=(10_000.0, 50_000.0),
        brain_volume_range_mm3=[1_000_000, 1_600_000],
    )
    conditioning = normalise_demographics(
        _raw(ventricular_volume="30000", brain_volume=1_450_000), policy
    )
    assert conditioning.values[2] == pytest.approx(0.5)
    assert conditioning.values[3] == pytest.approx(0.75)
    entry = conditioning.record["brain_volume"]
    assert entry["approximation"] is True
    assert entry["reference_range_mm3"] == [1_000_000.0, 1_600_000.0]
    assert entry["volume_mm3"] == 1_450_000.0


def test_volume_outside_reference_range_follows_out_of_range_policy():
    ranges = {"ventricular_volume_range_mm3": (10_000, 50_000)}
    with pytest.raises(DemographicsError, match="^ventricular_volume: 90000 mm\\^3"):
        normalise_demographics(_raw(ventricular_volume=90_000), DemographicsPolicy(**ranges))
    clipped = normalise_demographics(
        _raw(ventricular_volume=90_000), DemographicsPolicy(out_of_range="clip", **ranges)
    )
    assert clipped.values[2] == 1.0 and clipped.record["ventricular_volume"]["clipped"] is True


@pytest.mark.parametrize("cell", [-1.0, "-0.2", "large", float("inf")])
def test_negative_or_non_numeric_volume_is_an_error_naming_the_field(cell):
    with pytest.raises(DemographicsError, match="^brain_volume: "):
        normalise_demographics(_raw(brain_volume=cell))


# --------------------------------------------------------------------------- missing / defaults


def test_missing_value_without_default_is_an_error_naming_field_and_fix():
    with pytest.raises(DemographicsError) as info:
        normalise_demographics(_raw(age="n/a"))
    assert str(info.value).startswith("age: missing value ('n/a')")
    assert "defaults['age']" in str(info.value)


def test_absent_key_counts_as_missing():
    raw = _raw()
    del raw["age"]
    with pytest.raises(DemographicsError, match="^age: missing value") as info:
        normalise_demographics(raw)
    assert info.value.kind == "age_missing"


@pytest.mark.parametrize("cell", [None, "n/a", "", " NA ", "unknown"])
def test_missing_volume_takes_the_bundle_default_and_the_record_says_why(cell):
    raw = _raw(ventricular_volume=cell)
    del raw["brain_volume"]
    conditioning = normalise_demographics(raw, missing_reasons={"brain_volume": "no column"})
    assert conditioning.values[2:] == (0.2, 0.4)  # MONAI bundle inference.json
    assert BUNDLE_DEFAULTS["ventricular_volume"] == 0.2 and BUNDLE_DEFAULTS["brain_volume"] == 0.4
    brain = conditioning.record["brain_volume"]
    assert brain["defaulted"] is True and brain["value"] == 0.4 and brain["why"] == "no column"
    assert brain["default_source"].startswith("MONAI bundle default")
    ventricles = conditioning.record["ventricular_volume"]
    assert ventricles["defaulted"] is True and ventricles["why"]


def test_missing_volumes_error_refuses_a_missing_volume_naming_the_switch():
    raw = _raw(brain_volume="n/a")
    with pytest.raises(DemographicsError, match="^brain_volume: missing value") as info:
        normalise_demographics(raw, DemographicsPolicy(missing_volumes="error"))
    assert info.value.kind == "volume_missing"
    assert "--missing-volumes default" in str(info.value)


def test_configured_volume_defaults_win_over_the_bundle_defaults():
    policy = DemographicsPolicy(defaults={"brain_volume": 0.55})
    conditioning = normalise_demographics(_raw(brain_volume="n/a"), policy)
    assert conditioning.values[3] == 0.55
    assert conditioning.record["brain_volume"]["default_source"] == "configured default"


@pytest.mark.parametrize("cell, years", [("63y", 63.0), ("063Y", 63.0), ("45 years", 45.0),
                                         (" 23.5 ", 23.5), ("89+", 89.0)])
def test_ages_with_a_year_unit_are_read_as_years(cell, years):
    assert parse_age_years(cell)[0] == years


@pytest.mark.parametrize("age, kind", [(30, "age_below"), (90, "age_above")])
def test_out_of_range_errors_say_which_side(age, kind):
    with pytest.raises(DemographicsError) as info:
        normalise_demographics(_raw(age=age))
    assert info.value.kind == kind


def test_bundle_defaults_preset_is_upstream_0_0_1_0_2_0_4():
    policy = DemographicsPolicy.bundle_defaults()
    assert dict(policy.defaults) == {
        "sex": 0.0, "age": 0.1, "ventricular_volume": 0.2, "brain_volume": 0.4
    }
    conditioning = normalise_demographics({}, policy)
    np.testing.assert_allclose(conditioning.as_array(), [0.0, 0.1, 0.2, 0.4], rtol=1e-6)
    assert all(conditioning.record[name]["defaulted"] for name in CONDITIONING_ORDER)


def test_defaults_fill_only_missing_values():
    policy = DemographicsPolicy(defaults={"ventricular_volume": 0.3})
    conditioning = normalise_demographics(_raw(ventricular_volume="n/a"), policy)
    assert conditioning.values == (1.0, 0.5, 0.3, 0.75)
    assert conditioning.record["ventricular_volume"]["defaulted"] is True
    assert conditioning.record["brain_volume"]["defaulted"] is False


def test_unknown_raw_field_is_rejected_so_typos_are_not_defaulted():
    raw = _raw()
    raw["brain_vol"] = raw.pop("brain_volume")
    with pytest.raises(DemographicsError, match="brain_vol: unknown demographics field"):
        normalise_demographics(raw, DemographicsPolicy.bundle_defaults())


# --------------------------------------------------------------------------- record


def test_record_is_json_serialisable_and_says_how_each_value_was_derived():
    conditioning = normalise_demographics(_raw(sex="F", age="35-40"), DemographicsPolicy(
        out_of_range="allow"
    ))
    record = json.loads(json.dumps(conditioning.record))
    assert set(record) == set(CONDITIONING_ORDER)
    assert record["sex"]["raw"] == "F" and record["sex"]["value"] == 0.0
    assert record["age"]["raw"] == "35-40" and record["age"]["how"] == "range_midpoint"
    assert record["age"]["age_years"] == 37.5 and record["age"]["extrapolated"] is True
    for entry in record.values():
        assert {"raw", "value", "how", "formula", "defaulted", "clipped", "extrapolated"} <= set(
            entry
        )


# --------------------------------------------------------------------------- direct values


def test_conditioning_from_normalised_keeps_values_in_order():
    conditioning = conditioning_from_normalised(1.0, 0.7, 0.7, 0.5)  # upstream README example
    np.testing.assert_allclose(conditioning.as_array(), [1.0, 0.7, 0.7, 0.5], rtol=1e-6)
    assert isinstance(conditioning, Conditioning)


def test_conditioning_from_normalised_checks_range_and_finiteness():
    with pytest.raises(DemographicsError, match="^brain_volume: 1.5 is outside"):
        conditioning_from_normalised(0, 0, 0, 1.5)
    with pytest.raises(DemographicsError, match="^age: "):
        conditioning_from_normalised(0, math.nan, 0, 0)
    clipped = conditioning_from_normalised(0, -0.2, 0, 0, out_of_range="clip")
    assert clipped.values[1] == 0.0
    allowed = conditioning_from_normalised(0, -0.2, 0, 0, out_of_range="allow")
    assert allowed.values[1] == -0.2 and allowed.record["age"]["extrapolated"] is True


# --------------------------------------------------------------------------- policy JSON


def test_policy_json_round_trip(tmp_path):
    policy = DemographicsPolicy(
        sex_codes={"1": 1.0, "2": 0.0},
        brain_volume_range_mm3=(1.0e6, 1.6e6),
        out_of_range="clip",
        defaults={"ventricular_volume": 0.2},
    )
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(policy.to_dict()))
    loaded = DemographicsPolicy.from_json(path)
    assert loaded == policy
    assert hash(loaded) == hash(policy)
    assert loaded.brain_volume_range_mm3 == (1.0e6, 1.6e6)


def test_policy_from_json_unknown_key_names_file_and_key(tmp_path):
    path = tmp_path / "my_policy.json"
    path.write_text(json.dumps({"age_min_years": 40, "age_max": 90}))
    with pytest.raises(DemographicsError, match=r"my_policy.json: unknown .*key 'age_max'"):
        DemographicsPolicy.from_json(path)


def test_policy_from_json_invalid_json_names_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text("{not json")
    with pytest.raises(DemographicsError, match="broken.json: not valid JSON"):
        DemographicsPolicy.from_json(path)


def test_policy_from_json_bad_value_names_file_and_field(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"out_of_range": "ignore"}))
    with pytest.raises(DemographicsError, match="p.json: out_of_range: 'ignore'"):
        DemographicsPolicy.from_json(path)


@pytest.mark.parametrize(
    "kwargs, field_name",
    [
        ({"age_min_years": 82, "age_max_years": 44}, "age_min_years"),
        ({"sex_codes": {"x": 2}}, "sex_codes"),
        ({"defaults": {"height": 0.5}}, "defaults"),
        ({"defaults": {"age": 1.5}}, "defaults"),
        ({"brain_volume_range_mm3": (5, 1)}, "brain_volume_range_mm3"),
    ],
)
def test_invalid_policy_values_are_errors_naming_the_field(kwargs, field_name):
    with pytest.raises(DemographicsError, match=f"^{field_name}"):
        DemographicsPolicy(**kwargs)
