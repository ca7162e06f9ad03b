"""The shipped hardware/model catalog, and the errors a bad catalog file gives."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest

from twin.catalog import (
    PRECISIONS,
    USABLE_MEMORY_FRACTION,
    Catalog,
    ConfigError,
    Figure,
    fits,
    fleets_dir,
    load_catalog,
    provenance_of,
)

CALIBRATION = Path(__file__).parent / "data" / "calibration.csv"

SYSTEM_IDS = {
    "h100-sxm",
    "h200-sxm",
    "b200-sxm",
    "gb200",
    "rubin",
    "groq-lpu-v1",
    "groq3-lpu",
    "trainium2",
    "trainium3",
    "cerebras-wse3",
    "gaudi3",
    "crescent-island",
    "sn40l",
    "sn50",
    "lumai-iris-nova",
    "blackhole-p150",
}
MODEL_IDS = {"llama-3.1-8b", "llama-3.1-70b", "llama-3.1-405b"}


def calibration_rows() -> list[dict[str, str]]:
    with CALIBRATION.open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return load_catalog()


# ----------------------------------------------------------------------------- shipped catalog


def test_shipped_catalog_loads_and_is_cached(catalog: Catalog) -> None:
    assert (fleets_dir() / "hardware.toml").is_file()
    assert load_catalog() is catalog
    assert load_catalog(fleets_dir()) is catalog


def test_exactly_the_listed_systems_and_models(catalog: Catalog) -> None:
    assert set(catalog.systems) == SYSTEM_IDS
    assert set(catalog.models) == MODEL_IDS


def test_every_figure_has_a_valid_provenance(catalog: Catalog) -> None:
    for system_id, system in catalog.systems.items():
        figures = system.figures()
        assert {"bf16_tflops", "fp8_tflops", "mfu", "mbu", "peak_w", "idle_w"} <= set(figures)
        for name, figure in figures.items():
            assert figure.provenance in ("published", "derived", "estimate", "fitted"), (
                system_id,
                name,
            )
    for model in catalog.models.values():
        assert provenance_of(model.source) == "published"


def test_unpublished_compute_is_marked_as_estimate(catalog: Catalog) -> None:
    for system_id in ("lumai-iris-nova", "crescent-island"):
        system = catalog.systems[system_id]
        assert system.bf16_tflops.is_estimate
        assert system.fp8_tflops.is_estimate
    lumai = catalog.systems["lumai-iris-nova"]
    assert all(f.is_estimate for f in lumai.figures().values())
    assert catalog.systems["h100-sxm"].bf16_tflops.provenance == "published"


def test_weights_tier_and_units(catalog: Catalog) -> None:
    for system_id in ("groq-lpu-v1", "groq3-lpu", "cerebras-wse3"):
        assert catalog.systems[system_id].weights_in == "sram"
    h100 = catalog.systems["h100-sxm"]
    assert h100.weights_in == "hbm"
    assert h100.peak_flops("bf16") == pytest.approx(989e12)
    assert h100.peak_flops("fp8") == pytest.approx(1979e12)
    assert h100.mem_capacity_bytes() == pytest.approx(80e9)
    assert h100.mem_bandwidth_Bps() == pytest.approx(3.35e12)
    groq = catalog.systems["groq-lpu-v1"]
    assert groq.mem_capacity_bytes() == pytest.approx(0.23e9)
    assert groq.mem_bandwidth_Bps() == pytest.approx(80e12)


def test_speculative_factor(catalog: Catalog) -> None:
    sn40l = catalog.systems["sn40l"]
    assert sn40l.speculative_factor("llama-3.1-70b") == pytest.approx(3.2)
    assert sn40l.speculative_factor("llama-3.1-8b") == 1.0
    assert catalog.systems["h100-sxm"].speculative_factor("llama-3.1-70b") == 1.0
    assert "speculative.llama-3.1-70b" in sn40l.figures()


def test_model_bytes(catalog: Catalog) -> None:
    m70 = catalog.models["llama-3.1-70b"]
    assert m70.weight_bytes("bf16") == 141107412992
    assert m70.weight_bytes("fp8") == 70553706496
    assert m70.kv_bytes_per_token("bf16") == 327680
    assert m70.kv_bytes_per_token("fp8") == 163840
    assert catalog.models["llama-3.1-405b"].kv_bytes_per_token("bf16") == 516096


@pytest.mark.parametrize("row", calibration_rows(), ids=lambda r: r["id"])
def test_calibration_rows_exist_and_fit(catalog: Catalog, row: dict[str, str]) -> None:
    assert row["system"] in catalog.systems
    assert row["model"] in catalog.models
    assert row["precision"] in PRECISIONS
    system = catalog.systems[row["system"]]
    ok, needed, usable = fits(
        system,
        catalog.models[row["model"]],
        row["precision"],
        int(row["chips"]),
    )
    assert ok, (row["id"], needed, usable)
    assert usable == pytest.approx(
        int(row["chips"]) * system.mem_capacity_bytes() * USABLE_MEMORY_FRACTION
    )


def test_70b_bf16_does_not_fit_one_h100(catalog: Catalog) -> None:
    ok, needed, usable = fits(
        catalog.systems["h100-sxm"], catalog.models["llama-3.1-70b"], "bf16", 1
    )
    assert not ok
    assert needed == pytest.approx(141107412992)
    assert usable == pytest.approx(80e9 * 0.9)


def test_figure_provenance_values() -> None:
    assert Figure(value=1, source="https://a.example/x ; https://b.example/y").provenance == (
        "published"
    )
    assert Figure(value=1, source="derived: 2 / 2").provenance == "derived"
    assert Figure(value=1, source="estimate: a guess").is_estimate
    assert Figure(value=1, source="fitted: cal-x").provenance == "fitted"
    with pytest.raises(ConfigError):
        _ = Figure(value=1, source="vendor says so").provenance


# ----------------------------------------------------------------------------- bad files


def _catalog_copy(tmp_path: Path) -> Path:
    for name in ("hardware.toml", "models.toml"):
        shutil.copy(fleets_dir() / name, tmp_path / name)
    return tmp_path


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text(encoding="utf-8")
    assert text.count(old) == 1, old
    path.write_text(text.replace(old, new), encoding="utf-8")


H100_MFU = 'mfu = { value = 0.44, source = "fitted: cal-h100-70b-offline'


def _error(directory: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load_catalog(directory)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_copied_catalog_loads(tmp_path: Path) -> None:
    assert set(load_catalog(_catalog_copy(tmp_path)).systems) == SYSTEM_IDS


def test_unknown_key(tmp_path: Path) -> None:
    d = _catalog_copy(tmp_path)
    _edit(d / "hardware.toml", "[systems.h100-sxm]\n", "[systems.h100-sxm]\nmfu_typo = 1\n")
    message = _error(d)
    assert "hardware.toml" in message
    assert "systems.h100-sxm.mfu_typo" in message
    assert "unknown key" in message


def test_unknown_key_in_models_file(tmp_path: Path) -> None:
    d = _catalog_copy(tmp_path)
    _edit(d / "models.toml", 'name = "Llama 3.1 8B"\n', 'name = "Llama 3.1 8B"\nlayer = 32\n')
    message = _error(d)
    assert "models.toml" in message
    assert 'models."llama-3.1-8b".layer' in message


def test_wrong_type(tmp_path: Path) -> None:
    d = _catalog_copy(tmp_path)
    _edit(d / "hardware.toml", H100_MFU, H100_MFU.replace("0.44", '"high"'))
    message = _error(d)
    assert "hardware.toml" in message
    assert "systems.h100-sxm.mfu.value" in message
    assert "expected a number" in message


def test_wrong_type_inside_speculative_table(tmp_path: Path) -> None:
    d = _catalog_copy(tmp_path)
    _edit(
        d / "hardware.toml",
        '"llama-3.1-70b" = { value = 3.2, source = "fitted',
        '"llama-3.1-70b" = { value = "3.2", source = "fitted',
    )
    message = _error(d)
    assert 'systems.sn40l.speculative."llama-3.1-70b".value' in message


def test_value_out_of_range(tmp_path: Path) -> None:
    d = _catalog_copy(tmp_path)
    _edit(d / "hardware.toml", H100_MFU, H100_MFU.replace("0.44", "1.5"))
    message = _error(d)
    assert "hardware.toml" in message
    assert "systems.h100-sxm.mfu.value" in message
    assert "0 < mfu <= 1" in message


def test_source_without_valid_prefix(tmp_path: Path) -> None:
    d = _catalog_copy(tmp_path)
    _edit(d / "hardware.toml", H100_MFU, 'mfu = { value = 0.44, source = "guess: cal-h100')
    message = _error(d)
    assert "hardware.toml" in message
    assert "systems.h100-sxm.mfu.source" in message


def test_toml_syntax_error(tmp_path: Path) -> None:
    d = _catalog_copy(tmp_path)
    _edit(d / "hardware.toml", H100_MFU, H100_MFU.replace("mfu = {", "mfu = = {"))
    message = _error(d)
    assert "hardware.toml" in message
    assert "systems.h100-sxm.mfu" in message
    assert "invalid TOML" in message


def test_weights_tier_missing(tmp_path: Path) -> None:
    d = _catalog_copy(tmp_path)
    _edit(
        d / "hardware.toml",
        'weights_in = "hbm"\ninterconnect = "NVLink 4 (bidir aggregate)"',
        'weights_in = "sram"\ninterconnect = "NVLink 4 (bidir aggregate)"',
    )
    message = _error(d)
    assert "systems.h100-sxm.weights_in" in message


def test_speculative_for_unknown_model(tmp_path: Path) -> None:
    d = _catalog_copy(tmp_path)
    _edit(
        d / "hardware.toml",
        '[systems.sn40l.speculative]\n"llama-3.1-70b"',
        '[systems.sn40l.speculative]\n"llama-9"',
    )
    message = _error(d)
    assert "systems.sn40l.speculative.llama-9: unknown model id" in message


def test_missing_file(tmp_path: Path) -> None:
    shutil.copy(fleets_dir() / "models.toml", tmp_path / "models.toml")
    message = _error(tmp_path)
    assert "hardware.toml" in message
