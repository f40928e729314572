"""`[boot] acpi = "auto" | true | false` in the VM config."""

from pathlib import Path

import pytest

from pymvm.config import ConfigError, load_config


def load(tmp_path: Path, acpi_line: str):
    (tmp_path / "vmlinux").write_bytes(b"\x7fELF" + bytes(60))
    path = tmp_path / "vm.toml"
    path.write_text(f'[boot]\nkernel = "vmlinux"\n{acpi_line}\n')
    return load_config(path, available_memory_mib=lambda _h: 1 << 20)


def test_acpi_defaults_to_auto(tmp_path):
    assert load(tmp_path, "").boot.acpi == "auto"


@pytest.mark.parametrize("line,value", [('acpi = "auto"', "auto"), ("acpi = true", True),
                                        ("acpi = false", False)])
def test_acpi_accepts_auto_true_and_false(tmp_path, line, value):
    assert load(tmp_path, line).boot.acpi == value


@pytest.mark.parametrize("line", ['acpi = "yes"', "acpi = 1", 'acpi = "Auto"'])
def test_other_acpi_values_are_one_line_errors_naming_the_choices(tmp_path, line):
    with pytest.raises(ConfigError) as info:
        load(tmp_path, line)
    message = str(info.value)
    assert "boot.acpi" in message and '"auto", true or false' in message and "\n" not in message
